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
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .capture import ParamSlot

#: Default sketch width ``m`` (floats per example and step). On the default-size models (LoopedGPT, d_model 64,
#: one layer per loop, tau 6 parity / tau 8 variable chains, 3 checkpoints, 256 train x 16 queries) it gives a
#: relative Frobenius error of 0.036 (chains) / 0.016 (parity) against the exact SDI and a mean top-10 overlap
#: of 0.976 / 0.956 per (query, step); 16384 gives 0.060 / 0.022, 24576 gives 0.042 / 0.014 (mean of 3 seeds).
#: The error is set by how aligned the gradients are (relative error ~ sqrt((1 + 1/cos^2) / m)), not directly by
#: the parameter count; check larger models with benchmarks/sketch_accuracy.py.
DEFAULT_SKETCH_DIM = 32768

#: Largest temporary a kernel allocates, in float32 elements (the peak is a small multiple of it).
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 22

#: Block of per-example outer products formed at once by the direct kernel on a CPU (float32 elements, 4 MB: in
#: L3). Measured at d 512: as fast as 1 MB blocks on one thread, and 1.7x instead of 1.35x on two (2 MB: within
#: noise of 4 MB).
OUTER_BLOCK_ELEMENTS = 1 << 20

#: Block of the FFT kernel on a CPU: float32 elements of the count-sketched tokens transformed at once (1 MB; the
#: spectra are as large). Measured (benchmarks/sketch_speed.py kernels, 512 x 512 and 2048 x 512 weights, m 1,024,
#: 64 tokens): 1.5-3.5x faster than 16 MB blocks, which left the caches; 2 MB blocks are within noise of 1 MB.
FFT_BLOCK_ELEMENTS = 1 << 18

#: Examples per thread in one block of the direct kernel (its scatter splits a block's examples between threads).
OUTER_EXAMPLES_PER_THREAD = 2

#: Matrices up to this many entries keep their combined hash for the direct kernel (int64: 2 MB at most); larger
#: ones recompute it per block of out-rows, about 2% of that kernel's time.
CACHED_FLAT_HASH_ELEMENTS = 1 << 18

HASH_VERSION = "splitmix64-v1"


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

    def add_into(self, target: torch.Tensor, x: torch.Tensor) -> None:
        """``target`` (r, m) += sketch of the rows of ``x`` (r, d); ``target`` may be a strided view."""
        target.index_add_(1, self.buckets, x.float() * self.signs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., m), float32."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.size)
        out = torch.zeros(flat.shape[0], self.sketch_dim, device=x.device)
        self.add_into(out, flat)
        return out.reshape(*lead, self.sketch_dim)


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

    def add_into(self, target: torch.Tensor, g: torch.Tensor,
                 max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> None:
        """``target`` (r, m) += sketch of dense matrices ``g`` (r, rows, cols), a block of rows at a time."""
        n_rows, n_cols = self.shape
        step = max(1, max_chunk_elements // max(1, n_cols * g.shape[0]))
        for r0 in range(0, n_rows, step):
            self.flat(r0, r0 + step).add_into(target, g[:, r0 : r0 + step].reshape(g.shape[0], -1))

    def __call__(self, g: torch.Tensor, max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> torch.Tensor:
        """Sketch of dense matrices ``g`` (..., rows, cols) -> (..., m)."""
        lead = g.shape[:-2]
        g = g.reshape(-1, *self.shape)
        out = torch.zeros(g.shape[0], self.sketch_dim, device=g.device)
        self.add_into(out, g, max_chunk_elements)
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


def tensor_sketch_fft(target: torch.Tensor, delta: torch.Tensor, a: torch.Tensor, spec: TensorSketch,
                      budget: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> None:
    """Spectra of the sketches of ``G_r = sum_n delta[r, n] (x) a[r, n]``, never forming ``G``.

    delta: (R, N, rows), a: (R, N, cols); ``target`` (R, m // 2 + 1) complex64 += the spectra. ``irfft`` of
    a spectrum is the sketch; it is linear, so the spectra of many parameters and layers are summed first and
    inverted once.
    """
    m = spec.sketch_dim
    R, N, _ = a.shape
    if a.device.type == "cpu":      # a GPU wants big blocks; a CPU wants the block and its spectra in cache
        budget = min(budget, FFT_BLOCK_ELEMENTS)
    for rows, toks in _token_chunks(R, N, 2 * m, budget):
        d_part = delta[rows, toks]
        r = d_part.shape[0]
        both = torch.zeros(2, d_part.shape[0] * d_part.shape[1], m, device=a.device)
        spec.rows.add_into(both[0], d_part.reshape(-1, delta.shape[-1]))
        spec.cols.add_into(both[1], a[rows, toks].reshape(-1, a.shape[-1]))
        f = torch.fft.rfft(both)
        prod = f[0].mul_(f[1])                                       # (r * n, K): one token each
        spectrum = torch.view_as_complex(torch.view_as_real(prod).reshape(r, -1, m // 2 + 1, 2).sum(1))
        target[rows] += spectrum


def tensor_sketch_outer(target: torch.Tensor, delta: torch.Tensor, a: torch.Tensor, spec: TensorSketch,
                        flat: CountSketch | None = None, budget: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> None:
    """The same sketches by the direct route: form ``G`` for a block of examples, scatter it into ``m`` buckets.

    Cheaper than the FFT for small ``rows x cols``. ``target`` (R, m) float32 += the sketches. ``flat``, the
    combined hash of the whole matrix (row-major), saves recomputing it per call; any block of out-rows is a
    contiguous slice of it. The block (examples x out-rows x cols) never exceeds ``budget``.
    """
    n_out, n_in = spec.shape
    R = a.shape[0]
    # on a CPU a block's G (examples x out_step x n_in) and its target rows (examples x m) stay in the L2/L3
    # caches while the scatter reads them; a GPU wants big blocks
    on_cpu = a.device.type == "cpu"
    cache = OUTER_BLOCK_ELEMENTS if on_cpu else budget
    budget = min(budget, cache)
    # index_add_ along dim 1 splits a block's examples between threads: with one example per block (a wide layer
    # filled the block by itself) the scatter ran on one thread (2 threads: 1.2x at d 512); at least two examples
    # per thread in every block, with fewer out-rows each, give 1.75x (benchmarks/sketch_speed.py --thread-scaling)
    min_examples = max(1, min(R, OUTER_EXAMPLES_PER_THREAD * torch.get_num_threads())) if on_cpu else 1
    out_step = max(1, min(n_out, budget // (n_in * min_examples)))
    ex_step = max(min_examples, min(budget // (out_step * n_in), cache // spec.sketch_dim))
    for o0 in range(0, n_out, out_step):
        buckets = (flat.buckets[o0 * n_in : (o0 + out_step) * n_in] if flat is not None
                   else spec.flat(o0, o0 + out_step).buckets)
        row_signs = spec.rows.signs[o0 : o0 + out_step]
        for r0 in range(0, R, ex_step):
            # signs folded into the factors a block at a time: small temporaries the allocator reuses (signing
            # the whole delta and a at once made two fresh copies per call: 5% of the time at d 256, profiled)
            g = torch.bmm((delta[r0 : r0 + ex_step, :, o0 : o0 + out_step] * row_signs).transpose(1, 2),
                          a[r0 : r0 + ex_step] * spec.cols.signs)      # (r, out_rows, n_in)
            target[r0 : r0 + ex_step].index_add_(1, buckets, g.reshape(g.shape[0], -1))


def embedding_sketch(target: torch.Tensor, ids: torch.Tensor, delta: torch.Tensor, spec: TensorSketch,
                     budget: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> None:
    """Sketch of an embedding gradient ``sum_n onehot(ids[r, n]) (x) delta[r, n]`` into ``target`` (R, m).

    The one-hot's CountSketch is a lookup, so each token scatters its ``d`` values at ``h_r(id) + h_c(j)``.
    ids: (R, N), delta: (R, N, d).
    """
    R, N, d = delta.shape
    m = spec.sketch_dim
    step = max(1, budget // max(1, N * d))
    for r0 in range(0, R, step):
        row_ids = ids[r0 : r0 + step]
        buckets = (spec.rows.buckets[row_ids].unsqueeze(-1) + spec.cols.buckets) % m      # (r, N, d)
        values = delta[r0 : r0 + step] * spec.rows.signs[row_ids].unsqueeze(-1) * spec.cols.signs
        r = values.shape[0]
        target[r0 : r0 + r].scatter_add_(1, buckets.reshape(r, -1), values.reshape(r, -1))


def choose_linear_kernel(n_out: int, n_in: int, n_tokens: int, sketch_dim: int) -> str:
    """``"outer"`` or ``"fft"``: the cheaper kernel for one Linear weight (d_out, d_in) seen at ``n_tokens`` tokens.

    A cost model per example, in ns on one CPU core (fitted to the two kernels' times on d 128..2048 weights,
    16 and 64 tokens, m 1,024..4,096; GPUs agree in direction):

    - outer: d_out * d_in scattered adds (~2.2 ns each: the scatter dominates) plus a small GEMM (~0.01 ns per
      entry and token);
    - fft:   2 N real FFTs of length m (~0.45 ns per m log2 m for the pair) plus 2 N scatters of d values (~0.7 ns).
    """
    m = sketch_dim
    outer = n_out * n_in * (2.2 + 0.01 * n_tokens)
    fft = n_tokens * (0.45 * m * math.log2(m) + 0.7 * (n_out + n_in))
    return "outer" if outer <= fft else "fft"
