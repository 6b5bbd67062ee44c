"""On-disk feature store: train features per checkpoint, chunked, checksummed, resumable, shardable.

Train features ``phi_t(w_k; z)`` are computed once and reused for every query. A store is a directory::

    manifest.json                         what made the features (see below) and every chunk's checksums
    ckpt_000/features_000000.npy          (rows, T, D) chunk 0 of checkpoint 0, in the storage dtype
    ckpt_000/losses_000000.npy            (rows,) float32 per-example train losses
    ckpt_000/chunk_000000.json            the chunk's commit record: rows, shape, CRC-32s, data digest
    ...

Why one ``.npy`` per chunk (and not one preallocated memmap per checkpoint): a chunk file is written to a
temporary name, fsynced and renamed (``os.replace``), so it is either complete or absent — no torn writes, no
"which rows are valid" bookkeeping inside a shared file, and ranks on different machines never write to the same
file. Every chunk is an ordinary ``.npy`` that ``numpy.load(path, mmap_mode="r")`` maps. The record file is
written last and is the commit marker: a chunk without a record (the process died in between) is recomputed.

The manifest holds the format version, the model fingerprint (parameter names, shapes and dtypes), every
checkpoint's identity (file name, step, ``eta`` and a SHA-256 of its weights), the featurizer fingerprint
(exact or sketch: seed, width, parameter layout), ``N``, ``T``, the feature shape, the storage dtype, the chunk
size and, once complete, the CRC-32 of every chunk file. Opening a store for a model, checkpoint list or
featurizer that differs from the manifest raises :class:`StoreMismatchError` naming what differs. A chunk whose
bytes do not match its checksum is never used: resuming recomputes it, reading raises :class:`CorruptChunkError`,
:meth:`FeatureStore.verify` lists it.

Storage dtypes: ``float32`` (default), ``float16``, ``bfloat16`` (NumPy has no bfloat16: stored as the raw
``uint16`` bit patterns). Products are always computed in float32.

Featurize (resumable; under ``torchrun`` every rank writes chunks ``i`` with ``i % world_size == rank``)::

    store = sdi.store.featurize("store/", attr, train_data, checkpoints, chunk_size=1024)

Query (memory bounded by one chunk)::

    queries = sdi.store.query_features(attr, checkpoints, query_batches)   # K x StepFeatures (Q, T_q, D)
    best = store.top_k(queries, k=10)          # streaming top-k per (query, step), proponents and opponents
    res = store.influence(queries)             # full InfluenceResult when N is small enough
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import files
from .features import StepFeatures, check_fingerprints
from .influence import InfluenceResult, TopK
from .train import Checkpoint, load_checkpoint, progress_bar

FORMAT = "sdi-feature-store"
VERSION = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
TORCH_STORAGE: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StoreError(ValueError):
    """A store is missing, incomplete, corrupted, or cannot be used as asked."""


class StoreMismatchError(StoreError):
    """The store was made for a different model, checkpoint, featurizer (sketch) or training set."""


class CorruptChunkError(StoreError):
    """A chunk file is missing, truncated, or its bytes do not match the checksum in its record."""


# ------------------------------------------------------------------------------------------ fingerprints

def _sha256_tensors(named: Sequence[tuple[str, torch.Tensor]], with_values: bool) -> str:
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        if with_values:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """The architecture: SHA-256 of every state-dict entry's name, shape and dtype (not the values)."""
    state = sorted(model.state_dict().items())
    return {"sha256": _sha256_tensors(state, with_values=False), "n_tensors": len(state),
            "n_values": int(sum(t.numel() for _, t in state))}


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, shapes, dtypes and values (device independent)."""
    return _sha256_tensors(sorted(state_dict.items()), with_values=True)


def data_digest(batch: Any) -> str:
    """SHA-256 of every tensor (and plain value) in a batch: detects a changed training set on resume."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if torch.is_tensor(x):
            h.update(f"T{tuple(x.shape)}{x.dtype}".encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, np.ndarray):
            walk(torch.from_numpy(np.ascontiguousarray(x)))
        elif isinstance(x, dict):
            for key in sorted(x, key=str):
                h.update(f"K{key!s}".encode())
                walk(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"V{x!r}".encode())

    walk(batch)
    return h.hexdigest()


@dataclass
class CheckpointRef:
    """One checkpoint as the store sees it: how to load it, and its identity."""

    load: Callable[[], dict[str, torch.Tensor]]
    name: str
    step: int | None
    eta: float
    sha256: str = ""

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "step": self.step, "eta": self.eta, "sha256": self.sha256}


def resolve_checkpoints(checkpoints: Sequence[Any]) -> list[CheckpointRef]:
    """``[(path | state_dict, eta) | Checkpoint, ...]`` -> :class:`CheckpointRef` list with weight digests.

    Each checkpoint is loaded once here to hash it (and again when it is used), so that no more than one
    checkpoint's weights are held at a time.
    """
    if checkpoints is None or isinstance(checkpoints, (str, os.PathLike, dict, Checkpoint)):
        raise TypeError("checkpoints must be a list of (path_or_state_dict, eta) pairs or sdi.train.Checkpoint objects")
    refs = []
    for i, spec in enumerate(checkpoints):
        step = None
        if isinstance(spec, Checkpoint):
            state, eta, step = (spec.path if spec.path is not None else spec.state_dict), spec.lr, spec.step
        elif isinstance(spec, (tuple, list)) and len(spec) == 2:
            state, eta = spec
        else:
            raise TypeError(f"checkpoints[{i}] must be a (path_or_state_dict, eta) pair or a Checkpoint, "
                            f"got {type(spec).__name__}")
        if not isinstance(eta, (int, float)) or not np.isfinite(eta):
            raise ValueError(f"checkpoints[{i}]: eta must be a finite number, got {eta!r}")
        if isinstance(state, (str, os.PathLike)):
            path = Path(state)
            if not path.is_file():
                raise FileNotFoundError(f"checkpoints[{i}]: checkpoint file not found: {path}")
            payload = load_checkpoint(path)
            load = lambda path=path: load_checkpoint(path)["state_dict"]  # noqa: E731
            name, weights = path.name, payload["state_dict"]
            step = payload.get("step") if step is None else step
        elif isinstance(state, dict):
            load = lambda state=state: state  # noqa: E731
            name, weights = f"state_dict_{i}", state
        else:
            raise TypeError(f"checkpoints[{i}]: expected a path or a state_dict, got {type(state).__name__}")
        refs.append(CheckpointRef(load, name, None if step is None else int(step), float(eta), weights_digest(weights)))
    if not refs:
        raise ValueError("checkpoints is empty: pass at least one (path_or_state_dict, eta) pair")
    return refs


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


def _json(x: Any) -> Any:
    """``x`` as it reads back from JSON (tuples become lists), so headers compare equal after a round trip."""
    return json.loads(json.dumps(x))


def header_differences(found: dict, expected: dict) -> list[str]:
    """Human-readable list of what differs between a store's manifest and what is in use now."""
    found, expected = _json(found), _json(expected)
    if found.get("format") != FORMAT:
        return [f"format: this is not a feature store (format {found.get('format')!r})"]
    if found.get("version") != expected["version"]:
        return [f"format version: store {found.get('version')}, this code {expected['version']}"]
    out = []
    if found["model"] != expected["model"]:
        out.append(f"model: the parameter names/shapes differ (store {found['model']}, model {expected['model']})")
    if found["featurizer"] != expected["featurizer"]:
        a, b = found["featurizer"], expected["featurizer"]
        keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        shown = {k: (a.get(k), b.get(k)) for k in keys if k != "params"}
        out.append(f"featurizer/sketch: differs in {keys} (store, now: {shown})")
    out += _checkpoint_differences(found["checkpoints"], expected["checkpoints"])
    for key, what in (("n", "number of training examples N"), ("chunk_size", "chunk_size"), ("dtype", "dtype"),
                      ("batch_size", "batch_size")):
        if key in expected and found.get(key) != expected[key]:
            out.append(f"{what}: store {found.get(key)!r}, now {expected[key]!r}")
    return out


def _checkpoint_differences(found: list[dict], expected: list[dict]) -> list[str]:
    if len(found) != len(expected):
        return [f"checkpoints: the store has {len(found)} ({[c['name'] for c in found]}), "
                f"{len(expected)} given ({[c['name'] for c in expected]})"]
    out = []
    for k, (a, b) in enumerate(zip(found, expected)):
        if a["sha256"] != b["sha256"]:
            out.append(f"checkpoint {k} ({b['name']}): its weights differ from those the store was made with "
                       f"({a['name']}, sha256 {a['sha256'][:12]} vs {b['sha256'][:12]})")
        elif a["eta"] != b["eta"]:
            out.append(f"checkpoint {k} ({b['name']}): eta differs (store {a['eta']}, now {b['eta']})")
    return out


def _raise_if_different(path: Path, found: dict, expected: dict) -> None:
    diffs = header_differences(found, expected)
    if diffs:
        raise StoreMismatchError(f"the feature store {path} does not match what is in use now: " + "; ".join(diffs)
                                 + ". Use the model, checkpoints and featurizer it was made with, or a new store "
                                 "directory.")


# ------------------------------------------------------------------------------------------ files

class _CrcWriter:
    """A write-only file wrapper that keeps the CRC-32 of everything written through it."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f, self.crc = f, 0

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        return self.f.write(data)


def atomic_write(path: Path, write: Callable[[Any], None], checksum: bool = True) -> int:
    """:func:`sdi.files.atomic_write`, returning the CRC-32 of the bytes written (0 with ``checksum=False``).

    With ``checksum=True`` ``write(f)`` gets a stream-only wrapper that checksums the bytes; with
    ``checksum=False`` the real, seekable file.
    """
    crc = 0

    def body(f) -> None:
        nonlocal crc
        w = _CrcWriter(f) if checksum else f
        write(w)
        crc = w.crc if checksum else 0

    files.atomic_write(path, body)
    return crc


def _write_npy(path: Path, array: np.ndarray) -> int:
    return atomic_write(path, lambda f: np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False))


def _write_json(path: Path, obj: Any) -> int:
    return atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path}: {e}") from None


def file_crc32(path: Path, block: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while data := f.read(block):
            crc = zlib.crc32(data, crc)
    return crc


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 tensor -> numpy array in the storage dtype (bfloat16 as its uint16 bit patterns)."""
    x = x.detach().to("cpu", torch.float32)
    if dtype == "float32":
        return x.numpy()
    if dtype == "float16":
        lo, hi = torch.aminmax(x) if x.numel() else (torch.zeros(()), torch.zeros(()))
        if max(-lo.item(), hi.item()) > torch.finfo(torch.float16).max:  # one fast pass; isfinite is 5x slower
            raise StoreError(f"features reach |x| = {max(-lo.item(), hi.item()):.3g}, beyond float16's range (65504); "
                             "store them as bfloat16 or float32")
        return x.half().numpy()
    return x.bfloat16().view(torch.int16).numpy().view(np.uint16)


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored array -> float32 tensor (copies)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the ``.npy`` file object ``f`` (read from its start)."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
        raise StoreError("fortran-ordered chunk files are not produced by this store")
    return shape, dtype, f.tell()


def _npy_from_bytes(raw: bytes) -> np.ndarray:
    shape, dtype, offset = _npy_header(io.BytesIO(raw))
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


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


def init_store(path: str | os.PathLike, header: dict, meta: dict | None = None) -> Path:
    """Create the store directory and its (incomplete) manifest, or check an existing one against ``header``."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise StoreError(f"store path {root} exists and is not a directory")
    manifest = root / MANIFEST
    if manifest.exists():
        _raise_if_different(root, _read_json(manifest), header)
        return root
    if root.exists() and any(root.iterdir()):
        raise StoreError(f"{root} is a non-empty directory without {MANIFEST}; choose an empty or new store directory")
    root.mkdir(parents=True, exist_ok=True)
    for k in range(len(header["checkpoints"])):
        _ckpt_dir(root, k).mkdir(exist_ok=True)
    _write_json(manifest, {**header, "meta": meta or {}, "complete": False, "n_steps": None, "feature_shape": None,
                           "chunks": None})
    return root


def write_chunk(root: Path, k: int, i: int, rows: tuple[int, int], features: torch.Tensor, losses: torch.Tensor,
                dtype: str, data_sha256: str) -> dict:
    """Write chunk ``i`` of checkpoint ``k``: features ``(rows, T, *feature_shape)``, losses ``(rows,)``; then its
    record."""
    start, stop = rows
    if features.shape[0] != stop - start or losses.shape != (stop - start,):
        raise ValueError(f"chunk {i} covers rows {start}:{stop} but got features {tuple(features.shape)} and "
                         f"losses {tuple(losses.shape)}")
    record = {
        "checkpoint": k, "chunk": i, "rows": [start, stop], "shape": list(features.shape),
        "features_crc32": _write_npy(features_path(root, k, i), to_storage(features, dtype)),
        "losses_crc32": _write_npy(losses_path(root, k, i), losses.detach().to("cpu", torch.float32).numpy()),
        "data_sha256": data_sha256,
    }
    _write_json(record_path(root, k, i), record)  # last: the commit marker
    return record


def chunk_problem(root: Path, record: dict | None, dtype: str, check_crc: bool = True) -> str | None:
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
            shape, np_dtype, offset = _npy_header(f)
    except (ValueError, OSError, StoreError) as e:
        return f"{fpath.name} has an unreadable header ({e})"
    if list(shape) != record["shape"] or np_dtype != STORAGE_DTYPES[dtype]:
        return f"{fpath.name} holds {np_dtype} {shape}, its record says {dtype} {record['shape']}"
    size, expected = fpath.stat().st_size, offset + int(np.prod(shape)) * np_dtype.itemsize
    if size != expected:
        return f"{fpath.name} has {size} bytes, expected {expected} (truncated?)"
    if check_crc:
        if file_crc32(fpath) != record["features_crc32"]:
            return f"{fpath.name} does not match its CRC-32 (corrupted)"
        if file_crc32(lpath) != record["losses_crc32"]:
            return f"{lpath.name} does not match its CRC-32 (corrupted)"
    return None


def _load_record(root: Path, k: int, i: int, manifest: dict) -> dict | None:
    path = record_path(root, k, i)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None  # a torn record cannot exist (atomic writes), but a hand-edited one can
    chunks = manifest.get("chunks")
    return chunks[k][i] if chunks else None


def finalize_store(path: str | os.PathLike) -> "FeatureStore":
    """Gather every chunk record into the manifest and mark the store complete (after all ranks finished).

    Raises :class:`StoreError` if a chunk is missing; removes leftover temporary files of killed writers.
    """
    root = Path(path)
    manifest = _read_json(root / MANIFEST)
    K, n_chunks = len(manifest["checkpoints"]), manifest["n_chunks"]
    chunks, missing = [], []
    for k in range(K):
        row = []
        for i in range(n_chunks):
            rec = _load_record(root, k, i, manifest)
            if rec is None:
                missing.append((k, i))
            row.append(rec)
        chunks.append(row)
    if missing:
        raise StoreError(f"store {root} is incomplete: {len(missing)} chunk(s) missing, first (checkpoint, chunk) "
                         f"{missing[:5]}; run the featurization again to resume it")
    shapes = {tuple(r["shape"][1:]) for row in chunks for r in row}
    if len(shapes) != 1:
        raise StoreError(f"store {root}: chunks disagree on (T, *feature_shape): {sorted(shapes)}")
    (shape,) = shapes
    for tmp in root.glob("ckpt_*/.*.tmp"):
        tmp.unlink(missing_ok=True)
    manifest.update(complete=True, n_steps=shape[0], feature_shape=list(shape[1:]), chunks=chunks)
    _write_json(root / MANIFEST, manifest)
    return FeatureStore(root, manifest)


# ------------------------------------------------------------------------------------------ featurize

def _dist() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when it is initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _check_data(data: Any) -> int:
    if not (hasattr(data, "__len__") and callable(getattr(data, "batch", None))):
        raise TypeError("data must have len(data) and data.batch(slice) -> batch (e.g. sdi.tasks.TaskDataset), got "
                        f"{type(data).__name__}")
    return len(data)


@dataclass
class FeaturizeStats:
    """What one :func:`featurize` call did on this rank."""

    computed: int = 0
    reused: int = 0
    repaired: list[str] = field(default_factory=list)


def featurize(
    path: str | os.PathLike,
    attr: Any,
    data: Any,
    checkpoints: Sequence[Any],
    chunk_size: int = 1024,
    batch_size: int = 64,
    dtype: str = "float32",
    loss_fn: Callable | None = None,
    progress: bool = True,
    meta: dict | None = None,
) -> "FeatureStore":
    """Compute (or resume) the train features of ``data`` at every checkpoint into the store at ``path``.

    Arguments::

        attr:        an sdi.StepInfluence (anything with .model, .features(batches, loss_fn, desc)
                     returning StepFeatures (B, T, *feature_shape), and .fingerprint()).
        data:        len(data) examples, data.batch(slice) -> batch (e.g. an sdi.tasks.TaskDataset).
        checkpoints: [(path | state_dict, eta), ...] or sdi.train.Checkpoint objects.
        chunk_size:  rows per chunk file; chunk i holds rows [i * chunk_size, (i + 1) * chunk_size) and is
                     featurized in batches of batch_size starting at its first row, whichever process does it.

    Chunks already on disk with a valid record and checksum are kept; missing, truncated or corrupted ones are
    (re)computed. Under ``torch.distributed`` (``torchrun``) rank ``r`` of ``W`` owns the chunks with
    ``i % W == r``; rank 0 writes the manifest. The model's weights are restored afterwards.
    ``meta``: plain JSON kept in the manifest for the caller (e.g. how to rebuild ``attr``), not checked on resume.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = _check_data(data)
    rank, world = _dist()
    refs = resolve_checkpoints(checkpoints)
    header = store_header(model_fingerprint(attr.model), [r.identity() for r in refs], attr.fingerprint(), n,
                          chunk_size, dtype, batch_size)
    root = Path(path)
    if rank == 0:
        init_store(root, header, meta)
    _barrier()
    if rank != 0:
        init_store(root, header, meta)  # checks the manifest rank 0 wrote (or found) against this rank's view
    manifest = _read_json(root / MANIFEST)
    mine = list(range(rank, header["n_chunks"], world))
    stats = FeaturizeStats()
    original = {k: v.detach().clone() for k, v in attr.model.state_dict().items()}
    device = next(attr.model.parameters()).device
    bar = progress_bar(None, progress and rank == 0, total=len(refs) * len(mine), unit="chunk",
                       desc=f"featurize (rank {rank}/{world})" if world > 1 else "featurize")
    quiet = getattr(attr, "progress", None)
    try:
        if quiet is not None:
            attr.progress = False  # one bar per chunk, not one per batch
        digests = {i: data_digest(data.batch(slice(*chunk_rows(n, chunk_size, i)))) for i in mine}
        for k, ref in enumerate(refs):
            todo = []
            for i in mine:
                rows, digest = chunk_rows(n, chunk_size, i), digests[i]
                record = _load_record(root, k, i, manifest)
                problem = chunk_problem(root, record, dtype)
                if problem is None and record["data_sha256"] != digest:
                    raise StoreMismatchError(
                        f"the feature store {root} does not match what is in use now: training data differs in chunk "
                        f"{i} (rows {rows[0]}:{rows[1]}). Use the training set the store was made with, or a new store.")
                if problem is None:
                    if not record_path(root, k, i).is_file():  # known only from the manifest: restore the record
                        _write_json(record_path(root, k, i), record)
                    stats.reused += 1
                    bar.update()
                    continue
                if record is not None:
                    warnings.warn(f"store {root}: checkpoint {k} chunk {i}: {problem}; recomputing it")
                    stats.repaired.append(f"checkpoint {k} chunk {i}: {problem}")
                todo.append((i, rows, digest))
            if not todo:
                continue
            attr.model.load_state_dict(ref.load())
            for i, rows, digest in todo:
                batches = [_to_device(data.batch(slice(s, min(s + batch_size, rows[1]))), device)
                           for s in range(rows[0], rows[1], batch_size)]
                feats = attr.features(batches, loss_fn, desc=f"chunk {i}")
                write_chunk(root, k, i, rows, feats.features, feats.losses, dtype, digest)
                stats.computed += 1
                bar.update()
    finally:
        bar.close()
        if quiet is not None:
            attr.progress = quiet
        attr.model.load_state_dict(original)
    _barrier()
    if rank == 0:
        finalize_store(root)
    _barrier()
    store = FeatureStore.open(root)
    store.stats = stats
    return store


# ------------------------------------------------------------------------------------------ queries

def query_features(attr: Any, checkpoints: Sequence[Any], query_batches: Sequence[Any],
                   query_loss_fn: Callable | None = None, store: "FeatureStore | None" = None) -> list[StepFeatures]:
    """Query features at every checkpoint, in memory: a list of K :class:`~sdi.StepFeatures` (Q, T_query, D).

    With ``store`` the model, checkpoints and featurizer are first checked against its manifest. The model's
    weights are restored afterwards.
    """
    refs = resolve_checkpoints(checkpoints)
    if store is not None:
        store.check(attr=attr, checkpoint_refs=refs)
    device = next(attr.model.parameters()).device
    batches = [_to_device(b, device) for b in query_batches]
    if not batches:
        raise ValueError("query_batches is empty: pass at least one batch")
    original = {k: v.detach().clone() for k, v in attr.model.state_dict().items()}
    out = []
    try:
        for k, ref in enumerate(refs):
            attr.model.load_state_dict(ref.load())
            out.append(attr.features(batches, query_loss_fn, desc=f"queries (checkpoint {k + 1}/{len(refs)})"))
    finally:
        attr.model.load_state_dict(original)
    return out


@dataclass
class StreamTopK:
    """Top-k training examples per (query, step) from a streaming pass over a store.

    sdi_indices / sdi_scores:           (Q, T_query, k) proponents (largest SDI first)
    sdi_opp_indices / sdi_opp_scores:   (Q, T_query, k) opponents (most negative first)
    tracin_indices / tracin_scores:     (Q, k) by TracIn;  tracin_opp_indices / tracin_opp_scores likewise
    query_losses: (K, Q); meta: plain JSON (store manifest digest, featurizer fingerprint, checkpoints)

    Ties are broken by the lower training index, so the result equals a full sort exactly.
    """

    sdi_indices: torch.Tensor
    sdi_scores: torch.Tensor
    sdi_opp_indices: torch.Tensor
    sdi_opp_scores: torch.Tensor
    tracin_indices: torch.Tensor
    tracin_scores: torch.Tensor
    tracin_opp_indices: torch.Tensor
    tracin_opp_scores: torch.Tensor
    query_losses: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    ARRAYS = ("sdi_indices", "sdi_scores", "sdi_opp_indices", "sdi_opp_scores", "tracin_indices", "tracin_scores",
              "tracin_opp_indices", "tracin_opp_scores", "query_losses")

    def top_k(self, query: int, step: int | None = None, opponents: bool = False) -> TopK:
        """Like :meth:`sdi.InfluenceResult.top_k`: ``step`` is a 0-based iteration, ``None`` ranks by TracIn."""
        if step is None:
            idx, val = (self.tracin_opp_indices, self.tracin_opp_scores) if opponents else \
                (self.tracin_indices, self.tracin_scores)
            return TopK(idx[query], val[query])
        idx, val = (self.sdi_opp_indices, self.sdi_opp_scores) if opponents else (self.sdi_indices, self.sdi_scores)
        return TopK(idx[query, step], val[query, step])

    def save(self, path: str | os.PathLike) -> Path:
        """An ``.npz`` of the arrays above plus ``meta`` (a JSON string); ``kind`` = ``"sdi-topk"``."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"result files end in .npz, got {path}")
        arrays = {k: getattr(self, k).numpy() for k in self.ARRAYS}
        arrays["meta"] = np.array(json.dumps({**self.meta, "kind": "sdi-topk"}))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, **arrays), checksum=False)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StreamTopK":
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in cls.ARRAYS if k not in z.files]
            if missing:
                raise ValueError(f"{path} is not a top-k result file (missing {missing})")
            return cls(**{k: torch.from_numpy(z[k].copy()) for k in cls.ARRAYS}, meta=json.loads(str(z["meta"])))


def _merge_top(best_val: torch.Tensor | None, best_idx: torch.Tensor | None, val: torch.Tensor, idx: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` largest of (best, new) along the last axis; ties go to the lower training index.

    best_*: (R, k) sorted, from earlier chunks (all their indices are lower than ``idx``); val: (R, C); idx: (C,).
    Only the new scores ``>=`` each row's k-th largest can enter (all tied ones included, in index order);
    a stable descending sort of [best, candidates] then keeps equal scores in index order. The result equals
    one stable sort of all N scores, exactly.
    """
    R, C = val.shape
    kth = val.topk(min(k, C), dim=-1).values[:, -1:]                   # (R, 1)
    rows, cols = (val >= kth).nonzero(as_tuple=True)                   # row-major: index order within a row
    counts = torch.bincount(rows, minlength=R)
    slot = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[rows]
    cand_val = torch.full((R, int(counts.max())), -torch.inf, dtype=val.dtype)
    cand_idx = torch.full((R, int(counts.max())), -1, dtype=torch.long)
    cand_val[rows, slot], cand_idx[rows, slot] = val[rows, cols], idx[cols]
    if best_val is not None:
        cand_val, cand_idx = torch.cat([best_val, cand_val], -1), torch.cat([best_idx, cand_idx], -1)
    order = torch.sort(cand_val, dim=-1, descending=True, stable=True).indices[:, :k]
    return cand_val.gather(-1, order), cand_idx.gather(-1, order)


class FeatureStore:
    """A complete feature store opened for reading. See the module docstring for the layout.

    Shapes: N examples, K checkpoints, T train steps, D = prod(feature_shape) features per (example, step).
    """

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.stats: FeaturizeStats | None = None
        self._buffer = bytearray()  # reused by every read: memory stays at one chunk

    @classmethod
    def open(cls, path: str | os.PathLike, attr: Any = None, checkpoints: Sequence[Any] | None = None) -> "FeatureStore":
        """Open a complete store; with ``attr`` / ``checkpoints`` check that they are what the store was made with."""
        root = Path(path)
        if not (root / MANIFEST).is_file():
            raise FileNotFoundError(f"no feature store at {root} ({MANIFEST} not found)")
        manifest = _read_json(root / MANIFEST)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise StoreError(f"{root / MANIFEST} is not a version-{VERSION} {FORMAT} manifest")
        if not manifest.get("complete"):
            raise StoreError(f"feature store {root} is incomplete (featurization did not finish); run the "
                             "featurization again to resume it")
        store = cls(root, manifest)
        if attr is not None or checkpoints is not None:
            store.check(attr=attr, checkpoint_refs=None if checkpoints is None else resolve_checkpoints(checkpoints))
        return store

    def check(self, attr: Any = None, checkpoint_refs: Sequence[CheckpointRef] | None = None) -> None:
        """Raise :class:`StoreMismatchError` naming what differs from the manifest (model, featurizer, checkpoints)."""
        found, expected = self.manifest, dict(self.manifest)
        if attr is not None:
            expected["model"], expected["featurizer"] = model_fingerprint(attr.model), attr.fingerprint()
        if checkpoint_refs is not None:
            expected["checkpoints"] = [r.identity() for r in checkpoint_refs]
        _raise_if_different(self.root, found, expected)

    # -- shape --------------------------------------------------------------------------------------
    n = property(lambda self: self.manifest["n"], doc="N: training examples")
    n_steps = property(lambda self: self.manifest["n_steps"], doc="T: loop iterations of the train features")
    feature_shape = property(lambda self: tuple(self.manifest["feature_shape"]))
    dim = property(lambda self: int(np.prod(self.feature_shape)), doc="D: features per (example, step)")
    dtype = property(lambda self: self.manifest["dtype"])
    chunk_size = property(lambda self: self.manifest["chunk_size"])
    n_chunks = property(lambda self: self.manifest["n_chunks"])
    n_checkpoints = property(lambda self: len(self.manifest["checkpoints"]))
    fingerprint = property(lambda self: self.manifest["featurizer"], doc="the featurizer's fingerprint")

    @property
    def etas(self) -> torch.Tensor:
        return torch.tensor([c["eta"] for c in self.manifest["checkpoints"]], dtype=torch.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of feature data on disk (all checkpoints)."""
        return self.n_checkpoints * self.n * self.n_steps * self.dim * STORAGE_DTYPES[self.dtype].itemsize

    def rows(self, i: int) -> tuple[int, int]:
        return chunk_rows(self.n, self.chunk_size, i)

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.root)!r}, N={self.n}, K={self.n_checkpoints}, T={self.n_steps}, "
                f"D={self.dim}, dtype={self.dtype}, {self.n_chunks} chunks of {self.chunk_size})")

    # -- reading ------------------------------------------------------------------------------------
    def memmap(self, k: int, i: int) -> np.ndarray:
        """Chunk ``i`` of checkpoint ``k`` as a read-only memory map in the storage dtype (not verified)."""
        return np.load(features_path(self.root, k, i), mmap_mode="r", allow_pickle=False)

    def read_chunk(self, k: int, i: int, copy: bool = True) -> torch.Tensor:
        """Chunk ``i`` of checkpoint ``k`` as float32 (rows, T, D), its bytes checked against the CRC-32 first.

        With ``copy=False`` a float32 store returns a view of the store's read buffer, valid until the next read.
        """
        rec = self.manifest["chunks"][k][i]
        path = features_path(self.root, k, i)
        raw = self._read_checked(path, rec["features_crc32"])
        shape, np_dtype, offset = _npy_header(io.BytesIO(raw[: min(len(raw), 1 << 16)]))
        if list(shape) != rec["shape"] or np_dtype != STORAGE_DTYPES[self.dtype]:
            raise CorruptChunkError(f"{path} holds {np_dtype} {shape}, its record says {self.dtype} {rec['shape']}")
        x = torch.frombuffer(raw, dtype=TORCH_STORAGE[self.dtype], count=int(np.prod(shape)), offset=offset)
        x = x.float() if self.dtype != "float32" else (x.clone() if copy else x)
        return x.view(shape[0], self.n_steps, self.dim)

    def losses(self, k: int) -> torch.Tensor:
        """(N,) per-example train losses at checkpoint ``k``."""
        parts = []
        for i, rec in enumerate(self.manifest["chunks"][k]):
            raw = self._read_checked(losses_path(self.root, k, i), rec["losses_crc32"])
            parts.append(torch.from_numpy(_npy_from_bytes(bytes(raw)).copy()))
        return torch.cat(parts)

    def _read_checked(self, path: Path, crc: int) -> memoryview:
        """The file's bytes in the store's reusable read buffer (one chunk of memory), CRC-checked."""
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if len(self._buffer) < size:
                    self._buffer = bytearray(size)
                view = memoryview(self._buffer)[:size]
                got = f.readinto(view)
        except FileNotFoundError:
            raise CorruptChunkError(f"chunk file {path} is missing; run the featurization again to recompute it") from None
        if got != size or zlib.crc32(view) != crc:
            raise CorruptChunkError(f"chunk file {path} is corrupted or truncated (CRC-32 mismatch); run the "
                                    "featurization again to recompute it")
        return view

    def verify(self, progress: bool = False) -> list[str]:
        """Check every chunk file against its record; returns the problems found (empty when intact)."""
        problems = []
        pairs = [(k, i) for k in range(self.n_checkpoints) for i in range(self.n_chunks)]
        for k, i in progress_bar(pairs, progress, desc="verify"):
            p = chunk_problem(self.root, self.manifest["chunks"][k][i], self.dtype)
            if p is not None:
                problems.append(f"checkpoint {k} chunk {i}: {p}")
        return problems

    # -- influence ----------------------------------------------------------------------------------
    def _check_queries(self, queries: Sequence[StepFeatures]) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """Per checkpoint: (query features (Q, Tq, D), their totals (Q, D), eta), on the CPU in float32."""
        if isinstance(queries, StepFeatures) or len(queries) != self.n_checkpoints:
            raise ValueError(f"queries must be a list of {self.n_checkpoints} StepFeatures, one per checkpoint of the "
                             "store (see sdi.store.query_features)")
        shapes = {(len(q), q.n_steps) for q in queries}
        if len(shapes) != 1:
            raise ValueError(f"the query features of different checkpoints disagree on (Q, T_query): {sorted(shapes)}")
        out = []
        for q, eta in zip(queries, self.etas.tolist()):
            check_fingerprints(self.fingerprint, q.fingerprint)
            f = q.features.detach().to("cpu", torch.float32).flatten(2)
            if f.shape[-1] != self.dim:
                raise ValueError(f"query features have D={f.shape[-1]}, the store D={self.dim}")
            out.append((f, f.sum(1), eta))
        return out

    def _chunk_scores(self, i: int, qs, train_side: bool = False, step_matrix: bool = False) -> dict:
        """Scores of chunk ``i``'s rows against all queries, summed over checkpoints in checkpoint order.

        Returns per-checkpoint ``sdi`` (K x (C, Q, Tq)) and the sums ``tracin`` (C, Q), and when asked ``train_sdi``
        (C, Q, Tt) and ``step_matrix`` (C, Q, Tt, Tq).
        """
        out: dict[str, Any] = {"sdi": [], "tracin": None, "train_sdi": None, "step_matrix": None}

        def add(key, value):
            out[key] = value if out[key] is None else out[key] + value

        for k, (qf, qtot, eta) in enumerate(qs):
            F = self.read_chunk(k, i, copy=False)             # (C, Tt, D), valid until the next read
            Ftot = F.sum(1)                                    # (C, D)
            Q, Tq, D = qf.shape
            out["sdi"].append(eta * (Ftot @ qf.reshape(Q * Tq, D).T).view(-1, Q, Tq))
            add("tracin", eta * (Ftot @ qtot.T))
            if train_side:
                add("train_sdi", eta * torch.einsum("csd,qd->cqs", F, qtot))
            if step_matrix:
                add("step_matrix", eta * torch.einsum("csd,qtd->cqst", F, qf))
        return out

    def top_k(self, queries: Sequence[StepFeatures], k: int = 10, progress: bool = True) -> StreamTopK:
        """Streaming top-``k`` proponents and opponents per (query, step) and by TracIn over all N examples.

        queries: K :class:`~sdi.StepFeatures` (Q, T_query, D), one per checkpoint (see :func:`query_features`).
        Reads one chunk at a time (memory ~ one chunk plus (chunk_size, Q, T_query) scores).
        """
        if not isinstance(k, int) or not 1 <= k <= self.n:
            raise ValueError(f"k must be an int in [1, N={self.n}], got {k!r}")
        qs = self._check_queries(queries)
        best: dict[str, tuple] = {name: (None, None) for name in ("sdi", "sdi_opp", "tracin", "tracin_opp")}
        for i in progress_bar(range(self.n_chunks), progress, desc="influence (streaming top-k)", unit="chunk"):
            scores = self._chunk_scores(i, qs)
            sdi = scores["sdi"][0]
            for part in scores["sdi"][1:]:
                sdi = sdi + part
            start, stop = self.rows(i)
            idx = torch.arange(start, stop)
            Q, Tq = sdi.shape[1:]
            for name, s in (("sdi", sdi.permute(1, 2, 0).reshape(Q * Tq, -1)), ("tracin", scores["tracin"].T)):
                best[name] = _merge_top(*best[name], s, idx, k)
                best[name + "_opp"] = _merge_top(*best[name + "_opp"], -s, idx, k)
        Q, Tq, kk = len(queries[0]), queries[0].n_steps, min(k, self.n)
        per_step = lambda t: t.reshape(Q, Tq, kk)  # noqa: E731
        return StreamTopK(
            sdi_indices=per_step(best["sdi"][1]), sdi_scores=per_step(best["sdi"][0]),
            sdi_opp_indices=per_step(best["sdi_opp"][1]), sdi_opp_scores=per_step(-best["sdi_opp"][0]),
            tracin_indices=best["tracin"][1], tracin_scores=best["tracin"][0],
            tracin_opp_indices=best["tracin_opp"][1], tracin_opp_scores=-best["tracin_opp"][0],
            query_losses=torch.stack([q.losses.detach().cpu().float() for q in queries]),
            meta=self._result_meta(),
        )

    def influence(self, queries: Sequence[StepFeatures], step_matrix: bool = False, keep_checkpoints: bool = True,
                  max_elements: int = 2 * 10**8, progress: bool = True) -> InfluenceResult:
        """Full TracIn and query-/train-side SDI of all N stored examples on the queries, as an
        :class:`~sdi.InfluenceResult`.

        For stores whose ``N x Q x T`` results fit in memory (``max_elements`` floats in all); otherwise use
        :meth:`top_k`. Agrees with :meth:`sdi.StepInfluence.influence` on the same examples and checkpoints.
        """
        qs = self._check_queries(queries)
        K = self.n_checkpoints
        size = self.result_elements(len(queries[0]), queries[0].n_steps, keep_checkpoints, step_matrix)
        if size > max_elements:
            raise StoreError(f"the full result would hold {size:,} floats (> max_elements={max_elements:,}); use "
                             "store.top_k(queries, k) for large stores, or raise max_elements")
        parts: dict[str, list] = {"sdi": [], "ck": [], "tracin": [], "train_sdi": [], "step_matrix": []}
        for i in progress_bar(range(self.n_chunks), progress, desc="influence", unit="chunk"):
            scores = self._chunk_scores(i, qs, train_side=True, step_matrix=step_matrix)
            sdi = scores["sdi"][0]
            for part in scores["sdi"][1:]:
                sdi = sdi + part
            parts["sdi"].append(sdi)
            if keep_checkpoints:
                parts["ck"].append(torch.stack(scores["sdi"]))
            parts["tracin"].append(scores["tracin"])
            parts["train_sdi"].append(scores["train_sdi"])
            if step_matrix:
                parts["step_matrix"].append(scores["step_matrix"])
        return InfluenceResult(
            sdi=torch.cat(parts["sdi"]), train_sdi=torch.cat(parts["train_sdi"]), tracin=torch.cat(parts["tracin"]),
            etas=self.etas, train_losses=torch.stack([self.losses(k) for k in range(K)]),
            query_losses=torch.stack([q.losses.detach().cpu().float() for q in queries]),
            step_matrix=torch.cat(parts["step_matrix"]) if step_matrix else None,
            checkpoint_sdi=torch.cat(parts["ck"], dim=1) if keep_checkpoints else None,
            meta=self._result_meta(),
        )

    def result_elements(self, n_query: int, n_query_steps: int, keep_checkpoints: bool = True,
                        step_matrix: bool = False) -> int:
        """Floats a full :meth:`influence` result holds for ``n_query`` queries of ``n_query_steps`` iterations."""
        Tq, Tt, K = n_query_steps, self.n_steps, self.n_checkpoints
        return self.n * n_query * (Tq * (1 + (K if keep_checkpoints else 0)) + Tt + 1 + (Tt * Tq if step_matrix else 0))

    def _result_meta(self) -> dict[str, Any]:
        fp = self.fingerprint
        return {"fingerprint": fp, "sketch_dim": fp.get("sketch_dim", fp.get("m")), "seed": fp.get("seed"),
                "checkpoints": [c["name"] for c in self.manifest["checkpoints"]], "store": str(self.root),
                "store_dtype": self.dtype}

