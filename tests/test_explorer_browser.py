"""The static explorer in a real browser: headless Debian chromium driven by playwright.

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (never ``playwright install``). The page
is served from 127.0.0.1 (and opened from file://); any request to another host is aborted and recorded, and
the test fails on it, as on any console error.
"""

import functools
import os
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch

from sdi import InfluenceResult
from sdi_widgets import write_html

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
N, Q, T, K, TOP = 60, 4, 5, 2, 6
TRAIN_TEXTS = [f"{i:07b}=" for i in range(N)]
TRAIN_LABELS = [str(f"{i:07b}".count("1") % 2) for i in range(N)]
QUERY_TEXTS = [f"{(37 * j) % 128:07b}=" for j in range(Q)]
ANSWERS = [["0", "1", "1", "0", "1"][: T] for _ in range(Q)]
TRUTH = ["1", "0", "1", "1"]


@pytest.fixture(scope="module")
def result() -> InfluenceResult:
    gen = torch.Generator().manual_seed(1)
    per_ckpt = torch.randn(K, N, Q, T, generator=gen)
    sdi = per_ckpt.sum(0)
    return InfluenceResult(sdi=sdi, train_sdi=sdi.clone(), tracin=sdi.sum(-1), etas=torch.tensor([1e-3, 5e-4]),
                           train_losses=torch.zeros(K, N), query_losses=torch.rand(K, Q, generator=gen),
                           checkpoint_sdi=per_ckpt)


@pytest.fixture(scope="module")
def flipped(result) -> list[int]:
    return torch.topk(result.sdi[:, 0, 0], 2).indices.tolist()  # visible at the start


@pytest.fixture(scope="module")
def site(tmp_path_factory, result, flipped):
    """The export in a folder served by http.server on 127.0.0.1 (port chosen by the OS)."""
    root = tmp_path_factory.mktemp("site")
    write_html(result, TRAIN_TEXTS, QUERY_TEXTS, root / "explorer.html", k=TOP, train_labels=TRAIN_LABELS,
               flipped=flipped, query_answers=ANSWERS, query_truth=TRUTH)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "the browser tests need Debian's chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


class Guarded:
    """A page whose requests are recorded, whose off-machine requests are aborted, whose console is watched."""

    def __init__(self, browser, allowed_prefix: str):
        self.context = browser.new_context(viewport={"width": 1150, "height": 760})
        self.page = self.context.new_page()
        self.requests, self.blocked, self.errors = [], [], []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def route(r):
            if r.request.url.startswith(allowed_prefix):
                r.continue_()
            else:
                self.blocked.append(r.request.url)
                r.abort()

        self.page.route("**/*", route)

    def shown(self) -> list[int]:
        return [int(x) for x in self.page.locator("[data-role=table] tr[data-train-index]").evaluate_all(
            "rows => rows.map(r => r.dataset.trainIndex)")]

    def prev_ranks(self) -> list[int]:
        return [int(x) for x in self.page.locator("[data-role=table] tr[data-train-index]").evaluate_all(
            "rows => rows.map(r => r.dataset.prevRank)")]

    def state(self, key: str) -> str:
        return self.page.locator(".sdix").get_attribute(f"data-{key}")

    def close(self) -> None:
        self.context.close()


def topk(scores: torch.Tensor, opponents: bool = False) -> list[int]:
    return torch.topk(-scores if opponents else scores, TOP).indices.tolist()


def test_static_explorer_scrub_in_chromium(browser, site, result, flipped, tmp_path):
    root, base = site
    g = Guarded(browser, base)
    try:
        g.page.goto(f"{base}/explorer.html")
        g.page.wait_for_selector("[data-role=table] tr[data-train-index]")
        assert g.shown() == topk(result.sdi[:, 0, 0])
        assert g.prev_ranks() == [0] * TOP
        assert g.page.locator("[data-role=table] .flip").count() == 2  # both flipped examples are in view

        g.page.locator("[data-role=step]").fill("3")  # move the slider to iteration 3
        assert g.state("step") == "3"
        assert g.shown() == topk(result.sdi[:, 0, 2])
        before = result.sdi[:, 0, 1]
        want_prev = [int((before > before[i]).sum()) + 1 for i in topk(result.sdi[:, 0, 2])]
        assert g.prev_ranks() == want_prev

        g.page.click("[data-role=sign][data-sign=opponents]")
        assert g.shown() == topk(result.sdi[:, 0, 2], opponents=True)
        g.page.select_option("[data-role=query]", "2")
        assert g.state("query") == "2" and g.shown() == topk(result.sdi[:, 2, 2], opponents=True)
        assert g.page.locator("[data-role=answers] .query").inner_text() == QUERY_TEXTS[2]
        cells = g.page.locator("[data-role=answers] .cell")
        assert cells.count() == T and "current" in cells.nth(2).get_attribute("class")
        assert g.page.locator("[data-role=trajectory] polyline").count() == TOP
        assert g.page.locator("[data-role=heatmap] rect[data-role=current-step]").count() == 1

        g.page.select_option("[data-role=view]", "2")  # the second checkpoint on its own
        assert g.shown() == topk(result.checkpoint_sdi[1, :, 2, 2], opponents=True)

        g.page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
        assert (tmp_path / "explorer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert g.blocked == [] and all(u.startswith(base) for u in g.requests), g.requests
        assert g.errors == []
    finally:
        g.close()


def test_static_explorer_filter_and_play_from_file_url(browser, site, result):
    root, _ = site
    g = Guarded(browser, "file://")
    try:
        g.page.goto((root / "explorer.html").as_uri())
        g.page.wait_for_selector("[data-role=table] tr[data-train-index]")
        g.page.fill("[data-role=filter]", QUERY_TEXTS[3][:7])
        options = g.page.locator("[data-role=query] option").evaluate_all("os => os.map(o => o.value)")
        assert options == ["3"]
        assert g.state("query") == "3" and g.shown() == topk(result.sdi[:, 3, 0])

        g.page.click("[data-role=play]")  # animate through every iteration; it stops at the last one
        g.page.wait_for_function("document.querySelector('.sdix').dataset.step === '%d'" % T, timeout=15_000)
        g.page.wait_for_function("document.querySelector('[data-role=play]').textContent.includes('play')",
                                 timeout=5_000)
        assert g.shown() == topk(result.sdi[:, 3, T - 1])
        assert g.page.locator("[data-role=step]").input_value() == str(T)
        assert g.blocked == [] and all(u.startswith("file://") for u in g.requests), g.requests
        assert g.errors == []
    finally:
        g.close()


def test_two_fragments_embedded_in_one_page_are_independent(browser, result, tmp_path):
    from sdi_widgets import ExplorerData, render_html

    parts = [render_html(ExplorerData(result, TRAIN_TEXTS, QUERY_TEXTS, k=k), full_page=False) for k in (3, 5)]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><style>table { font-size: 30px; }</style></head>"
            f"<body><h1>A book page</h1>{parts[0]}<p>text between</p>{parts[1]}</body></html>")
    (tmp_path / "book.html").write_text(page, encoding="utf-8")
    g = Guarded(browser, "file://")
    try:
        g.page.goto((tmp_path / "book.html").as_uri())
        roots = g.page.locator(".sdix")
        assert roots.count() == 2
        g.page.wait_for_selector(".sdix >> nth=1 >> [data-role=table] tr[data-train-index]")
        rows = lambda n: [int(x) for x in roots.nth(n).locator("[data-role=table] tr[data-train-index]").evaluate_all(
            "rs => rs.map(r => r.dataset.trainIndex)")]
        assert rows(0) == topk(result.sdi[:, 0, 0])[:3] and rows(1) == topk(result.sdi[:, 0, 0])[:5]
        roots.nth(1).locator("[data-role=step]").fill("4")
        assert rows(1) == topk(result.sdi[:, 0, 3])[:5]
        assert rows(0) == topk(result.sdi[:, 0, 0])[:3] and roots.nth(0).get_attribute("data-step") == "1"
        assert g.blocked == [] and g.errors == []
    finally:
        g.close()


# ------------------------------------------------------------------------------------------ themes

THEMES = {  # the variables and markers the front ends set (values from their dark and light themes)
    "jupyterlab-dark": ('data-jp-theme-light="false"', "--jp-layout-color0:#111111;--jp-content-font-color1:"
                        "rgba(255,255,255,1);--jp-ui-font-color1:rgba(255,255,255,.87);--jp-ui-font-color2:"
                        "rgba(255,255,255,.54);background:#111111;color:rgba(255,255,255,.87)"),
    "vscode-dark": ('class="vscode-dark"', "--vscode-editor-background:#1e1e1e;--vscode-editor-foreground:#d4d4d4;"
                    "--vscode-descriptionForeground:rgba(204,204,204,.7);background:#1e1e1e;color:#cccccc"),
    "plain-dark": ("", "background:#1f1f1f;color:#e3e3e3"),          # a dark page that sets no variables (Colab)
    "jupyterlab-light": ('data-jp-theme-light="true"', "--jp-content-font-color1:rgba(0,0,0,1);--jp-ui-font-color1:"
                         "rgba(0,0,0,.87);--jp-ui-font-color2:rgba(0,0,0,.54);background:#ffffff;color:rgba(0,0,0,.87)"),
}

CONTRAST_JS = """sel => {
  const parse = s => { const p = s.match(/rgba?\\(([^)]+)\\)/)[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
                       return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1]; };
  const over = (t, b) => [0, 1, 2].map(i => t[i] * t[3] + b[i] * (1 - t[3])).concat([1]);
  const bg = el => { const layers = [];
    for (let e = el; e; e = e.parentElement) { const c = parse(getComputedStyle(e).backgroundColor);
      if (c[3] > 0) layers.push(c); if (c[3] >= 1) break; }
    let base = [255, 255, 255, 1];
    for (let i = layers.length - 1; i >= 0; i--) base = over(layers[i], base);
    return base; };
  const lum = c => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
                     return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]); };
  return [...document.querySelectorAll(sel)].filter(e => e.textContent.trim()).map(e => {
    const b = bg(e), f = over(parse(getComputedStyle(e).color), b), a = lum(f), c = lum(b);
    return [(Math.max(a, c) + 0.05) / (Math.min(a, c) + 0.05), e.textContent.trim().slice(0, 40)]; });
}"""

# what must be readable: captions, the answer strip (query, muted parts, the per-iteration cells), table text
READABLE = ["[data-role=caption]", "[data-role=answers] .muted", "[data-role=answers] .query",
            "[data-role=answers] .cell", "table.sdi-top td.text", "table.sdi-top td.num", "[data-role=legend]"]


def widget_page(explorer, theme: str, static: str) -> str:
    """The live widget's outputs (its stylesheet, answers, table, SVG plot, heat map) and the static fragment in a
    page themed like a front end; ipywidgets' own controls are drawn by the front end itself and are left out."""
    marker, style = THEMES[theme]
    ex = explorer
    top = "".join(w.value for w in (ex.children[-1], ex.answers, ex.note))
    body = (f"<div style='display:flex;flex-wrap:wrap;align-items:flex-start'><div style='width:{ex.table.layout.width}'>"
            f"{ex.table.value}</div><div style='width:480px;margin-left:14px'>{ex.plot.value}{ex.heatmap.value}</div></div>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body {marker} style='margin:10px;{style}'>"
            f"<div class='sdi-x' data-role='widget'>{top}{body}</div><hr>{static}</body></html>")


@pytest.mark.parametrize("theme", list(THEMES))
def test_themes_keep_text_readable_and_plot_transparent(browser, result, flipped, tmp_path, theme):
    from PIL import Image

    from sdi_widgets import ExplorerData, InfluenceExplorer, render_html

    extras = dict(train_labels=TRAIN_LABELS, flipped=flipped, query_answers=ANSWERS, query_truth=TRUTH)
    ex = InfluenceExplorer(result, train_texts=TRAIN_TEXTS, query_texts=QUERY_TEXTS, k=TOP, **extras)
    ex.step.value = 3
    static = render_html(ExplorerData(result, TRAIN_TEXTS, QUERY_TEXTS, k=TOP, **extras), full_page=False,
                         initial={"step": 2})
    (tmp_path / "page.html").write_text(widget_page(ex, theme, static), encoding="utf-8")
    g = Guarded(browser, "file://")
    try:
        g.page.goto((tmp_path / "page.html").as_uri())
        g.page.wait_for_selector(".sdix [data-role=table] tr[data-train-index]")
        for part in ("[data-role=widget]", ".sdix"):
            for sel in READABLE:
                measured = g.page.evaluate(CONTRAST_JS, f"{part} {sel}")
                assert measured, f"nothing matched {part} {sel}"
                worst = min(measured)
                assert worst[0] >= 4.5, f"{theme}: {part} {sel} has contrast {worst[0]:.2f} ({worst[1]!r})"
            if theme.endswith("dark"):   # the plots sit on the page's own background: no white box
                for svg in ("svg[data-role=trajectory]", "svg[data-role=heatmap]" if part == ".sdix" else "table"):
                    shot = tmp_path / "plot.png"
                    g.page.locator(f"{part} {svg}").first.screenshot(path=str(shot))
                    pixels = sorted(Image.open(shot).convert("L").tobytes())
                    bright = sum(p > 200 for p in pixels) / len(pixels)   # light text and lines only
                    median = pixels[len(pixels) // 2]
                    assert bright < 0.1 and median < 60, f"{theme}: {part} {svg}: {bright:.0%} near-white, median {median}"
        if os.environ.get("SDI_SCREENSHOT_DIR") and theme in ("jupyterlab-light", "jupyterlab-dark"):
            g.page.locator("[data-role=widget]").screenshot(
                path=str(Path(os.environ["SDI_SCREENSHOT_DIR"]) / f"explorer-{theme.split('-')[1]}.png"))
        assert g.blocked == [] and g.errors == []
    finally:
        g.close()
