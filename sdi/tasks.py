"""Algorithmic tasks with readable prompts: parity, addition and variable-binding chains.

Every task is a deterministic function of a seed. An example is a prompt and an answer string, both
made of single-character symbols, so the tokenizer is character level and ``decode(encode(s)) == s``.
The model reads ``prompt + answer`` shifted by one (teacher forcing) and the loss counts only the
answer tokens.

    >>> ds = parity(n_examples=4, n_bits=6, seed=0)
    >>> ds.examples[0].prompt, ds.examples[0].answer
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch

IGNORE = -100  # target value of positions that carry no loss


class Tokenizer:
    """Character-level tokenizer over a fixed alphabet of single-character symbols."""

    def __init__(self, symbols: str) -> None:
        if len(set(symbols)) != len(symbols):
            raise ValueError(f"symbols must be distinct, got {symbols!r}")
        self.symbols = symbols
        self.index = {s: i for i, s in enumerate(symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise ValueError(f"text contains symbols outside the alphabet {self.symbols!r}: {unknown}")
        return [self.index[c] for c in text]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.symbols[i] for i in ids)


@dataclass(frozen=True)
class Example:
    """One example: ``prompt`` and ``answer`` strings; ``hops`` is the reasoning depth where it is defined."""

    prompt: str
    answer: str
    hops: int | None = None

    @property
    def text(self) -> str:
        return self.prompt + self.answer


@dataclass
class TaskDataset:
    """A list of equal-length examples and their tensors.

    tokens:  (N, L) int64 — ``prompt + answer`` without its last symbol (the model input)
    targets: (N, L) int64 — the next symbol at answer positions, ``IGNORE`` elsewhere
    flipped: indices whose answer was deliberately corrupted by :meth:`flip_labels` (empty if none)
    clean_answers: the answers before corruption (same as the examples' answers when nothing is flipped)
    """

    name: str
    tokenizer: Tokenizer
    examples: list[Example]
    tokens: torch.Tensor
    targets: torch.Tensor
    flipped: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    clean_answers: list[str] | None = None

    def __post_init__(self) -> None:
        if self.clean_answers is None:
            self.clean_answers = [e.answer for e in self.examples]

    @classmethod
    def from_examples(cls, name: str, tokenizer: Tokenizer, examples: list[Example]) -> "TaskDataset":
        if not examples:
            raise ValueError("examples must not be empty")
        lengths = {len(e.text) for e in examples}
        if len(lengths) != 1:
            raise ValueError(f"all examples must have the same length, got lengths {sorted(lengths)}")
        seqs = torch.tensor([tokenizer.encode(e.text) for e in examples], dtype=torch.long)
        tokens, targets = seqs[:, :-1], seqs[:, 1:].clone()
        prompt_len = len(examples[0].prompt)
        targets[:, : prompt_len - 1] = IGNORE  # the first answer symbol is predicted at the last prompt position
        return cls(name, tokenizer, examples, tokens.contiguous(), targets)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def texts(self) -> list[str]:
        """Readable ``prompt answer`` strings, one per example."""
        return [f"{e.prompt}{e.answer}" for e in self.examples]

    def batch(self, indices: Sequence[int] | torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """A batch dict ``{"tokens": (B, L), "targets": (B, L), "index": (B,)}`` for the given indices."""
        idx = torch.arange(len(self))[indices] if isinstance(indices, slice) else torch.as_tensor(indices)
        return {"tokens": self.tokens[idx], "targets": self.targets[idx], "index": idx}

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """All examples, in order, as a list of batches of at most ``batch_size``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return [self.batch(slice(i, i + batch_size)) for i in range(0, len(self), batch_size)]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "TaskDataset":
        """A new dataset holding ``indices`` (in that order); ``flipped`` is re-indexed."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        position = {int(i): p for p, i in enumerate(idx.tolist())}
        flipped = torch.tensor([position[int(i)] for i in self.flipped.tolist() if int(i) in position], dtype=torch.long)
        return TaskDataset(
            self.name,
            self.tokenizer,
            [self.examples[i] for i in idx.tolist()],
            self.tokens[idx],
            self.targets[idx],
            flipped,
            [self.clean_answers[i] for i in idx.tolist()],
        )

    def to(self, device: str | torch.device) -> "TaskDataset":
        """A copy whose tensors live on ``device`` (so its batches do too); the examples are shared."""
        return replace(self, tokens=self.tokens.to(device), targets=self.targets.to(device))

    def unique(self) -> "TaskDataset":
        """The first occurrence of every distinct text (prompt + answer), in order of first appearance."""
        first: dict[str, int] = {}
        for i, text in enumerate(self.texts()):
            first.setdefault(text, i)
        return self.subset(sorted(first.values()))

    def flip_labels(self, indices: Sequence[int] | torch.Tensor | None = None, fraction: float | None = None,
                    seed: int = 0) -> "TaskDataset":
        """A copy in which the answers of ``indices`` (or of a random ``fraction``) are replaced by wrong ones.

        The corrupted indices are recorded in ``flipped`` and the original answers stay in ``clean_answers``,
        so mislabel-detection experiments can score themselves.
        """
        if (indices is None) == (fraction is None):
            raise ValueError("pass exactly one of indices or fraction")
        if fraction is not None:
            if not 0 <= fraction <= 1:
                raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
            gen = torch.Generator().manual_seed(seed)
            indices = torch.randperm(len(self), generator=gen)[: round(fraction * len(self))].sort().values
        idx = sorted({int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()})
        if idx and not (0 <= idx[0] and idx[-1] < len(self)):
            raise ValueError(f"indices must lie in [0, {len(self)}), got {idx[0]}..{idx[-1]}")
        rng = random.Random(seed)
        examples = list(self.examples)
        for i in idx:
            examples[i] = replace(examples[i], answer=_wrong_answer(self, examples[i].answer, rng))
        out = TaskDataset.from_examples(self.name, self.tokenizer, examples)
        out.flipped = torch.tensor(sorted(set(idx) | set(self.flipped.tolist())), dtype=torch.long)
        out.clean_answers = list(self.clean_answers)
        return out


def _wrong_answer(ds: TaskDataset, answer: str, rng: random.Random) -> str:
    """A different answer of the same length made of symbols that can appear in answers."""
    alphabet = sorted({c for a in ds.clean_answers for c in a})
    if len(alphabet) < 2:
        raise ValueError("cannot flip labels: every answer uses the same single symbol")
    pos = rng.randrange(len(answer))
    choices = [c for c in alphabet if c != answer[pos]]
    return answer[:pos] + rng.choice(choices) + answer[pos + 1 :]


# ---------------------------------------------------------------------------------------------- tasks

PARITY_SYMBOLS = "01="
ADDITION_SYMBOLS = "0123456789+="
VARIABLES = "abcdefghijkl"
CHAIN_SYMBOLS = "0123456789" + VARIABLES + "=;?"


def parity(n_examples: int, n_bits: int = 8, seed: int = 0, distinct: bool = False,
           curriculum: bool = False, exclude: Iterable[str] | TaskDataset | None = None,
           leading_one: bool = False) -> TaskDataset:
    """Parity of ``n_bits`` bits: prompt ``"10110100="``, answer ``"0"`` (even number of ones) or ``"1"``.

    ``distinct=True`` draws examples without replacement (needs enough distinct strings).
    ``curriculum=True`` draws the number of random trailing bits uniformly from ``1..n_bits`` and sets the
    leading ones to ``0``: the data then holds easy parities of 1, 2, ... bits next to hard ones, which is
    what lets a small transformer learn the full parity in minutes (uniform strings alone give gradient
    descent no signal to start from). Use it for training sets, not for test sets. A looped model trained
    on it learns to fold in about one more trailing bit per iteration, so it needs ``n_loops >= n_bits + 1``
    (see :func:`sdi.presets.parity_setup`).
    ``leading_one=True`` makes the first bit ``1``: every string then really has ``n_bits`` active bits
    (the hardest case of the curriculum) — a natural held-out test set.
    ``exclude`` (bit strings, or a parity :class:`TaskDataset`) lists strings that are never drawn, e.g. the
    test set's, so that test accuracy measures generalisation to unseen strings; an excluded string is
    redrawn. With ``exclude=None`` the strings are exactly those of earlier versions for the same arguments.
    """
    _check_positive(n_examples=n_examples, n_bits=n_bits)
    rng = random.Random(seed)
    if curriculum and distinct:
        raise ValueError("curriculum and distinct cannot be combined")
    if curriculum and leading_one:
        raise ValueError("curriculum and leading_one cannot be combined (leading_one means no leading zeros)")
    banned = _bit_strings(exclude, n_bits)
    free = 2 ** (n_bits - leading_one) - sum(1 for s in banned if s[0] == "1" or not leading_one)
    if free < 1:
        raise ValueError(f"exclude leaves no {n_bits}-bit string to draw")
    prefix = "1" if leading_one else ""
    n_random = n_bits - len(prefix)
    if curriculum:
        strings = []
        while len(strings) < n_examples:
            active = rng.randint(1, n_bits)
            s = "0" * (n_bits - active) + "".join(rng.choice("01") for _ in range(active))
            if s not in banned:
                strings.append(s)
    elif distinct:
        if n_examples > free:
            raise ValueError(f"n_examples={n_examples} > {free} distinct bit strings available "
                             f"(n_bits={n_bits}, leading_one={leading_one}, {len(banned)} excluded)")
        if banned:
            codes = [c for c in range(2**n_random) if prefix + format(c, f"0{n_random}b") not in banned]
            codes = rng.sample(codes, n_examples)
        else:
            codes = rng.sample(range(2**n_random), n_examples)
        strings = [prefix + format(c, f"0{n_random}b") if n_random else prefix for c in codes]
    else:
        strings = []
        while len(strings) < n_examples:
            s = prefix + "".join(rng.choice("01") for _ in range(n_random))
            if s not in banned:
                strings.append(s)
    return parity_dataset(strings)


def parity_dataset(strings: Iterable[str]) -> TaskDataset:
    """The parity task on the given bit strings (all of one length), e.g. ``parity_dataset(["0110", "1111"])``."""
    strings = list(strings)
    if not strings:
        raise ValueError("strings must not be empty")
    bad = [s for s in strings if not isinstance(s, str) or not s or set(s) - {"0", "1"}]
    if bad:
        raise ValueError(f"strings must be non-empty strings of '0' and '1', got {bad[0]!r}")
    examples = [Example(s + "=", str(s.count("1") % 2)) for s in strings]
    return TaskDataset.from_examples("parity", Tokenizer(PARITY_SYMBOLS), examples)


def _bit_strings(exclude: Iterable[str] | TaskDataset | None, n_bits: int) -> frozenset[str]:
    """``exclude`` as a set of bit strings of length ``n_bits`` (a dataset gives its prompts without ``=``)."""
    if exclude is None:
        return frozenset()
    if isinstance(exclude, TaskDataset):
        items = [e.prompt.rstrip("=") for e in exclude.examples]
    elif isinstance(exclude, str):
        raise TypeError("exclude must be a collection of bit strings or a TaskDataset, not a single string")
    else:
        items = list(exclude)
    bad = [s for s in items if not isinstance(s, str) or len(s) != n_bits or set(s) - {"0", "1"}]
    if bad:
        raise ValueError(f"exclude must hold {n_bits}-bit strings of '0' and '1', got {bad[0]!r}")
    return frozenset(items)


def addition(n_examples: int, n_digits: int = 3, seed: int = 0) -> TaskDataset:
    """Addition of two ``n_digits`` numbers: prompt ``"123+489="``, answer ``"0612"`` (zero-padded)."""
    _check_positive(n_examples=n_examples, n_digits=n_digits)
    rng = random.Random(seed)
    examples = []
    for _ in range(n_examples):
        a, b = rng.randrange(10**n_digits), rng.randrange(10**n_digits)
        examples.append(Example(f"{a:0{n_digits}d}+{b:0{n_digits}d}=", f"{a + b:0{n_digits + 1}d}"))
    return TaskDataset.from_examples("addition", Tokenizer(ADDITION_SYMBOLS), examples)


def variable_chains(n_examples: int, n_statements: int = 6, max_hops: int = 3, seed: int = 0,
                    hops: int | None = None) -> TaskDataset:
    """Multi-hop variable binding: prompt ``"d=7;a=3;b=a;e=d;c=b;c?"``, answer ``"3"``.

    The queried variable sits at the end of a chain of ``hops`` assignments (``c=b``, ``b=a``, ``a=3``:
    3 hops); the rest of the ``n_statements`` statements form distractor chains. Statements appear after
    the statements they depend on, so resolving one more hop is one more round of attention — which a
    looped model can do with one more iteration. ``hops`` fixes the depth; otherwise it is uniform in
    ``1..max_hops``. ``Example.hops`` records it.
    """
    _check_positive(n_examples=n_examples, n_statements=n_statements, max_hops=max_hops)
    if n_statements > len(VARIABLES):
        raise ValueError(f"n_statements must be <= {len(VARIABLES)} (one distinct variable each), got {n_statements}")
    if hops is not None and not 1 <= hops <= n_statements:
        raise ValueError(f"hops must lie in [1, n_statements={n_statements}], got {hops}")
    if max_hops > n_statements:
        raise ValueError(f"max_hops ({max_hops}) must be <= n_statements ({n_statements})")
    rng = random.Random(seed)
    examples = []
    for _ in range(n_examples):
        depth = hops if hops is not None else rng.randint(1, max_hops)
        lengths = [depth]
        while sum(lengths) < n_statements:  # distractor chains share the remaining statements
            lengths.append(rng.randint(1, min(max_hops, n_statements - sum(lengths))))
        names = rng.sample(VARIABLES, n_statements)
        chains, start = [], 0
        for n in lengths:
            vars_ = names[start : start + n]
            start += n
            stmts = [f"{vars_[0]}={rng.randrange(10)}"] + [f"{vars_[i]}={vars_[i - 1]}" for i in range(1, n)]
            chains.append(stmts)
        value = chains[0][0][-1]
        query = chains[0][-1][0]
        order = _interleave(chains, rng)
        examples.append(Example(";".join(order) + f";{query}?", value, hops=depth))
    return TaskDataset.from_examples("variable_chains", Tokenizer(CHAIN_SYMBOLS), examples)


def _interleave(chains: list[list[str]], rng: random.Random) -> list[str]:
    """A random merge of the chains that keeps each chain's own order."""
    pending = [list(c) for c in chains]
    out = []
    while any(pending):
        chain = rng.choice([c for c in pending if c])
        out.append(chain.pop(0))
    return out


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# -------------------------------------------------------------------------------- loss and evaluation

def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], n_loops: int | None = None) -> torch.Tensor:
    """Per-example loss: mean cross-entropy over the answer tokens. Returns (B,).

    ``n_loops`` is passed to the model when given (test-time compute); ``functools.partial(loss_fn,
    n_loops=12)`` makes a query loss that runs 12 iterations.
    """
    tokens, targets = batch["tokens"], batch["targets"]
    logits = model(tokens) if n_loops is None else model(tokens, n_loops=n_loops)
    return answer_loss(logits, targets)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logits`` (..., B, L, V), ``targets`` (B, L) -> mean answer-token cross-entropy (..., B)."""
    mask = targets != IGNORE
    safe = targets.clamp_min(0).expand(logits.shape[:-1])
    nll = -torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum(-1) / mask.sum(-1).clamp_min(1)


@torch.no_grad()
def predict(model: torch.nn.Module, data: TaskDataset, n_loops: int | None = None, batch_size: int = 512,
            per_step: bool = False) -> torch.Tensor:
    """Greedy answer tokens at the answer positions (teacher forced).

    Returns (N, A) token ids, or (T, N, A) — the logit-lens prediction after every iteration — when
    ``per_step`` (needs a model that accepts ``return_steps``, such as :class:`sdi.LoopedGPT`).
    """
    was_training = model.training
    model.eval()
    mask = data.targets[0] != IGNORE
    outs = []
    try:
        for b in data.batches(batch_size):
            kwargs = {} if n_loops is None else {"n_loops": n_loops}
            if per_step:
                logits = model(b["tokens"], return_steps=True, **kwargs).step_logits  # (T, B, L, V)
            else:
                logits = model(b["tokens"], **kwargs)
            outs.append(logits[..., mask, :].argmax(-1))
    finally:
        model.train(was_training)
    return torch.cat(outs, dim=-2)


def accuracy(model: torch.nn.Module, data: TaskDataset, n_loops: int | None = None, per_step: bool = False,
             batch_size: int = 512) -> float | torch.Tensor:
    """Fraction of examples whose whole answer is right; a (T,) tensor per iteration when ``per_step``."""
    pred = predict(model, data, n_loops=n_loops, batch_size=batch_size, per_step=per_step)
    truth = data.targets[:, data.targets[0] != IGNORE]
    correct = (pred == truth).all(-1).float().mean(-1)
    return correct if per_step else float(correct)


def decode_answers(data: TaskDataset, pred: torch.Tensor) -> list:
    """Token ids from :func:`predict` -> answer strings, keeping any leading step axis as nested lists."""
    if pred.dim() == 2:
        return [data.tokenizer.decode(row) for row in pred]
    return [decode_answers(data, p) for p in pred]


def per_example_loss(model: torch.nn.Module, data: TaskDataset, n_loops: int | None = None,
                     per_step: bool = False, batch_size: int = 512) -> torch.Tensor:
    """Loss of every example: (N,), or (T, N) through the logit lens when ``per_step``."""
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for b in data.batches(batch_size):
                kwargs = {} if n_loops is None else {"n_loops": n_loops}
                if per_step:
                    out = answer_loss(model(b["tokens"], return_steps=True, **kwargs).step_logits, b["targets"])
                else:
                    out = answer_loss(model(b["tokens"], **kwargs), b["targets"])
                outs.append(out)
    finally:
        model.train(was_training)
    return torch.cat(outs, dim=-1)


def explorer_inputs(model: torch.nn.Module, train_data: TaskDataset, query_data: TaskDataset,
                    n_loops: int | None = None) -> dict[str, Any]:
    """What an explorer shows beside the scores (``sdi_widgets.InfluenceExplorer(result, **inputs)``).

    Returns ``train_texts`` (N prompts), ``train_labels`` (N answers as trained on, flipped ones included),
    ``flipped`` (indices), ``query_texts`` (Q prompts), ``query_truth`` (Q right answers) and
    ``query_answers`` (Q lists of T answers: the model's answer after each of ``n_loops`` iterations —
    use the iteration count the influence result was computed with). Forward passes only.
    """
    for name, value in (("train_data", train_data), ("query_data", query_data)):
        if not isinstance(value, TaskDataset):
            raise TypeError(f"{name} must be an sdi.tasks.TaskDataset, got {type(value).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module (e.g. sdi.LoopedGPT), got {type(model).__name__}")
    per_step = decode_answers(query_data, predict(model, query_data, n_loops=n_loops, per_step=True))  # (T, Q)
    return {
        "train_texts": [e.prompt for e in train_data.examples],
        "train_labels": [e.answer for e in train_data.examples],
        "flipped": train_data.flipped.tolist(),
        "query_texts": [e.prompt for e in query_data.examples],
        "query_truth": [e.answer for e in query_data.examples],
        "query_answers": [list(row) for row in zip(*per_step)],
    }
from .sudoku import SUDOKU_SYMBOLS, sudoku  # noqa: E402,F401  (4x4 Sudoku: sdi/sudoku.py)
