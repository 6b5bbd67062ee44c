"""The explorer under ipywidgets 7.7.1 (Colab's version): its kernel side, and one browser check in Notebook 6.

ipywidgets 7.7.1 cannot share an environment with the ipywidgets 8 the rest of the project uses, so it lives in
its own venv over the system packages (torch, numpy, pytest come from there)::

    python tests/test_explorer_ipywidgets7.py --make-venv        # creates .venv-ipyw7 (`.ci/run` does this)

The tests run the venv's python in subprocesses: the whole kernel-side suite (``tests/test_explorer.py``) under
ipywidgets 7.7.1, and a real Notebook 6.5 server with widgetsnbextension 3.6 (the ipywidgets 7 front end) driven
by Debian's chromium: the notebook runs, the explorer renders, the play button (a Python loop, no ``jslink``)
plays to the last iteration, the keyboard moves the slider and the sign switch works, each time showing exactly
``torch.topk`` of the scores.

Cannot pass silently: without the venv the tests are skipped on a developer's machine (with the command above),
but with ``CI`` set (``.ci/run`` sets it) a missing venv is a failure; and the venv's ipywidgets version is
asserted in every subprocess, so a venv that quietly holds ipywidgets 8 fails too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("SDI_IPYWIDGETS7_VENV", REPO / ".venv-ipyw7"))
PINS = ["ipywidgets==7.7.1", "widgetsnbextension==3.6.1", "notebook==6.5.7"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHECK_VERSION = "import ipywidgets, sys; assert ipywidgets.__version__ == '7.7.1', ipywidgets.__version__"


def make_venv(path: Path) -> None:
    """Create the ipywidgets 7.7.1 venv (over the system site packages, so torch is not installed twice)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], check=True)
    subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *PINS], check=True)
    subprocess.run([str(path / "bin" / "python"), "-c", CHECK_VERSION], check=True)


@pytest.fixture(scope="module")
def venv_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        message = (f"no ipywidgets 7.7.1 venv at {VENV}; create it with "
                   f"`python tests/test_explorer_ipywidgets7.py --make-venv`")
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: this test may not be skipped)")
        pytest.skip(message)
    return python


def venv_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("VIRTUAL_ENV", None)
    return env


def test_kernel_side_suite_under_ipywidgets_7(venv_python):
    subprocess.run([str(venv_python), "-c", CHECK_VERSION], check=True, env=venv_env())
    out = subprocess.run([str(venv_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                          str(REPO / "tests" / "test_explorer.py")],
                         env=venv_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout and " skipped" not in out.stdout, out.stdout[-800:]


# ------------------------------------------------------------------------------- Notebook 6 + chromium

N, Q, T, TOP = 30, 3, 6, 5
SETUP = f"""
import torch
torch.set_num_threads(1)
from sdi import InfluenceResult
from sdi_widgets import InfluenceExplorer
import ipywidgets
gen = torch.Generator().manual_seed(7)
sdi = torch.randn({N}, {Q}, {T}, generator=gen)
res = InfluenceResult(sdi=sdi, train_sdi=sdi.clone(), tracin=sdi.sum(-1), etas=torch.ones(1),
                      train_losses=torch.zeros(1, {N}), query_losses=torch.rand(1, {Q}, generator=gen))
explorer = InfluenceExplorer(res, train_texts=[f"{{i:05b}}=" for i in range({N})],
                             query_texts=["q0", "q1", "q2"], k={TOP})
explorer.interval = 0.25
print("ipywidgets", ipywidgets.__version__)
"""


# Notebook 6's widget manager, once created, asks the kernel for the widgets that already exist (a control comm,
# then, since the kernel has not imported ipywidgets yet, a comm_info request) and builds a model for each. If the
# cells run before that reply, their widgets are listed in it and built a second time, and the views end up bound
# to the copies that get no updates: an empty table, a slider that does not follow. A person opening a notebook
# never clicks that fast; the test waits for the reply, seen on the kernel's websocket.
RECORD_KERNEL_MESSAGES = """
window.sdiKernelMessages = [];
const sdiSocketOpen = window.WebSocket;
window.WebSocket = function (...args) {
  const socket = new sdiSocketOpen(...args);
  socket.addEventListener("message", (event) => {
    if (typeof event.data === "string") {
      try { window.sdiKernelMessages.push(JSON.parse(event.data).header.msg_type); } catch (e) {}
    }
  });
  return socket;
};
window.WebSocket.prototype = sdiSocketOpen.prototype;
Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
"""


def scores():
    import torch

    gen = torch.Generator().manual_seed(7)
    return torch.randn(N, Q, T, generator=gen)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def notebook_server(venv_python, tmp_path_factory):
    import nbformat

    root = tmp_path_factory.mktemp("nb6")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(SETUP), nbformat.v4.new_code_cell("explorer")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "explorer.ipynb")
    port, token = free_port(), "sdi-test-token"
    env = {**venv_env(), "JUPYTER_CONFIG_DIR": str(root / ".config"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
           "JUPYTER_DATA_DIR": str(root / ".data")}
    subprocess.run([str(venv_python), "-c", CHECK_VERSION], check=True, env=env)
    proc = subprocess.Popen([str(venv_python), "-m", "notebook", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                             f"--NotebookApp.token={token}", f"--NotebookApp.notebook_dir={root}",
                             "--NotebookApp.port_retries=0", "--allow-root"],
                            env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("the notebook server exited: " + proc.stdout.read()[-2000:])
            time.sleep(0.3)
    try:
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_explorer_plays_in_notebook6_with_ipywidgets_7(notebook_server):
    import torch
    from playwright.sync_api import sync_playwright

    base, token = notebook_server
    sdi = scores()
    topk = lambda t, opp=False: torch.topk(-sdi[:, 0, t - 1] if opp else sdi[:, 0, t - 1], TOP).indices.tolist()
    assert Path(CHROMIUM).exists(), "the browser tests need Debian's chromium: apt-get install -y chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        errors, blocked = [], []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(base)
                   else (blocked.append(r.request.url), r.abort()))
        try:
            page.add_init_script(RECORD_KERNEL_MESSAGES)
            page.goto(f"{base}/notebooks/explorer.ipynb?token={token}")
            page.wait_for_function("window.Jupyter && Jupyter.notebook && Jupyter.notebook.kernel "
                                   "&& Jupyter.notebook.kernel.is_connected()", timeout=60_000)
            # Run the cells only once the widget manager has asked the kernel which widgets exist (see above)
            page.wait_for_function("window.sdiKernelMessages.includes('comm_info_reply')", timeout=60_000)
            page.evaluate("Jupyter.notebook.execute_all_cells()")
            root = page.locator(".sdi-x")
            rows = root.locator("table.sdi-top tr[data-train-index]")
            rows.first.wait_for(timeout=60_000)
            shown = lambda: [int(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.trainIndex)")]
            caption = root.locator("[data-role=caption]")
            assert "ipywidgets 7.7.1" in page.locator(".output_text").first.inner_text()
            for _ in range(100):                             # the first render may be replaced by the next one
                if shown() == topk(1):
                    break
                page.wait_for_timeout(200)
            assert shown() == topk(1) and "t = 1" in caption.inner_text()
            assert root.locator("svg[data-role=trajectory] polyline").count() == TOP  # the plot: SVG, no <img>
            assert root.locator("img").count() == 0

            play = root.locator("button", has_text="play")
            play.click()                                     # a Python-side loop steps the slider
            page.wait_for_function(f"document.querySelector('.sdi-x [data-role=caption]').textContent"
                                   f".includes('t = {T}')", timeout=20_000)
            page.wait_for_function("[...document.querySelectorAll('.sdi-x button')].some("
                                   "b => b.textContent.includes('▶ play'))", timeout=10_000)
            assert shown() == topk(T)
            assert root.locator(".widget-readout").first.inner_text().strip() == str(T)  # the slider followed

            handle = root.locator(".ui-slider-handle").first     # ipywidgets 7's jQuery UI slider, by keyboard
            handle.focus()
            handle.press("Home")
            handle.press("ArrowRight")
            handle.press("ArrowRight")
            page.wait_for_function("document.querySelector('.sdi-x [data-role=caption]').textContent"
                                   ".includes('t = 3')", timeout=10_000)
            assert shown() == topk(3)

            root.locator("button", has_text="opponents").click()
            page.wait_for_function("document.querySelector('.sdi-x [data-role=caption]').textContent"
                                   ".includes('opponents')", timeout=10_000)
            assert shown() == topk(3, opp=True)
            if os.environ.get("SDI_SCREENSHOT_DIR"):
                root.screenshot(path=str(Path(os.environ["SDI_SCREENSHOT_DIR"]) / "explorer-notebook6.png"))
            assert errors == [] and blocked == [], (errors, blocked)
        finally:
            browser.close()


if __name__ == "__main__":
    if sys.argv[1:2] != ["--make-venv"]:
        sys.exit(textwrap.dedent(__doc__))
    make_venv(Path(sys.argv[2]) if len(sys.argv) > 2 else VENV)
