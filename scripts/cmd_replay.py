"""``deflectlab replay``: replay a trace window, open loop, against a router, an emulator or vLLM; client-side
TTFT/TBT per request, a summary with the simulator's keys, and a TTFT CDF."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deflectlab.envs.config import ClusterConfig


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    from deflectlab.scripts.options import add_workload_flags

    d = ClusterConfig()
    p = sub.add_parser("replay", help=help_text,
                       description=__doc__)
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000 (the router)")
    add_workload_flags(p)
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="wall seconds per model second: the emulators' --time-scale (1 for vLLM)")
    p.add_argument("--model", default=None, help="model field of each request (default: omitted)")
    p.add_argument("--ttft-slo", type=float, default=d.ttft_slo_s, help="TTFT SLO, seconds")
    p.add_argument("--tbt-slo", type=float, default=d.tbt_slo_s, help="P95 TBT SLO, seconds")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="wall seconds to wait for outstanding requests after the last is sent")
    p.add_argument("--label", default="replay", help="run name in the summary and plot")
    p.add_argument("--out", type=Path, default=None, help="folder for requests.csv, summary.json, ttft_cdf.png")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    import sys

    from deflectlab.scripts.options import workload_from_flags
    from deflectlab.serving.replay import replay

    if not a.time_scale > 0:
        raise ValueError(f"--time-scale must be > 0, got {a.time_scale}")
    workload = workload_from_flags(a).build()
    print(f"replaying {len(workload)} requests over {workload.duration_s:.1f} model s "
          f"({workload.duration_s * a.time_scale:.1f} wall s) against {a.url}", file=sys.stderr)
    res = replay(a.url, workload, time_scale=a.time_scale, model=a.model, ttft_slo_s=a.ttft_slo,
                 tbt_slo_s=a.tbt_slo, drain_timeout_s=a.drain_timeout, label=a.label,
                 progress=sys.stderr.isatty())
    s = res.summary
    t, b = s["ttft_s"], s["tbt_s"]
    print(f"{s['requests']} requests: {s['completed']} completed, {s['rejected']} rejected "
          f"{s['rejected_reasons'] or ''}, {s['unfinished']} unfinished")
    print(f"  TTFT  p50 {t['p50']:.3f} s   p95 {t['p95']:.3f} s   p99 {t['p99']:.3f} s")
    print(f"  TBT   p50 {b['p50'] * 1e3:.1f} ms  p95 {b['p95'] * 1e3:.1f} ms  p99 {b['p99'] * 1e3:.1f} ms")
    print(f"  SLO attainment {s['slo_attainment']:.1%} (TTFT SLO met by {s['ttft_slo_attainment']:.1%}, TBT SLO by "
          f"{s['tbt_slo_attainment']:.1%}), goodput {s['goodput_rps']:.2f} req/s; times in model seconds "
          f"(wall / {a.time_scale:g})")
    if a.out:
        res.save(a.out, plots=not a.no_plots)
        print(f"  wrote {a.out}/ (requests.csv, summary.json{'' if a.no_plots else ', ttft_cdf.png'})")
    else:
        print(json.dumps({k: s[k] for k in ("ttft_s", "tbt_s", "slo_attainment", "ttft_slo_attainment",
                                            "tbt_slo_attainment")}, default=float))
    return 0
