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
    assert not (raw := raw_markdown(v.page)), f"{page}: raw Markdown in the rendered text: {raw}"
    assert not (bars := progress_bars(v.page)), f"{page}: progress bars in the built page: {bars}"
    assert not (gaps := blank_outputs(v.page)), f"{page}: cell outputs that show nothing but take room: {gaps}"
    assert not (wide := hidden_equations(v.page)), f"{page}: display equations cut off or covering their label: {wide}"
    shots = workspace.root / "_screenshots"
    shots.mkdir(exist_ok=True)
    v.page.screenshot(path=str(shots / f"{page}.png"))
    assert not v.problems(), f"{page}: " + "\n".join(v.problems())


# Text the reader sees, outside code, math and preformatted outputs: what Markdown syntax would look like if a
# renderer had left it unparsed (CommonMark prints pipe tables as text, an unknown role stays "{name}`...`").
RAW_MARKDOWN = {
    "pipe-table row": r"(^|\n)\s*\|[^\n]*\|\s*($|\n)",
    "pipe-table rule": r"\|\s*:?-{3,}",
    "bold markers": r"\*\*[^*\s][^*\n]*\*\*",
    "heading marker": r"(^|\n)#{1,6} \S",
    "link syntax": r"\[[^\]\n]+\]\([^)\s]+\)",
    "MyST role": r"\{[a-z][a-z:-]*\}`",
    "fence": r"(^|\n)\s*(:::|```)",
    "display math": r"\$\$",
}

VISIBLE_TEXT_JS = """() => {
    const skip = 'pre, code, script, style, .math, mjx-container, .highlight, .MathJax, noscript, template';
    const out = [];
    const walker = document.createTreeWalker(document.querySelector('main') || document.body, NodeFilter.SHOW_TEXT);
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
        const el = n.parentElement;
        if (!el || el.closest(skip)) continue;
        const style = getComputedStyle(el);
        if (style.display === 'none' || style.visibility === 'hidden') continue;
        out.push(n.textContent);
    }
    return out.join('');
}"""


def raw_markdown(page: "sync_api.Page") -> list[str]:
    """``kind: 'snippet'`` for every stretch of the page's visible prose that is Markdown syntax left as text."""
    text = page.evaluate(VISIBLE_TEXT_JS)
    found = []
    for kind, pattern in RAW_MARKDOWN.items():
        for m in re.finditer(pattern, text):
            found.append(f"{kind}: {text[max(0, m.start() - 30): m.end() + 30]!r}")
    return found


def progress_bars(page: "sync_api.Page") -> list[str]:
    """Progress bars in any form: rendered widgets, models in the saved widget state (also closed, hidden bars,
    which leave blank gaps), or tqdm's text bars in a stream output."""
    found = [f"{n} rendered progress widget(s)" for n in [page.locator(".widget-progress, progress").count()] if n]
    for state in page.locator('script[type="application/vnd.jupyter.widget-state+json"]').all_text_contents():
        models = json.loads(state).get("state", {}).values()
        found += [f"saved widget model {m['model_name']}" for m in models if "Progress" in m.get("model_name", "")]
    for text in page.locator(".cell_output pre").all_text_contents():
        found += [f"text bar {m.group(0)!r}" for m in re.finditer(r"\d+%\|[^|\n]*\|[^\n]*(it/s|s/it)", text)]
    return found


BLANK_OUTPUTS_JS = """() => {
    const content = 'img, svg, canvas, table, iframe, mjx-container, input, button, select, textarea';
    const blank = [];
    document.querySelectorAll('.cell_output > .output, .cell_output > div').forEach((el, i) => {
        const box = el.getBoundingClientRect();
        if (box.height <= 4) return;
        if (el.innerText.trim() !== '') return;
        const shown = [...el.querySelectorAll(content)].some(c => {
            const b = c.getBoundingClientRect();
            return b.width > 0 && b.height > 0;
        });
        if (!shown) blank.push(`output ${i} (${el.className}): ${Math.round(box.height)} px of nothing`);
    });
    return blank;
}"""


def blank_outputs(page: "sync_api.Page") -> list[str]:
    """Cell outputs that take vertical room but show no text, image, table or control (e.g. a closed bar)."""
    return page.evaluate(BLANK_OUTPUTS_JS)


HIDDEN_EQUATIONS_JS = """() => {
    const column = (document.querySelector('article.bd-article') || document.querySelector('main'))
        .getBoundingClientRect();
    const bad = [];
    document.querySelectorAll('div.math').forEach((div, i) => {
        const formula = div.querySelector('mjx-container');
        if (!formula) return;
        const f = formula.getBoundingClientRect(), d = div.getBoundingClientRect();
        const name = div.id || `formula ${i}`;
        if (f.right > column.right + 1 || d.right > column.right + 1)
            bad.push(`${name}: runs ${Math.round(Math.max(f.right, d.right) - column.right)} px past the column`);
        const label = div.querySelector('.eqno');
        if (label) {
            const l = label.getBoundingClientRect();
            if (l.right > column.right + 1) bad.push(`${name}: its label is outside the column`);
            if (l.left < f.right - 1 && l.right > f.left + 1 && l.top < f.bottom && l.bottom > f.top)
                bad.push(`${name}: its label sits on the formula`);
        }
    });
    return bad;
}"""


def hidden_equations(page: "sync_api.Page") -> list[str]:
    """Display equations wider than the text column, or whose number overlaps them (at the 1280 px viewport)."""
    return page.evaluate(HIDDEN_EQUATIONS_JS)


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
