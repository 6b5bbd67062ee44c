"""What the explorer shows beside the scores, computed from a trained LoopedGPT and its datasets::

    inputs = explorer_inputs(model, train, queries, n_loops=8)
    InfluenceExplorer(result, k=10, **inputs)

This runs the model forward only (no gradients): the logit-lens answer after every iteration.
"""

from __future__ import annotations

from typing import Any

import torch

from sdi.tasks import TaskDataset, decode_answers, predict


def explorer_inputs(model: torch.nn.Module, train_data: TaskDataset, query_data: TaskDataset,
                    n_loops: int | None = None) -> dict[str, Any]:
    """Keyword arguments for :class:`~sdi_widgets.InfluenceExplorer` / :func:`~sdi_widgets.static.write_html`
    from a model and its data.

    Returns ``train_texts`` (N prompts), ``train_labels`` (N answers as trained on, flipped ones included),
    ``flipped`` (indices), ``query_texts`` (Q prompts), ``query_truth`` (Q right answers) and
    ``query_answers`` (Q lists of T answers: the model's answer after each of ``n_loops`` iterations —
    use the iteration count the influence result was computed with).
    """
    for name, value in (("train_data", train_data), ("query_data", query_data)):
        if not isinstance(value, TaskDataset):
            raise TypeError(f"{name} must be an sdi.tasks.TaskDataset, got {type(value).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module (e.g. sdi.LoopedGPT), got {type(model).__name__}")
    per_step = decode_answers(query_data, predict(model, query_data, n_loops=n_loops, per_step=True))  # (T, Q)
    return {
        "train_texts": [e.prompt for e in train_data.examples],
        "train_labels": [e.answer for e in train_data.examples],
        "flipped": train_data.flipped.tolist(),
        "query_texts": [e.prompt for e in query_data.examples],
        "query_truth": [e.answer for e in query_data.examples],
        "query_answers": [list(row) for row in zip(*per_step)],
    }
