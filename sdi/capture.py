"""Hooks that see every call of every parameterised module inside the loop, tagged with its iteration.

A looped model calls its loop module(s) once per iteration. A forward pre-hook on each loop module counts
those calls: the c-th call *is* step ``c``. Every module inside the loop that owns parameters (a "leaf":
``nn.Linear``, ``nn.LayerNorm``, ...) records, for each of its calls, the inputs it saw and its output.
:meth:`StepCapture.backward` then back-propagates the summed loss; a hook on every recorded output receives
its gradient — the backprop ``delta`` of that call — the moment autograd has it. From inputs and ``delta`` the
per-example gradient of the leaf's parameters *at that step* follows in closed form (``phi_t``), without ever
untying the loop. The weight gradients themselves are never computed (they are the expensive third of a
backward pass), except when asked for, to check that the hooks saw every use of every parameter.

Memory: the caller's ``on_call`` turns each call's ``(inputs, delta)`` into features inside that hook, and the
capture then drops them, so the deltas of all steps are never held at once (for a d_model 256 model at 64
tokens that is ~140 MB per batch of 32). To have a hook for every recorded output, the capture hands the
model ``output + anchor`` instead of ``output``, ``anchor`` being a 0-dim zero that requires grad, and asks
autograd for the anchor's gradient only: every recorded output lies on a path to it, and nothing else is
computed (the same values reach the model; the cost is one add per leaf output).

The capture never touches ``.grad`` of the model's parameters and removes all its hooks on exit.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn


class CaptureError(ValueError):
    """The hooks could not attribute the gradient to loop iterations (see the message for the remedy)."""


@dataclass
class LeafCalls:
    """Everything one parameterised module saw during one forward/backward pass.

    For call ``c``: ``steps[c]`` is the iteration, ``args[c]``/``kwargs[c]`` the (detached) inputs,
    during :meth:`StepCapture.backward`, ``grad_outputs[c]`` the gradient of the summed per-example losses with
    respect to each output (``None`` when it did not influence the loss). The leading dimension of every tensor is the example dimension ``B``. Once a call
    has been handed to ``on_call`` its inputs and gradients are released (``released(c)``).
    """

    name: str
    module: nn.Module
    steps: list[int] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    grad_outputs: list = field(default_factory=list)
    #: per call: how many of its outputs still wait for their gradient
    pending: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)

    def release(self, call: int) -> None:
        """Drop call ``call``'s inputs and gradients (its features are made): the memory goes back at once."""
        self.args[call], self.kwargs[call] = None, None
        self.grad_outputs[call] = [None] * len(self.grad_outputs[call])

    def released(self, call: int) -> bool:
        return self.args[call] is None


@dataclass
class ParamSlot:
    """One parameter of the loop: its qualified name, the tensor, and the leaf that owns it."""

    name: str
    param: nn.Parameter
    leaf: str          # qualified name of the owning module
    attr: str          # attribute name inside the owning module ("weight", "bias", ...)

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)


def normalize_loop(model: nn.Module, loop: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """``loop`` as a non-empty list of distinct submodules of ``model``."""
    modules = [loop] if isinstance(loop, nn.Module) else list(loop)
    if not modules:
        raise ValueError("loop must be a module or a non-empty list of modules, got an empty list")
    for m in modules:
        if not isinstance(m, nn.Module):
            raise TypeError(f"loop must contain nn.Module objects, got {type(m).__name__}")
    owned = {id(m) for m in model.modules()}
    for m in modules:
        if id(m) not in owned:
            raise ValueError(f"loop module {type(m).__name__} is not a submodule of the model")
    if len({id(m) for m in modules}) != len(modules):
        raise ValueError("loop lists the same module twice")
    return modules


def loop_parameters(model: nn.Module, loop_modules: list[nn.Module]) -> tuple[list[ParamSlot], dict[str, nn.Module]]:
    """The trainable parameters of the loop, in a fixed order, and the leaves that own them.

    A parameter shared by two modules (tied weights) appears once; both owners become leaves.
    """
    names: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), n)        # a module listed several times (h = [block] * 3) keeps its first name
    slots: list[ParamSlot] = []
    leaves: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for loop_module in loop_modules:
        for mod_name, module in loop_module.named_modules(prefix=names[id(loop_module)], remove_duplicate=False):
            direct = [(a, p) for a, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not direct:
                continue
            leaves[mod_name] = module
            for attr, p in direct:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                slots.append(ParamSlot(f"{mod_name}.{attr}" if mod_name else attr, p, mod_name, attr))
    if not slots:
        raise ValueError("the loop modules have no trainable parameters (requires_grad=True) to attribute")
    return slots, leaves


class StepCapture:
    """Context manager recording per-step inputs and output gradients of the loop's leaves::

        with StepCapture(model, loop_modules, leaves) as cap:
            losses = loss_fn(model, batch)             # (B,)
        cap.backward(losses)                           # fills every call's grad_outputs
        cap.n_steps                                    # iterations the loop ran

    Leaves called outside any loop call (a module shared with the prelude, say) raise a
    :class:`CaptureError`: their gradient cannot be assigned to an iteration.
    """

    def __init__(self, model: nn.Module, loop_modules: list[nn.Module], leaves: dict[str, nn.Module]) -> None:
        self.model = model
        self.loop_modules = loop_modules
        self.leaves = leaves
        self.calls: dict[str, LeafCalls] = {}
        self.loop_calls: list[int] = [0] * len(loop_modules)
        self._stack: list[int] = []
        self._handles: list = []
        self._active = True
        self._errors: list[str] = []
        self._batch: list[int] = []
        self._anchors: dict[torch.device, torch.Tensor] = {}
        self._on_call: Callable[[LeafCalls, int], None] | None = None
        #: iterations in which some loop layer ran without gradient (no_grad / inference_mode)
        self.no_grad_steps: set[int] = set()
        self.inference_mode = False

    # -- hooks -------------------------------------------------------------------------------------
    def loop_pre_hook(self, index: int):
        def hook(module, args, kwargs):
            if self._active:
                self._stack.append(self.loop_calls[index])
                self.loop_calls[index] += 1
                self._batch.append(_batch_size(args, kwargs))
        return hook

    def _loop_post(self, module, args, output):
        if self._active and self._stack:
            self._stack.pop()
            self._batch.pop()

    def leaf_hook(self, name: str):
        def hook(module, args, kwargs, output):
            if not self._active:
                return
            if not self._stack:
                self._errors.append(
                    f"module '{name}' holds loop parameters but also ran outside the loop modules; its gradient "
                    "there cannot be assigned to an iteration. Untie the weight or add the module to `loop`."
                )
                return
            if not torch.is_grad_enabled():   # truncated backprop, or a loop run entirely under no_grad
                self.no_grad_steps.add(self._stack[-1])
                self.inference_mode |= torch.is_inference_mode_enabled()
                return
            B = self._batch[-1]
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            expand = B > 1 and _broadcast_call(args, kwargs, outputs)
            if expand:
                # An input shared by the whole batch (position ids of shape (1, T)): the output broadcasts later,
                # so its backprop would arrive summed over examples. Handing the model an expanded view instead
                # gives the same forward values and a per-example backprop.
                outputs = tuple(o.expand(B, *o.shape[1:]) if torch.is_tensor(o) and o.dim() and o.shape[0] == 1
                                else o for o in outputs)
                args = tuple(_expand(a, B) for a in args)
                kwargs = {k: _expand(v, B) for k, v in kwargs.items()}
            rec = self.calls.setdefault(name, LeafCalls(name, module))
            call = len(rec.steps)
            rec.steps.append(self._stack[-1])
            rec.args.append(tuple(a.detach() if torch.is_tensor(a) else a for a in args))
            rec.kwargs.append({k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()})
            tracked = [torch.is_tensor(o) and o.requires_grad and (o.is_floating_point() or o.is_complex())
                       for o in outputs]
            rec.grad_outputs.append([None] * len(outputs))
            rec.pending.append(sum(tracked))
            if not any(tracked):
                return None
            anchored = []
            for j, (o, t) in enumerate(zip(outputs, tracked)):
                if t:
                    o = o + self._anchor(o.device)
                    o.register_hook(self.delta_hook(rec, call, j))
                anchored.append(o)
            if not isinstance(output, (tuple, list)):
                return anchored[0]
            return type(output)(*anchored) if hasattr(output, "_fields") else type(output)(anchored)
        return hook

    def _anchor(self, device: torch.device) -> torch.Tensor:
        """The 0-dim zero (requires grad) added to every recorded output on ``device``."""
        if device not in self._anchors:
            self._anchors[device] = torch.zeros((), device=device, requires_grad=True)
        return self._anchors[device]

    def delta_hook(self, rec: LeafCalls, call: int, j: int):
        """The tensor hook on output ``j`` of a call: it keeps the delta and, once the call has all of them, hands
        the call to :meth:`backward`'s ``on_call`` (which makes its features and releases it)."""
        def hook(grad: torch.Tensor) -> None:
            rec.grad_outputs[call][j] = grad.detach()
            rec.pending[call] -= 1
            if rec.pending[call] == 0 and self._on_call is not None:
                self._on_call(rec, call)
        return hook

    # -- context -----------------------------------------------------------------------------------
    def __enter__(self) -> "StepCapture":
        for i, m in enumerate(self.loop_modules):
            self._handles.append(m.register_forward_pre_hook(self.loop_pre_hook(i), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._loop_post))
        for name, leaf in self.leaves.items():
            # prepend: a loop module that owns parameters must record before its own post-hook pops the step
            self._handles.append(leaf.register_forward_hook(self.leaf_hook(name), with_kwargs=True, prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Run code (e.g. a functional re-evaluation of a leaf) without recording it."""
        self._active, prev = False, self._active
        try:
            yield
        finally:
            self._active = prev

    # -- backward ----------------------------------------------------------------------------------
    def backward(self, losses: torch.Tensor, params: list[torch.Tensor] | None = None,
                 on_call: Callable[[LeafCalls, int], None] | None = None) -> tuple | None:
        """Back-propagate ``losses.sum()`` to every recorded output; return the params' batch gradients if asked.

        ``on_call(rec, call)`` runs inside the backward pass as soon as every tracked output of that call has
        its gradient in ``rec.grad_outputs[call]`` (it may release the call); calls that some output's gradient
        never reached are handed over after the pass. Without ``on_call`` the gradients stay in
        ``grad_outputs``. Only the anchors' gradient is requested, so autograd skips the weight gradients of
        every layer unless ``params`` are given (then their batch gradients are returned, ``None`` for unused
        ones, for the completeness check).
        """
        anchors = list(self._anchors.values())
        inputs = anchors + list(params or [])
        self._on_call = on_call
        try:
            grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True) if anchors else \
                (None,) * len(inputs)
        finally:
            self._on_call = None
        if on_call is not None:
            for rec in self.calls.values():
                for c in range(len(rec)):
                    if rec.pending[c] and not rec.released(c) and any(g is not None for g in rec.grad_outputs[c]):
                        on_call(rec, c)
        return None if params is None else tuple(grads[len(anchors):])

    # -- results -----------------------------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        """Iterations the loop ran; raises if a loop module never ran or the modules disagree."""
        names = [type(m).__name__ for m in self.loop_modules]
        never = [n for n, c in zip(names, self.loop_calls) if c == 0]
        if never:
            hint = ""
            if any(isinstance(m, (nn.ModuleList, nn.ModuleDict)) and c == 0
                   for m, c in zip(self.loop_modules, self.loop_calls)):
                hint = (" (an nn.ModuleList/ModuleDict is a container the model iterates over, never calls: pass "
                        "its elements, e.g. loop=list(model.layers), or the module that calls them)")
            raise CaptureError(
                f"loop module(s) {never} never ran in the forward pass of loss_fn; pass the module(s) that the "
                f"model calls once per iteration as `loop`{hint}. sdi.find_loops(model, batch, loss_fn) lists "
                "the modules called more than once per forward pass"
            )
        if len(set(self.loop_calls)) != 1:
            raise CaptureError(
                f"the loop modules ran different numbers of times {dict(zip(names, self.loop_calls))}; every module "
                "in `loop` must run exactly once per iteration"
            )
        return self.loop_calls[0]

    def raise_errors(self) -> None:
        """Raise the first problem the hooks met; a loop module that never ran is reported before anything else."""
        self.n_steps
        if self._errors:
            raise CaptureError(self._errors[0])


def _batch_size(args: tuple, kwargs: dict) -> int:
    """The leading dimension of a loop call's first tensor input (its example dimension); 1 if it has none."""
    first = next((t for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.dim() > 0), None)
    return 1 if first is None else first.shape[0]


def _broadcast_call(args: tuple, kwargs: dict, outputs: tuple) -> bool:
    """Whether every tensor input and output of a leaf call has batch dimension 1 (an input shared by the batch)."""
    ins = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t) and t.dim() > 0]
    outs = [o for o in outputs if torch.is_tensor(o) and o.requires_grad]
    return bool(ins) and bool(outs) and all(t.shape[0] == 1 for t in ins + outs) and \
        not any(t.requires_grad for t in ins)


def _expand(v, B: int):
    return v.expand(B, *v.shape[1:]) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == 1 else v
