"""What the explorer shows beside the scores, computed from a trained LoopedGPT and its datasets::

    inputs = explorer_inputs(model, train, queries, n_loops=8)
    InfluenceExplorer(result, k=10, **inputs)

The function lives in :mod:`sdi.tasks` (the command line needs it too, and ``sdi`` never imports the explorer).
"""

from sdi.tasks import explorer_inputs

__all__ = ["explorer_inputs"]
