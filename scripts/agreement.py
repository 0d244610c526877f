"""Agreement of the served stack with the simulator: the same trace window and policy through
router + 2 prefill + 2 decode engine emulators on loopback, and through ``envs.simulator.ClusterSim``.

    python scripts/agreement.py --trace azure_code --window 60 --rate 4 --policy round_robin,always_deflect

For each policy it starts four emulators and a router (subprocesses, 127.0.0.1, free ports), replays the
window open loop at ``--time-scale`` (wall seconds per model second), stops them, simulates the same
workload, and prints P50/P95 TTFT (and P50 TBT) of both with their relative difference. Everything it starts
is stopped when it ends, also on errors or Ctrl-C. ``--out DIR`` keeps each replay's records, summary, plots
and process logs, and writes ``agreement.json``.

What agreement shows: the emulators time every request with the simulator's own node classes
(``envs.prefill_node``, ``envs.decode_node``), so agreement shows that the HTTP path (router, emulators,
replay client, loopback) adds little to the model's times and that the router's policy sees what the
simulated one sees. It does not show that the model is right: only measurements on real vLLM can (see
docs/calibration.md). The test suite runs a short form of it (20 s window, time scale 0.5, two policies).

The simulator runs with ``--handoff rdma`` by default: the emulated stack performs the hand-off's
orchestration for real (router hops, HTTP responses, step boundaries of the emulators) and models only the KV
transfer with the profile's terms, which is what the ``rdma`` preset is; ``vllm-nixl`` adds a fitted dispatch
delay standing for that same orchestration on real vLLM (docs/fidelity.md) and would count it twice.

What can make them differ: the emulators' KV transfer is uncontended (the simulator shares each NIC max-min
fairly between concurrent transfers), the router sees load through counters and 75 ms scrapes where the
simulated policy sees the exact state, and loopback HTTP and event-loop lag add wall time, which becomes
``lag / time_scale`` model time: smaller time scales run faster and agree less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
from pathlib import Path

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.workloads import make_workload
from deflectlab.policies.registry import make_policy
from deflectlab.serving.procs import Processes, free_ports, wait_http
from deflectlab.serving.replay import replay_async


def run_emulated(policy: str, workload, a: argparse.Namespace, log_dir: Path | None) -> tuple[dict, dict]:
    """Replay ``workload`` through router + 2P2D emulators; returns (replay summary, router stats)."""
    ports = free_ports(5)
    scale = str(a.time_scale)
    with Processes(log_dir) as procs:
        ems = [procs.emulator(ports[i], role, a.time_scale, "--profile", a.profile)
               for i, role in enumerate(("prefill", "prefill", "decode", "decode"))]
        for port, p in zip(ports[:4], ems):
            wait_http(f"http://127.0.0.1:{port}/health", proc=p)
        router = procs.router(ports[4], ports[:2], ports[2:4], policy, "--time-scale", scale, "--profile",
                              a.profile, "--ttft-slo", str(a.ttft_slo), "--tbt-slo", str(a.tbt_slo))
        wait_http(f"http://127.0.0.1:{ports[4]}/healthcheck", proc=router)
        url = f"http://127.0.0.1:{ports[4]}"
        res = asyncio.run(replay_async(url, workload, time_scale=a.time_scale, ttft_slo_s=a.ttft_slo,
                                       tbt_slo_s=a.tbt_slo, drain_timeout_s=a.drain_timeout, label=policy))
        with urllib.request.urlopen(url + "/stats", timeout=5) as r:
            stats = json.load(r)
    if log_dir is not None:
        res.save(log_dir / "replay", plots=True)
    return res.summary, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="azure_code")
    ap.add_argument("--start", type=float, default=0.0, help="window start, seconds")
    ap.add_argument("--window", type=float, default=60.0, help="window length, seconds (model time)")
    ap.add_argument("--rate", type=float, default=4.0, help="mean arrival rate, requests/s (model time)")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--policy", default="round_robin", help="comma-separated policy specs")
    ap.add_argument("--profile", default=ClusterConfig.prefill_profile)
    ap.add_argument("--time-scale", type=float, default=0.5, help="wall seconds per model second")
    ap.add_argument("--ttft-slo", type=float, default=ClusterConfig.ttft_slo_s)
    ap.add_argument("--tbt-slo", type=float, default=ClusterConfig.tbt_slo_s)
    ap.add_argument("--drain-timeout", type=float, default=120.0, help="wall seconds after the last request")
    ap.add_argument("--handoff", default="rdma",
                    help="the simulator's hand-off preset (default rdma: the emulated stack performs the "
                         "orchestration itself over real HTTP hops, and models only the transfer with the profile's "
                         "terms, which is what rdma is; the simulator's default vllm-nixl would count the "
                         "orchestration twice)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)

    try:
        workload = make_workload(a.trace, start_s=a.start, duration_s=a.window, rate=a.rate,
                                 num_requests=a.num_requests)
    except ValueError as e:
        ap.error(str(e))
    cfg = ClusterConfig(num_prefill=2, num_decode=2, prefill_profile=a.profile, decode_profile=a.profile,
                        ttft_slo_s=a.ttft_slo, tbt_slo_s=a.tbt_slo, handoff=a.handoff)
    print(f"{len(workload)} requests of {a.trace} [{a.start:g}, {a.start + a.window:g}) s at {a.rate:g} req/s; "
          f"emulated at time scale {a.time_scale:g} ({workload.duration_s * a.time_scale:.0f} s wall per policy)",
          flush=True)
    rows = []
    for policy in [s.strip() for s in a.policy.split(",") if s.strip()]:
        sim = ClusterSim(cfg, workload).run(make_policy(policy)).summary
        log_dir = a.out / policy.replace(":", "_").replace("=", "-") if a.out else None
        emu, stats = run_emulated(policy, workload, a, log_dir)
        n_dec = sum(stats["decisions"].get(k, 0) for k in ("deflect", "implicit_deflect", "forced_deflect"))
        rows.append({"policy": policy, "simulated": sim, "emulated": emu, "router": stats,
                     "deflection_rate_emulated": n_dec / max(len(workload), 1)})
        print(f"  {policy}: emulated {emu['completed']}/{emu['requests']} completed "
              f"({emu['rejected']} rejected, {emu['unfinished']} unfinished); router decisions {stats['decisions']}",
              flush=True)

    print()
    print(f"{'policy':<22}{'metric':<12}{'simulated':>12}{'emulated':>12}{'diff':>9}")
    for row in rows:
        sim, emu = row["simulated"], row["emulated"]
        items = [("TTFT p50", sim["ttft_s"]["p50"], emu["ttft_s"]["p50"], "s"),
                 ("TTFT p95", sim["ttft_s"]["p95"], emu["ttft_s"]["p95"], "s"),
                 ("TBT p50", sim["tbt_s"]["p50"] * 1e3, emu["tbt_s"]["p50"] * 1e3, "ms"),
                 ("deflected", sim["deflection_rate"] * 100, row["deflection_rate_emulated"] * 100, "%")]
        for i, (name, x, y, unit) in enumerate(items):
            diff = f"{(y - x) / x:+.1%}" if x else "-"
            print(f"{row['policy'] if i == 0 else '':<22}{name:<12}{x:>10.3f}{unit:>2}{y:>10.3f}{unit:>2}{diff:>9}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "agreement.json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
