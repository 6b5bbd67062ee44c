"""Training with AdamW, a warm-up + cosine schedule, and checkpoints that remember their learning rate.

TracIn weighs checkpoint ``k`` by the learning rate ``eta_k`` in force when it was saved, so every checkpoint
(:class:`sdi.checkpoints.Checkpoint`, written by :func:`sdi.checkpoints.save_checkpoint`) carries it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoints import Checkpoint, save_checkpoint
from .progress import progress_bar
from .tasks import TaskDataset, accuracy, loss_fn as task_loss_fn


@dataclass
class TrainConfig:
    """Optimisation settings. ``n_checkpoints`` are spread evenly over training, the last at the end."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    n_checkpoints: int = 3
    seed: int = 0
    eval_every: int = 0  # 0 = evaluate only at the end

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "n_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_checkpoints > self.steps:
            raise ValueError(f"n_checkpoints ({self.n_checkpoints}) must be <= steps ({self.steps})")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")

    def lr_at(self, step: int) -> float:
        """Learning rate used for optimiser step ``step`` (0-based): linear warm-up, then cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


@dataclass
class TrainResult:
    checkpoints: list[Checkpoint]
    losses: list[float]
    seconds: float
    history: list[dict] = field(default_factory=list)

    @property
    def tracin_checkpoints(self) -> list[tuple]:
        """``[(path_or_state_dict, eta), ...]`` as :meth:`sdi.StepInfluence.influence` takes them."""
        return [(c.path if c.path is not None else c.state_dict, c.lr) for c in self.checkpoints]


def _fused_if_supported(params: list[torch.Tensor]) -> dict:
    """``{"fused": True}`` where the fused AdamW kernel applies (several times faster for small models on the CPU)."""
    if params and all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                      for p in params):
        return {"fused": True}
    return {}


def train(
    model: torch.nn.Module,
    data: TaskDataset,
    config: TrainConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    loss_fn: Callable = task_loss_fn,
    eval_data: TaskDataset | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``data`` and return its checkpoints.

    Batches are drawn with a seeded generator, so the same config, data and initial model give the same
    weights on the CPU. With ``checkpoint_dir`` the checkpoints are written there as ``ckpt_<step>.pt``;
    otherwise they are kept in memory (``Checkpoint.state_dict``).
    """
    config = config or TrainConfig()
    if len(data) == 0:
        raise ValueError("data must not be empty")
    gen = torch.Generator().manual_seed(config.seed)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98), **_fused_if_supported(decay + no_decay),
    )
    save_at = {round(config.steps * (k + 1) / config.n_checkpoints) for k in range(config.n_checkpoints)}
    checkpoints, losses, history = [], [], []
    model.train()
    start = time.perf_counter()
    bar = progress_bar(range(config.steps), progress, desc=f"train {data.name}")
    for step in bar:
        lr = config.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(data), (config.batch_size,), generator=gen)
        loss = loss_fn(model, data.batch(idx)).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower TrainConfig.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        done = step + 1
        if config.eval_every and eval_data is not None and done % config.eval_every == 0:
            history.append({"step": done, "accuracy": accuracy(model, eval_data)})
            model.train()
        if done in save_at:
            # eta_k: the learning rate of the step that produced these weights
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            path = None
            if checkpoint_dir is not None:
                meta = {"step": done, "lr": lr, "config": json.dumps(asdict(config))}
                if hasattr(model, "config") and hasattr(model.config, "to_dict"):
                    meta["model_config"] = json.dumps(model.config.to_dict())
                path = save_checkpoint(Path(checkpoint_dir) / f"ckpt_{done:06d}.pt", state, **meta)
                state = None
            checkpoints.append(Checkpoint(path, done, lr, state))
    model.eval()
    return TrainResult(checkpoints, losses, time.perf_counter() - start, history)
