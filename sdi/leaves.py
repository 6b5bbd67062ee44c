"""Module kinds: how the per-example gradient of one layer type's own parameters follows from one recorded call.

:class:`sdi.capture.StepCapture` records, for every call of every parameterised module inside the loop, its
inputs and the backprop ``delta`` into its output. From these the per-example gradient of the module's own
parameters *at that call's step* follows, in closed form for the layers a transformer is made of. The
kinds known in closed form::

    Linear               phi(W) = sum_n delta_n (x) a_n,  phi(b) = sum_n delta_n
    Conv1D (transformers) the same with W stored transposed: phi(W) = sum_n a_n (x) delta_n
    LayerNorm, RMSNorm   phi(gain) = sum_n delta_n * x_hat_n,  phi(bias) = sum_n delta_n
    Embedding            phi(E) = sum_n onehot(id_n) (x) delta_n
    anything else        torch.func: vmap(grad(...)) of the module re-run on its recorded inputs

Each kind is one class, looked up by the module's type (:func:`leaf_kind`; a subclass that keeps its parent's
``forward`` gets the parent's kind), with four methods: its per-example
gradient (the exact feature), its batch gradient (for the completeness check against autograd), and how it adds
itself to an exact and to a sketched feature. The base class derives the last three from the first, so a new
kind needs only ``per_example``; the closed-form kinds override the others with faster routes (a batched matmul
written straight into the feature, a TensorSketch that never forms the gradient). Closed-form kinds run inside
the backward pass, as each call's ``delta`` arrives, under ``no_grad`` (the generic kind runs after it). Adding a
kind::

    @sdi.leaves.register_leaf_kind(MyScale)
    class ScaleLeaf(sdi.leaves.LeafKind):
        def per_example(self, cap, rec, call, attrs):
            x, delta = rec.args[call][0], rec.grad_outputs[call][0]
            return {"scale": (x * delta).flatten(1).sum(1)}
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .capture import LeafCalls, ParamSlot, StepCapture
from .sketch import TensorSketch, embedding_sketch, tensor_sketch_fft, tensor_sketch_outer

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .featurizers import BatchTarget, SketchFeaturizer

Grads = dict[str, torch.Tensor]
Dest = Callable[[ParamSlot], torch.Tensor]   # slot -> (B, *slot.shape) view of the feature to add into


def tokens_last(x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, ..., width) -> (B, N, width): every leading position after the batch dimension is a 'token'."""
    return x.reshape(x.shape[0], -1, width)


class LeafKind:
    """How per-example gradients of one module's own parameters are computed from its recorded calls.

    ``attrs`` are the attribute names (``"weight"``, ``"bias"``, ...) of the attributed parameters the module
    owns; ``call`` indexes the module's recorded calls. Subclasses must define :meth:`per_example`.
    """

    #: True for a closed-form kind; False for the generic torch.func re-evaluation.
    native: bool = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        """Whether this kind's closed form applies to ``module`` (e.g. no ``max_norm`` on an Embedding)."""
        return True

    def per_example(self, cap: StepCapture, rec: LeafCalls, call: int, attrs: list[str]) -> Grads:
        """``{attr: (B, *param.shape)}``: the per-example gradient of each parameter at this call."""
        raise NotImplementedError

    def batch_grad(self, cap: StepCapture, rec: LeafCalls, call: int, attrs: list[str]) -> Grads:
        """``{attr: param.shape}``: the gradient of the summed loss at this call (no per-example tensor needed)."""
        return {a: g.sum(0) for a, g in self.per_example(cap, rec, call, attrs).items()}

    def add_exact(self, cap: StepCapture, rec: LeafCalls, call: int, slots: list[tuple[str, ParamSlot]],
                  dest: Dest) -> None:
        """Add the per-example gradients into the exact feature, ``dest(slot)`` being its ``(B, *shape)`` view."""
        grads = self.per_example(cap, rec, call, [a for a, _ in slots])
        for attr, slot in slots:
            dest(slot).add_(grads[attr].reshape(dest(slot).shape))

    def add_sketch(self, cap: StepCapture, rec: LeafCalls, call: int, slots: list[tuple[str, ParamSlot]],
                   sketcher: "SketchFeaturizer", target: "BatchTarget", step: int) -> None:
        """Add the sketches of the per-example gradients (formed densely, then CountSketched) into ``target``."""
        grads = self.per_example(cap, rec, call, [a for a, _ in slots])
        for attr, slot in slots:
            g = grads[attr].float()                                             # (B, *shape)
            spec = sketcher.spec(slot, g.device)
            rows = target.rows(step, sketcher.group_of[id(slot.param)])
            if isinstance(spec, TensorSketch):
                spec.add_into(rows, g, sketcher.max_chunk_elements)
            else:
                spec.add_into(rows, g.reshape(g.shape[0], -1))


#: Closed-form kinds by exact module type; anything else is :class:`GenericLeaf`.
LEAF_KINDS: dict[type, type[LeafKind]] = {}


def register_leaf_kind(*module_types: type) -> Callable[[type[LeafKind]], type[LeafKind]]:
    """Class decorator: use this :class:`LeafKind` for modules of exactly these types."""
    def register(kind: type[LeafKind]) -> type[LeafKind]:
        if not (isinstance(kind, type) and issubclass(kind, LeafKind)):
            raise TypeError(f"register_leaf_kind decorates LeafKind subclasses, got {kind!r}")
        for t in module_types:
            LEAF_KINDS[t] = kind
        return kind
    return register


#: Closed-form kinds recognised by a predicate rather than a type we can import (transformers' Conv1D: sdi never
#: imports transformers).
NAMED_KINDS: list[tuple[Callable[[nn.Module], bool], type[LeafKind]]] = []


def _lookup(module: nn.Module) -> tuple[type[LeafKind] | None, str]:
    """``(kind, "")`` for a closed-form kind, else ``(None, why the module takes the generic path)``.

    A subclass of a registered type gets the parent's kind when it keeps the parent's ``forward``.
    """
    t = type(module)
    for base in t.__mro__:
        kind = LEAF_KINDS.get(base)
        if kind is None:
            continue
        if base is not t and getattr(t, "forward", None) is not getattr(base, "forward", None):
            return None, f"{t.__name__} subclasses {base.__name__} but overrides forward"
        if not kind.accepts(module):
            return None, f"{t.__name__} uses options the {kind.__name__} closed form does not cover"
        return kind, ""
    for matches, kind in NAMED_KINDS:
        if matches(module) and kind.accepts(module):
            return kind, ""
    has_children = any(True for _ in module.children())
    if has_children:
        return None, (f"{t.__name__} owns parameter(s) directly besides its child layers (re-run whole under "
                      "torch.func); wrapping such a parameter in a module of its own makes it cheaper")
    return None, (f"no closed-form kind for {t.__module__}.{t.__qualname__}; register one with "
                  "@sdi.leaves.register_leaf_kind")


def leaf_kind(module: nn.Module) -> LeafKind:
    """The :class:`LeafKind` that computes ``module``'s per-example gradients."""
    kind, _ = _lookup(module)
    return kind(module) if kind is not None else GenericLeaf(module)


def generic_reason(module: nn.Module) -> str:
    """Why ``module`` takes the generic torch.func path ("" when it has a closed-form kind)."""
    return _lookup(module)[1]


# ------------------------------------------------------------------------------------------ closed forms

@register_leaf_kind(nn.Linear)
class LinearLeaf(LeafKind):
    """``y = a W^T + b``: ``phi(W) = sum_n delta_n (x) a_n``, ``phi(b) = sum_n delta_n``."""

    def factors(self, rec: LeafCalls, call: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, delta)``: (B, N, d_in) and (B, N, d_out), float32."""
        d_out, d_in = self.widths()
        a = tokens_last(rec.args[call][0], d_in).float()
        delta = tokens_last(rec.grad_outputs[call][0], d_out).float()
        return a, delta

    def widths(self) -> tuple[int, int]:
        """``(d_out, d_in)``."""
        return self.module.out_features, self.module.in_features

    def outer(self, rec: LeafCalls, call: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols, delta)``: ``phi(W) = sum_n rows_n (x) cols_n`` in the weight's own layout, ``(delta, a)``."""
        a, delta = self.factors(rec, call)
        return delta, a, delta

    def per_example(self, cap, rec, call, attrs):
        rows, cols, delta = self.outer(rec, call)
        return {attr: rows.transpose(1, 2) @ cols if attr == "weight" else delta.sum(1) for attr in attrs}

    def batch_grad(self, cap, rec, call, attrs):
        rows, cols, delta = self.outer(rec, call)
        parts = {"weight": lambda: rows.flatten(0, 1).T @ cols.flatten(0, 1), "bias": lambda: delta.sum((0, 1))}
        return {attr: parts[attr]() for attr in attrs}

    def add_exact(self, cap, rec, call, slots, dest):
        rows, cols, delta = self.outer(rec, call)
        for attr, slot in slots:
            if attr == "weight":
                # sum_n rows_n (x) cols_n as a batched matmul written straight into the feature: no
                # (B, d_out, d_in) temporary and no second pass to copy it (profiled: 3-7x faster)
                dest(slot).baddbmm_(rows.transpose(1, 2), cols)
            else:
                dest(slot).add_(delta.sum(1))

    def add_sketch(self, cap, rec, call, slots, sketcher, target, step):
        rows, cols, delta = self.outer(rec, call)
        for attr, slot in slots:
            spec = sketcher.spec(slot, delta.device)
            group = sketcher.group_of[id(slot.param)]
            if attr == "bias":
                spec.add_into(target.rows(step, group), delta.sum(1))
            elif sketcher.use_outer(spec, cols.shape[1]):
                tensor_sketch_outer(target.rows(step, group), rows, cols, spec,
                                    sketcher.flat_hash(slot, spec, cols.device), sketcher.max_chunk_elements)
            else:
                tensor_sketch_fft(target.freq_rows(step, group), rows, cols, spec, sketcher.max_chunk_elements)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's linear layers), recognised without importing transformers."""
    t = type(module)
    w = getattr(module, "weight", None)
    return (t.__name__ == "Conv1D" and t.__module__.startswith("transformers") and isinstance(w, torch.Tensor)
            and w.dim() == 2 and getattr(module, "nf", None) == w.shape[1])


class Conv1DLeaf(LinearLeaf):
    """transformers' ``Conv1D``: ``y = a W + b`` with ``W`` (d_in, d_out), an ``nn.Linear`` stored transposed.

    ``phi(W) = sum_n a_n (x) delta_n``: the Linear kernels with the two factors swapped, at the same cost.
    """

    def widths(self) -> tuple[int, int]:
        d_in, d_out = self.module.weight.shape
        return d_out, d_in

    def outer(self, rec, call):
        a, delta = self.factors(rec, call)
        return a, delta, delta


NAMED_KINDS.append((_is_hf_conv1d, Conv1DLeaf))


NORM_TYPES: tuple[type, ...] = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@register_leaf_kind(*NORM_TYPES)
class NormLeaf(LeafKind):
    """LayerNorm / RMSNorm: ``y = x_hat * gain + bias``; ``phi(gain) = sum_n delta_n * x_hat_n``."""

    def factors(self, rec: LeafCalls, call: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_hat, delta)``: both (B, N, numel(normalized_shape)), float32."""
        m = self.module
        x = rec.args[call][0].float()
        shape = tuple(m.normalized_shape)
        if isinstance(m, nn.LayerNorm):
            x_hat = F.layer_norm(x, shape, None, None, m.eps)
        else:
            x_hat = F.rms_norm(x, shape, None, m.eps)
        width = math.prod(shape)
        return tokens_last(x_hat, width), tokens_last(rec.grad_outputs[call][0].float(), width)

    def per_example(self, cap, rec, call, attrs):
        x_hat, delta = self.factors(rec, call)
        return {attr: ((delta * x_hat) if attr == "weight" else delta).sum(1) for attr in attrs}

    def batch_grad(self, cap, rec, call, attrs):
        x_hat, delta = self.factors(rec, call)
        return {attr: ((delta * x_hat) if attr == "weight" else delta).sum((0, 1)) for attr in attrs}

    def add_sketch(self, cap, rec, call, slots, sketcher, target, step):
        for attr, g in self.per_example(cap, rec, call, [a for a, _ in slots]).items():
            slot = dict(slots)[attr]
            sketcher.spec(slot, g.device).add_into(target.rows(step, sketcher.group_of[id(slot.param)]), g)


@register_leaf_kind(nn.Embedding)
class EmbeddingLeaf(LeafKind):
    """A table lookup: ``phi(E) = sum_n onehot(id_n) (x) delta_n``, padding rows excluded."""

    @classmethod
    def accepts(cls, module: nn.Module) -> bool:
        return not (module.scale_grad_by_freq or module.sparse or module.max_norm is not None)

    def factors(self, rec: LeafCalls, call: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, delta)``: (B, N) int64 and (B, N, d) float32, padding rows zeroed."""
        m = self.module
        ids = rec.args[call][0].reshape(rec.args[call][0].shape[0], -1)
        delta = tokens_last(rec.grad_outputs[call][0].float(), m.embedding_dim)
        if m.padding_idx is not None:
            delta = delta * (ids != m.padding_idx).unsqueeze(-1)
        return ids, delta

    def per_example(self, cap, rec, call, attrs):
        ids, delta = self.factors(rec, call)
        g = torch.zeros(delta.shape[0], self.module.num_embeddings, delta.shape[-1], device=delta.device)
        g.scatter_add_(1, ids.unsqueeze(-1).expand_as(delta), delta)
        return {attr: g for attr in attrs}

    def batch_grad(self, cap, rec, call, attrs):
        ids, delta = self.factors(rec, call)
        w = torch.zeros(self.module.weight.shape, dtype=torch.float32, device=delta.device)
        w.index_add_(0, ids.reshape(-1), delta.reshape(-1, delta.shape[-1]))
        return {attr: w for attr in attrs}

    def add_sketch(self, cap, rec, call, slots, sketcher, target, step):
        ids, delta = self.factors(rec, call)
        for _, slot in slots:
            rows = target.rows(step, sketcher.group_of[id(slot.param)])
            embedding_sketch(rows, ids, delta, sketcher.spec(slot, delta.device), sketcher.max_chunk_elements)


# ------------------------------------------------------------------------------------------ the fallback

class GenericLeaf(LeafKind):
    """Any other module: re-run it functionally on its recorded inputs under ``vmap(grad(...))``.

    Works for any module whose examples do not interact (no batch norm). It forms the dense per-example gradient
    of the module's own parameters, so it is slower than a closed form and costs ``B x P_module`` memory.
    """

    native = False

    def per_example(self, cap, rec, call, attrs):
        module = self.module
        args, kwargs, gouts = rec.args[call], rec.kwargs[call], rec.grad_outputs[call]
        B = next(a.shape[0] for a in args if torch.is_tensor(a))
        batched = lambda v: torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B  # noqa: E731
        params = {a: getattr(module, a).detach() for a in attrs}
        # every other parameter and buffer (child layers included) enters as a constant: left live, they would put
        # the model's parameters into the autograd graph of the features (and of every score)
        fixed = {n: t.detach() for n, t in (*module.named_parameters(), *module.named_buffers()) if n not in params}
        arg_dims = tuple(0 if batched(a) else None for a in args)
        kw_names = [k for k in kwargs if batched(kwargs[k])]
        kw_fixed = {k: v for k, v in kwargs.items() if k not in kw_names}

        def pairing(p, one_args, one_kw, one_g):
            call_args = tuple(a.unsqueeze(0) if d == 0 else a for a, d in zip(one_args, arg_dims))
            call_kw = {**kw_fixed, **{k: v.unsqueeze(0) for k, v in zip(kw_names, one_kw)}}
            out = functional_call(module, (p, fixed), call_args, call_kw)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return sum((o.float() * g.unsqueeze(0)).sum() for o, g in zip(outs, one_g) if g is not None)

        g_in = tuple(g.float() if g is not None else None for g in gouts)
        g_dims = tuple(0 if g is not None else None for g in g_in)
        kw_vals = tuple(kwargs[k] for k in kw_names)
        with cap.paused():
            return vmap(grad(pairing), in_dims=(None, arg_dims, (0,) * len(kw_vals), g_dims))(
                params, args, kw_vals, g_in)


__all__ = ["LEAF_KINDS", "NAMED_KINDS", "Conv1DLeaf", "EmbeddingLeaf", "generic_reason", "GenericLeaf", "LeafKind", "LinearLeaf", "NORM_TYPES", "NormLeaf",
           "leaf_kind", "register_leaf_kind", "tokens_last"]
