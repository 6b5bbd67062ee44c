"""A (sketched) featurization killed with SIGKILL part-way resumes and yields a store bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sdi import cli

N_TRAIN, CHUNK = 96, 8                      # 12 chunks x 2 checkpoints

# Runs in a fresh interpreter: featurize the run's train set; with a delay, every data access sleeps, so that
# the test can kill the process between chunks. Prints what it computed and reused.
WORKER = """
import json, sys, time
import torch
torch.set_num_threads(1)
import sdi
from sdi.featurize import featurize
from sdi.runs import load_run

run_dir, store_dir, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
run = load_run(run_dir)

class SlowData:
    def __init__(self, data):
        self.data = data
    def __len__(self):
        return len(self.data)
    def batch(self, index):
        time.sleep(delay)
        return self.data.batch(index)

attr = sdi.StepInfluence(run.model, run.model.block, sdi.tasks.loss_fn, sketch_dim=128, progress=False)
st = featurize(store_dir, attr, SlowData(run.train_data), run.checkpoints, chunk_size=%d, batch_size=4,
                     progress=False)
print(json.dumps({"computed": st.stats.computed, "reused": st.stats.reused}))
""" % CHUNK


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def worker(tmp_path: Path, run: Path, store: Path, delay: float) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(run), str(store), str(delay)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--steps", "12", "--checkpoints", "2", "--n-train", str(N_TRAIN),
                     "--n-query", "2", "--d-model", "16", "--warmup", "2", "--quiet"]) == 0
    reference = worker(tmp_path, run, tmp_path / "reference", 0.0)

    killed = worker(tmp_path, run, tmp_path / "resumed", 0.05)
    store = tmp_path / "resumed"
    deadline = time.monotonic() + 120
    while len(list(store.glob("ckpt_*/chunk_*.json"))) < 3:
        assert killed.poll() is None, killed.communicate()[1]
        assert time.monotonic() < deadline, "the worker wrote no chunk in time"
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    done_at_kill = len(list(store.glob("ckpt_*/chunk_*.json")))
    assert 3 <= done_at_kill < 2 * N_TRAIN // CHUNK
    assert json.loads((store / "manifest.json").read_text())["complete"] is False

    stats = finish(worker(tmp_path, run, store, 0.0))
    assert stats["reused"] == done_at_kill and stats["reused"] + stats["computed"] == 2 * N_TRAIN // CHUNK
    assert finish(reference) == {"computed": 2 * N_TRAIN // CHUNK, "reused": 0}
    resumed, uninterrupted = tree_bytes(store), tree_bytes(tmp_path / "reference")
    assert sorted(resumed) == sorted(uninterrupted)
    assert resumed == uninterrupted
