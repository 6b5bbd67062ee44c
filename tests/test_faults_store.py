"""Fault injection against the feature store: SIGKILLs at every write point, bit flips and truncation of every file
kind, damaged manifests, full / read-only / size-limited file systems, two writers at once.

Every scenario ends in a clear error naming the file, or in a recovery whose store is bit-identical to one made
without the fault, with no temporary file left behind. (The fault matrix is in the issue-13 note.)
"""

from __future__ import annotations

import errno
import json
import resource
import signal
import warnings
from pathlib import Path

import pytest

import sdi.files
import sdi.runs as R
from faultkit import (CLI_FEATURES, TINY_TRAIN, failing_open, featurize, in_child, kill_at, read_only_open,
                      spawn, temporaries, tree_bytes, wait)
from sdi import cli
from sdi import manifest as M
from sdi.storage import StoreError
from sdi.store import FeatureStore


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    run = R.train_run(root / "run", **TINY_TRAIN)
    ref = featurize(run, root / "reference")
    return {"root": root, "run": run, "ref": tree_bytes(ref.root)}


def recovered(env, store: Path) -> None:
    """The store, resumed, is bit-identical to the reference, intact, and free of temporaries."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "recomputing" / "rebuilding" warnings are asserted elsewhere
        st = featurize(env["run"], store)
    assert st.verify() == []
    assert temporaries(store) == []
    assert tree_bytes(store) == env["ref"]


# ------------------------------------------------------------------------------------------ kills

KILL_TARGETS = {"first manifest": (r"manifest\.json", 1), "final manifest": (r"manifest\.json", 2),
                "features file": (r"features_\d+\.npy", 2), "losses file": (r"losses_\d+\.npy", 2),
                "chunk record": (r"chunk_\d+\.json", 2)}


@pytest.mark.parametrize("point", ["mid-write", "before-rename", "after-rename"])
@pytest.mark.parametrize("target", sorted(KILL_TARGETS))
def test_sigkill_at_every_write_point_then_resume_is_bit_identical(env, tmp_path, target, point):
    store = tmp_path / "store"
    name, nth = KILL_TARGETS[target]

    def child():
        kill_at(name, point, nth)
        featurize(env["run"], store)

    assert in_child(child, tmp_path / "err") == -signal.SIGKILL, (tmp_path / "err").read_text()
    if point != "after-rename" or target != "final manifest":
        with pytest.raises((StoreError, FileNotFoundError)):
            FeatureStore.open(store)                     # an unfinished store is never read as if complete
    recovered(env, store)


# ------------------------------------------------------------------------------------------ damaged files

def _copy_reference(env, tmp_path) -> Path:
    store = tmp_path / "store"
    featurize(env["run"], store)
    return store


FILES = {"features": "ckpt_001/features_000001.npy", "losses": "ckpt_000/losses_000000.npy",
         "record": "ckpt_001/chunk_000000.json", "manifest": "manifest.json"}


@pytest.mark.parametrize("damage", ["flip in header", "flip in data", "truncated", "empty"])
@pytest.mark.parametrize("kind", sorted(FILES))
def test_damaged_file_is_named_and_repaired(env, tmp_path, kind, damage):
    store = _copy_reference(env, tmp_path)
    path = store / FILES[kind]
    raw = bytearray(path.read_bytes())
    if damage == "flip in header":
        raw[20] ^= 0x10                                  # inside the .npy header dict / near the JSON start
    elif damage == "flip in data":
        raw[len(raw) - 30] ^= 0x01
    raw = raw[: len(raw) // 2] if damage == "truncated" else b"" if damage == "empty" else raw
    path.write_bytes(bytes(raw))
    if kind == "manifest":
        with pytest.raises(StoreError, match="manifest.json"):
            FeatureStore.open(store)
        code = cli.main(["verify", str(store), "--quiet"])
        assert code == 1
        with pytest.warns(UserWarning, match="manifest of store .* is damaged; rebuilding"):
            featurize(env["run"], store)
    else:
        problems = FeatureStore.open(store).verify()
        assert len(problems) == 1 and path.name in problems[0], problems
        with pytest.warns(UserWarning, match=f"{path.name}.*(recomputing|restored from the manifest)"):
            featurize(env["run"], store)
    recovered(env, store)


@pytest.mark.parametrize("name", ["features", "losses"])
def test_every_single_bit_flip_of_an_npy_header_is_detected(env, tmp_path, name):
    """The 1024 bits of the 128-byte header: each flip is reported (never a SyntaxError from numpy's parser)."""
    store = _copy_reference(env, tmp_path)
    path = M.features_path(store, 0, 0) if name == "features" else M.losses_path(store, 0, 0)
    rec = FeatureStore.open(store).manifest["chunks"][0][0]
    good = path.read_bytes()
    for bit in range(128 * 8):
        raw = bytearray(good)
        raw[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(raw))
        assert M.chunk_problem(store, rec, "float32") is not None, bit
    path.write_bytes(good)
    assert M.chunk_problem(store, rec, "float32") is None


def test_every_single_bit_flip_of_a_record_and_of_the_manifest_is_detected(env, tmp_path):
    store = _copy_reference(env, tmp_path)
    record = M.record_path(store, 1, 1)
    good = record.read_bytes()
    for bit in range(len(good) * 8):
        raw = bytearray(good)
        raw[bit // 8] ^= 1 << (bit % 8)
        record.write_bytes(bytes(raw))
        rec, problem = M.read_record(store, 1, 1)
        assert rec is None and problem, bit
    record.write_bytes(good)
    manifest = store / "manifest.json"
    good = manifest.read_bytes()
    for bit in range(0, len(good) * 8, 7):               # every 7th bit: all bytes, all bit positions
        raw = bytearray(good)
        raw[bit // 8] ^= 1 << (bit % 8)
        manifest.write_bytes(bytes(raw))
        with pytest.raises(StoreError):
            M.read_manifest(store)


@pytest.mark.parametrize("content", ["{not json", "[]", "null", "{}", "missing"])
def test_damaged_or_missing_manifest_is_rebuilt_from_the_chunk_records(env, tmp_path, content):
    store = _copy_reference(env, tmp_path)
    if content == "missing":
        (store / "manifest.json").unlink()
    else:
        (store / "manifest.json").write_text(content)
    with pytest.raises((StoreError, FileNotFoundError)):
        FeatureStore.open(store)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        st = featurize(env["run"], store)
    assert st.stats.computed == 0 and st.stats.reused == 4  # rebuilt from intact records, nothing recomputed
    recovered(env, store)


def test_records_of_another_featurizer_are_never_reused_after_a_rebuild(env, tmp_path):
    store = tmp_path / "store"
    R.featurize_run(env["run"], store, sketch_dim=16, chunk_size=4, batch_size=4, device="cpu", progress=False)
    (store / "manifest.json").unlink()                 # lost: the records say they were made with another sketch
    with pytest.warns(UserWarning, match="made for another model, sketch or data layout"):
        st = featurize(env["run"], store)
    assert st.stats.reused == 0 and st.stats.computed == 4
    recovered(env, store)


def test_stale_temporaries_are_removed(env, tmp_path):
    store = _copy_reference(env, tmp_path)
    for p in (store / ".manifest.json.12345.abcd.tmp", store / "ckpt_000" / ".features_000000.npy.1.ff.tmp"):
        p.write_bytes(b"left by a killed writer")
    recovered(env, store)


# ------------------------------------------------------------------------------------------ the file system

def _cli_featurize(env, store: Path, capsys) -> tuple[int, str]:
    code = cli.main(["featurize", str(env["run"].path), "--store", str(store), *CLI_FEATURES])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "no space left on the device"),
                                        (errno.EDQUOT, "disk quota exceeded")])
def test_full_disk_is_one_line_and_resumable(env, tmp_path, monkeypatch, capsys, err, words):
    store = tmp_path / "store"
    monkeypatch.setattr(sdi.files, "open", failing_open(err, 100, r"features_000001\.npy"), raising=False)
    code, text = _cli_featurize(env, store, capsys)
    assert code == 1 and len(text.strip().splitlines()) == 1 and "Traceback" not in text
    assert words in text and "features_000001.npy" in text and "rerun the same command" in text
    assert temporaries(store) == []
    monkeypatch.undo()
    recovered(env, store)


def test_read_only_file_system_is_one_line(env, tmp_path, monkeypatch, capsys):
    store = _copy_reference(env, tmp_path)
    (store / "manifest.json").unlink()                 # something must be written
    monkeypatch.setattr(sdi.files, "open", read_only_open(), raising=False)
    code, text = _cli_featurize(env, store, capsys)
    assert code == 1 and len(text.strip().splitlines()) == 1 and "read-only file system" in text
    assert str(store) in text
    monkeypatch.undo()
    recovered(env, store)


def test_file_size_limit_is_one_line_and_resumable(env, tmp_path):
    """A real limit (``ulimit -f``, RLIMIT_FSIZE) in a forked child: the kernel refuses the write with EFBIG."""
    store, err = tmp_path / "store", tmp_path / "err"

    def child():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # the manifest fits, a features chunk does not
        return cli.main(["featurize", str(env["run"].path), "--store", str(store), *CLI_FEATURES])

    assert in_child(child, err) == 1
    text = err.read_text()
    assert len(text.strip().splitlines()) == 1 and "file too large" in text and ".npy" in text, text
    assert temporaries(store) == []
    recovered(env, store)


def test_permission_denied_is_one_line(env, tmp_path, monkeypatch, capsys):
    def denied(file, mode="r", *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(file))

    monkeypatch.setattr(sdi.files, "open", denied, raising=False)
    code, text = _cli_featurize(env, tmp_path / "store", capsys)
    assert code == 1 and "permission denied" in text and len(text.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ two writers

def test_two_writers_on_one_store_both_finish_and_agree(env, tmp_path):
    """A double click: two `sdi featurize` processes on one store. The lock makes the second wait; it then finds
    every chunk done. Neither crashes on the other's temporary files."""
    store = tmp_path / "store"

    def writer():
        return cli.main(["featurize", str(env["run"].path), "--store", str(store), *CLI_FEATURES])

    pids = [spawn(writer, tmp_path / f"err{n}") for n in range(2)]
    codes = [wait(pid) for pid in pids]
    assert codes == [0, 0], [(tmp_path / f"err{n}").read_text() for n in range(2)]
    assert temporaries(store) == [] and tree_bytes(store) == env["ref"]
    assert FeatureStore.open(store).verify() == []
