"""Featurizing a training set into a feature store: resumable, checksummed, shardable with ``torchrun``.

:func:`featurize` computes the train features ``phi_t(w_k; z)`` at every checkpoint, chunk by chunk, into the store
at a path (:mod:`sdi.store` describes the layout). Chunk ``i`` holds rows ``[i * chunk_size, (i + 1) * chunk_size)``
and is always featurized from the same batches, whichever process does it and however often it was interrupted,
so a resumed or sharded store is bit-identical to an uninterrupted one. Under ``torch.distributed`` (``torchrun``)
rank ``r`` of ``W`` owns the chunks with ``i % W == r``; rank 0 writes the manifest.

:func:`query_features` computes the queries' features at the same checkpoints, checked against the store.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .checkpoints import CheckpointSpec, CheckpointWalk, resolve_checkpoints
from .files import WriteLock
from .fingerprints import data_digest, model_fingerprint
from .influence import as_batches
from .manifest import (LOCK, MANIFEST, chunk_problem, chunk_rows, foreign_entries, header_digest, init_store, read_manifest,
                       read_record, record_path, remove_temporaries, store_header, write_chunk)
from .progress import progress_bar
from .storage import StoreError, StoreMismatchError, write_json
from .store import FeatureStore, QueryFeatures, finalize_store


@dataclass
class FeaturizeStats:
    """What one :func:`featurize` call did on this rank."""

    computed: int = 0
    reused: int = 0
    repaired: list[str] = field(default_factory=list)


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


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a (nested dict / list / tuple) batch moved to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_len(batch: Any) -> int | None:
    """The example count of a batch: the leading size of its first tensor (None when it holds no tensor)."""
    if torch.is_tensor(batch):
        return batch.shape[0] if batch.dim() else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        n = batch_len(v)
        if n is not None:
            return n
    return None


class ChunkSource:
    """The batches of every chunk, from a dataset (``len(data)``, ``data.batch(slice)``) or a list of batches.

    From a dataset, chunk ``i`` is cut into batches of ``batch_size`` starting at its first row. From a list, the
    batches are taken as they are: all but the last must hold the same number of examples ``B``, and
    ``chunk_size`` must be a multiple of ``B``.
    """

    def __init__(self, data: Any, chunk_size: int, batch_size: int | None) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.chunk_size, self.data, self.list = chunk_size, data, None
        if hasattr(data, "__len__") and callable(getattr(data, "batch", None)):
            self.n, self.batch_size = len(data), batch_size or 64
            return
        sizes = [batch_len(b) for b in data] if isinstance(data, (list, tuple)) else None
        if not sizes or None in sizes:
            raise TypeError("data must have len(data) and data.batch(slice) -> batch (e.g. sdi.tasks.TaskDataset), or "
                            f"be a list of batches that hold tensors; got {type(data).__name__}")
        B = sizes[0]
        if any(s != B for s in sizes[:-1]) or sizes[-1] > B:
            raise ValueError(f"the training batches must all hold the same number of examples but the last, got "
                             f"sizes {sorted(set(sizes))}")
        if batch_size is not None and batch_size != B:
            raise ValueError(f"batch_size={batch_size} but the training batches hold {B} examples each")
        if chunk_size % B:
            raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of the batch size ({B}) when the "
                             "training data is a list of batches")
        self.list, self.n, self.batch_size = list(data), sum(sizes), B

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)

    def rows(self, i: int) -> tuple[int, int]:
        return chunk_rows(self.n, self.chunk_size, i)

    def batches(self, i: int) -> list:
        start, stop = self.rows(i)
        if self.list is not None:
            per_chunk = self.chunk_size // self.batch_size
            return self.list[i * per_chunk : (i + 1) * per_chunk]
        return [self.data.batch(slice(s, min(s + self.batch_size, stop))) for s in range(start, stop, self.batch_size)]


def featurize(
    path: str | os.PathLike,
    attr: Any,
    data: Any,
    checkpoints: Sequence[CheckpointSpec],
    chunk_size: int = 1024,
    batch_size: int | None = None,
    dtype: str = "float32",
    loss_fn: Callable | None = None,
    progress: bool = True,
    meta: dict | None = None,
) -> FeatureStore:
    """Compute (or resume) the train features of ``data`` at every checkpoint into the store at ``path``.

    Arguments::

        attr:        an sdi.StepInfluence.
        data:        a list of batches (as StepInfluence.influence takes them), or a dataset with len(data) and
                     data.batch(slice) -> batch (e.g. an sdi.tasks.TaskDataset), cut into batch_size (default 64).
        checkpoints: [(path | state_dict, eta), ...] or sdi.Checkpoint objects.
        chunk_size:  rows per chunk file.
        dtype:       storage precision: float32, float16 or bfloat16 (products are computed in float32).
        meta:        plain JSON kept in the manifest for the caller (e.g. how to rebuild attr), not checked.

    Chunks already on disk with a valid record and checksum are kept; missing, truncated or corrupted ones are
    (re)computed. The model's weights are restored afterwards.
    """
    source = ChunkSource(data, chunk_size, batch_size)
    rank, world = _dist()
    refs = resolve_checkpoints(checkpoints, digests=True)
    header = store_header(model_fingerprint(attr.model), [r.identity() for r in refs], attr.fingerprint(), source.n,
                          chunk_size, dtype, source.batch_size)
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise StoreError(f"store path {root} exists and is not a directory")
    if rank == 0 and foreign_entries(root) and not (root / MANIFEST).is_file():
        init_store(root, header, meta)  # refuses the user's folder before the lock file is written into it
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    # rank 0 holds the lock for the whole group; the other ranks are its helpers
    with WriteLock(root / LOCK, f"the feature store {root}") if rank == 0 else _no_lock():
        if rank == 0:
            remove_temporaries(root)  # a killed writer's leftovers: nobody else writes while we hold the lock
            init_store(root, header, meta)
        _barrier()
        if rank != 0:
            init_store(root, header, meta)  # checks the manifest rank 0 wrote (or found) against this rank's view
        stats = _compute(root, attr, source, refs, header, dtype, loss_fn, progress, rank, world)
        _barrier()
        if rank == 0:
            finalize_store(root)
        _barrier()
    store = FeatureStore.open(root)
    store.stats = stats
    return store


class _no_lock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def _compute(root: Path, attr: Any, source: ChunkSource, refs: list, header: dict, dtype: str,
             loss_fn: Callable | None, progress: bool, rank: int, world: int) -> FeaturizeStats:
    """Compute this rank's missing or damaged chunks at every checkpoint."""
    manifest = read_manifest(root)
    mine = list(range(rank, source.n_chunks, world))
    digests = {i: data_digest(source.batches(i)) for i in mine}
    stats, made_under = FeaturizeStats(), header_digest(header)
    todo = {k: [i for i in mine if not _reusable(root, k, i, manifest, dtype, digests[i], made_under, source, stats)]
            for k in range(len(refs))}
    device = next(attr.model.parameters()).device
    bar = progress_bar(None, progress and rank == 0, total=sum(map(len, todo.values())), unit="chunk",
                       desc=f"featurize (rank {rank}/{world})" if world > 1 else "featurize")
    check = True   # the hooks are checked on the first chunk this run computes (see StepInfluence.stream_features)
    try:
        with CheckpointWalk(attr.model, refs) as walk:
            for k, _ in walk.visit(skip={k for k, chunks in todo.items() if not chunks}):
                for i in todo[k]:
                    batches = [to_device(b, device) for b in source.batches(i)]
                    parts = list(attr.stream_features(batches, loss_fn, progress=False, check=check))  # one bar per chunk
                    check = False
                    write_chunk(root, k, i, source.rows(i), torch.cat([f for f, _ in parts]),
                                torch.cat([l for _, l in parts]), dtype, digests[i], made_under)
                    stats.computed += 1
                    bar.update()
    finally:
        bar.close()
    return stats


def _reusable(root: Path, k: int, i: int, manifest: dict, dtype: str, digest: str, made_under: str,
              source: ChunkSource, stats: FeaturizeStats) -> bool:
    """Whether chunk ``i`` of checkpoint ``k`` is on disk, intact and of this data (then it is counted reused).

    A damaged or missing record file is restored from the manifest's copy when the chunk's data files are intact.
    """
    record, problem = read_record(root, k, i)
    chunks, restored = manifest.get("chunks"), None
    if record is None and chunks:  # the manifest's copy vouches for the chunk
        record, problem, restored = chunks[k][i], None, problem
    if record is not None and record.get("header_sha256") != made_under:  # never reuse another store's chunk
        record, problem = None, f"{record_path(root, k, i).name} was made for another model, sketch or data layout"
    problem = problem or chunk_problem(root, record, dtype)
    if problem is None and record["data_sha256"] != digest:
        start, stop = source.rows(i)
        raise StoreMismatchError(
            f"the feature store {root} does not match what is in use now: training data differs in chunk {i} "
            f"(rows {start}:{stop}). Use the training set the store was made with, or a new store.")
    if problem is None:
        on_disk, _ = read_record(root, k, i)
        if on_disk != record:  # known only from the manifest: restore the record
            if record_path(root, k, i).is_file():
                warnings.warn(f"store {root}: checkpoint {k} chunk {i}: {restored}; restored from the manifest")
            write_json(record_path(root, k, i), record)
        stats.reused += 1
        return True
    if record is not None or record_path(root, k, i).is_file():
        warnings.warn(f"store {root}: checkpoint {k} chunk {i}: {problem}; recomputing it")
        stats.repaired.append(f"checkpoint {k} chunk {i}: {problem}")
    return False


def check_training_data(store: FeatureStore, data: Any) -> None:
    """Raise :class:`~sdi.storage.StoreMismatchError` unless ``data`` holds the examples the store was made from.

    ``data`` is cut into the store's chunks and batches exactly as :func:`featurize` cut it, and each chunk's
    digest is compared with the one in its record: a changed seed, order or label is caught, chunk by chunk.
    """
    source = ChunkSource(data, store.chunk_size, store.manifest.get("batch_size"))
    if source.n != store.n:
        raise StoreMismatchError(f"the feature store {store.root} holds {store.n} training examples, the training "
                                 f"data given has {source.n}; use the training set it was made with")
    for i in range(store.n_chunks):
        if data_digest(source.batches(i)) != store.manifest["chunks"][0][i]["data_sha256"]:
            start, stop = source.rows(i)
            raise StoreMismatchError(
                f"the feature store {store.root} was made from other training examples: the data differs in chunk "
                f"{i} (rows {start}:{stop}); use the training set the store was made with (its run.json), or "
                "featurize this one into a new store")


def query_features(attr: Any, checkpoints: Sequence[CheckpointSpec], query_batches: Sequence[Any],
                   query_loss_fn: Callable | None = None, store: FeatureStore | None = None) -> QueryFeatures:
    """Query features at every checkpoint, in memory: a :class:`~sdi.store.QueryFeatures`, K
    :class:`~sdi.StepFeatures` (Q, T_query, D) bound to the identities of the checkpoints they were made at.

    A store's :meth:`~sdi.store.FeatureStore.top_k` and :meth:`~sdi.store.FeatureStore.influence` refuse them
    unless those are its checkpoints. With ``store`` the model, checkpoints and featurizer are checked against its
    manifest before anything is computed. The model's weights are restored afterwards.
    """
    if query_loss_fn is not None and not callable(query_loss_fn):
        raise TypeError(f"query_loss_fn must be callable as loss_fn(model, batch) -> (B,) losses, got "
                        f"{type(query_loss_fn).__name__}")
    refs = resolve_checkpoints(checkpoints, digests=store is not None)
    if store is not None:
        store.check(attr=attr, checkpoint_refs=refs)
    device = next(attr.model.parameters()).device
    batches = [to_device(b, device) for b in as_batches(query_batches, "query_batches")]
    with CheckpointWalk(attr.model, refs) as walk:
        feats = [attr.features(batches, query_loss_fn, desc=f"queries (checkpoint {k + 1}/{len(refs)})", check=k == 0)
                 for k, _ in walk]
    return QueryFeatures(feats, [r.identity() for r in refs])
