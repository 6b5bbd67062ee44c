"""Finding the loop: which submodules a model calls more than once per forward pass.

A looped model calls its loop body once per iteration, so the modules to pass as ``loop`` are the ones whose
forward runs several times in one pass with the same parameters. :func:`find_loops` runs ``loss_fn(model, batch)``
once (without gradients) with a counting pre-hook on every submodule that owns parameters (directly or below it)::

    >>> sdi.find_loops(model, batch, loss_fn)
    [LoopCandidate(name='backbone', calls=4, n_params=30528, type='GPT2Model')]

A module repeated only because its parent is (a layer inside the block) is left out when it runs exactly as
often as its parent; one used more often than its parent (a layer applied twice per iteration) is listed too.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn


class LoopCandidate(NamedTuple):
    """A submodule called more than once per forward pass: ``name``, ``calls``, its parameter count and type."""

    name: str
    calls: int
    n_params: int
    type: str


def find_loops(model: nn.Module, batch: Any, loss_fn: Callable) -> list[LoopCandidate]:
    """Submodules called more than once in one ``loss_fn(model, batch)``, outermost first (by parameter count).

    Pass the first one (or, for a loop body split over several modules, all of them) as ``loop``. Returns an empty
    list when nothing repeats: the model does not loop, or the loop runs outside its modules' ``forward``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> (B,) losses")
    names = {}
    for name, m in model.named_modules():
        if name and any(p.requires_grad for p in m.parameters()):
            names[id(m)] = (name, m)
    counts = {k: 0 for k in names}
    handles = []
    for key, (_, m) in names.items():
        def hook(module, args, key=key):
            counts[key] += 1
        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    by_name = {name: counts[key] for key, (name, _) in names.items()}
    out = []
    for key, (name, m) in names.items():
        c = counts[key]
        if c < 2:
            continue
        parent = name.rpartition(".")[0]
        while parent and not by_name.get(parent):     # the nearest ancestor that ran (skips ModuleLists)
            parent = parent.rpartition(".")[0]
        if parent and by_name.get(parent, 0) >= c:
            continue                    # repeated because its parent is
        out.append(LoopCandidate(name, c, sum(p.numel() for p in m.parameters() if p.requires_grad),
                                 type(m).__name__))
    return sorted(out, key=lambda c: (-c.n_params, c.name))
