"""Every checkpoint layout a user has -> ``(state_dict, eta, step)``, without ever unpickling code.

Accepted, by what the path points at::

    a directory            an HF ``save_pretrained`` folder: model.safetensors, or its sharded index
                           (model.safetensors.index.json), or pytorch_model.bin (or its index); an HF Trainer
                           checkpoint folder also gives eta (optimizer.pt) and step (trainer_state.json)
    *.safetensors          a flat tensor file (safetensors.torch.load_file)
    any other file         torch.load(..., weights_only=True) of one of
                             {"state_dict": sd, "lr": eta, "step": s, ...}    sdi.save_checkpoint
                             {name: tensor, ...}                              torch.save(model.state_dict())
                             {"model" | "state_dict" | "model_state_dict": sd, "optimizer": ..., ...}
                                                         common wrappers; nanoGPT's (iter_num -> step) included

``eta`` (TracIn's learning-rate weight) comes from an ``lr`` entry, else from a saved optimizer state: the ``lr``
of its **first param group** (``optimizer.state_dict()["param_groups"][0]["lr"]``), which is the learning rate in
force when the checkpoint was saved if the optimizer was saved with it (schedulers write the current rate into
the param groups). ``None`` when the file carries neither; then the caller must pass ``(path, eta)``.
A compiled model's ``_orig_mod.`` prefix and DDP's ``module.`` prefix are removed when every key has them.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim", "opt", "optimizer_states")
STRIP_PREFIXES = ("_orig_mod.", "module.")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")

LAYOUTS_ACCEPTED = (
    "an sdi checkpoint {'state_dict': ..., 'lr': ..., 'step': ...}; "
    "a bare state_dict (torch.save(model.state_dict(), path)); "
    f"a dict wrapping the state_dict under one of {list(WRAPPER_KEYS)} (optionally with an optimizer state under "
    f"one of {list(OPTIMIZER_KEYS)}), nanoGPT's {{'model', 'optimizer', 'iter_num', ...}} included; "
    "a .safetensors file; an HF save_pretrained directory (" + ", ".join(HF_WEIGHT_FILES) + ")"
)


@dataclass
class LoadedCheckpoint:
    """What a checkpoint file held: the weights, ``eta`` and ``step`` if it says, and which layout it was."""

    state_dict: dict[str, torch.Tensor]
    eta: float | None
    step: int | None
    layout: str
    meta: dict[str, Any] = field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike) -> LoadedCheckpoint:
    """Read any layout listed in :mod:`sdi.checkpoint_formats`; one error listing the keys found otherwise."""
    path = Path(path)
    if path.is_dir():
        return _read_hf_dir(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return LoadedCheckpoint(_strip(_load_safetensors(path)), None, None, "safetensors")
    payload = _torch_load(path)
    return _from_payload(path, payload)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: torch.load(weights_only=True) refused it, so sdi will not read it (loading never "
                         f"runs pickled code; save tensors and plain values only, or use safetensors): {e}") from None
    except RuntimeError as e:
        if _looks_like_safetensors(path):
            return _load_safetensors(path)
        raise ValueError(f"{path} is not a checkpoint torch.load can read ({str(e).splitlines()[0]}); "
                         f"accepted: {LAYOUTS_ACCEPTED}") from None


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors "
                          "(or pip install 'loopsdi[hf]')") from None
    return load_file(str(path), device="cpu")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items())


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a prefix every key carries (torch.compile's ``_orig_mod.``, DDP's ``module.``)."""
    for prefix in STRIP_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def optimizer_lr(opt_state: Any) -> float | None:
    """The ``lr`` of the first param group of a saved optimizer state (a list of them: the first one's)."""
    if isinstance(opt_state, (list, tuple)) and opt_state:
        opt_state = opt_state[0]
    if not isinstance(opt_state, dict):
        return None
    groups = opt_state.get("param_groups")
    if not isinstance(groups, (list, tuple)) or not groups or not isinstance(groups[0], dict):
        return None
    lr = groups[0].get("lr")
    if torch.is_tensor(lr):
        lr = lr.item()
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def _number(x: Any) -> float | None:
    if torch.is_tensor(x) and x.numel() == 1:
        x = x.item()
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _from_payload(path: Path, payload: Any) -> LoadedCheckpoint:
    if _is_state_dict(payload):
        return LoadedCheckpoint(_strip(payload), None, None, "state_dict")
    if isinstance(payload, dict):
        for key in WRAPPER_KEYS:
            if _is_state_dict(payload.get(key)):
                meta = {k: v for k, v in payload.items() if k != key and isinstance(v, (int, float, str, bool))}
                eta = _number(payload.get("lr"))
                if eta is None:
                    eta = next((optimizer_lr(payload[k]) for k in OPTIMIZER_KEYS if k in payload), None)
                step = next((payload[k] for k in ("step", "iter_num", "global_step", "epoch")
                             if isinstance(payload.get(k), int) and not isinstance(payload.get(k), bool)), None)
                layout = "sdi" if key == "state_dict" and "lr" in payload else \
                    ("nanogpt" if "iter_num" in payload else f"wrapper['{key}']")
                return LoadedCheckpoint(_strip(payload[key]), eta, step, layout, meta)
    found = sorted(map(str, payload))[:20] if isinstance(payload, dict) else type(payload).__name__
    raise ValueError(f"{path} holds no state_dict in a known layout (found {'keys ' if isinstance(payload, dict) else ''}"
                     f"{found}); accepted: {LAYOUTS_ACCEPTED}")


def _read_hf_dir(path: Path) -> LoadedCheckpoint:
    files = [f for f in HF_WEIGHT_FILES if (path / f).is_file()]
    if not files:
        present = sorted(p.name for p in path.iterdir())[:20]
        raise ValueError(f"{path} is a directory but not an HF save_pretrained folder (none of {list(HF_WEIGHT_FILES)} "
                         f"found; it holds {present}); accepted: {LAYOUTS_ACCEPTED}")
    name = files[0]
    if name.endswith(".index.json"):
        index = json.loads((path / name).read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_load_safetensors(path / shard) if shard.endswith(".safetensors") else _torch_load(path / shard))
    elif name.endswith(".safetensors"):
        state = _load_safetensors(path / name)
    else:
        state = _torch_load(path / name)
    eta = step = None
    if (path / "optimizer.pt").is_file():              # an HF Trainer checkpoint-N folder
        eta = optimizer_lr(_torch_load(path / "optimizer.pt"))
    if (path / "trainer_state.json").is_file():
        step = json.loads((path / "trainer_state.json").read_text()).get("global_step")
    return LoadedCheckpoint(_strip(state), eta, step if isinstance(step, int) else None, "hf:" + name)


def fill_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the keys of tied tensors it lacks filled from their present twin (as ``from_pretrained``).

    HF ``save_pretrained`` writes one name per shared tensor (e.g. ``wte.weight`` but not ``lm_head.weight``);
    the model's ``state_dict`` lists both. Aliases are found by tensor identity in the model itself.
    """
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    state = dict(state)
    for names in groups.values():
        present = [n for n in names if n in state]
        if present:
            for n in names:
                state.setdefault(n, state[present[0]])
    return state
