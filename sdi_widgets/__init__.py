"""Explore step-resolved influence: an ipywidgets explorer and a self-contained static HTML export::

    from sdi_widgets import InfluenceExplorer, explorer_inputs
    explorer = InfluenceExplorer(result, k=10, **explorer_inputs(model, train, queries, n_loops=8))
    explorer                                 # shows it in any notebook front end
    explorer.save_html("explorer.html")      # the same, as one file that needs no kernel

``InfluenceExplorer`` needs ipywidgets (``pip install loopsdi[widgets]``); the static export
(:func:`sdi_widgets.static.write_html`) and :class:`ExplorerData` do not.
"""

from .data import ExplorerData, Ranking
from .inputs import explorer_inputs
from .static import render_html, write_html

__all__ = ["ExplorerData", "InfluenceExplorer", "Ranking", "explorer_inputs", "render_html", "write_html"]


def __getattr__(name: str):
    # Imported on first use so that the static export works without ipywidgets installed.
    if name == "InfluenceExplorer":
        try:
            from .explorer import InfluenceExplorer
        except ModuleNotFoundError as err:
            if err.name != "ipywidgets":
                raise
            raise ImportError("InfluenceExplorer needs ipywidgets: pip install 'loopsdi[widgets]' "
                              "(or 'ipywidgets>=7.7,<9')") from err
        return InfluenceExplorer
    raise AttributeError(f"module 'sdi_widgets' has no attribute {name!r}")
