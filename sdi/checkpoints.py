"""Checkpoints: the files, the list a user passes, and the walk that loads each in turn and restores the model.

TracIn weighs checkpoint ``k`` by the learning rate ``eta_k`` in force when it was saved, so every checkpoint
written by :func:`save_checkpoint` carries it. Files are written atomically and read with
``torch.load(..., weights_only=True)``: loading never runs pickled code.

Every function that visits checkpoints (in-memory influence, self-influence, featurizing a store, query features)
does so through :class:`CheckpointWalk`, so "load checkpoint k, compute, put the user's weights back" is written
once::

    with CheckpointWalk(model, checkpoints) as walk:
        for k, ref in walk:          # the model now holds checkpoint k; ref.eta is eta_k
            ...
    # the model holds its original weights again, also after an exception or Ctrl-C
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .checkpoint_formats import fill_tied, read_checkpoint
from .files import atomic_write
from .fingerprints import weights_digest


@dataclass
class Checkpoint:
    """A saved model state. ``lr`` is ``eta_k``: the learning rate in force at ``step``."""

    path: Path | None
    step: int
    lr: float
    state_dict: dict[str, torch.Tensor] | None = None

    def load_state_dict(self) -> dict[str, torch.Tensor]:
        if self.state_dict is not None:
            return self.state_dict
        return read_checkpoint(self.path).state_dict


def save_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], **meta) -> Path:
    """Write ``{"state_dict": ..., **meta}`` atomically; ``meta`` holds plain values only (numbers, strings)."""
    payload = {"state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()}, **meta}
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint in any layout of :mod:`sdi.checkpoint_formats` without unpickling code.

    Returns ``{"state_dict": ..., **meta}``: for a file from :func:`save_checkpoint` exactly what was saved;
    otherwise ``lr`` (eta, when the file carries it or an optimizer state) and ``step`` when known, and ``layout``.
    """
    ck = read_checkpoint(path)
    if ck.layout == "sdi":
        return {"state_dict": ck.state_dict, **ck.meta, "lr": ck.eta}
    out: dict[str, Any] = {"state_dict": ck.state_dict, "layout": ck.layout}
    if ck.eta is not None:
        out["lr"] = ck.eta
    if ck.step is not None:
        out["step"] = ck.step
    return out


# ------------------------------------------------------------------------------------------ the user's list

@dataclass
class CheckpointRef:
    """One checkpoint as the library sees it: how to load its weights, its ``eta``, and its identity.

    ``load`` is None for "the model's current weights". ``sha256`` (of the weights) is filled in when the
    weights are first loaded, or up front by :func:`resolve_checkpoints` with ``digests=True``.
    """

    load: Callable[[], dict[str, torch.Tensor]] | None
    name: str
    step: int | None
    eta: float
    sha256: str = ""

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "step": self.step, "eta": self.eta, "sha256": self.sha256}


CheckpointSpec = Any  # path, (path | state_dict, eta | None), a Checkpoint (eta = its lr), or a CheckpointRef


def resolve_checkpoints(checkpoints: Sequence[CheckpointSpec] | None, digests: bool = False) -> list[CheckpointRef]:
    """``[path | (path | state_dict, eta) | Checkpoint, ...]`` -> one :class:`CheckpointRef` per checkpoint.

    A path is a file or an HF ``save_pretrained`` folder in any layout of :mod:`sdi.checkpoint_formats`. Given
    alone, or with ``eta=None``, its ``eta`` is read from the file: the ``lr`` an sdi checkpoint carries, else the
    learning rate of the first param group of the optimizer state saved with it.

    ``None`` means the current weights with ``eta = 1``. With ``digests`` every checkpoint is loaded once here to
    hash it (no more than one checkpoint's weights are held at a time).
    """
    if checkpoints is None:
        return [CheckpointRef(None, "current weights", None, 1.0)]
    if isinstance(checkpoints, (str, os.PathLike, dict, Checkpoint, CheckpointRef)):
        raise TypeError("checkpoints must be a list of (path_or_state_dict, eta) pairs or sdi.Checkpoint objects, "
                        f"not a single {type(checkpoints).__name__}; wrap it in a list")
    refs = [_ref(i, spec) for i, spec in enumerate(checkpoints)]
    if not refs:
        raise ValueError("checkpoints is empty: pass at least one (path_or_state_dict, eta) pair, or None for the "
                         "current weights")
    if digests:
        for ref in refs:
            if not ref.sha256:
                ref.sha256 = weights_digest(ref.load())
    return refs


def _ref(i: int, spec: CheckpointSpec) -> CheckpointRef:
    if isinstance(spec, CheckpointRef):
        return spec
    step = None
    if isinstance(spec, Checkpoint):
        state, eta, step = (spec.path if spec.path is not None else spec.state_dict), spec.lr, spec.step
    elif isinstance(spec, (str, os.PathLike)):
        state, eta = spec, None
    elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        state, eta = spec
    else:
        raise TypeError(f"checkpoints[{i}] must be a path, a (path_or_state_dict, eta) pair or a Checkpoint, "
                        f"got {type(spec).__name__}")
    if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta)):
        raise ValueError(f"checkpoints[{i}]: eta must be a finite number (or None to read it from the file's "
                         f"optimizer state), got {eta!r}")
    if isinstance(state, (str, os.PathLike)):
        path = Path(state)
        if not path.exists():
            raise FileNotFoundError(f"checkpoints[{i}]: checkpoint file not found: {path}")
        if step is None or eta is None:
            ck = read_checkpoint(path)
            step = ck.step if step is None else step
            if eta is None:
                if ck.eta is None or not math.isfinite(ck.eta):
                    raise ValueError(f"checkpoints[{i}]: {path} ({ck.layout}) carries no learning rate (no 'lr' "
                                     "entry, no optimizer state); pass (path, eta)")
                eta = ck.eta
        return CheckpointRef(lambda: read_checkpoint(path).state_dict, path.name,
                             None if step is None else int(step), float(eta))
    if eta is None:
        raise ValueError(f"checkpoints[{i}]: a state_dict carries no learning rate; pass (state_dict, eta)")
    if isinstance(state, dict):
        return CheckpointRef(lambda: state, f"state_dict_{i}", step, float(eta))
    raise TypeError(f"checkpoints[{i}]: expected a path or a state_dict, got {type(state).__name__}")


# ------------------------------------------------------------------------------------------ the walk

def load_into(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """``model.load_state_dict(state)`` with an error that names the checkpoint.

    Keys of tied tensors that ``state`` lacks (HF ``save_pretrained`` writes one name per shared tensor) are
    filled from their twin, as ``from_pretrained`` does; everything else must match exactly.
    """
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint {name}: expected a state_dict, got {type(state).__name__}")
    try:
        model.load_state_dict(fill_tied(model, state))
    except RuntimeError as e:
        raise ValueError(f"checkpoint {name} does not fit the model: {e}") from None


class CheckpointWalk:
    """Load each checkpoint into ``model`` in turn; restore the model's own weights on exit.

    Iterating yields ``(k, ref)`` with checkpoint ``k`` loaded; ``ref.sha256`` is filled in as it loads.
    ``skip`` (a set of indices) lists checkpoints to pass over without loading them.
    """

    def __init__(self, model: nn.Module, checkpoints: Sequence[CheckpointSpec] | None | list[CheckpointRef]) -> None:
        self.model = model
        self.refs = checkpoints if _all_refs(checkpoints) else resolve_checkpoints(checkpoints)
        self._original: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.refs)

    def __enter__(self) -> "CheckpointWalk":
        self._original = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            self.model.load_state_dict(self._original)
            self._original = None

    def __iter__(self) -> Iterator[tuple[int, CheckpointRef]]:
        return self.visit()

    def visit(self, skip: set[int] = frozenset()) -> Iterator[tuple[int, CheckpointRef]]:
        if self._original is None:
            raise RuntimeError("iterate a CheckpointWalk inside `with CheckpointWalk(model, checkpoints) as walk:`")
        for k, ref in enumerate(self.refs):
            if k in skip:
                continue
            if ref.load is None:          # the model's own weights
                state = self._original
                if k:
                    load_into(self.model, state, ref.name)
            else:
                state = ref.load()
                load_into(self.model, state, ref.name)
            if not ref.sha256:
                ref.sha256 = weights_digest(state)
            yield k, ref


def _all_refs(checkpoints: Any) -> bool:
    return isinstance(checkpoints, list) and bool(checkpoints) and all(isinstance(c, CheckpointRef) for c in checkpoints)
