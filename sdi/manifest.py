"""A feature store's layout on disk: the manifest, the chunk files and their sealed records, and their checks.

:mod:`sdi.store` describes the layout; this module names the files, writes and checks them. Every file of a store
is covered by a checksum: the ``.npy`` chunk files by the CRC-32 in their record, each record and the manifest by
the CRC-32 of their own content (:func:`sdi.storage.seal`). Each record also carries the digest of the store
header it was made under, so when a manifest is lost or damaged it is rebuilt from the intact records that agree
with what is in use now (:func:`init_store`), and no record made for another model, sketch or checkpoint list is
ever reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .fingerprints import as_json, describe_differences, fingerprint_differences
from .storage import (STORAGE_DTYPES, StoreError, StoreMismatchError, file_crc32, read_sealed, safe_npy_header, seal,
                      to_storage, write_json, write_npy)

FORMAT = "sdi-feature-store"
VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"  # fcntl lock of the writer (sdi.files.WriteLock); empty, kept
# every name a store writes; anything else in a store folder is the user's and is never touched
STORE_NAME = re.compile(r"^(manifest\.json|\.lock|\..+\.tmp|ckpt_\d{3})$")
CHUNK_NAME = re.compile(r"^((features|losses)_\d{6}\.npy|chunk_\d{6}\.json|\..+\.tmp)$")


# ------------------------------------------------------------------------------------------ header

def store_header(model_fp: dict, checkpoints: Sequence[dict], featurizer_fp: dict, n: int, chunk_size: int,
                 dtype: str, batch_size: int | None = None) -> dict[str, Any]:
    """The part of the manifest fixed before any feature is computed (what resuming must agree with).

    ``batch_size`` is recorded because float results depend (in the last bits) on how examples are batched:
    keeping it fixed is what makes a resumed or sharded store bit-identical to an uninterrupted one.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the training set must hold at least one example, got N={n!r}")
    return {
        "format": FORMAT, "version": VERSION, "model": dict(model_fp), "checkpoints": [dict(c) for c in checkpoints],
        "featurizer": featurizer_fp, "n": n, "chunk_size": chunk_size, "n_chunks": -(-n // chunk_size),
        "dtype": dtype, "batch_size": batch_size,
    }


HEADER_KEYS = ("format", "version", "model", "checkpoints", "featurizer", "n", "chunk_size", "n_chunks", "dtype",
               "batch_size")


def header_digest(header: dict) -> str:
    """SHA-256 of the header (canonical JSON): what every chunk record says it was made under."""
    body = json.dumps({k: header.get(k) for k in HEADER_KEYS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def header_differences(found: dict, expected: dict) -> list[str]:
    """Human-readable list of what differs between a store's manifest and what is in use now."""
    found, expected = as_json(found), as_json(expected)
    if found.get("format") != FORMAT:
        return [f"format: this is not a feature store (format {found.get('format')!r})"]
    if found.get("version") != expected["version"]:
        return [f"format version: store {found.get('version')}, this code {expected['version']}"]
    out = []
    if found["model"] != expected["model"]:
        out.append(f"model: the parameter names/shapes differ (store {found['model']}, model {expected['model']})")
    if found["featurizer"] != expected["featurizer"]:
        a, b = found["featurizer"], expected["featurizer"]
        keys = fingerprint_differences(a, b)
        out.append(f"featurizer/sketch: differs in {keys} (store, now: {describe_differences(a, b, keys)})")
    out += checkpoint_differences(found["checkpoints"], expected["checkpoints"])
    for key, what in (("n", "number of training examples N"), ("chunk_size", "chunk_size"), ("dtype", "dtype"),
                      ("batch_size", "batch_size")):
        if key in expected and found.get(key) != expected[key]:
            out.append(f"{what}: store {found.get(key)!r}, now {expected[key]!r}")
    return out


def checkpoint_differences(found: list[dict], expected: list[dict], eta: bool = True) -> list[str]:
    if len(found) != len(expected):
        return [f"checkpoints: the store has {len(found)} ({[c['name'] for c in found]}), "
                f"{len(expected)} given ({[c['name'] for c in expected]})"]
    out = []
    for k, (a, b) in enumerate(zip(found, expected)):
        if a["sha256"] != b["sha256"]:
            out.append(f"checkpoint {k} ({b['name']}): its weights differ from those the store was made with "
                       f"({a['name']}, sha256 {a['sha256'][:12]} vs {b['sha256'][:12]})")
        elif eta and a["eta"] != b["eta"]:
            out.append(f"checkpoint {k} ({b['name']}): eta differs (store {a['eta']}, now {b['eta']})")
    return out


def raise_if_different(path: Path, found: dict, expected: dict) -> None:
    diffs = header_differences(found, expected)
    if diffs:
        raise StoreMismatchError(f"the feature store {path} does not match what is in use now: " + "; ".join(diffs)
                                 + ". Use the model, checkpoints and featurizer it was made with, or a new store "
                                 "directory.")


# ------------------------------------------------------------------------------------------ layout

def _ckpt_dir(root: Path, k: int) -> Path:
    return root / f"ckpt_{k:03d}"


def features_path(root: Path, k: int, i: int) -> Path:
    return _ckpt_dir(root, k) / f"features_{i:06d}.npy"


def losses_path(root: Path, k: int, i: int) -> Path:
    return _ckpt_dir(root, k) / f"losses_{i:06d}.npy"


def record_path(root: Path, k: int, i: int) -> Path:
    return _ckpt_dir(root, k) / f"chunk_{i:06d}.json"


def chunk_rows(n: int, chunk_size: int, i: int) -> tuple[int, int]:
    return i * chunk_size, min(n, (i + 1) * chunk_size)


def foreign_entries(root: Path) -> list[str]:
    """Entries of ``root`` a store never writes (the user's): a folder holding any is not taken over as a store."""
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else ():
        if not STORE_NAME.match(p.name):
            out.append(p.name)
        elif p.is_dir():
            out += [f"{p.name}/{q.name}" for q in sorted(p.iterdir()) if not CHUNK_NAME.match(q.name)]
    return out


def store_files(root: Path) -> list[Path]:
    """Every file in ``root`` named as a store names its files (what removing the store removes)."""
    out = []
    for p in root.iterdir() if root.is_dir() else ():
        if STORE_NAME.match(p.name) and p.is_dir():
            out += [q for q in p.iterdir() if CHUNK_NAME.match(q.name) and q.is_file()]
        elif STORE_NAME.match(p.name) and p.is_file():
            out.append(p)
    return out


#: ``.<name>.<pid>.<hex>.tmp``: the temporary name :func:`sdi.files.atomic_write` gives a file it is writing.
WRITER_TEMPORARY = re.compile(r"^\..+\.\d+(\.[0-9a-f]+)?\.tmp$")  # (older writers: no hex part)


def remove_temporaries(root: Path) -> None:
    """Remove the ``.*.tmp`` files killed writers left in the store (call only while holding its lock)."""
    for tmp in [*root.glob(".*.tmp"), *root.glob("ckpt_*/.*.tmp")]:
        if WRITER_TEMPORARY.match(tmp.name):     # only sdi.files.atomic_write's names, never a user's .tmp file
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ manifest

def read_manifest(root: Path) -> dict:
    """The intact manifest of the store at ``root``; FileNotFoundError when absent, StoreError when damaged."""
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no feature store at {root} ({MANIFEST} not found)")
    obj, problem = read_sealed(path)
    if problem is not None:
        try:
            found = json.loads(path.read_bytes())
        except ValueError:
            found = None
        if isinstance(found, dict) and found.get("complete") is False:
            raise StoreError(f"feature store {root} is incomplete (featurization did not finish, and {problem}); run "
                             "the featurization again to resume it")
        raise StoreError(f"{path} is damaged ({problem}); rerun the featurization (`sdi featurize`) with the same "
                         "arguments to rebuild it from the chunk records")
    return obj


def init_store(path: str | os.PathLike, header: dict, meta: dict | None = None) -> Path:
    """Create the store and its (incomplete) manifest, or check an existing one against ``header``.

    A folder without an intact manifest but holding only store files (a writer killed while writing the first
    manifest, or a damaged manifest) gets a fresh manifest: the chunks whose records agree with ``header`` are then
    reused. A folder holding anything else is refused: a store never takes over the user's folder.
    """
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise StoreError(f"store path {root} exists and is not a directory")
    try:
        raise_if_different(root, read_manifest(root), header)
        return root
    except FileNotFoundError:
        pass
    except StoreMismatchError:
        raise
    except StoreError:
        if (root / MANIFEST).is_file() and not foreign_entries(root):
            warnings.warn(f"the manifest of store {root} is damaged; rebuilding it from the intact chunk records")
        else:
            raise
    foreign = foreign_entries(root)
    if foreign:
        raise StoreError(f"{root} is a non-empty directory without {MANIFEST} (it holds {foreign[:3]}); choose an "
                         "empty or new store directory")
    # the manifest first: no kill can leave a folder of chunks that no manifest describes
    write_json(root / MANIFEST, seal({**header, "meta": meta or {}, "complete": False, "n_steps": None,
                                      "feature_shape": None, "chunks": None}))
    for k in range(len(header["checkpoints"])):
        _ckpt_dir(root, k).mkdir(exist_ok=True)
    return root


# ------------------------------------------------------------------------------------------ chunks

def write_chunk(root: Path, k: int, i: int, rows: tuple[int, int], features: torch.Tensor, losses: torch.Tensor,
                dtype: str, data_sha256: str, header_sha256: str = "") -> dict:
    """Write chunk ``i`` of checkpoint ``k``: features ``(rows, T, *feature_shape)``, losses ``(rows,)``; then its
    sealed record (the commit marker)."""
    start, stop = rows
    if features.shape[0] != stop - start or losses.shape != (stop - start,):
        raise ValueError(f"chunk {i} covers rows {start}:{stop} but got features {tuple(features.shape)} and "
                         f"losses {tuple(losses.shape)}")
    record = seal({
        "checkpoint": k, "chunk": i, "rows": [start, stop], "shape": list(features.shape),
        "features_crc32": write_npy(features_path(root, k, i), to_storage(features, dtype)),
        "losses_crc32": write_npy(losses_path(root, k, i), losses.detach().to("cpu", torch.float32).numpy()),
        "data_sha256": data_sha256, "header_sha256": header_sha256,
    })
    write_json(record_path(root, k, i), record)  # last: the commit marker
    return record


def read_record(root: Path, k: int, i: int) -> tuple[dict | None, str | None]:
    """``(record, None)`` when chunk ``i`` of checkpoint ``k`` has an intact record file, ``(None, why)`` otherwise."""
    path = record_path(root, k, i)
    try:
        rec, problem = read_sealed(path)
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    if rec is not None and (rec.get("checkpoint"), rec.get("chunk")) != (k, i):
        return None, f"{path.name} describes checkpoint {rec.get('checkpoint')} chunk {rec.get('chunk')}"
    return rec, problem


def load_record(root: Path, k: int, i: int, manifest: dict) -> dict | None:
    """The chunk's intact record: its file, else the manifest's copy; None when neither is usable."""
    rec, _ = read_record(root, k, i)
    if rec is not None:
        return rec
    chunks = manifest.get("chunks")
    return chunks[k][i] if chunks else None


def chunk_problem(root: Path, record: dict | None, dtype: str) -> str | None:
    """Why chunk files cannot be used (missing, truncated, checksum mismatch), or None when they are intact."""
    if record is None:
        return "no record (never completed)"
    k, i = record["checkpoint"], record["chunk"]
    fpath, lpath = features_path(root, k, i), losses_path(root, k, i)
    for p in (fpath, lpath):
        if not p.is_file():
            return f"{p.name} is missing"
    try:
        with open(fpath, "rb") as f:
            shape, np_dtype, offset = safe_npy_header(f)
    except (OSError, StoreError) as e:
        return f"{fpath.name} has an unreadable header ({e}; corrupted)"
    if list(shape) != record["shape"] or np_dtype != STORAGE_DTYPES[dtype]:
        return f"{fpath.name} holds {np_dtype} {shape}, its record says {dtype} {record['shape']} (corrupted)"
    size, expected = fpath.stat().st_size, offset + int(np.prod(shape)) * np_dtype.itemsize
    if size != expected:
        return f"{fpath.name} has {size} bytes, expected {expected} (truncated?)"
    if file_crc32(fpath) != record["features_crc32"]:
        return f"{fpath.name} does not match its CRC-32 (corrupted)"
    if file_crc32(lpath) != record["losses_crc32"]:
        return f"{lpath.name} does not match its CRC-32 (corrupted)"
    return None


def collect_records(root: Path, manifest: dict) -> list[list[dict]]:
    """Every chunk's record, ``[k][i]``; StoreError naming the first missing ones."""
    K, n_chunks = len(manifest["checkpoints"]), manifest["n_chunks"]
    chunks = [[load_record(root, k, i, manifest) for i in range(n_chunks)] for k in range(K)]
    missing = [(k, i) for k in range(K) for i in range(n_chunks) if chunks[k][i] is None]
    if missing:
        raise StoreError(f"store {root} is incomplete: {len(missing)} chunk(s) missing, first (checkpoint, chunk) "
                         f"{missing[:5]}; run the featurization again to resume it")
    return chunks
