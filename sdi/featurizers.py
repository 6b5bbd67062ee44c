"""Featurizers: the linear maps from recorded leaf calls to per-(example, step) features.

A featurizer turns the ``(inputs, delta)`` pairs recorded by :class:`sdi.capture.StepCapture` into one feature
vector per example and step: the flattened per-step gradient itself (:class:`ExactFeaturizer`, width ``P``) or a
sketch of it (:class:`SketchFeaturizer`, width ``m``). Both take one recorded call at a time
(:meth:`Featurizer.add`, called during the backward pass as each call's ``delta`` arrives) and let the module's
kind (:mod:`sdi.leaves`) add its contribution; only the destination differs. Every featurizer is linear, so
``sum_t feature_t`` is the feature of the full gradient, and the batch gradient rebuilt from the same calls
(:meth:`Featurizer.add_batch_grad`) doubles as a check that the hooks saw every use of every parameter.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .capture import LeafCalls, ParamSlot, StepCapture
from .leaves import LeafKind, NormLeaf, leaf_kind
from .sketch import (CACHED_FLAT_HASH_ELEMENTS, DEFAULT_MAX_CHUNK_ELEMENTS, HASH_VERSION, CountSketch, Spec,
                     TensorSketch, choose_linear_kernel, sketch_spec)

GroupSpec = None | str | Callable[[str], str]


class Featurizer:
    """Turns recorded leaf calls into features ``(B, T, *feature_shape)``; subclasses say where each call goes."""

    kind: str = "abstract"

    def __init__(self, slots: list[ParamSlot]) -> None:
        self.slots = slots
        self.slot_of = {id(s.param): s for s in slots}
        self._kinds: dict[int, LeafKind] = {}
        self._leaf_slots: dict[int, list[tuple[str, ParamSlot]]] = {}

    def leaf_slots(self, module: nn.Module) -> list[tuple[str, ParamSlot]]:
        """``(attribute, slot)`` of every attributed parameter ``module`` owns — tied weights included (looked up
        once per module: it is asked for at every recorded call)."""
        if id(module) not in self._leaf_slots:
            self._leaf_slots[id(module)] = [(attr, self.slot_of[id(p)])
                                            for attr, p in module.named_parameters(recurse=False)
                                            if id(p) in self.slot_of]
        return self._leaf_slots[id(module)]

    def kind_of(self, module: nn.Module) -> LeafKind:
        """The module's :class:`~sdi.leaves.LeafKind` (looked up once per module)."""
        if id(module) not in self._kinds:
            self._kinds[id(module)] = leaf_kind(module)
        return self._kinds[id(module)]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What must agree for two features to be comparable."""
        return {"kind": self.kind, "params": [[s.name, list(s.shape)] for s in self.slots]}

    def target(self, out: torch.Tensor) -> Any:
        """Where one batch's features go (``out`` itself unless a subclass buffers)."""
        return out

    def finish(self, target: Any) -> None:
        """Complete ``target`` after the batch's last call (a buffering subclass writes ``out`` here)."""

    def add_call(self, kind: LeafKind, cap: StepCapture, rec: LeafCalls, call: int,
                 slots: list[tuple[str, ParamSlot]], target: Any, step: int) -> None:
        raise NotImplementedError

    def add(self, cap: StepCapture, rec: LeafCalls, call: int, target: Any) -> None:
        """Add the contribution of call ``call`` of ``rec`` (inputs and delta recorded) to ``target``."""
        self.add_call(self.kind_of(rec.module), cap, rec, call, self.leaf_slots(rec.module), target, rec.steps[call])

    def zero_batch_grads(self) -> dict[int, torch.Tensor]:
        """``{id(param): zeros(param.shape)}``, to sum :meth:`add_batch_grad` into."""
        return {id(s.param): torch.zeros(s.shape, dtype=torch.float32, device=s.param.device) for s in self.slots}

    def add_batch_grad(self, total: dict[int, torch.Tensor], cap: StepCapture, rec: LeafCalls, call: int) -> None:
        """Add the gradient of the summed loss at this call, rebuilt from the recorded call alone, to ``total``.

        Summing over examples and tokens first makes this cheap (no per-example tensor); comparing the total
        over all calls with autograd's gradient proves that the hooks saw every use of every parameter.
        """
        slots = self.leaf_slots(rec.module)
        parts = self.kind_of(rec.module).batch_grad(cap, rec, call, [attr for attr, _ in slots])
        for attr, s in slots:
            total[id(s.param)] += parts[attr].reshape(s.shape)

    def dense(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The feature of dense gradients, one tensor per slot ``(*batch, *param_shape)``: ``(*batch, *feature_shape)``."""
        raise NotImplementedError


class ExactFeaturizer(Featurizer):
    """The per-example, per-step gradient itself, flattened and concatenated: width ``P``."""

    kind = "exact"

    def __init__(self, slots: list[ParamSlot]) -> None:
        super().__init__(slots)
        self.offsets: dict[int, int] = {}
        offset = 0
        for s in slots:
            self.offsets[id(s.param)] = offset
            offset += s.numel
        self.dim = offset

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def add_call(self, kind, cap, rec, call, slots, target, step):
        def dest(slot: ParamSlot) -> torch.Tensor:        # (B, *shape) view of target[:, step]
            off = self.offsets[id(slot.param)]
            return target[:, step, off : off + slot.numel].view(-1, *slot.shape)
        kind.add_exact(cap, rec, call, slots, dest)

    def dense(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        lead = grads[0].shape[: grads[0].dim() - len(self.slots[0].shape)]
        return torch.cat([g.float().reshape(*lead, -1) for g in grads], dim=-1)


# ------------------------------------------------------------------------------------------ sketched

MODULE_GROUPS = ("attention", "mlp", "norm", "other")
#: groups="tensor": the block that biases, norm scales and other 1-D parameters share (each matrix has its own)
VECTORS_GROUP = "vectors"
_ATTENTION = re.compile(r"(^|[._])(attn|attention|self_attn|self_attention)([._]|$)")
_MLP = re.compile(r"(^|[._])(mlp|ffn|feed_forward|feedforward)([._]|$)")


def module_group(name: str, module: nn.Module | None) -> str:
    """``"attention"``, ``"mlp"``, ``"norm"`` or ``"other"`` from a parameter's name and owning module."""
    if module is not None and isinstance(leaf_kind(module), NormLeaf):
        return "norm"
    if _ATTENTION.search(name):
        return "attention"
    if _MLP.search(name):
        return "mlp"
    return "other"


def assign_groups(slots: list[ParamSlot], groups: GroupSpec, leaves: dict[str, nn.Module] | None) -> list[str] | None:
    """The group name of every slot (None when groups are not kept apart)."""
    if groups is None:
        return None
    if groups == "module":
        leaves = leaves or {}
        return [module_group(s.name, leaves.get(s.leaf)) for s in slots]
    if groups == "tensor":
        return [s.name if len(s.shape) >= 2 else VECTORS_GROUP for s in slots]
    if callable(groups):
        names = [groups(s.name) for s in slots]
        bad = [(s.name, g) for s, g in zip(slots, names) if not isinstance(g, str) or not g]
        if bad:
            raise TypeError(f"groups(name) must return a non-empty str for every parameter; got {bad[0][1]!r} "
                            f"for '{bad[0][0]}'")
        return names
    raise ValueError(f"groups must be None, 'module', 'tensor' or a callable name -> group name; got {groups!r}")



class BatchTarget:
    """Where one batch's sketches go: ``out`` (B, T, G, m) directly, FFT-domain parts into one spectrum."""

    def __init__(self, out: torch.Tensor, sketch_dim: int, n_groups: int) -> None:
        self.out = out
        self.buf = out if out.is_contiguous() else torch.zeros_like(out)
        self.time = self.buf.view(out.shape[0], out.shape[1], n_groups, sketch_dim)
        self.m = sketch_dim
        self.spectrum: torch.Tensor | None = None

    def rows(self, step: int, group: int) -> torch.Tensor:
        """(B, m) view of ``out`` at one step and group."""
        return self.time[:, step, group]

    def freq_rows(self, step: int, group: int) -> torch.Tensor:
        """(B, m // 2 + 1) complex view of the spectrum at one step and group."""
        if self.spectrum is None:
            self.spectrum = torch.zeros(*self.time.shape[:-1], self.m // 2 + 1, dtype=torch.complex64,
                                        device=self.time.device)
        return self.spectrum[:, step, group]

    def finish(self) -> None:
        if self.spectrum is not None:
            self.time += torch.fft.irfft(self.spectrum, n=self.m)
            self.spectrum = None
        if self.buf is not self.out:
            self.out += self.buf


class SketchFeaturizer(Featurizer):
    """Sketched per-(example, step) gradients: features (B, T, m), or (B, T, G, m) with ``groups``.

    Arguments::

        sketch_dim:  m, the width of a sketch.
        seed:        fixes every hash; train and query features must share it (and m, and the parameters).
        groups:      None (one sketch of all parameters), "module" (attention / mlp / norm / other, as present),
                     "tensor" (every weight matrix its own block, the 1-D parameters one block together),
                     or a callable: parameter name -> group name. With groups, m is the width of each block.
        leaves:      {leaf name: module} (from sdi.capture.loop_parameters); used by groups="module".
        max_chunk_elements: bound on each kernel temporary, in float32 elements.
        linear_kernel: "auto" (cost model), "fft" (TensorSketch) or "outer" (per-example outer
                     products, a few at a time) for Linear weights; all give the same features up to rounding.
    """

    kind = "sketch"

    def __init__(self, slots: list[ParamSlot], sketch_dim: int, seed: int = 0, groups: GroupSpec = None,
                 leaves: dict[str, nn.Module] | None = None,
                 max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS, linear_kernel: str = "auto") -> None:
        super().__init__(slots)
        if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or sketch_dim < 2:
            raise ValueError(f"sketch_dim must be an int >= 2 (or None for exact features), got {sketch_dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if isinstance(max_chunk_elements, bool) or not isinstance(max_chunk_elements, int) or max_chunk_elements < 1:
            raise ValueError(f"max_chunk_elements must be a positive int, got {max_chunk_elements!r}")
        if linear_kernel not in ("auto", "fft", "outer"):
            raise ValueError(f"linear_kernel must be 'auto', 'fft' or 'outer', got {linear_kernel!r}")
        self.sketch_dim = sketch_dim
        self.seed = seed
        self.max_chunk_elements = max_chunk_elements
        self.linear_kernel = linear_kernel
        self.slot_groups = assign_groups(slots, groups, leaves)
        if self.slot_groups is None:
            self.group_names: list[str] = []
        elif groups == "module":
            self.group_names = [g for g in MODULE_GROUPS if g in self.slot_groups]
        elif groups == "tensor":      # the matrices in parameter order, then the block of the vectors
            names = list(dict.fromkeys(self.slot_groups))
            self.group_names = [g for g in names if g != VECTORS_GROUP] + [g for g in names if g == VECTORS_GROUP]
        else:
            self.group_names = list(dict.fromkeys(self.slot_groups))
        self.group_of = {id(s.param): (self.group_names.index(g) if self.slot_groups else 0)
                         for s, g in zip(slots, self.slot_groups or [None] * len(slots))}
        self.specs = {id(s.param): sketch_spec(s, sketch_dim, seed) for s in slots}
        self._on_device: dict[tuple[int, str], Spec] = {}
        self._flat_cache: dict[tuple[int, str], CountSketch] = {}

    def use_outer(self, spec: TensorSketch, n_tokens: int) -> bool:
        """Whether a Linear weight takes the direct (outer-product) kernel: ``linear_kernel``, or the cost model
        :func:`sdi.sketch.choose_linear_kernel` when it is ``"auto"``."""
        if self.linear_kernel != "auto":
            return self.linear_kernel == "outer"
        return choose_linear_kernel(*spec.shape, n_tokens, spec.sketch_dim) == "outer"

    def target(self, out: torch.Tensor) -> "BatchTarget":
        return BatchTarget(out, self.sketch_dim, self.n_groups)

    def finish(self, target: "BatchTarget") -> None:
        target.finish()

    def add_call(self, kind: LeafKind, cap: StepCapture, rec: LeafCalls, call: int,
                 slots: list[tuple[str, ParamSlot]], target: "BatchTarget", step: int) -> None:
        kind.add_sketch(cap, rec, call, slots, self, target, step)

    # -- description -------------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        return max(1, len(self.group_names))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        if self.slot_groups is None:
            return (self.sketch_dim,)
        return (self.n_groups, self.sketch_dim)

    def fingerprint(self) -> dict[str, Any]:
        fp = super().fingerprint()
        fp.update(seed=self.seed, sketch_dim=self.sketch_dim, hash=HASH_VERSION,
                  groups=None if self.slot_groups is None else
                  [[s.name, g] for s, g in zip(self.slots, self.slot_groups)])
        return fp

    # -- hashes on the right device ------------------------------------------------------------------
    def spec(self, slot: ParamSlot, device: torch.device) -> Spec:
        key = (id(slot.param), str(device))
        if key not in self._on_device:
            self._on_device[key] = self.specs[id(slot.param)].to(device)
        return self._on_device[key]

    def flat_hash(self, slot: ParamSlot, spec: TensorSketch, device: torch.device) -> CountSketch | None:
        """The combined hash of a small matrix, cached (None above ``CACHED_FLAT_HASH_ELEMENTS`` entries)."""
        if slot.numel > CACHED_FLAT_HASH_ELEMENTS:
            return None
        key = (id(slot.param), str(device))
        if key not in self._flat_cache:
            self._flat_cache[key] = spec.flat()
        return self._flat_cache[key]

    # -- the map -------------------------------------------------------------------------------------
    def dense(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sketch of dense gradients, one tensor per slot of shape ``(*batch, *param_shape)`` ->
        ``(*batch, *feature_shape)``.

        This is the definition the fast kernels reproduce: a CountSketch of each flattened parameter gradient,
        with the hashes of :func:`~sdi.sketch.sketch_spec`, summed within each group.
        """
        if len(grads) != len(self.slots):
            raise ValueError(f"dense() needs one gradient per parameter ({len(self.slots)}), got {len(grads)}")
        out = None
        for s, g in zip(self.slots, grads):
            if tuple(g.shape[g.dim() - len(s.shape):]) != s.shape:
                raise ValueError(f"gradient of '{s.name}' must end in shape {s.shape}, got {tuple(g.shape)}")
            lead = g.shape[: g.dim() - len(s.shape)]
            spec = self.spec(s, g.device)
            part = spec(g.float(), self.max_chunk_elements) if isinstance(spec, TensorSketch) else \
                spec(g.float().reshape(*lead, -1))
            if out is None:
                out = torch.zeros(*lead, self.n_groups, self.sketch_dim, device=g.device)
            out[..., self.group_of[id(s.param)], :] += part
        return out if self.slot_groups is not None else out.squeeze(-2)
