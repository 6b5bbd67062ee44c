"""Users' own looped models, exact path against the untied-loop oracle: HF ALBERT, looped HF GPT-2 (Conv1D,
position ids broadcast over the batch), a Huginn-shaped recurrent-depth model (own RMSNorm, a bare attention
parameter, iterations under no_grad), each loaded from a checkpoint format users have."""

import warnings
from functools import partial

import pytest
import torch
import torch.nn as nn

import sdi
from models import (LoopedGPT2, RecurrentDepthNet, lm_batch, looped_gpt2_lm, perturb, tiny_albert)
from oracle import oracle_per_step_grads_autograd

pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")

TOL = 1e-5


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def oracle_sdi(model, loop_names, attr, loss_fn, train, query, eta, n_steps):
    """eta <sum_s phi_s(train), phi_t(query)> from the untied copies: (N, Q, T)."""
    phi_train = oracle_per_step_grads_autograd(model, loop_names, attr.param_names, loss_fn, train, n_steps)
    phi_query = oracle_per_step_grads_autograd(model, loop_names, attr.param_names, loss_fn, query, n_steps)
    return eta * torch.einsum("np,qtp->nqt", phi_train.sum(1), phi_query)


def huginn_loss(model, batch, **kw):
    return sdi.losses.causal_lm_loss(lambda input_ids, attention_mask=None: model(input_ids, **kw), batch)


def test_albert_from_save_pretrained_folder_matches_oracle(tmp_path):
    model = perturb(tiny_albert(seed=0))
    model.save_pretrained(tmp_path / "albert")
    train, query = lm_batch(4, vocab=23, seed=1, mask_every=2), lm_batch(2, vocab=23, seed=2, mask_every=3)
    loop = ["albert.encoder.albert_layer_groups.0"]
    assert [c.name for c in sdi.find_loops(model, train, sdi.losses.masked_lm_loss)] == loop
    fresh = tiny_albert(seed=9)
    attr = sdi.StepInfluence(fresh, loop=fresh.get_submodule(loop[0]), loss_fn=sdi.losses.masked_lm_loss,
                             sketch_dim=None, progress=False)
    assert all(e.native for e in attr.plan())
    res = attr.influence([train], [query], checkpoints=[(tmp_path / "albert", 0.5)])
    expected = oracle_sdi(model, loop, attr, sdi.losses.masked_lm_loss, train, query, 0.5, 3)
    assert rel_err(res.sdi, expected) < TOL
    assert not res.sdi.requires_grad


def test_looped_gpt2_backbone_with_broadcast_positions_from_nanogpt_style_file_matches_oracle(tmp_path):
    """The loop around transformers.GPT2Model: its wpe sees position ids (1, T) at every iteration; Conv1D layers."""
    model = perturb(LoopedGPT2(n_loops=3))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": 5}, tmp_path / "ckpt.pt")
    train, query = lm_batch(4, seed=1), lm_batch(3, seed=2)
    assert [c.name for c in sdi.find_loops(model, train, sdi.losses.causal_lm_loss)] == ["backbone"]
    fresh = LoopedGPT2(n_loops=3, seed=4)
    attr = sdi.StepInfluence(fresh, loop=fresh.backbone, loss_fn=sdi.losses.causal_lm_loss, sketch_dim=None,
                             progress=False)
    kinds = {e.param: e.kind for e in attr.plan()}
    assert kinds["backbone.h.0.attn.c_attn.weight"] == "Conv1DLeaf" and kinds["backbone.wpe.weight"] == "EmbeddingLeaf"
    res = attr.influence([train], [query], checkpoints=[tmp_path / "ckpt.pt"])   # eta from the optimizer
    assert res.etas.tolist() == pytest.approx([2e-3])
    expected = oracle_sdi(model, ["backbone"], attr, sdi.losses.causal_lm_loss, train, query, 2e-3, 3)
    assert rel_err(res.sdi, expected) < TOL


def test_gpt2_lm_head_model_looped_in_place_from_safetensors_matches_oracle(tmp_path):
    """GPT2LMHeadModel whose transformer.h holds one block 3 times; saved with safetensors' save_model (shared
    tensors written once) and restored through the model's own aliases."""
    model = perturb(looped_gpt2_lm(n_loops=3))
    path = tmp_path / "model.safetensors"
    safetensors.save_model(model, str(path))
    train, query = lm_batch(3, seed=3), lm_batch(2, seed=4)
    fresh = looped_gpt2_lm(seed=6, n_loops=3)
    attr = sdi.StepInfluence(fresh, loop=fresh.transformer.h[0], loss_fn=sdi.losses.causal_lm_loss,
                             sketch_dim=None, progress=False)
    res = attr.influence([train], [query], checkpoints=[(path, 1.0)])
    expected = oracle_sdi(model, ["transformer.h.0"], attr, sdi.losses.causal_lm_loss, train, query, 1.0, 3)
    assert rel_err(res.sdi, expected) < TOL


def test_recurrent_depth_model_from_bare_state_dict_matches_oracle_with_truncated_backprop(tmp_path):
    model = perturb(RecurrentDepthNet(num_steps=4))
    torch.save(model.state_dict(), tmp_path / "huginn.pt")
    train, query = lm_batch(4, vocab=11, seed=1), lm_batch(2, vocab=11, seed=2)
    fresh = RecurrentDepthNet(num_steps=4, seed=3)
    with pytest.warns(UserWarning, match=r"3 of 10 .*generic.*qk_bias.*owns parameter"):
        attr = sdi.StepInfluence(fresh, loop=fresh.core, loss_fn=huginn_loss, sketch_dim=None, progress=False)
    truncated = partial(huginn_loss, num_steps_with_grad=2)     # steps 0, 1 under no_grad
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = attr.influence([train, train], [query], checkpoints=[(tmp_path / "huginn.pt", 0.1)],
                             query_loss_fn=truncated)
    told = [w for w in caught if "ran without gradient" in str(w.message)]
    assert len(told) == 1 and "steps [0, 1]" in str(told[0].message)      # reported once, not per batch
    phi_train = oracle_per_step_grads_autograd(model, ["core"], attr.param_names, huginn_loss, train, 4)
    phi_query = oracle_per_step_grads_autograd(model, ["core"], attr.param_names, truncated, query, 4)
    expected = 0.1 * torch.einsum("np,qtp->nqt", phi_train.sum(1), phi_query)
    assert rel_err(res.sdi[:4], expected) < TOL
    assert res.sdi[:, :, :2].abs().max() == 0                          # no gradient there, correctly 0


def test_loop_entirely_under_no_grad_is_an_error_not_zeros():
    model = perturb(RecurrentDepthNet())
    attr = sdi.StepInfluence(model, loop=model.core, loss_fn=partial(huginn_loss, num_steps_with_grad=0),
                             progress=False)
    with pytest.raises(sdi.CaptureError, match=r"no loop iteration carries a gradient \(torch\.no_grad.*4 of 4"):
        attr.influence([lm_batch(3, vocab=11)], [lm_batch(2, vocab=11, seed=1)])

    def inference(model, batch):
        with torch.inference_mode():
            e = model.prelude(model.emb(batch["input_ids"]))
            state = model.core(torch.zeros_like(e), e)
        return sdi.losses.causal_lm_loss(lambda **kw: model.head(model.norm(model.coda(state.clone()))), batch)
    attr = sdi.StepInfluence(model, loop=model.core, loss_fn=inference, progress=False)
    with pytest.raises(sdi.CaptureError, match="inference_mode"):
        attr.features([lm_batch(3, vocab=11)])

    def detached(model, batch):
        e = model.prelude(model.emb(batch["input_ids"]))
        state = model.core(torch.zeros_like(e), e).detach()
        return sdi.losses.causal_lm_loss(lambda **kw: model.head(model.norm(model.coda(state))), batch)
    attr = sdi.StepInfluence(model, loop=model.core, loss_fn=detached, progress=False)
    with pytest.raises(sdi.CaptureError, match="detached state"):
        attr.features([lm_batch(3, vocab=11)])


@pytest.mark.parametrize("sketch_dim", [None, 512])
def test_results_and_streamed_features_never_require_grad(sketch_dim):
    """Generic kinds (own RMSNorm, a module with a bare parameter and child layers) included."""
    model = perturb(RecurrentDepthNet())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attr = sdi.StepInfluence(model, loop=model.core, loss_fn=huginn_loss, sketch_dim=sketch_dim, progress=False)
        batches = [lm_batch(3, vocab=11, seed=s) for s in range(2)]
        for feats, losses in attr.stream_features(batches):
            assert feats.grad_fn is None and not feats.requires_grad and not losses.requires_grad
        res = attr.influence(batches, [lm_batch(2, vocab=11, seed=5)])
    for name in ("sdi", "train_sdi", "tracin", "sdi_se", "tracin_se", "checkpoint_sdi"):
        value = getattr(res, name)
        assert value is None or not value.requires_grad, name
    res.sdi.numpy()


def test_broadcast_input_that_carries_a_gradient_names_module_and_input():
    class Shift(nn.Module):                     # a learned offset table indexed by a (1, d) tensor that has grad
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x, table):
            return x + self.lin(table)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.table = nn.Embedding(11, 16), nn.Parameter(torch.randn(1, 1, 16))
            self.body, self.head = Shift(), nn.Linear(16, 11)

        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids)
            for _ in range(2):
                h = self.body(h, self.table)
            return self.head(h)

    model = Net()
    attr = sdi.StepInfluence(model, loop=model.body, loss_fn=sdi.losses.causal_lm_loss, progress=False)
    with pytest.raises(ValueError, match=r"module 'body\.lin' received args\[0\] of shape \(1, 1, 16\), broadcast "
                                         r"over the batch of 3"):
        attr.features([lm_batch(3, vocab=11)])


def test_module_list_passed_as_loop_is_reported_as_never_ran():
    model = looped_gpt2_lm()
    attr = sdi.StepInfluence(model, loop=model.transformer.h, loss_fn=sdi.losses.causal_lm_loss, progress=False)
    with pytest.raises(sdi.CaptureError, match=r"never ran.*ModuleList.*find_loops"):
        attr.features([lm_batch(2)])


def test_subclasses_keep_their_parents_native_kind_and_the_rest_is_reported():
    class MyLinear(nn.Linear):
        pass

    class MyNorm(nn.LayerNorm):
        pass

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.n, self.s = MyLinear(16, 16), MyNorm(16), ScaledLinear(16, 16)

        def forward(self, h):
            return h + self.s(torch.tanh(self.a(self.n(h))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body, self.head = nn.Embedding(11, 16), Body(), nn.Linear(16, 11)

        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids)
            for _ in range(3):
                h = self.body(h)
            return self.head(h)

    model = perturb(Net())
    with pytest.warns(UserWarning, match=r"2 of 6 .*body\.s\.weight, body\.s\.bias: ScaledLinear subclasses Linear "
                                         r"but overrides forward"):
        attr = sdi.StepInfluence(model, loop=model.body, loss_fn=sdi.losses.causal_lm_loss, sketch_dim=None,
                                 progress=False)
    plan = {e.param: e for e in attr.plan()}
    assert plan["body.a.weight"].kind == "LinearLeaf" and plan["body.n.weight"].kind == "NormLeaf"
    assert not plan["body.s.weight"].native and "overrides forward" in str(attr.plan())
    batch = lm_batch(3, vocab=11)
    ours = attr.features([batch]).features
    expected = oracle_per_step_grads_autograd(model, ["body"], attr.param_names, sdi.losses.causal_lm_loss, batch, 3)
    assert rel_err(ours, expected) < TOL


def test_loss_helpers_match_hf_losses():
    model = perturb(tiny_albert())
    batch = lm_batch(3, vocab=23, seed=4, mask_every=2)
    batch["labels"][1, :] = -100
    batch["labels"][1, 3] = 5                               # examples with different numbers of labelled tokens
    ours = sdi.losses.masked_lm_loss(model, batch)
    for b in range(3):
        one = {k: v[b : b + 1] for k, v in batch.items()}
        assert ours[b].item() == pytest.approx(model(**one).loss.item(), rel=1e-5)
    gpt = perturb(looped_gpt2_lm())
    batch = lm_batch(3, seed=5)
    ours = sdi.losses.causal_lm_loss(gpt, batch)
    assert ours.shape == (3,)
    assert ours.mean().item() == pytest.approx(gpt(**batch).loss.item(), rel=1e-5)   # equal token counts
    with pytest.raises(TypeError, match="labels"):
        sdi.losses.causal_lm_loss(gpt, {"input_ids": batch["input_ids"]})
