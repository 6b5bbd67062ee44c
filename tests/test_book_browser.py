"""The built book in a real browser: headless Debian chromium, driven by playwright, fully offline.

The HTML comes from ``booktools.Workspace`` (the chapters executed once by ``tests/test_book.py``), is served on
127.0.0.1, and every page of ``_toc.yml`` is checked: the table of contents lists every chapter, all math is
typeset by the vendored MathJax, every image loads, widgets saved in the notebooks render and respond, no request
leaves 127.0.0.1, nothing 404s and the console stays clean. Screenshots go to ``<workspace>/_screenshots``.
"""

import functools
import http.server
import json
import re
import sys
import threading
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import nbformat
import pytest
from playwright import sync_api  # the dev extra: a missing browser stack fails, never skips

BOOK = Path(__file__).resolve().parents[1] / "book"
sys.path.insert(0, str(BOOK))
import booktools  # noqa: E402

CHROMIUM = "/usr/bin/chromium"  # Debian's package; never `playwright install`
PAGES = booktools.toc_files(BOOK)
LOCAL_SCHEMES = {"data", "blob", "about"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> booktools.Workspace:
    ws = booktools.Workspace.at(tmp_path_factory.getbasetemp() / "book")
    result = ws.build()
    if result.returncode != 0:
        log = (result.stdout + result.stderr)[-4000:]
        pytest.fail(f"the book did not build (see also test_book.py::test_book_builds):\n{log}", pytrace=False)
    return ws


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def site(workspace: booktools.Workspace) -> Iterator[str]:
    """The built HTML, served on an ephemeral port of 127.0.0.1."""
    handler = functools.partial(_QuietHandler, directory=str(workspace.html_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator["sync_api.Browser"]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium", pytrace=False)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        yield browser
        browser.close()


class Visit:
    """One page in a fresh context, with every off-machine request aborted and every problem recorded."""

    def __init__(self, browser: "sync_api.Browser", url: str) -> None:
        self.external: list[str] = []
        self.failed: list[str] = []
        self.console_errors: list[str] = []
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda msg: msg.type == "error" and self.console_errors.append(msg.text))
        self.page.on("pageerror", lambda err: self.console_errors.append(f"uncaught: {err}"))
        self.page.on("requestfailed", lambda req: self.failed.append(f"{req.url} ({req.failure})"))
        self.page.on("response", lambda r: r.status >= 400 and self.failed.append(f"{r.url} (HTTP {r.status})"))
        self.page.goto(url, wait_until="load")
        self.page.wait_for_load_state("networkidle")

    def _route(self, route: "sync_api.Route") -> None:
        url = urlparse(route.request.url)
        if url.scheme in LOCAL_SCHEMES or url.hostname == "127.0.0.1":
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def problems(self) -> list[str]:
        return ([f"request off the machine: {u}" for u in self.external] + [f"failed: {f}" for f in self.failed]
                + [f"console: {e}" for e in self.console_errors])

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser: "sync_api.Browser", site: str) -> Iterator:
    opened: list[Visit] = []

    def open_page(page: str) -> Visit:
        opened.append(Visit(browser, f"{site}/{page}.html"))
        return opened[-1]

    yield open_page
    for v in opened:
        v.close()


def wait_for_mathjax(page: "sync_api.Page") -> None:
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20_000)
    page.evaluate("() => MathJax.startup.promise.then(() => true)")


def page_title(page: str) -> str:
    """The first ``# heading`` of a page's source (a chapter notebook or a markdown page)."""
    source = BOOK / f"{page}.ipynb"
    if source.is_file():
        text = "\n".join(c.source for c in nbformat.read(str(source), as_version=4).cells
                          if c.cell_type == "markdown")
    else:
        text = (BOOK / f"{page}.md").read_text(encoding="utf-8")
    return next(line[2:].strip() for line in text.splitlines() if line.startswith("# "))


def test_toc_lists_every_page_in_order(visit) -> None:
    v = visit(PAGES[0])
    links = v.page.eval_on_selector_all(
        ".bd-sidebar-primary nav a.reference",
        "els => els.map(a => [a.getAttribute('href'), a.textContent.trim()])",
    )
    # On the root page its own link is "#"; every other page links to NAME.html. Numbered parts prefix "3. ".
    listed = [(PAGES[0] if href == "#" else href.removesuffix(".html"), re.sub(r"^[\d.]+\s+", "", title))
              for href, title in links]
    assert listed == [(page, page_title(page)) for page in PAGES]
    assert not v.problems(), v.problems()


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_offline(visit, workspace: booktools.Workspace, page: str) -> None:
    v = visit(page)
    n_math = v.page.locator("span.math, div.math").count()
    if n_math:
        wait_for_mathjax(v.page)
        typeset = v.page.locator("span.math mjx-container, div.math mjx-container").count()
        assert typeset == n_math, f"{page}: {typeset} of {n_math} formulas typeset"
        assert v.page.locator("mjx-merror").count() == 0, f"{page}: MathJax reports a TeX error"
    images = v.page.eval_on_selector_all(
        "img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])"
    )
    assert all(ok for _, ok in images), f"{page}: images that did not load: {[s for s, ok in images if not ok]}"
    n_views = v.page.locator('script[type="application/vnd.jupyter.widget-view+json"]').count()
    if n_views:
        v.page.wait_for_selector(".jupyter-widgets", timeout=20_000)
        rendered = v.page.locator(".jupyter-widgets.widget-subarea, .widget-subarea > .jupyter-widgets").count()
        assert rendered >= n_views, f"{page}: {rendered} of {n_views} saved widgets rendered"
    if (BOOK / f"{page}.ipynb").is_file():  # a chapter: its Colab button opens this very notebook
        config = booktools.read_config(BOOK)
        repo = urlparse(booktools.repository_url(BOOK)).path.strip("/")
        branch, folder = config["repository"]["branch"], config["repository"]["path_to_book"]
        colab = f"{config['launch_buttons']['colab_url']}/github/{repo}/blob/{branch}/{folder}/{page}.ipynb"
        assert v.page.locator(f'a[href="{colab}"]').count() == 1, f"{page}: no launch button to {colab}"
    shots = workspace.root / "_screenshots"
    shots.mkdir(exist_ok=True)
    v.page.screenshot(path=str(shots / f"{page}.png"))
    assert not v.problems(), f"{page}: " + "\n".join(v.problems())


def test_preface_widget_is_interactive_without_a_kernel(visit) -> None:
    v = visit("00_preface")
    v.page.wait_for_selector(".widget-slider .widget-readout", timeout=20_000)
    readout = v.page.locator(".widget-slider .widget-readout").first
    assert readout.inner_text().strip() == "1"
    v.page.locator(".widget-play button").first.click()  # the Play widget drives the slider via jslink, in JS
    v.page.wait_for_function(
        "() => document.querySelector('.widget-slider .widget-readout').textContent.trim() !== '1'", timeout=10_000
    )
    assert int(readout.inner_text()) > 1
    assert not v.problems(), v.problems()


def test_chapter7_static_explorer_is_interactive_without_a_kernel(visit) -> None:
    """Chapter 7 embeds the static explorer (``render_html``): moving its slider must change the top-k list.

    The expected list at each iteration is ranked here from the scores the page carries (``data[view][query].sdi``,
    one trajectory per candidate row), independently of the page's own precomputed ``top`` lists.
    """
    v = visit("07_explorer")
    root = v.page.locator(".sdix").first
    rows = root.locator("[data-role=table] tr[data-train-index]")
    rows.first.wait_for(timeout=20_000)
    data = json.loads(v.page.locator(f"#{root.get_attribute('id')}-data").text_content())
    view, query = int(root.get_attribute("data-view")), int(root.get_attribute("data-query"))
    block = data["data"][view][query]

    def expected(t: int) -> list[int]:  # the k strongest proponents at iteration t (1-based)
        order = sorted(range(len(block["rows"])), key=lambda r: -block["sdi"][r][t - 1])
        return [block["rows"][r] for r in order[: data["k"]]]

    def shown() -> list[int]:
        return [int(i) for i in rows.evaluate_all("rs => rs.map(r => r.dataset.trainIndex)")]

    assert root.get_attribute("data-sign") == "proponents" and root.get_attribute("data-step") == "1"
    first = shown()
    assert first == expected(1)
    last = data["T"]
    root.locator("[data-role=step]").fill(str(last))  # drag the slider to the last iteration
    assert root.get_attribute("data-step") == str(last)
    assert shown() == expected(last) != first, "the top-k list did not change with the slider"
    assert root.locator("[data-role=answers] .cell.current").get_attribute("data-step") == str(last)
    assert not v.problems(), v.problems()
