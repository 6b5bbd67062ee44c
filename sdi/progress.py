"""Progress bars: ``tqdm.auto`` on every loop that can take more than a few seconds, silent when asked.

One helper so that every bar in the library follows the same two rules: ``enabled=False`` switches it off, and
so does ``TQDM_DISABLE=1`` in the environment (which the book's builds and the tests set). The environment is
read here because ``tqdm.notebook`` — what ``tqdm.auto`` picks in a Jupyter kernel — always passes
``disable=False`` to tqdm and so overrides ``TQDM_DISABLE``; a reader running a chapter still sees the bars.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def disabled_by_environment() -> bool:
    """True when ``TQDM_DISABLE`` is set to anything but ``""``, ``0`` or ``false``."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")


def progress_bar(iterable=None, enabled: bool = True, **kwargs) -> tqdm:
    """``tqdm.auto.tqdm(iterable, **kwargs)``, off when ``enabled`` is False or ``TQDM_DISABLE`` is set."""
    return tqdm(iterable, disable=not enabled or disabled_by_environment(), **kwargs)
