"""A refused step: what was found, where, and the message ``step()`` raises
(docs/DESIGN.md, "Failure model").

The engine, the reference and the ranks' agreement all report a refusal as a :class:`Refusal`;
the optimizer raises ``FloatingPointError(refusal.message(...))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence

from . import _C
from .naming import param_label, where

__all__ = ["Refusal", "BAD_KINDS"]

#: The kinds of non-finite value a check finds, by engine code % 4 (csrc/engine.h, BadKind).
BAD_KINDS = tuple(_C.BAD_KINDS)

#: What the message of each kind of non-finite value suggests (docs/GUIDE.md §5).
_LIKELY_CAUSE = {
    "gradient": ("A loss that overflows within a few steps means a step too large for this "
                 "model: lower lr (the step h, now {lr:g}); later in training, look for "
                 "inf/NaN in the batch or the loss."),
    "parameter": ("It was set outside the optimizer, or written by an earlier step that "
                  "overflowed or ran with check_finite=False."),
    "momentum": ("It was set outside the optimizer (opt.state), or written by an earlier step "
                 "that overflowed or ran with check_finite=False."),
}


@dataclasses.dataclass
class Refusal:
    """Why a step was refused: a non-finite ``kind`` (one of ``BAD_KINDS``) at ``index`` — a
    tensor of plan ``plan`` (the step's plans in order), or for ``"thermostat"`` a segment —
    found on ``rank`` (None: this process). ``plan`` is None when only a device flag knows; then
    ``index`` counts the entries of some plan."""

    plan: Optional[int]
    index: int
    kind: str
    rank: Optional[int] = None

    @staticmethod
    def from_code(code: int, plan: Optional[int] = None,
                  rank: Optional[int] = None) -> "Refusal":
        """From the engine's code (tensor or segment * 4 + kind)."""
        return Refusal(plan, code // 4, BAD_KINDS[code % 4], rank)

    def message(self, groups: Sequence[Dict[str, Any]], calls: Sequence[Any], device=None,
                agreed: bool = False) -> str:
        """What ``step()`` raises: the group, the parameter (or thermostat) and the kind, that
        nothing changed, and what to do. ``calls[plan]`` is the refused plan's engine call
        (its ``group_index`` and ``positions``)."""
        anywhere = " on any rank" if agreed else ""
        found = "" if self.rank is None else f" on rank {self.rank}"
        if self.plan is None:  # only the device flag knows
            return (f"a non-finite {self.kind} was found on {device}{found} (entry {self.index} "
                    f"of a call); the step was skipped and nothing was updated{anywhere}")
        call = calls[self.plan]
        group = groups[call.group_index]
        wh = where(call.group_index, group)
        if self.kind == "thermostat":
            what = ("the group's thermostat" if group["thermostat"] == "group" else
                    f"the thermostat of {param_label(group, call.positions[self.index])}")
            return (f"{wh}{what} overflowed{found} (xi or exp(-xi delta) is not finite); nothing "
                    f"was updated{anywhere}. Lower eps or lr, or check the loss scale")
        pos = call.positions[self.index]
        shape = tuple(group["params"][pos].shape)
        return (f"{wh}{param_label(group, pos)} of shape {shape} has a non-finite "
                f"{self.kind}{found} at step {int(group['step'])} of its group; nothing was "
                f"updated{anywhere}. {_LIKELY_CAUSE[self.kind].format(lr=float(group['lr']))} "
                f"(check_finite=False skips this check)")
