"""Router overhead and policy decision time, measured on loopback. Prints numbers; asserts nothing.

    python scripts/bench_router.py [--rates 100 500] [--duration 5] [--repeats 2]
        [--proxy-cmd "toy=python toy_proxy_server.py --port {port} --prefiller-ports {prefill_port} ..."]
        [--proxy NAME=URL [--proxy-pid NAME=PID]]

1. Added latency: open-loop streams of streaming completions at each ``--rates`` value, in alternating runs of
   every path against one prefill and one decode emulator: the decode emulator directly; the router's deflect
   path (``always_deflect``); the client doing vLLM's two hops itself (P, then D with P's params); the
   router's two-hop path (``round_robin``); and any other proxy, started by this script from ``--proxy-cmd
   NAME=COMMAND`` once the emulators are up (``{port}``, ``{prefill_port}``, ``{decode_port}`` filled in), or
   already running at ``--proxy NAME=URL``. Added latency = a path's end-to-end P50/P99 minus its direct
   counterpart's. This script never contains a proxy's code: to compare with vLLM's toy P/D proxy
   (``tests/v1/kv_connector/nixl_integration/toy_proxy_server.py``), give the command that runs your copy.
   Each row also gives the CPU milliseconds per answered request of the proxy under test (from
   ``/proc/PID/stat``; the routers, ``--proxy-cmd`` proxies and ``--proxy-pid`` ones) and of this load
   generator, and the load generator's send lag P99 (how late it sent against its Poisson schedule: when that
   grows, the load generator, not the path, is the limit).
2. Policy decision time: ``Router.decide`` (view build included) in process, for every registered policy,
   over a cluster view with load on it; P50/P99/max in microseconds. Also the live router's own decision and
   overhead percentiles from ``GET /stats``.

The emulators run at a tiny time scale (``--time-scale``, default 0.001: a 10 ms step takes 10 us) so the
model adds almost nothing. Router, emulators and this load generator share the machine's cores, so the
numbers include their contention; CPU per request is the steadier measure on a shared machine. Process
output goes to log files in a fresh temporary folder (printed), never to pipes nobody reads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from deflectlab.serving.procs import Processes, free_ports, wait_http

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds used so far by process ``pid`` (Linux ``/proc``; this process when None)."""
    if pid is None:
        return time.process_time()
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15 of proc(5))


class Run:
    """One timed run of one path: end-to-end and first-byte seconds, failures, the load generator's send lag
    (actual minus scheduled send time, s), and CPU seconds used by the proxy under test and by this client."""

    def __init__(self, e2e: list[float], ttfb: list[float], failures: int, lag: list[float]) -> None:
        self.e2e, self.ttfb, self.lag = np.array(e2e), np.array(ttfb), np.array(lag)
        self.failures = failures
        self.cpu_proxy = self.cpu_client = float("nan")


async def _load(rate: float, duration_s: float, call) -> Run:
    """Open-loop Poisson arrivals at ``rate`` for ``duration_s``."""
    rng = random.Random(1)
    e2e, ttfb, lag = [], [], []
    failures = 0
    tasks = []

    async def one() -> None:
        nonlocal failures
        t0 = time.perf_counter()
        try:
            t_first = await call()
        except Exception:  # noqa: BLE001 - counted
            failures += 1
            return
        e2e.append(time.perf_counter() - t0)
        ttfb.append(t_first - t0)

    t_start = time.perf_counter()
    t_next = t_start
    while t_next - t_start < duration_s:
        delay = t_next - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lag.append(time.perf_counter() - t_next)
        tasks.append(asyncio.ensure_future(one()))
        t_next += rng.expovariate(rate)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    return Run(e2e, ttfb, failures, lag)


async def _stream(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
        t_first = 0.0
        async for _ in r.content.iter_any():
            if not t_first:
                t_first = time.perf_counter()
        return t_first


async def _two_hops(session: aiohttp.ClientSession, p_url: str, d_url: str, body: dict) -> float:
    p_body = dict(body, stream=False, max_tokens=1, kv_transfer_params={
        "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None, "remote_block_ids": None,
        "remote_host": None, "remote_port": None})
    p_body.pop("stream_options", None)
    async with session.post(p_url, json=p_body) as r:
        kvp = (await r.json())["kv_transfer_params"]
    return await _stream(session, d_url, json.dumps(dict(body, kv_transfer_params=kvp)).encode())


def _pct(x: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(x, 50)), float(np.percentile(x, 99))


def bench_decisions(n: int = 20000, shapes: tuple[tuple[int, int], ...] = ((2, 2),),
                    only: tuple[str, ...] = ()) -> dict:
    """``Router.decide`` per policy, over a loaded view of each ``P``x``D`` shape (no network); ``only``: just
    the policies whose row names start with one of these."""
    from deflectlab.policies.registry import available
    from deflectlab.serving.router import RoutedRequest, Router
    from deflectlab.serving.router_config import RouterConfig

    out = {}
    trained = Path(__file__).resolve().parents[1] / "experiments" / "trained"
    specs = [(n, n) for n in available() if n != "learned"]
    specs += [("learned (onnxruntime)", f"learned:path={trained}"),  # the exported policy of experiments/trained
              ("learned (numpy)", f"learned:path={trained},backend=numpy")]
    specs = [(name, spec) for name, spec in specs if not only or name.startswith(only)]
    for P, D in shapes:
        rng = random.Random(0)
        print(f"\npolicy decision time, Router.decide with view build, {P}P{D}D, {n} decisions each (us):")
        print(f"  {'policy':<22}{'p50':>8}{'p99':>8}{'max':>9}")
        hosts = [("127.0.0.1", 1 + i) for i in range(P + D)]
        for name, spec in specs:
            try:
                router = Router(RouterConfig(hosts[:P], hosts[P:], spec))
                for inst in router.prefill:
                    inst.inflight, inst.inflight_tokens, inst.held, inst.held_tokens = 5, 12000, 2, 4000
                    inst.kv_usage = 0.2
                for inst in router.decode:
                    inst.decoding, inst.decoding_ctx, inst.defl_waiting, inst.defl_waiting_tokens = 40, 90000, 1, 2000
                    inst.active, inst.scraped_running, inst.kv_usage = 42, 41, 0.3
                router.decide(RoutedRequest(-1, 0.0, 100))  # a policy that refuses the shape says so here
            except ValueError as e:  # a policy that needs parameters (e.g. a file), or refuses this shape
                print(f"  {name:<22} skipped: {e}")
                continue
            times = np.empty(n)
            clock = time.perf_counter
            for i in range(n):
                req = RoutedRequest(i, i * 0.01, rng.randint(50, 8000))
                t0 = clock()
                router.decide(req)
                times[i] = clock() - t0
            us = times * 1e6
            p50, p99 = np.percentile(us, [50, 99])
            out[f"{name} {P}P{D}D" if shapes != ((2, 2),) else name] = {
                "p50_us": float(p50), "p99_us": float(p99), "max_us": float(us.max())}
            print(f"  {name:<22}{p50:>8.1f}{p99:>8.1f}{us.max():>9.1f}")
    return out


def _paths(a: argparse.Namespace, ports: dict[str, int]) -> dict[str, str]:
    """The completions URL of each started server."""
    url = {k: f"http://127.0.0.1:{v}/v1/completions" for k, v in ports.items()}
    return url


async def _warm(s: aiohttp.ClientSession, calls: dict[str, Any], n: int) -> None:
    for _ in range(n):  # warm connections and code paths
        for call in calls.values():
            await call(s)


async def _timed(rate: float, a: argparse.Namespace, call, pid: int | None) -> Run:
    """One run, with the CPU time of the proxy process ``pid`` (if any) and of this client around it."""
    p0, c0 = cpu_seconds(pid) if pid else float("nan"), cpu_seconds(None)
    run = await _load(rate, a.duration, call)
    run.cpu_proxy = cpu_seconds(pid) - p0 if pid else float("nan")
    run.cpu_client = cpu_seconds(None) - c0
    return run


async def _run_rate(a: argparse.Namespace, rate: float, url: dict[str, str], proxies: dict[str, str],
                    pids: dict[str, int]) -> dict[str, list[Run]]:
    """Alternating runs at ``rate`` of every path; returns {path: [Run, ...]}."""
    body = {"prompt": list(range(a.prompt_tokens)), "max_tokens": a.max_tokens, "stream": True}
    raw = json.dumps(body).encode()
    calls = {
        "direct decode": lambda s: _stream(s, url["decode"], raw),
        "router deflect path": lambda s: _stream(s, url["router_deflect"], raw),
    }
    if not a.skip_prefill_path:
        calls["direct two hops"] = lambda s: _two_hops(s, url["prefill"], url["decode"], body)
        calls["router two-hop path"] = lambda s: _stream(s, url["router_prefill"], raw)
        for name, purl in proxies.items():
            calls[f"proxy {name}"] = (lambda u: lambda s: _stream(s, u, raw))(purl.rstrip("/") + "/v1/completions")
    runs: dict[str, list] = {k: [] for k in calls}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        await _warm(s, calls, 20)
        for _ in range(a.repeats):
            for name, call in calls.items():
                runs[name].append(await _timed(rate, a, lambda c=call: c(s), pids.get(name)))
    return runs


def summarize(runs: list[Run]) -> dict[str, Any]:
    """One path's runs merged: n, failures, end-to-end p50/p99 (ms), the load generator's send lag p99 (ms),
    and CPU ms per answered request of the proxy under test and of the load generator."""
    e2e = np.concatenate([r.e2e for r in runs]) * 1e3
    lag = np.concatenate([r.lag for r in runs]) * 1e3
    n = int(len(e2e))
    p50, p99 = _pct(e2e) if n else (float("nan"),) * 2
    per_req = 1e3 / n if n else float("nan")
    return {"n": n, "failed": sum(r.failures for r in runs), "p50_ms": p50, "p99_ms": p99,
            "send_lag_p99_ms": float(np.percentile(lag, 99)) if len(lag) else float("nan"),
            "proxy_cpu_ms_per_req": sum(r.cpu_proxy for r in runs) * per_req,
            "client_cpu_ms_per_req": sum(r.cpu_client for r in runs) * per_req}


_HEAD = (f"  {'path':<26}{'n':>7}{'failed':>7}{'p50':>10}{'p99':>10}{'added p50':>11}{'added p99':>11}"
         f"{'proxy cpu':>11}{'client cpu':>11}{'send lag p99':>14}")


def _table(rate: float, runs: dict[str, list[Run]]) -> dict:
    """Added p50/p99 of each proxied path over its direct counterpart, end to end, in ms."""
    out: dict[str, Any] = {k: summarize(v) for k, v in runs.items()}
    base = {"router deflect path": "direct decode"}
    base |= {k: "direct two hops" for k in out if k.startswith(("router two-hop", "proxy "))}
    print(f"\n{rate:g} req/s, end to end (send to last byte), ms; added = path minus its direct call; cpu = CPU ms "
          "per request of the proxy under test and of this load generator; send lag = how late the load generator "
          "sent (a large one means the load generator, not the path, was the limit)")
    print(_HEAD)
    nan = float("nan")
    for name, row in out.items():
        if name in base and out[base[name]]["n"] and row["n"]:
            row |= {"added_p50_ms": row["p50_ms"] - out[base[name]]["p50_ms"],
                    "added_p99_ms": row["p99_ms"] - out[base[name]]["p99_ms"]}
        print(f"  {name:<26}{row['n']:>7}{row['failed']:>7} {row['p50_ms']:>9.3f} {row['p99_ms']:>9.3f}"
              f" {row.get('added_p50_ms', nan):>10.3f} {row.get('added_p99_ms', nan):>10.3f}"
              f" {row['proxy_cpu_ms_per_req']:>10.3f} {row['client_cpu_ms_per_req']:>10.3f}"
              f" {row['send_lag_p99_ms']:>13.3f}")
    r = out.get("router two-hop path", {})
    for name, row in list(out.items()):
        if name.startswith("proxy ") and "added_p50_ms" in row and row["added_p50_ms"] > 0 and "added_p50_ms" in r:
            ratio = (r["added_p50_ms"] / row["added_p50_ms"], r["added_p99_ms"] / row["added_p99_ms"])
            out[f"ratio vs {name}"] = {"p50": ratio[0], "p99": ratio[1]}
            print(f"  router two-hop added / {name} added: p50 {ratio[0]:.2f}x, p99 {ratio[1]:.2f}x")
    return out


def _proxy_arg(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith("http"):
        raise argparse.ArgumentTypeError(f"--proxy wants NAME=http://host:port, got {text!r}")
    return name, url


def _cmd_arg(text: str) -> tuple[str, str]:
    name, sep, cmd = text.partition("=")
    if not sep or not name or "{port}" not in cmd:
        raise argparse.ArgumentTypeError(f"--proxy-cmd wants NAME=COMMAND with {{port}} in COMMAND (and "
                                         f"{{prefill_port}}, {{decode_port}} where it takes them), got {text!r}")
    return name, cmd


def _pid_arg(text: str) -> tuple[str, int]:
    name, sep, pid = text.partition("=")
    if not sep or not name or not pid.isdigit():
        raise argparse.ArgumentTypeError(f"--proxy-pid wants NAME=PID (the process serving --proxy NAME), got {text!r}")
    return name, int(pid)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", "--rate", type=float, nargs="+", default=[100.0],
                    help="requests per second (open loop, Poisson), one table each")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of every path per rate")
    ap.add_argument("--max-tokens", type=int, default=8, help="output tokens per request")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--time-scale", type=float, default=0.001, help="emulators' wall seconds per model second")
    ap.add_argument("--prefill-port", type=int, default=0, help="prefill emulator's port (0: a free one)")
    ap.add_argument("--decode-port", type=int, default=0, help="decode emulator's port (0: a free one)")
    ap.add_argument("--proxy", type=_proxy_arg, action="append", default=[],
                    help="NAME=URL of another P/D proxy to time beside the router, started by you in front of "
                         "--prefill-port and --decode-port (e.g. vLLM's toy_proxy_server.py); repeatable")
    ap.add_argument("--proxy-cmd", type=_cmd_arg, action="append", default=[],
                    help="NAME=COMMAND that starts another P/D proxy, run by this script after the emulators are up "
                         "and stopped at the end; {port}, {prefill_port}, {decode_port} are filled in (e.g. "
                         "toy='python toy_proxy_server.py --port {port} --prefiller-ports {prefill_port} "
                         "--decoder-ports {decode_port}'); its CPU time is reported; repeatable")
    ap.add_argument("--proxy-pid", type=_pid_arg, action="append", default=[],
                    help="NAME=PID of the process serving --proxy NAME, to report its CPU time per request")
    ap.add_argument("--router-loop", choices=["asyncio", "uvloop", "auto"], default="asyncio",
                    help="the routers' --event-loop (the router's default is asyncio; auto: uvloop when installed)")
    ap.add_argument("--client-loop", choices=["asyncio", "uvloop", "auto"], default="auto",
                    help="this load generator's event loop (auto: uvloop when installed)")
    ap.add_argument("--skip-prefill-path", action="store_true")
    ap.add_argument("--decisions", type=int, default=20000, help="decisions timed per policy in process")
    ap.add_argument("--decision-shapes", default="2x2",
                    help="cluster shapes PxD (comma-separated) of the decision-time part")
    ap.add_argument("--decisions-only", nargs="*", default=None, metavar="POLICY",
                    help="run only the decision-time part (no emulators), for these policies (row-name prefixes, "
                         "e.g. 'learned'; none given: every policy)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return ap


def _start_proxy(procs: Processes, name: str, cmd: str, ports: dict[str, int], log_dir: Path) -> tuple[str, int]:
    """Start ``cmd`` (a ``--proxy-cmd``) on a free port; its (URL, pid) once it accepts connections."""
    port = free_ports(1)[0]
    argv = shlex.split(cmd.format(port=port, prefill_port=ports["prefill"], decode_port=ports["decode"]))
    out = open(log_dir / f"proxy-{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    try:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    except OSError as e:
        raise SystemExit(f"--proxy-cmd {name}: cannot start {argv[0]!r}: {e}") from None
    procs.procs.append(proc)  # stopped with the emulators and routers
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"--proxy-cmd {name} exited with {proc.returncode}; its log: "
                             f"{(log_dir / f'proxy-{name}.log').read_text(errors='replace')[-1500:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"http://127.0.0.1:{port}", proc.pid
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"--proxy-cmd {name} did not listen on port {port} within 30 s") from None
            time.sleep(0.1)


def _client_loop(choice: str) -> str:
    """Install this load generator's event loop policy (auto: uvloop when installed); the loop chosen."""
    if choice == "asyncio":
        return choice
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("--client-loop uvloop needs the uvloop package: pip install uvloop") from None
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _up(url: str, proc: Any, log_dir: Path) -> None:
    """Wait for ``url``; if its process dies first, fail with the process's log."""
    try:
        wait_http(url, proc=proc)
    except RuntimeError as e:
        logs = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}"
                         for f in sorted(log_dir.glob("*.log")))
        raise SystemExit(f"{e}\n{logs}") from None


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    from deflectlab.scripts.cmd_dagger import parse_shapes

    try:
        shapes = tuple(parse_shapes(a.decision_shapes))
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"--decision-shapes: {e}") from None
    if a.decisions_only is not None:
        res = {"decisions": bench_decisions(a.decisions, shapes, tuple(a.decisions_only))}
        if a.json:
            a.json.write_text(json.dumps(res, indent=2, default=float))
        return 0
    if a.duration <= 0 or a.repeats < 1 or any(r <= 0 for r in a.rates):
        raise SystemExit("--duration and --rates must be > 0 and --repeats >= 1")
    names = [n for n, _ in a.proxy] + [n for n, _ in a.proxy_cmd]
    if len(set(names)) != len(names):
        raise SystemExit(f"--proxy and --proxy-cmd names must differ, got {names}")
    unknown = {n for n, _ in a.proxy_pid} - {n for n, _ in a.proxy}
    if unknown:
        raise SystemExit(f"--proxy-pid names no --proxy: {', '.join(sorted(unknown))}")
    results: dict = {"args": vars(a) | {"json": str(a.json)}, "rates": {}}
    free = iter(free_ports(4))
    ports = {"prefill": a.prefill_port or next(free), "decode": a.decode_port or next(free),
             "router_deflect": next(free), "router_prefill": next(free)}
    log_dir = Path(tempfile.mkdtemp(prefix="bench_router-"))  # files, not pipes nobody reads (a full pipe stalls)
    with Processes(log_dir) as procs:
        p = procs.emulator(ports["prefill"], "prefill", a.time_scale)
        d = procs.emulator(ports["decode"], "decode", a.time_scale)
        _up(f"http://127.0.0.1:{ports['prefill']}/health", p, log_dir)
        _up(f"http://127.0.0.1:{ports['decode']}/health", d, log_dir)
        common = ["--time-scale", str(a.time_scale), "--event-loop", a.router_loop]
        r1 = procs.router(ports["router_deflect"], [ports["prefill"]], [ports["decode"]], "always_deflect", *common)
        r2 = procs.router(ports["router_prefill"], [ports["prefill"]], [ports["decode"]], "round_robin", *common)
        _up(f"http://127.0.0.1:{ports['router_deflect']}/healthcheck", r1, log_dir)
        _up(f"http://127.0.0.1:{ports['router_prefill']}/healthcheck", r2, log_dir)
        url = _paths(a, ports)
        proxies, pids = dict(a.proxy), {f"proxy {n}": pid for n, pid in a.proxy_pid}
        for name, cmd in a.proxy_cmd:
            proxies[name], pids[f"proxy {name}"] = _start_proxy(procs, name, cmd, ports, log_dir)
        print(f"{a.prompt_tokens}-token prompts, {a.max_tokens} streamed tokens, emulators at time scale "
              f"{a.time_scale:g} (prefill :{ports['prefill']}, decode :{ports['decode']}), {a.repeats} alternating "
              f"runs of {a.duration:g} s per path and rate; routers' event loop {a.router_loop}, load generator's "
              f"{_client_loop(a.client_loop)}; process logs in {log_dir}", flush=True)
        if not proxies:
            print("no --proxy given: the router is timed against direct calls only; to compare with vLLM's toy "
                  "proxy, start it in front of --prefill-port/--decode-port and pass --proxy toy=URL")
        for rate in a.rates:
            pids |= {"router deflect path": r1.pid, "router two-hop path": r2.pid}
            runs = asyncio.run(_run_rate(a, rate, url, proxies, pids))
            results["rates"][f"{rate:g}"] = _table(rate, runs)
        for name, port in (("always_deflect", ports["router_deflect"]), ("round_robin", ports["router_prefill"])):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
                st = json.load(r)
            results[f"router_stats_{name}"] = st
            dec, ov = st["decision_us"], st["overhead_us"]
            print(f"\nlive router ({name}): decision p50 {dec.get('p50', float('nan')):.1f} us, p99 "
                  f"{dec.get('p99', float('nan')):.1f} us; body read to upstream send p50 "
                  f"{ov.get('p50', float('nan')):.1f} us, p99 {ov.get('p99', float('nan')):.1f} us; "
                  f"outcomes {st['requests']}, in flight {st['requests_in_flight']}")
    results["decisions"] = bench_decisions(a.decisions, shapes)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
