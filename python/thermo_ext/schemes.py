"""Scheme strings: parsing, validation and folding (docs/DESIGN.md, Letters; Folding and the first step).

A scheme is a string over the letters A B O C D E, or one of the named schemes ``"langevin"``
(BAOAB), ``"adl"`` (BACDEDCAB) and ``"overdamped"`` (Euler–Maruyama, no momentum). Each
occurrence of a letter L moves by ``h / count(L)``.

``optimizer.step()`` sees one gradient, so the written string is read as a cycle and rotated to
start with a B with no B after an A ("folding"). The letters the rotation took from after the
last A of the written string are the previous step's closing half: they are skipped on the first
step. ``fold("OBABO")`` shows the result::

    >>> print(fold("OBABO"))
    BO·OBA
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

from . import _C

__all__ = ["LETTERS", "NAMED", "Letter", "FoldedScheme", "fold", "is_valid"]

LETTERS = _C.SCHEME_LETTERS  # "ABOCDE": the engine's letters but V, the overdamped scheme's own
NOISE_LETTERS = _C.NOISE_LETTERS  # the letters that draw noise (O, D and V)
NAMED = {"langevin": "BAOAB", "adl": "BACDEDCAB", "overdamped": None}
MAX_LETTERS = _C.MAX_OPS  # the engine's program size

_MEANING = {
    "A": "theta += delta p",
    "B": "p -= delta (g + weight_decay theta)",
    "O": "p = exp(-gamma delta) p + sqrt(tau (1 - exp(-2 gamma delta))) R",
    "C": "p = exp(-xi delta) p",
    "D": "p += sigma sqrt(delta) R",
    "E": "xi += delta eps (sum p^2 - N tau)",
    "V": "theta -= h (g + weight_decay theta) - sqrt(2 h tau) R",
}


@dataclasses.dataclass(frozen=True)
class Letter:
    """One letter of a folded scheme.

    ``factor`` is delta / h. ``draw`` is the noise counter's draw field (O, D, V), ``None`` for
    letters without noise. ``xi_version`` (C only) counts the E letters executed before it in the
    step. ``tail`` marks the letters skipped on the first step.
    """

    letter: str
    factor: float
    draw: Optional[int] = None
    xi_version: int = 0
    tail: bool = False

    def __str__(self) -> str:
        s = f"{self.letter}({_fraction(self.factor)}h)"
        if self.draw is not None:
            s += f"[draw {self.draw}]"
        return s


@dataclasses.dataclass(frozen=True)
class FoldedScheme:
    """A validated scheme, folded for one gradient per step.

    ``letters`` is the folded string letter by letter (tail first). ``program(first)`` gives what a
    step runs: the tail dropped on the first step, adjacent A, B or C merged.
    """

    name: Optional[str]
    written: str
    letters: Tuple[Letter, ...]

    def __hash__(self) -> int:  # (name, written) determine the letters; hashing them is slow
        return hash((self.name, self.written))

    @functools.cached_property
    def n_tail(self) -> int:
        return sum(1 for x in self.letters if x.tail)

    @functools.cached_property
    def overdamped(self) -> bool:
        return self.written == "V"

    @functools.cached_property
    def uses_momentum(self) -> bool:
        return not self.overdamped

    @functools.cached_property
    def uses_thermostat(self) -> bool:
        return any(x.letter in "CE" for x in self.letters)

    @functools.cached_property
    def n_e(self) -> int:
        return sum(1 for x in self.letters if x.letter == "E")

    @functools.cached_property
    def n_draws(self) -> int:
        return sum(1 for x in self.letters if x.draw is not None)

    @functools.lru_cache(maxsize=None)
    def program(self, first: bool) -> Tuple[Letter, ...]:
        """The letters one step executes, in order, with merged deltas and xi versions."""
        out = []
        n_e = 0
        for x in self.letters:
            if first and x.tail:
                continue
            x = dataclasses.replace(x, tail=False, xi_version=n_e if x.letter == "C" else 0)
            if out and x.letter in "ABC" and out[-1].letter == x.letter:
                out[-1] = dataclasses.replace(out[-1], factor=out[-1].factor + x.factor)
            else:
                out.append(x)
            n_e += x.letter == "E"
        return tuple(out)

    def terminal(self, h: float, gamma: float, xi: float) -> Optional[float]:
        """k with the terminal momentum p0 = k F: the fixed point of one step under a constant
        force F at tau = 0 with the thermostat held at ``xi``, as the first step starts (tail
        included: the first step from p0 moves theta exactly as a step of the steady state); where
        h is so small that the damping rounds to 1 (h = 0 included) its limit -1 / (the letters'
        mean friction), the continuous terminal velocity. None where nothing damps p (no O or C
        letter, or no positive friction). docs/DESIGN.md, Initial momentum."""
        if self.overdamped:
            return None
        rate = {"O": gamma, "C": xi}  # each damping letter's friction
        friction = sum(x.factor * rate[x.letter] for x in self.letters if x.letter in rate)
        if not friction > 0:
            return None
        a, b = 1.0, 0.0  # p -> a p + b F over the cycle
        for x in [x for x in self.letters if not x.tail] + [x for x in self.letters if x.tail]:
            if x.letter == "B":
                b -= x.factor * h
            elif x.letter in rate:
                c = math.exp(-rate[x.letter] * x.factor * h)
                a, b = c * a, c * b
        return b / (1.0 - a) if a < 1.0 else -1.0 / friction  # B's factors sum to 1

    def __str__(self) -> str:
        if self.overdamped:
            return "V"
        head = "".join(x.letter for x in self.letters if x.tail)
        rest = "".join(x.letter for x in self.letters if not x.tail)
        return f"{head}·{rest}" if head else rest

    def describe(self) -> str:
        """A table of what the first and the later steps run."""
        title = self.name or self.written
        lines = [f"scheme {title!r}: written {self.written}, folded {self}"]
        for first in (True, False):
            lines.append("  first step:" if first else "  later steps:")
            for x in self.program(first):
                extra = f" with xi version {x.xi_version}" if x.letter == "C" else ""
                lines.append(f"    {str(x):<22} {_MEANING[x.letter]}{extra}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"FoldedScheme({self.name or self.written!r}: {self})"


def _fraction(f: float) -> str:
    for d in range(1, 33):
        n = f * d
        if abs(n - round(n)) < 1e-12:
            n = round(n)
            return str(n) if d == 1 else f"{n}/{d}"
    return repr(f)


def _normalise(scheme) -> Tuple[Optional[str], str]:
    if not isinstance(scheme, str):
        raise TypeError(f"scheme: expected a str (a named scheme or letters {LETTERS}), "
                        f"got {type(scheme).__name__}")
    key = scheme.strip()
    if key.lower() in NAMED:
        name = key.lower()
        return name, NAMED[name] or "V"
    if not key:
        raise ValueError(f"scheme: empty string; expected one of {sorted(NAMED)} or letters "
                         f"over {LETTERS}")
    s = key.upper()
    for i, ch in enumerate(s):
        if ch not in LETTERS:
            raise ValueError(f"scheme {scheme!r}: unknown letter {ch!r} at position {i}; "
                             f"expected a named scheme {sorted(NAMED)} or letters over {LETTERS}")
    if len(s) > MAX_LETTERS:
        raise ValueError(f"scheme {scheme!r}: {len(s)} letters, at most {MAX_LETTERS}")
    if "B" not in s:
        raise ValueError(f"scheme {scheme!r}: has no B, so it never uses the gradient")
    if "A" not in s:
        raise ValueError(f"scheme {scheme!r}: has no A, so it never moves the parameters")
    return None, s


def _rotation(s: str) -> int:
    """Start index of the unique rotation that begins with B and has no B after an A, or -1."""
    for k in range(len(s)):
        r = s[k:] + s[:k]
        if r[0] == "B" and "B" not in r[r.index("A"):]:
            return k
    return -1


def fold(scheme) -> FoldedScheme:
    """Validate and fold ``scheme``; raises ValueError/TypeError saying what is wrong."""
    if not isinstance(scheme, str):
        raise TypeError(f"scheme: expected a str (a named scheme or letters {LETTERS}), "
                        f"got {type(scheme).__name__}")
    return _fold(scheme)


@functools.lru_cache(maxsize=1024)
def _fold(scheme: str) -> FoldedScheme:
    name, s = _normalise(scheme)
    if s == "V":
        return FoldedScheme(name, "V", (Letter("V", 1.0, draw=0),))
    k = _rotation(s)
    if k < 0:
        raise ValueError(f"scheme {scheme!r}: needs two gradients per step (its B letters are "
                         f"separated by A letters on both sides of the cycle); one step sees "
                         f"one gradient")
    counts = {ch: s.count(ch) for ch in LETTERS}
    tail = k > s.rindex("A")  # the rotation took the letters after the last A to the front
    order = list(range(k, len(s))) + list(range(k))
    letters = []
    draw = 0
    for pos, i in enumerate(order):
        ch = s[i]
        d = None
        if ch in NOISE_LETTERS:
            d, draw = draw, draw + 1
        letters.append(Letter(ch, 1.0 / counts[ch], draw=d, tail=tail and pos < len(s) - k))
    return FoldedScheme(name, s, tuple(letters))


def is_valid(scheme) -> bool:
    try:
        fold(scheme)
        return True
    except (TypeError, ValueError):
        return False
