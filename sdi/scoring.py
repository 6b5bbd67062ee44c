"""The one place where features become scores: TracIn, query-side SDI, train-side SDI and the step x step matrix.

With per-step features ``phi_t`` (exact gradients or sketches) at checkpoint ``k`` with weight ``eta_k``::

    TracIn(z, z')      = sum_k eta_k < sum_s phi_s(w_k; z), sum_t phi_t(w_k; z') >
    SDI_t(z, z')       = sum_k eta_k < sum_s phi_s(w_k; z), phi_t(w_k; z') >     query side, sums to TracIn
    SDI^train_s(z, z') = sum_k eta_k < phi_s(w_k; z), sum_t phi_t(w_k; z') >     train side, sums to TracIn
    M_{s,t}(z, z')     = sum_k eta_k < phi_s(w_k; z), phi_t(w_k; z') >           row/column sums give both

``z`` is a training example, ``z'`` a query; ``s`` runs over the training run's iterations (``T_train``), ``t``
over the query's (``T_query``), which may differ (test-time compute). :func:`score_block` computes one
checkpoint's term for a block of training examples; :class:`ScoreCollector` adds the terms of all checkpoints in
checkpoint order, whichever order the blocks arrive in — so the in-memory path (checkpoints outside, batches
inside) and the feature store (chunks outside, checkpoints inside) give the same numbers to the last bit.

**Standard errors of sketched scores.** A CountSketch ``S`` (m buckets, random signs) gives an unbiased inner
product with ``Var <Sx, Sy> = (||x||^2 ||y||^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / m``. The last term is negligible
for gradients spread over many coordinates, and the others can be estimated from the sketches themselves::

    se(<Sx, Sy>)^2 ~= (||Sx||^2 ||Sy||^2 + <Sx, Sy>^2) / m          summed over groups when groups are kept apart

(the TensorSketch of a matrix gradient is a CountSketch with product hashes; its variance is close to this for
sums of many outer products — tests/test_hf_models.py measures it over many seeds). Every checkpoint uses the
same sketch, so the errors of the K terms are correlated; the reported standard error of the sum is the sum of the
per-checkpoint ones, the value for perfectly correlated terms and an upper bound otherwise (exact for K = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORES = ("sdi", "tracin", "train_sdi", "step_matrix", "sdi_se", "tracin_se", "train_sdi_se")


@dataclass
class QueryBlock:
    """The query features of one checkpoint, ready for scoring.

    features: (Q, T_query, D) float32;  total: (Q, D) = features.sum(1), the feature of the full gradient.
    """

    features: torch.Tensor
    total: torch.Tensor

    @classmethod
    def of(cls, features: torch.Tensor) -> "QueryBlock":
        """From features ``(Q, T_query, *feature_shape)``."""
        f = features.detach().float().flatten(2)
        return cls(f, f.sum(1))


def score_block(train: torch.Tensor, query: QueryBlock, eta: float, train_side: bool = True,
                step_matrix: bool = False, sketch_dim: int | None = None) -> dict[str, torch.Tensor]:
    """One checkpoint's eta-weighted scores of training examples ``train`` ``(B, T_train, D)`` against ``query``.

    Returns ``sdi`` (B, Q, T_query) and ``tracin`` (B, Q); with ``train_side`` also ``train_sdi`` (B, Q, T_train),
    with ``step_matrix`` also ``step_matrix`` (B, Q, T_train, T_query). With ``sketch_dim`` (sketched features,
    ``D = G * sketch_dim``) also the standard errors ``sdi_se``, ``tracin_se`` (and ``train_sdi_se``), same shapes.
    """
    train = train.flatten(2)
    total = train.sum(1)                                                         # (B, D)
    Q, Tq, D = query.features.shape
    if train.shape[-1] != D:
        raise ValueError(f"train features have D={train.shape[-1]} but query features D={D}; they were made by "
                         "different featurizers")
    out = {"sdi": eta * (total @ query.features.reshape(Q * Tq, D).T).view(-1, Q, Tq),
           "tracin": eta * (total @ query.total.T)}
    if train_side:
        out["train_sdi"] = eta * torch.einsum("bsd,qd->bqs", train, query.total)
    if step_matrix:
        out["step_matrix"] = eta * torch.einsum("bsd,qtd->bqst", train, query.features)
    if sketch_dim is not None:
        out.update(standard_errors(train, query, eta, sketch_dim, out, train_side))
    return out


def standard_errors(train: torch.Tensor, query: QueryBlock, eta: float, m: int, scores: dict[str, torch.Tensor],
                    train_side: bool) -> dict[str, torch.Tensor]:
    """``{score + "_se": ...}``: the estimated standard error of each sketched score (see the module docstring).

    train: (B, T_train, G * m); scores: the eta-weighted scores of :func:`score_block`.
    """
    D = train.shape[-1]
    if D % m:
        raise ValueError(f"features of width {D} are not made of sketches of width sketch_dim={m}")
    G = D // m
    tr = train.reshape(*train.shape[:2], G, m)
    tot = tr.sum(1)                                                            # (B, G, m)
    qf = query.features.reshape(*query.features.shape[:2], G, m)               # (Q, Tq, G, m)
    qt = query.total.reshape(-1, G, m)                                         # (Q, G, m)
    n_tot, n_qf, n_qt = tot.square().sum(-1), qf.square().sum(-1), qt.square().sum(-1)

    def group_sq(name: str, spec: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum over groups of the squared per-group inner product (the score itself when G == 1)."""
        if G == 1:
            return (scores[name] / eta).square() if eta else torch.zeros_like(scores[name])
        return torch.einsum(spec, x, y).square().sum(-1)

    out = {}
    var = torch.einsum("bg,qtg->bqt", n_tot, n_qf) + group_sq("sdi", "bgd,qtgd->bqtg", tot, qf)
    out["sdi_se"] = abs(eta) * (var.clamp_min(0) / m).sqrt()
    var = torch.einsum("bg,qg->bq", n_tot, n_qt) + group_sq("tracin", "bgd,qgd->bqg", tot, qt)
    out["tracin_se"] = abs(eta) * (var.clamp_min(0) / m).sqrt()
    if train_side:
        var = torch.einsum("bsg,qg->bqs", tr.square().sum(-1), n_qt) + \
            group_sq("train_sdi", "bsgd,qgd->bqsg", tr, qt)
        out["train_sdi_se"] = abs(eta) * (var.clamp_min(0) / m).sqrt()
    return out


def self_scores(features: torch.Tensor, eta: float) -> torch.Tensor:
    """Step-resolved self-influence at one checkpoint: ``eta <sum_s phi_s(z), phi_t(z)>`` -> (N, T)."""
    f = features.detach().float().flatten(2)
    return eta * torch.einsum("nd,ntd->nt", f.sum(1), f)


def sum_checkpoints(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts[0] + parts[1] + ...`` in checkpoint order (one fixed order of float additions everywhere)."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


class ScoreCollector:
    """Gathers :func:`score_block` outputs of K checkpoints for N training examples, in any arrival order.

    ``add(k, start, block)`` files checkpoint ``k``'s block for rows ``start : start + B``; ``totals()`` returns
    every score summed over checkpoints (``(N, ...)``) plus ``checkpoint_sdi`` (K, N, Q, T_query).
    """

    def __init__(self, n_checkpoints: int) -> None:
        self.parts: list[dict[int, dict[str, torch.Tensor]]] = [{} for _ in range(n_checkpoints)]

    def add(self, k: int, start: int, block: dict[str, torch.Tensor]) -> None:
        self.parts[k][start] = {name: value.cpu() for name, value in block.items()}

    def _rows(self, k: int, name: str) -> torch.Tensor:
        return torch.cat([self.parts[k][start][name] for start in sorted(self.parts[k])])

    def totals(self) -> dict[str, torch.Tensor | None]:
        names = [n for n in SCORES if n in next(iter(self.parts[0].values()))]
        out: dict[str, torch.Tensor | None] = {n: None for n in SCORES}
        per_checkpoint = {n: [self._rows(k, n) for k in range(len(self.parts))] for n in names}
        for n in names:
            out[n] = sum_checkpoints(per_checkpoint[n])
        out["checkpoint_sdi"] = torch.stack(per_checkpoint["sdi"])
        return out
