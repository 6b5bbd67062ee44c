"""The model and loss shared by every benchmark worker, importable WITHOUT the ``sdi`` package.

The authors' reference package also imports as ``sdi``, so a worker running in its virtual environment must
never import ours. ``LoopedGPT`` is therefore loaded straight from the source file ``sdi/model.py`` (it
depends on ``torch`` alone): both environments run the very same architecture code, and a ``state_dict``
saved by one loads into the other.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parent.parent
MODEL_SOURCE = REPO / "sdi" / "model.py"
IGNORE = -100  # target value of positions that carry no loss (as in sdi.tasks)


def load_model_module() -> ModuleType:
    """``sdi/model.py`` as a stand-alone module named ``looped_model`` (no ``sdi`` package import)."""
    name = "looped_model"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, MODEL_SOURCE)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load the model source {MODEL_SOURCE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        del sys.modules[name]
        raise ImportError(f"{MODEL_SOURCE} must depend on torch alone to be shared with the reference "
                          f"environment: {e}") from e
    return module


def build_model(config: dict) -> torch.nn.Module:
    """A ``LoopedGPT`` from a ``LoopedGPTConfig.to_dict()`` dictionary."""
    m = load_model_module()
    return m.LoopedGPT(m.LoopedGPTConfig(**config), seed=0)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, L, V), ``targets`` (B, L) -> mean answer-token cross-entropy (B,), as ``sdi.tasks``."""
    mask = targets != IGNORE
    safe = targets.clamp_min(0)
    nll = -torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example loss ``(B,)`` of a batch ``{"tokens": (B, L), "targets": (B, L)}``."""
    return answer_loss(model(batch["tokens"]), batch["targets"])


def make_batches(tokens: torch.Tensor, targets: torch.Tensor, batch_size: int,
                 device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """(N, L) tokens and targets -> list of batches of at most ``batch_size`` examples, in order."""
    return [{"tokens": tokens[i:i + batch_size].to(device), "targets": targets[i:i + batch_size].to(device)}
            for i in range(0, tokens.shape[0], batch_size)]
