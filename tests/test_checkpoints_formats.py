"""Every checkpoint layout a user has loads: bare state_dicts, common wrappers, nanoGPT, safetensors, HF folders."""

import json

import pytest
import torch

import sdi
from sdi.checkpoint_formats import read_checkpoint
from models import TwoModuleLoopNet, next_token_loss, random_batch

safetensors = pytest.importorskip("safetensors.torch")


def trained(seed=0, lr=0.05, steps=3):
    """A model, the optimizer state after a few steps with a decayed learning rate, and the lr in force."""
    model = TwoModuleLoopNet(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for i in range(steps):
        opt.zero_grad()
        next_token_loss(model, random_batch(4, seed=i)).mean().backward()
        opt.step()
        sched.step()
    return model, opt, opt.param_groups[0]["lr"]


def influence(model, checkpoints):
    fresh = TwoModuleLoopNet(seed=7)             # different weights: everything must come from the checkpoint
    attr = sdi.StepInfluence(fresh, loop=[fresh.mix, fresh.gate], loss_fn=next_token_loss, sketch_dim=None,
                             progress=False)
    return attr.influence([random_batch(5, seed=10)], [random_batch(2, seed=11)], checkpoints=checkpoints)


@pytest.fixture(scope="module")
def reference():
    model, opt, lr = trained()
    return model, opt, lr, influence(model, [(model.state_dict(), lr)])


@pytest.mark.parametrize("layout", ["bare", "model", "model_state_dict", "state_dict", "nanogpt", "compiled"])
def test_torch_save_layouts_load_and_give_the_same_scores(tmp_path, reference, layout):
    model, opt, lr, ref = reference
    sd = model.state_dict()
    payload = {
        "bare": sd,
        "model": {"model": sd, "optimizer": opt.state_dict()},
        "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": opt.state_dict(), "epoch": 3},
        "state_dict": {"state_dict": sd, "optimizer": opt.state_dict()},
        "nanogpt": {"model": sd, "optimizer": opt.state_dict(), "model_args": {"n_layer": 1}, "iter_num": 30,
                    "best_val_loss": 1.5, "config": {"learning_rate": 6e-4}},
        "compiled": {"model": {"_orig_mod." + k: v for k, v in sd.items()}, "optimizer": opt.state_dict()},
    }[layout]
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    if layout == "bare":          # no optimizer state: eta must be given
        with pytest.raises(ValueError, match=r"carries no learning rate.*pass \(path, eta\)"):
            influence(model, [path])
        res = influence(model, [(path, lr)])
    else:                         # eta omitted: the lr in force, from the optimizer's first param group
        res = influence(model, [path])
        assert res.etas.tolist() == pytest.approx([lr])
        assert lr != opt.defaults["lr"]        # the scheduler moved it: read from the state, not the default
    torch.testing.assert_close(res.sdi, ref.sdi, rtol=1e-6, atol=0)
    if layout == "nanogpt":
        assert read_checkpoint(path).step == 30


def test_safetensors_file_with_tied_weights(tmp_path):
    model = TwoModuleLoopNet(seed=0)
    model.head.weight = model.emb.weight               # a tied head, as in GPT-2: saved once
    path = tmp_path / "model.safetensors"
    safetensors.save_model(model, str(path))
    assert len(safetensors.load_file(str(path))) < len(model.state_dict())
    fresh = TwoModuleLoopNet(seed=3)
    fresh.head.weight = fresh.emb.weight
    attr = sdi.StepInfluence(fresh, loop=[fresh.mix, fresh.gate], loss_fn=next_token_loss, sketch_dim=None,
                             progress=False)
    with sdi.CheckpointWalk(fresh, [(path, 1.0)]) as walk:
        for _ in walk:
            for k, v in model.state_dict().items():
                assert torch.equal(fresh.state_dict()[k], v), k
    res = attr.influence([random_batch(3)], [random_batch(2, seed=1)], checkpoints=[(path, 0.5)])
    assert res.etas.tolist() == [0.5]


def test_hf_save_pretrained_folder_restores_tied_weights_and_reads_trainer_state(tmp_path):
    from models import perturb, tiny_albert

    model = perturb(tiny_albert(seed=0))
    folder = tmp_path / "checkpoint-40"
    model.save_pretrained(folder)
    saved = safetensors.load_file(str(folder / "model.safetensors"))
    assert "predictions.decoder.weight" not in saved           # HF writes one name per tied tensor
    fresh = tiny_albert(seed=5)
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(saved)                           # what loading by hand gives
    with pytest.raises(ValueError, match="carries no learning rate"):
        sdi.checkpoints.resolve_checkpoints([folder])
    # an HF Trainer checkpoint folder also holds the optimizer and the trainer state
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    opt.param_groups[0]["lr"] = 1.25e-4                        # what a scheduler leaves there
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    (ref,) = sdi.checkpoints.resolve_checkpoints([folder])
    assert (ref.eta, ref.step) == (1.25e-4, 40)
    fresh = tiny_albert(seed=5)                                # (the failed load above copied what matched)
    with sdi.CheckpointWalk(fresh, [ref]) as walk:
        for _ in walk:
            for k, v in model.state_dict().items():
                assert torch.equal(fresh.state_dict()[k], v), k
    for k, v in tiny_albert(seed=5).state_dict().items():          # and the model's own weights come back
        assert torch.equal(fresh.state_dict()[k], v), k


def test_unknown_layout_is_one_error_listing_keys_and_layouts(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"weights": [torch.zeros(2)], "epoch": 3}, path)
    with pytest.raises(ValueError) as e:
        sdi.load_checkpoint(path)
    msg = str(e.value)
    assert "found keys ['epoch', 'weights']" in msg
    for layout in ("bare state_dict", "model_state_dict", "nanoGPT", ".safetensors", "save_pretrained"):
        assert layout in msg
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not an HF save_pretrained folder.*notes\.txt"):
        sdi.load_checkpoint(folder)


def test_sdi_checkpoints_still_round_trip(tmp_path):
    model, _, _ = trained()
    path = sdi.save_checkpoint(tmp_path / "c.pt", model.state_dict(), step=12, lr=0.01)
    payload = sdi.load_checkpoint(path)
    assert payload["step"] == 12 and payload["lr"] == 0.01
    (ref,) = sdi.checkpoints.resolve_checkpoints([path])         # eta from the file itself
    assert (ref.eta, ref.step) == (0.01, 12)
