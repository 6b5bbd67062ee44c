"""Every kernel gives the same numbers on a CUDA device as on the CPU, up to float rounding.

The CUDA test runs where a CUDA device is visible (and is skipped, saying so, where none is). The same comparison
also runs CPU against CPU on every machine, so the comparison itself (moving a model, its loop and its batches to
another device, then reading features and scores back) is exercised everywhere, not only on GPU machines.

Covered: the exact features, both Linear sketch kernels (FFT and direct), LayerNorm, RMSNorm, Embedding, a Linear
used twice per step, the generic ``torch.func`` path (``models.Gain``), and the scoring core (``influence``).
"""

from __future__ import annotations

import pytest
import torch

import sdi
from sdi.tasks import loss_fn, parity
from models import TwoModuleLoopNet, next_token_loss, random_batch

# float32 FFTs, scatters and GEMMs in another order on another device: relative error of a whole tensor
ROUNDING = 1e-4


def _user_model():
    torch.manual_seed(0)
    model = TwoModuleLoopNet(n_loops=3)
    return model, lambda m: [m.mix, m.gate], next_token_loss, random_batch(6)


def _looped_gpt():
    cfg = sdi.LoopedGPTConfig(vocab_size=3, block_size=16, d_model=16, n_heads=2, n_loops=3, n_layers_per_loop=2)
    model = sdi.LoopedGPT(cfg, seed=0)
    with torch.no_grad():  # leave the symmetric init so every parameter has a real gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model, lambda m: m.block, loss_fn, parity(6, n_bits=6, seed=1).batch(slice(None))


def _on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _results(case, device: torch.device, sketch_dim: int | None, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (B, T, D), SDI (Q, B, T)) of ``case`` computed on ``device``, returned on the CPU."""
    model, loop, lf, batch = case()
    model = model.to(device)
    attr = sdi.StepInfluence(model, loop=loop(model), loss_fn=lf, sketch_dim=sketch_dim, seed=1, progress=False)
    if sketch_dim is not None:
        attr.featurizer.linear_kernel = kernel
    batch = _on(batch, device)
    features = attr.features([batch]).features
    scores = attr.influence([batch], [batch]).sdi
    assert features.device.type == torch.device(device).type
    return features.float().cpu(), scores.float().cpu()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _compare(device: str) -> None:
    for case in (_user_model, _looped_gpt):
        for sketch_dim, kernel in ((None, "-"), (97, "fft"), (97, "outer")):
            cpu_features, cpu_scores = _results(case, torch.device("cpu"), sketch_dim, kernel)
            dev_features, dev_scores = _results(case, torch.device(device), sketch_dim, kernel)
            where = f"{case.__name__}, sketch_dim={sketch_dim}, kernel={kernel}"
            assert cpu_features.abs().sum() > 0, where
            assert _rel_err(dev_features, cpu_features) < ROUNDING, where
            assert _rel_err(dev_scores, cpu_scores) < ROUNDING, where


def test_the_device_comparison_runs_on_the_cpu_too() -> None:
    _compare("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_every_kernel_gives_the_cpu_numbers_on_cuda() -> None:
    _compare("cuda")
