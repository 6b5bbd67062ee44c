"""What made a set of features: digests of models, weights and data, and the featurizer's fingerprint check.

Features are only comparable when one featurizer (one sketch seed and width, one parameter layout) made them at
one checkpoint from the examples they claim to describe. Every such identity is a plain-JSON value computed
here, once, so that the in-memory path and the feature store compare the same things the same way.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import numpy as np
import torch


def _sha256_tensors(named: Sequence[tuple[str, torch.Tensor]], with_values: bool) -> str:
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        if with_values:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """The architecture: SHA-256 of every state-dict entry's name, shape and dtype (not the values)."""
    state = sorted(model.state_dict().items())
    return {"sha256": _sha256_tensors(state, with_values=False), "n_tensors": len(state),
            "n_values": int(sum(t.numel() for _, t in state))}


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, shapes, dtypes and values (device independent)."""
    return _sha256_tensors(sorted(state_dict.items()), with_values=True)


def data_digest(batch: Any) -> str:
    """SHA-256 of every tensor (and plain value) in a batch: detects a changed training set."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if torch.is_tensor(x):
            h.update(f"T{tuple(x.shape)}{x.dtype}".encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, np.ndarray):
            walk(torch.from_numpy(np.ascontiguousarray(x)))
        elif isinstance(x, dict):
            for key in sorted(x, key=str):
                h.update(f"K{key!s}".encode())
                walk(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"V{x!r}".encode())

    walk(batch)
    return h.hexdigest()


def as_json(x: Any) -> Any:
    """``x`` as it reads back from JSON (tuples become lists), so identities compare equal after a round trip."""
    return json.loads(json.dumps(x))


def fingerprint_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys in which two featurizer fingerprints differ (empty when they agree)."""
    a, b = as_json(a), as_json(b)
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def describe_differences(a: dict[str, Any], b: dict[str, Any], keys: list[str]) -> str:
    """``{key: (a, b)}`` for the differing keys, the long parameter list left out."""
    return str({k: (a.get(k), b.get(k)) for k in keys if k != "params"})


def check_fingerprints(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Raise if two feature sets were made by different featurizers (different sketch, layout, ...)."""
    diffs = fingerprint_differences(a, b)
    if diffs:
        raise ValueError(
            f"features were made with different featurizers and cannot be compared (they differ in {diffs}: "
            f"{describe_differences(a, b, diffs)}); use one StepInfluence (one sketch seed, one sketch_dim, one "
            "parameter set) for train and query features"
        )
