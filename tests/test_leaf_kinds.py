"""Adding a module kind is one class: a toy ``Scale`` layer with a closed-form gradient, checked against the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sdi
from sdi.leaves import LEAF_KINDS, GenericLeaf, LeafKind, leaf_kind, register_leaf_kind
from models import next_token_loss, random_batch
from oracle import oracle_per_step_grads


class Scale(nn.Module):
    """``y = x * s`` with one gain per feature: ``d loss / d s = sum_n x_n * delta_n``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


class ScaledBody(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj, self.scale = nn.Linear(d, d), Scale(d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.scale(self.proj(h)))


class ScaleNet(nn.Module):
    def __init__(self, vocab: int = 7, d: int = 12, n_loops: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.body, self.head = nn.Embedding(vocab, d), ScaledBody(d), nn.Linear(d, vocab)
        self.n_loops = n_loops

    def forward(self, tokens: torch.Tensor, n_loops: int | None = None) -> torch.Tensor:
        h = self.embed(tokens)
        for _ in range(n_loops or self.n_loops):
            h = self.body(h)
        return self.head(h)


@pytest.fixture
def scale_kind():
    """Register the kind for the test only (the registry is global)."""
    calls = {"n": 0}

    @register_leaf_kind(Scale)
    class ScaleLeaf(LeafKind):
        def per_example(self, cap, rec, call, attrs):
            calls["n"] += 1
            x, delta = rec.args[call][0], rec.grad_outputs[call][0]
            return {"s": (x * delta).flatten(1, -2).sum(1)}          # (B, d)

    yield ScaleLeaf, calls
    LEAF_KINDS.pop(Scale)


def per_step_features(model: ScaleNet, batch: dict) -> tuple[sdi.StepInfluence, torch.Tensor]:
    attr = sdi.StepInfluence(model, loop=model.body, loss_fn=next_token_loss, sketch_dim=None, progress=False)
    return attr, attr.features([batch]).features


def test_a_new_kind_is_one_class_and_matches_the_oracle(scale_kind):
    ScaleLeaf, calls = scale_kind
    model, batch = ScaleNet(), random_batch(6)
    assert isinstance(leaf_kind(model.body.scale), ScaleLeaf) and leaf_kind(model.body.scale).native
    attr, ours = per_step_features(model, batch)
    # once per loop step for the feature and once for the completeness check against autograd
    assert calls["n"] == 2 * model.n_loops
    assert "body.scale.s" in attr.param_names
    oracle = oracle_per_step_grads(model, ["body"], attr.param_names, next_token_loss, batch, n_steps=model.n_loops)
    assert ours.shape == oracle.shape
    assert float((ours - oracle).norm() / oracle.norm()) < 1e-5


def test_without_the_kind_the_generic_path_gives_the_same_features(scale_kind):
    ScaleLeaf, _ = scale_kind
    model, batch = ScaleNet(), random_batch(6)
    _, native = per_step_features(model, batch)
    LEAF_KINDS.pop(Scale)
    try:
        assert isinstance(leaf_kind(model.body.scale), GenericLeaf)
        _, generic = per_step_features(model, batch)
    finally:
        LEAF_KINDS[Scale] = ScaleLeaf
    assert float((native - generic).norm() / generic.norm()) < 1e-5


def test_a_wrong_closed_form_is_caught_by_the_completeness_check(scale_kind):
    """The batch-gradient check against autograd protects users from a kind with a wrong formula."""
    ScaleLeaf, _ = scale_kind
    right = ScaleLeaf.per_example
    ScaleLeaf.per_example = lambda self, cap, rec, call, attrs: {"s": 2 * right(self, cap, rec, call, attrs)["s"]}
    with pytest.raises(sdi.CaptureError, match="do not add up to the autograd gradient.*body.scale.s"):
        per_step_features(ScaleNet(), random_batch(6))
