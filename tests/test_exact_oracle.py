"""The hook-based exact path against the untied-copy oracle (torch.func on deep-copied loop bodies)."""

from functools import partial

import pytest
import torch

import sdi
from sdi.tasks import loss_fn, parity, variable_chains
from models import TiedGateBody, TwoModuleLoopNet, next_token_loss, random_batch
from oracle import full_grads, oracle_per_step_grads

RTOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def small_gpt(n_loops=3, seed=0, layers=1, vocab=3, block=16, reinject=True):
    cfg = sdi.LoopedGPTConfig(vocab_size=vocab, block_size=block, d_model=16, n_heads=2, n_loops=n_loops,
                              n_layers_per_loop=layers, reinject=reinject)
    model = sdi.LoopedGPT(cfg, seed=seed)
    with torch.no_grad():  # move away from the symmetric init so every parameter gets a real gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("layers,reinject", [(1, True), (2, False)])
def test_loopedgpt_features_match_untied_oracle(layers, reinject):
    model = small_gpt(n_loops=3, layers=layers, reinject=reinject)
    data = parity(6, n_bits=6, seed=1)
    batch = data.batch(slice(None))
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, sketch_dim=None, progress=False)
    ours = attr.features([batch]).features
    oracle = oracle_per_step_grads(model, ["block"], attr.param_names, loss_fn, batch, n_steps=3)
    assert ours.shape == oracle.shape == (6, 3, attr.n_params)
    for t in range(3):
        assert rel_err(ours[:, t], oracle[:, t]) < RTOL, t


def test_query_with_more_loops_than_training_matches_oracle():
    model = small_gpt(n_loops=3)
    data = parity(5, n_bits=6, seed=2)
    batch = data.batch(slice(None))
    query_loss = partial(loss_fn, n_loops=5)
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, sketch_dim=None, progress=False)
    ours = attr.features([batch], loss_fn=query_loss).features
    oracle = oracle_per_step_grads(model, ["block"], attr.param_names, query_loss, batch, n_steps=5)
    assert ours.shape[1] == 5
    assert rel_err(ours, oracle) < RTOL


def test_user_model_with_two_module_loop_body_matches_oracle():
    """Not LoopedGPT: a list of loop modules, Embedding, RMSNorm, a bare-parameter module, a Linear used twice."""
    model = TwoModuleLoopNet(n_loops=3)
    batch = random_batch(6)
    attr = sdi.StepInfluence(model, loop=[model.mix, model.gate], loss_fn=next_token_loss, sketch_dim=None,
                             progress=False)
    assert "mix.gain.gain" in attr.param_names and "gate.norm.weight" in attr.param_names
    ours = attr.features([batch]).features
    oracle = oracle_per_step_grads(model, ["mix", "gate"], attr.param_names, next_token_loss, batch, n_steps=3)
    assert rel_err(ours, oracle) < RTOL
    # the query side with a different number of loops (2 < 3)
    q_loss = partial(next_token_loss, n_loops=2)
    ours_q = attr.features([batch], loss_fn=q_loss).features
    oracle_q = oracle_per_step_grads(model, ["mix", "gate"], attr.param_names, q_loss, batch, n_steps=2)
    assert ours_q.shape[1] == 2 and rel_err(ours_q, oracle_q) < RTOL


def test_influence_matches_oracle_and_tracin_matches_full_gradients():
    model = small_gpt(n_loops=3, vocab=len(variable_chains(1).tokenizer.symbols), block=32)
    train = variable_chains(10, n_statements=4, max_hops=2, seed=3)
    query = variable_chains(4, n_statements=4, max_hops=2, seed=4)
    q_loss = partial(loss_fn, n_loops=4)
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, sketch_dim=None, progress=False)
    res = attr.influence(train.batches(4), query.batches(3), query_loss_fn=q_loss, step_matrix=True)

    tb, qb = train.batch(slice(None)), query.batch(slice(None))
    phi_train = oracle_per_step_grads(model, ["block"], attr.param_names, loss_fn, tb, 3)   # (N, 3, P)
    phi_query = oracle_per_step_grads(model, ["block"], attr.param_names, q_loss, qb, 4)    # (Q, 4, P)
    m = torch.einsum("nsp,qtp->nqst", phi_train, phi_query)
    assert rel_err(res.step_matrix, m) < RTOL
    assert rel_err(res.sdi, m.sum(2)) < RTOL
    assert rel_err(res.train_sdi, m.sum(3)) < RTOL
    # TracIn from the tied model's own per-example gradients: no per-step machinery involved
    g_train = full_grads(model, attr.param_names, loss_fn, tb)
    g_query = full_grads(model, attr.param_names, q_loss, qb)
    assert rel_err(res.tracin, g_train @ g_query.T) < RTOL


def test_conservation_and_step_matrix_marginals():
    model = small_gpt(n_loops=4)
    train, query = parity(12, n_bits=6, seed=5), parity(5, n_bits=6, seed=6)
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, sketch_dim=None, progress=False)
    res = attr.influence(train.batches(5), query.batches(5), query_loss_fn=partial(loss_fn, n_loops=6),
                         step_matrix=True)
    scale = res.tracin.abs().max()
    assert res.sdi.shape == (12, 5, 6) and res.train_sdi.shape == (12, 5, 4)
    assert res.step_matrix.shape == (12, 5, 4, 6)
    assert torch.allclose(res.sdi.sum(-1), res.tracin, atol=1e-5 * scale, rtol=0)
    assert torch.allclose(res.train_sdi.sum(-1), res.tracin, atol=1e-5 * scale, rtol=0)
    assert torch.allclose(res.step_matrix.sum(2), res.sdi, atol=1e-5 * scale, rtol=0)
    assert torch.allclose(res.step_matrix.sum(3), res.train_sdi, atol=1e-5 * scale, rtol=0)
    assert res.conservation_error() < 1e-5


def test_tracin_over_three_checkpoints_is_eta_weighted_sum(tmp_path):
    train, query = parity(8, n_bits=6, seed=7), parity(3, n_bits=6, seed=8)
    model = small_gpt()
    states = []
    for k in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        states.append({n: v.clone() for n, v in model.state_dict().items()})
    paths = [sdi.save_checkpoint(tmp_path / f"c{k}.pt", s, lr=0.1) for k, s in enumerate(states)]
    etas = [0.5, 0.25, 2.0]
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, sketch_dim=None, progress=False)
    before = {n: v.clone() for n, v in model.state_dict().items()}
    joint = attr.influence(train.batches(4), query.batches(3), checkpoints=list(zip(paths, etas)))
    singles = [attr.influence(train.batches(4), query.batches(3), checkpoints=[(s, 1.0)]) for s in states]
    expected = sum(e * r.tracin for e, r in zip(etas, singles))
    assert rel_err(joint.tracin, expected) < RTOL
    assert rel_err(joint.sdi, sum(e * r.sdi for e, r in zip(etas, singles))) < RTOL
    assert joint.checkpoint_sdi.shape == (3, 8, 3, 3)
    assert rel_err(joint.checkpoint_sdi[1], etas[1] * singles[1].sdi) < RTOL
    # the model's own weights are restored
    assert all(torch.equal(before[n], v) for n, v in model.state_dict().items())


def test_self_influence_is_diagonal_of_influence():
    model = small_gpt()
    data = parity(6, n_bits=6, seed=9)
    attr = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, sketch_dim=None, progress=False)
    self_inf = attr.self_influence(data.batches(4))
    res = attr.influence(data.batches(4), data.batches(6))
    diag = res.sdi[torch.arange(6), torch.arange(6)]  # (N, T): z' = z
    assert rel_err(self_inf, diag) < RTOL
    assert (self_inf.sum(-1) > 0).all()


def test_weight_shared_by_two_layers_in_the_loop_matches_oracle():
    """Two Linear modules holding one Parameter: its phi_t sums both uses within step t."""
    model = TwoModuleLoopNet(n_loops=3)
    model.gate = TiedGateBody(12)
    batch = random_batch(5)
    attr = sdi.StepInfluence(model, loop=[model.mix, model.gate], loss_fn=next_token_loss, sketch_dim=None,
                             progress=False)
    assert [n for n in attr.param_names if n.startswith("gate.")] == ["gate.first.weight", "gate.first.bias",
                                                                       "gate.second.bias"]
    ours = attr.features([batch]).features
    oracle = oracle_per_step_grads(model, ["mix", "gate"], attr.param_names, next_token_loss, batch, n_steps=3)
    assert rel_err(ours, oracle) < RTOL


class InPlaceBody(torch.nn.Module):
    """A loop body that rescales a Linear's output in place (``y.mul_(2)``), as some model code does."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d, d)
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.lin(self.norm(h))
        y.mul_(2.0)
        return h + torch.tanh(y)


class InPlaceNet(torch.nn.Module):
    def __init__(self, vocab: int = 7, d: int = 8) -> None:
        super().__init__()
        self.emb, self.body, self.head = torch.nn.Embedding(vocab, d), InPlaceBody(d), torch.nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor, n_loops: int = 3) -> torch.Tensor:
        h = self.emb(tokens)
        for _ in range(n_loops):
            h = self.body(h)
        return self.head(h)


def test_leaf_output_modified_in_place_matches_oracle():
    """The delta of a layer is the gradient of its output as the layer returned it, also when the model then
    changes that tensor in place (the hooks hang on the returned tensor before the change)."""
    model = InPlaceNet()
    batch = random_batch(4)
    attr = sdi.StepInfluence(model, loop=model.body, loss_fn=next_token_loss, sketch_dim=None, progress=False)
    ours = attr.features([batch]).features
    oracle = oracle_per_step_grads(model, ["body"], attr.param_names, next_token_loss, batch, n_steps=3)
    assert rel_err(ours, oracle) < RTOL
