"""Which module kind computes each attributed parameter's per-example gradient, and why a slow one was chosen.

:meth:`sdi.StepInfluence.plan` returns a :class:`Plan`; printing it shows one row per parameter::

    parameter                 module type   kind         native  why generic
    core.attn.qkv.weight      Linear        LinearLeaf   yes
    core.attn.qk_bias         Attention     GenericLeaf  no      Attention owns parameter(s) directly besides ...

Parameters whose kind is not native take the generic ``torch.func`` path (correct, but it re-runs the module and
forms dense per-example gradients: slower and more memory); :class:`~sdi.StepInfluence` warns about them once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn as nn

from .capture import ParamSlot
from .leaves import generic_reason, leaf_kind


class PlanEntry(NamedTuple):
    """One attributed parameter: its name, its owning module's name and type, its kind, and why (if generic)."""

    param: str
    module: str
    module_type: str
    kind: str
    native: bool
    reason: str


class Plan(list):
    """A list of :class:`PlanEntry`, one per attributed parameter, that prints as a table."""

    @property
    def generic(self) -> list[PlanEntry]:
        """The entries that take the generic torch.func path."""
        return [e for e in self if not e.native]

    def __str__(self) -> str:
        rows = [("parameter", "module type", "kind", "native", "why generic")] + \
            [(e.param, e.module_type, e.kind, "yes" if e.native else "no", e.reason) for e in self]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join(("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]).rstrip()
                         for r in rows)


def make_plan(slots: list[ParamSlot], leaves: dict[str, nn.Module]) -> Plan:
    """The :class:`Plan` of ``slots`` (from :func:`sdi.capture.loop_parameters`) and their owning ``leaves``."""
    plan = Plan()
    for s in slots:
        module = leaves[s.leaf]
        kind = leaf_kind(module)
        plan.append(PlanEntry(s.name, s.leaf, type(module).__name__, type(kind).__name__, kind.native,
                              "" if kind.native else generic_reason(module)))
    return plan


def generic_warning(plan: Plan) -> str | None:
    """The one-time warning text for the parameters on the generic path (None when there are none)."""
    slow = plan.generic
    if not slow:
        return None
    by_reason: dict[str, list[str]] = {}
    for e in slow:
        by_reason.setdefault(e.reason, []).append(e.param)
    parts = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())
    return (f"sdi: {len(slow)} of {len(plan)} attributed parameter(s) take the generic torch.func path (correct but "
            f"slower, dense per-example gradients): {parts}. attr.plan() shows the kind of every parameter")
