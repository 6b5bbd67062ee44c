"""Every sketched score carries a standard error estimated from the sketches; it is calibrated over seeds."""

import warnings

import pytest
import torch

import sdi
from models import RecurrentDepthNet, TwoModuleLoopNet, lm_batch, next_token_loss, perturb, random_batch


def huginn_loss(model, batch):
    return sdi.losses.causal_lm_loss(lambda input_ids, attention_mask=None: model(input_ids), batch)


def calibration(model, loop, loss, train, query, m, seeds, groups=None, checkpoints=None):
    """(empirical sd / predicted se) per score over ``seeds`` sketches: RMS over scores and per-score median."""
    exact = sdi.StepInfluence(model, loop=loop, loss_fn=loss, sketch_dim=None, progress=False).influence(
        train, query, checkpoints=checkpoints)
    errs, ses = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(seeds):
            res = sdi.StepInfluence(model, loop=loop, loss_fn=loss, sketch_dim=m, seed=seed, groups=groups,
                                    progress=False).influence(train, query, checkpoints=checkpoints)
            errs.append(torch.cat([(res.sdi - exact.sdi).flatten(), (res.tracin - exact.tracin).flatten(),
                                   (res.train_sdi - exact.train_sdi).flatten()]))
            ses.append(torch.cat([res.sdi_se.flatten(), res.tracin_se.flatten(), res.train_sdi_se.flatten()]))
    emp, pred = torch.stack(errs).pow(2).mean(0).sqrt(), torch.stack(ses).pow(2).mean(0).sqrt()
    return float(emp.pow(2).mean().sqrt() / pred.pow(2).mean().sqrt()), float((emp / pred).median())


@pytest.mark.parametrize("which", ["two_module", "huginn", "two_module_groups"])
def test_standard_error_is_within_1_5x_of_the_empirical_spread_over_seeds(which):
    if which == "huginn":
        model = perturb(RecurrentDepthNet())
        args = (model, model.core, huginn_loss, [lm_batch(4, vocab=11, seed=1)], [lm_batch(2, vocab=11, seed=2)])
    else:
        model = TwoModuleLoopNet(seed=0)
        args = (model, [model.mix, model.gate], next_token_loss, [random_batch(6, seed=1)], [random_batch(3, seed=2)])
    rms, median = calibration(*args, m=128, seeds=24, groups="module" if which.endswith("groups") else None)
    assert 1 / 1.5 < rms < 1.5 and 1 / 1.5 < median < 1.5, (rms, median)


def test_standard_error_over_checkpoints_is_conservative():
    """K checkpoints share one sketch: the summed standard errors bound the spread (equal for aligned terms)."""
    model = TwoModuleLoopNet(seed=0)
    other = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    rms, median = calibration(model, [model.mix, model.gate], next_token_loss, [random_batch(6, seed=1)],
                              [random_batch(3, seed=2)], m=128, seeds=16,
                              checkpoints=[(model.state_dict(), 0.5), (other, 0.25)])
    assert rms < 1.5 and median < 1.5, (rms, median)


def test_small_sketch_warns_and_top_k_reports_standard_errors():
    model = perturb(RecurrentDepthNet())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attr = sdi.StepInfluence(model, loop=model.core, loss_fn=huginn_loss, sketch_dim=32, progress=False)
    train, query = [lm_batch(6, vocab=11, seed=1)], [lm_batch(2, vocab=11, seed=2)]
    with pytest.warns(UserWarning, match=r"sketch is too small.*predicted relative error.*larger sketch_dim \(now 32"):
        res = attr.influence(train, query)
    assert res.meta["predicted_relative_error"] > 0.1
    top = res.top_k(0, step=1, k=3, se=True)
    assert torch.equal(top.se, res.sdi_se[top.indices, 0, 1]) and (top.se > 0).all()
    by_tracin = res.top_k(1, k=2, se=True)
    assert torch.equal(by_tracin.se, res.tracin_se[by_tracin.indices, 1])
    idx, scores = res.top_k(0, step=1, k=3)                         # the plain TopK still unpacks in two
    assert torch.equal(idx, top.indices)
    exact = sdi.StepInfluence(model, loop=model.core, loss_fn=huginn_loss, sketch_dim=None,
                              progress=False).influence(train, query)
    assert exact.sdi_se is None
    with pytest.raises(ValueError, match="no standard errors"):
        exact.top_k(0, se=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = sdi.StepInfluence(model, loop=model.core, loss_fn=huginn_loss, sketch_dim=1 << 16, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)                 # a large sketch on the same model: no warning
        big = big.influence(train, query)
    assert big.meta["predicted_relative_error"] < 0.1
