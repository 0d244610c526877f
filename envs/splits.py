"""Which stretches of a trace train a policy and which evaluate it.

A trace window is ``window_s`` trace seconds starting somewhere in a set of *start ranges*: closed intervals
``(low, high)`` of trace seconds, ``high`` None for "the trace's end minus the window". One range is the usual
case; several draw a start uniformly over their union (:func:`pick`, which reduces to ``low + u (high - low)``
for one range, so single-range draws are unchanged).

A :class:`Split` names the *blocks* of trace time (``[start, end)`` intervals, end None for the trace's end)
that training may use and those held out for evaluation, and turns them into start ranges whose windows stay
inside one block:

* ``time``: train on [0, 1200) s, hold out [1200, end) s. The default everywhere: the heuristics were tuned and
  the shipped policies trained on the early part of the bundled Azure traces, and evaluated on the later part.
* ``blocked``: alternating 300-s blocks, so that training and held-out windows both sample the whole trace:
  train on [0, 300), [600, 900), [1200, 1500) s; hold out [300, 600), [900, 1200), [1500, end) s. The bundled
  Azure code trace alternates busy and quiet stretches; a single later held-out span is one stretch of that
  day, while blocks spread both kinds over training and evaluation (blocked cross-validation of a time series).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

StartRange = tuple[float, float | None]
Block = tuple[float, float | None]


def start_ranges(spec: Any, what: str = "window_start_s") -> list[StartRange]:
    """Normalise window starts given as ``[low, high]``, ``[[low, high], ...]`` or ``"low:high,low:high"``
    (``high`` None or empty: the trace's end minus the window) to a list of ``(low, high)``."""
    if isinstance(spec, str):
        out: list[StartRange] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, sep, hi = part.partition(":")
            if not sep:
                raise ValueError(f"{what}: {part!r} is not LOW:HIGH (trace seconds; HIGH may be empty)")
            try:
                out.append((float(lo), float(hi) if hi.strip() else None))
            except ValueError:
                raise ValueError(f"{what}: {part!r} is not LOW:HIGH with numbers (trace seconds)") from None
        spec = out
    if not isinstance(spec, Sequence) or not spec:
        raise ValueError(f"{what} must be [low, high] or a list of [low, high] trace seconds, got {spec!r}")
    if not isinstance(spec[0], Sequence) or isinstance(spec[0], str):
        spec = [spec]
    out = []
    for r in spec:
        if isinstance(r, str) or not isinstance(r, Sequence) or not 1 <= len(r) <= 2:
            raise ValueError(f"{what}: each range must be [low, high] trace seconds, got {r!r}")
        lo, hi = (tuple(r) + (None,))[:2]
        lo = 0.0 if lo is None else float(lo)
        hi = None if hi is None else float(hi)
        if lo < 0 or (hi is not None and hi < lo):
            raise ValueError(f"{what}: a range must have 0 <= low <= high (trace seconds), got ({lo:g}, {hi})")
        out.append((lo, hi))
    return out


def resolve(ranges: Sequence[StartRange], end_s: float, what: str = "window_start_s") -> list[tuple[float, float]]:
    """``ranges`` with each None high replaced by ``end_s`` (the trace's end minus the window), checked."""
    out = []
    for lo, hi in ranges:
        h = max(end_s, 0.0) if hi is None else hi
        if not 0.0 <= lo <= h:
            raise ValueError(f"{what} must be 0 <= low <= high (trace seconds; an open high is the trace's end "
                             f"minus the window), got ({lo:g}, {h:g})")
        out.append((lo, h))
    return out


def pick(u: float, ranges: Sequence[tuple[float, float]]) -> float:
    """The start that ``u`` in [0, 1) stands for, uniform over the union of the closed ``ranges`` (resolved)."""
    if len(ranges) == 1:
        lo, hi = ranges[0]
        return lo + (hi - lo) * u
    total = sum(hi - lo for lo, hi in ranges)
    if total <= 0:  # only single points: pick one of them
        return ranges[min(int(u * len(ranges)), len(ranges) - 1)][0]
    x = u * total
    for lo, hi in ranges:
        if x <= hi - lo:
            return lo + x
        x -= hi - lo
    return ranges[-1][1]


def describe(ranges: Sequence[StartRange]) -> str:
    """``[0, 180] + [600, 780] s`` (``end - window`` for an open high)."""
    return " + ".join(f"[{lo:g}, {'end - window' if hi is None else f'{hi:g}'}]" for lo, hi in ranges) + " s"


@dataclass(frozen=True)
class Split:
    """Training and held-out blocks of trace time (``[start, end)``, end None for the trace's end)."""

    name: str
    train: tuple[Block, ...]
    held_out: tuple[Block, ...]

    def starts(self, part: str, window_s: float) -> list[StartRange]:
        """Start ranges whose ``window_s`` windows lie inside one ``part`` (``train`` or ``held_out``) block;
        blocks shorter than the window are skipped."""
        blocks = {"train": self.train, "held_out": self.held_out}.get(part)
        if blocks is None:
            raise ValueError(f"split {self.name}: part must be 'train' or 'held_out', got {part!r}")
        out: list[StartRange] = [(a, None if b is None else b - window_s) for a, b in blocks
                                 if b is None or b - a >= window_s]
        if not out:
            raise ValueError(f"split {self.name}: no {part} block holds a {window_s:g}-s window")
        return out

    def check_training(self, ranges: Sequence[StartRange], window_s: float, what: str = "training") -> None:
        """Refuse start ranges whose windows could reach into a held-out block."""
        for lo, hi in ranges:
            if hi is None:
                raise ValueError(f"{what} windows start in {describe([(lo, hi)])}: give the range's end, so that "
                                 f"it can be checked against the {self.name} split's held-out blocks")
            for a, b in self.held_out:
                if lo < (float("inf") if b is None else b) and hi + window_s > a + 1e-9:
                    raise ValueError(
                        f"{what} windows start in {describe([(lo, hi)])} and last {window_s:g} s: they reach "
                        f"into the held-out block [{a:g}, {'end' if b is None else f'{b:g}'}) s of the "
                        f"{self.name} split")


SPLITS: dict[str, Split] = {
    "time": Split("time", ((0.0, 1200.0),), ((1200.0, None),)),
    "blocked": Split("blocked", ((0.0, 300.0), (600.0, 900.0), (1200.0, 1500.0)),
                     ((300.0, 600.0), (900.0, 1200.0), (1500.0, None))),
}


def get_split(name: str) -> Split:
    try:
        return SPLITS[name]
    except KeyError:
        raise ValueError(f"unknown split {name!r}; known: {', '.join(SPLITS)}") from None
