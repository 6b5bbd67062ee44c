import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))

BOOK = Path(__file__).resolve().parents[1] / "book"

# The book's chapters take half of CI's time, on both cores, yet they only wait on their kernels. So they start in a
# background thread before the first test (`_book_in_background`) and the tests that need them run last, in this
# order: the chapter tests (they wait for the chapters), the explorer's browser tests (they overlap the book's
# build, which the background thread starts next), the build test, the book's browser tests. Everything else runs
# first, while the chapters execute.
RUN_LAST = ["test_book.py::test_chapter_executes", "test_explorer_browser.py", "test_explorer_ipywidgets7.py",
            "test_book.py::test_book_builds", "test_book_browser.py"]


def _last_rank(item: pytest.Item) -> int:
    node = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
    return next((rank for rank, prefix in enumerate(RUN_LAST, 1) if node.startswith(prefix)), 0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_last_rank)  # stable: the order within each group is pytest's


@pytest.fixture(scope="session", autouse=True)
def _book_in_background(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Start executing the chapters this session tests (and building the book, if a test needs the HTML)."""
    items = request.session.items
    chapters = [item.callspec.params["chapter"] for item in items if _last_rank(item) == 1]
    build = any(_last_rank(item) in (4, 5) for item in items)
    if chapters or build:
        sys.path.insert(0, str(BOOK))
        import booktools

        # The two kernels run one torch thread each. More threads than cores make OpenMP's barriers spin against
        # each other (a 3 s test took 30 s), so this process and the ones its tests start use one thread too
        # (set before the kernels start: os.environ is never changed while another thread may start a process).
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
        booktools.Workspace.at(tmp_path_factory.getbasetemp() / "book").start(chapters, build=build)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
