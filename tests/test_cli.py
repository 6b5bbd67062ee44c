"""The `sdi` command line: help, a tiny end-to-end run, rebuilding a run from its JSON, exit codes."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sdi
from sdi import cli, tasks
from sdi.results import StreamTopK
from sdi.runs import load_run

TINY = ["--steps", "12", "--checkpoints", "2", "--n-train", "48", "--n-query", "3", "--d-model", "16",
        "--warmup", "2", "--quiet"]
FEATURES = ["--sketch-dim", "128", "--chunk-size", "16", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(["train", "--out", str(path), *TINY]) == 0
    return path


@pytest.mark.parametrize("command", [[], ["train"], ["featurize"], ["influence"], ["verify"], ["explore"],
                                     ["demo"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: sdi") and "--help" in text
    if command == ["featurize"]:
        assert "torchrun" in text and "--sketch-dim" in text and "--dtype" in text


def test_run_json_rebuilds_model_and_data(run_dir):
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["task"] == "parity" and spec["model"]["d_model"] == 16 and len(spec["checkpoints"]) == 2
    run = load_run(run_dir)
    # the data, rebuilt from generator name + arguments + seeds
    assert run.train_data.texts() == tasks.parity(48, n_bits=6, seed=0, curriculum=True).texts()
    assert run.query_data.texts() == tasks.parity(3, n_bits=6, seed=1).texts()
    # the model, rebuilt from LoopedGPTConfig, takes the checkpoints and reproduces the recorded accuracy
    run.model.load_state_dict(run.checkpoints[-1].load_state_dict())
    assert tasks.accuracy(run.model, run.train_data) == spec["results"]["train_accuracy"]
    assert [c.lr for c in run.checkpoints] == [c["eta"] for c in spec["checkpoints"]]


def test_featurize_influence_explore_end_to_end(run_dir, capsys):
    assert cli.main(["featurize", str(run_dir), *FEATURES]) == 0
    assert "featurized 48 examples x 2 checkpoints (T=4, D=128, float32)" in capsys.readouterr().out
    assert cli.main(["featurize", str(run_dir), *FEATURES]) == 0       # resumable: nothing left to do
    assert "0 chunk(s) computed, 6 reused" in capsys.readouterr().out

    assert cli.main(["verify", str(run_dir), "--quiet"]) == 0
    assert "all 6 chunk file(s) intact" in capsys.readouterr().out

    assert cli.main(["influence", str(run_dir), "--query-loops", "6", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "predicted relative error of the top-10 TracIn scores 0." in printed.out
    assert all(line.startswith("sdi influence: warning: ") for line in printed.err.splitlines())
    result = run_dir / "influence.npz"
    with np.load(result, allow_pickle=False) as z:                     # plain numpy can read it
        assert z["sdi"].shape == (48, 3, 6) and z["tracin"].shape == (48, 3)
        meta = json.loads(str(z["meta"]))
    assert meta["fingerprint"]["sketch_dim"] == 128 and meta["query_loops"] == 6
    assert len(meta["train_texts"]) == 48 and len(meta["query_answers"][0]) == 6
    res = sdi.InfluenceResult.load(result)
    assert res.conservation_error() < 1e-5

    # the same numbers as StepInfluence.influence with the same sketch, in memory
    run = load_run(run_dir)
    attr = sdi.StepInfluence(run.model, run.model.block, tasks.loss_fn, sketch_dim=128, progress=False)
    ref = attr.influence(run.train_data.batches(64), run.query_data.batches(64), checkpoints=run.checkpoints,
                         query_loss_fn=functools.partial(tasks.loss_fn, n_loops=6))
    torch.testing.assert_close(res.sdi, ref.sdi, rtol=1e-4, atol=1e-6 * float(ref.sdi.abs().max()))

    assert cli.main(["influence", str(run_dir), "--top-k", "4", "--out", str(run_dir / "top.npz"), "--quiet"]) == 0
    top = StreamTopK.load(run_dir / "top.npz")
    assert top.sdi_indices.shape == (3, 4, 4)
    assert torch.equal(top.top_k(0, 1).indices, res.top_k(0, 1, k=4).indices)
    assert (top.top_k(0, 1, se=True).se > 0).all() and top.meta["predicted_relative_error"] > 0  # kept with the file

    capsys.readouterr()
    assert cli.main(["explore", str(result), "--out", str(run_dir / "explorer.html")]) == 0
    html = (run_dir / "explorer.html").read_text()
    assert "explorer written to" in capsys.readouterr().out
    assert "<html" in html.lower() and run.train_data.examples[0].prompt in html
    assert 'src="http' not in html and 'href="http' not in html          # self-contained: nothing fetched


def test_demo_writes_the_explorer(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), *TINY, *FEATURES]) == 0
    text = capsys.readouterr().out
    assert (out / "explorer.html").is_file() and str(out / "explorer.html") in text
    assert "demo finished in" in text


def test_errors_exit_nonzero_with_a_clear_message(run_dir, tmp_path, capsys):
    assert cli.main(["featurize", str(tmp_path / "missing")]) == 1
    assert "is not a run directory" in capsys.readouterr().err
    assert cli.main(["explore", str(tmp_path / "missing.npz")]) == 1
    assert "result file not found" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(run_dir), *TINY]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(tmp_path / "x"), "--task-arg", "n_bitz=3", *TINY]) == 1
    assert "does not take these arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["featurize", str(run_dir), "--dtype", "float64"])
    assert exit_.value.code == 2

    # a store made for another run (other weights) is refused, naming the checkpoints
    other = tmp_path / "other"
    assert cli.main(["train", "--out", str(other), *TINY, "--seed", "1"]) == 0
    assert cli.main(["featurize", str(other), *FEATURES]) == 0
    capsys.readouterr()
    assert cli.main(["influence", str(run_dir), "--store", str(other / "store"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "does not match" in err and "checkpoint 0 (ckpt_000006.pt): its weights differ" in err
    # ... and so is a store made with another sketch, on resume
    assert cli.main(["featurize", str(other), *FEATURES[:-1], "--sketch-seed", "3"]) == 1
    assert "featurizer/sketch: differs in ['seed']" in capsys.readouterr().err
    # a top-k file is not something the explorer can show
    assert cli.main(["influence", str(other), "--top-k", "2", "--out", str(other / "top.npz"), "--quiet"]) == 0
    assert cli.main(["explore", str(other / "top.npz")]) == 1
    assert "needs a full result" in capsys.readouterr().err
    # a damaged chunk is named by `sdi verify`, and `sdi featurize` recomputes exactly it
    chunk = sorted((other / "store").rglob("*.npy"))[1]
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert cli.main(["verify", str(other / "store"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 of 6 chunk file(s)" in err and "rerun `sdi featurize`" in err
    assert cli.main(["featurize", str(other), *FEATURES]) == 0
    printed = capsys.readouterr()
    assert "1 chunk(s) computed, 5 reused" in printed.out
    warning, = printed.err.splitlines()                                 # one line, naming the file and the remedy
    assert warning.startswith("sdi featurize: warning: store ") and "does not match its CRC-32" in warning
    assert cli.main(["verify", str(other), "--quiet"]) == 0


def test_installed_command_exit_codes(tmp_path):
    """The real process: `python -m sdi.cli` (what the `sdi` entry point runs) exits 1 on errors, 2 on usage."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "sdi.cli", "influence", str(tmp_path / "nope")], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "sdi influence: error:" in bad.stderr and "Traceback" not in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "sdi.cli", "frobnicate"], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
