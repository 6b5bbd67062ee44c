"""The book's committed sources follow its rules (fast: nothing is executed).

Chapters are committed without outputs, start with the Colab cell derived from ``repository.url`` and are
exactly the chapters of ``_toc.yml``. Fix a failure with ``python book/booktools.py strip`` or ``sync``.
"""

import sys
from pathlib import Path

import nbformat
import pytest

BOOK = Path(__file__).resolve().parents[1] / "book"
sys.path.insert(0, str(BOOK))
import booktools  # noqa: E402

CHAPTERS = booktools.chapter_paths(BOOK)


def test_toc_and_chapters_agree() -> None:
    # chapter_paths raises if a chapter is missing from _toc.yml or _toc.yml names a missing chapter.
    assert CHAPTERS, "the book has no chapters"
    assert CHAPTERS[0].stem == booktools.toc_files(BOOK)[0] == "00_preface"
    for page in booktools.toc_files(BOOK):
        assert (BOOK / f"{page}.ipynb").is_file() or (BOOK / f"{page}.md").is_file(), page


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_is_committed_clean(path: Path) -> None:
    problems = booktools.cleanliness_problems(path, booktools.repository_url(BOOK))
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_cleanliness_check_catches_outputs_and_a_wrong_colab_cell(tmp_path: Path) -> None:
    url = booktools.repository_url(BOOK)
    nb = nbformat.read(str(CHAPTERS[0]), as_version=4)
    cells = booktools.code_cells(nb)
    cells[1].outputs = [nbformat.v4.new_output("stream", text="hello\n")]
    cells[1].execution_count = 3
    cells[0].source = cells[0].source.replace(url, "https://example.invalid/other")
    dirty = tmp_path / "00_dirty.ipynb"
    nbformat.write(nb, str(dirty))
    problems = "\n".join(booktools.cleanliness_problems(dirty, url))
    assert "has outputs" in problems and "execution count" in problems and "Colab" in problems
    booktools.strip_notebook(nb)
    cells[0].source = booktools.colab_cell_source(url)
    nbformat.write(nb, str(dirty))
    assert booktools.cleanliness_problems(dirty, url) == []


def test_colab_cell_is_inert_here_and_names_the_repository() -> None:
    url = booktools.repository_url(BOOK)
    source = booktools.colab_cell_source(url)
    assert f'"{url}"' in source and "loopsdi[widgets] @ git+" in source
    namespace: dict = {}
    exec(compile(source, "colab-cell", "exec"), namespace)  # no google.colab here: must do nothing
    assert "REPOSITORY" not in namespace


def test_new_chapter_scaffold_is_clean(tmp_path: Path) -> None:
    for name in ("_config.yml", "_toc.yml"):
        (tmp_path / name).write_text((BOOK / name).read_text())
    path = booktools.new_chapter("08_example", "An example", book_dir=tmp_path)
    assert booktools.cleanliness_problems(path, booktools.repository_url(BOOK)) == []
    with pytest.raises(ValueError, match="already exists"):
        booktools.new_chapter("08_example", "Again", book_dir=tmp_path)
    with pytest.raises(ValueError, match="two digits"):
        booktools.new_chapter("eight", "Bad name", book_dir=tmp_path)
