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
featurizer that differs from the manifest raises :class:`~sdi.storage.StoreMismatchError` naming what differs.
A chunk whose bytes do not match its checksum is never used: resuming recomputes it, reading raises
:class:`~sdi.storage.CorruptChunkError`, :meth:`FeatureStore.verify` lists it.

Storage dtypes: ``float32`` (default), ``float16``, ``bfloat16`` (NumPy has no bfloat16: stored as the raw
``uint16`` bit patterns). Products are always computed in float32.

This module is the store itself: its layout, the manifest, chunk files and the reader. Writing one is
:func:`sdi.featurize.featurize` (resumable; under ``torchrun`` every rank writes the chunks ``i`` with
``i % world_size == rank``); the one-call route is ``StepInfluence.influence(..., store=path)``::

    store = sdi.featurize.featurize("store/", attr, train_batches, checkpoints, chunk_size=1024)
    queries = sdi.featurize.query_features(attr, checkpoints, query_batches, store=store)  # K x (Q, T_q, D)
    best = store.top_k(queries, k=10)          # streaming top-k per (query, step), proponents and opponents
    res = store.influence(queries)             # full InfluenceResult when N is small enough

Scores come from :func:`sdi.scoring.score_block`, the same function the in-memory path uses.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .checkpoints import CheckpointRef, resolve_checkpoints
from .features import StepFeatures
from .fingerprints import as_json, check_fingerprints, describe_differences, fingerprint_differences, model_fingerprint
from .progress import progress_bar
from .results import InfluenceResult, StreamTopK, TopKStream
from .scoring import QueryBlock, ScoreCollector, score_block, sum_checkpoints
from .storage import (STORAGE_DTYPES, TORCH_STORAGE, CorruptChunkError, StoreError, StoreMismatchError, file_crc32,
                      npy_from_bytes, npy_header, read_json, to_storage, write_json, write_npy)

FORMAT = "sdi-feature-store"
VERSION = 1
MANIFEST = "manifest.json"
# ------------------------------------------------------------------------------------------ manifest

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
        _raise_if_different(root, read_json(manifest), header)
        return root
    if root.exists() and any(root.iterdir()):
        raise StoreError(f"{root} is a non-empty directory without {MANIFEST}; choose an empty or new store directory")
    root.mkdir(parents=True, exist_ok=True)
    for k in range(len(header["checkpoints"])):
        _ckpt_dir(root, k).mkdir(exist_ok=True)
    write_json(manifest, {**header, "meta": meta or {}, "complete": False, "n_steps": None, "feature_shape": None,
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
        "features_crc32": write_npy(features_path(root, k, i), to_storage(features, dtype)),
        "losses_crc32": write_npy(losses_path(root, k, i), losses.detach().to("cpu", torch.float32).numpy()),
        "data_sha256": data_sha256,
    }
    write_json(record_path(root, k, i), record)  # last: the commit marker
    return record


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
            shape, np_dtype, offset = npy_header(f)
    except (ValueError, OSError, StoreError) as e:
        return f"{fpath.name} has an unreadable header ({e})"
    if list(shape) != record["shape"] or np_dtype != STORAGE_DTYPES[dtype]:
        return f"{fpath.name} holds {np_dtype} {shape}, its record says {dtype} {record['shape']}"
    size, expected = fpath.stat().st_size, offset + int(np.prod(shape)) * np_dtype.itemsize
    if size != expected:
        return f"{fpath.name} has {size} bytes, expected {expected} (truncated?)"
    if file_crc32(fpath) != record["features_crc32"]:
        return f"{fpath.name} does not match its CRC-32 (corrupted)"
    if file_crc32(lpath) != record["losses_crc32"]:
        return f"{lpath.name} does not match its CRC-32 (corrupted)"
    return None


def load_record(root: Path, k: int, i: int, manifest: dict) -> dict | None:
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

    Raises :class:`~sdi.storage.StoreError` if a chunk is missing; removes leftover temporary files of killed
    writers.
    """
    root = Path(path)
    manifest = read_json(root / MANIFEST)
    K, n_chunks = len(manifest["checkpoints"]), manifest["n_chunks"]
    chunks, missing = [], []
    for k in range(K):
        row = []
        for i in range(n_chunks):
            rec = load_record(root, k, i, manifest)
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
    write_json(root / MANIFEST, manifest)
    return FeatureStore(root, manifest)


# ------------------------------------------------------------------------------------------ reader

class FeatureStore:
    """A complete feature store opened for reading. See the module docstring for the layout.

    Shapes: N examples, K checkpoints, T train steps, D = prod(feature_shape) features per (example, step).
    """

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.stats: Any = None  # what the featurize call that returned this store did (sdi.featurize)
        self._buffer = bytearray()  # reused by every read: memory stays at one chunk

    @classmethod
    def open(cls, path: str | os.PathLike, attr: Any = None, checkpoints: Sequence[Any] | None = None) -> "FeatureStore":
        """Open a complete store; with ``attr`` / ``checkpoints`` check that they are what the store was made with."""
        root = Path(path)
        if not (root / MANIFEST).is_file():
            raise FileNotFoundError(f"no feature store at {root} ({MANIFEST} not found)")
        manifest = read_json(root / MANIFEST)
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise StoreError(f"{root / MANIFEST} is not a version-{VERSION} {FORMAT} manifest")
        if not manifest.get("complete"):
            raise StoreError(f"feature store {root} is incomplete (featurization did not finish); run the "
                             "featurization again to resume it")
        store = cls(root, manifest)
        if attr is not None or checkpoints is not None:
            store.check(attr=attr, checkpoint_refs=None if checkpoints is None else
                        resolve_checkpoints(checkpoints, digests=True))
        return store

    def check(self, attr: Any = None, checkpoint_refs: Sequence[CheckpointRef] | None = None) -> None:
        """Raise :class:`~sdi.storage.StoreMismatchError` naming what differs from the manifest.

        Compared: the model, the featurizer and the checkpoints.
        """
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
        shape, np_dtype, offset = npy_header(io.BytesIO(raw[: min(len(raw), 1 << 16)]))
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
            parts.append(torch.from_numpy(npy_from_bytes(bytes(raw)).copy()))
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
    def _query_blocks(self, queries: Sequence[StepFeatures]) -> list[QueryBlock]:
        """One :class:`~sdi.scoring.QueryBlock` per checkpoint, checked against the store, on the CPU."""
        if isinstance(queries, StepFeatures) or len(queries) != self.n_checkpoints:
            raise ValueError(f"queries must be a list of {self.n_checkpoints} StepFeatures, one per checkpoint of the "
                             "store (see sdi.featurize.query_features)")
        shapes = {(len(q), q.n_steps) for q in queries}
        if len(shapes) != 1:
            raise ValueError(f"the query features of different checkpoints disagree on (Q, T_query): {sorted(shapes)}")
        blocks = []
        for q in queries:
            check_fingerprints(self.fingerprint, q.fingerprint)
            block = QueryBlock.of(q.features.cpu())
            if block.features.shape[-1] != self.dim:
                raise ValueError(f"query features have D={block.features.shape[-1]}, the store D={self.dim}")
            blocks.append(block)
        return blocks

    def _chunk_blocks(self, i: int, queries: list[QueryBlock], train_side: bool, step_matrix: bool) -> list[dict]:
        """:func:`~sdi.scoring.score_block` of chunk ``i``'s rows at every checkpoint, in checkpoint order."""
        return [score_block(self.read_chunk(k, i, copy=False), q, eta, train_side, step_matrix)
                for k, (q, eta) in enumerate(zip(queries, self.etas.tolist()))]

    def top_k(self, queries: Sequence[StepFeatures], k: int | None = 10, progress: bool = True) -> StreamTopK:
        """Streaming top-``k`` proponents and opponents per (query, step) and by TracIn over all N examples.

        queries: K :class:`~sdi.StepFeatures` (Q, T_query, D), one per checkpoint (see
        :func:`sdi.featurize.query_features`). Reads one chunk at a time (memory ~ one chunk plus
        (chunk_size, Q, T_query) scores).
        """
        k = 10 if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n:
            raise ValueError(f"k must be an int in [1, N={self.n}], got {k!r}")
        blocks = self._query_blocks(queries)
        top = TopKStream(k, len(queries[0]), queries[0].n_steps)
        for i in progress_bar(range(self.n_chunks), progress, desc="influence (streaming top-k)", unit="chunk"):
            parts = self._chunk_blocks(i, blocks, train_side=False, step_matrix=False)
            top.add(self.rows(i)[0], sum_checkpoints([p["sdi"] for p in parts]),
                    sum_checkpoints([p["tracin"] for p in parts]))
        return top.result(self._query_losses(queries), self._result_meta())

    def influence(self, queries: Sequence[StepFeatures], step_matrix: bool = False, max_elements: int = 2 * 10**8,
                  progress: bool = True) -> InfluenceResult:
        """Full TracIn and query-/train-side SDI of all N stored examples on the queries, as an
        :class:`~sdi.InfluenceResult`.

        For stores whose ``N x Q x T`` results fit in memory (``max_elements`` floats in all); otherwise use
        :meth:`top_k`. Agrees with :meth:`sdi.StepInfluence.influence` on the same examples and checkpoints.
        """
        blocks = self._query_blocks(queries)
        size = self.result_elements(len(queries[0]), queries[0].n_steps, step_matrix)
        if size > max_elements:
            raise StoreError(f"the full result would hold {size:,} floats (> max_elements={max_elements:,}); use "
                             "store.top_k(queries, k) for large stores, or raise max_elements")
        scores = ScoreCollector(self.n_checkpoints)
        for i in progress_bar(range(self.n_chunks), progress, desc="influence", unit="chunk"):
            for k, part in enumerate(self._chunk_blocks(i, blocks, train_side=True, step_matrix=step_matrix)):
                scores.add(k, self.rows(i)[0], part)
        totals = scores.totals()
        return InfluenceResult(
            sdi=totals["sdi"], train_sdi=totals["train_sdi"], tracin=totals["tracin"], etas=self.etas,
            train_losses=torch.stack([self.losses(k) for k in range(self.n_checkpoints)]),
            query_losses=self._query_losses(queries), step_matrix=totals["step_matrix"],
            checkpoint_sdi=totals["checkpoint_sdi"], meta=self._result_meta())

    def result_elements(self, n_query: int, n_query_steps: int, step_matrix: bool = False) -> int:
        """Floats a full :meth:`influence` result holds for ``n_query`` queries of ``n_query_steps`` iterations."""
        Tq, Tt, K = n_query_steps, self.n_steps, self.n_checkpoints
        return self.n * n_query * (Tq * (1 + K) + Tt + 1 + (Tt * Tq if step_matrix else 0))

    @staticmethod
    def _query_losses(queries: Sequence[StepFeatures]) -> torch.Tensor:
        return torch.stack([q.losses.detach().cpu().float() for q in queries])

    def _result_meta(self) -> dict[str, Any]:
        fp = self.fingerprint
        return {"fingerprint": fp, "sketch_dim": fp.get("sketch_dim", fp.get("m")), "seed": fp.get("seed"),
                "checkpoints": [c["name"] for c in self.manifest["checkpoints"]], "store": str(self.root),
                "store_dtype": self.dtype}
