"""``deflectlab simulate``: replay a trace on an xPyD cluster under one policy; summary, records and plots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deflectlab.experiments.runner import SimulationSpec, run_simulation
from deflectlab.scripts.options import add_cluster_flags, add_workload_flags, cluster_from_flags, workload_from_flags


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser("simulate", help=help_text,
                       description=__doc__)
    add_workload_flags(p)
    add_cluster_flags(p)
    p.add_argument("--policy", default="round_robin",
                   help="policy spec, e.g. round_robin, always_deflect, proactive:margin=0.1")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML with workload/cluster/policy sections (e.g. experiments/simulate_2p2d.yaml); "
                        "replaces the workload, cluster and policy flags")
    p.add_argument("--out", type=Path, default=None, help="output folder for records, summary and plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")
    p.set_defaults(func=run)


def format_summary(s: dict) -> str:
    from deflectlab.envs.metrics import COMPONENT_LABELS

    t, b = s["ttft_s"], s["tbt_s"]
    lines = [
        f"policy {s['policy']} on {s['cluster']}: {s['requests']} requests, {s['completed']} completed, "
        f"{s['rejected']} rejected, offered {s['offered_rate_rps']:.2f} req/s",
        f"  TTFT  p50 {t['p50']:.3f} s   p95 {t['p95']:.3f} s   p99 {t['p99']:.3f} s",
        f"  TBT   p50 {b['p50'] * 1e3:.1f} ms  p95 {b['p95'] * 1e3:.1f} ms  p99 {b['p99'] * 1e3:.1f} ms",
        f"  SLO attainment {s['slo_attainment']:.1%} (TTFT <= {s['slo']['ttft_slo_s']} s: "
        f"{s['ttft_slo_attainment']:.1%}, P95 TBT <= {s['slo']['tbt_slo_s']} s: {s['tbt_slo_attainment']:.1%}), "
        f"goodput {s['goodput_rps']:.2f} req/s, deflection rate {s['deflection_rate']:.1%}",
        f"  utilisation: prefill {', '.join(f'{u:.0%}' for u in s['utilization']['prefill'])}; "
        f"decode {', '.join(f'{u:.0%}' for u in s['utilization']['decode'])}",
        f"  P95 TTFT breakdown: the slowest 5 % of requests (TTFT at or above the P95) wait "
        f"{s['p95_set_mean_ttft_s']:.3f} s on average",
        "  for their first token; that time is made of (mean per request, share of it):",
    ]
    for k, v in s["ttft_breakdown_p95"].items():
        if v and v > 0:
            share = v / s["p95_set_mean_ttft_s"] if s["p95_set_mean_ttft_s"] else float("nan")
            lines.append(f"    {COMPONENT_LABELS[k]:<48} {v:8.3f} s  {share:6.1%}")
    lines.append(f"  simulated in {s['wall_s']:.2f} s ({s['sim_requests_per_wall_s']:,.0f} requests/s, "
                 f"{s['events']:,} events)")
    return "\n".join(lines)


def run(a: argparse.Namespace) -> int:
    if a.config:
        spec = SimulationSpec.from_yaml(a.config)
    else:
        spec = SimulationSpec(workload=workload_from_flags(a), cluster=cluster_from_flags(a), policy=a.policy)
    result = run_simulation(spec, progress=not a.json and sys.stderr.isatty())
    if a.out:
        out = result.save(a.out)
        if not a.no_plots:
            from deflectlab.experiments.plots import plot_run

            plot_run(result, out)
    if a.json:
        print(json.dumps(result.summary, default=float))
    else:
        print(format_summary(result.summary))
        if a.out:
            print(f"  wrote {a.out}/ (requests.csv, summary.json, config.json"
                  f"{', ttft_cdf.png, ttft_breakdown_p95.png' if not a.no_plots else ''})")
    return 0
