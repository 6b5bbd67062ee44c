"""Progress bars: ``tqdm.auto`` on every loop that can take more than a few seconds, silent when asked.

One helper so that every bar in the library follows the same two rules: ``enabled=False`` switches it off, and
otherwise ``TQDM_DISABLE=1`` in the environment does (tqdm reads it only when ``disable`` is not passed).
"""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(iterable=None, enabled: bool = True, **kwargs) -> tqdm:
    """``tqdm.auto.tqdm(iterable, **kwargs)``, off when ``enabled`` is False.

    ``disable`` is passed only to switch the bar off, so ``TQDM_DISABLE=1`` in the environment (which the book's
    builds and the tests set) still silences it when ``enabled`` is True.
    """
    return tqdm(iterable, **kwargs) if enabled else tqdm(iterable, disable=True, **kwargs)
