"""The book, executed and built the way CI does it: every chapter runs exactly once.

1. ``test_chapter_executes[NN_name]``: one test per chapter of ``book/_toc.yml``. It executes the chapter with
   nbmake's runner (``nbmake.nb_run.NotebookRun``: nbclient, the notebook's folder as cwd, 300 s per cell) inside
   a session-wide copy of the book, and keeps the executed notebook there. ``conftest.py`` starts executing every
   selected chapter before the first test of the session, in a background thread, two kernels at a time with one
   torch thread each (``booktools.Workspace.start``), and runs the book's tests last: the other tests run while
   the chapters do. Each chapter test waits for that and reports its own chapter.
2. ``test_book_builds``: builds that copy with ``execute_notebooks: off`` and Sphinx warnings as errors, so the
   HTML shows exactly the outputs the chapter tests produced.
3. ``tests/test_book_browser.py`` opens that HTML in a headless chromium.

Any of them run alone does whatever is missing first (``booktools.Workspace``), never anything twice.
"""

import sys
from pathlib import Path

import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
sys.path.insert(0, str(BOOK))
import booktools  # noqa: E402

CHAPTERS = [p.stem for p in booktools.chapter_paths(BOOK)]


@pytest.fixture(scope="session")
def book_workspace(tmp_path_factory: pytest.TempPathFactory) -> booktools.Workspace:
    """The shared workspace (``conftest.py`` has already started executing this session's chapters in it)."""
    return booktools.Workspace.at(tmp_path_factory.getbasetemp() / "book")


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_executes(book_workspace: booktools.Workspace, chapter: str, record_property) -> None:
    execution = book_workspace.execute(chapter)
    record_property("seconds", round(execution.seconds, 1))
    if execution.error is not None:
        pytest.fail(f"{chapter}.ipynb failed under nbmake:\n{execution.error}", pytrace=False)


def test_book_builds(book_workspace: booktools.Workspace, capsys: pytest.CaptureFixture) -> None:
    result = book_workspace.build()
    with capsys.disabled():
        print(f"\nchapter execution times (nbmake, this machine):\n{book_workspace.timing_table()}")
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"jupyter-book build failed (warnings are errors):\n{log[-6000:]}"
    assert "build succeeded" in log and "WARNING" not in log, log[-6000:]
    html = book_workspace.html_dir
    for page in booktools.toc_files(book_workspace.root):
        assert (html / f"{page}.html").is_file(), f"{page} missing from the built book"
    for chapter in CHAPTERS:
        text = (html / f"{chapter}.html").read_text(encoding="utf-8")
        # Rendered from the notebooks the tests executed: every chapter shows at least one output.
        assert 'class="cell_output' in text, f"{chapter}.html shows no cell output"
    # Offline assets were copied into the site.
    for asset in ("require.js", "embed-amd.js", "mathjax/tex-mml-chtml.js"):
        assert (html / "_static" / asset).is_file(), asset
