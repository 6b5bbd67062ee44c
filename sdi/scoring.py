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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORES = ("sdi", "tracin", "train_sdi", "step_matrix")


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
                step_matrix: bool = False) -> dict[str, torch.Tensor]:
    """One checkpoint's eta-weighted scores of training examples ``train`` ``(B, T_train, D)`` against ``query``.

    Returns ``sdi`` (B, Q, T_query) and ``tracin`` (B, Q); with ``train_side`` also ``train_sdi`` (B, Q, T_train),
    with ``step_matrix`` also ``step_matrix`` (B, Q, T_train, T_query).
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
