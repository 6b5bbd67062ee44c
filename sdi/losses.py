"""Per-example losses in the Hugging Face convention, so ``loss_fn`` for an HF model is one line.

A batch is a dict as a tokenizer/collator makes it: ``input_ids`` (B, T), optionally ``attention_mask`` and
other model inputs, and ``labels`` (B, T) with ``-100`` at positions that carry no loss. The model's output may be
a tensor of logits, a tuple whose first element is the logits, or an object with a ``.logits`` field::

    attr = sdi.StepInfluence(model, loop=..., loss_fn=sdi.losses.causal_lm_loss)
    attr = sdi.StepInfluence(model, loop=..., loss_fn=sdi.losses.masked_lm_loss)

Each example's loss is the mean cross-entropy over its labelled tokens (0, with no gradient, for an example
without any), which is what HF's ``model(..., labels=...)`` averages over the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, shift: bool = False) -> torch.Tensor:
    """(B,) mean cross-entropy per example over tokens whose label is not ``-100``.

    logits: (B, T, V); labels: (B, T). ``shift`` (causal LM): position ``n`` predicts label ``n + 1``, as HF's
    causal-LM heads do, so ``labels`` may simply be ``input_ids``.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != IGNORE_INDEX
    nll = F.cross_entropy(logits.transpose(1, 2).float(), labels.masked_fill(~valid, 0), reduction="none")
    return (nll * valid).sum(1) / valid.sum(1).clamp_min(1)


def _logits(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected logits, a tuple starting with them, or "
                    "an object with .logits")


def _run(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, dict) or "labels" not in batch:
        raise TypeError("an HF-style batch is a dict with 'labels' (B, T) (-100 = no loss) and the model's inputs "
                        f"(input_ids, attention_mask, ...); got {type(batch).__name__}"
                        + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else ""))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return _logits(model(**inputs)), batch["labels"]


def causal_lm_loss(model, batch: dict) -> torch.Tensor:
    """(B,) per-example next-token loss of a causal LM: logits at ``n`` scored against ``labels[n + 1]``."""
    logits, labels = _run(model, batch)
    return token_cross_entropy(logits, labels, shift=True)


def masked_lm_loss(model, batch: dict) -> torch.Tensor:
    """(B,) per-example masked-LM loss: logits at ``n`` scored against ``labels[n]`` (no shift)."""
    logits, labels = _run(model, batch)
    return token_cross_entropy(logits, labels, shift=False)
