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
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from deflectlab.envs.simulator import ClusterSim

#: TTFT components, in order along each path (seconds).
PREFILL_PATH = ("p_queue", "prefill_exec", "handoff_wait", "transfer", "decode_wait", "first_step")
DEFLECT_PATH = ("d_queue", "chunked_prefill")
COMPONENTS = PREFILL_PATH + DEFLECT_PATH
COMPONENT_LABELS = {
    "p_queue": "prefill queue wait",
    "prefill_exec": "prefill execution",
    "handoff_wait": "hand-off wait (decode admission + NIC queue)",
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


def collect(sim: ClusterSim, policy_name: str = "", wall_s: float = 0.0) -> RunResult:
    """Turn a finished simulation into per-request records and a run summary."""
    reqs = sim.requests
    cfg = sim.config
    n = len(reqs)
    g = np.array

    def attr(name: str, dtype: Any) -> np.ndarray:
        return np.fromiter(map(attrgetter(name), reqs), dtype=dtype, count=n)

    arrival = attr("arrival_s", float)
    t_first = attr("t_first_token", float)
    t_finish = attr("t_finish", float)
    deflected = attr("deflected", bool)
    rejected = g([r.reject_reason is not None for r in reqs], bool)
    done = t_finish >= 0
    unfinished = ~done & ~rejected
    nan = math.nan


    comp: dict[str, np.ndarray] = {}
    t_p_start = attr("t_p_start", float)
    t_p_end = attr("t_p_end", float)
    t_admit = attr("t_admit", float)
    t_xfer_end = attr("t_xfer_end", float)
    t_join = attr("t_join", float)
    ideal = attr("xfer_ideal_s", float)
    t_d_start = attr("t_d_start", float)
    pp = done & ~deflected
    dp = done & deflected
    z = np.zeros(n)
    comp["p_queue"] = np.where(pp, t_p_start - arrival, z)
    comp["prefill_exec"] = np.where(pp, t_p_end - t_p_start, z)
    comp["handoff_wait"] = np.where(pp, (t_admit - t_p_end) + (t_xfer_end - t_admit - ideal), z)
    comp["transfer"] = np.where(pp, ideal, z)
    comp["decode_wait"] = np.where(pp, t_join - t_xfer_end, z)
    comp["first_step"] = np.where(pp, t_first - t_join, z)
    comp["d_queue"] = np.where(dp, t_d_start - arrival, z)
    comp["chunked_prefill"] = np.where(dp, t_first - t_d_start, z)

    ttft = np.where(done, t_first - arrival, nan)
    e2e = np.where(done, t_finish - arrival, nan)
    out_tok = attr("output_tokens", np.int64)
    first_step = attr("first_step", np.int64)
    last_step = attr("last_step", np.int64)
    d_node = attr("d_node", np.int64)

    # TBT per request, exactly, from the decode nodes' segment logs (prefix sums over segments).
    ok = done & (out_tok > 1)
    tau = cfg.tbt_slo_s
    cnt = np.zeros(n)
    tot = np.zeros(n)
    over = np.zeros(n)
    tbt_max = np.full(n, nan)
    logs = [_SegmentLog(node, tau) for node in sim.decode]
    for log in logs:
        sel = np.flatnonzero(ok & (d_node == log.index))
        if len(sel):
            cnt[sel], tot[sel], over[sel], tbt_max[sel] = log.request_stats(first_step[sel] + 1, last_step[sel])
    tbt_mean = np.where(cnt > 0, tot / np.maximum(cnt, 1), nan)
    gaps_total = int(sum(log.samples for log in logs))
    tbt_all = _weighted_quantiles(logs, gaps_total)
    tbt_all["mean"] = float(tot.sum() / gaps_total) if gaps_total else nan

    ttft_ok = done & (ttft <= cfg.ttft_slo_s)
    # P95 TBT <= SLO  <=>  at least ceil(0.95 n) samples <= SLO: an exact count, no quantile needed
    tbt_ok = done & ((cnt == 0) | (cnt - over >= np.ceil(0.95 * cnt - 1e-9)))
    slo_ok = ttft_ok & tbt_ok
    t0 = float(arrival.min()) if n else 0.0
    t_end = float(max(t_finish.max() if n else 0.0, sim.now))
    makespan = max(t_end - t0, 1e-9)

    ttft_done = ttft[done]
    p95 = float(np.percentile(ttft_done, 95)) if len(ttft_done) else nan
    tail = done & (ttft >= p95) if len(ttft_done) else done
    breakdown = {c: float(comp[c][tail].mean()) if tail.any() else nan for c in COMPONENTS}
    tail_mean = float(ttft[tail].mean()) if tail.any() else nan
    share = breakdown["prefill_exec"] / tail_mean if tail.any() and tail_mean > 0 else nan
    ttft_mean_parts = {c: float(comp[c][done].mean()) if done.any() else nan for c in COMPONENTS}

    reasons: dict[str, int] = {}
    for r in reqs:
        if r.reject_reason is not None:
            key = r.reject_reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1

    est = [(r.estimates.get("ttft_s"), r.t_first_token - r.arrival_s) for r in reqs
           if r.estimates and "ttft_s" in r.estimates and r.t_first_token >= 0]
    estimate_error = None
    if est:
        e = np.array([(x - y) / y for x, y in est if y > 0])
        estimate_error = {"n": int(len(e)), "median_rel": float(np.median(e)),
                          "median_abs_rel": float(np.median(np.abs(e))),
                          "p95_abs_rel": float(np.percentile(np.abs(e), 95))}

    summary: dict[str, Any] = {
        "policy": policy_name,
        "cluster": cfg.shape,
        "requests": n,
        "completed": int(done.sum()),
        "rejected": int(rejected.sum()),
        "unfinished": int(unfinished.sum()),
        "rejected_reasons": reasons,
        "duration_s": makespan,
        "offered_rate_rps": n / max(float(arrival.max() - t0), 1e-9) if n > 1 else 0.0,
        "ttft_s": percentiles(ttft_done),
        "tbt_s": tbt_all,
        "tbt_samples": gaps_total,
        "e2e_s": percentiles(e2e[done]),
        "slo": {"ttft_slo_s": cfg.ttft_slo_s, "tbt_slo_s": cfg.tbt_slo_s},
        "slo_attainment": float(slo_ok.sum() / n) if n else nan,
        "ttft_slo_attainment": float(ttft_ok.sum() / n) if n else nan,
        "tbt_slo_attainment": float(tbt_ok.sum() / n) if n else nan,
        "goodput_rps": float(slo_ok.sum() / makespan),
        "throughput_rps": float(done.sum() / makespan),
        "deflection_rate": float(deflected.sum() / n) if n else nan,
        "ttft_breakdown_p95": breakdown,
        "ttft_breakdown_mean": ttft_mean_parts,
        "p95_set_mean_ttft_s": tail_mean,
        "prefill_share_of_p95_ttft": share,
        "utilization": {
            "prefill": [p.busy_s / makespan for p in sim.prefill],
            "decode": [d.busy_s / makespan for d in sim.decode],
        },
        "estimate_error": estimate_error,
        "decision_us_mean": sim.decision_s / n * 1e6 if n else nan,
        "wall_s": wall_s,
        "events": sim.events,
        "sim_requests_per_wall_s": n / wall_s if wall_s > 0 else nan,
    }
    records = {
        "rid": attr("rid", np.int64),
        "arrival_s": arrival,
        "input_tokens": attr("input_tokens", np.int64),
        "output_tokens": out_tok,
        "path": np.where(rejected, "rejected", np.where(deflected, "deflect", "prefill")),
        "prefill_node": attr("p_node", np.int64),
        "decode_node": d_node,
        "chunk_cap": attr("chunk_cap", np.int64),
        "ttft_s": ttft,
        "e2e_s": e2e,
        "tbt_mean_s": tbt_mean,
        "tbt_max_s": tbt_max,
        "slo_met": slo_ok,
        **{f"{c}_s": np.where(done, comp[c], nan) for c in COMPONENTS},
    }
    config = {"cluster": cfg.to_dict(), "workload": dict(getattr(sim.workload, "meta", {}) or {}),
              "policy": policy_name}
    lazy_p95 = (sim, d_node, np.where(ok, first_step, 0), np.where(ok, last_step, 0))
    return RunResult(records=records, summary=summary, config=config, _tbt_inputs=lazy_p95)
