"""Atomic file writes: a file is either complete or absent, never torn (a crash leaves at most a ``.*.tmp``).

Every file the library writes — checkpoints, result ``.npz`` files, store chunks and manifests, explorer pages —
goes through :func:`atomic_write`. A failed write (no space, read-only file system, file too large) raises an
``OSError`` that names the file it was writing. :func:`remove_stale_temporaries` clears what killed writers left
behind; :class:`WriteLock` keeps a second writer of one folder waiting until the first is done.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
from pathlib import Path
from typing import IO, Callable

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per store is then the user's to ensure
    fcntl = None


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Write ``path`` through ``write(f)`` on a temporary binary file next to it, then fsync and rename.

    The temporary file is ``.<name>.<pid>.<random>.tmp`` in the same folder (so the rename is atomic and a
    killed writer's leftovers are recognisable); it is removed if ``write`` raises. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as raw:
            f = _Recording(raw)
            try:
                write(f)
            except Exception:
                if f.error is not None:  # e.g. torch.save turns a failed write (disk full) into a RuntimeError
                    raise f.error from None
                raise
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        # write() and fsync() errors carry no file name (and open()'s names the temporary): name the target
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


class _Recording:
    """A file that remembers the OSError of a failed write (writers such as torch.save re-raise it as another type)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Remove the ``.<name>.<pid>.<random>.tmp`` files of ``path`` whose writer process no longer runs."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]+\.tmp$")
    for tmp in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else ():
        m = pattern.match(tmp.name)
        if m and not _alive(int(m.group(1))):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one file at a time: an old temporary of ours is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class WriteLock:
    """An exclusive ``fcntl`` lock on ``path`` (an empty file, created if needed), held inside ``with``.

    When another process holds it, one line says so on stderr and the call waits: a second writer of the same
    folder (a double click) then finds the first one's work done instead of racing it. The operating system
    releases the lock when its holder exits, also when it is killed.
    """

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path, self.what, self._f = Path(path), what, None

    def __enter__(self) -> "WriteLock":
        self._f = open(self.path, "a+b")
        if fcntl is not None:
            try:
                fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"sdi: another process is writing {self.what}; waiting for it to finish", file=sys.stderr,
                      flush=True)
                fcntl.flock(self._f.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self._f is not None:
            self._f.close()  # closing releases the lock
            self._f = None


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
