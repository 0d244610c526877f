"""Chaos test of the served stack: 2 prefill + 2 decode engine emulators, the router and an open-loop replay;
mid-run one prefill and one decode instance are killed with SIGKILL (``kill -9``) while both have requests in
flight, then restarted on their ports.

    python scripts/chaos.py --duration 60 --rate 6 --policy proactive --time-scale 0.5

Prints one table: requests sent, answered, failed with a clear error (an HTTP error with a JSON body, or an SSE
error event), lost (anything else: a connection error at the client, a stream cut without an error, or no
answer at all; must be 0), the router's own outcome counts (their sum must equal the requests sent) and
requests still in flight at the end (must be 0); for each killed instance, how long after its restart it was
back in rotation (from its process start, and from its first good ``/health``); and TTFT P99 before and during
the fault (from the kill until both instances are back). Times of requests are model seconds (wall / time
scale); kill and restart times are wall seconds. Exit status 1 when anything was lost or the counters do not
balance. Everything it starts is stopped when it ends, also on errors or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.workloads import make_workload
from deflectlab.serving.procs import Processes, free_ports, wait_http
from deflectlab.serving.replay import RequestRecord, replay_async

ROLES = ("prefill", "prefill", "decode", "decode")
VICTIMS = (0, 2)  # the first prefill and the first decode instance


def _clear(r: RequestRecord) -> bool:
    """A rejection the client can read: an HTTP error (the router answers JSON) or an SSE error event."""
    return r.reason.startswith(("http ", "stream error"))


async def _router_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/stats", timeout=aiohttp.ClientTimeout(total=2)) as r:
        return await r.json()


async def _wait_back(session: aiohttp.ClientSession, url: str, label: str, timeout_s: float) -> float:
    """Wall time when the router shows ``label`` in rotation (NaN if not within ``timeout_s``)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        st = await _router_stats(session, url)
        if any(i["instance"] == label and i["alive"] for i in st["instances"]):
            return time.perf_counter()
        await asyncio.sleep(0.02)
    return float("nan")


async def _wait_busy(url: str, labels: list[str], timeout_s: float) -> bool:
    """Wait (at most ``timeout_s``) until every instance in ``labels`` has a request in flight, so the kill hits
    requests mid-way; whether they all had one at the kill."""
    deadline = time.perf_counter() + timeout_s
    async with aiohttp.ClientSession() as s:
        while True:
            st = await _router_stats(s, url)
            busy = {i["instance"] for i in st["instances"] if i["in_flight"] > 0}
            if set(labels) <= busy:
                return True
            if time.perf_counter() > deadline:
                return False
            await asyncio.sleep(0.005)


async def _wait_health(session: aiohttp.ClientSession, port: int, timeout_s: float) -> float:
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            async with session.get(f"http://127.0.0.1:{port}/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
                if r.status == 200:
                    return time.perf_counter()
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass
        await asyncio.sleep(0.01)
    return float("nan")


async def _chaos(procs: Processes, ems: list, ports: list[int], url: str, a: argparse.Namespace, t0: float
                 ) -> dict[str, Any]:
    """Kill the victims at ``kill_at`` s, restart them ``down`` s later, and time their return to rotation."""
    await asyncio.sleep(max(0.0, t0 + a.kill_at - time.perf_counter()))
    busy = await _wait_busy(url, [f"127.0.0.1:{ports[i]}" for i in VICTIMS], a.busy_wait)
    t_kill = time.perf_counter()
    for i in VICTIMS:
        procs.kill(ems[i])
    await asyncio.sleep(a.down)
    events: dict[str, Any] = {"kill_wall_s": t_kill - t0, "victims_busy_at_kill": busy, "instances": {}}
    restarted = {}
    for i in VICTIMS:
        restarted[i] = time.perf_counter()
        procs.emulator(ports[i], ROLES[i], a.time_scale, "--profile", a.profile, name=f"emulator-{i}-restarted")
    async with aiohttp.ClientSession() as s:
        async def one(i: int) -> None:
            t_up = await _wait_health(s, ports[i], 60.0)
            t_back = await _wait_back(s, url, f"127.0.0.1:{ports[i]}", 30.0)
            events["instances"][f"{ROLES[i]} :{ports[i]}"] = {
                "restart_wall_s": restarted[i] - t0, "back_wall_s": t_back - t0,
                "back_after_restart_s": t_back - restarted[i], "back_after_health_s": t_back - t_up}

        await asyncio.gather(*(one(i) for i in VICTIMS))
    events["fault_end_wall_s"] = max(v["back_wall_s"] for v in events["instances"].values())
    return events


def _p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99)) if xs else float("nan")


def _tally(records: list[RequestRecord], events: dict[str, Any], stats: dict[str, Any], scale: float
           ) -> dict[str, Any]:
    answered = [r for r in records if r.status == "completed"]
    clear = [r for r in records if r.status == "rejected" and _clear(r)]
    lost = [r for r in records if r not in answered and r not in clear]
    f0, f1 = events["kill_wall_s"] / scale, events["fault_end_wall_s"] / scale
    before = [r.ttft_s for r in answered if r.send_s < f0]
    during = [r.ttft_s for r in answered if f0 <= r.send_s <= f1]
    outcomes = stats["requests"]
    return {
        "sent": len(records), "answered": len(answered), "failed_clearly": len(clear), "lost": len(lost),
        "lost_reasons": sorted({r.reason for r in lost}), "failed_reasons": sorted({r.reason for r in clear}),
        "router_outcomes": {k: v for k, v in outcomes.items() if v}, "router_outcomes_total": sum(outcomes.values()),
        "router_in_flight_at_end": stats["requests_in_flight"],
        "ttft_p99_before_s": _p99(before), "ttft_p99_during_fault_s": _p99(during),
        "requests_during_fault": len(during),
        "retries_and_forced": {"retries": stats["retries"],
                               "forced_deflections": {k: v for k, v in stats["forced_deflections"].items() if v},
                               "policy_fallbacks": {k: v for k, v in stats["policy_fallbacks"].items() if v}},
        "events": events,
    }


def _print(t: dict[str, Any], a: argparse.Namespace) -> None:
    print(f"\nchaos: {a.policy}, {t['sent']} requests at {a.rate:g} req/s (model), time scale {a.time_scale:g}; "
          f"prefill and decode instance killed (SIGKILL) at {t['events']['kill_wall_s']:.1f} s wall"
          f"{' with requests in flight on both' if t['events']['victims_busy_at_kill'] else ''}, restarted "
          f"{a.down:g} s later")
    print(f"  {'sent':<34}{t['sent']:>8}")
    print(f"  {'answered':<34}{t['answered']:>8}")
    print(f"  {'failed with a clear error':<34}{t['failed_clearly']:>8}   {', '.join(t['failed_reasons'])}")
    print(f"  {'lost':<34}{t['lost']:>8}   {', '.join(t['lost_reasons'])}")
    print(f"  {'router outcomes (sum)':<34}{t['router_outcomes_total']:>8}   {t['router_outcomes']}")
    print(f"  {'router requests in flight at end':<34}{t['router_in_flight_at_end']:>8}")
    for name, ev in t["events"]["instances"].items():
        print(f"  back in rotation, {name:<16}{ev['back_after_restart_s']:>8.2f} s after restart, "
              f"{ev['back_after_health_s']:.2f} s after its /health answered")
    print(f"  {'TTFT p99 before the fault':<34}{t['ttft_p99_before_s']:>8.3f} s")
    print(f"  {'TTFT p99 during the fault':<34}{t['ttft_p99_during_fault_s']:>8.3f} s   "
          f"({t['requests_during_fault']} requests sent from the kill until both were back)")
    print(f"  {'retries / forced / fallbacks':<34}{t['retries_and_forced']}")


def run(a: argparse.Namespace) -> dict[str, Any]:
    # Poisson arrivals at --rate for --duration model seconds; prompt and output lengths drawn from the window
    workload = make_workload(a.trace, start_s=a.start, duration_s=a.window, rate=a.rate, arrival="poisson",
                             num_requests=max(1, round(a.rate * a.duration)), seed=a.seed)
    ports = free_ports(5)
    with Processes(a.out / "logs" if a.out else None) as procs:
        ems = [procs.emulator(ports[i], role, a.time_scale, "--profile", a.profile) for i, role in enumerate(ROLES)]
        for port, p in zip(ports[:4], ems):
            wait_http(f"http://127.0.0.1:{port}/health", timeout_s=60, proc=p)
        router = procs.router(ports[4], ports[:2], ports[2:4], a.policy, "--time-scale", str(a.time_scale),
                              "--profile", a.profile)
        url = f"http://127.0.0.1:{ports[4]}"
        wait_http(url + "/healthcheck", timeout_s=60, proc=router)

        async def both() -> tuple[list[RequestRecord], dict[str, Any], dict[str, Any]]:
            t0 = time.perf_counter()
            chaos = asyncio.ensure_future(_chaos(procs, ems, ports, url, a, t0))
            res = await replay_async(url, workload, time_scale=a.time_scale, drain_timeout_s=a.drain_timeout,
                                     label=f"chaos {a.policy}")
            events = await chaos
            async with aiohttp.ClientSession() as s:
                stats = await _router_stats(s, url)
            return res.records, events, stats

        records, events, stats = asyncio.run(both())
    return _tally(records, events, stats, a.time_scale)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="azure_code")
    ap.add_argument("--start", type=float, default=540.0, help="start of the trace window lengths are drawn from, s")
    ap.add_argument("--window", type=float, default=600.0, help="trace window lengths are drawn from, seconds")
    ap.add_argument("--duration", type=float, default=60.0, help="length of the run, model seconds")
    ap.add_argument("--rate", type=float, default=6.0, help="mean arrival rate, requests per model second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy", default="proactive")
    ap.add_argument("--profile", default=ClusterConfig.prefill_profile)
    ap.add_argument("--time-scale", type=float, default=0.5, help="wall seconds per model second")
    ap.add_argument("--kill-at", type=float, default=None, help="wall seconds into the run (default: a third)")
    ap.add_argument("--busy-wait", type=float, default=5.0,
                    help="after --kill-at, wait up to this many wall seconds for both victims to have a request in "
                         "flight")
    ap.add_argument("--down", type=float, default=2.0, help="wall seconds the killed instances stay down")
    ap.add_argument("--drain-timeout", type=float, default=60.0, help="wall seconds after the last request")
    ap.add_argument("--out", type=Path, default=None, help="folder for chaos.json and the processes' logs")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    for name in ("duration", "rate", "time_scale", "down"):
        if not getattr(a, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0")
    if a.kill_at is None:
        a.kill_at = a.duration * a.time_scale / 3
    table = run(a)
    _print(table, a)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "chaos.json").write_text(json.dumps(table, indent=2, default=float))
    ok = table["lost"] == 0 and table["router_outcomes_total"] == table["sent"] == table["answered"] + \
        table["failed_clearly"] and table["router_in_flight_at_end"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
