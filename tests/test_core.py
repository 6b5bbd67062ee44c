"""Model, tasks, training and result files."""

import json

import numpy as np
import pytest
import torch

import sdi
from sdi import tasks
from sdi.tasks import IGNORE, accuracy, addition, loss_fn, parity, parity_dataset, variable_chains


@pytest.mark.parametrize("make", [lambda s: parity(20, seed=s), lambda s: addition(20, seed=s),
                                  lambda s: variable_chains(20, seed=s)])
def test_tasks_deterministic_and_round_trip(make):
    a, b, c = make(3), make(3), make(4)
    assert a.texts() == b.texts() and torch.equal(a.tokens, b.tokens)
    assert a.texts() != c.texts()
    for e, row, tgt in zip(a.examples, a.tokens, a.targets):
        full = a.tokenizer.encode(e.text)
        assert a.tokenizer.decode(full) == e.text
        assert a.tokenizer.decode(row) == e.text[:-1]
        answer_ids = tgt[tgt != IGNORE]
        assert a.tokenizer.decode(answer_ids) == e.answer  # loss only on the answer tokens


def test_task_semantics():
    for e in parity(50, n_bits=7, seed=1).examples:
        assert e.answer == str(e.prompt[:-1].count("1") % 2)
    for e in addition(50, n_digits=3, seed=1).examples:
        x, y = e.prompt[:-1].split("+")
        assert int(e.answer) == int(x) + int(y)
    for e in variable_chains(50, n_statements=6, max_hops=3, seed=1).examples:
        *statements, question = e.prompt.split(";")
        env = {}
        for stmt in statements:
            lhs, rhs = stmt.split("=")
            env[lhs] = env[rhs] if rhs in env else rhs
        assert env[question.rstrip("?")] == e.answer
        assert 1 <= e.hops <= 3


def test_parity_exclude_leading_one_and_curriculum():
    test = parity(16, n_bits=6, seed=1, distinct=True, leading_one=True)
    held_out = {e.prompt[:-1] for e in test.examples}
    assert len(held_out) == 16 and all(s.startswith("1") for s in held_out)
    train = parity(500, n_bits=6, seed=0, curriculum=True, exclude=test)
    strings = [e.prompt[:-1] for e in train.examples]
    assert not held_out & set(strings)
    assert {len(s.lstrip("0")) for s in strings} >= {1, 2, 3, 4, 5, 6}  # easy and hard parities side by side
    assert parity(30, n_bits=6, seed=0, curriculum=True).texts() == \
        parity(30, n_bits=6, seed=0, curriculum=True, exclude=[]).texts()  # exclude=None/[] keeps the old stream
    assert parity_dataset(["0110", "1110"]).examples[1].answer == "1"
    with pytest.raises(ValueError, match="exclude leaves no"):
        parity(1, n_bits=2, leading_one=True, exclude=["10", "11"])
    with pytest.raises(ValueError, match="exclude must hold 6-bit"):
        parity(4, n_bits=6, exclude=["0101"])
    with pytest.raises(ValueError, match="distinct bit strings available"):
        parity(17, n_bits=5, distinct=True, leading_one=True)
    with pytest.raises(ValueError, match="cannot be combined"):
        parity(4, curriculum=True, leading_one=True)
    with pytest.raises(TypeError, match="not a single string"):
        parity(4, n_bits=4, exclude="0101")


def test_chain_hops_fixed():
    ds = variable_chains(30, n_statements=6, hops=4, max_hops=4, seed=0)
    assert all(e.hops == 4 for e in ds.examples)


def test_flip_labels_records_indices():
    ds = parity(40, seed=0)
    flipped = ds.flip_labels(fraction=0.25, seed=1)
    assert len(flipped.flipped) == 10
    for i in range(40):
        changed = flipped.examples[i].answer != ds.examples[i].answer
        assert changed == (i in set(flipped.flipped.tolist()))
        assert flipped.clean_answers[i] == ds.examples[i].answer
    again = ds.flip_labels(indices=[3, 5], seed=0)
    assert again.flipped.tolist() == [3, 5]
    with pytest.raises(ValueError, match="indices must lie"):
        ds.flip_labels(indices=[40])
    sub = flipped.subset(flipped.flipped[:3])
    assert sub.flipped.tolist() == [0, 1, 2]


def test_tokenizer_errors():
    tok = parity(2).tokenizer
    with pytest.raises(ValueError, match="outside the alphabet"):
        tok.encode("12")


def test_model_loops_and_logit_lens():
    cfg = sdi.LoopedGPTConfig(vocab_size=5, block_size=10, d_model=16, n_heads=2, n_loops=3)
    model = sdi.LoopedGPT(cfg)
    x = torch.randint(5, (2, 7))
    out = model(x, return_steps=True)
    assert out.logits.shape == (2, 7, 5)
    assert out.hidden_states.shape == (4, 2, 7, 16)
    assert out.step_logits.shape == (3, 2, 7, 5)
    assert torch.allclose(out.step_logits[-1], out.logits, atol=1e-6)
    more = model(x, n_loops=6, return_steps=True)
    assert more.step_logits.shape[0] == 6
    assert torch.allclose(more.step_logits[:3], out.step_logits, atol=1e-6)  # iterations are causal in t
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match="n_loops must be a positive int"):
        model(x, n_loops=0)
    with pytest.raises(ValueError, match="divisible"):
        sdi.LoopedGPTConfig(vocab_size=5, block_size=10, d_model=15, n_heads=2)
    assert sum(p.numel() for p in model.block.parameters()) > 0
    assert model.loop_modules == [model.block]


def test_training_is_deterministic_and_checkpoints_carry_eta(tmp_path):
    data = parity(64, n_bits=6, seed=0)
    cfg = sdi.TrainConfig(steps=30, batch_size=16, n_checkpoints=3, warmup_steps=5, lr=3e-3)

    def run(d):
        model = sdi.LoopedGPT(sdi.LoopedGPTConfig(vocab_size=3, block_size=data.seq_len, d_model=16, n_heads=2))
        return model, sdi.train.train(model, data, cfg, checkpoint_dir=d, progress=False)

    m1, r1 = run(tmp_path / "a")
    m2, r2 = run(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert [c.step for c in r1.checkpoints] == [10, 20, 30]
    for c in r1.checkpoints:
        assert c.lr == pytest.approx(cfg.lr_at(c.step - 1))
        payload = sdi.load_checkpoint(c.path)
        assert payload["lr"] == c.lr and payload["step"] == c.step
        assert json.loads(payload["model_config"])["d_model"] == 16
    last = sdi.load_checkpoint(r1.checkpoints[-1].path)["state_dict"]
    assert all(torch.equal(last[k], v) for k, v in m1.state_dict().items())
    assert not list(tmp_path.glob("**/*.tmp"))  # atomic writes leave no temporaries
    assert r1.tracin_checkpoints[0] == (r1.checkpoints[0].path, r1.checkpoints[0].lr)


def test_atomic_write_is_all_or_nothing(tmp_path):
    from sdi.files import atomic_write

    target = tmp_path / "sub" / "file.bin"
    assert atomic_write(target, lambda f: f.write(b"first")) == target and target.read_bytes() == b"first"

    def crash(f):
        f.write(b"half of the second")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(target, crash)
    assert target.read_bytes() == b"first"               # the old file survives whole
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]  # and no temporary is left


def test_checkpoint_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        sdi.load_checkpoint(path)


def test_lr_schedule():
    cfg = sdi.TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(0.1)
    assert cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(99) == pytest.approx(0.1, abs=1e-3)
    assert all(cfg.lr_at(s) >= cfg.lr_at(s + 1) for s in range(10, 99))


def test_result_save_load_round_trip(tmp_path):
    data = parity(6, n_bits=6, seed=0)
    model = sdi.LoopedGPT(sdi.LoopedGPTConfig(vocab_size=3, block_size=8, d_model=16, n_heads=2, n_loops=2))
    res = sdi.StepInfluence(model, loop=model.block, loss_fn=loss_fn, progress=False).influence(
        data.batches(3), data.batches(2), step_matrix=True)
    path = res.save(tmp_path / "r.npz")
    back = sdi.InfluenceResult.load(path)
    for k in ("sdi", "train_sdi", "tracin", "step_matrix", "checkpoint_sdi", "etas"):
        assert torch.equal(getattr(back, k), getattr(res, k))
    assert back.meta == json.loads(json.dumps(res.meta))
    with np.load(path, allow_pickle=False) as z:  # plain numpy can read it
        assert z["sdi"].shape == (6, 6, 2)
    top = res.top_k(query=1, step=-1, k=3)
    assert torch.equal(top.indices, torch.topk(res.sdi[:, 1, -1], 3).indices)
    opp = res.top_k(query=1, step=None, k=2, opponents=True)
    assert torch.equal(opp.indices, torch.topk(-res.tracin[:, 1], 2).indices)
    assert (opp.scores <= res.tracin[:, 1].max()).all()


def test_accuracy_per_step_shape():
    data = parity(10, n_bits=6)
    model = sdi.LoopedGPT(sdi.LoopedGPTConfig(vocab_size=3, block_size=8, d_model=16, n_heads=2, n_loops=3))
    per = accuracy(model, data, per_step=True)
    assert per.shape == (3,)
    assert float(per[-1]) == pytest.approx(accuracy(model, data))
    losses = tasks.per_example_loss(model, data, per_step=True)
    assert losses.shape == (3, 10)
    assert torch.allclose(losses[-1], loss_fn(model, data.batch(slice(None))), atol=1e-5)


def test_parity_preset_is_consistent():
    train, test, model_config, train_config = sdi.presets.parity_setup(n_bits=5, steps=7)
    assert train_config.steps == 7 and model_config.n_loops == 6
    assert sorted(e.prompt for e in test.examples) == [format(i, "05b") + "=" for i in range(32)]
    assert model_config.vocab_size == train.tokenizer.vocab_size and model_config.block_size == train.seq_len
    logits = sdi.LoopedGPT(model_config)(train.tokens[:2])
    assert logits.shape == (2, train.seq_len, train.tokenizer.vocab_size)
    with pytest.raises(TypeError):
        sdi.presets.parity_setup(not_a_field=1)
