"""Tools of the fault-injection suite (tests/test_faults*.py): a tiny run, a forked child that dies at an exact
point of a write, simulated OS failures.

A forked child already has torch and sdi imported, so a real SIGKILL at an exact point costs milliseconds instead of
a fresh interpreter's seconds. The child patches its own copy of :func:`sdi.files.atomic_write` (every file of a
store, result or checkpoint is written through it) and kills itself there with SIGKILL: no cleanup code runs, as
with a power cut or the OOM killer.
"""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable

import torch

import sdi.files
import sdi.runs as R

STORE_ARGS = {"sketch_dim": 32, "chunk_size": 4, "batch_size": 4}  # N=8: 2 chunks x 2 checkpoints
CLI_FEATURES = ["--sketch-dim", "32", "--chunk-size", "4", "--batch-size", "4", "--device", "cpu", "--quiet"]
TINY_TRAIN = dict(n_train=8, n_query=2, d_model=8, n_heads=2, steps=4, checkpoints=2, warmup=1, batch_size=8,
                  progress=False)
CLI_TINY = ["--n-train", "8", "--n-query", "2", "--d-model", "8", "--n-heads", "2", "--steps", "4",
            "--checkpoints", "2", "--warmup", "1", "--batch-size", "8", "--quiet"]


def featurize(run: R.Run, store: Path):
    return R.featurize_run(run, store, device="cpu", progress=False, **STORE_ARGS)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*.tmp")]


def spawn(fn: Callable[[], int | None], err: Path) -> int:
    """Fork a child that runs ``fn`` with stderr going to ``err`` and exits with its return value; its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 99
        try:
            torch.set_num_threads(1)  # OpenMP's pool does not survive a fork; one thread runs inline
            sys.stderr = open(err, "w", buffering=1)
            code = fn() or 0
        except BaseException:  # noqa: BLE001 - report anything, exit
            traceback.print_exc(file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid


def wait(pid: int) -> int:
    """The exit code of a child (``-N`` when killed by signal ``N``)."""
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def in_child(fn: Callable[[], int | None], err: Path) -> int:
    """Run ``fn`` in a forked child (see :func:`spawn`) and wait: its exit code (or -signal number)."""
    return wait(spawn(fn, err))


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at(name: str, point: str, nth: int = 1) -> None:
    """Patch (in this process only) the writes so it SIGKILLs itself at ``point`` of the ``nth`` write of a file
    whose name matches the regex ``name``: ``mid-write`` (half the bytes in the temporary file), ``before-rename``
    (complete and fsynced temporary, not yet renamed) or ``after-rename`` (the file in place, nothing after it)."""
    real, seen = sdi.files.atomic_write, [0]

    def patched(path, write):
        if re.fullmatch(name, Path(path).name):
            seen[0] += 1
            if seen[0] == nth:
                if point == "mid-write":
                    def partial(f):
                        buf = io.BytesIO()
                        write(buf)
                        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                        f.flush()
                        die()
                    return real(path, partial)
                if point == "before-rename":
                    os.replace = lambda *a: die()
                    return real(path, write)
                real(path, write)
                die()
        return real(path, write)

    for module in list(sys.modules.values()):  # sdi.files and every module that imported its atomic_write
        if getattr(module, "__name__", "").startswith("sdi") and getattr(module, "atomic_write", None) is real:
            module.atomic_write = patched


def failing_open(err: int, after_bytes: int = 0, name: str = r".*", real_open=open) -> Callable:
    """An ``open`` for :mod:`sdi.files` whose files (temporaries of targets named by the regex ``name``) fail to
    write with ``err`` once ``after_bytes`` bytes are written: ENOSPC is a full disk, EDQUOT a quota."""
    def fake(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        m = re.fullmatch(r"\.(.+)\.\d+\.[0-9a-f]+\.tmp", Path(file).name)
        return _Full(f, err, after_bytes) if "x" in mode and m and re.fullmatch(name, m.group(1)) else f
    return fake


class _Full:
    def __init__(self, f, err: int, budget: int) -> None:
        self._f, self._err, self._budget = f, err, budget

    def write(self, data) -> int:
        if len(data) > self._budget:
            raise OSError(self._err, os.strerror(self._err))
        self._budget -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, attr):
        return getattr(self._f, attr)


def read_only_open(real_open=open) -> Callable:
    """An ``open`` for :mod:`sdi.files` that refuses every write like a read-only mount (EROFS)."""
    def fake(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)
    return fake
