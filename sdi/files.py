"""Atomic file writes: a file is either complete or absent, never torn (a crash leaves at most a ``.*.tmp``).

Every file the library writes — checkpoints, result ``.npz`` files, store chunks and manifests, explorer pages —
goes through :func:`atomic_write`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` through ``write(f)`` on a temporary binary file next to it, then fsync and rename.

    The temporary file is ``.<name>.<pid>.<random>.tmp`` in the same folder (so the rename is atomic and a
    killed writer's leftovers are recognisable); it is removed if ``write`` raises. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (where the platform lets one open a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
