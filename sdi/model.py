"""A looped GPT: one shared transformer block applied ``n_loops`` times.

    h_0 = prelude(x)                       token + position embedding
    h_t = block(h_{t-1}, h_0), t = 1..tau  the loop body ``theta`` (shared by every iteration)
    logits = head(ln_f(h_tau))

``n_loops`` may differ between training and inference (test-time compute). Asking for
``return_steps=True`` also returns every hidden state and the "logit lens" read-out
``head(ln_f(h_t))`` after every iteration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LoopedGPTConfig:
    """Sizes of a :class:`LoopedGPT`.

    ``n_loops`` is the training ``tau``; ``reinject`` adds ``h_0`` to the state at every iteration
    (input injection), which keeps the input visible however deep the recurrence goes.
    """

    vocab_size: int
    block_size: int
    d_model: int = 64
    n_heads: int = 4
    d_mlp: int | None = None  # None means 4 * d_model
    n_layers_per_loop: int = 1
    n_loops: int = 4
    reinject: bool = True
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "d_model", "n_heads", "n_layers_per_loop", "n_loops"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LoopedGPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model

    def to_dict(self) -> dict:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate ``q, k, v, o`` projections.

    Separate ``nn.Linear`` layers (rather than one fused ``qkv``) let hooks see each weight on its own,
    which is what per-parameter-group influence needs.
    """

    def __init__(self, d_model: int, n_heads: int, bias: bool = True) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model, bias=bias)
        self.k = nn.Linear(d_model, d_model, bias=bias)
        self.v = nn.Linear(d_model, d_model, bias=bias)
        self.o = nn.Linear(d_model, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, L, d_model) -> (B, L, d_model)."""
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int, bias: bool = True) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_mlp, bias=bias)
        self.down = nn.Linear(d_mlp, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm residual layer: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: LoopedGPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.bias)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg.d_model, cfg.d_mlp, cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LoopBlock(nn.Module):
    """The loop body ``f_theta(h, h_0)``: optional input injection, then ``n_layers_per_loop`` layers.

    It is called exactly once per iteration, so "the c-th call of this module" *is* step ``c``.
    """

    def __init__(self, cfg: LoopedGPTConfig) -> None:
        super().__init__()
        self.reinject = cfg.reinject
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.n_layers_per_loop))

    def forward(self, h: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """``h``, ``h0``: (B, L, d_model) -> (B, L, d_model)."""
        if self.reinject:
            h = h + h0
        for layer in self.layers:
            h = layer(h)
        return h


class LoopedOutput(NamedTuple):
    """What ``LoopedGPT.forward(..., return_steps=True)`` returns.

    Fields::

        logits:        (B, L, V)          read-out after the last iteration
        hidden_states: (T + 1, B, L, D)   h_0 .. h_T
        step_logits:   (T, B, L, V)       logit lens: head(ln_f(h_t)) for t = 1..T
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor
    step_logits: torch.Tensor


class LoopedGPT(nn.Module):
    """Decoder-only transformer whose single :class:`~sdi.model.LoopBlock` (``self.block``) is applied
    ``n_loops`` times."""

    def __init__(self, cfg: LoopedGPTConfig, seed: int | None = 0) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.block = LoopBlock(cfg)
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        """GPT-2 style initialisation, seeded so two models built alike are identical."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        n_residual = 2 * self.config.n_layers_per_loop * self.config.n_loops
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)  # LayerNorm gains and all biases
                continue
            std = 0.02
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                std = 0.02 / math.sqrt(n_residual)
            p.copy_(torch.randn(p.shape, generator=gen) * std)

    @property
    def n_loops(self) -> int:
        return self.config.n_loops

    def forward(
        self, tokens: torch.Tensor, n_loops: int | None = None, return_steps: bool = False
    ) -> torch.Tensor | LoopedOutput:
        """Run the model.

        tokens: (B, L) int64, ``L <= block_size``.
        n_loops: iterations of the block (default: the training ``config.n_loops``).
        Returns logits (B, L, V), or a :class:`LoopedOutput` when ``return_steps``.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (B, L), got {tuple(tokens.shape)}")
        B, L = tokens.shape
        if L > self.config.block_size:
            raise ValueError(f"sequence length {L} exceeds block_size {self.config.block_size}")
        n_loops = self.config.n_loops if n_loops is None else n_loops
        if not isinstance(n_loops, int) or n_loops < 1:
            raise ValueError(f"n_loops must be a positive int, got {n_loops!r}")

        positions = torch.arange(L, device=tokens.device)
        h0 = self.tok_emb(tokens) + self.pos_emb(positions)
        h = h0
        states = [h0]
        for _ in range(n_loops):
            h = self.block(h, h0)
            if return_steps:
                states.append(h)
        logits = self.head(self.ln_f(h))
        if not return_steps:
            return logits
        hidden = torch.stack(states)
        return LoopedOutput(logits, hidden, self.head(self.ln_f(hidden[1:])))

    @property
    def loop_modules(self) -> list[nn.Module]:
        """The modules that run once per iteration: what :class:`sdi.StepInfluence` needs as ``loop``."""
        return [self.block]
