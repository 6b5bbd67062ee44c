"""The store's bytes on disk: storage dtypes, ``.npy`` chunk files, JSON records, CRC-32 checksums, error types.

Every file is written through :func:`sdi.files.atomic_write` (complete or absent, never torn) via a stream that
checksums the bytes as they are written, so a record can vouch for its chunk without reading it back.
"""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import files

STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
TORCH_STORAGE: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}



class StoreError(ValueError):
    """A store is missing, incomplete, corrupted, or cannot be used as asked."""


class StoreMismatchError(StoreError):
    """The store was made for a different model, checkpoint, featurizer (sketch) or training set."""


class CorruptChunkError(StoreError):
    """A chunk file is missing, truncated, or its bytes do not match the checksum in its record."""


class _CrcWriter:
    """A write-only file wrapper that keeps the CRC-32 of everything written through it."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f, self.crc = f, 0

    def write(self, data: bytes) -> int:
        self.crc = zlib.crc32(data, self.crc)
        return self.f.write(data)


def write_checksummed(path: Path, write: Callable[[Any], None]) -> int:
    """:func:`sdi.files.atomic_write` through a stream that checksums the bytes; returns their CRC-32."""
    crc = 0

    def body(f) -> None:
        nonlocal crc
        w = _CrcWriter(f)
        write(w)
        crc = w.crc

    files.atomic_write(path, body)
    return crc


def write_npy(path: Path, array: np.ndarray) -> int:
    return write_checksummed(path, lambda f: np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False))


def write_json(path: Path, obj: Any) -> int:
    """Write ``obj`` as indented, key-sorted JSON, atomically; returns the CRC-32 of the bytes."""
    return write_checksummed(path, lambda f: f.write((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()))


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {path}: {e}") from None


def file_crc32(path: Path, block: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while data := f.read(block):
            crc = zlib.crc32(data, crc)
    return crc


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 tensor -> numpy array in the storage dtype (bfloat16 as its uint16 bit patterns)."""
    x = x.detach().to("cpu", torch.float32)
    if dtype == "float32":
        return x.numpy()
    if dtype == "float16":
        lo, hi = torch.aminmax(x) if x.numel() else (torch.zeros(()), torch.zeros(()))
        if max(-lo.item(), hi.item()) > torch.finfo(torch.float16).max:  # one fast pass; isfinite is 5x slower
            raise StoreError(f"features reach |x| = {max(-lo.item(), hi.item()):.3g}, beyond float16's range (65504); "
                             "store them as bfloat16 or float32")
        return x.half().numpy()
    return x.bfloat16().view(torch.int16).numpy().view(np.uint16)


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored array -> float32 tensor (copies)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.array(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(a, dtype=np.float32))


def npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the ``.npy`` file object ``f`` (read from its start)."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran:
        raise StoreError("fortran-ordered chunk files are not produced by this store")
    return shape, dtype, f.tell()


def npy_from_bytes(raw: bytes) -> np.ndarray:
    shape, dtype, offset = npy_header(io.BytesIO(raw))
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
