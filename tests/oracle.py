"""An independent oracle for per-step gradients: the loop *untied* into one deep copy per iteration.

In the untied model the c-th call of a loop module runs its own copy, so the gradient with respect to
copy c's parameters is, by definition, ``phi_c``. It is computed with ``torch.func`` (``vmap(grad(...))``),
sharing no code with the hook-based capture in ``sdi.capture``/``sdi.features``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap


class Untied(nn.Module):
    """Stands in for a loop module; its c-th call runs ``copies[c]``."""

    def __init__(self, module: nn.Module, n_copies: int) -> None:
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(module) for _ in range(n_copies))
        self.calls = 0

    def forward(self, *args, **kwargs):
        if self.calls >= len(self.copies):
            raise RuntimeError("the loop ran more often than the oracle has copies")
        out = self.copies[self.calls](*args, **kwargs)
        self.calls += 1
        return out


def untie(model: nn.Module, loop_names: list[str], n_copies: int) -> nn.Module:
    """A deep copy of ``model`` whose submodules ``loop_names`` are replaced by :class:`Untied` stand-ins."""
    untied = copy.deepcopy(model)
    for name in loop_names:
        target = untied.get_submodule(name)
        stand_in = Untied(target, n_copies)
        # every place the module is registered (a ModuleList holding one block several times) gets the stand-in
        places = [(parent, attr) for parent in untied.modules() for attr, child in parent._modules.items()
                  if child is target]
        for parent, attr in places:
            setattr(parent, attr, stand_in)
    return untied


def oracle_per_step_grads(model: nn.Module, loop_names: list[str], param_names: list[str], loss_fn,
                          batch: dict, n_steps: int) -> torch.Tensor:
    """phi: (B, T, P) — per-example gradient of each loop copy, parameters in ``param_names`` order."""
    untied = untie(model, loop_names, n_steps)
    untied.eval()
    stand_ins = [untied.get_submodule(n) for n in loop_names]
    params = {k: v.detach() for k, v in untied.named_parameters()}
    buffers = {k: v.detach() for k, v in untied.named_buffers()}

    def one_loss(p, *row):
        for s in stand_ins:
            s.calls = 0
        one = {k: r.unsqueeze(0) for k, r in zip(batch_keys, row)}
        model_fn = lambda *a, **kw: functional_call(untied, (p, buffers), a, kw)  # noqa: E731
        return loss_fn(model_fn, one)[0]

    batch_keys = [k for k, v in batch.items() if torch.is_tensor(v)]
    per_example = vmap(grad(one_loss), in_dims=(None,) + (0,) * len(batch_keys))(
        params, *[batch[k] for k in batch_keys]
    )
    B = batch[batch_keys[0]].shape[0]
    columns = []
    for t in range(n_steps):
        step_cols = []
        for name in param_names:
            loop_name = next(n for n in loop_names if name.startswith(n + "."))
            copy_name = f"{loop_name}.copies.{t}.{name[len(loop_name) + 1:]}"
            step_cols.append(per_example[copy_name].reshape(B, -1))
        columns.append(torch.cat(step_cols, dim=1))
    return torch.stack(columns, dim=1)


def full_grads(model: nn.Module, param_names: list[str], loss_fn, batch: dict) -> torch.Tensor:
    """Per-example gradient of the *tied* model's loss w.r.t. ``param_names``: (B, P), via vmap(grad)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    keys = [k for k, v in batch.items() if torch.is_tensor(v)]

    def one_loss(p, *row):
        one = {k: r.unsqueeze(0) for k, r in zip(keys, row)}
        return loss_fn(lambda *a, **kw: functional_call(model, (p, buffers), a, kw), one)[0]

    g = vmap(grad(one_loss), in_dims=(None,) + (0,) * len(keys))(params, *[batch[k] for k in keys])
    B = batch[keys[0]].shape[0]
    return torch.cat([g[n].reshape(B, -1) for n in param_names], dim=1)


def oracle_per_step_grads_autograd(model: nn.Module, loop_names: list[str], param_names: list[str], loss_fn,
                                   batch: dict, n_steps: int) -> torch.Tensor:
    """As :func:`oracle_per_step_grads`, one example at a time with plain autograd (for models, such as HF ones,
    whose forward is not vmap-able: data-dependent checks on the attention mask). phi: (B, T, P)."""
    untied = untie(model, loop_names, n_steps)
    untied.eval()
    stand_ins = [untied.get_submodule(n) for n in loop_names]
    params = dict(untied.named_parameters())
    keys = [k for k, v in batch.items() if torch.is_tensor(v)]
    B = batch[keys[0]].shape[0]
    names = []
    for t in range(n_steps):
        for name in param_names:
            loop_name = next(n for n in loop_names if name.startswith(n + "."))
            names.append(f"{loop_name}.copies.{t}.{name[len(loop_name) + 1:]}")
    rows = []
    for b in range(B):
        for s in stand_ins:
            s.calls = 0
        one = {k: (v[b : b + 1] if k in keys else v) for k, v in batch.items()}
        loss = loss_fn(untied, one)[0]
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                               for n, g in zip(names, grads)]))
    return torch.stack(rows).view(B, n_steps, -1)
