"""On-disk feature store: train features per checkpoint, chunked, checksummed, resumable, shardable.

Train features ``phi_t(w_k; z)`` are computed once and reused for every query. A store is a directory::

    manifest.json                         what made the features (see below) and every chunk's checksums
    .lock                                 held (fcntl) by the one process writing the store
    ckpt_000/features_000000.npy          (rows, T, D) chunk 0 of checkpoint 0, in the storage dtype
    ckpt_000/losses_000000.npy            (rows,) float32 per-example train losses
    ckpt_000/chunk_000000.json            the chunk's commit record: rows, shape, CRC-32s, data and header digests
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
featurizer that differs from the manifest raises :class:`~sdi.storage.StoreMismatchError` naming what differs. Every file is
checksummed — the manifest and each record seal their own content (:func:`~sdi.storage.seal`) — and a file whose
bytes do not match is never used: resuming recomputes it (or rebuilds the manifest from the intact records),
reading raises :class:`~sdi.storage.CorruptChunkError`, :meth:`FeatureStore.verify` names it.

Storage dtypes: ``float32`` (default), ``float16``, ``bfloat16`` (NumPy has no bfloat16: stored as the raw
``uint16`` bit patterns). Products are always computed in float32.

This module is the reader; :mod:`sdi.manifest` names, writes and checks the files. Writing a store is
:func:`sdi.featurize.featurize` (resumable; under ``torchrun`` every rank writes the chunks ``i`` with
``i % world_size == rank``); the one-call route is ``StepInfluence.influence(..., store=path)``::

    store = sdi.featurize.featurize("store/", attr, train_batches, checkpoints, chunk_size=1024)
    queries = sdi.featurize.query_features(attr, checkpoints, query_batches)  # K x (Q, T_q, D) + checkpoint ids
    best = store.top_k(queries, k=10)          # streaming top-k per (query, step), proponents and opponents
    res = store.influence(queries)             # full InfluenceResult when N is small enough

Query features are a :class:`QueryFeatures`: they carry the identity of the checkpoints they were made at, and the
store refuses them if those are not its own. Scores come from :func:`sdi.scoring.score_block`, the same function
the in-memory path uses.
"""

from __future__ import annotations

import io
import os
import warnings
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .checkpoints import CheckpointRef, resolve_checkpoints
from .features import StepFeatures
from .fingerprints import check_fingerprints, model_fingerprint
from .manifest import (FORMAT, MANIFEST, VERSION, checkpoint_differences, chunk_problem, chunk_rows,  # noqa: F401
                       collect_records, features_path, header_differences, init_store, load_record, losses_path,
                       raise_if_different, read_manifest, read_record, record_path, remove_temporaries,
                       store_header, write_chunk)
from .progress import progress_bar
from .results import InfluenceResult, StreamTopK, TopKStream, warn_if_sketch_too_small
from .scoring import QueryBlock, ScoreCollector, score_block, sum_checkpoints
from .storage import (STORAGE_DTYPES, TORCH_STORAGE, CorruptChunkError, StoreError,  # noqa: F401
                      StoreMismatchError, npy_from_bytes, safe_npy_header, seal, write_json)


def finalize_store(path: str | os.PathLike) -> "FeatureStore":
    """Gather every chunk record into the manifest and mark the store complete (after all ranks finished).

    Raises :class:`~sdi.storage.StoreError` if a chunk is missing; removes leftover temporary files of killed
    writers.
    """
    root = Path(path)
    manifest = read_manifest(root)
    chunks = collect_records(root, manifest)
    shapes = {tuple(r["shape"][1:]) for row in chunks for r in row}
    if len(shapes) != 1:
        raise StoreError(f"store {root}: chunks disagree on (T, *feature_shape): {sorted(shapes)}")
    (shape,) = shapes
    remove_temporaries(root)
    manifest.update(complete=True, n_steps=shape[0], feature_shape=list(shape[1:]), chunks=chunks)
    manifest = seal(manifest)
    write_json(root / MANIFEST, manifest)
    return FeatureStore(root, manifest)


class QueryFeatures(list):
    """The query features at every checkpoint of a store, bound to those checkpoints' identities.

    A list of K :class:`~sdi.StepFeatures` (Q, T_query, D), one per checkpoint, plus ``checkpoints``: the
    identity (name, step, eta, sha256 of the weights) of the checkpoint each was made at. Made by
    :func:`sdi.featurize.query_features`; :meth:`FeatureStore.top_k` / :meth:`FeatureStore.influence` refuse
    query features made at other checkpoints than the store's.
    """

    def __init__(self, features: Sequence[StepFeatures], checkpoints: Sequence[dict]) -> None:
        super().__init__(features)
        if len(checkpoints) != len(self):
            raise ValueError(f"{len(self)} query feature sets but {len(checkpoints)} checkpoint identities")
        self.checkpoints = [dict(c) for c in checkpoints]


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
        manifest = read_manifest(root)
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
        raise_if_different(self.root, found, expected)

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
        shape, np_dtype, offset = safe_npy_header(io.BytesIO(raw[: min(len(raw), 1 << 16)]))
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
        """Check every chunk's files and record against their checksums; returns the problems found (empty when
        intact). The manifest's own checksum was checked when the store was opened."""
        problems = []
        pairs = [(k, i) for k in range(self.n_checkpoints) for i in range(self.n_chunks)]
        for k, i in progress_bar(pairs, progress, desc="verify"):
            rec = self.manifest["chunks"][k][i]
            on_disk, p = read_record(self.root, k, i)
            if p is None and on_disk != rec:
                p = f"{record_path(self.root, k, i).name} differs from the manifest's copy"
            p = p or chunk_problem(self.root, rec, self.dtype)
            if p is not None:
                problems.append(f"checkpoint {k} chunk {i}: {p}")
        return problems

    # -- influence ----------------------------------------------------------------------------------
    def _query_blocks(self, queries: Sequence[StepFeatures]) -> list[QueryBlock]:
        """One :class:`~sdi.scoring.QueryBlock` per checkpoint, checked against the store, on the CPU."""
        if isinstance(queries, StepFeatures) or len(queries) != self.n_checkpoints:
            raise ValueError(f"queries must be a list of {self.n_checkpoints} StepFeatures, one per checkpoint of the "
                             "store (see sdi.featurize.query_features)")
        if isinstance(queries, QueryFeatures):
            diffs = checkpoint_differences(self.manifest["checkpoints"], queries.checkpoints, eta=False)
            if diffs:
                raise StoreMismatchError(f"the query features were made at other checkpoints than the store {self.root}"
                                         f": {'; '.join(diffs)}. Compute them with sdi.featurize.query_features(attr, "
                                         "checkpoints, batches, store=store) at the store's checkpoints")
        else:
            warnings.warn("the query features carry no checkpoint identity, so nothing checks that they were made at "
                          "the store's checkpoints; compute them with sdi.featurize.query_features(..., store=store)")
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
        return [score_block(self.read_chunk(k, i, copy=False), q, eta, train_side, step_matrix, self.sketch_dim)
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
            summed = {name: sum_checkpoints([p[name] for p in parts]) if name in parts[0] else None
                      for name in ("sdi", "tracin", "sdi_se", "tracin_se")}
            top.add(self.rows(i)[0], **summed)
        res = top.result(self._query_losses(queries), self._result_meta())
        warn_if_sketch_too_small(res, self.sketch_dim)
        return res

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
        res = InfluenceResult(
            sdi=totals["sdi"], train_sdi=totals["train_sdi"], tracin=totals["tracin"], etas=self.etas,
            train_losses=torch.stack([self.losses(k) for k in range(self.n_checkpoints)]),
            query_losses=self._query_losses(queries), step_matrix=totals["step_matrix"],
            checkpoint_sdi=totals["checkpoint_sdi"], meta=self._result_meta(),
            sdi_se=totals["sdi_se"], train_sdi_se=totals["train_sdi_se"], tracin_se=totals["tracin_se"])
        warn_if_sketch_too_small(res, self.sketch_dim)
        return res

    def result_elements(self, n_query: int, n_query_steps: int, step_matrix: bool = False) -> int:
        """Floats a full :meth:`influence` result holds for ``n_query`` queries of ``n_query_steps`` iterations."""
        Tq, Tt, K = n_query_steps, self.n_steps, self.n_checkpoints
        return self.n * n_query * (Tq * (1 + K) + Tt + 1 + (Tt * Tq if step_matrix else 0))

    @staticmethod
    def _query_losses(queries: Sequence[StepFeatures]) -> torch.Tensor:
        return torch.stack([q.losses.detach().cpu().float() for q in queries])

    @property
    def sketch_dim(self) -> int | None:
        """m, the width of the stored sketches (None for exact features), from the featurizer fingerprint."""
        return self.fingerprint.get("sketch_dim", self.fingerprint.get("m"))

    def _result_meta(self) -> dict[str, Any]:
        fp = self.fingerprint
        return {"fingerprint": fp, "sketch_dim": self.sketch_dim, "seed": fp.get("seed"),
                "checkpoints": [c["name"] for c in self.manifest["checkpoints"]], "store": str(self.root),
                "store_dtype": self.dtype}
