"""`torchrun --nproc_per_node=2` featurization (gloo, CPU) writes a store bit-identical to a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sdi import cli

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]   # what the `torchrun` script runs


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def featurize(launcher: list[str], run: Path, store: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = launcher + ["-m", "sdi.cli", "featurize", str(run), "--store", str(store), "--chunk-size", "8",
                      "--batch-size", "4", "--sketch-dim", "128", "--quiet", "--device", "cpu"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{proc.args} failed:\n{err[-3000:]}"
    return out


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--steps", "12", "--checkpoints", "2", "--n-train", "60",
                     "--n-query", "2", "--d-model", "16", "--warmup", "2", "--quiet"]) == 0
    single = featurize([sys.executable], run, tmp_path / "single")
    two = featurize(TORCHRUN + ["--standalone", "--nproc_per_node=2"], run, tmp_path / "two")
    out_two, out_single = finish(two), finish(single)
    assert "featurized 60 examples x 2 checkpoints" in out_two and out_two.count("featurized") == 1
    assert "8 chunk(s) computed by rank 0 of 2" in out_two   # chunks 0, 2, 4, 6 of both checkpoints
    assert "16 chunk(s) computed" in out_single        # 8 chunks (the last one short) x 2 checkpoints
    a, b = tree_bytes(tmp_path / "two"), tree_bytes(tmp_path / "single")
    assert sorted(a) == sorted(b) and len(a) == 2 + 2 * 8 * 3   # manifest, writer lock, 8 chunks x 3 files x 2 ckpts
    assert a == b
    manifest = json.loads(a["manifest.json"])
    assert manifest["complete"] and manifest["n_chunks"] == 8
