"""Fault injection against the command line and the Python API: a user's files in --out, mismatched data and
checkpoints, damaged inputs, OS failures, Ctrl-C, bad arguments. Each ends in one line naming the file or argument
(exit 1, exit 2 for argparse usage errors) or in the right result, and never removes a file of the user's.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import sdi
import sdi.files
import sdi.runs as R
from faultkit import CLI_FEATURES, CLI_TINY, TINY_TRAIN, failing_open, featurize, in_child, kill_at, temporaries
from sdi import cli, tasks
from sdi.featurize import query_features
from sdi.storage import StoreMismatchError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("clifaults")
    run = R.train_run(root / "run", **TINY_TRAIN)
    featurize(run, run.store_dir)
    return {"root": root, "run": run}


def one_line(capsys, *words: str) -> str:
    """The one error line on stderr (besides one-line warnings, e.g. "sketch too small" on these tiny runs)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if not re.match(r"sdi [a-z]+: warning: ", line)]
    err = "\n".join(errors)
    assert len(errors) == 1 and "Traceback" not in err, lines
    for w in words:
        assert w in err, (w, err)
    return err


def copy_run(env, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(env["run"].path, dst)
    return dst


def user_files(root: Path) -> dict[Path, bytes]:
    files = {root / "notes.txt": b"my notes", root / "checkpoints" / "my_model.pt": b"my own weights"}
    for p, data in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def untouched(files: dict[Path, bytes]) -> bool:
    return all(p.is_file() and p.read_bytes() == data for p, data in files.items())


# ------------------------------------------------------------------------------------------ nothing lost

def test_train_refuses_a_users_folder_and_overwrite_keeps_the_users_files(tmp_path, capsys):
    out = tmp_path / "myproject"
    mine = user_files(out)
    assert cli.main(["train", "--out", str(out), *CLI_TINY]) == 1
    one_line(capsys, "is not empty", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "notes.txt"]  # nothing written
    assert cli.main(["train", "--out", str(out), "--overwrite", *CLI_TINY]) == 0
    assert untouched(mine) and (out / "run.json").is_file()
    # everything the commands write, then --overwrite: exactly those go, the user's stay
    assert cli.main(["featurize", str(out), *CLI_FEATURES]) == 0
    (out / "store" / "notes.txt").write_bytes(b"kept beside the store")
    mine[out / "store" / "notes.txt"] = b"kept beside the store"
    assert cli.main(["influence", str(out), "--quiet", "--device", "cpu"]) == 0
    assert cli.main(["explore", str(out / "influence.npz")]) == 0
    written = json.loads((out / "run.json").read_text())["written"]
    assert "influence.npz" in written and "influence.html" in written
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--overwrite", *CLI_TINY, "--seed", "1"]) == 0
    assert untouched(mine)
    assert not (out / "influence.npz").exists() and not (out / "influence.html").exists()
    assert sorted(p.name for p in (out / "store").iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt_000002.pt", "ckpt_000004.pt",
                                                                      "my_model.pt"]


def test_overwrite_ignores_ledger_entries_outside_out(env, tmp_path, capsys):
    """A hand-edited run.json naming a store or file outside --out: --overwrite removes nothing there."""
    out = copy_run(env, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.copytree(env["run"].store_dir, outside / "store")   # store-named files a glob would match
    (outside / "notes.txt").write_bytes(b"mine")
    before = sorted(str(p.relative_to(outside)) for p in outside.rglob("*"))
    spec = json.loads((out / "run.json").read_text())
    spec["stores"] = spec.get("stores", []) + ["../elsewhere/store"]
    spec["written"] = spec.get("written", []) + ["../elsewhere/notes.txt"]
    (out / "run.json").write_text(json.dumps(spec))
    assert cli.main(["train", "--out", str(out), "--overwrite", *CLI_TINY]) == 0
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == before
    assert (outside / "notes.txt").read_bytes() == b"mine"


def test_demo_leaves_the_users_files_alone(tmp_path, capsys):
    out = tmp_path / "myproject"
    mine = user_files(out)
    assert cli.main(["demo", "--out", str(out), *CLI_TINY, *CLI_FEATURES[:-3]]) == 0
    assert untouched(mine) and (out / "explorer.html").is_file()
    assert cli.main(["demo", "--out", str(out), *CLI_TINY, *CLI_FEATURES[:-3]]) == 0   # replaces its own run
    assert untouched(mine)
    capsys.readouterr()
    (out / "store").mkdir(exist_ok=True)
    mine[out / "store" / "notes.txt"] = b"notes in the store folder"
    (out / "store" / "notes.txt").write_bytes(mine[out / "store" / "notes.txt"])
    shutil.rmtree(out / "store" / "ckpt_000")
    (out / "store" / "manifest.json").unlink()    # a folder of the user's where the store would go: refused
    assert cli.main(["demo", "--out", str(out), *CLI_TINY, *CLI_FEATURES[:-3]]) == 1
    one_line(capsys, "notes.txt", "choose an empty or new store directory")
    assert untouched(mine)


def test_a_users_file_is_never_replaced(env, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "ckpt_000004.pt").write_bytes(b"mine, named like a checkpoint")
    assert cli.main(["train", "--out", str(out), "--overwrite", *CLI_TINY]) == 1
    one_line(capsys, "ckpt_000004.pt exists and was not written by sdi")
    assert (out / "checkpoints" / "ckpt_000004.pt").read_bytes() == b"mine, named like a checkpoint"
    run = copy_run(env, tmp_path / "b")
    (tmp_path / "result.npz").write_bytes(b"my result")
    assert cli.main(["influence", str(run), "--out", str(tmp_path / "result.npz"), "--quiet"]) == 1
    one_line(capsys, "result.npz exists and was not written by sdi", "--out")
    assert (tmp_path / "result.npz").read_bytes() == b"my result"
    assert cli.main(["influence", str(run), "--quiet", "--device", "cpu"]) == 0
    (run / "page.html").write_bytes(b"my page")
    assert cli.main(["explore", str(run / "influence.npz"), "--out", str(run / "page.html")]) == 1
    one_line(capsys, "page.html exists and was not written by sdi")
    assert (run / "page.html").read_bytes() == b"my page"


def test_killed_training_reruns_with_the_same_command(tmp_path, capsys):
    out = tmp_path / "run"
    mine = {out / "notes.txt": b"mine"}
    out.mkdir()
    (out / "notes.txt").write_bytes(b"mine")
    args = ["train", "--out", str(out), "--overwrite", *CLI_TINY]

    def child():
        kill_at(r"ckpt_000004\.pt", "before-rename")
        return cli.main(args)

    assert in_child(child, tmp_path / "err") == -signal.SIGKILL
    assert cli.main(["featurize", str(out), *CLI_FEATURES]) == 1
    one_line(capsys, "did not finish", "sdi train --out")
    assert cli.main(args[:3] + args[4:]) == 0        # the same command (even without --overwrite) finishes it
    assert untouched(mine) and temporaries(out) == []
    assert R.load_run(out).checkpoints[-1].path.name == "ckpt_000004.pt"


# ------------------------------------------------------------------------------------------ mismatches

def test_influence_refuses_a_store_of_other_training_data(env, tmp_path, capsys):
    run = copy_run(env, tmp_path)
    spec = json.loads((run / "run.json").read_text())
    spec["train_data"]["seed"] = 7                    # the store was made from seed 0
    (run / "run.json").write_text(json.dumps(spec))
    assert cli.main(["influence", str(run), "--quiet", "--device", "cpu"]) == 1
    one_line(capsys, "made from other training examples", "chunk 0")
    spec["train_data"].update(seed=0, n_examples=12)
    (run / "run.json").write_text(json.dumps(spec))
    assert cli.main(["influence", str(run), "--quiet", "--device", "cpu"]) == 1
    one_line(capsys, "holds 8 training examples", "has 12")
    assert not (run / "influence.npz").exists()


def test_query_features_of_other_checkpoints_are_refused(env, tmp_path):
    """The module docstring's route (sdi.store): query_features without store=, then the store scores them."""
    run = env["run"]
    st = sdi.store.FeatureStore.open(run.store_dir)
    attr = R.attribution(run, 32)
    queries = query_features(attr, run.checkpoints, run.query_data.batches(8))
    assert queries.checkpoints[1]["sha256"] == st.manifest["checkpoints"][1]["sha256"]
    top = st.top_k(queries, k=3, progress=False)
    res = st.influence(queries, progress=False)
    assert torch.equal(top.top_k(0, 0).indices, res.top_k(0, 0, k=3).indices)
    other = R.train_run(tmp_path / "other", **{**TINY_TRAIN, "steps": 6})
    wrong = query_features(attr, other.checkpoints[:2], run.query_data.batches(8))
    for score in (lambda q: st.top_k(q, k=3, progress=False), lambda q: st.influence(q, progress=False)):
        with pytest.raises(StoreMismatchError, match="other checkpoints than the store"):
            score(wrong)
    with pytest.warns(UserWarning, match="carry no checkpoint identity"):
        st.influence(list(queries), progress=False)


# ------------------------------------------------------------------------------------------ damaged inputs

@pytest.mark.parametrize("damage", ["truncated", "empty", "nan"])
def test_damaged_checkpoint_is_named(env, tmp_path, capsys, damage):
    run = copy_run(env, tmp_path)
    ckpt = run / "checkpoints" / "ckpt_000002.pt"
    if damage == "nan":
        payload = torch.load(ckpt, weights_only=True)
        payload["state_dict"]["block.layers.0.mlp.up.weight"][0, 0] = float("nan")
        torch.save(payload, ckpt)
    else:
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2] if damage == "truncated" else b"")
    assert cli.main(["featurize", str(run), "--store", str(tmp_path / "s"), *CLI_FEATURES]) == 1
    one_line(capsys, str(ckpt), "non-finite weights" if damage == "nan" else "truncated or damaged")


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "foreign npz"])
def test_bad_result_file_for_explore_is_one_line(env, tmp_path, capsys, damage):
    run = copy_run(env, tmp_path)
    assert cli.main(["influence", str(run), "--quiet", "--device", "cpu"]) == 0
    path = run / "influence.npz"
    if damage == "foreign npz":
        np.savez(path, weights=np.zeros(3))
    else:
        path.write_bytes({"truncated": path.read_bytes()[:500], "empty": b"", "text": b"hello, world\n"}[damage])
    capsys.readouterr()
    assert cli.main(["explore", str(path)]) == 1
    one_line(capsys, str(path))


@pytest.mark.parametrize("damage", ["missing field", "invalid json", "a list", "bad checkpoint entry"])
def test_damaged_run_json_is_one_line(env, tmp_path, capsys, damage):
    run = copy_run(env, tmp_path)
    spec = json.loads((run / "run.json").read_text())
    if damage == "missing field":
        del spec["model"]
    elif damage == "bad checkpoint entry":
        spec["checkpoints"][0] = {"path": "checkpoints/ckpt_000002.pt"}
    text = {"invalid json": "{\"format\": ", "a list": "[]"}.get(damage, json.dumps(spec))
    (run / "run.json").write_text(text)
    assert cli.main(["featurize", str(run), *CLI_FEATURES]) == 1
    one_line(capsys, "run.json")


# ------------------------------------------------------------------------------------------ OS and Ctrl-C

def test_ctrl_c_is_one_line_and_the_rerun_resumes(env, tmp_path, monkeypatch, capsys):
    run, store = env["run"], tmp_path / "store"
    real, calls = sdi.StepInfluence.stream_features, [0]

    def interrupted(self, *a, **kw):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(sdi.StepInfluence, "stream_features", interrupted)
    assert cli.main(["featurize", str(run.path), "--store", str(store), *CLI_FEATURES]) == 1
    one_line(capsys, "interrupted; rerun the same command to resume")
    monkeypatch.undo()
    assert cli.main(["featurize", str(run.path), "--store", str(store), *CLI_FEATURES]) == 0
    assert "1 chunk(s) computed" not in capsys.readouterr().out
    assert sdi.store.FeatureStore.open(store).verify() == [] and temporaries(store) == []


def test_full_disk_while_writing_results_and_checkpoints(env, tmp_path, monkeypatch, capsys):
    run = copy_run(env, tmp_path)
    assert cli.main(["influence", str(run), "--quiet", "--device", "cpu"]) == 0
    before = (run / "influence.npz").read_bytes()
    stale = run / ".influence.npz.999999999.abcd.tmp"  # a killed writer's leftover (no such process)
    stale.write_bytes(b"partial")
    monkeypatch.setattr(sdi.files, "open", failing_open(errno.ENOSPC, 1000, r"influence\.npz"), raising=False)
    assert cli.main(["influence", str(run), "--quiet", "--device", "cpu", "--query-loops", "5"]) == 1
    one_line(capsys, "no space left on the device", "influence.npz")
    assert (run / "influence.npz").read_bytes() == before and temporaries(run) == []   # the old result is whole
    monkeypatch.setattr(sdi.files, "open", failing_open(errno.ENOSPC, 1000, r"ckpt_\d+\.pt"), raising=False)
    assert cli.main(["train", "--out", str(tmp_path / "new"), *CLI_TINY]) == 1    # torch.save hides the OSError
    one_line(capsys, "no space left on the device", "ckpt_000002.pt")


# ------------------------------------------------------------------------------------------ arguments

def test_bad_arguments_are_named(env, capsys):
    run = env["run"]
    model, batches = run.model, run.train_data.batches(8)
    with pytest.raises(TypeError, match="loop must be the nn.Module"):
        sdi.StepInfluence(model, loop=5, loss_fn=tasks.loss_fn)
    for dim in (2**28, 2**70, 1, "64"):
        with pytest.raises(ValueError, match="sketch_dim must be an int in"):
            sdi.StepInfluence(model, model.block, tasks.loss_fn, sketch_dim=dim)
    attr = sdi.StepInfluence(model, model.block, tasks.loss_fn, sketch_dim=32, progress=False)
    with pytest.raises(TypeError, match="train_batches must be an iterable"):
        attr.influence(5, batches)
    with pytest.raises(TypeError, match="query_loss_fn must be callable"):
        attr.influence(batches, batches, query_loss_fn=5)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        attr.influence(batches, batches, top_k=0)
    with pytest.raises(TypeError, match="query_loss_fn must be callable"):
        query_features(attr, run.checkpoints, batches, query_loss_fn=5)
    for argv, flag in ((["influence", str(run.path), "--top-k", "0"], "--top-k"),
                       (["featurize", str(run.path), "--sketch-dim", str(2**28)], "--sketch-dim"),
                       (["featurize", str(run.path), "--chunk-size", "-1"], "--chunk-size"),
                       (["train", "--out", "x", "--flip-fraction", "2"], "--flip-fraction")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}" in err and "must be" in err, err
