"""Bad input gets a clear error that names the problem."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sdi
from sdi.tasks import loss_fn, parity
from models import TwoModuleLoopNet, next_token_loss, random_batch


@pytest.fixture
def setup():
    data = parity(8, n_bits=6, seed=0)
    model = sdi.LoopedGPT(sdi.LoopedGPTConfig(vocab_size=3, block_size=8, d_model=16, n_heads=2, n_loops=2))
    return model, data


def test_loop_module_that_never_runs(setup):
    model, data = setup
    model.unused = nn.Linear(4, 4)
    attr = sdi.StepInfluence(model, loop=model.unused, loss_fn=loss_fn, progress=False)
    with pytest.raises(ValueError, match="never ran"):
        attr.features(data.batches(8))


def test_loop_module_not_in_model(setup):
    model, _ = setup
    with pytest.raises(ValueError, match="not a submodule"):
        sdi.StepInfluence(model, loop=nn.Linear(2, 2), loss_fn=loss_fn)


def test_loss_of_wrong_shape(setup):
    model, data = setup
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=lambda m, b: loss_fn(m, b).mean(), progress=False)
    with pytest.raises(ValueError, match=r"shape \(B,\).*got shape \(\)"):
        attr.features(data.batches(8))
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=lambda m, b: loss_fn(m, b)[:3], progress=False)
    with pytest.raises(ValueError, match="returned 3 losses"):
        attr.features(data.batches(8))


def test_nan_or_inf_loss(setup):
    model, data = setup
    for bad in (float("nan"), float("inf")):
        def broken(m, b, bad=bad):
            losses = loss_fn(m, b)
            return losses + torch.tensor([0.0] * 5 + [bad] + [0.0] * 2)
        attr = sdi.StepInfluence(model, loop=model.block, loss_fn=broken, progress=False)
        with pytest.raises(FloatingPointError, match="non-finite losses.*position 5"):
            attr.features(data.batches(8))


def test_empty_dataset(setup):
    model, data = setup
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, progress=False)
    with pytest.raises(ValueError, match="train_batches is empty"):
        attr.influence([], data.batches(4))
    with pytest.raises(ValueError, match="query_batches is empty"):
        attr.influence(data.batches(4), [])
    with pytest.raises(ValueError, match="examples must not be empty"):
        sdi.tasks.TaskDataset.from_examples("x", data.tokenizer, [])


def test_checkpoint_that_does_not_fit(setup, tmp_path):
    model, data = setup
    other = sdi.LoopedGPT(sdi.LoopedGPTConfig(vocab_size=3, block_size=8, d_model=32, n_heads=2, n_loops=2))
    path = sdi.save_checkpoint(tmp_path / "other.pt", other.state_dict(), lr=1e-3)
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit the model"):
        attr.influence(data.batches(4), data.batches(4), checkpoints=[(path, 1e-3)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        attr.influence(data.batches(4), data.batches(4), checkpoints=[(tmp_path / "missing.pt", 1.0)])
    with pytest.raises(ValueError, match="eta must be a finite number"):
        attr.influence(data.batches(4), data.batches(4), checkpoints=[(path, float("nan"))])


def test_parameter_used_outside_the_hooks_is_not_dropped():
    """A loop parameter read functionally by a parent module: the hooks cannot see it, so we refuse."""

    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 12)

        def forward(self, h, h0, tokens):
            return h + torch.tanh(self.lin(h)) + F.linear(h0, self.lin.weight)  # second use is invisible

    model = TwoModuleLoopNet()
    model.mix = Sneaky()
    attr = sdi.StepInfluence(model, loop=[model.mix, model.gate], loss_fn=next_token_loss, progress=False)
    with pytest.raises(sdi.CaptureError, match=r"mix\.lin\.weight"):
        attr.features([random_batch(4)])


def test_hooks_are_checked_on_the_first_checkpoint_of_every_call(tmp_path, monkeypatch):
    """The completeness check costs its batch two weight-gradient GEMMs per layer and step, so it runs once per
    call and side (first checkpoint, first batch), not once per checkpoint; a missed use is still refused."""
    import sdi.features

    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 12)

        def forward(self, h, h0, tokens):
            return h + torch.tanh(self.lin(h)) + F.linear(h0, self.lin.weight)

    model = TwoModuleLoopNet()
    ckpts = []
    for k in range(3):
        torch.manual_seed(k)
        ckpts.append(({n: torch.randn_like(p) for n, p in model.state_dict().items()}, 0.1))
    real, checks = sdi.features.check_gradients_match, []
    monkeypatch.setattr(sdi.features, "check_gradients_match", lambda *a, **kw: (checks.append(1), real(*a, **kw)))
    attr = sdi.StepInfluence(model, loop=[model.mix, model.gate], loss_fn=next_token_loss, sketch_dim=4096,
                             progress=False)
    batches = [random_batch(4, seed=s) for s in range(3)]
    attr.influence(batches, batches[:1], checkpoints=ckpts)
    assert len(checks) == 2                                  # queries and train, at the first checkpoint
    checks.clear()
    attr.influence(batches, batches[:1], checkpoints=ckpts, store=tmp_path / "store")
    assert len(checks) == 2                                  # the store's first chunk and the queries
    checks.clear()
    attr.self_influence(batches, checkpoints=ckpts)
    assert len(checks) == 1

    model.mix = Sneaky()
    attr = sdi.StepInfluence(model, loop=[model.mix, model.gate], loss_fn=next_token_loss, progress=False)
    with pytest.raises(sdi.CaptureError, match=r"mix\.lin\.weight"):
        attr.influence(batches, batches[:1], checkpoints=[(model.state_dict(), 0.1)] * 2)
    with pytest.raises(sdi.CaptureError, match=r"mix\.lin\.weight"):
        attr.influence(batches, batches[:1], checkpoints=[(model.state_dict(), 0.1)] * 2, store=tmp_path / "s2")


def test_leaf_shared_with_module_outside_loop():
    model = TwoModuleLoopNet()
    model.emb = model.mix.tok  # the prelude reuses an embedding that lives in the loop
    attr = sdi.StepInfluence(model, loop=[model.mix, model.gate], loss_fn=next_token_loss, progress=False)
    with pytest.raises(sdi.CaptureError, match="ran outside the loop modules"):
        attr.features([random_batch(4)])


def test_batches_must_agree_on_steps(setup):
    model, data = setup
    calls = {"n": 0}

    def varying(m, b):
        calls["n"] += 1
        return loss_fn(m, b, n_loops=2 if calls["n"] == 1 else 3)

    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=varying, progress=False)
    with pytest.raises(ValueError, match="same number of iterations"):
        attr.features(data.batches(4))


def test_top_k_arguments(setup):
    model, data = setup
    res = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, progress=False).influence(
        data.batches(4), data.batches(2))
    with pytest.raises(ValueError, match="k must be an int in"):
        res.top_k(0, 0, k=9)
    with pytest.raises(IndexError, match="step must be"):
        res.top_k(0, 5, k=2)
    with pytest.raises(IndexError, match="query must be"):
        res.top_k(8, 0, k=2)


def test_bad_types(setup):
    model, data = setup
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        sdi.StepInfluence(model, loop=model.block, loss_fn=None)
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, progress=False)
    with pytest.raises(TypeError, match="not a single dict"):
        attr.influence(data.batch(slice(None)), data.batches(2))
    frozen = sdi.LoopedGPT(sdi.LoopedGPTConfig(vocab_size=3, block_size=8, d_model=16, n_heads=2))
    frozen.block.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sdi.StepInfluence(frozen, loop=frozen.block, loss_fn=loss_fn)
