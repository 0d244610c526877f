"""``deflectlab compare``: run several policies over loads and workload seeds on identical request streams.

    deflectlab compare azure_code --rates 3.21 5 8 --seeds 0-2 --out results/compare
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

from deflectlab.experiments.compare import (
    DEFAULT_POLICIES,
    DEFAULT_RATES,
    DEFAULT_SEEDS,
    ComparisonConfig,
    run_comparison,
)
from deflectlab.experiments.runner import WorkloadSpec
from deflectlab.scripts.options import (
    add_cluster_flags,
    add_dataclass_flags,
    add_policies_flag,
    add_rates_flag,
    add_seeds_flag,
    add_window_flag,
    cluster_from_flags,
    given,
    parse_policies,
    parse_rates,
    parse_seeds,
    parse_span,
    parse_window,
)

TUNED_DIR = Path(__file__).resolve().parents[1] / "experiments" / "policies"


def add_common_args(p: argparse.ArgumentParser, rates: tuple[float | None, ...], seeds: str, window: str) -> None:
    """Workload, cluster and run arguments shared by ``compare`` and ``tune`` (the grammar of
    :mod:`scripts.options`)."""
    p.add_argument("trace", nargs="?", default="azure_code",
                   help="bundled trace (azure_code, azure_conv) or a trace file path (default azure_code)")
    g = p.add_argument_group("workloads")
    add_rates_flag(g, rates)
    add_seeds_flag(g, seeds)
    add_window_flag(g, window, "start drawn from each seed")
    g.add_argument("--span", default=None, metavar="LO:HI",
                   help="draw windows from LO:HI seconds of the trace only (several: LO:HI,LO:HI, each window in one)")
    add_dataclass_flags(g, WorkloadSpec, only=("arrival", "cv"))
    add_cluster_flags(p)
    r = p.add_argument_group("run")
    r.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def config_from_args(a: argparse.Namespace, policies: tuple[str, ...]) -> ComparisonConfig:
    wl = WorkloadSpec(**given(a, WorkloadSpec))
    return ComparisonConfig(
        trace=a.trace, rates=parse_rates(a.rates), seeds=parse_seeds(a.seeds), span=parse_span(a.span),
        arrival=wl.arrival, cv=wl.cv, cluster=cluster_from_flags(a), policies=parse_policies(policies),
        workers=a.workers, command=shlex.join(["deflectlab", *sys.argv[1:]]), **parse_window(a.window))


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
    add_common_args(p, DEFAULT_RATES, ",".join(map(str, DEFAULT_SEEDS)), "600")
    add_policies_flag(p, DEFAULT_POLICIES, "policies to compare")
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
