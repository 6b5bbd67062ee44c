"""What an influence computation returns, and the one ranking rule every result follows.

Two result types, one ranking API::

    InfluenceResult  every score: sdi (N, Q, T_query), train_sdi, tracin, per-checkpoint sdi, losses
    StreamTopK       only the top k per (query, step) and by TracIn, for stores too large for a full result

Both answer ``top_k(query, step=None, k=None, opponents=False, checkpoint=None)``. **Steps are 0-based**:
``step=s`` is iteration ``t = s + 1`` (negative values count from the last iteration), ``step=None`` ranks by
TracIn. Proponents are the largest scores, opponents the most negative; **ties go to the lower training index**
(a stable sort), in memory and in the streaming merge alike, so the two agree exactly.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .files import atomic_write


class TopK(NamedTuple):
    """``indices`` (k,) of training examples and their ``scores`` (k,), strongest first."""

    indices: torch.Tensor
    scores: torch.Tensor


class TopKWithErrors(NamedTuple):
    """A :class:`TopK` plus ``se`` (k,): each sketched score's estimated standard error (``top_k(..., se=True)``)."""

    indices: torch.Tensor
    scores: torch.Tensor
    se: torch.Tensor


def stable_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest along the last axis, ties to the lower index: ``(values, indices)``, each (..., k)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return scores.gather(-1, order), order


def merge_top_k(best_val: torch.Tensor | None, best_idx: torch.Tensor | None, val: torch.Tensor, idx: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` largest of (best, new) along the last axis; ties go to the lower training index.

    best_*: (R, k) sorted, from earlier chunks (all their indices are lower than ``idx``); val: (R, C); idx: (C,).
    Only the new scores ``>=`` each row's k-th largest can enter (all tied ones included, in index order);
    a stable descending sort of [best, candidates] then keeps equal scores in index order. The result equals
    one stable sort of all N scores (:func:`stable_top_k`), exactly.
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


PREDICTED_ERROR_WARNING = 0.1
"""Warn when the median predicted relative error of the top-10 TracIn scores exceeds this (10%)."""


def _median_relative_error(scores: torch.Tensor, se: torch.Tensor) -> float:
    """Median over queries of the median ``se / |score|`` of each query's row: scores, se (Q, k)."""
    rel = se / scores.abs().clamp_min(1e-30)
    return float(rel.median(dim=1).values.median())


def warn_if_sketch_too_small(result: "InfluenceResult | StreamTopK", sketch_dim: int | None,
                             stacklevel: int = 2) -> None:
    """Record ``predicted_relative_error`` in ``result.meta`` and warn when it exceeds
    :data:`PREDICTED_ERROR_WARNING` (sketched results with standard errors only; others pass through)."""
    if result.tracin_se is None:
        return
    rel = result.predicted_relative_error()
    result.meta["predicted_relative_error"] = rel
    if rel > PREDICTED_ERROR_WARNING:
        warnings.warn(f"sdi: the sketch is too small for this model: the predicted relative error of the top-10 "
                      f"TracIn scores is {rel:.2f} (median over queries; top_k(..., se=True) shows each score's "
                      f"standard error). Use a larger sketch_dim (now {sketch_dim}; the error falls as "
                      "1/sqrt(sketch_dim)) or sketch_dim=None for exact scores", stacklevel=stacklevel + 1)


def _check_index(name: str, value: Any, size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -size <= value < size:
        raise IndexError(f"{name} must be an int in [{-size}, {size}), got {value!r}")
    return value


def _save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"result files end in .npz, got {path}")
    arrays = {**arrays, "meta": np.array(json.dumps(meta))}
    return atomic_write(path, lambda f: np.savez(f, **arrays))


@dataclass
class InfluenceResult:
    """Influence of ``N`` training examples on ``Q`` queries::

        sdi:            (N, Q, T_query)   query-side SDI, sdi.sum(-1) == tracin
        train_sdi:      (N, Q, T_train)   train-side SDI, train_sdi.sum(-1) == tracin
        tracin:         (N, Q)            TracIn
        step_matrix:    (N, Q, T_train, T_query) or None (ask with step_matrix=True)
        checkpoint_sdi: (K, N, Q, T_query) or None — each checkpoint's eta-weighted share of sdi
        etas:           (K,) the learning-rate weights
        train_losses:   (K, N), query_losses: (K, Q) — losses at each checkpoint
        meta:           plain-JSON description (featurizer fingerprint, sketch size and seed, ...)
        sdi_se, train_sdi_se, tracin_se: sketched results only (else None), shaped as sdi / train_sdi / tracin —
                        the estimated standard error of each score (sdi.scoring explains the estimator)

    Step indices are 0-based positions on the last axis (see :mod:`sdi.results`).
    """

    sdi: torch.Tensor
    train_sdi: torch.Tensor
    tracin: torch.Tensor
    etas: torch.Tensor
    train_losses: torch.Tensor
    query_losses: torch.Tensor
    step_matrix: torch.Tensor | None = None
    checkpoint_sdi: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    sdi_se: torch.Tensor | None = None
    train_sdi_se: torch.Tensor | None = None
    tracin_se: torch.Tensor | None = None

    @property
    def n_train(self) -> int:
        return self.sdi.shape[0]

    @property
    def n_query(self) -> int:
        return self.sdi.shape[1]

    @property
    def n_steps(self) -> int:
        """``T_query``: iterations the queries ran."""
        return self.sdi.shape[2]

    @property
    def n_train_steps(self) -> int:
        return self.train_sdi.shape[2]

    def scores(self, query: int, step: int | None = None, checkpoint: int | None = None) -> torch.Tensor:
        """(N,) influence of every training example on ``query``: SDI at ``step``, or TracIn when ``step`` is None."""
        _check_index("query", query, self.n_query)
        if checkpoint is not None:
            if self.checkpoint_sdi is None:
                raise ValueError("this result kept no per-checkpoint scores")
            _check_index("checkpoint", checkpoint, self.checkpoint_sdi.shape[0])
            per_step = self.checkpoint_sdi[checkpoint, :, query]
        else:
            per_step = self.sdi[:, query]
        if step is None:
            return per_step.sum(-1) if checkpoint is not None else self.tracin[:, query]
        _check_index("step", step, self.n_steps)
        return per_step[:, step]

    def top_k(self, query: int, step: int | None = None, k: int | None = None, opponents: bool = False,
              checkpoint: int | None = None, se: bool = False) -> TopK | TopKWithErrors:
        """The ``k`` (default 10, at most N) strongest proponents, or ``opponents`` (most negative), of ``query``.

        ``step`` is a 0-based iteration index (``-1`` = the last); ``None`` ranks by TracIn. ``checkpoint`` ranks
        by one checkpoint's share. Ties go to the lower training index. With ``se`` (sketched results) the
        :class:`TopKWithErrors` also carries each score's standard error.
        """
        k = min(10, self.n_train) if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_train:
            raise ValueError(f"k must be an int in [1, N_train={self.n_train}], got {k!r}")
        s = self.scores(query, step, checkpoint)
        vals, idx = stable_top_k(-s if opponents else s, k)
        if not se:
            return TopK(idx, -vals if opponents else vals)
        return TopKWithErrors(idx, -vals if opponents else vals, self.standard_errors(query, step, checkpoint)[idx])

    def standard_errors(self, query: int, step: int | None = None, checkpoint: int | None = None) -> torch.Tensor:
        """(N,) estimated standard error of :meth:`scores` ``(query, step)`` — sketched results only."""
        if self.sdi_se is None or self.tracin_se is None:
            raise ValueError("this result carries no standard errors: exact scores (sketch_dim=None) have none")
        if checkpoint is not None:
            raise ValueError("standard errors are kept for the scores summed over checkpoints only")
        _check_index("query", query, self.n_query)
        if step is None:
            return self.tracin_se[:, query]
        _check_index("step", step, self.n_steps)
        return self.sdi_se[:, query, step]

    def predicted_relative_error(self, k: int = 10) -> float:
        """Median over queries of the median ``se / |score|`` of each query's top-``k`` proponents by TracIn."""
        if self.tracin_se is None:
            raise ValueError("this result carries no standard errors (exact scores have none)")
        k = min(k, self.n_train)
        vals, idx = stable_top_k(self.tracin.T, k)                          # (Q, k)
        return _median_relative_error(vals, self.tracin_se.T.gather(1, idx))

    def conservation_error(self) -> float:
        """``max |sum_t SDI_t - TracIn| / max |TracIn|`` (0 up to rounding)."""
        scale = self.tracin.abs().max().clamp_min(1e-30)
        return float(torch.maximum((self.sdi.sum(-1) - self.tracin).abs().max(),
                                   (self.train_sdi.sum(-1) - self.tracin).abs().max()) / scale)

    # -- files ---------------------------------------------------------------------------------------
    ARRAYS = ("sdi", "train_sdi", "tracin", "etas", "train_losses", "query_losses", "step_matrix", "checkpoint_sdi",
              "sdi_se", "train_sdi_se", "tracin_se")

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (float32 arrays named as the fields + ``meta``, a JSON string), atomically.

        Read it back with :meth:`load` or plain ``numpy.load(path)``; no pickles involved.
        """
        arrays = {k: getattr(self, k).detach().cpu().numpy() for k in self.ARRAYS if getattr(self, k) is not None}
        return _save_npz(path, arrays, self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InfluenceResult":
        """Read a result written by :meth:`save` (plain arrays, no pickles)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"result file not found: {path}")
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("sdi", "train_sdi", "tracin", "meta") if k not in z.files]
            if missing:
                raise ValueError(f"{path} is not an influence result file (missing {missing})")
            kw = {k: torch.from_numpy(z[k].copy()) for k in cls.ARRAYS if k in z.files}
            meta = json.loads(str(z["meta"]))
        K = kw["etas"].shape[0] if "etas" in kw else 1
        kw.setdefault("etas", torch.ones(K))
        kw.setdefault("train_losses", torch.full((K, kw["sdi"].shape[0]), float("nan")))
        kw.setdefault("query_losses", torch.full((K, kw["sdi"].shape[1]), float("nan")))
        return cls(meta=meta, **kw)


@dataclass
class StreamTopK:
    """Top-k training examples per (query, step) and by TracIn, from a streaming pass (see :mod:`sdi.results`).

    Fields::

        sdi_indices / sdi_scores:           (Q, T_query, k) proponents (largest SDI first)
        sdi_opp_indices / sdi_opp_scores:   (Q, T_query, k) opponents (most negative first)
        tracin_indices / tracin_scores:     (Q, k) by TracIn;  tracin_opp_indices / tracin_opp_scores likewise
        query_losses: (K, Q);  meta: plain JSON (featurizer fingerprint, checkpoints, ...)
        sdi_se, sdi_opp_se, tracin_se, tracin_opp_se: sketched results only (else None), shaped as the scores
                        beside them — each kept score's estimated standard error (sdi.scoring explains it)
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
    sdi_se: torch.Tensor | None = None
    sdi_opp_se: torch.Tensor | None = None
    tracin_se: torch.Tensor | None = None
    tracin_opp_se: torch.Tensor | None = None

    ARRAYS = ("sdi_indices", "sdi_scores", "sdi_opp_indices", "sdi_opp_scores", "tracin_indices", "tracin_scores",
              "tracin_opp_indices", "tracin_opp_scores", "query_losses")
    ERRORS = ("sdi_se", "sdi_opp_se", "tracin_se", "tracin_opp_se")

    @property
    def k(self) -> int:
        """How many entries each ranking keeps."""
        return self.sdi_indices.shape[-1]

    @property
    def n_query(self) -> int:
        return self.sdi_indices.shape[0]

    @property
    def n_steps(self) -> int:
        return self.sdi_indices.shape[1]

    def top_k(self, query: int, step: int | None = None, k: int | None = None, opponents: bool = False,
              checkpoint: int | None = None, se: bool = False) -> TopK | TopKWithErrors:
        """As :meth:`InfluenceResult.top_k`; ``k`` defaults to (and may not exceed) the ``k`` kept."""
        if checkpoint is not None:
            raise ValueError("a streaming top-k keeps rankings summed over checkpoints only; compute a full "
                             "InfluenceResult for per-checkpoint rankings")
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.k:
            raise ValueError(f"k must be an int in [1, {self.k}] (the k this top-k result kept), got {k!r}")
        _check_index("query", query, self.n_query)
        name = ("tracin" if step is None else "sdi") + ("_opp" if opponents else "")
        where = (query,) if step is None else (query, _check_index("step", step, self.n_steps))
        idx, val = getattr(self, name + "_indices")[where][:k], getattr(self, name + "_scores")[where][:k]
        if not se:
            return TopK(idx, val)
        if getattr(self, name + "_se") is None:
            raise ValueError("this result carries no standard errors: exact scores (sketch_dim=None) have none")
        return TopKWithErrors(idx, val, getattr(self, name + "_se")[where][:k])

    def predicted_relative_error(self, k: int = 10) -> float:
        """As :meth:`InfluenceResult.predicted_relative_error`, from the kept top-``k`` TracIn proponents."""
        if self.tracin_se is None:
            raise ValueError("this result carries no standard errors (exact scores have none)")
        k = min(k, self.k)
        return _median_relative_error(self.tracin_scores[:, :k], self.tracin_se[:, :k])

    @classmethod
    def from_result(cls, res: InfluenceResult, k: int) -> "StreamTopK":
        """The top-k of a full result (identical to what a streaming pass over the same scores keeps)."""
        top = TopKStream(k, res.n_query, res.n_steps)
        top.add(0, res.sdi, res.tracin, res.sdi_se, res.tracin_se)
        return top.result(res.query_losses, dict(res.meta))

    def save(self, path: str | os.PathLike) -> Path:
        """An ``.npz`` of the arrays above plus ``meta`` (a JSON string); ``kind`` = ``"sdi-topk"``."""
        arrays = {k: getattr(self, k).numpy() for k in self.ARRAYS + self.ERRORS if getattr(self, k) is not None}
        return _save_npz(path, arrays, {**self.meta, "kind": "sdi-topk"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StreamTopK":
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in cls.ARRAYS if k not in z.files]
            if missing:
                raise ValueError(f"{path} is not a top-k result file (missing {missing})")
            return cls(**{k: torch.from_numpy(z[k].copy()) for k in cls.ARRAYS + cls.ERRORS if k in z.files},
                       meta=json.loads(str(z["meta"])))


class TopKStream:
    """Running top-k of proponents and opponents, per (query, step) and by TracIn, over blocks of rows.

    ``add(start, sdi, tracin, sdi_se=None, tracin_se=None)`` takes the scores of rows ``start : start + C`` —
    sdi (C, Q, T_query), tracin (C, Q), and for sketched scores their standard errors, same shapes — in
    increasing ``start`` order; ``result()`` gives the :class:`StreamTopK`, whose kept scores carry their errors.
    """

    def __init__(self, k: int, n_query: int, n_steps: int) -> None:
        self.k, self.n_query, self.n_steps = k, n_query, n_steps
        self.best: dict[str, tuple] = {name: (None, None) for name in ("sdi", "sdi_opp", "tracin", "tracin_opp")}
        self.errors: dict[str, torch.Tensor | None] = {name: None for name in self.best}

    def add(self, start: int, sdi: torch.Tensor, tracin: torch.Tensor, sdi_se: torch.Tensor | None = None,
            tracin_se: torch.Tensor | None = None) -> None:
        C, Q, Tq = sdi.shape
        idx = torch.arange(start, start + C)
        as_rows = {"sdi": lambda t: t.permute(1, 2, 0).reshape(Q * Tq, C), "tracin": lambda t: t.T}
        for name, s, se in (("sdi", sdi, sdi_se), ("tracin", tracin, tracin_se)):
            s = as_rows[name](s)
            for key, signed in ((name, s), (name + "_opp", -s)):
                old_idx = self.best[key][1]
                self.best[key] = merge_top_k(*self.best[key], signed, idx, self.k)
                if se is not None:
                    self.errors[key] = _carry_errors(self.best[key][1], start, as_rows[name](se), old_idx,
                                                     self.errors[key])

    def result(self, query_losses: torch.Tensor, meta: dict[str, Any]) -> StreamTopK:
        b, e = self.best, self.errors
        per_step = lambda t: None if t is None else t.reshape(self.n_query, self.n_steps, -1)  # noqa: E731
        return StreamTopK(
            sdi_indices=per_step(b["sdi"][1]), sdi_scores=per_step(b["sdi"][0]),
            sdi_opp_indices=per_step(b["sdi_opp"][1]), sdi_opp_scores=per_step(-b["sdi_opp"][0]),
            tracin_indices=b["tracin"][1], tracin_scores=b["tracin"][0],
            tracin_opp_indices=b["tracin_opp"][1], tracin_opp_scores=-b["tracin_opp"][0],
            query_losses=query_losses, meta=meta, sdi_se=per_step(e["sdi"]), sdi_opp_se=per_step(e["sdi_opp"]),
            tracin_se=e["tracin"], tracin_opp_se=e["tracin_opp"])


def _carry_errors(kept: torch.Tensor, start: int, block_se: torch.Tensor, old_kept: torch.Tensor | None,
                  old_se: torch.Tensor | None) -> torch.Tensor:
    """The standard errors of the indices ``kept`` (R, k) after a merge: from this block (rows ``start`` on,
    ``block_se`` (R, C)) or, for lower indices, from the previous top-k (``old_kept``, ``old_se`` (R, k_old))."""
    from_block = block_se.gather(-1, (kept - start).clamp(0, block_se.shape[-1] - 1))
    if old_kept is None:
        return from_block
    where_old = (old_kept.unsqueeze(-1) == kept.unsqueeze(-2)).int().argmax(-2)    # (R, k): position in old_kept
    return torch.where(kept >= start, from_block, old_se.gather(-1, where_old))
