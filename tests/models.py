"""Small looped models written the way a user would: not LoopedGPT, not built for this library."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Gain(nn.Module):
    """A bare parameter used functionally inside its own module (the generic, torch.func path)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class MixBody(nn.Module):
    """First module of the loop body: LayerNorm, an embedding re-read each iteration, MLP, Gain."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.tok = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d, bias=False)
        self.gain = Gain(d)

    def forward(self, h: torch.Tensor, h0: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(h + h0) + self.tok(tokens)
        return h + self.gain(self.down(torch.tanh(self.up(x))))


class GateBody(nn.Module):
    """Second module of the loop body: RMSNorm and one Linear used twice per call (tied within a step)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.proj = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        return h + 0.5 * self.proj(torch.sigmoid(self.proj(x)))


class TiedGateBody(nn.Module):
    """Like :class:`GateBody`, but two Linear modules own one weight Parameter (tied across layers)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.first = nn.Linear(d, d)
        self.second = nn.Linear(d, d)
        self.second.weight = self.first.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + 0.5 * self.second(torch.tanh(self.first(h)))


class TwoModuleLoopNet(nn.Module):
    """h_t = gate(mix(h_{t-1}, h_0, tokens)); both modules run once per iteration: ``loop=[mix, gate]``."""

    def __init__(self, vocab: int = 7, d: int = 12, n_loops: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.mix = MixBody(vocab, d)
        self.gate = GateBody(d)
        self.head = nn.Linear(d, vocab)
        self.n_loops = n_loops

    def forward(self, tokens: torch.Tensor, n_loops: int | None = None) -> torch.Tensor:
        h0 = self.emb(tokens)
        h = h0
        for _ in range(n_loops or self.n_loops):
            h = self.gate(self.mix(h, h0, tokens))
        return self.head(h)


def next_token_loss(model, batch: dict, n_loops: int | None = None) -> torch.Tensor:
    """(B,) mean next-token cross-entropy of each sequence."""
    logits = model(batch["tokens"]) if n_loops is None else model(batch["tokens"], n_loops=n_loops)
    nll = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")
    return nll.mean(-1)


def random_batch(n: int, length: int = 5, vocab: int = 7, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(vocab, (n, length + 1), generator=g)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:]}
