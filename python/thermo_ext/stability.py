"""Instability that is still finite: a group's parameters running away.

Non-finite values already make ``step()`` raise ``FloatingPointError`` (``check_finite``). A run
can, however, blow up while every value stays finite: with a step too large for the model's
curvature the weights of a layer grow by orders of magnitude in a few hundred steps, the loss
climbs and the accuracy falls to chance, and nothing is raised. Where normalisation makes the
weights' scale irrelevant (BatchNorm, LayerNorm) they need not grow at all: the layer after the
last normalisation (a classifier head) is thrown back and forth by steps as large as itself
while the loss climbs. :class:`StabilityMonitor` watches every param group for both and issues
an :class:`InstabilityWarning` naming the group, the layer and the likely fix, once per group.
The rules and the measurements they were chosen from are in docs/GUIDE.md ("Instability
warnings").

Cost and synchronisation: every ``every`` steps the monitor computes, per group, Σθ² with
torch's multi-tensor norms (one read of θ; also Σp² while tracing); every ``step_every`` steps
it measures each layer's step on a fixed sample of at most ``sample`` elements per tensor, taken
after the step before and after the step itself (two small copies). On the CPU it reads the few
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
from typing import Dict, List, Optional, Sequence

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


def _layer(names, index: int) -> str:
    """The layer a group's parameter belongs to: its module's path (its name without the last
    component; "(top)" for the model's own parameters), or ``#index`` where the group carries
    no names."""
    if isinstance(names, (list, tuple)) and index < len(names) and isinstance(names[index], str):
        return names[index].rsplit(".", 1)[0] if "." in names[index] else "(top)"
    return f"#{index}"


def _number(x) -> Optional[float]:
    """A hyperparameter as a float (a device tensor's value is not read: None)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.numel() == 1:
        return float(x)
    return None


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor: its shard on this rank
    return to_local() if callable(to_local) else t


class _GroupTrack:
    """What the rule remembers of one group between checks."""

    __slots__ = ("ref", "tau", "history", "warned", "layer_ref", "streak")

    def __init__(self):
        self.ref: Optional[float] = None  # RMS(theta) at the first check
        self.tau = 0.0  # the highest temperature the group has had at a check
        self.history: List[tuple] = []  # (step, rms_theta, kinetic) of recent checks
        self.warned = False
        self.layer_ref: Dict[str, float] = {}  # per layer: its RMS at its first measurement
        # per layer: the measurements in a row whose relative step reached the limit
        self.streak: Dict[str, List[tuple]] = {}


class StabilityMonitor:
    """Watches a :class:`~thermo_ext.Thermo` optimizer's groups for finite runaways.

    Call :meth:`observe` after every successful step (the optimizer does, unless built with
    ``check_stability=False``). Every ``every`` steps it measures per group the RMS of the
    parameters (and, while tracing, the kinetic temperature Σp²/N) and applies the rule of
    :meth:`verdict`; every ``step_every`` steps it measures each layer's relative step and
    applies the rule of :meth:`step_verdict`.
    """

    #: Steps between checks.
    every: int = 16
    #: A group is running away when the RMS of its parameters is at least ``growth`` times its
    #: initial scale (see :meth:`verdict`) ...
    growth: float = 5.0
    #: ... and grew at least ``rate`` times within the last ``window`` steps.
    rate: float = 2.0
    window: int = 128
    #: A layer is thrown back and forth when one step moves it by at least ``step_limit`` times
    #: its RMS (see :meth:`step_verdict`) at ``step_checks`` measurements in a row, one every
    #: ``step_every`` steps; ``step_checks = 0`` turns that rule off.
    step_limit: float = 0.2
    step_checks: int = 2
    step_every: int = 8
    #: Elements per tensor whose step is measured (a fixed strided sample of a larger tensor).
    sample: int = 1024
    #: A list to append every measurement to, a dict per group and check: optimizer id, group,
    #: step, rms (RMS(θ)), kinetic (Σp²/N), tau, lr, scale and low (the rule's reference scale
    #: and the smallest RMS in the window), rel_step and rel_step_layer (the largest relative
    #: step among the group's layers and which, at checks that measured one), warned (None:
    #: nothing recorded). For measuring the rules (bench/stability.py,
    #: bench/model_families.py --signals).
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
        self._snap: Optional[tuple] = None  # (step, {device: theta's sample}) the step before

    # ------------------------------------------------------------------------------ measuring
    def observe(self, opt) -> None:
        """Counts a successful step of ``opt``; every ``every`` (and ``step_every``) steps,
        measures and judges."""
        self._calls += 1
        full = self._calls % self.every == 0 or self._calls == 1  # 1: the reference scale
        steps = self.step_checks > 0 and self.step_every > 0
        light = steps and self._calls % self.step_every == 0
        ahead = steps and (self._calls + 1) % self.step_every == 0
        if not (full or light or ahead):
            return
        # (A capture needs CUDA initialised: asking that first is cheaper than is_available.)
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            return
        grad_mode = torch.is_grad_enabled()
        set_grad_enabled(False)  # torch.no_grad, without its context manager's cost
        try:
            if full or light:
                self._collect(opt)
                self._launch(opt, full)
            if ahead:  # the step before a measurement: theta's sample, for its step
                per_device, _ = self._layout(opt)
                self._snap = (self._calls, {dev: self._samples(d)[0]
                                            for dev, d in per_device.items()})
        finally:
            set_grad_enabled(grad_mode)

    def _layout(self, opt):
        """Per device: the θ (and, while tracing, p) tensors with the group index of each, θ's
        samples (flat strided views, at most ``sample`` elements each) with the layer of each
        and its numel, and each group's element count. The tensors are kept between checks
        until the groups change, unless a parameter is a DTensor (its local shard is asked for
        at every check) or the monitor is tracing (momenta appear at a group's first step)."""
        key = (opt._cache.version, tuple(id(g["params"]) for g in opt.param_groups),
               tuple(len(g["params"]) for g in opt.param_groups))
        if self._layout_kept is None or self._layout_kept[0] != key:
            per_device: Dict[torch.device, Dict[str, list]] = {}
            keep = self.trace is None
            for gi, group in enumerate(opt.param_groups):
                names = group.get("param_names")
                for pi, p in enumerate(group["params"]):
                    t = _local(p)
                    keep &= t is p
                    d = per_device.get(t.device)
                    if d is None:
                        d = per_device[t.device] = {"theta": [], "tg": [], "mom": [], "mg": [],
                                                    "layer": [], "sample": [], "ptrs": []}
                    d["theta"].append(t)  # read under no_grad; a parameter swapped through
                    d["tg"].append(gi)    # .data stays the same tensor object
                    d["layer"].append((gi, _layer(names, pi), t.numel()))
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

    def _launch(self, opt, full: bool = True) -> None:
        if len(self._pending) >= 4:  # the device is far behind: let it catch up first
            return
        per_device, numel = self._layout(opt)
        groups = len(opt.param_groups)
        parts = [(*self._part(device, d, groups, full), d["layer"])
                 for device, d in per_device.items()]
        self._pending.append((self._calls, numel, groups, parts, full))
        self._collect(opt)

    def _part(self, device: torch.device, d: Dict[str, list], groups: int, full: bool = True):
        """(event or None, the sums: a list, or a tensor to read once the event completed).

        The sums: per group Σθ² and Σp² (p only while tracing; NaN when not ``full``), then per
        tensor the Σθ² of its sample and the sample's Σ(Δθ)² over the step just taken (NaN
        without the step before's sample)."""
        if device.type == "cpu":
            return None, self._host_sums(d, groups, full)
        return self._to_host(self._device_sums(device, d, groups, full))

    def _samples(self, d: Dict[str, list]):
        """θ's sample on one device as one tensor (None without parameters) and the sample's
        size per parameter: at most ``sample`` elements of each at a fixed stride (all of a
        small one). The strided views are kept with the layout and made afresh when a
        parameter's storage moved (``p.data = ...``)."""
        ptrs = [t.data_ptr() for t in d["theta"]]
        if ptrs != d["ptrs"]:
            d["sample"] = [t.reshape(-1)[::self._stride(t.numel())] for t in d["theta"]]
            d["ptrs"] = ptrs if all(t.is_contiguous() for t in d["theta"]) else []
        sizes = [v.numel() for v in d["sample"]]
        return (torch.cat(d["sample"]) if d["sample"] else None), sizes

    def _stride(self, numel: int) -> int:
        """The stride of a tensor's sample: every element of a small tensor, at most
        ``sample`` of a larger one."""
        return max(1, -(-numel // self.sample))

    def _step_lists(self, d: Dict[str, list]):
        """θ's samples now and their change since the step before's (None when that sample was
        not taken on this layout): two lists of one tensor per parameter."""
        now, sizes = self._samples(d)
        if now is None:
            return [], None
        before = None
        if self._snap is not None and self._snap[0] == self._calls - 1:
            before = self._snap[1].get(d["theta"][0].device)
        if before is None or before.shape != now.shape:
            return list(now.split(sizes)), None
        if now.dtype in (torch.bfloat16, torch.float16):
            now, before = now.float(), before.float()
        return list(now.split(sizes)), list((now - before).split(sizes))

    def _device_sums(self, device: torch.device, d: Dict[str, list], groups: int,
                     full: bool = True) -> torch.Tensor:
        """The sums as a device tensor, computed without reading anything back."""
        sums = torch.zeros(2 * groups, dtype=torch.float64, device=device)
        for key, gkey, offset in (("theta", "tg", 0), ("mom", "mg", groups)):
            if not full or not d[key]:
                continue
            norms = torch.stack(torch._foreach_norm(d[key])).double()
            rows = [g + offset for g in d[gkey]]
            sums += self._summing(rows, 2 * groups, device) @ (norms * norms)
        if not full:
            sums.fill_(math.nan)
        samples, steps = self._step_lists(d)
        count = len(samples)
        parts = [sums]
        if count:
            norms = torch.stack(torch._foreach_norm(samples + (steps or []))).double()
            parts.append(norms * norms)
            if steps is None:
                parts.append(torch.full((count,), math.nan, dtype=torch.float64, device=device))
        return torch.cat(parts)

    def _host_sums(self, d: Dict[str, list], groups: int, full: bool = True) -> List[float]:
        """The CPU's sums: one multi-tensor norm and one read, added on the host (the device
        path's further calls would cost a small model's step more than the check should)."""
        tensors = d["theta"] + d["mom"] if full else []
        samples, steps = self._step_lists(d)
        lists = tensors + samples + (steps or [])
        norms = torch.stack(torch._foreach_norm(lists)).tolist() if lists else []  # exact
        sums = [0.0 if full else math.nan] * (2 * groups)
        rows = d["tg"] + [g + groups for g in d["mg"]] if full else []
        for row, value in zip(rows, norms):
            sums[row] += value * value
        count = len(samples)
        sums += [v * v for v in norms[len(tensors):]]
        if steps is None:
            sums += [math.nan] * count
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
            done = all(event is None or event.query() for event, _, _ in check[3])
            (ready if done else waiting).append(check)
        self._pending = waiting
        for step, numel, groups, parts, full in ready:
            values = [0.0] * (2 * groups)
            layers: List[Dict[str, List[float]]] = [{} for _ in range(groups)]
            for _, buf, meta in parts:
                buf = buf if isinstance(buf, list) else buf.tolist()
                values = [a + b for a, b in zip(values, buf)]
                count = len(meta)
                for k, (gi, layer, n) in enumerate(meta):
                    if gi >= groups:
                        continue
                    # each tensor's sample stands for all its elements: weight it by n / size
                    size = -(-n // self._stride(n))  # the sample's size
                    w = n / size if size else 0.0
                    acc = layers[gi].setdefault(layer, [0, 0.0, 0.0])
                    acc[0] += n
                    acc[1] += w * buf[2 * groups + k]
                    acc[2] += w * buf[2 * groups + count + k]
            if groups != len(opt.param_groups):
                continue  # groups were added since this check was launched
            if full and self._model_ref is None:
                self._model_ref = math.sqrt(sum(values[:groups]) / max(sum(numel), 1))
            for gi in range(groups):
                n = max(numel[gi], 1)
                self._judge(opt, gi, step, math.sqrt(values[gi] / n), values[groups + gi] / n,
                            layers[gi], full)

    # ------------------------------------------------------------------------------ judging
    def _judge(self, opt, gi: int, step: int, rms: float, kinetic: float,
               layers: Optional[Dict[str, List[float]]] = None, full: bool = True) -> None:
        """Applies the rules to group ``gi`` at a check: the weights' rule to ``rms`` and
        ``kinetic`` (the group's, at a ``full`` check), the step rule to ``layers`` (per layer:
        numel, and the estimates of Σθ² and Σ(Δθ)² from the samples)."""
        while len(self._groups) <= gi:
            self._groups.append(_GroupTrack())
        track = self._groups[gi]
        tau = opt.param_groups[gi]["tau"]
        if isinstance(tau, (int, float)) and tau > track.tau:
            track.tau = float(tau)
        largest = self._relative_steps(track, step, layers or {}, opt.param_groups[gi])
        if full:
            if track.ref is None:
                track.ref = rms
            if not track.warned:
                track.history.append((step, rms, kinetic))
                while track.history[0][0] < step - self.window:
                    track.history.pop(0)
            if self.trace is not None:
                group = opt.param_groups[gi]
                self.trace.append(dict(
                    opt=id(opt), group=gi, step=step, rms=rms, kinetic=kinetic,
                    tau=group["tau"], lr=group["lr"], scale=self._scale(track),
                    low=min(h[1] for h in track.history) if track.history else rms,
                    rel_step=largest[0], rel_step_layer=largest[1], warned=track.warned))
        if track.warned:
            return
        reason = self.verdict(track, self._scale(track)) if full and track.history else None
        what = "running away"
        if reason is None:
            reason, what = self.step_verdict(track), "oscillating"
        if reason is not None:
            track.warned = True
            warnings.warn(self._message(opt, gi, step, reason, what), InstabilityWarning,
                          stacklevel=_stacklevel())

    def _relative_steps(self, track: _GroupTrack, step: int, layers: Dict[str, List[float]],
                        group: dict):
        """Updates each layer's streak with its relative step at this check: RMS(Δθ) of the
        step just taken over the largest of its RMS, its RMS at its first measurement, the RMS
        of all the optimizer's parameters at the first check and √τ; a step counts towards the
        streak only when it is also 3 times the temperature's own, √(2hτ). Returns the largest
        (value, layer), (nan, None) where no step was measured."""
        largest = (math.nan, None)
        floor = max(self._model_ref or 0.0, math.sqrt(track.tau))
        h, tau = _number(group.get("lr")), _number(group.get("tau"))
        thermal = 3.0 * math.sqrt(2.0 * abs(h) * max(tau, 0.0)) if h is not None and \
            tau is not None else 0.0
        for layer, (n, theta2, step2) in layers.items():
            if n == 0 or not math.isfinite(theta2):
                continue  # (non-finite values are check_finite's)
            rms = math.sqrt(theta2 / n)
            ref = track.layer_ref.setdefault(layer, rms)
            if not math.isfinite(step2):
                continue
            scale = max(rms, ref, floor)
            moved = math.sqrt(step2 / n)
            rel = moved / scale if scale > 0 else math.inf
            if not rel <= largest[0]:
                largest = (rel, layer)
            if rel >= self.step_limit and moved >= thermal:
                track.streak.setdefault(layer, []).append((step, rel))
            else:
                track.streak.pop(layer, None)
        return largest

    def step_verdict(self, track: _GroupTrack) -> Optional[str]:
        """Why a layer of the group is thrown back and forth, or None (docs/GUIDE.md §5).

        Thrown back and forth: at ``step_checks`` (2) measurements in a row, one every
        ``step_every`` (8) steps, the step just taken moved a layer (a module's own parameters;
        each tensor where the group has no names) by at least ``step_limit`` (0.2) times its
        RMS — measured on a fixed sample of at most ``sample`` elements per tensor, against the
        largest of the layer's RMS, its RMS at its first measurement, that of all the
        optimizer's parameters at the first check and √τ. A descending run's steps are small
        against its weights (the floor keeps a layer initialised at zero from reading its first
        steps as huge); a layer moved by a fifth of itself at every step is oscillating across
        its valley, which normalisation can hide from the weights' growth: a BatchNorm network's
        head thrashes and its loss climbs while no weight grows."""
        for layer, streak in track.streak.items():
            if len(streak) >= self.step_checks:
                last = streak[-self.step_checks:]
                return (f"one step moved its layer {layer!r} by "
                        + ", ".join(f"{r:.2f}" for _, r in last)
                        + f" times its RMS at {len(last)} checks in a row (steps "
                        + ", ".join(str(s) for s, _ in last)
                        + "): it is thrown back and forth instead of descending")
        return None

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
    def _message(opt, gi: int, step: int, reason: str, what: str = "running away") -> str:
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
        if group.get("mass") == "unit":
            fix += "; or mass='adaptive' (a step per coordinate, as Adam's)"
        return (f"{label} is {what} while still finite at step {step} of this "
                f"optimizer: {reason}. The step is probably too large for this model: {fix}; "
                f"see thermo_ext.tuning.from_sgd and docs/GUIDE.md. Warned once per group; "
                f"check_stability=False turns the check off.")
