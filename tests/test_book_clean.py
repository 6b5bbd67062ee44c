"""The book's committed sources follow its rules (fast: nothing is executed).

Chapters are committed without outputs, start with the Colab cell derived from ``repository.url`` and are
exactly the chapters of ``_toc.yml``. Fix a failure with ``python book/booktools.py strip`` or ``sync``.
"""

import subprocess
import sys
import tomllib
import zipfile
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
    assert f'"{url}"' in source and "loopsdi @ git+{REPOSITORY}" in source
    namespace: dict = {}
    exec(compile(source, "colab-cell", "exec"), namespace)  # no google.colab here: must do nothing
    assert "REPOSITORY" not in namespace


def test_repository_url_is_written_in_config_only() -> None:
    """The address lives in _config.yml; the chapters hold the generated cell, nothing else in the book names it."""
    url = booktools.repository_url(BOOK)
    cell = booktools.colab_cell_source(url)
    for path in CHAPTERS:
        nb = nbformat.read(str(path), as_version=4)
        elsewhere = [i for i, c in enumerate(nb.cells) if url in c.source and c.source != cell]
        assert not elsewhere, f"{path.name}: cells {elsewhere} spell out repository.url; use the Colab cell"
    for page in BOOK.glob("*.md"):
        assert url not in page.read_text(encoding="utf-8"), f"{page.name} spells out repository.url"


def test_colab_install_is_a_plain_pip_install_of_this_repository(tmp_path: Path) -> None:
    """What the Colab cell installs: this repository's package, by name, without extras (so pip leaves Colab's
    preinstalled ipywidgets alone), and the repository builds into a wheel holding both packages."""
    from packaging.requirements import Requirement

    url = booktools.repository_url(BOOK)
    requirement = Requirement(booktools.COLAB_REQUIREMENT.format(REPOSITORY=url))
    project = tomllib.loads((BOOK.parent / "pyproject.toml").read_text())["project"]
    assert requirement.name == project["name"] and requirement.url == f"git+{url}"
    assert not requirement.extras, "an extra could replace Colab's ipywidgets"
    assert not any(dep.lower().startswith("ipywidgets") for dep in project["dependencies"])
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(BOOK.parent)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("loopsdi-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sdi/__init__.py" in names and "sdi_widgets/__init__.py" in names


def test_progress_bars_obey_tqdm_disable_also_in_a_notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a kernel ``tqdm.auto`` is ``tqdm.notebook``, which passes ``disable=False`` itself and so ignores
    ``TQDM_DISABLE``; the library's bars must still honour it (the book builds set it), and show otherwise."""
    import sdi.progress
    from tqdm.notebook import tqdm as notebook_tqdm

    monkeypatch.setattr(sdi.progress, "tqdm", notebook_tqdm)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert sdi.progress.progress_bar(range(3), display=False).disable
    monkeypatch.setenv("TQDM_DISABLE", "0")
    bar = sdi.progress.progress_bar(range(3), display=False)
    assert not bar.disable
    bar.close()
    monkeypatch.delenv("TQDM_DISABLE")
    assert not sdi.progress.progress_bar(range(3), display=False).disable
    assert sdi.progress.progress_bar(range(3), enabled=False, display=False).disable


def test_new_chapter_scaffold_is_clean(tmp_path: Path) -> None:
    for name in ("_config.yml", "_toc.yml"):
        (tmp_path / name).write_text((BOOK / name).read_text())
    path = booktools.new_chapter("08_example", "An example", book_dir=tmp_path)
    assert booktools.cleanliness_problems(path, booktools.repository_url(BOOK)) == []
    with pytest.raises(ValueError, match="already exists"):
        booktools.new_chapter("08_example", "Again", book_dir=tmp_path)
    with pytest.raises(ValueError, match="two digits"):
        booktools.new_chapter("eight", "Bad name", book_dir=tmp_path)
