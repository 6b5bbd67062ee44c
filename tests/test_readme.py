"""The README stays true: its ten lines run, and CI runs the README's test command."""

import contextlib
import io
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def test_ten_lines_run_and_conserve():
    block = re.search(r"```python\n(.*?)```", _section("Ten lines"), re.S).group(1)
    assert len([line for line in block.splitlines() if line.strip()]) <= 11  # "ten lines" and the imports
    # the same code on a smaller run: the README's numbers come from the full one
    small = block.replace("parity_setup()", "parity_setup(n_train=128, steps=6)")
    assert small != block, "the ten lines no longer call sdi.presets.parity_setup()"
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(small, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    res = namespace["res"]
    assert tuple(res.sdi.shape) == (128, 64, 7)
    torch.testing.assert_close(res.sdi.sum(-1), res.tracin, rtol=1e-4, atol=1e-6)
    assert "TopK(indices=" in out.getvalue()


def test_ci_runs_the_readme_test_command():
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    test_command = [line for line in commands.splitlines() if "pytest" in line]
    assert len(test_command) == 1
    tail = test_command[0].split("pip install torch==2.13.0 && ")[-1]  # .ci/run installs torch on its own line
    ci = (ROOT / ".ci" / "run").read_text()
    assert tail.replace("pip install", "python -m pip install -q") in ci, (tail, ci)
