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


# ------------------------------------------------------------------------------------------ recurrent depth (Huginn)

class OwnRMSNorm(nn.Module):
    """A user's own RMSNorm class (not nn.RMSNorm): the generic path, reported by StepInfluence.plan()."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class BiasedAttention(nn.Module):
    """Causal self-attention that owns a bare ``qk_bias`` next to its child Linear layers (as Huginn's does)."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.qk_bias = nn.Parameter(0.1 * torch.randn(2, n_heads, 1, d // n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        att = (q @ k.transpose(-1, -2)) / (d // self.n_heads) ** 0.5
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, d))


class SandwichBlock(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.norm_1 = OwnRMSNorm(d)
        self.attn = BiasedAttention(d, n_heads)
        self.norm_2 = OwnRMSNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x))
        return x + self.mlp(self.norm_2(x))


class CoreBlock(nn.Module):
    """The recurrent core: a concat adapter ``[state, embedding] -> d`` then a block."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.adapter = nn.Linear(2 * d, d, bias=False)
        self.block = SandwichBlock(d, n_heads)

    def forward(self, state: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.block(self.adapter(torch.cat([state, e], dim=-1)))


class RecurrentDepthNet(nn.Module):
    """Huginn-shaped: prelude, a core block iterated ``num_steps`` times, coda; a tied embedding/head.

    As in Huginn's API, the first ``num_steps - num_steps_with_grad`` iterations run under ``torch.no_grad``
    (truncated backprop); ``num_steps_with_grad=0`` runs the whole loop without gradient.
    """

    def __init__(self, vocab: int = 11, d: int = 16, n_heads: int = 2, num_steps: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.prelude = SandwichBlock(d, n_heads)
        self.core = CoreBlock(d, n_heads)
        self.coda = SandwichBlock(d, n_heads)
        self.norm = OwnRMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        self.num_steps = num_steps

    def forward(self, tokens: torch.Tensor, num_steps: int | None = None,
                num_steps_with_grad: int | None = None) -> torch.Tensor:
        n = self.num_steps if num_steps is None else num_steps
        with_grad = n if num_steps_with_grad is None else num_steps_with_grad
        e = self.prelude(self.emb(tokens))
        state = torch.zeros_like(e) + 0.5
        with torch.no_grad():
            for _ in range(n - with_grad):
                state = self.core(state, e)
        for _ in range(with_grad):
            state = self.core(state, e)
        return self.head(self.norm(self.coda(state)))


# ------------------------------------------------------------------------------------------ Hugging Face (tests only)

def tiny_albert(seed: int = 0, layers: int = 3):
    """A tiny ``AlbertForMaskedLM`` (one layer group shared across depth): loop = its only layer group."""
    from transformers import AlbertConfig, AlbertForMaskedLM

    torch.manual_seed(seed)
    cfg = AlbertConfig(vocab_size=23, embedding_size=8, hidden_size=16, num_hidden_layers=layers,
                       num_hidden_groups=1, num_attention_heads=2, intermediate_size=24, max_position_embeddings=16,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    return AlbertForMaskedLM(cfg).eval()


def tiny_gpt2_config(vocab: int = 19, n_layer: int = 1):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager", use_cache=False,
                      bos_token_id=None, eos_token_id=None)


class LoopedGPT2(nn.Module):
    """The "Looped Transformers are better at learning learning algorithms" loop around ``transformers.GPT2Model``:
    ``h <- backbone(inputs_embeds=h + e)`` ``n_loops`` times; the backbone adds its position embedding (position ids
    of shape (1, T), broadcast over the batch) at every iteration. ``linear=True`` swaps every Conv1D for an
    equivalent ``nn.Linear`` (the native twin of the benchmark)."""

    def __init__(self, vocab: int = 19, n_loops: int = 3, seed: int = 0, linear: bool = False) -> None:
        super().__init__()
        from transformers import GPT2Model

        torch.manual_seed(seed)
        self.read_in = nn.Embedding(vocab, 16)
        self.backbone = GPT2Model(tiny_gpt2_config(vocab))
        self.read_out = nn.Linear(16, vocab)
        self.n_loops = n_loops
        if linear:
            conv_to_linear(self.backbone)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                n_loops: int | None = None) -> torch.Tensor:
        e = self.read_in(input_ids)
        h = torch.zeros_like(e)
        for _ in range(n_loops or self.n_loops):
            h = self.backbone(inputs_embeds=h + e, attention_mask=attention_mask).last_hidden_state
        return self.read_out(h)


def conv_to_linear(module: nn.Module) -> None:
    """Replace every transformers Conv1D below ``module`` by the nn.Linear computing the same function."""
    for name, child in list(module.named_children()):
        if type(child).__name__ == "Conv1D":
            lin = nn.Linear(child.weight.shape[0], child.weight.shape[1])
            with torch.no_grad():
                lin.weight.copy_(child.weight.T)
                lin.bias.copy_(child.bias)
            setattr(module, name, lin)
        else:
            conv_to_linear(child)


def looped_gpt2_lm(seed: int = 0, n_loops: int = 3):
    """An HF ``GPT2LMHeadModel`` looped in place: ``transformer.h`` holds one block ``n_loops`` times."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(tiny_gpt2_config())
    model.transformer.h = nn.ModuleList([model.transformer.h[0]] * n_loops)
    model.config.n_layer = n_loops
    return model.eval()


def perturb(model: nn.Module, scale: float = 0.05, seed: int = 1) -> nn.Module:
    """Move away from a symmetric init (zero biases, unit gains) so every parameter gets a real gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def lm_batch(n: int, length: int = 6, vocab: int = 19, seed: int = 0, mask_every: int = 0) -> dict:
    """An HF-style batch: input_ids, attention_mask, labels (``mask_every``: keep every k-th label, -100 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (n, length), generator=g)
    labels = ids.clone()
    if mask_every:
        keep = (torch.arange(length) % mask_every) == 0
        labels[:, ~keep] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
