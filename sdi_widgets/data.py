"""What the explorer shows, computed once: validated texts and the top-k ranking of every (view, query, step, sign).

A *view* is the sum over checkpoints (view 0, ``result.sdi``) or one checkpoint's eta-weighted share
(views 1..K, ``result.checkpoint_sdi[k]``) when the result kept more than one checkpoint. A *sign* is
``"proponents"`` (largest positive SDI_t first) or ``"opponents"`` (most negative first). Steps are 0-based
indices on the result's last axis; the explorer shows them as iterations ``t = step + 1``.

The top-k of every (view, query, step, sign) is precomputed here with one stable sort over all of them at
once (ties go to the lower training index, as in :meth:`sdi.InfluenceResult.top_k`); the previous-iteration
ranks (rank movement) take one sort per (view, query), done when that query is first shown. A slider move only
looks things up.

Ranks are competition ranks: examples with equal scores share a rank (1 + the number strictly stronger), so
tied examples never show a movement between them. Copies of one training example (the same text and label,
hence the same gradients and scores) are shown once, as one row with a copy count: the rankings are over
distinct examples, represented by their first copy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sdi.results import InfluenceResult, stable_top_k

SIGNS = ("proponents", "opponents")


@dataclass(frozen=True)
class Ranking:
    """The top-k training examples of one (view, query, step, sign), strongest first.

    Fields::

        indices:    (k,) training-example indices (ties in index order)
        scores:     (k,) their SDI_t
        ranks:      (k,) 1-based competition rank now: 1 + the number of examples strictly stronger (ties share it)
        prev_ranks: (k,) the same rank at the previous iteration (same sign); 0 at the first iteration
    """

    indices: torch.Tensor
    scores: torch.Tensor
    ranks: torch.Tensor
    prev_ranks: torch.Tensor

    @property
    def movement(self) -> torch.Tensor:
        """(k,) places gained since the previous iteration (positive = moved up); 0 at the first iteration."""
        return torch.where(self.prev_ranks > 0, self.prev_ranks - self.ranks, torch.zeros_like(self.ranks))


def load_result(result: InfluenceResult | str | os.PathLike) -> InfluenceResult:
    """An :class:`~sdi.InfluenceResult`, or one read from a ``.npz`` written by ``InfluenceResult.save``."""
    if isinstance(result, InfluenceResult):
        return result
    if isinstance(result, (str, os.PathLike)):
        return InfluenceResult.load(Path(result))
    raise TypeError(f"result must be an sdi.InfluenceResult or the path of a saved one (.npz), "
                    f"got {type(result).__name__}")


class ExplorerData:
    """Validated inputs plus precomputed rankings; shared by :class:`InfluenceExplorer` and the static page.

    Arguments::

        result:        an InfluenceResult (sdi (N, Q, T)) or the path of a saved one
        train_texts:   N readable training examples (e.g. prompts, or data.texts())
        query_texts:   Q readable queries
        k:             how many examples each ranking holds, 1 <= k <= N (at most the number of distinct ones)
        train_labels:  optional N answers shown next to the training texts
        flipped:       optional indices of training examples whose label was corrupted (they get a marker)
        query_answers: optional (Q, T) nested list: the model's answer to each query after each iteration
        query_truth:   optional Q right answers; with query_answers each answer is marked right or wrong
    """

    def __init__(
        self,
        result: InfluenceResult | str | os.PathLike,
        train_texts: Sequence[str],
        query_texts: Sequence[str],
        k: int = 10,
        *,
        train_labels: Sequence[str] | None = None,
        flipped: Sequence[int] | torch.Tensor | None = None,
        query_answers: Sequence[Sequence[str]] | None = None,
        query_truth: Sequence[str] | None = None,
    ) -> None:
        self.result = load_result(result)
        sdi = _check_scores(self.result)
        N, Q, T = sdi.shape
        self.n_train, self.n_query, self.n_steps = N, Q, T
        self.train_texts = _check_strings("train_texts", train_texts, N, "N_train (result.sdi.shape[0])")
        self.query_texts = _check_strings("query_texts", query_texts, Q, "N_query (result.sdi.shape[1])")
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int in [1, N_train={N}], got {type(k).__name__} {k!r}")
        if not 1 <= k <= N:
            raise ValueError(f"k must be an int in [1, N_train={N}], got {k!r}")
        self.train_labels = (None if train_labels is None
                             else _check_strings("train_labels", train_labels, N, "N_train"))
        self.flipped = _check_flipped(flipped, N)
        self.query_answers = _check_answers(query_answers, Q, T)
        self.query_truth = None if query_truth is None else _check_strings("query_truth", query_truth, Q, "N_query")

        self.view_names, views, tracins = _views(self.result, sdi)
        self.n_views = len(views)
        self._views = views          # each (N, Q, T)
        self._tracin = tracins       # each (N, Q)
        # copies[i]: how many training examples example i stands for (0 for a later copy, which is never shown)
        self.copies = _copies(self.train_texts, self.train_labels, views)
        self._shown = torch.nonzero(self.copies > 0).squeeze(1)  # (N_distinct,) the examples that can be ranked
        self.k = min(k, len(self._shown))
        top = [_top_k(v[self._shown], self.k) for v in views]
        self._top_idx = torch.stack([self._shown[t[0]] for t in top])   # (V, 2, Q, T, k)
        self._top_val = torch.stack([t[1] for t in top])                # (V, 2, Q, T, k)
        self._ranks = _tie_ranks(self._top_val)                          # (V, 2, Q, T, k)
        self._prev_rank: dict[tuple[int, int], torch.Tensor] = {}  # (view, query) -> (2, T, k), on first use

    # -- look-ups ------------------------------------------------------------------------------------
    def ranking(self, view: int, query: int, step: int, sign: str) -> Ranking:
        """The precomputed top-k of ``query`` at 0-based ``step`` in ``view`` for ``sign``."""
        s = self.sign_index(sign)
        return Ranking(self._top_idx[view, s, query, step], self._top_val[view, s, query, step],
                       self._ranks[view, s, query, step], self._previous(view, query)[s, step])

    def scores(self, view: int, query: int) -> torch.Tensor:
        """(N, T) SDI_t of every training example on ``query`` in ``view``."""
        return self._views[view][:, query]

    def tracin(self, view: int, query: int) -> torch.Tensor:
        """(N,) TracIn (the sum over iterations) of every training example on ``query`` in ``view``."""
        return self._tracin[view][:, query]

    def top_indices(self, view: int, query: int, sign: str) -> torch.Tensor:
        """(T, k) the top-k indices at every step."""
        return self._top_idx[view, self.sign_index(sign), query]

    def ranks(self, view: int, query: int, sign: str) -> torch.Tensor:
        """(T, k) competition ranks of the top-k at every step (tied scores share a rank)."""
        return self._ranks[view, self.sign_index(sign), query]

    def prev_ranks(self, view: int, query: int, sign: str) -> torch.Tensor:
        """(T, k) previous-iteration ranks of the top-k at every step (row 0 is all zeros)."""
        return self._previous(view, query)[self.sign_index(sign)]

    def _previous(self, view: int, query: int) -> torch.Tensor:
        """(2, T, k) previous-iteration ranks of (view, query), computed on first use (one sort of (T, N))."""
        key = (view, query)
        if key not in self._prev_rank:
            self._prev_rank[key] = _previous_ranks(self._views[view][:, query], self._top_idx[view, :, query],
                                                   self._shown)
        return self._prev_rank[key]

    def heat_rows(self, view: int, query: int, sign: str, max_rows: int = 24) -> list[int]:
        """Training examples that reach the top-k at some iteration, in order of first appearance (at most ``max_rows``)."""
        rows: dict[int, None] = {}
        for i in self.top_indices(view, query, sign).reshape(-1).tolist():  # step-major, rank-minor
            rows.setdefault(i, None)
            if len(rows) == max_rows:
                break
        return list(rows)

    def train_text(self, i: int) -> str:
        """Training example ``i``'s text, with its copy count when the data holds it more than once."""
        n = int(self.copies[i])
        return self.train_texts[i] if n <= 1 else f"{self.train_texts[i]} ×{n}"

    def is_right(self, query: int, step: int) -> bool | None:
        """Whether the model's answer after iteration ``step + 1`` is right; None when unknown."""
        if self.query_answers is None or self.query_truth is None:
            return None
        return self.query_answers[query][step] == self.query_truth[query]

    def query_label(self, query: int) -> str:
        """One line for the prompt picker: index, text, final answer and whether it is right."""
        label = f"{query}: {self.query_texts[query]}"
        if self.query_answers is not None:
            final = self.query_answers[query][-1]
            mark = {True: " ✓", False: " ✗", None: ""}[self.is_right(query, self.n_steps - 1)]
            label += f"  → {final}{mark}"
        return label

    @staticmethod
    def sign_index(sign: str) -> int:
        if sign not in SIGNS:
            raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
        return SIGNS.index(sign)


# ---------------------------------------------------------------------------------------- precompute

def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores`` (N, Q, T) -> indices and values of the k strongest of each sign, each (2, Q, T, k).

    Ties go to the lower index (the library's :func:`sdi.results.stable_top_k`), so the table equals ``top_k``.
    """
    S = scores.permute(1, 2, 0).contiguous()              # (Q, T, N): rank along the last axis
    pro_val, pro_idx = stable_top_k(S, k)
    opp_val, opp_idx = stable_top_k(-S, k)
    return torch.stack([pro_idx, opp_idx]), torch.stack([pro_val, -opp_val])


def _tie_ranks(top_val: torch.Tensor) -> torch.Tensor:
    """``top_val`` (..., 2, Q, T, k), strongest first -> (same shape) 1 + the number strictly stronger.

    Everything stronger than a top-k member is itself in the top-k, so counting within the k is exact.
    """
    pro, opp = top_val.unbind(-4)
    ranks = [1 + (v.unsqueeze(-2) > v.unsqueeze(-1)).sum(-1) if s == 0 else
             1 + (v.unsqueeze(-2) < v.unsqueeze(-1)).sum(-1) for s, v in enumerate((pro, opp))]
    return torch.stack(ranks, dim=-4)


def _copies(texts: list[str], labels: list[str] | None, views: list[torch.Tensor]) -> torch.Tensor:
    """(N,) long: for the first copy of each distinct (text, label), the number of copies; 0 for later copies.

    Copies of one example have the same gradients, hence the same scores (up to rounding); one whose scores
    differ anyway (e.g. texts that do not identify the inputs) stays a row of its own.
    """
    N = len(texts)
    counts = torch.ones(N, dtype=torch.long)
    first: dict[tuple[str, str], int] = {}
    for i, key in enumerate(zip(texts, labels if labels is not None else [""] * N)):
        first.setdefault(key, i)
    later = [(i, f) for i, f in ((i, first[key]) for i, key in
                                 enumerate(zip(texts, labels if labels is not None else [""] * N))) if f != i]
    if not later:
        return counts
    rows, reps = torch.tensor([i for i, _ in later]), torch.tensor([f for _, f in later])
    same = torch.ones(len(later), dtype=torch.bool)
    for v in views:   # (N, Q, T): copies must agree everywhere, to float32 rounding of the largest score
        tol = 1e-5 * float(v.abs().max()) + 1e-30
        same &= (v[rows] - v[reps]).abs().flatten(1).amax(1) <= tol
    counts.index_add_(0, reps[same], torch.ones(int(same.sum()), dtype=torch.long))
    counts[rows[same]] = 0
    return counts


def _previous_ranks(scores: torch.Tensor, top_idx: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
    """``scores`` (N, T) of one query, ``top_idx`` (2, T, k) -> (2, T, k) ranks at the previous iteration.

    The rank of an example is 1 + the number of examples strictly stronger (ties share a rank), counted
    among the ``shown`` (distinct) examples, found by binary search in one sorted copy of their scores;
    row 0 (no previous iteration) is 0.
    """
    T = scores.shape[1]
    n = len(shown)
    prev = torch.zeros_like(top_idx)
    if T == 1:
        return prev
    before = scores.T[:-1].contiguous()                   # (T-1, N): iterations 1..T-1
    ascending = torch.from_numpy(np.sort(before[:, shown].numpy(), axis=-1))  # NumPy's sort is ~10x faster here
    for s, idx in enumerate(top_idx):
        values = before.gather(-1, idx[1:])               # the top-k of iteration t, one iteration earlier
        if s == 0:   # proponents: stronger = larger
            stronger = n - torch.searchsorted(ascending, values, right=True)
        else:        # opponents: stronger = smaller
            stronger = torch.searchsorted(ascending, values, right=False)
        prev[s, 1:] = stronger + 1
    return prev


def _views(result: InfluenceResult, sdi: torch.Tensor) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """Names, SDI tensors (N, Q, T) and TracIn (N, Q) of the summed view and, when K > 1, of each checkpoint."""
    names = ["all checkpoints"]
    views = [sdi]
    tracins = [_float(result.tracin, "result.tracin", sdi.shape[:2])]
    per_ckpt = result.checkpoint_sdi
    if per_ckpt is not None and per_ckpt.shape[0] > 1:
        if tuple(per_ckpt.shape[1:]) != tuple(sdi.shape):
            raise ValueError(f"result.checkpoint_sdi must have shape (K, {', '.join(map(str, sdi.shape))}), "
                             f"got {tuple(per_ckpt.shape)}")
        per_ckpt = _float(per_ckpt, "result.checkpoint_sdi", per_ckpt.shape)
        etas = result.etas.tolist() if result.etas is not None and len(result.etas) == per_ckpt.shape[0] else None
        for c in range(per_ckpt.shape[0]):
            names.append(f"checkpoint {c + 1}" + (f" (η={etas[c]:.3g})" if etas else ""))
            views.append(per_ckpt[c])
            tracins.append(per_ckpt[c].sum(-1))
    return names, views, tracins


def _check_scores(result: InfluenceResult) -> torch.Tensor:
    sdi = result.sdi
    if not isinstance(sdi, torch.Tensor) or sdi.dim() != 3:
        raise ValueError(f"result.sdi must be a (N_train, N_query, T) tensor, got "
                         f"{tuple(sdi.shape) if isinstance(sdi, torch.Tensor) else type(sdi).__name__}")
    if 0 in sdi.shape:
        raise ValueError(f"the result is empty: result.sdi has shape {tuple(sdi.shape)} (N_train, N_query, T); "
                         "the explorer needs at least one training example, query and iteration")
    return _float(sdi, "result.sdi", sdi.shape)


def _float(x: Any, name: str, shape: Sequence[int]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(shape):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got {got}")
    x = x.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values; the explorer cannot rank them")
    return x


def _check_strings(name: str, values: Any, n: int, what: str) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but the result has {what} = {n}")
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise TypeError(f"{name}[{bad}] must be a str, got {type(values[bad]).__name__}")
    return list(values)


def _check_flipped(flipped: Any, n: int) -> frozenset[int]:
    if flipped is None:
        return frozenset()
    if isinstance(flipped, (str, bytes)):
        raise TypeError(f"flipped must be a sequence of training indices, got {type(flipped).__name__}")
    values = torch.as_tensor(flipped).reshape(-1) if not isinstance(flipped, torch.Tensor) else flipped.reshape(-1)
    if values.numel() and (values.is_floating_point() or values.dtype == torch.bool):
        raise TypeError(f"flipped must hold integer training indices, got dtype {values.dtype}")
    out = frozenset(int(i) for i in values.tolist())
    if out and not (min(out) >= 0 and max(out) < n):
        raise ValueError(f"flipped indices must lie in [0, N_train={n}), got {min(out)}..{max(out)}")
    return out


def _check_answers(answers: Any, Q: int, T: int) -> list[list[str]] | None:
    if answers is None:
        return None
    expect = (f"query_answers must be N_query={Q} lists of T={T} strings (the answer after each iteration; "
              "compute them with the iteration count the result was computed with)")
    if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence) or len(answers) != Q:
        got = len(answers) if isinstance(answers, Sequence) and not isinstance(answers, str) else type(answers).__name__
        raise ValueError(f"{expect}, got {got}")
    out = []
    for q, row in enumerate(answers):
        if isinstance(row, str) or not isinstance(row, Sequence) or len(row) != T:
            raise ValueError(f"{expect}; query_answers[{q}] is "
                             f"{len(row) if isinstance(row, Sequence) and not isinstance(row, str) else repr(row)}")
        if not all(isinstance(a, str) for a in row):
            raise TypeError(f"query_answers[{q}] must hold strings")
        out.append(list(row))
    return out
