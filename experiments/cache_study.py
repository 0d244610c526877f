"""How prefix caching moves P95 TTFT and SLO attainment for every policy, on the Mooncake trace at a shape where
deflection and caching decide the outcome.

    python -m deflectlab.experiments.cache_study [--shape 8p8d] [--out experiments/cache_study] [--workers 2]

For the cache off and on in turn: the tunable policies (``dynamo_isl_or_load``, ``prefix_affinity``) get their
parameters from a grid search on training windows (300 s windows from the first half of the trace, seeds
100-102, :mod:`experiments.tuning`), then every policy replays held-out windows (300 s from the second half,
seeds 0-2) at each load. Both settings use the same request streams. The report (``report.md``) puts each
policy's P95 TTFT, SLO attainment, deflection rate and prefix hit rates with the cache off and on side by side,
says which loads saturate the cluster, and ``results.json`` holds every run's numbers.

The default cluster is heterogeneous: H100 prefill nodes, A100 decode nodes, both serving Llama-3-8B (bundled
profiles). On 8P8D the Mooncake trace at its recorded rate (3.9 req/s of 15k-token prompts on average) loads
the prefill pool enough that both where a prompt is prefilled and what is cached there matter; smaller shapes
saturate under every policy, larger ones make the policies indistinguishable.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.workloads import load_trace
from deflectlab.experiments.compare import ComparisonConfig, ComparisonResult, run_comparison
from deflectlab.experiments.markdown import table as md_table
from deflectlab.experiments.tuning import training_config, tune

TRACE = "mooncake_synthetic"
POLICIES = ("round_robin", "always_deflect", "dynamo_isl_or_load", "prefix_affinity", "proactive")
TUNED = ("dynamo_isl_or_load", "prefix_affinity")
#: recorded arrival times (``None``, 3.9 req/s) and a 1.5x heavier load, requests/s
RATES: tuple[float | None, ...] = (None, 6.0)
EVAL_SEEDS = (0, 1, 2)
TRAIN_SEEDS = (100, 101, 102)
WINDOW_S = 300.0


def study_configs(cluster: ClusterConfig, workers: int | None) -> tuple[ComparisonConfig, ComparisonConfig]:
    """``(training, evaluation)`` configs: first-half windows for tuning, second-half windows for the comparison."""
    end = float(load_trace(TRACE).arrival_s[-1])
    base = ComparisonConfig(trace=TRACE, rates=RATES, seeds=EVAL_SEEDS, window_s=WINDOW_S, cluster=cluster,
                            policies=POLICIES, workers=workers)
    train = training_config(base, seeds=TRAIN_SEEDS)
    return train, replace(base, span=(end / 2, end))


def run_setting(cluster: ClusterConfig, workers: int | None) -> tuple[ComparisonResult, dict[str, dict[str, Any]]]:
    train, evaluate = study_configs(cluster, workers)
    tuned = {p: r.best for p, r in tune(train, TUNED, progress=False).items()}
    return run_comparison(replace(evaluate, tuned=tuned), progress=False), tuned


def _pool_hits(res: ComparisonResult, policy: str, rate: Any) -> tuple[float, float]:
    runs = [r for r in res.runs if r.policy == policy and r.rate == rate]
    hit = [r.summary.get("prefix_hit_rate") or {} for r in runs]
    return (sum(h.get("prefill", 0.0) for h in hit) / len(hit), sum(h.get("decode", 0.0) for h in hit) / len(hit))


COLUMNS = ("policy", "P95 TTFT off (s)", "P95 TTFT on (s)", "SLO att. off", "SLO att. on", "deflected off",
           "deflected on", "hit rate on (P / D)")


def _f(x: float, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def report(results: dict[bool, ComparisonResult], tuned: dict[bool, dict], cluster: ClusterConfig,
           command: str, wall_s: float) -> str:
    tables = {on: {(a["rate"], a["policy"]): a for a in res.table()} for on, res in results.items()}
    lines = ["# Prefix caching and routing on the Mooncake trace", "", f"Command: `{command}`", "",
             f"Cluster {cluster.shape}: prefill `{cluster.prefill_profile}`, decode `{cluster.decode_profile}`; "
             f"SLOs TTFT <= {cluster.ttft_slo_s:g} s, P95 TBT <= {cluster.tbt_slo_s:g} s; hand-off "
             f"`{cluster.handoff}`. Trace `{TRACE}` (bundled Mooncake synthetic trace): {WINDOW_S:g} s windows "
             f"from its second half, seeds {list(EVAL_SEEDS)}, means over seeds. Tuned on first-half windows, "
             f"seeds {list(TRAIN_SEEDS)}, separately for each setting: cache off {tuned[False]}; cache on "
             f"{tuned[True]}.", ""]
    for rate in RATES:
        load = "recorded arrival times (3.9 req/s)" if rate is None else f"{rate:g} req/s"
        lines += [f"## Load: {load}", ""]
        for on in (False, True):
            if rate in results[on].saturated_rates():
                lines += [f"Cache {'on' if on else 'off'}: this load saturates the cluster under every policy "
                          "(TTFT grows with arrival time under each).", ""]
        rows = []
        for pol in POLICIES:
            a, b = tables[False].get((rate, pol), {}), tables[True].get((rate, pol), {})
            hp, hd = _pool_hits(results[True], pol, rate)
            rows.append([f"`{pol}`", _f(a.get("ttft_p95_s"), ".2f"), _f(b.get("ttft_p95_s"), ".2f"),
                         _f(a.get("slo_attainment"), ".3f"), _f(b.get("slo_attainment"), ".3f"),
                         _f(a.get("deflection_rate"), ".2f"), _f(b.get("deflection_rate"), ".2f"),
                         f"{hp:.2f} / {hd:.2f}"])
        lines += md_table(COLUMNS, rows) + [""]
    lines += [f"{sum(len(r.runs) for r in results.values())} evaluation runs (plus tuning) in {wall_s:.0f} s wall "
              "time.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8p8d", help="cluster shape <x>p<y>d (default 8p8d)")
    ap.add_argument("--prefill-profile", default="h100-80gb_llama-3-8b")
    ap.add_argument("--decode-profile", default="a100-80gb_llama-3-8b")
    ap.add_argument("--out", default="experiments/cache_study", help="output folder")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    results, tuned = {}, {}
    for on in (False, True):
        cluster = ClusterConfig.from_shape(a.shape, prefill_profile=a.prefill_profile,
                                           decode_profile=a.decode_profile, prefix_cache=on)
        results[on], tuned[on] = run_setting(cluster, a.workers)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m deflectlab.experiments.cache_study " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(results, tuned, replace(cluster, prefix_cache=True), cmd.strip(), time.perf_counter() - t0)
    (out / "report.md").write_text(text)
    doc = {("cache_on" if on else "cache_off"): {"tuned": tuned[on], "table": res.table()}
           for on, res in results.items()}
    (out / "results.json").write_text(json.dumps(doc, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
