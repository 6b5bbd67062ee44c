"""Per-(example, step) gradient features of the loop parameters, one batch at a time.

For an ``nn.Linear`` weight used at step ``t`` the per-example gradient is an outer product summed over
token positions ``n``::

    phi_t(W; z) = sum_n delta_{t,n} (x) a_{t,n}        delta: backprop into the output, a: the input

and similar closed forms hold for biases, LayerNorm/RMSNorm and embeddings (:mod:`sdi.leaves`).
:func:`batch_features` runs the loss under :class:`sdi.capture.StepCapture`, back-propagates, and lets a
featurizer (:mod:`sdi.featurizers`: exact, or sketched) turn the recorded calls into features ``(B, T, D)``;
:class:`StepFeatures` holds the result with the fingerprint of what made it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .capture import CaptureError, LeafCalls, ParamSlot, StepCapture
from .featurizers import Featurizer
from .fingerprints import check_fingerprints


# ------------------------------------------------------------------------------------------ features

@dataclass
class StepFeatures:
    """Features of N examples at every step.

    Fields::

        features:    (N, T, *feature_shape) float32 — features[:, t] represents phi_{t+1}
        losses:      (N,)  per-example loss at these weights
        fingerprint: what made them (featurizer kind, sketch seed and size, parameter layout)
    """

    features: torch.Tensor
    losses: torch.Tensor
    fingerprint: dict[str, Any] = field(default_factory=dict)

    @property
    def n_steps(self) -> int:
        return self.features.shape[1]

    def __len__(self) -> int:
        return self.features.shape[0]

    def total(self) -> torch.Tensor:
        """Feature of the full (tied) gradient: ``sum_t phi_t`` -> ``(N, *feature_shape)``."""
        return self.features.sum(1)

    def check_compatible(self, other: "StepFeatures") -> None:
        check_fingerprints(self.fingerprint, other.fingerprint)


def batch_features(
    model: nn.Module,
    loop_modules: list[nn.Module],
    leaves: dict[str, nn.Module],
    featurizer: Featurizer,
    loss_fn: Callable,
    batch: Any,
    expected_steps: int | None = None,
    check: bool = True,
    on_steps: Callable[[int, list[int]], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of one batch: ``(features (B, T, *feature_shape), losses (B,))``.

    Runs ``loss_fn(model, batch)`` under :class:`~sdi.capture.StepCapture`, back-propagates the summed loss to the
    outputs of the loop's layers and builds the features. With ``check`` it also asks autograd for the
    loop parameters' batch gradient and raises :class:`~sdi.CaptureError` unless the features add up to it —
    proof that the hooks saw every use of every parameter. Callers check the first batch of every pass:
    which parameters the hooks see is a property of the model's code, not of the data.

    A batch in which no iteration produced a gradient (the loop ran under ``no_grad``, or its state was detached)
    raises :class:`~sdi.CaptureError`: its features would be exactly 0. ``on_steps(T, steps_without_gradient)``
    is told which iterations had none (truncated backprop; their features are 0, correctly).
    """
    params = [s.param for s in featurizer.slots]
    with StepCapture(model, loop_modules, leaves) as cap:
        losses = loss_fn(model, batch)
    cap.raise_errors()
    _check_losses(losses)
    T = cap.n_steps
    if expected_steps is not None and T != expected_steps:
        raise ValueError(
            f"the loop ran {T} times on this batch but {expected_steps} times on earlier ones; all batches passed "
            "to one call must use the same number of iterations"
        )
    B = losses.shape[0]
    _check_batch_dims(cap, B)
    out = torch.zeros(B, T, *featurizer.feature_shape, device=losses.device, dtype=torch.float32)
    target = featurizer.target(out)
    batch_grads = featurizer.zero_batch_grads() if check else None
    grad_steps: set[int] = set()
    deferred: list[tuple[LeafCalls, int]] = []

    def featurize_call(rec: LeafCalls, call: int) -> None:
        with torch.no_grad():   # features are data: never part of an autograd graph (torch.func's grad still works)
            featurizer.add(cap, rec, call, target)
            if batch_grads is not None:
                featurizer.add_batch_grad(batch_grads, cap, rec, call)
        grad_steps.add(rec.steps[call])
        rec.release(call)

    def on_call(rec: LeafCalls, call: int) -> None:
        # during the backward pass; the generic kind re-runs the module under torch.func, so it waits for the end
        if featurizer.kind_of(rec.module).native:
            featurize_call(rec, call)
        else:
            deferred.append((rec, call))

    true_grads = cap.backward(losses, params if check else None, on_call)
    for rec, call in deferred:
        featurize_call(rec, call)
    if not grad_steps:
        raise CaptureError(_no_gradient_message(cap, T))
    with torch.no_grad():
        featurizer.finish(target)
        if check:
            low_precision = [p.dtype for p in params if p.dtype not in (torch.float32, torch.float64)]
            check_gradients_match(featurizer.slots, batch_grads, true_grads,
                                  low_precision[0] if low_precision else losses.dtype)
    if on_steps is not None:
        on_steps(T, sorted(set(range(T)) - grad_steps))
    return out, losses.detach().float()


def _check_batch_dims(cap: StepCapture, B: int) -> None:
    """Every recorded leaf input must have the batch dimension of the losses; name the module and input if not."""
    for rec in cap.calls.values():
        named = [(f"args[{i}]", a) for i, a in enumerate(rec.args[0])] + list(rec.kwargs[0].items())
        for where, a in named:
            if torch.is_tensor(a) and a.dim() > 0 and a.shape[0] != B:
                if a.shape[0] == 1:
                    raise ValueError(
                        f"module '{rec.name}' received {where} of shape {tuple(a.shape)}, broadcast over the batch "
                        f"of {B} (e.g. position ids of shape (1, T)), and that input carries a gradient, so its "
                        f"per-example share cannot be recovered; expand it to the batch ({B}, ...) before the call, "
                        f"or exclude the module's parameters with requires_grad_(False)")
                raise ValueError(
                    f"loss_fn returned {B} losses but module '{rec.name}' saw {where} with a batch of {a.shape[0]}; "
                    "loss_fn must return one loss per example, shape (B,)")
            if torch.is_tensor(a) and a.dim() > 0:
                break   # the first tensor input decides: later ones may be shared tables (e.g. a rotary cache)


def _no_gradient_message(cap: StepCapture, T: int) -> str:
    if cap.no_grad_steps:
        cause = ("torch.inference_mode" if cap.inference_mode else "torch.no_grad") + \
            f": the loop's layers ran with gradients disabled in {len(cap.no_grad_steps)} of {T} iteration(s) " \
            "and no iteration produced a gradient"
    else:
        cause = "the loop's outputs do not reach the loss with a gradient (a detached state, e.g. h.detach())"
    return (f"no loop iteration carries a gradient ({cause}), so every SDI and TracIn score would be exactly 0. "
            "Run at least the iterations to attribute with gradients enabled (e.g. Huginn-style models: pass the "
            "number of steps with gradient explicitly instead of running the loop under no_grad)")


def _check_losses(losses: Any) -> None:
    if not torch.is_tensor(losses):
        raise TypeError(f"loss_fn must return a tensor of per-example losses, got {type(losses).__name__}")
    if losses.dim() != 1 or losses.shape[0] == 0:
        raise ValueError(
            f"loss_fn must return one loss per example, a tensor of shape (B,) with B >= 1; got shape "
            f"{tuple(losses.shape)} (did it average over the batch?)"
        )
    if not losses.requires_grad:
        raise ValueError("loss_fn returned losses that do not depend on any trainable parameter (requires_grad=False)")
    bad = (~torch.isfinite(losses.detach())).nonzero().flatten()
    if len(bad):
        raise FloatingPointError(
            f"loss_fn returned non-finite losses for {len(bad)} example(s) of the batch (first at batch position "
            f"{int(bad[0])}: {losses[bad[0]].item()}); influence is undefined for them"
        )


def check_gradients_match(slots: list[ParamSlot], captured: dict[int, torch.Tensor], expected: Sequence,
                          dtype: torch.dtype) -> None:
    """Raise :class:`~sdi.CaptureError` naming every slot whose ``captured[id(param)]`` differs from ``expected``.

    ``expected`` holds autograd's batch gradient per slot (None = unused), or any fixed linear image of it
    (a sketch) as long as ``captured`` lives in the same space.
    """
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    pairs = []
    for s, g in zip(slots, expected):
        got = captured[id(s.param)]
        g = torch.zeros_like(got) if g is None else g.float()
        if not torch.isfinite(g).all():
            raise FloatingPointError(f"the gradient of parameter '{s.name}' is not finite")
        pairs.append((s, got, g))
    # A gradient that is zero in exact arithmetic (e.g. a key bias, which softmax ignores) is rounding noise on
    # both sides: judge every slot against a floor set by the whole gradient, not by its own norm.
    floor = 1e-4 * torch.sqrt(sum(g.norm() ** 2 for _, _, g in pairs))
    missing = []
    for s, got, g in pairs:
        diff = (got - g).norm()
        if diff > tol * torch.maximum(g.norm(), floor) + 1e-12:
            missing.append(f"{s.name} (relative error {float(diff / g.norm().clamp_min(1e-30)):.1e})")
    if missing:
        raise CaptureError(
            f"the per-step gradients captured by the hooks do not add up to the autograd gradient for parameter(s) "
            f"{missing}. Such a parameter is used where the hooks cannot see it: read directly as a tensor (e.g. "
            "F.linear(x, self.weight) in a parent module, or fused weights as in nn.MultiheadAttention) or shared "
            "with a module outside `loop`. Wrap that use in an nn.Module of its own (nn.Linear, ...) inside the "
            "loop, or exclude the parameter with requires_grad_(False)."
        )
