"""``deflectlab simulate``: replay a trace on an xPyD cluster under one policy; summary, records and plots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deflectlab.envs.config import ClusterConfig, parse_shape
from deflectlab.experiments.runner import SimulationSpec, WorkloadSpec, run_simulation

DEFAULT_PROFILE = "a100-80gb_deepseek-v2-lite"


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--trace", default="azure_code", help="bundled trace (azure_code, azure_conv) or a file path")
    g.add_argument("--rate", type=float, default=None,
                   help="target mean arrival rate, requests/s (default: as recorded)")
    g.add_argument("--start", type=float, default=0.0, help="window start in the trace, seconds")
    g.add_argument("--duration", type=float, default=None, help="window length, seconds (default: to the end)")
    g.add_argument("--num-requests", type=int, default=None, help="at most this many requests")
    g.add_argument("--arrival", default="trace", choices=["trace", "poisson", "gamma", "onoff"])
    g.add_argument("--cv", type=float, default=1.0, help="CV of gamma inter-arrival gaps")
    g.add_argument("--seed", type=int, default=0)


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    d = ClusterConfig()
    g = p.add_argument_group("cluster")
    g.add_argument("--shape", default="2p2d", help="cluster shape <x>p<y>d (default 2p2d)")
    g.add_argument("--profile", default=None, help=f"profile of both pools (default {DEFAULT_PROFILE})")
    g.add_argument("--prefill-profile", default=None, help="profile of the prefill pool")
    g.add_argument("--decode-profile", default=None, help="profile of the decode pool")
    g.add_argument("--prefill-budget", type=int, default=d.prefill_max_batched_tokens,
                   help="prefill step token budget (max_num_batched_tokens)")
    g.add_argument("--decode-budget", type=int, default=d.decode_max_batched_tokens,
                   help="decode step token budget, decodes plus deflected chunks")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--ttft-slo", type=float, default=d.ttft_slo_s, help="TTFT SLO, seconds")
    g.add_argument("--tbt-slo", type=float, default=d.tbt_slo_s, help="P95 TBT SLO, seconds")
    g.add_argument("--handoff", default=d.handoff,
                   help=f"KV hand-off transport preset: vllm-nixl, rdma or tcp, optionally with terms, e.g. "
                        f"vllm-nixl:dispatch_s=0.2 (default {d.handoff})")


def cluster_from_args(a: argparse.Namespace) -> ClusterConfig:
    p, d = parse_shape(a.shape)
    base = a.profile or DEFAULT_PROFILE
    return ClusterConfig(num_prefill=p, num_decode=d, prefill_profile=a.prefill_profile or base,
                         decode_profile=a.decode_profile or base, prefill_max_batched_tokens=a.prefill_budget,
                         decode_max_batched_tokens=a.decode_budget, max_num_seqs=a.max_num_seqs,
                         ttft_slo_s=a.ttft_slo, tbt_slo_s=a.tbt_slo, handoff=a.handoff)


def workload_from_args(a: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(trace=a.trace, rate=a.rate, start_s=a.start, duration_s=a.duration,
                        num_requests=a.num_requests, arrival=a.arrival, cv=a.cv, seed=a.seed)


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser("simulate", help=help_text,
                       description=__doc__)
    add_workload_args(p)
    add_cluster_args(p)
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
        f"  P95 TTFT breakdown (mean over the {s['p95_set_mean_ttft_s']:.3f} s tail set):",
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
        spec = SimulationSpec(workload=workload_from_args(a), cluster=cluster_from_args(a), policy=a.policy)
    result = run_simulation(spec, progress=not a.json and sys.stderr.isatty())
    if a.out:
        result.save(a.out, plots=not a.no_plots)
    if a.json:
        print(json.dumps(result.summary, default=float))
    else:
        print(format_summary(result.summary))
        if a.out:
            print(f"  wrote {a.out}/ (requests.csv, summary.json, config.json"
                  f"{', ttft_cdf.png, ttft_breakdown_p95.png' if not a.no_plots else ''})")
    return 0
