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
    gen = torch.Generator().manual_seed(seed)  # seeded: the same call gives the same model (CPU and CUDA tests)
    with torch.no_grad():  # leave the symmetric init so every parameter has a real gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def split_flat(flat: torch.Tensor, slots) -> list[torch.Tensor]:
    """(..., P) exact features -> one (..., *shape) tensor per parameter slot."""
    parts = torch.split(flat, [s.numel for s in slots], dim=-1)
    return [p.reshape(*flat.shape[:-1], *s.shape) for p, s in zip(parts, slots)]


def naive_count_sketch(featurizer: SketchFeaturizer, grads: list[torch.Tensor]) -> torch.Tensor:
    """The definition, one coordinate at a time: parameter p owns buckets [start_p, start_p + m_p); flat index
    k = i * cols + j of a matrix goes to bucket start_p + (h_r(i) + h_c(j)) mod m_p with sign s_r(i) s_c(j); a
    vector's coordinate i to start_p + h(i) with sign s(i). (m,)"""
    out = torch.zeros(featurizer.sketch_dim, dtype=torch.float64)
    for slot, g in zip(featurizer.slots, grads):
        spec = featurizer.specs[id(slot.param)]
        _, start, m_p = featurizer.blocks[id(slot.param)]
        flat = g.double().reshape(-1).tolist()
        if isinstance(spec, TensorSketch):
            cols = spec.shape[1]
            hr, hc = spec.rows.buckets.tolist(), spec.cols.buckets.tolist()
            sr, sc = spec.rows.signs.tolist(), spec.cols.signs.tolist()
            for k, v in enumerate(flat):
                i, j = divmod(k, cols)
                out[start + (hr[i] + hc[j]) % m_p] += sr[i] * sc[j] * v
        else:
            h, s = spec.buckets.tolist(), spec.signs.tolist()
            for k, v in enumerate(flat):
                out[start + h[k]] += s[k] * v
    return out


def test_blocks_partition_the_buckets_among_matrices_and_vectors_use_all():
    """In every group the matrices get consecutive, disjoint, equal blocks of about m / n_matrices buckets (a block of
    64 or more rounded down to an FFT-friendly length, by at most a few percent); vectors (biases, norm gains) are
    sketched over all m buckets of their group."""
    model = small_gpt(d=32)
    for groups, m in [(None, 4096), (None, 300), ("module", 1000)]:
        f = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=m, groups=groups, progress=False).featurizer
        for g in range(f.n_groups):
            members = [s for s in f.slots if f.blocks[id(s.param)][0] == g]
            matrices = [s for s in members if len(s.shape) == 2]
            for s in members:
                if len(s.shape) != 2:
                    assert f.blocks[id(s.param)] == (g, 0, m)
            if not matrices:
                continue
            spans = sorted(f.blocks[id(s.param)][1:] for s in matrices)
            assert spans[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
            assert 0.96 * m <= spans[-1][0] + spans[-1][1] <= m
            for s in matrices:
                size, ideal = f.blocks[id(s.param)][2], m / len(matrices)
                assert 0.96 * ideal - 1 <= size <= ideal, (s.name, size, ideal)
                assert size < 64 or sdi.sketch.smooth_floor(size) == size
    assert [sdi.sketch.smooth_floor(n) for n in (4099, 4096, 1031, 7)] == [4096, 4096, 1029, 7]
    with pytest.raises(ValueError, match="sketch_dim must be at least the number of matrix parameters"):
        sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=4, progress=False)


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


def features_on(device: str, case, kernel: str) -> tuple[torch.Tensor, dict]:
    """Sketched features (moved to the CPU) and the fingerprint of one test model, computed on ``device``."""
    model, loop, _, lf, batch = case()
    model = model.to(device)                                   # in place: ``loop`` still names its modules
    attr = sdi.StepInfluence(model, loop=loop, loss_fn=lf, sketch_dim=97, seed=1, progress=False)
    attr.featurizer.linear_kernel = kernel
    feats = attr.features([{k: v.to(device) for k, v in batch.items()}]).features
    assert feats.device.type == torch.device(device).type
    return feats.cpu(), attr.fingerprint()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: compares every kernel on the GPU "
                    "with the same kernel on the CPU")
@pytest.mark.parametrize("case", [_user_model_case, _two_layer_gpt_case], ids=["user-model", "gpt-2-layers"])
@pytest.mark.parametrize("kernel", ["fft", "outer"])
def test_every_kernel_gives_the_same_features_on_cuda(case, kernel):
    """Linear (FFT and direct kernels), LayerNorm, RMSNorm, Embedding and the generic path, on CUDA and on the CPU:
    the same features up to float rounding, and the same fingerprint (the hashes are moved, never redrawn)."""
    on_cpu, fp_cpu = features_on("cpu", case, kernel)
    on_gpu, fp_gpu = features_on("cuda", case, kernel)
    check_fingerprints(fp_cpu, fp_gpu)
    assert rel_err(on_gpu, on_cpu) < 1e-4


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
    """Test-time compute (5 loops on a 3-loop model) and groups='module' or a callable: each group's sketch is the
    sketch of its own parameters alone (in blocks of that group's m buckets), equal to the dense definition applied
    to the untied oracle's per-step gradients."""
    model = small_gpt(n_loops=3)
    batch = parity(5, n_bits=6, seed=2).batch(slice(None))
    q_loss = partial(loss_fn, n_loops=5)
    grouped = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=128, groups="module", progress=False)
    plain = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=128, progress=False)
    fg = grouped.features([batch], loss_fn=q_loss).features
    assert grouped.featurizer.group_names == ["attention", "mlp", "norm"]
    assert fg.shape == (5, 5, 3, 128)
    phi = split_flat(oracle_per_step_grads(model, ["block"], grouped.param_names, q_loss, batch, 5), grouped.slots)
    assert rel_err(fg, grouped.featurizer.dense(phi)) < ROUNDING
    assert rel_err(plain.features([batch], loss_fn=q_loss).features, plain.featurizer.dense(phi)) < ROUNDING
    norm = grouped.featurizer.group_names.index("norm")
    only_norm = [g if ".ln" in s.name else torch.zeros_like(g) for g, s in zip(phi, grouped.slots)]
    assert rel_err(fg[:, :, norm], grouped.featurizer.dense(only_norm)[:, :, norm]) < ROUNDING
    assert float(grouped.featurizer.dense(only_norm)[:, :, :norm].abs().max()) == 0.0
    custom = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=128, progress=False,
                               groups=lambda name: "weights" if name.endswith("weight") else "biases")
    assert custom.featurizer.group_names == ["weights", "biases"]
    phi3 = split_flat(oracle_per_step_grads(model, ["block"], custom.param_names, loss_fn, batch, 3), custom.slots)
    assert rel_err(custom.features([batch]).features, custom.featurizer.dense(phi3)) < ROUNDING


# ------------------------------------------------------------------------------------------ statistics

def _gradient_pairs(n_pairs: int = 4) -> tuple[SketchFeaturizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Real gradients of a small LoopedGPT: (total gradient of a train example, step-t gradient of a query)."""
    model = small_gpt(d=16, n_loops=3)
    data = parity(8, n_bits=6, seed=4)
    attr = sdi.StepInfluence(model, model.block, loss_fn, sketch_dim=None, progress=False)
    phi = attr.features([data.batch(slice(None))]).features.double()     # (8, 3, P)
    pairs = [(phi[i].sum(0), phi[4 + i, i % 3]) for i in range(n_pairs)]
    return attr, pairs


def _sketched_inner_products(attr, pairs, m: int, seeds: range) -> torch.Tensor:
    """<S x, S y> for every seed and pair: (len(seeds), len(pairs)), float64."""
    out = torch.zeros(len(seeds), len(pairs), dtype=torch.float64)
    xs = split_flat(torch.stack([x for x, _ in pairs]).float(), attr.slots)
    ys = split_flat(torch.stack([y for _, y in pairs]).float(), attr.slots)
    for i, seed in enumerate(seeds):
        f = SketchFeaturizer(attr.slots, m, seed=seed)
        out[i] = (f.dense(xs).double() * f.dense(ys).double()).sum(-1)
    return out


def count_sketch_variance(x: torch.Tensor, y: torch.Tensor, m: int) -> float:
    """Var <Sx, Sy> = (||x||^2 ||y||^2 + <x,y>^2 - 2 sum_i x_i^2 y_i^2) / m for a CountSketch."""
    return float((x.dot(x) * y.dot(y) + x.dot(y) ** 2 - 2 * (x * x * y * y).sum()) / m)


def tensor_sketch_variance(X: torch.Tensor, Y: torch.Tensor, m: int) -> float:
    """Exact Var <SX, SY> of a TensorSketch (bucket (h1(i) + h2(j)) mod m) of matrices X, Y: the CountSketch terms
    plus the 'rectangle' terms of index pairs that share a row hash and a column hash (book chapter 4, where it is
    checked against a full enumeration of hashes)."""
    X, Y = X.double(), Y.double()
    both = (X ** 2 * Y ** 2).sum()
    rx, ry, rxy = (X ** 2).sum(1), (Y ** 2).sum(1), (X * Y).sum(1)
    cx, cy, cxy = (X ** 2).sum(0), (Y ** 2).sum(0), (X * Y).sum(0)
    XtY, XYt = X.T @ Y, X @ Y.T
    var_cs = (X ** 2).sum() * (Y ** 2).sum() + (X * Y).sum() ** 2 - 2 * both
    rect_1 = (XtY ** 2).sum() - (rx * ry).sum() - (cxy ** 2).sum() + both
    rect_2 = (XYt ** 2).sum() - (rxy ** 2).sum() - (cx * cy).sum() + both
    rect_3 = torch.trace(XtY @ XtY) - (rxy ** 2).sum() - (cxy ** 2).sum() + both
    return float(var_cs / m + (1 / m + math.gcd(2, m) / m ** 2) * (rect_1 + rect_2) + 2 * rect_3 / m)


def block_sketch_variance(attr, x: torch.Tensor, y: torch.Tensor, m: int) -> float:
    """Exact Var <Sx, Sy> of the layout: matrix i is TensorSketched into its own block of m_i buckets, all vector
    coordinates (v) are CountSketched over all m, with independent hashes, so

        sum_i TS(x_i, y_i; m_i) + V(x_v, y_v; m) + sum_i (|x_i|^2 |y_v|^2 + |x_v|^2 |y_i|^2 + 2 <x_i,y_i><x_v,y_v>) / m

    (matrices never collide with each other; a matrix and a vector coordinate collide with probability 1/m)."""
    f = SketchFeaturizer(attr.slots, m)
    parts = dict(zip([id(s.param) for s in attr.slots], zip(torch.split(x, [s.numel for s in attr.slots]),
                                                            torch.split(y, [s.numel for s in attr.slots]))))
    vec = [parts[id(s.param)] for s in attr.slots if len(s.shape) != 2]
    xv, yv = torch.cat([p for p, _ in vec]), torch.cat([q for _, q in vec])
    var = count_sketch_variance(xv, yv, m)
    for s in attr.slots:
        if len(s.shape) == 2:
            xi, yi = parts[id(s.param)]
            var += tensor_sketch_variance(xi.reshape(s.shape), yi.reshape(s.shape), f.blocks[id(s.param)][2])
            var += float(xi.dot(xi) * yv.dot(yv) + xv.dot(xv) * yi.dot(yi) + 2 * xi.dot(yi) * xv.dot(yv)) / m
    return var


def test_sketched_inner_products_are_unbiased_over_200_seeds():
    attr, pairs = _gradient_pairs()
    m, n = 256, 200
    est = _sketched_inner_products(attr, pairs, m, range(n))
    for j, (x, y) in enumerate(pairs):
        exact = float(x.dot(y))
        theory_se = math.sqrt(block_sketch_variance(attr, x, y, m) / n)
        empirical_se = float(est[:, j].std() / math.sqrt(n))
        assert 0.6 < empirical_se / theory_se < 1.5, (empirical_se, theory_se)
        assert abs(float(est[:, j].mean()) - exact) < 4.5 * max(theory_se, empirical_se), j
    # the bound has teeth: it would catch any bias above 4% of ||x|| ||y||
    for x, y in pairs:
        assert 4.5 * math.sqrt(block_sketch_variance(attr, x, y, m) / n) < 0.04 * float(x.norm() * y.norm())


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
            assert 0.5 < measured / block_sketch_variance(attr, x, y, m) < 1.7, (m, j)
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
