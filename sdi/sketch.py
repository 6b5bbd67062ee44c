"""CountSketch / TensorSketch features: per-(example, step) gradient sketches that never form the gradient.

A CountSketch ``S: R^d -> R^m`` sends coordinate ``i`` to bucket ``h(i)`` with sign ``s(i)``::

    (S x)[k] = sum_{i : h(i) = k} s(i) x_i            E <S x, S y> = <x, y>
    Var <S x, S y> ~= (||x||^2 ||y||^2 + <x, y>^2) / m

A matrix parameter ``W`` (d_out, d_in) gets two hashes, one per axis; its flattened gradient is sketched with
bucket ``(h_r(i) + h_c(j)) mod m`` and sign ``s_r(i) s_c(j)``. For a per-example gradient that is a sum of
outer products ``G = sum_n delta_n (x) a_n`` this sketch is a circular convolution (TensorSketch)::

    S G = IFFT( sum_n FFT(CS_r delta_n) * FFT(CS_c a_n) )

which costs ``O(N m log m)`` per example instead of ``O(N d_out d_in)``, and never holds ``G``. For small
layers the direct route (form ``G`` for a few examples at a time, scatter it into ``m`` buckets) is cheaper;
both give the same numbers up to float rounding, so the choice is a cost model, not part of the sketch.

Every parameter has its own hashes, derived from ``(seed, m, parameter name, axis)`` by a counter-based hash
(no global RNG state): two featurizers with the same seed and parameter layout make comparable features on
any machine. The sum of the per-parameter sketches is a sketch of the concatenated gradient, so one
``m``-vector per (example, step) represents the whole parameter set; ``groups`` keeps groups apart instead.
Because every step is linear, ``sum_t sketch(phi_t) = sketch(sum_t phi_t)``: conservation holds exactly.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from .capture import LeafCalls, ParamSlot, StepCapture
from .features import (Featurizer, embedding_factors, generic_per_example_grads, leaf_kind, linear_factors,
                       norm_factors)

#: Default sketch width ``m``. On the default-size models (LoopedGPT, d_model 64, one layer per loop, tau 4..8,
#: parity and variable chains, 3 checkpoints) it keeps the SDI within 5% relative Frobenius error of the exact
#: values with >= 0.9 mean top-10 overlap per (query, step); see benchmarks/sketch_accuracy.py.
DEFAULT_SKETCH_DIM = 16384

#: Largest temporary a kernel allocates, in float32 elements (the peak is a small multiple of it).
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 22

HASH_VERSION = "splitmix64-v1"

GroupSpec = None | str | Callable[[str], str]


# ------------------------------------------------------------------------------------------ hashing

def _stream_key(seed: int, sketch_dim: int, name: str, mode: str) -> int:
    text = f"{HASH_VERSION}|{seed}|{sketch_dim}|{name}|{mode}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _splitmix64(key: int, n: int) -> np.ndarray:
    """``n`` well-mixed 64-bit words, a pure function of ``key`` (counter-based, platform independent)."""
    with np.errstate(over="ignore"):
        x = np.uint64(key) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class CountSketch:
    """Hash of a ``d``-vector into ``m`` buckets: ``buckets`` (d,) int64 in [0, m), ``signs`` (d,) float32 +-1."""

    buckets: torch.Tensor
    signs: torch.Tensor
    sketch_dim: int

    @classmethod
    def seeded(cls, size: int, sketch_dim: int, seed: int, name: str, mode: str) -> "CountSketch":
        """Hashes that depend only on ``(seed, sketch_dim, name, mode)``, never on global RNG state."""
        words = _splitmix64(_stream_key(seed, sketch_dim, name, mode), size)
        buckets = torch.from_numpy((words % np.uint64(sketch_dim)).astype(np.int64))
        signs = torch.from_numpy((words >> np.uint64(63)).astype(np.float32)) * -2 + 1
        return cls(buckets, signs, sketch_dim)

    @property
    def size(self) -> int:
        return self.buckets.shape[0]

    def to(self, device: torch.device) -> "CountSketch":
        return CountSketch(self.buckets.to(device), self.signs.to(device), self.sketch_dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., m), float32."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.size).float() * self.signs
        out = torch.zeros(flat.shape[0], self.sketch_dim, device=x.device)
        return out.index_add_(1, self.buckets, flat).reshape(*lead, self.sketch_dim)


@dataclass(frozen=True)
class TensorSketch:
    """Sketch of a (rows, cols) matrix: bucket ``(h_r(i) + h_c(j)) mod m``, sign ``s_r(i) s_c(j)``."""

    rows: CountSketch
    cols: CountSketch

    @property
    def sketch_dim(self) -> int:
        return self.rows.sketch_dim

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.size, self.cols.size)

    def to(self, device: torch.device) -> "TensorSketch":
        return TensorSketch(self.rows.to(device), self.cols.to(device))

    def flat(self, row_start: int = 0, row_stop: int | None = None) -> CountSketch:
        """The CountSketch of the flattened rows ``row_start:row_stop`` (row-major), hashes (n_rows * cols,)."""
        r = slice(row_start, row_stop)
        buckets = (self.rows.buckets[r, None] + self.cols.buckets[None, :]) % self.sketch_dim
        signs = self.rows.signs[r, None] * self.cols.signs[None, :]
        return CountSketch(buckets.reshape(-1), signs.reshape(-1), self.sketch_dim)

    def __call__(self, g: torch.Tensor, max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> torch.Tensor:
        """Sketch of dense matrices ``g`` (..., rows, cols) -> (..., m), a few rows at a time."""
        n_rows, n_cols = self.shape
        lead = g.shape[:-2]
        g = g.reshape(-1, n_rows, n_cols)
        out = torch.zeros(g.shape[0], self.sketch_dim, device=g.device)
        step = max(1, max_chunk_elements // max(1, n_cols * g.shape[0]))
        for r0 in range(0, n_rows, step):
            part = self.flat(r0, r0 + step)
            out += part(g[:, r0 : r0 + step].reshape(g.shape[0], -1))
        return out.reshape(*lead, self.sketch_dim)


Spec = CountSketch | TensorSketch


def sketch_spec(slot: ParamSlot, sketch_dim: int, seed: int) -> Spec:
    """The hashes of one parameter: a TensorSketch for a matrix, a CountSketch of the flat vector otherwise."""
    if len(slot.shape) == 2:
        rows = CountSketch.seeded(slot.shape[0], sketch_dim, seed, slot.name, "rows")
        cols = CountSketch.seeded(slot.shape[1], sketch_dim, seed, slot.name, "cols")
        return TensorSketch(rows, cols)
    return CountSketch.seeded(slot.numel, sketch_dim, seed, slot.name, "flat")


# ------------------------------------------------------------------------------------------ kernels

def _token_chunks(n_rows: int, n_tokens: int, per_token: int, budget: int) -> Iterator[tuple[slice, slice]]:
    """(rows, tokens) blocks with ``rows * tokens * per_token <= budget`` (at least one token)."""
    tokens = max(1, min(n_tokens, budget // max(1, per_token)))
    rows = max(1, budget // max(1, tokens * per_token))
    for r0 in range(0, n_rows, rows):
        for n0 in range(0, n_tokens, tokens):
            yield slice(r0, r0 + rows), slice(n0, n0 + tokens)


def tensor_sketch_fft(delta: torch.Tensor, a: torch.Tensor, spec: TensorSketch,
                      budget: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> Iterator[tuple[slice, torch.Tensor]]:
    """Spectra of the sketches of ``G_r = sum_n delta[r, n] (x) a[r, n]``, never forming ``G``.

    delta: (R, N, rows), a: (R, N, cols). Yields ``(row_slice, spectrum (rows_in_slice, m // 2 + 1))``
    complex64 blocks (a row may appear in several blocks, one per token chunk; add them up). ``irfft`` of the
    spectrum is the sketch; it is linear, so spectra of many parameters can be summed before one ``irfft``.
    """
    m = spec.sketch_dim
    R, N, _ = a.shape
    for rows, toks in _token_chunks(R, N, 2 * m, budget):
        d_part = delta[rows, toks]
        r = d_part.shape[0]
        d_blk = (d_part * spec.rows.signs).reshape(-1, delta.shape[-1])
        a_blk = (a[rows, toks] * spec.cols.signs).reshape(-1, a.shape[-1])
        both = torch.zeros(2, d_blk.shape[0], m, device=a.device)
        both[0].index_add_(1, spec.rows.buckets, d_blk)
        both[1].index_add_(1, spec.cols.buckets, a_blk)
        f = torch.fft.rfft(both)
        prod = f[0].mul_(f[1])                                     # (r * n, K)
        spectrum = torch.view_as_real(prod).reshape(r, -1, m // 2 + 1, 2).sum(1)
        yield rows, torch.view_as_complex(spectrum)


def tensor_sketch_outer(delta: torch.Tensor, a: torch.Tensor, spec: TensorSketch, flat: CountSketch | None = None,
                        budget: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> Iterator[tuple[slice, torch.Tensor]]:
    """The same sketches by the direct route: form ``G`` for a block of rows, scatter it into ``m`` buckets.

    Cheaper than the FFT for small ``rows x cols``; ``budget`` bounds ``G``'s block (examples x out-rows).
    Yields ``(row_slice, sketch (rows_in_slice, m))`` float32 blocks to be added up.
    """
    n_out, n_in = spec.shape
    R = a.shape[0]
    out_step = max(1, min(n_out, budget // n_in))
    ex_step = max(1, budget // (out_step * n_in))
    d_signed = delta * spec.rows.signs
    a_signed = a * spec.cols.signs
    for o0 in range(0, n_out, out_step):
        if out_step == n_out and flat is not None:
            buckets = flat.buckets
        else:
            buckets = spec.flat(o0, o0 + out_step).buckets
        for r0 in range(0, R, ex_step):
            g = torch.bmm(d_signed[r0 : r0 + ex_step, :, o0 : o0 + out_step].transpose(1, 2),
                          a_signed[r0 : r0 + ex_step])               # (r, out_rows, n_in), signs folded in
            g = g.reshape(g.shape[0], -1)
            out = torch.zeros(g.shape[0], spec.sketch_dim, device=a.device).index_add_(1, buckets, g)
            yield slice(r0, r0 + g.shape[0]), out


def embedding_sketch(ids: torch.Tensor, delta: torch.Tensor, spec: TensorSketch,
                     budget: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> Iterator[tuple[slice, torch.Tensor]]:
    """Sketch of an embedding gradient ``sum_n onehot(ids[r, n]) (x) delta[r, n]``: the one-hot's CountSketch is
    a lookup, so each token scatters its ``d`` values at ``h_r(id) + h_c(j)``. ids: (R, N), delta: (R, N, d)."""
    R, N, d = delta.shape
    m = spec.sketch_dim
    step = max(1, budget // max(1, N * d))
    for r0 in range(0, R, step):
        blk = slice(r0, r0 + step)
        row_ids = ids[blk]
        buckets = (spec.rows.buckets[row_ids].unsqueeze(-1) + spec.cols.buckets) % m      # (r, N, d)
        values = delta[blk] * spec.rows.signs[row_ids].unsqueeze(-1) * spec.cols.signs
        r = values.shape[0]
        out = torch.zeros(r, m, device=delta.device)
        yield blk, out.scatter_add_(1, buckets.reshape(r, -1), values.reshape(r, -1))


# ------------------------------------------------------------------------------------------ groups

MODULE_GROUPS = ("attention", "mlp", "norm", "other")
_ATTENTION = re.compile(r"(^|[._])(attn|attention|self_attn|self_attention)([._]|$)")
_MLP = re.compile(r"(^|[._])(mlp|ffn|feed_forward|feedforward)([._]|$)")


def module_group(name: str, module: nn.Module | None) -> str:
    """``"attention"``, ``"mlp"``, ``"norm"`` or ``"other"`` from a parameter's name and owning module."""
    if module is not None and leaf_kind(module) == "norm":
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
    if callable(groups):
        names = [groups(s.name) for s in slots]
        bad = [(s.name, g) for s, g in zip(slots, names) if not isinstance(g, str) or not g]
        if bad:
            raise TypeError(f"groups(name) must return a non-empty str for every parameter; got {bad[0][1]!r} "
                            f"for '{bad[0][0]}'")
        return names
    raise ValueError(f"groups must be None, 'module' or a callable name -> group name; got {groups!r}")


# ------------------------------------------------------------------------------------------ featurizer

class _Accumulator:
    """Adds sketches into ``out`` viewed as (B * T * G, m); FFT-domain parts go to one spectrum, inverted once."""

    def __init__(self, out: torch.Tensor, sketch_dim: int) -> None:
        self.out = out
        self.time = out if out.is_contiguous() else torch.zeros_like(out)
        self.time = self.time.view(-1, sketch_dim)
        self.m = sketch_dim
        self.spectrum: torch.Tensor | None = None

    def add(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Add ``values`` (r, m) float or (r, m // 2 + 1) complex to the rows ``index`` (r,)."""
        if values.is_complex():
            if self.spectrum is None:
                self.spectrum = torch.zeros(self.time.shape[0], self.m // 2 + 1, dtype=torch.complex64,
                                            device=values.device)
            self.spectrum.index_add_(0, index, values)
        else:
            self.time.index_add_(0, index, values)

    def finish(self) -> None:
        if self.spectrum is not None:
            self.time += torch.fft.irfft(self.spectrum, n=self.m)
            self.spectrum = None
        if self.time.data_ptr() != self.out.data_ptr():
            self.out += self.time.view_as(self.out)


class SketchFeaturizer(Featurizer):
    """Sketched per-(example, step) gradients: features (B, T, m), or (B, T, G, m) with ``groups``.

    sketch_dim:  ``m``, the width of a sketch.
    seed:        fixes every hash; train and query features must share it (and ``m``, and the parameters).
    groups:      None (one sketch of all parameters), ``"module"`` (attention / mlp / norm / other, as present),
                 or a callable ``parameter name -> group name``.
    leaves:      ``{leaf name: module}`` (from :func:`sdi.capture.loop_parameters`); used by ``groups="module"``.
    max_chunk_elements: bound on each kernel temporary, in float32 elements.
    linear_kernel: ``"auto"`` (cost model), ``"fft"`` (TensorSketch) or ``"outer"`` (per-example outer
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
        else:
            self.group_names = list(dict.fromkeys(self.slot_groups))
        self.group_of = {id(s.param): (self.group_names.index(g) if self.slot_groups else 0)
                         for s, g in zip(slots, self.slot_groups or [None] * len(slots))}
        self.slot_of = {id(s.param): s for s in slots}
        self.specs = {id(s.param): sketch_spec(s, sketch_dim, seed) for s in slots}
        self._on_device: dict[tuple[int, str], Spec] = {}
        self._flat_cache: dict[tuple[int, str], CountSketch] = {}

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
                  groups=None if self.slot_groups is None else [[s.name, g] for s, g in zip(self.slots, self.slot_groups)])
        return fp

    # -- hashes on the right device ------------------------------------------------------------------
    def spec(self, slot: ParamSlot, device: torch.device) -> Spec:
        key = (id(slot.param), str(device))
        if key not in self._on_device:
            self._on_device[key] = self.specs[id(slot.param)].to(device)
        return self._on_device[key]

    def _flat(self, slot: ParamSlot, spec: TensorSketch, device: torch.device) -> CountSketch | None:
        """The combined hash of a small matrix, cached (None when it would exceed the chunk budget)."""
        if slot.numel > self.max_chunk_elements:
            return None
        key = (id(slot.param), str(device))
        if key not in self._flat_cache:
            self._flat_cache[key] = spec.flat()
        return self._flat_cache[key]

    # -- the map -------------------------------------------------------------------------------------
    def dense(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sketch of dense gradients, one tensor per slot of shape (*batch, *param_shape) -> (*batch, *feature_shape).

        This is the definition the fast kernels reproduce: a CountSketch of each flattened parameter gradient,
        with the hashes of :func:`sketch_spec`, summed within each group.
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

    def featurize(self, cap: StepCapture, out: torch.Tensor) -> None:
        """Add the sketches of every recorded call to ``out`` (B, T, *feature_shape), one ``irfft`` in all."""
        acc = _Accumulator(out, self.sketch_dim)
        for rec in cap.calls.values():
            self._add_leaf(cap, rec, acc, out.shape[0], out.shape[1])
        acc.finish()

    def accumulate(self, cap: StepCapture, rec: LeafCalls, out: torch.Tensor) -> None:
        acc = _Accumulator(out, self.sketch_dim)
        self._add_leaf(cap, rec, acc, out.shape[0], out.shape[1])
        acc.finish()

    # -- per leaf ------------------------------------------------------------------------------------
    def _leaf_slots(self, rec: LeafCalls) -> list[tuple[str, ParamSlot]]:
        """(attribute, slot) of every attributed parameter the module owns — tied weights included."""
        return [(attr, self.slot_of[id(p)]) for attr, p in rec.module.named_parameters(recurse=False)
                if id(p) in self.slot_of]

    def _rows(self, steps: list[int], B: int, T: int, slot: ParamSlot, device: torch.device) -> torch.Tensor:
        """Row of ``out.view(-1, m)`` for stacked row ``c * B + b``: ``(b * T + steps[c]) * G + group``."""
        b = torch.arange(B, device=device).repeat(len(steps))
        t = torch.tensor(steps, device=device).repeat_interleave(B)
        return (b * T + t) * self.n_groups + self.group_of[id(slot.param)]

    def _stacks(self, rec: LeafCalls, factors: Callable) -> Iterator[tuple[list[int], tuple[torch.Tensor, ...]]]:
        """Factors of the calls that reached the loss, concatenated over calls (bounded by the chunk budget)."""
        steps, parts, size = [], [], 0
        for c, step in enumerate(rec.steps):
            if rec.grad_outputs[c][0] is None:
                continue  # this call did not influence the loss
            f = factors(rec, c)
            n = sum(x.numel() for x in f)
            if parts and (size + n > self.max_chunk_elements or
                          any(x.shape[1:] != y.shape[1:] for x, y in zip(f, parts[0]))):
                yield steps, tuple(torch.cat(p) for p in zip(*parts))
                steps, parts, size = [], [], 0
            steps.append(step)
            parts.append(f)
            size += n
        if parts:
            yield steps, tuple(torch.cat(p) for p in zip(*parts))

    def _add_leaf(self, cap: StepCapture, rec: LeafCalls, acc: _Accumulator, B: int, T: int) -> None:
        kind = leaf_kind(rec.module)
        slots = self._leaf_slots(rec)
        if kind == "generic":
            self._add_generic(cap, rec, slots, acc, B, T)
            return
        factor_fn = {"linear": linear_factors, "norm": norm_factors, "embedding": embedding_factors}[kind]
        for steps, (x, delta) in self._stacks(rec, factor_fn):
            device = delta.device
            for attr, slot in slots:
                rows = self._rows(steps, B, T, slot, device)
                spec = self.spec(slot, device)
                if attr == "bias":
                    acc.add(rows, spec(delta.sum(1)))
                elif kind == "norm":
                    acc.add(rows, spec((delta * x).sum(1)))
                elif kind == "embedding":
                    for blk, values in embedding_sketch(x, delta, spec, self.max_chunk_elements):
                        acc.add(rows[blk], values)
                else:
                    for blk, values in self._linear_weight(delta, x, slot, spec):
                        acc.add(rows[blk], values)

    def _linear_weight(self, delta: torch.Tensor, a: torch.Tensor, slot: ParamSlot,
                       spec: TensorSketch) -> Iterator[tuple[slice, torch.Tensor]]:
        if self._use_outer(spec, a.shape[1]):
            return tensor_sketch_outer(delta, a, spec, self._flat(slot, spec, a.device), self.max_chunk_elements)
        return tensor_sketch_fft(delta, a, spec, self.max_chunk_elements)

    def _use_outer(self, spec: TensorSketch, n_tokens: int) -> bool:
        """Cost model per example (rough ns on a CPU core; the ratio is what matters, GPUs agree in direction).

        outer: N * d_out * d_in multiply-adds in a GEMM plus d_out * d_in scattered adds;
        fft:   2 N scatters of d values, 2 N real FFTs of length m, N complex products.
        """
        if self.linear_kernel != "auto":
            return self.linear_kernel == "outer"
        n_out, n_in = spec.shape
        m = spec.sketch_dim
        outer = n_out * n_in * (0.05 * n_tokens + 4.0)
        fft = n_tokens * (m * (1.0 + 0.6 * math.log2(m)) + 4.0 * (n_out + n_in))
        return n_out * n_in <= self.max_chunk_elements and outer <= fft

    def _add_generic(self, cap: StepCapture, rec: LeafCalls, slots: list[tuple[str, ParamSlot]],
                     acc: _Accumulator, B: int, T: int) -> None:
        """Dense per-example gradients of a small module of unknown kind (torch.func), then CountSketch."""
        for c, step in enumerate(rec.steps):
            if all(g is None for g in rec.grad_outputs[c]):
                continue
            grads = generic_per_example_grads(cap, rec, c, [attr for attr, _ in slots])
            for attr, slot in slots:
                g = grads[attr].float()
                spec = self.spec(slot, g.device)
                values = spec(g, self.max_chunk_elements) if isinstance(spec, TensorSketch) else spec(g.reshape(B, -1))
                acc.add(self._rows([step], B, T, slot, g.device), values)
