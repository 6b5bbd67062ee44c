"""TracIn and Step-Decomposed Influence (SDI) across checkpoints.

With per-step features ``phi_t`` (exact gradients or sketches) and checkpoint weights ``eta_k``::

    TracIn(z, z')      = sum_k eta_k < sum_s phi_s(w_k; z), sum_t phi_t(w_k; z') >
    SDI_t(z, z')       = sum_k eta_k < sum_s phi_s(w_k; z), phi_t(w_k; z') >     query side, sums to TracIn
    SDI^train_s(z, z') = sum_k eta_k < phi_s(w_k; z), sum_t phi_t(w_k; z') >     train side, sums to TracIn
    M_{s,t}(z, z')     = sum_k eta_k < phi_s(w_k; z), phi_t(w_k; z') >           row/column sums give both

``z`` is a training example, ``z'`` a query; ``s`` runs over the training run's iterations (``T_train``),
``t`` over the query's (``T_query``), which may differ (test-time compute).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn

from .capture import loop_parameters, normalize_loop
from .features import ExactFeaturizer, Featurizer, StepFeatures, batch_features
from .files import atomic_write
from .sketch import DEFAULT_SKETCH_DIM, GroupSpec, SketchFeaturizer
from .train import Checkpoint, load_checkpoint, progress_bar

CheckpointSpec = Any  # (path | state_dict | Checkpoint, eta) or a Checkpoint (eta = its lr)


class TopK(NamedTuple):
    """``indices`` (k,) of training examples and their ``scores`` (k,), strongest first."""

    indices: torch.Tensor
    scores: torch.Tensor


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

    Step indices are 0-based positions on the last axis: ``step=s`` is iteration ``t = s + 1``.
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
        self._check_index("query", query, self.n_query)
        if checkpoint is not None:
            if self.checkpoint_sdi is None:
                raise ValueError("this result kept no per-checkpoint scores (influence(..., keep_checkpoints=True))")
            self._check_index("checkpoint", checkpoint, self.checkpoint_sdi.shape[0])
            per_step = self.checkpoint_sdi[checkpoint, :, query]
        else:
            per_step = self.sdi[:, query]
        if step is None:
            return per_step.sum(-1) if checkpoint is not None else self.tracin[:, query]
        self._check_index("step", step, self.n_steps)
        return per_step[:, step]

    def top_k(self, query: int, step: int | None = None, k: int = 10, opponents: bool = False,
              checkpoint: int | None = None) -> TopK:
        """The ``k`` strongest proponents (largest positive scores) or ``opponents`` (most negative).

        ``step`` is a 0-based iteration index (``-1`` = the last); ``None`` ranks by TracIn.
        """
        if not isinstance(k, int) or not 1 <= k <= self.n_train:
            raise ValueError(f"k must be an int in [1, N_train={self.n_train}], got {k!r}")
        s = self.scores(query, step, checkpoint)
        vals, idx = torch.topk(-s if opponents else s, k)
        return TopK(idx, -vals if opponents else vals)

    def conservation_error(self) -> float:
        """``max |sum_t SDI_t - TracIn| / max |TracIn|`` (0 up to rounding)."""
        scale = self.tracin.abs().max().clamp_min(1e-30)
        return float(torch.maximum((self.sdi.sum(-1) - self.tracin).abs().max(),
                                   (self.train_sdi.sum(-1) - self.tracin).abs().max()) / scale)

    @staticmethod
    def _check_index(name: str, value: int, size: int) -> None:
        if not isinstance(value, int) or not -size <= value < size:
            raise IndexError(f"{name} must be an int in [{-size}, {size}), got {value!r}")

    # -- files ---------------------------------------------------------------------------------------
    ARRAYS = ("sdi", "train_sdi", "tracin", "etas", "train_losses", "query_losses", "step_matrix", "checkpoint_sdi")

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (float32 arrays named as the fields + ``meta``, a JSON string), atomically.

        Read it back with :meth:`load` or plain ``numpy.load(path)``; no pickles involved.
        """
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"result files end in .npz, got {path}")
        arrays = {k: getattr(self, k).detach().cpu().numpy() for k in self.ARRAYS if getattr(self, k) is not None}
        arrays["meta"] = np.array(json.dumps(self.meta))
        return atomic_write(path, lambda f: np.savez(f, **arrays))

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


def _as_batches(batches: Iterable, name: str) -> list:
    if batches is None:
        raise ValueError(f"{name} must be a list of batches, got None")
    if isinstance(batches, (torch.Tensor, dict)):
        raise TypeError(f"{name} must be an iterable of batches (e.g. a list or DataLoader), not a single "
                        f"{type(batches).__name__}; wrap it in a list")
    out = batches if isinstance(batches, (list, tuple)) else list(batches)
    if len(out) == 0:
        raise ValueError(f"{name} is empty: pass at least one batch")
    return out


class StepInfluence:
    """Step-resolved influence of training examples on queries for any looped ``nn.Module``.

    Arguments::

        model:      the model; its weights are restored after every call.
        loop:       the module(s) the model calls once per iteration (e.g. model.block); their trainable
                    parameters are the ones attributed.
        loss_fn:    loss_fn(model, batch) -> (B,) per-example losses.
        sketch_dim: m, the width of the TensorSketch features (default sdi.sketch.DEFAULT_SKETCH_DIM),
                    or None for exact per-example gradients (P floats per example and step; for validation).
        seed:       the sketch's seed; train and query features must share it.
        groups:     sketched features only: None (one sketch of all parameters, features (N, T, m)),
                    "module" (attention / mlp / norm / other kept apart, features (N, T, G, m)) or a callable
                    parameter name -> group name.

    Example::

        attr = StepInfluence(model, loop=model.block, loss_fn=loss_fn)
        res = attr.influence(train_batches, query_batches, checkpoints=[(path, eta), ...])
        res.sdi            # (N_train, N_query, T_query)
    """

    def __init__(self, model: nn.Module, loop: nn.Module | Sequence[nn.Module], loss_fn: Callable,
                 sketch_dim: int | None = DEFAULT_SKETCH_DIM, seed: int = 0, progress: bool = True,
                 groups: GroupSpec = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> (B,) losses")
        self.model = model
        self.loop_modules = normalize_loop(model, loop)
        self.loss_fn = loss_fn
        self.slots, self.leaves = loop_parameters(model, self.loop_modules)
        self.sketch_dim = sketch_dim
        self.seed = seed
        self.groups = groups
        self.progress = progress
        self.featurizer = self._make_featurizer()

    def _make_featurizer(self) -> Featurizer:
        if self.sketch_dim is None:
            if self.groups is not None:
                raise ValueError("groups applies to sketched features only; pass sketch_dim=m or groups=None")
            return ExactFeaturizer(self.slots)
        return SketchFeaturizer(self.slots, self.sketch_dim, seed=self.seed, groups=self.groups, leaves=self.leaves)

    @property
    def n_params(self) -> int:
        """Number of attributed parameters ``P``."""
        return sum(s.numel for s in self.slots)

    @property
    def param_names(self) -> list[str]:
        return [s.name for s in self.slots]

    def fingerprint(self) -> dict[str, Any]:
        return self.featurizer.fingerprint()

    # -- features ------------------------------------------------------------------------------------
    def features(self, batches: Iterable, loss_fn: Callable | None = None, desc: str = "features") -> StepFeatures:
        """Per-example, per-step features at the model's current weights: ``(N, T, D)``."""
        batches = _as_batches(batches, "batches")
        loss_fn = loss_fn or self.loss_fn
        feats, losses, T = [], [], None
        with _eval_mode(self.model):
            for i, batch in enumerate(progress_bar(batches, self.progress and len(batches) >= 4, desc=desc,
                                                leave=False)):
                f, l = batch_features(self.model, self.loop_modules, self.leaves, self.featurizer, loss_fn, batch, T,
                                      check=i == 0)
                T = f.shape[1]
                feats.append(f)
                losses.append(l)
        return StepFeatures(torch.cat(feats), torch.cat(losses), self.fingerprint())

    # -- influence -----------------------------------------------------------------------------------
    def influence(
        self,
        train_batches: Iterable,
        query_batches: Iterable,
        checkpoints: Sequence[CheckpointSpec] | None = None,
        query_loss_fn: Callable | None = None,
        step_matrix: bool = False,
        keep_checkpoints: bool = True,
    ) -> InfluenceResult:
        """TracIn, query- and train-side SDI (and optionally the step x step matrix) over ``checkpoints``.

        Arguments::

            checkpoints:   [(path_or_state_dict, eta), ...] or sdi.train.Checkpoint objects;
                           None uses the current weights with eta = 1.
            query_loss_fn: loss for the queries if it differs from the training one — e.g. the same loss run
                           with more iterations (functools.partial(loss_fn, n_loops=16)).

        Train features are streamed batch by batch and never stored; only the query features are kept.
        """
        train_batches = _as_batches(train_batches, "train_batches")
        query_batches = _as_batches(query_batches, "query_batches")
        ckpts = self._normalize_checkpoints(checkpoints)
        original = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        acc: dict[str, Any] = {}
        try:
            for k, (state, eta, label) in enumerate(ckpts):
                self._load(state, label)
                part = self._one_checkpoint(train_batches, query_batches, query_loss_fn, step_matrix, eta, k, len(ckpts))
                for name, value in part.items():
                    acc.setdefault(name, []).append(value)
        finally:
            self.model.load_state_dict(original)
        checkpoint_sdi = torch.stack(acc["sdi"])
        return InfluenceResult(
            sdi=checkpoint_sdi.sum(0),
            train_sdi=torch.stack(acc["train_sdi"]).sum(0),
            tracin=torch.stack(acc["tracin"]).sum(0),
            etas=torch.tensor([eta for _, eta, _ in ckpts], dtype=torch.float32),
            train_losses=torch.stack(acc["train_losses"]),
            query_losses=torch.stack(acc["query_losses"]),
            step_matrix=torch.stack(acc["step_matrix"]).sum(0) if step_matrix else None,
            checkpoint_sdi=checkpoint_sdi if keep_checkpoints else None,
            meta={
                "fingerprint": self.fingerprint(),
                "sketch_dim": self.sketch_dim,
                "seed": self.seed,
                "checkpoints": [label for _, _, label in ckpts],
                "n_params": self.n_params,
            },
        )

    def _one_checkpoint(self, train_batches, query_batches, query_loss_fn, step_matrix, eta, k, K) -> dict:
        query = self.features(query_batches, query_loss_fn, desc=f"queries (checkpoint {k + 1}/{K})")
        Q = query.features.flatten(2)                  # (Nq, Tq, D)
        Q_total = Q.sum(1)                             # (Nq, D)
        out = {name: [] for name in ("sdi", "train_sdi", "tracin", "train_losses", "step_matrix")}
        T = None
        with _eval_mode(self.model):
            bar = progress_bar(train_batches, self.progress, desc=f"train (checkpoint {k + 1}/{K})", leave=False)
            for i, batch in enumerate(bar):
                feats, losses = batch_features(self.model, self.loop_modules, self.leaves, self.featurizer,
                                               self.loss_fn, batch, T, check=i == 0)
                T = feats.shape[1]
                F_ = feats.flatten(2)                  # (B, Tt, D)
                F_total = F_.sum(1)                    # (B, D)
                out["sdi"].append(eta * torch.einsum("bd,qtd->bqt", F_total, Q))
                out["train_sdi"].append(eta * torch.einsum("bsd,qd->bqs", F_, Q_total))
                out["tracin"].append(eta * F_total @ Q_total.T)
                out["train_losses"].append(losses)
                if step_matrix:
                    out["step_matrix"].append(eta * torch.einsum("bsd,qtd->bqst", F_, Q))
        result = {name: torch.cat(v).cpu() for name, v in out.items() if v}
        result["query_losses"] = query.losses.cpu()
        return result

    def self_influence(self, batches: Iterable, checkpoints: Sequence[CheckpointSpec] | None = None) -> torch.Tensor:
        """Step-resolved self-influence ``sum_k eta_k <grad L(z), phi_t(z)>``: (N, T); ``.sum(-1)`` is TracIn(z, z).

        Large self-influence flags examples the model finds hard or surprising — mislabelled ones among them.
        """
        batches = _as_batches(batches, "batches")
        ckpts = self._normalize_checkpoints(checkpoints)
        original = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        total = None
        try:
            for state, eta, label in ckpts:
                self._load(state, label)
                f = self.features(batches, desc="self-influence").features.flatten(2)  # (N, T, D)
                part = eta * torch.einsum("nd,ntd->nt", f.sum(1), f)
                total = part if total is None else total + part
        finally:
            self.model.load_state_dict(original)
        return total.cpu()

    # -- checkpoints ---------------------------------------------------------------------------------
    def _normalize_checkpoints(self, checkpoints) -> list[tuple[Any, float, str]]:
        if checkpoints is None:
            return [(None, 1.0, "current weights")]
        if isinstance(checkpoints, (str, os.PathLike, dict, Checkpoint)):
            raise TypeError("checkpoints must be a list of (path_or_state_dict, eta) pairs or Checkpoint objects")
        out = []
        for i, spec in enumerate(checkpoints):
            if isinstance(spec, Checkpoint):
                state, eta = (spec.path if spec.path is not None else spec.state_dict), spec.lr
            elif isinstance(spec, (tuple, list)) and len(spec) == 2:
                state, eta = spec
            else:
                raise TypeError(f"checkpoints[{i}] must be a (path_or_state_dict, eta) pair or a Checkpoint, "
                                f"got {type(spec).__name__}")
            if not isinstance(eta, (int, float)) or not np.isfinite(eta):
                raise ValueError(f"checkpoints[{i}]: eta must be a finite number, got {eta!r}")
            label = str(state) if isinstance(state, (str, os.PathLike)) else f"state_dict {i}"
            out.append((state, float(eta), label))
        if not out:
            raise ValueError("checkpoints is empty: pass None to use the current weights")
        return out

    def _load(self, state: Any, label: str) -> None:
        if state is None:
            return
        if isinstance(state, (str, os.PathLike)):
            state = load_checkpoint(state)["state_dict"]
        if not isinstance(state, dict):
            raise TypeError(f"checkpoint {label}: expected a path or a state_dict, got {type(state).__name__}")
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"checkpoint {label} does not fit the model: {e}") from None


class _eval_mode:
    """Run a model in eval mode (no dropout) and restore its mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)
