"""Compare routing policies on identical request streams, across loads and workload seeds.

For every (rate, seed) the workload is built once, in the parent process, and every policy replays that same
object, so all policies see the same requests with the same arrival times (``run_comparison`` checks it: each
run records a digest of the stream it simulated). Runs go to a ``ProcessPoolExecutor`` (one worker per core
by default) with a tqdm bar on stderr.

How a seed picks a workload
---------------------------
* ``arrival="trace"`` (recorded arrival times): the seed picks the *window*. Its start is drawn uniformly
  from ``[span_lo, span_hi - window_s]`` of the trace's time line by ``numpy.random.default_rng(seed)``;
  the window's requests are then rescaled in time to the target rate (which keeps the trace's burstiness,
  see :func:`envs.workloads.make_workload`). A fixed ``window_start_s`` overrides the draw (then every seed
  gives the same requests).
* synthetic arrivals (``poisson``, ``gamma``, ``onoff``): the seed is the arrival process's seed; the
  window (from ``window_start_s`` or ``span_lo``, ``window_s`` long) is where the request lengths are
  sampled from.

Windows should be long enough to hold the trace's bursts: the bundled ``azure_code`` trace has busy minutes
separated by idle gaps of up to 174 s, so the default window is 600 s of trace time (about 1,900 requests
at its own rate). The bundled trace is 30 minutes long, so windows of different seeds can overlap in trace
time; give training and evaluation disjoint ``span`` ranges when that matters (:mod:`policies.tuning`).

The Python entry point is :func:`run_comparison`; :meth:`ComparisonResult.write_report` writes
``results.csv``, ``results.json``, the plots and ``report.md``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.metrics import COMPONENTS
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.splits import pick, start_ranges
from deflectlab.envs.workloads import Workload, load_trace, make_workload
from deflectlab.experiments.compare_plots import write_plots
from deflectlab.experiments.labels import policy_label
from deflectlab.experiments.markdown import table as md_table
from deflectlab.policies.registry import make_policy

#: Policies compared when none are named: never deflect, always deflect, each threshold heuristic, the paper's.
DEFAULT_POLICIES: tuple[str, ...] = (
    "round_robin", "least_loaded", "always_deflect", "length_threshold", "queue_threshold", "dynamo_isl",
    "dynamo_load", "dynamo_isl_or_load", "prefix_affinity", "proactive",
)
#: Loads in requests/s. ``azure_code`` runs at 3.21 req/s on its own time line. In 2P2D (A100, DeepSeek-V2-Lite)
#: its bursts saturate the prefill nodes from about 2 req/s on: never-deflect P95 TTFT goes from 0.6 s at 1 req/s
#: to 2.8 s at 2 and 5.7 s at 3.21 (prefill execution 12 % of it) while mean prefill utilisation is only 10-15 %.
DEFAULT_RATES: tuple[float, ...] = (3.21, 5.0, 8.0)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)
#: A run is *saturated* when its TTFT grows with arrival time by more than this many seconds per second (the
#: least-squares slope over the window's requests): the backlog then grows by at least a tenth of the elapsed
#: time, so latencies measure the queue's length, not the routing. Long prompts alone raise TTFT but not its
#: slope. A load where every policy is saturated saturates the cluster, and the report says so.
SATURATION_TTFT_SLOPE = 0.1


def ttft_growth(arrival_s: np.ndarray, ttft_s: np.ndarray) -> float:
    """Least-squares slope of TTFT against arrival time over the completed requests, seconds per second."""
    ok = np.isfinite(ttft_s)
    if ok.sum() < 2 or np.ptp(arrival_s[ok]) <= 0:
        return math.nan
    return float(np.polyfit(arrival_s[ok], ttft_s[ok], 1)[0])


@dataclass(frozen=True)
class ComparisonConfig:
    """What to compare, on which workloads.

    :param trace: bundled trace name (``azure_code``, ``azure_conv``) or a trace file path.
    :param rates: target mean arrival rates, requests/s; ``None`` in the tuple replays the recorded times.
    :param seeds: workload seeds; each picks a window (recorded arrivals) or an arrival stream (synthetic).
    :param window_s: window length in trace time, seconds (``None``: the whole span).
    :param window_start_s: fixed window start, seconds (``None``: drawn from the seed for recorded arrivals,
        the span's start for synthetic ones).
    :param num_requests: keep at most this many requests of each window (synthetic: exactly this many).
    :param span: ``(lo, hi)`` trace seconds the windows are drawn from (``None``: the whole trace).
    :param arrival: ``trace``, ``poisson``, ``gamma`` or ``onoff`` (see :func:`envs.workloads.make_workload`).
    :param cv: coefficient of variation of gamma inter-arrival gaps.
    :param cluster: cluster shape, profiles, budgets and SLOs.
    :param policies: registry specs, e.g. ``"proactive:margin=0.1"``.
    :param tuned: tuned parameters per policy name (from :mod:`policies.tuning`), applied to specs given by bare
        name; explicit parameters in a spec win.
    :param baseline: the policy spec the others are compared against (never deflect); added to ``policies``
        when missing.
    :param workers: worker processes (``None``: one per core; 1 runs in this process).
    :param cdf_rate: the load whose TTFT CDFs and breakdown bars are plotted (``None``: the highest).
    :param command: the command line that produced this comparison, quoted in the report.
    """

    trace: str = "azure_code"
    rates: tuple[float | None, ...] = DEFAULT_RATES
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    window_s: float | None = 600.0
    window_start_s: float | None = None
    num_requests: int | None = None
    span: tuple[float, float] | None = None
    arrival: str = "trace"
    cv: float = 1.0
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    policies: tuple[str, ...] = DEFAULT_POLICIES
    tuned: dict[str, dict[str, Any]] | None = None
    baseline: str = "round_robin"
    workers: int | None = None
    cdf_rate: float | None = None
    command: str | None = None

    def __post_init__(self) -> None:
        if not self.rates:
            raise ValueError("compare: at least one rate is needed")
        if not self.seeds:
            raise ValueError("compare: at least one seed is needed")
        if not self.policies:
            raise ValueError("compare: at least one policy is needed")
        for r in self.rates:
            if r is not None and not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
                raise ValueError(f"compare: rates must be > 0 requests/s, got {r!r}")
        for s in self.seeds:
            if not isinstance(s, int) or isinstance(s, bool) or s < 0:
                raise ValueError(f"compare: seeds must be integers >= 0, got {s!r}")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError(f"compare: a policy is named twice in {list(self.policies)}")
        if self.baseline not in self.policies:  # every comparison is against never-deflect: run it too
            object.__setattr__(self, "policies", (self.baseline, *self.policies))
        if self.window_s is not None and not self.window_s > 0:
            raise ValueError(f"compare: window_s must be > 0 seconds, got {self.window_s!r}")
        if self.span is not None:
            blocks = spans(self.span)
            if not all(0 <= lo < hi for lo, hi in blocks):
                raise ValueError(f"compare: span must be (lo, hi) seconds with 0 <= lo < hi, or a list of them, "
                                 f"got {self.span!r}")
            if len(blocks) > 1 and (self.window_s is None or self.arrival != "trace"
                                    or min(hi - lo for lo, hi in blocks) < self.window_s):
                raise ValueError(f"compare: several spans ({self.span!r}) need recorded arrivals and a window_s no "
                                 "longer than the shortest span; each window lies in one of them")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"compare: workers must be >= 1, got {self.workers!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cluster"] = self.cluster.to_dict()
        return d


def spans(span: Any) -> list[tuple[float, float]]:
    """A comparison's ``span``: one ``(lo, hi)`` or a list of them (``envs.splits.start_ranges``'s forms), as a
    list of float pairs; every ``hi`` must be given."""
    out = start_ranges(span, "compare: span")
    if any(hi is None for _, hi in out):
        raise ValueError(f"compare: span must be (lo, hi) seconds or a list of them, got {span!r}")
    return out  # type: ignore[return-value]


def window_for(cfg: ComparisonConfig, seed: int, trace_end_s: float) -> tuple[float, float | None]:
    """``(start_s, duration_s)`` of the trace window that ``seed`` stands for (see the module docstring)."""
    blocks = spans(cfg.span) if cfg.span is not None else [(0.0, trace_end_s)]
    if len(blocks) > 1:  # a start uniform over the windows that fit in one of the spans (envs.splits)
        ranges = [(lo, min(hi, trace_end_s) - cfg.window_s) for lo, hi in blocks if min(hi, trace_end_s) - lo
                  >= cfg.window_s]
        if not ranges:
            raise ValueError(f"compare: no span of {cfg.span} holds a {cfg.window_s:g}-s window of the trace "
                             f"(it ends at {trace_end_s:g} s)")
        return float(pick(float(np.random.default_rng(seed).random()), ranges)), cfg.window_s
    lo, hi = blocks[0]
    hi = min(hi, trace_end_s + 1e-9)
    if lo >= hi:
        raise ValueError(f"compare: span {cfg.span} starts after the trace ends ({trace_end_s:g} s)")
    if cfg.window_start_s is not None:
        start = cfg.window_start_s
    elif cfg.arrival != "trace" or cfg.window_s is None or cfg.window_s >= hi - lo:
        start = lo
    else:
        u = float(np.random.default_rng(seed).random())
        start = lo + u * (hi - lo - cfg.window_s)
    if cfg.window_s is not None:
        duration: float | None = min(cfg.window_s, hi - start)
    else:
        duration = hi - start if cfg.span is not None else None
    return float(start), duration


def build_workload(cfg: ComparisonConfig, rate: float | None, seed: int) -> Workload:
    """The workload of one (rate, seed): a pure function of the config, ``rate`` and ``seed``."""
    trace = load_trace(cfg.trace)
    start, duration = window_for(cfg, seed, float(trace.arrival_s[-1]))
    return make_workload(trace, start_s=start, duration_s=duration, num_requests=cfg.num_requests, rate=rate,
                         arrival=cfg.arrival, cv=cfg.cv, seed=seed)


def resolve_spec(spec: str, tuned: dict[str, dict[str, Any]] | None) -> str:
    """``spec`` with tuned parameters filled in when it is a bare policy name that has tuned values."""
    name, _, rest = spec.partition(":")
    if rest.strip() or not tuned or name.strip() not in tuned:
        return spec
    params = tuned[name.strip()]
    return name.strip() + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")


def stream_digest(arrival_s: np.ndarray, input_tokens: np.ndarray, output_tokens: np.ndarray) -> str:
    """SHA-1 of a request stream (arrival seconds, prompt and output tokens), to check runs saw the same one."""
    h = hashlib.sha1()
    for a in (np.asarray(arrival_s, np.float64), np.asarray(input_tokens, np.int64),
              np.asarray(output_tokens, np.int64)):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclass
class RunRecord:
    """One policy's run on one (rate, seed) workload.

    :param policy: the policy spec as the user gave it (the label in tables and plots).
    :param spec: the spec actually run (tuned parameters filled in).
    :param params: the built policy's parameters.
    :param summary: the run's :class:`envs.metrics.RunResult` summary.
    :param ttft_s: per-request TTFT, seconds (NaN for rejected or unfinished requests).
    :param arrival_s: per-request arrival times the simulation saw, seconds.
    :param input_tokens: per-request prompt lengths the simulation saw, tokens.
    :param digest: :func:`stream_digest` of the simulated stream.
    """

    policy: str
    spec: str
    params: dict[str, Any]
    rate: float | None
    seed: int
    summary: dict[str, Any]
    ttft_s: np.ndarray
    arrival_s: np.ndarray
    input_tokens: np.ndarray
    digest: str
    workload: dict[str, Any]

    def row(self) -> dict[str, Any]:
        """The run as one flat row (seconds, shares in [0, 1])."""
        s = self.summary
        t, b = s.get("ttft_s", {}), s.get("tbt_s", {})
        util = s.get("utilization", {})
        est = s.get("estimate_error") or {}
        row: dict[str, Any] = {
            "policy": self.policy, "spec": self.spec, "rate": self.rate, "seed": self.seed,
            "window_start_s": (self.workload.get("window") or {}).get("start_s"),
            "offered_rate_rps": s.get("offered_rate_rps"),
            "ttft_growth": ttft_growth(self.arrival_s, self.ttft_s),
            "requests": s.get("requests"), "completed": s.get("completed"), "rejected": s.get("rejected"),
            "ttft_p50_s": t.get("p50"), "ttft_p90_s": t.get("p90"), "ttft_p95_s": t.get("p95"),
            "ttft_p99_s": t.get("p99"), "ttft_mean_s": t.get("mean"),
            "tbt_p50_s": b.get("p50"), "tbt_p95_s": b.get("p95"), "tbt_p99_s": b.get("p99"),
            "slo_attainment": s.get("slo_attainment"), "ttft_slo_attainment": s.get("ttft_slo_attainment"),
            "tbt_slo_attainment": s.get("tbt_slo_attainment"), "goodput_rps": s.get("goodput_rps"),
            "deflection_rate": s.get("deflection_rate"),
            "prefill_util": _mean(util.get("prefill", [])), "decode_util": _mean(util.get("decode", [])),
            "prefill_share_of_p95_ttft": s.get("prefill_share_of_p95_ttft"),
            "estimate_median_rel": est.get("median_rel"), "estimate_median_abs_rel": est.get("median_abs_rel"),
            "estimate_p95_abs_rel": est.get("p95_abs_rel"),
            "decision_us_mean": s.get("decision_us_mean"), "wall_s": s.get("wall_s"),
        }
        for c in COMPONENTS:
            row[f"p95set_{c}_s"] = (s.get("ttft_breakdown_p95") or {}).get(c)
        return row

    def json_entry(self) -> dict[str, Any]:
        """The run in the ``--json`` shape."""
        s = self.summary
        t = s.get("ttft_s", {})
        return {"policy": self.policy, "rate": self.rate, "seed": self.seed,
                "ttft_s": {k: _num(t.get(k)) for k in ("p50", "p95", "p99")},
                "tbt_s": {"p95": _num(s.get("tbt_s", {}).get("p95"))},
                "slo_attainment": _num(s.get("slo_attainment")),
                "deflection_rate": _num(s.get("deflection_rate"))}


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


def _num(v: Any) -> float | None:
    """JSON-safe number: NaN and infinities become ``None``."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _run_one(cluster: ClusterConfig, workload: Workload, label: str, spec: str, rate: float | None,
             seed: int) -> RunRecord:
    """Replay ``workload`` under ``spec`` (runs in a worker process)."""
    policy = make_policy(spec)
    result = ClusterSim(cluster, workload).run(policy)
    rec = result.records
    out_tok = rec.get("output_tokens")
    digest = stream_digest(rec["arrival_s"], rec["input_tokens"],
                           out_tok if out_tok is not None else np.zeros(0, np.int64))
    return RunRecord(policy=label, spec=spec, params=policy.params(), rate=rate, seed=seed,
                     summary=result.summary, ttft_s=np.asarray(rec["ttft_s"], float),
                     arrival_s=np.asarray(rec["arrival_s"], float), input_tokens=np.asarray(rec["input_tokens"]),
                     digest=digest, workload=dict(workload.meta))


@dataclass
class ComparisonResult:
    """Every run of a comparison, with tables, the ``--json`` document and the report writer."""

    config: ComparisonConfig
    runs: list[RunRecord]
    wall_s: float = 0.0

    # -- tables ------------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        """One flat row per (policy, rate, seed), in config order."""
        return [r.row() for r in self._ordered()]

    def _ordered(self) -> list[RunRecord]:
        pol = {p: i for i, p in enumerate(self.config.policies)}
        rate = {r: i for i, r in enumerate(self.config.rates)}
        seed = {s: i for i, s in enumerate(self.config.seeds)}
        return sorted(self.runs, key=lambda r: (rate[r.rate], pol[r.policy], seed[r.seed]))

    def table(self) -> list[dict[str, Any]]:
        """Per (rate, policy): each metric's mean over seeds (and min/max of P95 TTFT and SLO attainment),
        with the change of P95 TTFT (relative) and SLO attainment (points) against the baseline."""
        groups: dict[tuple[Any, str], list[dict[str, Any]]] = {}
        for row in self.rows():
            groups.setdefault((row["rate"], row["policy"]), []).append(row)
        out = []
        for (rate, policy), rows in groups.items():
            agg: dict[str, Any] = {"rate": rate, "policy": policy, "spec": rows[0]["spec"], "seeds": len(rows)}
            for k in rows[0]:
                if k in ("policy", "spec", "rate", "seed", "window_start_s"):
                    continue
                vals = [float(r[k]) for r in rows if r[k] is not None and math.isfinite(float(r[k]))]
                agg[k] = float(np.mean(vals)) if vals else math.nan
            for k in ("ttft_p95_s", "slo_attainment", "tbt_slo_attainment"):
                vals = [r[k] for r in rows if r[k] is not None]
                agg[f"{k}_min"] = float(min(vals)) if vals else math.nan
                agg[f"{k}_max"] = float(max(vals)) if vals else math.nan
            out.append(agg)
        base = {a["rate"]: a for a in out if a["policy"] == self.config.baseline}
        for a in out:
            b = base.get(a["rate"])
            a["ttft_p95_change"] = a["ttft_p95_s"] / b["ttft_p95_s"] - 1.0 if b and b["ttft_p95_s"] else math.nan
            a["slo_attainment_change_pts"] = 100.0 * (a["slo_attainment"] - b["slo_attainment"]) if b else math.nan
            a["tbt_slo_attainment_change_pts"] = (100.0 * (a["tbt_slo_attainment"] - b["tbt_slo_attainment"])
                                                  if b else math.nan)
        return out

    def saturated_rates(self) -> list[Any]:
        """Loads at which every policy is saturated (mean TTFT growth above :data:`SATURATION_TTFT_SLOPE`)."""
        by_rate: dict[Any, list[float]] = {}
        for a in self.table():
            by_rate.setdefault(a["rate"], []).append(a.get("ttft_growth", math.nan))
        return [r for r in self.config.rates
                if by_rate.get(r) and all(x > SATURATION_TTFT_SLOPE for x in by_rate[r])]

    def to_json(self) -> dict[str, Any]:
        """``{"results": [{policy, rate, seed, ttft_s{p50,p95,p99}, tbt_s{p95}, slo_attainment,
        deflection_rate}, ...]}``: what ``deflectlab compare --json`` prints."""
        return {"results": [r.json_entry() for r in self._ordered()]}

    def same_streams(self) -> bool:
        """True when, at every (rate, seed), every policy simulated the same request stream."""
        seen: dict[tuple[Any, int], str] = {}
        for r in self.runs:
            if seen.setdefault((r.rate, r.seed), r.digest) != r.digest:
                return False
        return True

    def identical_groups(self) -> list[list[str]]:
        """Groups (two or more, config order) of policies whose runs gave identical per-request TTFTs at every
        (rate, seed): the same decisions in effect, so their tables and plot lines coincide."""
        key: dict[str, list[bytes]] = {}
        for r in sorted(self.runs, key=lambda r: (str(r.rate), r.seed)):
            key.setdefault(r.policy, []).append(np.nan_to_num(r.ttft_s, nan=-1.0).tobytes())
        groups: dict[tuple[bytes, ...], list[str]] = {}
        for p in self.config.policies:
            if p in key:
                groups.setdefault(tuple(key[p]), []).append(p)
        return [g for g in groups.values() if len(g) > 1]

    # -- files -------------------------------------------------------------------------------------------
    def write_report(self, out_dir: str | Path) -> Path:
        """Write ``results.csv`` (one row per run), ``results.json`` (config, per-run rows, per-load table),
        the PNG plots and ``report.md`` into ``out_dir``; returns the report's path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        with (out / "results.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for row in rows:
                w.writerow({k: _csv(v) for k, v in row.items()})
        doc = {"config": self.config.to_dict(), "wall_s": self.wall_s, "runs": rows, "table": self.table(),
               "same_streams": self.same_streams(),
               "params": {r.policy: r.params for r in self.runs}}
        (out / "results.json").write_text(json.dumps(_clean(doc), indent=2, default=_json_default))
        plots = write_plots(self, out)
        report = out / "report.md"
        report.write_text(self.markdown(plots))
        return report

    def cdf_rate(self) -> float | None:
        rates = list(self.config.rates)
        if self.config.cdf_rate is not None and self.config.cdf_rate in rates:
            return self.config.cdf_rate
        known = [r for r in rates if r is not None]
        return max(known) if known else rates[0]

    def markdown(self, plots: dict[str, Path] | None = None) -> str:
        """The report: setup, one table per load, the change against never-deflect, the plots, the command."""
        cfg = self.config
        cl = cfg.cluster
        table = self.table()
        lines = [
            "# Policy comparison", "",
            f"Command: `{cfg.command or 'run_comparison(...)'}`", "",
            f"Cluster {cl.shape}, prefill profile `{cl.prefill_profile}`, decode profile `{cl.decode_profile}`, "
            f"token budgets {cl.prefill_max_batched_tokens} (prefill) / {cl.decode_max_batched_tokens} (decode); "
            f"SLOs: TTFT <= {cl.ttft_slo_s:g} s and P95 TBT <= {cl.tbt_slo_s:g} s.",
            f"Workload: `{cfg.trace}`, arrivals `{cfg.arrival}`, "
            + (f"windows of {cfg.window_s:g} s of trace time" if cfg.window_s else "the whole trace")
            + (" from " + " + ".join(f"[{lo:g}, {hi:g})" for lo, hi in spans(cfg.span)) + " s" if cfg.span else "")
            + (f" starting at {cfg.window_start_s:g} s" if cfg.window_start_s is not None else
               (", start drawn from the seed" if cfg.arrival == "trace" and cfg.window_s else ""))
            + (f", at most {cfg.num_requests} requests" if cfg.num_requests else "")
            + f"; seeds {list(cfg.seeds)}; every policy replays the same requests at each (load, seed)"
            + (" (checked)." if self.same_streams() else " (CHECK FAILED: streams differ)."),
            f"Each number is the mean over the {len(cfg.seeds)} seeds; changes are against `{cfg.baseline}` "
            "(P95 TTFT relative, SLO attainment in percentage points).", "",
        ]
        tuned = {r.policy: r.spec for r in self.runs if r.spec != r.policy}
        if tuned:
            lines += ["Tuned parameters (from training windows, `deflectlab tune`): "
                      + ", ".join(f"`{policy_label(k)}` -> `{policy_label(v)}`" for k, v in tuned.items()) + ".",
                      ""]
        same = self.identical_groups()
        if same:
            lines += ["Policies with identical per-request TTFTs in every run (one line in the TTFT plots): "
                      + "; ".join(" = ".join(f"`{policy_label(p)}`" for p in g) for g in same) + ".", ""]
        saturated = self.saturated_rates()
        for rate in cfg.rates:
            rows = sorted((a for a in table if a["rate"] == rate), key=lambda a: cfg.policies.index(a["policy"]))
            req = rows[0]["requests"] if rows else math.nan
            lines += [f"## Load {_rate(rate)} (about {req:.0f} requests per window)", ""]
            if rate in saturated:
                least = min(a.get("ttft_growth", math.nan) for a in rows)
                lines += [f"**This load saturates the {cl.shape} cluster under every policy**: TTFT grows with "
                          f"arrival time by at least {least:.2f} s per s under each (more than "
                          f"{SATURATION_TTFT_SLOPE:g}), so the backlog grows through the window and latencies "
                          "measure the queue, not the policy. Use a larger `--shape` or a lower load.", ""]
            lines += md_table(REPORT_COLUMNS, [_report_cells(a) for a in rows])
            lines.append("")
        if plots:
            lines += ["## Plots", ""]
            for title, path in plots.items():
                lines += [f"![{title}]({Path(path).name})", ""]
        lines += [f"{len(self.runs)} runs in {self.wall_s:.1f} s wall time.", ""]
        return "\n".join(lines)


#: The per-load table of the comparison report (GFM: the separator is built from this header).
REPORT_COLUMNS = (
    "policy", "P50 TTFT (s)", "P95 TTFT (s)", "P95 vs baseline", "P99 TTFT (s)", "SLO attain.", "vs baseline",
    "TTFT SLO", "TBT SLO", "TBT SLO vs baseline", "P95 TBT (ms)", "deflected", "prefill util",
    "est. error (median abs)", "decide (us)",
)


def _report_cells(a: dict[str, Any]) -> list[str]:
    """One row of :data:`REPORT_COLUMNS` from a :meth:`ComparisonResult.table` entry."""
    return [
        f"`{policy_label(a['policy'])}`", f"{a['ttft_p50_s']:.3f}", f"{a['ttft_p95_s']:.3f}",
        _pct(a["ttft_p95_change"]), f"{a['ttft_p99_s']:.3f}", f"{a['slo_attainment']:.1%}",
        _pts(a["slo_attainment_change_pts"]), f"{a['ttft_slo_attainment']:.1%}", f"{a['tbt_slo_attainment']:.1%}",
        _pts(a["tbt_slo_attainment_change_pts"]), f"{a['tbt_p95_s'] * 1e3:.1f}", f"{a['deflection_rate']:.0%}",
        f"{a['prefill_util']:.0%}", _pct(a["estimate_median_abs_rel"], signed=False), f"{a['decision_us_mean']:.1f}",
    ]


def _rate(r: float | None) -> str:
    return "as recorded" if r is None else f"{r:g} req/s"


def _pct(v: float | None, signed: bool = True) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:+.0%}" if signed else f"{v:.0%}"


def _pts(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:+.1f} pts"


def _csv(v: Any) -> Any:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return "" if v is None else v


def _clean(o: Any) -> Any:
    """Replace NaN/inf by ``None`` so the JSON is standard."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.generic):
        return _clean(o.item())
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    if isinstance(o, Path):
        return str(o)
    return str(o)


def run_comparison(cfg: ComparisonConfig, progress: bool = True) -> ComparisonResult:
    """Run every policy of ``cfg`` on every (rate, seed) workload and collect the results.

    Each (rate, seed) workload is built once here and handed to every policy's run, so all policies replay
    identical requests. Runs are spread over ``cfg.workers`` processes (one per core by default; 1 runs them
    here). Policy specs are checked before anything runs: a bad name or parameter is a ``ValueError``
    naming it.

    :param cfg: what to compare (policies, loads, seeds, windows, cluster).
    :param progress: show a tqdm bar on stderr.
    :returns: the runs; call :meth:`ComparisonResult.write_report` for files.
    """
    t0 = time.perf_counter()
    specs = {p: resolve_spec(p, cfg.tuned) for p in cfg.policies}
    for spec in specs.values():
        make_policy(spec)  # fail early, with the registry's message, before any work is queued
    workloads = {(rate, seed): build_workload(cfg, rate, seed) for rate in cfg.rates for seed in cfg.seeds}
    tasks = [(cfg.cluster, wl, label, spec, rate, seed)
             for (rate, seed), wl in workloads.items() for label, spec in specs.items()]
    workers = cfg.workers or os.cpu_count() or 1
    workers = min(workers, len(tasks))
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="compare", unit="run", file=sys.stderr, disable=not progress)
    runs: list[RunRecord] = []
    try:
        if workers == 1:
            for task in tasks:
                runs.append(_run_one(*task))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_run_one, *task) for task in tasks]
                for fut in as_completed(futures):
                    runs.append(fut.result())
                    bar.update(1)
    finally:
        bar.close()
    return ComparisonResult(config=cfg, runs=runs, wall_s=time.perf_counter() - t0)


def with_policies(cfg: ComparisonConfig, policies: tuple[str, ...]) -> ComparisonConfig:
    """``cfg`` with another policy set (the baseline kept if it is among them, else the first)."""
    base = cfg.baseline if cfg.baseline in policies else policies[0]
    return replace(cfg, policies=policies, baseline=base)
