"""``StepInfluence``: TracIn and Step-Decomposed Influence (SDI) of training examples on queries, any looped model.

The formulas live in :mod:`sdi.scoring`; this module runs the model. For every checkpoint (visited by
:class:`sdi.checkpoints.CheckpointWalk`) it computes the query features once and keeps them, then streams the
training batches: each batch's features are scored against the queries and dropped. With ``store=`` the training
features go to an on-disk :mod:`feature store <sdi.store>` instead (computed once, reused for every query set,
resumable); the call, the batches and the result type stay the same.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from .capture import loop_parameters, normalize_loop
from .checkpoints import CheckpointSpec, CheckpointWalk
from .featurizers import ExactFeaturizer, Featurizer, GroupSpec, SketchFeaturizer
from .features import StepFeatures, batch_features
from .plan import Plan, generic_warning, make_plan
from .progress import progress_bar
from .results import InfluenceResult, StreamTopK, warn_if_sketch_too_small
from .scoring import QueryBlock, ScoreCollector, score_block, self_scores, sum_checkpoints
from .sketch import DEFAULT_SKETCH_DIM

MAX_SKETCH_DIM = 2**24  # m floats per (example, step): 64 MiB each at this width; wider is a typo, not a plan


def as_batches(batches: Any, name: str) -> list:
    """``batches`` as a non-empty list (a DataLoader or generator is read once), or a clear error naming ``name``."""
    if batches is None:
        raise ValueError(f"{name} must be a list of batches, got None")
    if isinstance(batches, (torch.Tensor, dict)):
        raise TypeError(f"{name} must be an iterable of batches (e.g. a list or DataLoader), not a single "
                        f"{type(batches).__name__}; wrap it in a list")
    if not isinstance(batches, Iterable) or isinstance(batches, (str, bytes)):
        raise TypeError(f"{name} must be an iterable of batches (e.g. a list or DataLoader), got "
                        f"{type(batches).__name__}")
    out = batches if isinstance(batches, list) else list(batches)
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
                    "module" (attention / mlp / norm / other kept apart, features (N, T, G, m)), "tensor" (every
                    weight matrix its own block of m, the 1-D parameters one more: the layout to use on wide
                    models, where short per-block FFTs cost less than the weight gradients they replace; see the
                    README's performance section) or a callable parameter name -> group name.

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
        if not isinstance(loop, nn.Module) and not (isinstance(loop, (list, tuple)) and
                                                     all(isinstance(m, nn.Module) for m in loop)):
            raise TypeError(f"loop must be the nn.Module the model calls once per iteration (e.g. model.block) or a "
                            f"list of them, got {loop!r:.80}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) -> (B,) losses, got {loss_fn!r:.80}")
        if sketch_dim is not None and (isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int)
                                       or not 2 <= sketch_dim <= MAX_SKETCH_DIM):
            raise ValueError(f"sketch_dim must be an int in [2, 2**24 = {MAX_SKETCH_DIM}] (or None for exact "
                             f"features), got {sketch_dim!r}")
        self.model = model
        self.loop_modules = normalize_loop(model, loop)
        self.loss_fn = loss_fn
        self.slots, self.leaves = loop_parameters(model, self.loop_modules)
        self.sketch_dim = sketch_dim
        self.seed = seed
        self.groups = groups
        self.progress = progress
        self.featurizer = self._make_featurizer()
        self._plan = make_plan(self.slots, self.leaves)
        self._told: set[str] = set()
        slow = generic_warning(self._plan)
        if slow:
            warnings.warn(slow, stacklevel=2)

    def plan(self) -> Plan:
        """Which module kind computes each parameter's per-example gradient (``print(attr.plan())``: a table)."""
        return self._plan

    def _tell_once(self, key: str, message: str) -> None:
        if key not in self._told:
            self._told.add(key)
            warnings.warn(message, stacklevel=3)

    def _on_steps(self, T: int, without_gradient: list[int]) -> None:
        if without_gradient:
            self._tell_once(f"no-grad {T} {without_gradient}",
                            f"sdi: {len(without_gradient)} of {T} loop iteration(s) ran without gradient (0-based "
                            f"steps {without_gradient}: truncated backprop, no_grad); their SDI is 0")

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
    def stream_features(self, batches: Sequence, loss_fn: Callable | None = None, desc: str = "features",
                        progress: bool | None = None, check: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(features (B, T, *feature_shape), losses (B,))`` of each batch in turn, at the current weights.

        With ``check`` the first batch is checked against autograd (every use of every parameter seen). The check
        costs that batch two weight-gradient GEMMs per layer and step (autograd's and the rebuilt one), so callers
        that make several passes with the same model and loss (one per checkpoint) check the first pass only:
        which parameter uses the hooks see is a property of the code, not of the weights. Every batch must run
        the loop as often as the first.
        """
        loss_fn = self.loss_fn if loss_fn is None else loss_fn
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) -> (B,) losses, got "
                            f"{type(loss_fn).__name__}")
        show = self.progress if progress is None else progress
        T = None
        with _eval_mode(self.model):
            for i, batch in enumerate(progress_bar(batches, show and len(batches) >= 4, desc=desc, leave=False)):
                feats, losses = batch_features(self.model, self.loop_modules, self.leaves, self.featurizer, loss_fn,
                                               batch, T, check=check and i == 0, on_steps=self._on_steps)
                T = feats.shape[1]
                yield feats, losses

    def features(self, batches: Iterable, loss_fn: Callable | None = None, desc: str = "features",
                 check: bool = True) -> StepFeatures:
        """Per-example, per-step features at the model's current weights: ``(N, T, *feature_shape)`` (``check``: as
        in :meth:`stream_features`)."""
        parts = list(self.stream_features(as_batches(batches, "batches"), loss_fn, desc, check=check))
        return StepFeatures(torch.cat([f for f, _ in parts]), torch.cat([l for _, l in parts]), self.fingerprint())

    # -- influence -----------------------------------------------------------------------------------
    def influence(
        self,
        train_batches: Iterable,
        query_batches: Iterable,
        checkpoints: Sequence[CheckpointSpec] | None = None,
        query_loss_fn: Callable | None = None,
        step_matrix: bool = False,
        top_k: int | None = None,
        store: str | os.PathLike | None = None,
        **store_options: Any,
    ) -> InfluenceResult | StreamTopK:
        """TracIn, query- and train-side SDI (and optionally the step x step matrix) over ``checkpoints``.

        Arguments::

            checkpoints:   [(path_or_state_dict, eta), ...] or sdi.Checkpoint objects; None uses the current
                           weights with eta = 1.
            query_loss_fn: loss for the queries if it differs from the training one — e.g. the same loss run
                           with more iterations (functools.partial(loss_fn, n_loops=16)).
            top_k:         return only the k strongest proponents and opponents per (query, step) and by TracIn
                           (a StreamTopK) instead of every score.
            store:         a directory: featurize the training batches into an on-disk feature store there
                           (resumed if it exists; see sdi.featurize.featurize, which takes store_options such as
                           chunk_size and dtype) and score from it, one chunk in memory at a time.

        In memory, training features are streamed batch by batch and never stored; only the query features are
        kept. Both paths return the same numbers (to float rounding) and the same result types.
        """
        train_batches = as_batches(train_batches, "train_batches")
        query_batches = as_batches(query_batches, "query_batches")
        if query_loss_fn is not None and not callable(query_loss_fn):
            raise TypeError(f"query_loss_fn must be callable as loss_fn(model, batch) -> (B,) losses (or None for "
                            f"loss_fn), got {query_loss_fn!r:.80}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if store is not None:
            from .featurize import featurize, query_features  # the store path's own modules, loaded when used

            st = featurize(store, self, train_batches, checkpoints, progress=self.progress, **store_options)
            queries = query_features(self, checkpoints, query_batches, query_loss_fn, store=st)
            return st.top_k(queries, k=top_k, progress=self.progress) if top_k else \
                st.influence(queries, step_matrix=step_matrix, progress=self.progress)
        if store_options:
            raise TypeError(f"influence() got store options {sorted(store_options)} without store=")
        res = self._influence_in_memory(train_batches, query_batches, checkpoints, query_loss_fn, step_matrix)
        return StreamTopK.from_result(res, min(top_k, res.n_train)) if top_k else res

    def _influence_in_memory(self, train_batches, query_batches, checkpoints, query_loss_fn, step_matrix):
        walk = CheckpointWalk(self.model, checkpoints)
        K = len(walk)
        scores = ScoreCollector(K)
        train_losses, query_losses = [], []
        with walk:
            for k, ref in walk:
                # the hooks are checked on the first checkpoint's first batches (query and train side) only
                query = self.features(query_batches, query_loss_fn, desc=f"queries (checkpoint {k + 1}/{K})",
                                      check=k == 0)
                block = QueryBlock.of(query.features)
                start, losses = 0, []
                for feats, l in self.stream_features(train_batches, desc=f"train (checkpoint {k + 1}/{K})",
                                                     check=k == 0):
                    scores.add(k, start, score_block(feats, block, ref.eta, step_matrix=step_matrix,
                                                     sketch_dim=self.sketch_dim))
                    start += len(l)
                    losses.append(l.cpu())
                train_losses.append(torch.cat(losses))
                query_losses.append(query.losses.cpu())
        totals = scores.totals()
        res = InfluenceResult(
            sdi=totals["sdi"], train_sdi=totals["train_sdi"], tracin=totals["tracin"],
            etas=torch.tensor([r.eta for r in walk.refs], dtype=torch.float32),
            train_losses=torch.stack(train_losses), query_losses=torch.stack(query_losses),
            step_matrix=totals["step_matrix"], checkpoint_sdi=totals["checkpoint_sdi"],
            meta={"fingerprint": self.fingerprint(), "sketch_dim": self.sketch_dim, "seed": self.seed,
                  "checkpoints": [r.name for r in walk.refs], "n_params": self.n_params},
            sdi_se=totals["sdi_se"], train_sdi_se=totals["train_sdi_se"], tracin_se=totals["tracin_se"])
        warn_if_sketch_too_small(res, self.sketch_dim, stacklevel=3)
        return res

    def self_influence(self, batches: Iterable, checkpoints: Sequence[CheckpointSpec] | None = None) -> torch.Tensor:
        """Step-resolved self-influence ``sum_k eta_k <grad L(z), phi_t(z)>``: (N, T); ``.sum(-1)`` is TracIn(z, z).

        Large self-influence flags examples the model finds hard or surprising — mislabelled ones among them.
        """
        batches = as_batches(batches, "batches")
        parts = []
        with CheckpointWalk(self.model, checkpoints) as walk:
            for k, ref in walk:
                parts.append(torch.cat([self_scores(f, ref.eta).cpu() for f, _ in
                                        self.stream_features(batches, desc="self-influence", check=k == 0)]))
        return sum_checkpoints(parts)


class _eval_mode:
    """Run a model in eval mode (no dropout) and restore its mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)
