"""Causal forecasts of the arrivals to come, for the lookahead planner's rollouts (:mod:`.lookahead`).

A forecast is returned as the simulation's own arrival arrays (times, prompt tokens, output tokens, hash lists or
``None``): its arrivals up to now, then the forecast's, so that a copy of the simulation given them takes the
forecast as its future. None of them reads the window's future:

* :func:`replay_forecast` (persistence): the last ``horizon_s`` seconds of arrivals again.
* :class:`AnalogPool` (analogues from a prior): stretches of a trace's *training* blocks whose recent arrivals
  look like the present's, each continued by what followed it there. It is the planner's version of what a
  policy trained on those blocks could know of the arrival process: the distribution of what comes next, given
  how busy the last seconds were. Several draws, scored together, average the planner's objective over it.

Output lengths a router learns only when a request finishes: :func:`mean_finished_output` and
:func:`replay_forecast` use only those of finished requests.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from deflectlab.envs.splits import get_split
from deflectlab.envs.workloads import Trace, load_trace

#: finished requests the output-length estimate averages (the latest arrivals among them)
OUT_SAMPLE = 200
#: spacing of the analogue start points, simulated seconds (a grid over each block, at the episode's time scale)
ANALOG_STEP_S = 0.05

Arrivals = tuple[list[float], list[int], list[int], list | None]


def finished_outputs(sim: Any, n: int) -> list[int]:
    """The output lengths of the latest ``n`` arrivals that have finished, the latest first (fewer if fewer have):
    what a router knows of output lengths."""
    outs: list[int] = []
    reqs = sim.requests
    for k in range(len(reqs) - 1, -1, -1):
        if len(outs) >= n:
            break
        r = reqs[k]
        if r.t_finish >= 0.0:
            outs.append(r.output_tokens)
    return outs


def mean_finished_output(sim: Any) -> int | None:
    """The mean output length, tokens (rounded, at least 1), of the latest :data:`OUT_SAMPLE` arrivals that have
    finished; ``None`` before any has finished."""
    outs = finished_outputs(sim, OUT_SAMPLE)
    return max(1, round(sum(outs) / len(outs))) if outs else None


def with_future(sim: Any, fut_t: list[float], fut_in: list[int], fut_out: list[int], fut_blocks: list[int]
                ) -> Arrivals:
    """The simulation's arrivals up to now followed by forecast ones. Where the simulation has block hashes, the
    forecast prompts get fresh ones (``fut_blocks[k]`` blocks each; negative ids, never a trace's): a forecast
    assumes no prefix reuse."""
    i = sim._next
    hashes = sim._hashes
    if hashes is not None:
        fresh, nxt = [], -1
        for m in fut_blocks:
            fresh.append(list(range(nxt, nxt - m, -1)))
            nxt -= m
        hashes = hashes[:i] + fresh
    return sim._arr_t[:i] + fut_t, sim._arr_in[:i] + fut_in, sim._arr_out[:i] + fut_out, hashes


def replay_forecast(sim: Any, horizon_s: float) -> Arrivals:
    """A causal forecast of the next ``horizon_s`` seconds of arrivals: the last ``horizon_s`` seconds' again,
    shifted by ``horizon_s`` (persistence). Arrival times and prompt lengths are what a router saw arrive (the
    pending request's included). Output lengths, which a router learns only when a request finishes, are those of
    the latest arrivals that have finished, the latest first, reused in turn if too few have finished; with none
    finished yet the forecast has no arrivals."""
    i, now = sim._next, sim.now
    arr_t, arr_in = sim._arr_t, sim._arr_in
    past = range(bisect_right(arr_t, now - horizon_s, 0, i), i)
    outs = finished_outputs(sim, len(past))
    if not outs:
        past = range(0)
    hashes = sim._hashes
    blocks = [len(hashes[j]) for j in past] if hashes is not None else []
    return with_future(sim, [arr_t[j] + horizon_s for j in past], [arr_in[j] for j in past],
                       [outs[n % len(outs)] for n in range(len(past))], blocks)


class AnalogPool:
    """The arrivals of some blocks of a trace, from which :meth:`forecasts` draws analogues of the present.

    For an episode whose arrivals are the trace's compressed by ``scale`` (simulated seconds per trace second,
    ``1 / load``), the candidate analogues are the points ``s`` of a grid (every :data:`ANALOG_STEP_S` simulated
    seconds) inside one block, with ``past_s`` simulated seconds of the block before ``s`` and ``horizon_s``
    after it. The present ``now`` of an episode with ``n`` arrivals in ``(now - past_s, now]`` (the pending one
    included) takes the ``samples`` candidates whose count in ``(s - past_s, s]`` is nearest to ``n`` (ties drawn at
    random), and each gives a future: the block's arrivals in ``(s, s + horizon_s]``, at ``now + (t - s)``, with
    their prompt and output lengths (the block's, known: it is training data).

    :param trace: the trace the blocks are of.
    :param blocks: ``[start, end)`` trace seconds (end None for the trace's end).
    :param label: names the pool in errors.
    """

    def __init__(self, trace: Trace, blocks: Sequence[tuple[float, float | None]], label: str) -> None:
        end = float(trace.arrival_s[-1])
        self.trace = trace
        self.label = label
        self.blocks = [(float(a), end if b is None else float(b)) for a, b in blocks]
        self._t = trace.arrival_s
        self._grids: dict[tuple[float, float, float], tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def of_split(cls, trace: str, split: str, part: str) -> AnalogPool:
        """The ``part`` (``train`` or ``held_out``) blocks of split ``split`` of trace ``trace`` (cached)."""
        return _pool(trace, split, part)

    def overlaps(self, start_s: float, end_s: float) -> bool:
        """Whether trace seconds ``[start_s, end_s)`` meet one of the pool's blocks."""
        return any(start_s < b and a < end_s for a, b in self.blocks)

    def grid(self, scale: float, past_s: float, horizon_s: float) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, counts)``: the candidate analogues' points ``s`` (trace seconds) and their arrival counts in
        ``(s - past_s, s]`` (``past_s`` and ``horizon_s`` in simulated seconds, at ``scale``)."""
        key = (scale, past_s, horizon_s)
        got = self._grids.get(key)
        if got is None:
            past_tr, fut_tr, step_tr = past_s / scale, horizon_s / scale, ANALOG_STEP_S / scale
            starts = [np.arange(a + past_tr, b - fut_tr, step_tr) for a, b in self.blocks if b - a > past_tr + fut_tr]
            if not starts:
                raise ValueError(f"analog pool {self.label}: no block is longer than {past_s:g} + {horizon_s:g} "
                                 f"simulated seconds at {1 / scale:g}x load")
            s = np.concatenate(starts)
            counts = np.searchsorted(self._t, s, side="right") - np.searchsorted(self._t, s - past_tr, side="right")
            got = self._grids[key] = (s, counts)
        return got

    def draw(self, n_now: int, scale: float, past_s: float, horizon_s: float, samples: int,
             rng: np.random.Generator) -> np.ndarray:
        """The points ``s`` (trace seconds) of ``samples`` analogues of a present with ``n_now`` arrivals in the
        last ``past_s`` simulated seconds: the candidates whose count is nearest, ties in a random order."""
        starts, counts = self.grid(scale, past_s, horizon_s)
        if samples > len(starts):
            raise ValueError(f"analog pool {self.label}: {samples} draws asked, but it has only {len(starts)} "
                             f"candidate moments at {1 / scale:g}x load")
        return starts[np.lexsort((rng.random(len(starts)), np.abs(counts - n_now)))[:samples]]

    def future(self, sim: Any, s: float, scale: float, horizon_s: float) -> Arrivals:
        """``sim``'s arrivals up to now, then the pool's in ``(s, s + horizon_s]`` (simulated seconds at ``scale``)
        at ``now + (t - s)``, with their prompt and output lengths."""
        t = self._t
        lo, hi = np.searchsorted(t, (s, s + horizon_s / scale), side="right")
        idx = range(int(lo), int(hi))
        inp, out, hashes = self.trace.input_tokens, self.trace.output_tokens, self.trace.hash_ids
        blocks = []
        if sim._hashes is not None:
            blocks = [len(hashes[j]) for j in idx] if hashes is not None else \
                [math.ceil(int(inp[j]) / sim._hash_block_tokens) for j in idx]
        now = sim.now
        return with_future(sim, [now + (float(t[j]) - s) * scale for j in idx], [int(inp[j]) for j in idx],
                           [int(out[j]) for j in idx], blocks)

    def forecasts(self, sim: Any, scale: float, past_s: float, horizon_s: float, samples: int,
                  rng: np.random.Generator) -> list[Arrivals]:
        """``samples`` forecasts of the arrivals after ``sim.now`` (see the class docstring)."""
        i = sim._next
        n_now = i - bisect_right(sim._arr_t, sim.now - past_s, 0, i)
        return [self.future(sim, float(s), scale, horizon_s)
                for s in self.draw(n_now, scale, past_s, horizon_s, samples, rng)]


@lru_cache(maxsize=8)
def _pool(trace: str, split: str, part: str) -> AnalogPool:
    sp = get_split(split)
    blocks = {"train": sp.train, "held_out": sp.held_out}.get(part)
    if blocks is None:
        raise ValueError(f"analog pool: part must be 'train' or 'held_out', got {part!r}")
    return AnalogPool(load_trace(trace), blocks, f"{trace} ({split} split, {part} blocks)")


def episode_scale(sim: Any, pool: AnalogPool, what: str) -> float:
    """The simulated seconds per trace second of ``sim``'s episode (``1 / load``), checked: the episode must
    replay a window of the pool's trace (or another trace) that does not meet the pool's blocks, else the
    forecast would read the window's own future."""
    meta = getattr(sim.workload, "meta", None) or {}
    if meta.get("arrival", "trace") != "trace":
        raise ValueError(f"{what}: an analog forecast needs a trace-replay episode; this one's arrivals are "
                         f"{meta.get('arrival')!r} (synthetic: no trace time to draw analogues at)")
    win = meta.get("window") or {}
    if meta.get("trace") == pool.trace.name and win:
        lo = float(win.get("start_s") or 0.0)
        dur = win.get("duration_s")
        hi = math.inf if dur is None else lo + float(dur)
        if pool.overlaps(lo, hi):
            raise ValueError(f"{what}: the episode's window [{lo:g}, {hi:g}) s of {pool.trace.name} meets the "
                             f"analog pool {pool.label}: the forecast would read the window's own future")
    scale = meta.get("time_scale", 1.0)
    if not (isinstance(scale, int | float) and scale > 0 and math.isfinite(scale)):
        raise ValueError(f"{what}: the episode's time_scale must be a positive number, got {scale!r}")
    return float(scale)

