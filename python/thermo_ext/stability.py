"""Instability that is still finite: a group's parameters running away.

Non-finite values already make ``step()`` raise ``FloatingPointError`` (``check_finite``). A run
can, however, blow up while every value stays finite: with a step too large for the model's
curvature the weights of a layer grow by orders of magnitude in a few hundred steps, the loss
climbs and the accuracy falls to chance, and nothing is raised. :class:`StabilityMonitor` watches
every param group for that and issues an :class:`InstabilityWarning` naming the group and the
likely fix, once per group. The rule and the measurements it was chosen from are in
docs/GUIDE.md ("Instability warnings").

Cost and synchronisation: every ``every`` steps the monitor computes, per group, Σθ² with
torch's multi-tensor norms (one read of θ; also Σp² while tracing). On the CPU it reads the few
numbers at once and adds them on the host (a small model's whole step costs only a few torch
calls, so the check makes as few as it can). On CUDA it never waits: the sums are copied
without blocking into pinned host memory behind an event, and read at a later check once the
event has completed; so a warning may come one check later than on the CPU. Checks are skipped
while a CUDA graph is being captured.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Dict, List, Optional

import torch

from ._compat import set_grad_enabled
from .schemes import fold

__all__ = ["InstabilityWarning", "StabilityMonitor"]


class InstabilityWarning(RuntimeWarning):
    """A thermo_ext optimizer's param group is running away while all its values are finite."""


_PACKAGE_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep
                      for f in (__file__, torch.__file__))


def _stacklevel() -> int:
    """The stack level of the first frame outside this package and torch (which may wrap
    ``step()`` in its own frames): the user's ``opt.step()`` line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            _PACKAGE_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor: its shard on this rank
    return to_local() if callable(to_local) else t


class _GroupTrack:
    """What the rule remembers of one group between checks."""

    __slots__ = ("ref", "tau", "history", "warned")

    def __init__(self):
        self.ref: Optional[float] = None  # RMS(theta) at the first check
        self.tau = 0.0  # the highest temperature the group has had at a check
        self.history: List[tuple] = []  # (step, rms_theta, kinetic) of recent checks
        self.warned = False


class StabilityMonitor:
    """Watches a :class:`~thermo_ext.Thermo` optimizer's groups for finite runaways.

    Call :meth:`observe` after every successful step (the optimizer does, unless built with
    ``check_stability=False``). Every ``every`` steps it measures per group the RMS of the
    parameters (and, while tracing, the kinetic temperature Σp²/N) and applies the rule of
    :meth:`verdict`.
    """

    #: Steps between checks.
    every: int = 16
    #: A group is running away when the RMS of its parameters is at least ``growth`` times its
    #: initial scale (see :meth:`verdict`) ...
    growth: float = 5.0
    #: ... and grew at least ``rate`` times within the last ``window`` steps.
    rate: float = 2.0
    window: int = 128
    #: A list to append every measurement to, a dict per group and check: optimizer id, group,
    #: step, rms (RMS(θ)), kinetic (Σp²/N), tau, lr, scale and low (the rule's reference scale
    #: and the smallest RMS in the window), warned (None: nothing recorded). For measuring the
    #: rule (bench/stability.py, bench/model_families.py --signals).
    trace: Optional[list] = None

    def __init__(self, every: Optional[int] = None):
        if every is not None:
            if isinstance(every, bool) or not isinstance(every, int) or every < 1:
                raise ValueError(f"every: expected an int >= 1, got {every!r}")
            self.every = every
        self._calls = 0
        self._groups: List[_GroupTrack] = []
        self._pending: List[tuple] = []  # checks launched, not yet judged
        self._indices: Dict[tuple, torch.Tensor] = {}
        self._model_ref: Optional[float] = None  # RMS of all parameters at the first check
        self._layout_kept: Optional[tuple] = None  # (groups' identity or None, the tensors)

    # ------------------------------------------------------------------------------ measuring
    def observe(self, opt) -> None:
        """Counts a successful step of ``opt``; every ``every`` steps, measures and judges."""
        self._calls += 1
        if self._calls % self.every and self._calls != 1:  # step 1: the reference scale
            return
        # (A capture needs CUDA initialised: asking that first is cheaper than is_available.)
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            return
        grad_mode = torch.is_grad_enabled()
        set_grad_enabled(False)  # torch.no_grad, without its context manager's cost
        try:
            self._collect(opt)
            self._launch(opt)
        finally:
            set_grad_enabled(grad_mode)

    def _layout(self, opt):
        """Per device: the θ (and, while tracing, p) tensors with the group index of each, and
        each group's element count. The tensors are kept between checks until the groups
        change, unless a parameter is a DTensor (its local shard is asked for at every check)
        or the monitor is tracing (momenta appear at a group's first step)."""
        key = (opt._cache.version, tuple(id(g["params"]) for g in opt.param_groups),
               tuple(len(g["params"]) for g in opt.param_groups))
        if self._layout_kept is None or self._layout_kept[0] != key:
            per_device: Dict[torch.device, Dict[str, list]] = {}
            keep = self.trace is None
            for gi, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    t = _local(p)
                    keep &= t is p
                    d = per_device.get(t.device)
                    if d is None:
                        d = per_device[t.device] = {"theta": [], "tg": [], "mom": [], "mg": []}
                    d["theta"].append(t)  # read under no_grad; a parameter swapped through
                    d["tg"].append(gi)    # .data stays the same tensor object
                    if self.trace is not None:
                        m = opt.state.get(p, {}).get("momentum_buffer")
                        if m is not None:
                            d["mom"].append(_local(m))
                            d["mg"].append(gi)
            self._layout_kept = (key if keep else None, per_device)
        per_device = self._layout_kept[1]
        numel = [0] * len(opt.param_groups)  # counted afresh: .data may change a shape
        for d in per_device.values():
            for t, gi in zip(d["theta"], d["tg"]):
                numel[gi] += t.numel()
        return per_device, numel

    def _summing(self, rows: List[int], size: int, device: torch.device) -> torch.Tensor:
        """A 0/1 matrix [size, len(rows)] that sums tensor k into row rows[k]: a deterministic
        segment sum in one matmul (index_add_ would use atomics on CUDA), cached per layout
        (building it from host memory could wait for the device)."""
        key = (device, size, tuple(rows))
        m = self._indices.get(key)
        if m is None:
            if len(self._indices) > 64:
                self._indices.clear()
            m = torch.zeros(size, len(rows), dtype=torch.float64)
            m[rows, list(range(len(rows)))] = 1.0
            m = self._indices[key] = m.to(device)
        return m

    def _launch(self, opt) -> None:
        if len(self._pending) >= 4:  # the device is far behind: let it catch up first
            return
        per_device, numel = self._layout(opt)
        groups = len(opt.param_groups)
        parts = [self._part(device, d, groups) for device, d in per_device.items()]
        self._pending.append((self._calls, numel, groups, parts))
        self._collect(opt)

    def _part(self, device: torch.device, d: Dict[str, list], groups: int):
        """(event or None, the sums: a list, or a tensor to read once the event completed)."""
        if device.type == "cpu":
            return None, self._host_sums(d, groups)
        return self._to_host(self._device_sums(device, d, groups))

    def _device_sums(self, device: torch.device, d: Dict[str, list],
                     groups: int) -> torch.Tensor:
        """The sums as a device tensor, computed without reading anything back."""
        sums = torch.zeros(2 * groups, dtype=torch.float64, device=device)
        for key, gkey, offset in (("theta", "tg", 0), ("mom", "mg", groups)):
            if not d[key]:
                continue
            norms = torch.stack(torch._foreach_norm(d[key])).double()
            rows = [g + offset for g in d[gkey]]
            sums += self._summing(rows, 2 * groups, device) @ (norms * norms)
        return sums

    @staticmethod
    def _host_sums(d: Dict[str, list], groups: int) -> List[float]:
        """The CPU's sums: one multi-tensor norm and one read, added on the host (the device
        path's further calls would cost a small model's step more than the check should)."""
        tensors = d["theta"] + d["mom"]
        sums = [0.0] * (2 * groups)
        if tensors:
            norms = torch.stack(torch._foreach_norm(tensors)).tolist()  # float32, exact
            rows = d["tg"] + [g + groups for g in d["mg"]]
            for row, value in zip(rows, norms):
                sums[row] += value * value
        return sums

    @staticmethod
    def _to_host(sums: torch.Tensor):
        """(event or None, a tensor to read once the event has completed)."""
        if sums.device.type != "cuda":
            return None, sums
        # No host synchronisation: a pinned copy behind an event, read once it has completed.
        host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        host.copy_(sums, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return event, host

    def _collect(self, opt) -> None:
        """Judges every check whose numbers have all arrived (at once on the CPU)."""
        ready, waiting = [], []
        for check in self._pending:
            done = all(event is None or event.query() for event, _ in check[3])
            (ready if done else waiting).append(check)
        self._pending = waiting
        for step, numel, groups, parts in ready:
            values = [0.0] * (2 * groups)
            for _, buf in parts:
                buf = buf if isinstance(buf, list) else buf.tolist()
                values = [a + b for a, b in zip(values, buf)]
            if groups != len(opt.param_groups):
                continue  # groups were added since this check was launched
            if self._model_ref is None:
                self._model_ref = math.sqrt(sum(values[:groups]) / max(sum(numel), 1))
            for gi in range(groups):
                n = max(numel[gi], 1)
                self._judge(opt, gi, step, math.sqrt(values[gi] / n), values[groups + gi] / n)

    # ------------------------------------------------------------------------------ judging
    def _judge(self, opt, gi: int, step: int, rms: float, kinetic: float) -> None:
        while len(self._groups) <= gi:
            self._groups.append(_GroupTrack())
        track = self._groups[gi]
        if track.ref is None:
            track.ref = rms
        tau = opt.param_groups[gi]["tau"]
        if isinstance(tau, (int, float)) and tau > track.tau:
            track.tau = float(tau)
        if not track.warned:
            track.history.append((step, rms, kinetic))
            while track.history[0][0] < step - self.window:
                track.history.pop(0)
        if self.trace is not None:
            group = opt.param_groups[gi]
            self.trace.append(dict(
                opt=id(opt), group=gi, step=step, rms=rms, kinetic=kinetic, tau=group["tau"],
                lr=group["lr"], scale=self._scale(track),
                low=min(h[1] for h in track.history) if track.history else rms,
                warned=track.warned))
        if track.warned:
            return
        reason = self.verdict(track, self._scale(track))
        if reason is not None:
            track.warned = True
            warnings.warn(self._message(opt, gi, step, reason), InstabilityWarning,
                          stacklevel=_stacklevel())

    def _scale(self, track: _GroupTrack) -> float:
        """The scale growth is measured against: the group's RMS at the first check, that of
        all the optimizer's parameters then, or the thermal scale √τ, whichever is largest."""
        return max(track.ref or 0.0, self._model_ref or 0.0, math.sqrt(track.tau))

    def verdict(self, track: _GroupTrack, scale: float) -> Optional[str]:
        """Why the group is running away, or None (the rule of docs/GUIDE.md §5).

        Running away: the RMS of the group's parameters is at least ``growth`` (5) times
        ``scale`` *and* at least ``rate`` (2) times its smallest value within the last
        ``window`` (128) steps. The scale is the largest of the group's own RMS at the first
        check, that of all the optimizer's parameters then, and the thermal scale √τ (the
        spread a unit-curvature well has at temperature τ): a group initialised near zero (a
        positional embedding, a sampler started at a mode) may grow to the model's or the
        temperature's scale without a warning. The rate condition keeps the slow growth of long
        healthy runs out.
        """
        step, rms, _ = track.history[-1]
        if not math.isfinite(rms):
            # Non-finite values are check_finite's: the next step raises FloatingPointError
            # naming the parameter, or the user turned that check off on purpose.
            return None
        if not scale > 0:
            return None
        low = min(h[1] for h in track.history)
        if rms >= self.growth * scale and low > 0 and rms >= self.rate * low:
            first = track.history[0][0]
            return (f"the RMS of its parameters is {rms / scale:.0f}x its initial scale "
                    f"({scale:.3g} -> {rms:.3g}) and grew {rms / low:.1f}x within the last "
                    f"{min(self.window, step - first)} steps")
        return None

    @staticmethod
    def _message(opt, gi: int, step: int, reason: str) -> str:
        group = opt.param_groups[gi]
        name = group.get("name")
        label = f"param group {gi}" + (f" ({name!r})" if name else "")
        h, gamma = group.get("lr"), group.get("gamma")
        try:
            letters = {x.letter for x in fold(group.get("scheme")).letters}
        except (TypeError, ValueError):
            letters = set()
        fix = f"lower lr (the step h, now {h:g})"
        if "O" in letters and isinstance(gamma, (int, float)) and math.isfinite(gamma):
            fix += f" or raise gamma (the friction, now {gamma:g})"
        elif "E" in letters:
            fix += " (the thermostat sets the friction)"
        return (f"{label} is running away while still finite at step {step} of this "
                f"optimizer: {reason}. The step is probably too large for this model: {fix}; "
                f"see thermo_ext.tuning.from_sgd and docs/GUIDE.md. Warned once per group; "
                f"check_stability=False turns the check off.")
