"""``deflectlab compare``: run several policies over loads and workload seeds on identical request streams.

    deflectlab compare azure_code --rates 3.21,5,8 --seeds 0-2 --out results/compare
    deflectlab compare azure_code --policies round_robin dynamo_isl proactive:margin=0.1 --json

Writes ``results.csv``, ``results.json``, PNG plots and ``report.md`` into ``--out`` (see
:mod:`experiments.compare`); ``--json`` prints ``{"results": [...]}`` on stdout instead (progress stays on
stderr). Threshold heuristics take tuned parameters from ``--tuned`` (default ``auto``: the shipped file
``experiments/policies/tuned_<trace>_<shape>.yaml`` when it was tuned for this cluster).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from deflectlab.envs.config import ClusterConfig
from deflectlab.experiments.compare import (
    DEFAULT_POLICIES,
    DEFAULT_RATES,
    DEFAULT_SEEDS,
    ComparisonConfig,
    run_comparison,
)

TUNED_DIR = Path(__file__).resolve().parents[1] / "experiments" / "policies"


def parse_rates(text: str) -> tuple[float | None, ...]:
    """``"3.21,5,8"`` -> rates in requests/s; ``trace`` (or ``recorded``) replays the recorded times."""
    out: list[float | None] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part.lower() in ("trace", "recorded", "none"):
            out.append(None)
            continue
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"--rates: {part!r} is not a number (requests/s) or 'trace'") from None
        if not v > 0:
            raise ValueError(f"--rates: {part!r} must be > 0 requests/s")
        out.append(v)
    if not out:
        raise ValueError("--rates: give at least one rate")
    return tuple(out)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` or ``"0-4"`` (inclusive) or a mix -> seeds."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, dash, hi = part.partition("-")
        try:
            if dash:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--seeds: {part!r} is not an integer or a range like 0-4") from None
    if not out or min(out) < 0:
        raise ValueError("--seeds: give integers >= 0")
    return tuple(dict.fromkeys(out))


def parse_window(text: str) -> dict[str, Any]:
    """``600`` (seconds, start drawn from the seed), ``300:600`` (start:duration seconds), ``2000req``
    (requests from a seed-drawn start) or ``all`` (the whole trace) -> ComparisonConfig fields."""
    t = text.strip().lower()
    if t in ("all", "whole", "none"):
        return {"window_s": None, "window_start_s": None, "num_requests": None}
    try:
        if t.endswith("req"):
            n = int(t[:-3])
            if n < 1:
                raise ValueError
            return {"num_requests": n}
        if ":" in t:
            a, b = t.split(":", 1)
            start, dur = float(a), float(b)
            if start < 0 or dur <= 0:
                raise ValueError
            return {"window_start_s": start, "window_s": dur}
        dur = float(t)
        if dur <= 0:
            raise ValueError
        return {"window_s": dur}
    except ValueError:
        raise ValueError(f"--window: {text!r} is not SECONDS, START:SECONDS, <N>req or all") from None


def parse_span(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        a, b = (float(x) for x in text.split(":", 1))
    except ValueError:
        raise ValueError(f"--span: {text!r} is not LO:HI seconds") from None
    if not 0 <= a < b:
        raise ValueError(f"--span: {text!r} needs 0 <= LO < HI")
    return (a, b)


def add_common_args(p: argparse.ArgumentParser, rates: str, seeds: str, window: str) -> None:
    """Workload, cluster and run arguments shared by ``compare`` and ``tune``."""
    from deflectlab.scripts.cmd_simulate import add_cluster_args

    p.add_argument("trace", nargs="?", default="azure_code",
                   help="bundled trace (azure_code, azure_conv) or a trace file path (default azure_code)")
    g = p.add_argument_group("workloads")
    g.add_argument("--rates", default=rates,
                   help=f"comma-separated loads, requests/s; 'trace' replays recorded times (default {rates})")
    g.add_argument("--seeds", default=seeds, help=f"workload seeds, e.g. 0,1,2 or 0-4 (default {seeds})")
    g.add_argument("--window", default=window,
                   help="per-seed window: SECONDS of trace time (start drawn from the seed), START:SECONDS, "
                        f"<N>req, or all (default {window})")
    g.add_argument("--span", default=None, help="draw windows from LO:HI seconds of the trace only")
    g.add_argument("--arrival", default="trace", choices=["trace", "poisson", "gamma", "onoff"],
                   help="recorded arrival times (rescaled to each rate) or a synthetic process")
    g.add_argument("--cv", type=float, default=1.0, help="CV of gamma inter-arrival gaps")
    add_cluster_args(p)
    r = p.add_argument_group("run")
    r.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def config_from_args(a: argparse.Namespace, policies: tuple[str, ...]) -> ComparisonConfig:
    from deflectlab.scripts.cmd_simulate import cluster_from_args

    cluster: ClusterConfig = cluster_from_args(a)
    win = parse_window(a.window)
    return ComparisonConfig(
        trace=a.trace, rates=parse_rates(a.rates), seeds=parse_seeds(a.seeds), span=parse_span(a.span),
        arrival=a.arrival, cv=a.cv, cluster=cluster, policies=policies, workers=a.workers,
        command=shlex.join(["deflectlab", *sys.argv[1:]]), **win)


def tuned_path_for(cfg: ComparisonConfig) -> Path:
    """Where ``deflectlab tune`` puts (and ``--tuned auto`` looks for) tuned parameters of a trace and shape."""
    return TUNED_DIR / f"tuned_{Path(cfg.trace).stem}_{cfg.cluster.shape}.yaml"


def resolve_tuned(arg: str, cfg: ComparisonConfig) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """The tuned parameters ``--tuned`` names (``auto``, ``none`` or a path) and a note for stderr."""
    from deflectlab.experiments.tuning import check_disjoint, load_tuned

    if arg.lower() == "none":
        return None, "thresholds at their defaults (--tuned none)"
    if arg.lower() == "auto":
        path = tuned_path_for(cfg)
        if not path.exists():
            return None, f"no tuned parameters at {path}: thresholds at their defaults (run deflectlab tune)"
        tuned, meta = load_tuned(path)
        if meta.get("cluster") != cfg.cluster.to_dict():
            return None, f"{path} was tuned for another cluster config: thresholds at their defaults"
    else:
        path = Path(arg)
        tuned, meta = load_tuned(path)
    check_disjoint(cfg, meta)
    return tuned, f"tuned parameters from {path}"


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser("compare", help=help_text,
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, ",".join(f"{r:g}" for r in DEFAULT_RATES), ",".join(map(str, DEFAULT_SEEDS)), "600")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), metavar="SPEC",
                   help="policy specs, space-separated, e.g. round_robin proactive:margin=0.1 "
                        f"(default: {' '.join(DEFAULT_POLICIES)})")
    p.add_argument("--baseline", default="round_robin", help="the never-deflect policy the others are compared to")
    p.add_argument("--tuned", default="auto",
                   help="tuned threshold parameters: a YAML from 'deflectlab tune', 'auto' (the shipped file for "
                        "this trace and shape, if tuned for this cluster) or 'none'")
    p.add_argument("--cdf-rate", type=float, default=None,
                   help="load of the CDF and breakdown plots (default: the highest)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default results/compare, or nothing with --json)")
    p.add_argument("--json", action="store_true", help="print {'results': [...]} on stdout")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    cfg = config_from_args(a, tuple(a.policies))
    tuned, note = resolve_tuned(a.tuned, cfg)
    from dataclasses import replace

    cfg = replace(cfg, tuned=tuned, baseline=a.baseline, cdf_rate=a.cdf_rate)
    if not a.no_progress:
        print(f"deflectlab compare: {note}", file=sys.stderr)
    result = run_comparison(cfg, progress=not a.no_progress)
    out = a.out if a.out is not None else (None if a.json else Path("results/compare"))
    if out is not None:
        report = result.write_report(out)
        if not a.json:
            print(f"wrote {out}/ (results.csv, results.json, plots, {report.name})")
    if a.json:
        print(json.dumps(result.to_json()))
    else:
        for row in result.table():
            print(f"{_rate(row['rate']):>12}  {row['policy']:<28} P95 TTFT {row['ttft_p95_s']:7.3f} s "
                  f"({_pct(row['ttft_p95_change'])} vs {cfg.baseline})  SLO {row['slo_attainment']:6.1%} "
                  f"(TBT {row['tbt_slo_attainment']:6.1%})  deflected {row['deflection_rate']:4.0%}")
    return 0


def _rate(r: float | None) -> str:
    return "recorded" if r is None else f"{r:g} req/s"


def _pct(v: float) -> str:
    return "-" if v != v else f"{v:+.0%}"
