"""Sketched SDI (sdi.sketch) against independent references: the untied-copy oracle's per-step gradients, a
naive CountSketch written out index by index, the exact SDI, and the CountSketch variance formula."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch

import sdi
from sdi.featurizers import SketchFeaturizer
from sdi.fingerprints import check_fingerprints
from sdi.sketch import DEFAULT_SKETCH_DIM, CountSketch, TensorSketch
from sdi.tasks import loss_fn, parity, variable_chains
from models import TwoModuleLoopNet, next_token_loss, random_batch
from oracle import oracle_per_step_grads

ROUNDING = 2e-5  # float32 FFTs and scatters: relative error of a whole feature tensor


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def small_gpt(vocab: int = 3, block: int = 16, layers: int = 1, n_loops: int = 3, d: int = 16, seed: int = 0):
    cfg = sdi.LoopedGPTConfig(vocab_size=vocab, block_size=block, d_model=d, n_heads=2, n_loops=n_loops,
                              n_layers_per_loop=layers)
    model = sdi.LoopedGPT(cfg, seed=seed)
    with torch.no_grad():  # leave the symmetric init so every parameter has a real gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def split_flat(flat: torch.Tensor, slots) -> list[torch.Tensor]:
    """(..., P) exact features -> one (..., *shape) tensor per parameter slot."""
    parts = torch.split(flat, [s.numel for s in slots], dim=-1)
    return [p.reshape(*flat.shape[:-1], *s.shape) for p, s in zip(parts, slots)]


def naive_count_sketch(featurizer: SketchFeaturizer, grads: list[torch.Tensor]) -> torch.Tensor:
    """The definition, one coordinate at a time: flat index k = i * cols + j of a matrix goes to bucket
    (h_r(i) + h_c(j)) mod m with sign s_r(i) s_c(j); a vector's coordinate i to h(i) with sign s(i). (m,)"""
    m = featurizer.sketch_dim
    out = torch.zeros(m, dtype=torch.float64)
    for slot, g in zip(featurizer.slots, grads):
        spec = featurizer.specs[id(slot.param)]
        flat = g.double().reshape(-1).tolist()
        if isinstance(spec, TensorSketch):
            cols = spec.shape[1]
            hr, hc = spec.rows.buckets.tolist(), spec.cols.buckets.tolist()
            sr, sc = spec.rows.signs.tolist(), spec.cols.signs.tolist()
            for k, v in enumerate(flat):
                i, j = divmod(k, cols)
                out[(hr[i] + hc[j]) % m] += sr[i] * sc[j] * v
        else:
            h, s = spec.buckets.tolist(), spec.signs.tolist()
            for k, v in enumerate(flat):
                out[h[k]] += s[k] * v
    return out


# ------------------------------------------------------------------------------------------ hashes

def test_hashes_are_a_pure_function_of_seed_m_name_and_mode():
    torch.manual_seed(1)
    a = CountSketch.seeded(1000, 256, seed=3, name="block.q.weight", mode="rows")
    torch.manual_seed(2)
    torch.rand(10)  # global RNG state must not matter
    b = CountSketch.seeded(1000, 256, seed=3, name="block.q.weight", mode="rows")
    assert torch.equal(a.buckets, b.buckets) and torch.equal(a.signs, b.signs)
    for other in [dict(seed=4, name="block.q.weight", mode="rows"), dict(seed=3, name="block.k.weight", mode="rows"),
                  dict(seed=3, name="block.q.weight", mode="cols")]:
        c = CountSketch.seeded(1000, 256, **other)
        assert (c.buckets != a.buckets).float().mean() > 0.9
    assert not torch.equal(CountSketch.seeded(1000, 512, 3, "block.q.weight", "rows").buckets % 256, a.buckets)
    assert a.buckets.min() >= 0 and a.buckets.max() < 256
    assert set(a.signs.tolist()) == {-1.0, 1.0}
    # roughly uniform buckets and balanced signs (binomial bounds, 5 sigma)
    big = CountSketch.seeded(256_000, 256, 0, "x", "flat")
    counts = torch.bincount(big.buckets, minlength=256).float()
    assert (counts - 1000).abs().max() < 5 * math.sqrt(1000)
    assert abs(float(big.signs.sum())) < 5 * math.sqrt(256_000)


def test_dense_is_the_count_sketch_written_out_coordinate_by_coordinate():
    model = TwoModuleLoopNet(d=6)
    attr = sdi.StepInfluence(model, loop=[model.mix, model.gate], loss_fn=next_token_loss, sketch_dim=37,
                             seed=5, progress=False)
    grads = [torch.randn(s.shape, dtype=torch.float64) for s in attr.slots]
    ours = attr.featurizer.dense([g.float() for g in grads])
    assert ours.shape == (37,)
    assert rel_err(ours.double(), naive_count_sketch(attr.featurizer, grads)) < 1e-6


# ------------------------------------------------------------------------------------------ kernels

def _user_model_case():
    model = TwoModuleLoopNet(n_loops=3)
    return model, [model.mix, model.gate], ["mix", "gate"], next_token_loss, random_batch(6)


def _two_layer_gpt_case():
    model = small_gpt(layers=2, n_loops=3)
    return model, model.block, ["block"], loss_fn, parity(6, n_bits=6, seed=1).batch(slice(None))


@pytest.mark.parametrize("case", [_user_model_case, _two_layer_gpt_case], ids=["user-model", "gpt-2-layers"])
@pytest.mark.parametrize("kernel", ["fft", "outer"])
def test_kernels_equal_count_sketch_of_oracle_per_step_gradients(case, kernel):
    """Linear with and without bias, a Linear used twice per step, LayerNorm, RMSNorm, Embedding, a bare-parameter
    module (generic path), two loop modules / two layers per loop: every sketch equals the CountSketch of the
    untied oracle's per-example, per-step gradient."""
    model, loop, loop_names, lf, batch = case()
    attr = sdi.StepInfluence(model, loop=loop, loss_fn=lf, sketch_dim=97, seed=1, progress=False)
    attr.featurizer.linear_kernel = kernel
    ours = attr.features([batch]).features                                   # (B, T, m)
    phi = oracle_per_step_grads(model, loop_names, attr.param_names, lf, batch, n_steps=3)   # (B, T, P)
    reference = attr.featurizer.dense(split_flat(phi, attr.slots))
    assert ours.shape == reference.shape == (6, 3, 97) and ours.dtype == torch.float32
    assert rel_err(ours, reference) < ROUNDING
    for t in range(3):  # every step on its own, not just the bulk
        assert rel_err(ours[:, t], reference[:, t]) < ROUNDING


class TiedBody(torch.nn.Module):
    """Two Linear modules sharing one weight inside the loop body (tied weights)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a = torch.nn.Linear(d, d)
        self.b = torch.nn.Linear(d, d, bias=False)
        self.b.weight = self.a.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.b(torch.tanh(self.a(h))))


class TiedNet(torch.nn.Module):
    def __init__(self, vocab: int = 7, d: int = 8) -> None:
        super().__init__()
        self.emb, self.body, self.head = torch.nn.Embedding(vocab, d), TiedBody(d), torch.nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        for _ in range(3):
            h = self.body(h)
        return self.head(h)


@pytest.mark.parametrize("kernel", ["fft", "outer"])
def test_tied_weights_inside_the_loop(kernel):
    model = TiedNet()
    batch = random_batch(4)
    attr = sdi.StepInfluence(model, model.body, next_token_loss, sketch_dim=61, progress=False)
    attr.featurizer.linear_kernel = kernel
    assert attr.param_names == ["body.a.weight", "body.a.bias"]
    ours = attr.features([batch]).features
    phi = oracle_per_step_grads(model, ["body"], attr.param_names, next_token_loss, batch, n_steps=3)
    assert rel_err(ours, attr.featurizer.dense(split_flat(phi, attr.slots))) < ROUNDING


@pytest.mark.parametrize("kernel", ["fft", "outer"])
def test_parameter_the_hooks_cannot_see_is_named_not_dropped(kernel):
    """A loop weight also read functionally (F.linear on the raw tensor): the sketched path refuses and names it."""

    class Sneaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(12, 12)

        def forward(self, h, h0, tokens):
            return h + torch.tanh(self.lin(h)) + torch.nn.functional.linear(h0, self.lin.weight)

    model = TwoModuleLoopNet()
    model.mix = Sneaky()
    attr = sdi.StepInfluence(model, loop=[model.mix, model.gate], loss_fn=next_token_loss, sketch_dim=64,
                             progress=False)
    attr.featurizer.linear_kernel = kernel
    with pytest.raises(sdi.CaptureError, match=r"\['mix\.lin\.weight \(relative error"):
        attr.features([random_batch(4)])


def test_query_with_more_loops_and_module_groups():
    """Test-time compute (5 loops on a 3-loop model) and groups='module': each group's sketch is the sketch of its
    own parameters, and the groups add up to the ungrouped feature (same hashes, other destination)."""
    model = small_gpt(n_loops=3)
    batch = parity(5, n_bits=6, seed=2).batch(slice(None))
    q_loss = partial(loss_fn, n_loops=5)
    grouped = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=128, groups="module", progress=False)
    plain = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=128, progress=False)
    fg = grouped.features([batch], loss_fn=q_loss).features
    assert grouped.featurizer.group_names == ["attention", "mlp", "norm"]
    assert fg.shape == (5, 5, 3, 128)
    assert rel_err(fg.sum(2), plain.features([batch], loss_fn=q_loss).features) < ROUNDING
    phi = split_flat(oracle_per_step_grads(model, ["block"], grouped.param_names, q_loss, batch, 5), grouped.slots)
    assert rel_err(fg, grouped.featurizer.dense(phi)) < ROUNDING
    norm = grouped.featurizer.group_names.index("norm")
    only_norm = [g if ".ln" in s.name else torch.zeros_like(g) for g, s in zip(phi, grouped.slots)]
    assert rel_err(fg[:, :, norm], grouped.featurizer.dense(only_norm)[:, :, norm]) < ROUNDING
    custom = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=128, progress=False,
                               groups=lambda name: "weights" if name.endswith("weight") else "biases")
    assert custom.featurizer.group_names == ["weights", "biases"]
    assert rel_err(custom.features([batch]).features.sum(2), plain.features([batch]).features) < ROUNDING


@pytest.mark.parametrize("kernel", ["fft", "outer"])
def test_tensor_blocks_are_the_sketch_of_each_weight_matrix(kernel):
    """groups='tensor': one block per weight matrix and one for all 1-D parameters; each block is the CountSketch
    of its own parameters' oracle gradients (both Linear kernels), and the blocks add up to the fused sketch."""
    model = small_gpt(n_loops=3)
    batch = parity(5, n_bits=6, seed=2).batch(slice(None))
    blocks = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=64, groups="tensor", progress=False)
    blocks.featurizer.linear_kernel = kernel
    matrices = [s.name for s in blocks.slots if len(s.shape) == 2]
    assert blocks.featurizer.group_names == [*matrices, "vectors"] and len(matrices) >= 6
    fb = blocks.features([batch]).features
    assert fb.shape == (5, 3, len(matrices) + 1, 64)
    phi = split_flat(oracle_per_step_grads(model, ["block"], blocks.param_names, loss_fn, batch, 3), blocks.slots)
    for g, name in enumerate(blocks.featurizer.group_names):
        own = [x if (s.name == name or (name == "vectors" and len(s.shape) == 1)) else torch.zeros_like(x)
               for x, s in zip(phi, blocks.slots)]
        assert rel_err(fb[:, :, g], blocks.featurizer.dense(own)[:, :, g]) < ROUNDING, name
    fused = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=64, progress=False)
    assert rel_err(fb.sum(2), fused.features([batch]).features) < ROUNDING


# ------------------------------------------------------------------------------------------ statistics

def _gradient_pairs(n_pairs: int = 4) -> tuple[SketchFeaturizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Real gradients of a small LoopedGPT: (total gradient of a train example, step-t gradient of a query)."""
    model = small_gpt(d=16, n_loops=3)
    data = parity(8, n_bits=6, seed=4)
    attr = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=None, progress=False)
    phi = attr.features([data.batch(slice(None))]).features.double()     # (8, 3, P)
    pairs = [(phi[i].sum(0), phi[4 + i, i % 3]) for i in range(n_pairs)]
    return attr, pairs


def _sketched_inner_products(attr, pairs, m: int, seeds: range, groups=None) -> torch.Tensor:
    """<S x, S y> (summed over blocks, as the scores are) for every seed and pair: (len(seeds), len(pairs))."""
    out = torch.zeros(len(seeds), len(pairs), dtype=torch.float64)
    xs = split_flat(torch.stack([x for x, _ in pairs]).float(), attr.slots)
    ys = split_flat(torch.stack([y for _, y in pairs]).float(), attr.slots)
    for i, seed in enumerate(seeds):
        f = SketchFeaturizer(attr.slots, m, seed=seed, groups=groups)
        out[i] = (f.dense(xs).double() * f.dense(ys).double()).flatten(1).sum(-1)
    return out


def count_sketch_variance(x: torch.Tensor, y: torch.Tensor, m: int) -> float:
    """Var <Sx, Sy> = (||x||^2 ||y||^2 + <x,y>^2 - 2 sum_i x_i^2 y_i^2) / m for a CountSketch."""
    return float((x.dot(x) * y.dot(y) + x.dot(y) ** 2 - 2 * (x * x * y * y).sum()) / m)


def test_sketched_inner_products_are_unbiased_over_200_seeds():
    attr, pairs = _gradient_pairs()
    m, n = 256, 200
    est = _sketched_inner_products(attr, pairs, m, range(n))
    for j, (x, y) in enumerate(pairs):
        exact = float(x.dot(y))
        theory_se = math.sqrt(count_sketch_variance(x, y, m) / n)
        empirical_se = float(est[:, j].std() / math.sqrt(n))
        assert 0.6 < empirical_se / theory_se < 1.5, (empirical_se, theory_se)
        assert abs(float(est[:, j].mean()) - exact) < 4.5 * max(theory_se, empirical_se), j
    # the bound has teeth: it would catch any bias above 3% of ||x|| ||y||
    for x, y in pairs:
        assert 4.5 * math.sqrt(count_sketch_variance(x, y, m) / n) < 0.03 * float(x.norm() * y.norm())


def test_tensor_blocks_are_unbiased_with_the_variance_of_independent_blocks():
    """groups='tensor': the score is a sum of independent per-block CountSketch estimates, so its variance is the
    sum of the blocks' variances (each block of m buckets sees only its own parameters)."""
    attr, pairs = _gradient_pairs()
    m, n = 64, 200
    est = _sketched_inner_products(attr, pairs, m, range(n), groups="tensor")
    blocks = SketchFeaturizer(attr.slots, m, groups="tensor").group_of
    members = {}
    for s in attr.slots:
        members.setdefault(blocks[id(s.param)], []).append(s)
    assert len(members) >= 7
    for j, (x, y) in enumerate(pairs):
        xs, ys = split_flat(x, attr.slots), split_flat(y, attr.slots)
        parts = {id(s.param): (a.flatten(), b.flatten()) for s, a, b in zip(attr.slots, xs, ys)}
        variance = sum(count_sketch_variance(torch.cat([parts[id(s.param)][0] for s in group]),
                                             torch.cat([parts[id(s.param)][1] for s in group]), m)
                       for group in members.values())
        theory_se, empirical_se = math.sqrt(variance / n), float(est[:, j].std() / math.sqrt(n))
        assert 0.6 < empirical_se / theory_se < 1.5, (empirical_se, theory_se)
        assert abs(float(est[:, j].mean()) - float(x.dot(y))) < 4.5 * max(theory_se, empirical_se), j


def test_error_shrinks_with_m_as_the_count_sketch_variance_predicts():
    attr, pairs = _gradient_pairs(n_pairs=2)
    ms, n = [32, 256, 2048], 100
    rms = []
    for m in ms:
        est = _sketched_inner_products(attr, pairs, m, range(1000, 1000 + n))
        exact = torch.tensor([float(x.dot(y)) for x, y in pairs], dtype=torch.float64)
        for j, (x, y) in enumerate(pairs):
            measured = float(((est[:, j] - exact[j]) ** 2).mean())
            # 100 samples of a roughly normal error: the mean square lies within ~[0.6, 1.5] x its expectation
            assert 0.5 < measured / count_sketch_variance(x, y, m) < 1.7, (m, j)
        rms.append(float(((est - exact) ** 2).mean().sqrt()))
    slope = torch.linalg.lstsq(torch.tensor([[math.log(m), 1.0] for m in ms]),
                               torch.tensor(rms).log().unsqueeze(1).float()).solution[0, 0]
    assert -0.62 < float(slope) < -0.38, slope


# ------------------------------------------------------------------------------------------ influence

def test_conservation_holds_exactly_in_sketch_space():
    model = small_gpt(vocab=len(variable_chains(1).tokenizer.symbols), block=32, n_loops=3)
    train = variable_chains(8, n_statements=4, max_hops=2, seed=3)
    query = variable_chains(3, n_statements=4, max_hops=2, seed=4)
    attr = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=256, progress=False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    other = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
    res = attr.influence(train.batches(4), query.batches(3), checkpoints=[(state, 0.5), (other, 0.25)],
                         query_loss_fn=partial(loss_fn, n_loops=4), step_matrix=True)
    assert res.sdi.shape == (8, 3, 4) and res.train_sdi.shape == (8, 3, 3)
    scale = res.tracin.abs().max()
    assert (res.sdi.sum(-1) - res.tracin).abs().max() < 1e-5 * scale
    assert (res.train_sdi.sum(-1) - res.tracin).abs().max() < 1e-5 * scale
    assert (res.step_matrix.sum((-1, -2)) - res.tracin).abs().max() < 1e-5 * scale
    assert res.conservation_error() < 1e-5
    assert res.meta["sketch_dim"] == 256 and res.meta["fingerprint"]["kind"] == "sketch"


def test_fingerprints_must_match():
    model = small_gpt()
    batch = [parity(4, n_bits=6, seed=0).batch(slice(None))]
    make = lambda **kw: sdi.StepInfluence(model, model.block, loss_fn, progress=False, **kw)  # noqa: E731
    base = make(sketch_dim=64, seed=0)
    f0 = base.features(batch)
    torch.manual_seed(123)  # a second object with the same seed and layout agrees exactly, whatever the RNG state
    again = make(sketch_dim=64, seed=0).features(batch)
    f0.check_compatible(again)
    assert torch.equal(f0.features, again.features)
    others = {"seed": make(sketch_dim=64, seed=1), "sketch_dim": make(sketch_dim=128, seed=0),
              "groups": make(sketch_dim=64, seed=0, groups="module"), "kind": make(sketch_dim=None)}
    for key, attr in others.items():
        with pytest.raises(ValueError, match=key):
            check_fingerprints(f0.fingerprint, attr.fingerprint())
    model.block.layers[0].ln1.weight.requires_grad_(False)  # a different parameter set
    with pytest.raises(ValueError, match="params"):
        f0.check_compatible(make(sketch_dim=64, seed=0).features(batch))


def test_bad_sketch_arguments():
    model = small_gpt()
    for bad in [0, 1, 2.5, True, "64"]:
        with pytest.raises(ValueError, match="sketch_dim"):
            sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=bad)
    with pytest.raises(ValueError, match="groups"):
        sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=64, groups="layers")
    with pytest.raises(ValueError, match="groups applies to sketched features only"):
        sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=None, groups="module")
    with pytest.raises(TypeError, match="seed"):
        sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=64, seed=1.5)
    with pytest.raises(ValueError, match="linear_kernel"):
        SketchFeaturizer(sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=64).slots, 64, linear_kernel="x")


def test_bf16_model_gives_float32_features_close_to_fp32():
    model = small_gpt(d=32, n_loops=3)
    batch = [parity(8, n_bits=6, seed=5).batch(slice(None))]
    f32 = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=512, progress=False).features(batch)
    model_bf16 = model.to(torch.bfloat16)
    f16 = sdi.StepInfluence(model_bf16, model_bf16.block, loss_fn, sketch_dim=512, progress=False).features(batch)
    assert f16.features.dtype == torch.float32 and f16.features.device == f32.features.device
    f16.check_compatible(f32)
    assert rel_err(f16.features, f32.features) < 0.05


# ------------------------------------------------------------------------------------------ memory

MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    import torch.nn as nn, torch.nn.functional as F
    import sdi
    torch.set_num_threads(1)
    D, B = 4096, 64

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)
        def forward(self, h, h0):
            return h + torch.tanh(self.lin(h + h0))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.body, self.head = nn.Embedding(8, D), Body(), nn.Linear(D, 8)
        def forward(self, tokens):
            h0 = self.emb(tokens)
            h = h0
            for _ in range(2):
                h = self.body(h, h0)
            return self.head(h)

    def loss(model, batch):
        return F.cross_entropy(model(batch["tokens"])[:, 0], batch["targets"], reduction="none")

    torch.manual_seed(0)
    model = Net()
    batch = {"tokens": torch.randint(8, (B, 1)), "targets": torch.randint(8, (B,))}
    loss(model, batch).sum().backward()  # weights, their gradients and autograd's buffers are now resident
    model.zero_grad(set_to_none=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attr = sdi.StepInfluence(model, model.body, loss, sketch_dim=1024, progress=False)
    f = attr.features([batch]).features
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert f.shape == (B, 2, 1024) and bool(torch.isfinite(f).all()) and float(f.abs().sum()) > 0
    print((peak - base) * 1024, B * attr.n_params * 4)
""")


def test_no_per_example_gradient_is_formed():
    """Linear(4096, 4096) in the loop, 64 examples: per-example gradients alone would take 4.3 GB per step. The
    sketched features run with a peak resident-memory increase below a tenth of that (measured in a fresh process)."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr[-2000:]
    increase, per_example_bytes = map(int, out.stdout.split())
    assert per_example_bytes > 4e9
    assert increase < per_example_bytes / 10, (increase / 2**20, per_example_bytes / 2**20)


def test_deltas_are_featurized_as_they_arrive_never_all_at_once(monkeypatch):
    """Each call's (inputs, delta) become features inside the backward pass and are released: when a call is
    featurized, at most the calls of one output's gradient wait with a live delta, not those of all tau steps."""
    model = small_gpt(layers=2, n_loops=4)
    attr = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=256, progress=False)
    batch = parity(6, n_bits=6, seed=1).batch(slice(None))
    live, calls = [], []
    add = type(attr.featurizer).add

    def spy(self, cap, rec, call, target):
        calls.append((rec.name, call))
        live.append(sum(any(g is not None for g in r.grad_outputs[c]) for r in cap.calls.values()
                        for c in range(len(r))))
        add(self, cap, rec, call, target)

    monkeypatch.setattr(type(attr.featurizer), "add", spy)
    attr.features([batch, batch])       # the first batch checks against autograd's gradient, the second does not
    assert len(attr.leaves) == 16 and len(calls) == 2 * 4 * 16   # 2 batches x 4 steps x 16 leaves, each once
    assert max(live) == 1, max(live)    # before: every call's delta alive at once (64 per batch)


# ------------------------------------------------------------------------------------------ default width

def test_default_sketch_dim_meets_the_accuracy_target():
    """A small default-style model, trained briefly with a pinned seed: relative Frobenius error <= 0.05 and mean
    top-10 overlap >= 0.9 per (query, step) against the exact SDI, at the default sketch width."""
    torch.manual_seed(0)
    data = parity(512, n_bits=8, seed=0, curriculum=True)
    cfg = sdi.LoopedGPTConfig(vocab_size=3, block_size=data.seq_len, d_model=64, n_heads=4, n_loops=4)
    model = sdi.LoopedGPT(cfg, seed=0)
    result = sdi.train.train(model, data, sdi.TrainConfig(steps=60, batch_size=32, warmup_steps=20, n_checkpoints=2),
                             progress=False)
    train_b, query_b = data.subset(range(64)).batches(64), parity(4, n_bits=8, seed=9).batches(4)
    ckpts = result.tracin_checkpoints
    exact = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=None, progress=False) \
        .influence(train_b, query_b, ckpts)
    attr = sdi.StepInfluence(model, model.block, loss_fn, progress=False)
    assert attr.sketch_dim == DEFAULT_SKETCH_DIM
    sketch = attr.influence(train_b, query_b, ckpts)
    rel = rel_err(sketch.sdi.double(), exact.sdi.double())
    top_s = sketch.sdi.flatten(1).topk(10, dim=0).indices
    top_e = exact.sdi.flatten(1).topk(10, dim=0).indices
    overlap = float((top_s.unsqueeze(1) == top_e.unsqueeze(0)).any(1).float().mean())
    print(f"default m={DEFAULT_SKETCH_DIM}: relative Frobenius error {rel:.4f}, top-10 overlap {overlap:.3f}")
    assert rel <= 0.05
    assert overlap >= 0.9
