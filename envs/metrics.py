"""Run metrics: per-request records, percentiles, SLO attainment, goodput and the TTFT breakdown.

Everything is computed once, after the run, from the requests' timestamps and the decode nodes' segment logs
(so the hot loop records nothing per token). Time-between-tokens samples are recovered exactly: a request's
samples are the decode-node steps after the one that produced its first token, up to the one that produced
its last, and each logged segment gives the duration of each of its steps in closed form (``a + b*j``).

Definitions
-----------
* TTFT = first token time - arrival. TBT samples: the gaps between consecutive output tokens.
* ``ttft_s``/``e2e_s`` percentiles are over completed requests; ``tbt_s`` percentiles are over every
  inter-token gap of every request (token-weighted, as vLLM's benchmarks report ITL).
* A request meets its SLO when TTFT <= ``ttft_slo_s`` and its own P95 TBT <= ``tbt_slo_s`` (a single-token
  request has no TBT and meets the TBT part). ``slo_attainment`` is the share of *all* requests that met it,
  rejected ones counting as misses; ``goodput_rps`` is requests meeting it per second of the run.
* TTFT breakdown: for the requests at or above the P95 TTFT, the mean of each component below; the
  components of a request add up to its TTFT exactly. ``prefill_share_of_p95_ttft`` is the prefill execution
  mean over that set's mean TTFT (the paper's "prefill execution is 2-23 % of P95 TTFT").
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, fields
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from deflectlab.envs.config import ClusterConfig
    from deflectlab.envs.decode_node import DecodeNode
    from deflectlab.envs.prefill_node import PrefillNode
    from deflectlab.envs.request import Request


class ClusterSim(Protocol):
    """What this module reads of a finished run: the attributes of :class:`deflectlab.envs.simulator.ClusterSim`
    (a protocol, so metrics does not import the simulator that imports it)."""

    config: ClusterConfig
    workload: Any
    requests: list[Request]
    prefill: list[PrefillNode]
    decode: list[DecodeNode]
    now: float
    events: int
    decision_s: float
    xfer_setup_s: float
    prefix_cache: bool

#: TTFT components, in order along each path (seconds).
PREFILL_PATH = ("p_queue", "prefill_exec", "handoff_wait", "transfer", "decode_wait", "first_step")
DEFLECT_PATH = ("d_queue", "chunked_prefill")
COMPONENTS = PREFILL_PATH + DEFLECT_PATH
COMPONENT_LABELS = {
    "p_queue": "prefill queue wait",
    "prefill_exec": "prefill execution",
    "handoff_wait": "hand-off wait (dispatch, decode admission, read alignment, NIC queue)",
    "transfer": "KV transfer",
    "decode_wait": "decode-side wait to first step",
    "first_step": "first decode step",
    "d_queue": "deflected: decode queue wait",
    "chunked_prefill": "deflected: chunked prefill",
}
PERCENTILES = (50, 90, 95, 99)


def percentiles(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {f"p{p}": math.nan for p in PERCENTILES} | {"mean": math.nan}
    q = np.percentile(x, PERCENTILES)
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, q)} | {"mean": float(np.mean(x))}


@dataclass
class RunResult:
    """Per-request records (``records``: column -> array) and the run ``summary`` (JSON-ready)."""

    records: dict[str, np.ndarray]
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    _tbt_inputs: Any = field(default=None, repr=False)
    typed: RunSummary | None = field(default=None, repr=False)  # the summary as a dataclass

    def tbt_p95_per_request(self) -> np.ndarray:
        """Each request's own P95 TBT, seconds (NaN without samples). Computed on first use and added to
        ``records`` as ``tbt_p95_s``: it needs every request's step pieces, which the summary does not."""
        if "tbt_p95_s" not in self.records:
            if self._tbt_inputs is None:
                raise ValueError("this result holds no segment logs to compute per-request TBT from")
            sim, d_node, first, last = self._tbt_inputs
            n = len(d_node)
            out = np.full(n, math.nan)
            for lo in range(0, n, 20_000):  # bounded memory: pieces of 20k requests at a time
                sl = slice(lo, min(lo + 20_000, n))
                owner, a, b, j0, j1 = tbt_pieces(sim, d_node[sl], first[sl], last[sl])
                out[sl] = _quantile_pieces(0.95, owner, sl.stop - sl.start, a, b, j0, j1)
            for i, r in enumerate(sim.requests):  # preempted requests: every run plus each preemption's gap
                if r.tbt_runs and last[i] > 0:
                    out[i] = _p95_with_preemptions(sim, r)
            self.records["tbt_p95_s"] = out
        return self.records["tbt_p95_s"]

    def save(self, out_dir: str | Path) -> Path:
        """Write ``requests.csv``, ``summary.json`` and ``config.json`` into ``out_dir`` (callers draw the plots:
        ``experiments.plots.plot_run``)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self._tbt_inputs is not None:
            self.tbt_p95_per_request()
        cols = list(self.records)
        n = len(self.records[cols[0]]) if cols else 0
        with (out / "requests.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            columns = [self.records[c].tolist() for c in cols]
            for i in range(n):
                w.writerow([_fmt(col[i]) for col in columns])
        (out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=_json_default))
        (out / "config.json").write_text(json.dumps(self.config, indent=2, default=_json_default))
        return out


def _p95_with_preemptions(sim: ClusterSim, r: Any) -> float:
    """Nearest-rank P95 of a preempted request's TBT samples: the steps of each run and each preemption gap."""
    runs = list(r.tbt_runs) + [(r.first_step, r.last_step)]
    d = np.full(len(runs), r.d_node, np.int64)
    owner, a, b, j0, j1 = tbt_pieces(sim, d, np.array([f for f, _ in runs]), np.array([x for _, x in runs]))
    parts = [a[k] + b[k] * np.arange(j0[k], j1[k] + 1) for k in range(len(owner))]
    x = np.sort(np.concatenate(parts + [np.asarray(r.stalls, float)]))
    return float(x[math.ceil(0.95 * len(x) - 1e-9) - 1]) if len(x) else math.nan


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def tbt_pieces(sim: ClusterSim, d_node: np.ndarray, first: np.ndarray, last: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split each request's TBT samples into arithmetic runs of step times.

    Request ``i`` (decode node ``d_node[i]``) has samples at steps ``first[i]+1 .. last[i]``. Returns
    ``(owner, a, b, j0, j1)``: piece ``m`` belongs to request ``owner[m]`` and holds the step times
    ``a[m] + b[m] * j`` for ``j = j0[m] .. j1[m]``.
    """
    owners, a_s, b_s, j0s, j1s = [], [], [], [], []
    idx_all = np.arange(len(d_node))
    for node in sim.decode:
        sel = idx_all[(d_node == node.index) & (last > first)]
        if len(sel) == 0:
            continue
        n0 = np.frombuffer(node.log_n0, dtype=np.int64)
        k = np.frombuffer(node.log_k, dtype=np.int64)
        a = np.frombuffer(node.log_a, dtype=np.float64)
        b = np.frombuffer(node.log_b, dtype=np.float64)
        lo = first[sel] + 1
        hi = last[sel]
        i0 = np.searchsorted(n0, lo - 1, side="right") - 1
        i1 = np.searchsorted(n0, hi - 1, side="right") - 1
        counts = i1 - i0 + 1
        rep = np.repeat(np.arange(len(sel)), counts)
        starts = np.cumsum(counts) - counts
        seg = i0[rep] + (np.arange(len(rep)) - starts[rep])
        j0 = np.maximum(lo[rep] - n0[seg] - 1, 0)
        j1 = np.minimum(hi[rep] - n0[seg] - 1, k[seg] - 1)
        owners.append(sel[rep])
        a_s.append(a[seg])
        b_s.append(b[seg])
        j0s.append(j0)
        j1s.append(j1)
    if not owners:
        e = np.zeros(0)
        return e.astype(np.int64), e, e, e.astype(np.int64), e.astype(np.int64)
    return (np.concatenate(owners), np.concatenate(a_s), np.concatenate(b_s), np.concatenate(j0s),
            np.concatenate(j1s))


def _count_le(v: np.ndarray | float, a: np.ndarray, inv_b: np.ndarray, j0: np.ndarray, j1: np.ndarray) -> np.ndarray:
    """How many of ``a + b*j`` (j0 <= j <= j1, b >= 0) are <= v, per piece (``inv_b`` = 1/b, inf where b = 0)."""
    with np.errstate(invalid="ignore"):
        jmax = np.floor((v - a) * inv_b)
    # b = 0: (v - a) * inf is +inf (all <= v), -inf (none) or nan (v == a: all)
    jmax = np.where(np.isnan(jmax), j1, jmax)
    return np.minimum(np.maximum(jmax, j0 - 1), j1) - j0 + 1


def _inv(b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(b > 0, 1.0 / np.where(b > 0, b, 1.0), np.inf)


def _quantile_pieces(q: float, owner: np.ndarray, n_owner: int, a, b, j0, j1, iters: int = 20) -> np.ndarray:
    """Per-owner nearest-rank quantile of the pieces' step times, by vectorised bisection.

    The result is an upper bound within (max - min) / 2**iters of the exact sample value (under 0.1 us for
    the step-time spreads seen here); SLO checks do not use it but count samples over the SLO exactly.
    """
    cnt = np.bincount(owner, weights=j1 - j0 + 1, minlength=n_owner)
    lo = np.full(n_owner, np.inf)
    hi = np.full(n_owner, -np.inf)
    np.minimum.at(lo, owner, a + b * j0)
    np.maximum.at(hi, owner, a + b * j1)
    need = np.ceil(q * cnt - 1e-9)
    has = cnt > 0
    lo = np.where(has, lo, 0.0)
    hi = np.where(has, hi, 0.0)
    inv_b = _inv(b)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        c = np.bincount(owner, weights=_count_le(mid[owner], a, inv_b, j0, j1), minlength=n_owner)
        ok = c >= need
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return np.where(has, hi, np.nan)


class _SegmentLog:
    """One decode node's segment log as arrays, with prefix sums for O(1) per-request TBT statistics.

    Segment ``s`` ran steps ``n0+1 .. n0+k`` taking ``a + b*j`` seconds (``j = 0..k-1``, ``b >= 0``) with
    ``bsz`` running decodes, ``join`` of which produced their first token (not a TBT sample) in step 0.
    """

    def __init__(self, node: Any, tau: float) -> None:
        self.index = node.index
        self.n0 = np.frombuffer(node.log_n0, dtype=np.int64)
        self.k = np.frombuffer(node.log_k, dtype=np.int64)
        self.a = np.frombuffer(node.log_a, dtype=np.float64)
        self.b = np.frombuffer(node.log_b, dtype=np.float64)
        self.bsz = np.frombuffer(node.log_bsz, dtype=np.int64)
        self.join = np.frombuffer(node.log_join, dtype=np.int64)
        self.tau = tau
        k, a, b = self.k, self.a, self.b
        self.inv_b = _inv(b)
        seg_sum = k * a + b * k * (k - 1) / 2
        seg_over = k - _count_le(tau, a, self.inv_b, np.zeros_like(k), k - 1)
        z = np.zeros(1)
        self.c_k = np.concatenate([z, np.cumsum(k)])
        self.c_sum = np.concatenate([z, np.cumsum(seg_sum)])
        self.c_over = np.concatenate([z, np.cumsum(seg_over)])
        self.samples = int(np.sum(self.bsz * k - self.join)) if len(k) else 0
        # sparse table of segment maxima for range-max queries
        seg_max = a + b * (k - 1)
        self.table = [seg_max]
        w = 1
        while 2 * w <= len(seg_max):
            prev = self.table[-1]
            self.table.append(np.maximum(prev[:-w], prev[w:]))
            w *= 2

    def _range_max(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Max of segment maxima over [lo, hi] (inclusive; -inf where empty)."""
        out = np.full(len(lo), -np.inf)
        ok = hi >= lo
        if ok.any():
            span = hi[ok] - lo[ok] + 1
            lvl = np.floor(np.log2(span)).astype(np.int64)
            res = np.empty(len(span))
            for level in np.unique(lvl):
                m = lvl == level
                t = self.table[level]
                res[m] = np.maximum(t[lo[ok][m]], t[hi[ok][m] - (1 << level) + 1])
            out[ok] = res
        return out

    def _partial(self, i: np.ndarray, j0: np.ndarray, j1: np.ndarray):
        a, b = self.a[i], self.b[i]
        c = np.maximum(j1 - j0 + 1, 0)
        tot = np.where(c > 0, c * a + b * (j0 + j1) * c / 2, 0.0)
        le = np.where(c > 0, _count_le(self.tau, a, self.inv_b[i], j0, j1), 0)
        mx = np.where(c > 0, a + b * j1, -np.inf)
        return c, tot, c - le, mx

    def request_stats(self, lo: np.ndarray, hi: np.ndarray):
        """Samples, their sum, how many exceed the SLO, and their max, for sample steps ``lo..hi``."""
        n0, k = self.n0, self.k
        i0 = np.searchsorted(n0, lo - 1, side="right") - 1
        i1 = np.searchsorted(n0, hi - 1, side="right") - 1
        same = i0 == i1
        # head: segment i0 from lo; tail: segment i1 up to hi (only when different); middle: full segments
        c0, t0, o0, m0 = self._partial(i0, lo - n0[i0] - 1, np.where(same, hi - n0[i0] - 1, k[i0] - 1))
        c1, t1, o1, m1 = self._partial(i1, np.zeros_like(i1), hi - n0[i1] - 1)
        c1, t1, o1 = (np.where(same, 0, x) for x in (c1, t1, o1))
        m1 = np.where(same, -np.inf, m1)
        mid_lo, mid_hi = i0 + 1, i1 - 1
        has_mid = mid_hi >= mid_lo
        lo_i, hi_i = np.where(has_mid, mid_lo, 0), np.where(has_mid, mid_hi + 1, 0)
        cm = self.c_k[hi_i] - self.c_k[lo_i]
        tm = self.c_sum[hi_i] - self.c_sum[lo_i]
        om = self.c_over[hi_i] - self.c_over[lo_i]
        mm = self._range_max(mid_lo, mid_hi)
        return c0 + c1 + cm, t0 + t1 + tm, o0 + o1 + om, np.maximum(np.maximum(m0, m1), mm)


def _weighted_quantiles(logs: list[_SegmentLog], total: int) -> dict[str, float]:
    """Nearest-rank percentiles of every TBT sample in the run, from the segment logs: each step of a
    segment is a sample of each of its ``bsz`` decodes, but step 0 not of the ``join`` that started there."""
    if total == 0:
        return {f"p{p}": math.nan for p in PERCENTILES}
    a = np.concatenate([g.a for g in logs])
    b = np.concatenate([g.b for g in logs])
    k = np.concatenate([g.k for g in logs])
    w = np.concatenate([g.bsz for g in logs]).astype(float)
    join = np.concatenate([g.join for g in logs]).astype(float)
    keep = w > 0
    a, b, k, w, join = a[keep], b[keep], k[keep], w[keep], join[keep]
    weight = w * k - join
    low, high = a, a + b * (k - 1)
    o_low, o_high = np.argsort(low, kind="stable"), np.argsort(high, kind="stable")
    c_low, c_high = np.cumsum(weight[o_low]), np.cumsum(weight[o_high])
    out = []
    for p in PERCENTILES:
        need = math.ceil(p / 100 * total - 1e-9)
        # all of a segment's samples at its lowest (highest) value give a lower (upper) bound
        lo = float(low[o_low][min(np.searchsorted(c_low, need), len(low) - 1)])
        hi = float(high[o_high][min(np.searchsorted(c_high, need), len(high) - 1)])
        below = weight[high <= lo].sum()
        m = (high > lo) & (low <= hi)
        am, bm, km, wm, jm = a[m], b[m], k[m], w[m], join[m]
        inv_b, j0 = _inv(bm), np.zeros_like(km)
        for _ in range(60):
            if hi - lo <= 1e-12 * max(hi, 1e-9):
                break
            mid = 0.5 * (lo + hi)
            if below + (wm * _count_le(mid, am, inv_b, j0, km - 1) - jm * (am <= mid)).sum() >= need:
                hi = mid
            else:
                lo = mid
        out.append(hi)
    hi = np.array(out)[:, None]
    return {f"p{p}": float(h) for p, h in zip(PERCENTILES, hi[:, 0])}


@dataclass
class RunSummary:
    """The run summary, typed. :meth:`to_json` gives the JSON object ``--json`` prints and ``summary.json``
    holds (field names are its keys). Times in seconds, rates per second."""

    policy: str
    cluster: str
    requests: int
    completed: int
    rejected: int
    unfinished: int
    rejected_reasons: dict[str, int]
    duration_s: float
    offered_rate_rps: float
    ttft_s: dict[str, float]
    tbt_s: dict[str, float]
    tbt_samples: int
    e2e_s: dict[str, float]
    slo: dict[str, float]
    slo_attainment: float
    ttft_slo_attainment: float
    tbt_slo_attainment: float
    goodput_rps: float
    throughput_rps: float
    deflection_rate: float
    ttft_breakdown_p95: dict[str, float]
    ttft_breakdown_mean: dict[str, float]
    p95_set_mean_ttft_s: float
    prefill_share_of_p95_ttft: float
    utilization: dict[str, list[float]]
    estimate_error: dict[str, float] | None
    decision_us_mean: float
    wall_s: float
    events: int
    sim_requests_per_wall_s: float
    #: hand-off (prefill end -> first token) percentiles over prefill-path requests: p50, p95, p99, mean.
    handoff_s: dict[str, float] = field(default_factory=dict)
    #: mean of each hand-off stage over prefill-path requests; the stages sum to ``handoff_s['mean']``.
    handoff_stages_mean: dict[str, float] = field(default_factory=dict)
    handoff_preset: str = ""
    preemptions: int = 0
    #: allocated / total KV blocks (vLLM's ``kv_cache_usage_perc``): time-mean and peak, per pool and node.
    kv_usage: dict[str, Any] = field(default_factory=dict)
    #: prefix caching on (the config asks for it and the trace has block hashes)
    prefix_cache: bool = False
    #: cached share of the prompt tokens each pool looked up: ``prefill`` over the prompts prefilled there,
    #: ``decode`` over the requests admitted there (a deflected prompt's hit saves compute, a prefill-path
    #: request's hit saves KV transfer); 0.0 with the cache off.
    prefix_hit_rate: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: hand-off stages of a prefill-path request, in order (seconds); see :mod:`envs.handoff`.
HANDOFF_STAGES = ("dispatch", "kv_admission", "read_wait", "setup", "transfer", "nic_wait", "join_wait",
                  "first_step")


class _Columns:
    """Per-request columns as arrays, read once from the request objects."""

    def __init__(self, reqs: list) -> None:
        self.n = n = len(reqs)
        for name, dtype in (("arrival_s", float), ("t_first_token", float), ("t_finish", float),
                            ("deflected", bool), ("t_p_start", float), ("t_p_end", float),
                            ("t_dispatch", float), ("t_admit", float), ("t_read", float), ("t_xfer_end", float),
                            ("t_join", float), ("xfer_ideal_s", float), ("t_d_start", float),
                            ("output_tokens", np.int64), ("first_step", np.int64), ("last_step", np.int64),
                            ("d_node", np.int64)):
            setattr(self, name, np.fromiter(map(attrgetter(name), reqs), dtype=dtype, count=n))
        self.rejected = np.array([r.reject_reason is not None for r in reqs], bool)
        self.done = (self.t_finish >= 0) & ~self.rejected
        self.pp = self.done & ~self.deflected
        self.dp = self.done & self.deflected


def _components(c: _Columns) -> dict[str, np.ndarray]:
    """Each completed request's TTFT split along its path; the parts add up to its TTFT."""
    z = np.zeros(c.n)
    pp, dp = c.pp, c.dp
    return {
        "p_queue": np.where(pp, c.t_p_start - c.arrival_s, z),
        "prefill_exec": np.where(pp, c.t_p_end - c.t_p_start, z),
        "handoff_wait": np.where(pp, (c.t_admit - c.t_p_end) + (c.t_xfer_end - c.t_admit - c.xfer_ideal_s), z),
        "transfer": np.where(pp, c.xfer_ideal_s, z),
        "decode_wait": np.where(pp, c.t_join - c.t_xfer_end, z),
        "first_step": np.where(pp, c.t_first_token - c.t_join, z),
        "d_queue": np.where(dp, c.t_d_start - c.arrival_s, z),
        "chunked_prefill": np.where(dp, c.t_first_token - c.t_d_start, z),
    }


def _handoff(c: _Columns, setup_s: float) -> tuple[dict[str, float], dict[str, float]]:
    """Hand-off percentiles and the mean of each stage over prefill-path requests."""
    pp = c.pp
    h = (c.t_first_token - c.t_p_end)[pp]
    pct = percentiles(h)
    ho = {"p50": pct["p50"], "p95": pct["p95"], "p99": pct["p99"], "mean": pct["mean"]}
    if not pp.any():
        return ho, {s: math.nan for s in HANDOFF_STAGES}
    stages = {
        "dispatch": c.t_dispatch - c.t_p_end,
        "kv_admission": c.t_admit - c.t_dispatch,
        "read_wait": c.t_read - c.t_admit,
        "setup": np.full(c.n, setup_s),
        "transfer": c.xfer_ideal_s - setup_s,
        "nic_wait": c.t_xfer_end - c.t_read - c.xfer_ideal_s,
        "join_wait": c.t_join - c.t_xfer_end,
        "first_step": c.t_first_token - c.t_join,
    }
    return ho, {k: float(v[pp].mean()) for k, v in stages.items()}


class _Stalls:
    """Preemption gaps as one-step segments, so the run's TBT percentiles count them as samples."""

    def __init__(self, gaps: list[float]) -> None:
        self.a = np.asarray(gaps, dtype=float)
        self.b = np.zeros(len(gaps))
        self.k = np.ones(len(gaps), np.int64)
        self.bsz = np.ones(len(gaps), np.int64)
        self.join = np.zeros(len(gaps), np.int64)
        self.samples = len(gaps)


def _tbt(sim: ClusterSim, c: _Columns, tau: float):
    """Per-request TBT count, sum, samples over ``tau`` and max, and the run's token-weighted percentiles.

    A preempted request's samples are the steps of each of its runs plus one gap per preemption."""
    n = c.n
    ok = c.done & (c.output_tokens > 1)
    cnt, tot, over = np.zeros(n), np.zeros(n), np.zeros(n)
    tbt_max = np.full(n, math.nan)
    logs = [_SegmentLog(node, tau) for node in sim.decode]
    by_node = {log.index: log for log in logs}
    for log in logs:
        sel = np.flatnonzero(ok & (c.d_node == log.index))
        if len(sel):
            cnt[sel], tot[sel], over[sel], tbt_max[sel] = log.request_stats(c.first_step[sel] + 1, c.last_step[sel])
    gaps: list[float] = []
    for i, r in enumerate(sim.requests):
        if r.tbt_runs and ok[i]:
            log = by_node[r.d_node]
            lo = np.array([f + 1 for f, _ in r.tbt_runs])
            hi = np.array([last for _, last in r.tbt_runs])
            pc, pt, po, pm = log.request_stats(lo, hi)
            st = np.asarray(r.stalls)
            cnt[i] += pc.sum() + len(st)
            tot[i] += pt.sum() + st.sum()
            over[i] += po.sum() + (st > tau).sum()
            tbt_max[i] = np.nanmax([tbt_max[i], pm.max(), st.max()])
            gaps.extend(r.stalls)
    all_logs = logs + ([_Stalls(gaps)] if gaps else [])
    total = int(sum(log.samples for log in all_logs))
    tbt_all = _weighted_quantiles(all_logs, total)
    tbt_all["mean"] = float(tot.sum() / total) if total else math.nan
    return cnt, tot, over, tbt_max, tbt_all, total


def _breakdown(ttft: np.ndarray, done: np.ndarray, comp: dict[str, np.ndarray]):
    """Mean of each TTFT part over the requests at or above the P95 TTFT, that set's mean TTFT, the prefill
    share, and each part's mean over all completed requests."""
    nan = math.nan
    ttft_done = ttft[done]
    p95 = float(np.percentile(ttft_done, 95)) if len(ttft_done) else nan
    tail = done & (ttft >= p95) if len(ttft_done) else done
    breakdown = {k: float(comp[k][tail].mean()) if tail.any() else nan for k in COMPONENTS}
    tail_mean = float(ttft[tail].mean()) if tail.any() else nan
    share = breakdown["prefill_exec"] / tail_mean if tail.any() and tail_mean > 0 else nan
    means = {k: float(comp[k][done].mean()) if done.any() else nan for k in COMPONENTS}
    return breakdown, tail_mean, share, means


def _reject_reasons(reqs: list) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for r in reqs:
        if r.reject_reason is not None:
            key = r.reject_reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    return reasons


def _estimate_error(reqs: list) -> dict[str, float] | None:
    est = [(r.estimates.get("ttft_s"), r.t_first_token - r.arrival_s) for r in reqs
           if r.estimates and "ttft_s" in r.estimates and r.t_first_token >= 0]
    if not est:
        return None
    e = np.array([(x - y) / y for x, y in est if y > 0])
    return {"n": int(len(e)), "median_rel": float(np.median(e)), "median_abs_rel": float(np.median(np.abs(e))),
            "p95_abs_rel": float(np.percentile(np.abs(e), 95))}


def _kv_usage(sim: ClusterSim, t_end: float) -> dict[str, Any]:
    """Allocated over total KV blocks, as vLLM's ``kv_cache_usage_perc``: time-mean and peak per node and pool."""
    dec = [{"mean": d.usage_mean(t_end), "peak": d.peak_blocks / d.total_blocks if d.total_blocks else 0.0}
           for d in sim.decode]
    pre = [{"mean": p.usage_mean(t_end), "peak": p.peak_tokens / p.kv_capacity_tokens} for p in sim.prefill]

    def pool(nodes: list[dict[str, float]]) -> dict[str, Any]:
        if not nodes:
            return {"mean": math.nan, "peak": math.nan, "nodes": []}
        return {"mean": float(np.mean([x["mean"] for x in nodes])), "peak": max(x["peak"] for x in nodes),
                "nodes": nodes}

    return {"prefill": pool(pre), "decode": pool(dec)}


def _prefix_hit_rate(reqs: list) -> dict[str, float]:
    """Cached share of prompt tokens per pool, over the requests that looked the pool up."""
    p_in = p_hit = d_in = d_hit = 0
    for r in reqs:
        if r.t_p_start >= 0.0:
            p_in += r.input_tokens
            p_hit += r.p_cached
        if r.t_admit >= 0.0:
            d_in += r.input_tokens
            d_hit += r.d_cached
    return {"prefill": p_hit / p_in if p_in else 0.0, "decode": d_hit / d_in if d_in else 0.0}


def _records(c: _Columns, reqs: list, comp, ttft, e2e, tbt_mean, tbt_max, slo_ok) -> dict[str, np.ndarray]:
    done, nan = c.done, math.nan
    return {
        "rid": np.fromiter((r.rid for r in reqs), np.int64, count=c.n),
        "arrival_s": c.arrival_s,
        "input_tokens": np.fromiter((r.input_tokens for r in reqs), np.int64, count=c.n),
        "output_tokens": c.output_tokens,
        "path": np.where(c.rejected, "rejected", np.where(c.deflected, "deflect", "prefill")),
        "prefill_node": np.fromiter((r.p_node for r in reqs), np.int64, count=c.n),
        "decode_node": c.d_node,
        "chunk_cap": np.fromiter((r.chunk_cap for r in reqs), np.int64, count=c.n),
        "ttft_s": ttft,
        "e2e_s": e2e,
        "tbt_mean_s": tbt_mean,
        "tbt_max_s": tbt_max,
        "slo_met": slo_ok,
        "handoff_s": np.where(c.pp, c.t_first_token - c.t_p_end, nan),
        "preemptions": np.fromiter((r.preemptions for r in reqs), np.int64, count=c.n),
        **{f"{k}_s": np.where(done, comp[k], nan) for k in COMPONENTS},
    }


def collect(sim: ClusterSim, policy_name: str = "", wall_s: float = 0.0) -> RunResult:
    """Turn a finished simulation into per-request records and a run summary."""
    reqs, cfg = sim.requests, sim.config
    c = _Columns(reqs)
    n, done, nan = c.n, c.done, math.nan
    comp = _components(c)
    ttft = np.where(done, c.t_first_token - c.arrival_s, nan)
    e2e = np.where(done, c.t_finish - c.arrival_s, nan)
    cnt, tot, over, tbt_max, tbt_all, gaps_total = _tbt(sim, c, cfg.tbt_slo_s)
    tbt_mean = np.where(cnt > 0, tot / np.maximum(cnt, 1), nan)

    ttft_ok = done & (ttft <= cfg.ttft_slo_s)
    # P95 TBT <= SLO  <=>  at least ceil(0.95 n) samples <= SLO: an exact count, no quantile needed
    tbt_ok = done & ((cnt == 0) | (cnt - over >= np.ceil(0.95 * cnt - 1e-9)))
    slo_ok = ttft_ok & tbt_ok
    t0 = float(c.arrival_s.min()) if n else 0.0
    t_end = float(max(c.t_finish.max() if n else 0.0, sim.now))
    makespan = max(t_end - t0, 1e-9)
    breakdown, tail_mean, share, means = _breakdown(ttft, done, comp)
    handoff, stages = _handoff(c, sim.xfer_setup_s)
    summary = RunSummary(
        policy=policy_name, cluster=cfg.shape, requests=n, completed=int(done.sum()),
        rejected=int(c.rejected.sum()), unfinished=int((~done & ~c.rejected).sum()),
        rejected_reasons=_reject_reasons(reqs), duration_s=makespan,
        offered_rate_rps=n / max(float(c.arrival_s.max() - t0), 1e-9) if n > 1 else 0.0,
        ttft_s=percentiles(ttft[done]), tbt_s=tbt_all, tbt_samples=gaps_total, e2e_s=percentiles(e2e[done]),
        slo={"ttft_slo_s": cfg.ttft_slo_s, "tbt_slo_s": cfg.tbt_slo_s},
        slo_attainment=float(slo_ok.sum() / n) if n else nan,
        ttft_slo_attainment=float(ttft_ok.sum() / n) if n else nan,
        tbt_slo_attainment=float(tbt_ok.sum() / n) if n else nan,
        goodput_rps=float(slo_ok.sum() / makespan), throughput_rps=float(done.sum() / makespan),
        deflection_rate=float(c.deflected.sum() / n) if n else nan,
        ttft_breakdown_p95=breakdown, ttft_breakdown_mean=means, p95_set_mean_ttft_s=tail_mean,
        prefill_share_of_p95_ttft=share,
        utilization={"prefill": [p.busy_s / makespan for p in sim.prefill],
                     "decode": [d.busy_s / makespan for d in sim.decode]},
        estimate_error=_estimate_error(reqs), decision_us_mean=sim.decision_s / n * 1e6 if n else nan,
        wall_s=wall_s, events=sim.events, sim_requests_per_wall_s=n / wall_s if wall_s > 0 else nan,
        handoff_s=handoff, handoff_stages_mean=stages, handoff_preset=cfg.handoff,
        preemptions=int(sum(d.preemptions for d in sim.decode)), kv_usage=_kv_usage(sim, t_end),
        prefix_cache=sim.prefix_cache, prefix_hit_rate=_prefix_hit_rate(reqs),
    )
    records = _records(c, reqs, comp, ttft, e2e, tbt_mean, tbt_max, slo_ok)
    config = {"cluster": cfg.to_dict(), "workload": dict(getattr(sim.workload, "meta", {}) or {}),
              "policy": policy_name}
    ok = done & (c.output_tokens > 1)
    lazy_p95 = (sim, c.d_node, np.where(ok, c.first_step, 0), np.where(ok, c.last_step, 0))
    return RunResult(records=records, summary=summary.to_json(), config=config, _tbt_inputs=lazy_p95,
                     typed=summary)
