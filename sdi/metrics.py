"""How two attributions agree, and how well scores find what they should: one definition each.

Score tensors put the **training examples on axis 0** — an SDI tensor ``(N, Q, T)``, TracIn ``(N, Q)``, a vector
``(N,)`` — and the per-column metrics return one value per remaining index (per (query, step) for SDI); take
``.mean()`` for the averages the book and the benchmarks report::

    relative_error(est, exact)        ||est - exact||_F / ||exact||_F over the whole tensor        -> float
    pearson(est, exact)               correlation over the N training examples, per column         -> (Q, T)
    spearman(est, exact)              the same on average ranks (ties share their mean rank)       -> (Q, T)
    top_k_overlap(est, exact, k)      |top-k(est) & top-k(exact)| / k per column (stable top-k)    -> (Q, T)
    precision_at_k(scores, pos, k)    fraction of positives among the k highest scores             -> float
    auc(scores, pos)                  P(random positive scores above random negative), ties 1/2    -> float

Every chapter, benchmark and test imports these, so a number in the README and the same number in the book
mean the same thing.
"""

from __future__ import annotations

import torch

from .results import stable_top_k


def _pair(est: torch.Tensor, exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    est, exact = torch.as_tensor(est).detach().double().cpu(), torch.as_tensor(exact).detach().double().cpu()
    if est.shape != exact.shape:
        raise ValueError(f"the two score tensors must have the same shape, got {tuple(est.shape)} and "
                         f"{tuple(exact.shape)}")
    return est, exact


def relative_error(est: torch.Tensor, exact: torch.Tensor) -> float:
    """``||est - exact||_F / ||exact||_F`` over the whole tensor (inf when ``exact`` is all zeros)."""
    est, exact = _pair(est, exact)
    norm = exact.norm()
    return float((est - exact).norm() / norm) if norm > 0 else float("inf")


def pearson(est: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over axis 0 (the training examples), one value per remaining index: ``shape[1:]``."""
    est, exact = _pair(est, exact)
    a, b = est - est.mean(0), exact - exact.mean(0)
    return ((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))).float()


def average_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N along axis 0, tied scores sharing the mean of their ranks (float64, same shape)."""
    x = torch.as_tensor(scores).detach().double().cpu()
    flat = x.reshape(x.shape[0], -1)
    out = torch.empty_like(flat)
    for j in range(flat.shape[1]):
        col = flat[:, j]
        values, group = torch.unique(col, return_inverse=True)
        order = torch.argsort(col, stable=True)
        ranks = torch.empty_like(col)
        ranks[order] = torch.arange(1, len(col) + 1, dtype=torch.float64)
        sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, group, ranks)
        counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, group, torch.ones_like(ranks))
        out[:, j] = (sums / counts)[group]
    return out.reshape(x.shape)


def spearman(est: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation over axis 0 (ties get mean ranks): ``shape[1:]``."""
    est, exact = _pair(est, exact)
    return pearson(average_ranks(est), average_ranks(exact))


def top_k_overlap(est: torch.Tensor, exact: torch.Tensor, k: int = 10) -> torch.Tensor:
    """``|top-k(est) & top-k(exact)| / k`` along axis 0, per remaining index: ``shape[1:]``.

    Top-k is the library's ranking rule (:func:`sdi.results.stable_top_k`: largest first, ties to the lower index).
    """
    est, exact = _pair(est, exact)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= est.shape[0]:
        raise ValueError(f"k must be an int in [1, N={est.shape[0]}], got {k!r}")
    top_est = stable_top_k(est.movedim(0, -1), k)[1]                       # (..., k)
    top_exact = stable_top_k(exact.movedim(0, -1), k)[1]
    shared = (top_est.unsqueeze(-1) == top_exact.unsqueeze(-2)).any(-1)    # (..., k)
    return shared.float().mean(-1)


def _positives(scores: torch.Tensor, positive) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.as_tensor(scores).detach().double().cpu().reshape(-1)
    positive = torch.as_tensor(positive).cpu()
    if positive.dtype != torch.bool:       # indices of the positives
        mask = torch.zeros(len(scores), dtype=torch.bool)
        mask[positive.long().reshape(-1)] = True
        positive = mask
    if positive.shape != scores.shape:
        raise ValueError(f"positive must be a bool mask of shape {tuple(scores.shape)} or a list of indices")
    return scores, positive


def precision_at_k(scores: torch.Tensor, positive, k: int) -> float:
    """Fraction of positives among the ``k`` highest scores (ties to the lower index). ``positive``: mask or indices."""
    scores, positive = _positives(scores, positive)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(scores):
        raise ValueError(f"k must be an int in [1, {len(scores)}], got {k!r}")
    return float(positive[stable_top_k(scores, k)[1]].double().mean())


def auc(scores: torch.Tensor, positive) -> float:
    """ROC AUC: P(score of a random positive > score of a random negative), ties counting 1/2 (Mann-Whitney)."""
    scores, positive = _positives(scores, positive)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auc needs at least one positive and one negative example")
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
