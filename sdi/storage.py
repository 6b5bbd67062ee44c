"""The store's bytes on disk: storage dtypes, ``.npy`` chunk files, JSON records, CRC-32 checksums, error types.

Every file is written through :func:`sdi.files.atomic_write` (complete or absent, never torn) via a stream that
checksums the bytes as they are written, so a record can vouch for its chunk without reading it back. JSON files
(the manifest, chunk records) are *sealed*: they carry the CRC-32 of their own content under ``"crc32"``, so a
flipped bit in a record or the manifest is detected (:func:`seal_problem`) instead of trusted.
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
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError: a flipped high bit
        raise StoreError(f"cannot read {path}: {e}") from None


SEAL = "crc32"


def _content_crc(obj: dict) -> int:
    body = {k: v for k, v in obj.items() if k != SEAL}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def seal(obj: dict) -> dict:
    """``obj`` (as it reads back from JSON) with the CRC-32 of its content under ``"crc32"``."""
    obj = json.loads(json.dumps(obj))
    return {**obj, SEAL: _content_crc(obj)}


def seal_problem(obj: Any) -> str | None:
    """Why a JSON value read back is not an intact sealed object (None when it is)."""
    if not isinstance(obj, dict):
        return f"not a JSON object (found {type(obj).__name__})"
    if not isinstance(obj.get(SEAL), int):
        return "its checksum is missing"
    if obj[SEAL] != _content_crc(obj):
        return "its content does not match its checksum (damaged or edited)"
    return None


def read_sealed(path: Path) -> tuple[dict | None, str | None]:
    """``(object, None)`` for an intact sealed JSON file, ``(None, why)`` for a damaged one (missing: FileNotFoundError)."""
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        return None, f"{path.name} is not valid JSON ({type(e).__name__})"
    problem = seal_problem(obj)
    return (obj, None) if problem is None else (None, f"{path.name}: {problem}")


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


def safe_npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """:func:`npy_header`, but any failure of numpy's header parser (a flipped bit in the header can make it raise
    ``SyntaxError``, ``tokenize.TokenError``, ...) becomes a :class:`StoreError`."""
    try:
        shape, dtype, offset = npy_header(f)
        if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ValueError(f"bad shape {shape!r}")
        return shape, dtype, offset
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the parser raises, the file is damaged
        raise StoreError(f"unreadable .npy header ({type(e).__name__})") from None


def npy_from_bytes(raw: bytes) -> np.ndarray:
    shape, dtype, offset = safe_npy_header(io.BytesIO(raw))
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
