"""Router overhead and policy decision time, measured on loopback. Prints numbers; asserts nothing.

    python scripts/bench_router.py [--rates 100 500] [--duration 5] [--repeats 2] [--decisions 0]
        [--upstream lean|emulator] [--client lean|aiohttp] [--token-gap-ms 0] [--router-profile DIR]
        [--proxy-cmd "toy=python toy_proxy_server.py --port {port} --prefiller-ports {prefill_port} ..."]
        [--proxy NAME=URL [--proxy-pid NAME=PID]]

1. Added latency: open-loop streams of streaming completions at each ``--rates`` value, in alternating runs of
   every path against one prefill and one decode upstream: the decode upstream directly; the router's deflect
   path (``always_deflect``); the client doing vLLM's two hops itself (P, then D with P's params); the
   router's two-hop path (``round_robin``); and any other proxy, started by this script from ``--proxy-cmd
   NAME=COMMAND`` once the upstreams are up (``{port}``, ``{prefill_port}``, ``{decode_port}`` filled in), or
   already running at ``--proxy NAME=URL``. Added latency = a path's end-to-end P50/P99 minus its direct
   counterpart's. This script never contains a proxy's code: to compare with vLLM's toy P/D proxy
   (``tests/v1/kv_connector/nixl_integration/toy_proxy_server.py``), give the command that runs your copy.
   Each row also gives the CPU milliseconds per answered request (from ``/proc/PID/stat``) of the proxy under
   test (the routers, ``--proxy-cmd`` proxies and ``--proxy-pid`` ones), of both upstreams and of this load
   generator; the proxy's utilisation (CPU seconds per wall second: 1.0 is one core busy); and the load
   generator's send lag P99 (how late it sent against its Poisson schedule: when that grows, the load
   generator, not the path, is the limit). The machine's load average is printed before and after each rate.
2. Policy decision time: ``Router.decide`` (view build included) in process, for every registered policy,
   over a cluster view with load on it; P50/P99/max in microseconds (``--decisions 0`` skips it). Also the
   live router's own decision and overhead percentiles from ``GET /stats``.

Upstreams and load generator are lean by default (``scripts/lean_http.py``): stand-ins that answer at once
and a client on raw keep-alive connections, so that hundreds of requests per second measure the router, not
them. ``--upstream emulator`` uses the engine emulators at ``--time-scale`` (default 0.001: a 10 ms step
takes 10 us), ``--client aiohttp`` an aiohttp client. Routers, upstreams and this load generator share the
machine's cores (the header line says how many), so the numbers include their contention; CPU per request
is the steadier measure on a shared machine. ``--router-profile DIR`` runs the routers under cProfile and
prints where their busy time went. Process output goes to log files in a fresh temporary folder (printed),
never to pipes nobody reads.
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

from deflectlab.scripts.lean_http import LeanClient, request_bytes
from deflectlab.serving.procs import Processes, free_ports, wait_http
from deflectlab.serving.protocol import dumps, prefill_hop_body, with_kv_params

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
    (actual minus scheduled send time, s), CPU seconds used by the proxy under test, by the upstreams and by
    this client, and the run's wall seconds (sending plus draining)."""

    def __init__(self, e2e: list[float], ttfb: list[float], failures: int, lag: list[float]) -> None:
        self.e2e, self.ttfb, self.lag = np.array(e2e), np.array(ttfb), np.array(lag)
        self.failures = failures
        self.cpu_proxy = self.cpu_client = self.cpu_upstream = self.wall = float("nan")


async def _load(rate: float, duration_s: float, call) -> Run:
    """Open-loop Poisson arrivals at ``rate`` for ``duration_s``; ``call()`` returns (first byte, end) times."""
    rng = random.Random(1)
    e2e, ttfb, lag = [], [], []
    failures = 0
    tasks = []

    async def one() -> None:
        nonlocal failures
        t0 = time.perf_counter()
        try:
            t_first, t_end = await call()
        except Exception:  # noqa: BLE001 - counted
            failures += 1
            return
        e2e.append(t_end - t0)
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
    run = Run(e2e, ttfb, failures, lag)
    run.wall = time.perf_counter() - t_start
    return run


async def _stream(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, float]:
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")
        t_first = 0.0
        async for _ in r.content.iter_any():
            if not t_first:
                t_first = time.perf_counter()
        return t_first, time.perf_counter()


async def _two_hops(session: aiohttp.ClientSession, p_url: str, d_url: str, body: dict) -> tuple[float, float]:
    async with session.post(p_url, data=dumps(prefill_hop_body(body)),
                            headers={"Content-Type": "application/json"}) as r:
        kvp = (await r.json())["kv_transfer_params"]
    return await _stream(session, d_url, json.dumps(dict(body, kv_transfer_params=kvp)).encode())


async def _lean_stream(client: LeanClient, addr: tuple[str, int], data: bytes) -> tuple[float, float]:
    r = await client.request(addr, data)
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}")
    return r.first_at, r.end_at


async def _lean_two_hops(client: LeanClient, p_addr: tuple[str, int], d_addr: tuple[str, int], p_data: bytes,
                         raw: bytes) -> tuple[float, float]:
    """vLLM's two hops done by the client: the prefill hop, then the body plus P's params to D."""
    r = await client.request(p_addr, p_data, keep_body=True)
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status} on the prefill hop")
    kvp = json.loads(r.body)["kv_transfer_params"]
    body = with_kv_params(raw, kvp)
    return await _lean_stream(client, d_addr, request_bytes(*d_addr, "/v1/completions", body))


def _pct(x: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(x, 50)), float(np.percentile(x, 99))


def machine_stalls(seconds: float = 1.0, over_us: float = 15.0) -> dict:
    """How often this machine stops a busy Python thread: gaps of more than ``over_us`` between consecutive clock
    reads over ``seconds`` (timer interrupts, a hypervisor, other processes). A decision of ``T`` seconds meets
    one with probability about ``rate * T``; once that passes 1 %, a p99 is the p50 plus a stall."""
    clock = time.perf_counter
    gaps, starts = [], []
    t = last = clock()
    end = t + seconds
    while t < end:
        t = clock()
        if t - last > over_us * 1e-6:
            gaps.append(t - last)
            starts.append(t)
        last = t
    us = np.array(gaps or [0.0]) * 1e6
    return {"per_s": len(gaps) / seconds, "over_us": over_us, "p50_us": float(np.median(us)),
            "p90_us": float(np.percentile(us, 90))}


def bench_decisions(n: int = 20000, shapes: tuple[tuple[int, int], ...] = ((2, 2),),
                    only: tuple[str, ...] = (), trained: Path | None = None) -> dict:
    """``Router.decide`` per policy, over a loaded view of each ``P``x``D`` shape (no network); ``only``: just
    the policies whose row names start with one of these; ``trained``: the exported policy of the ``learned``
    rows (default ``experiments/trained``)."""
    from deflectlab.policies.registry import available
    from deflectlab.serving.router import RoutedRequest, Router
    from deflectlab.serving.router_config import RouterConfig

    out = {}
    trained = trained or Path(__file__).resolve().parents[1] / "experiments" / "trained"
    specs = [(n, n) for n in available() if n != "learned"]
    specs += [("learned (onnxruntime)", f"learned:path={trained}"),  # the exported policy of experiments/trained
              ("learned (numpy)", f"learned:path={trained},backend=numpy")]
    specs = [(name, spec) for name, spec in specs if not only or name.startswith(only)]
    st = out["machine stalls"] = machine_stalls()
    print(f"\nthis machine stops a busy thread {st['per_s']:.0f} times a second for over {st['over_us']:.0f} us "
          f"(median {st['p50_us']:.0f} us, p90 {st['p90_us']:.0f} us): a decision of T us meets a stall with "
          f"probability about {st['per_s'] * 1e-6:.1e} x T, so past {1e4 / max(st['per_s'], 1e-9):.0f} us a "
          "decision's p99 is its p50 plus a stall")
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
            if name.startswith("learned"):
                net = _network_alone(router, n)
                out[f"{name} network alone {P}P{D}D"] = net
                print(f"  {'  network alone':<22}{net['p50_us']:>8.1f}{net['p99_us']:>8.1f}{net['max_us']:>9.1f}")
    return out


def _network_alone(router: Any, n: int) -> dict:
    """An exported policy's ``act`` (the observation and mask copied in, the network run, the greedy action) on
    one fixed observation of the router's view, ``n`` times: the network's share of a decision."""
    from deflectlab.envs.features import FeatureBuilder
    from deflectlab.serving.router import RoutedRequest

    pol = router.policy
    fb = FeatureBuilder(pol.manifest["feature_schema"]["version"])
    view = router.views.view(0.0, 1.0, router.prefill, router.decode, router.recent)
    obs = fb.build(view, RoutedRequest(0, 0.0, 3000))
    mask = fb.mask
    times = np.empty(n)
    clock = time.perf_counter
    for i in range(n):
        t0 = clock()
        pol.act(obs, mask)
        times[i] = clock() - t0
    us = times * 1e6
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)), "max_us": float(us.max())}


def _paths(a: argparse.Namespace, ports: dict[str, int]) -> dict[str, str]:
    """The completions URL of each started server."""
    url = {k: f"http://127.0.0.1:{v}/v1/completions" for k, v in ports.items()}
    return url


async def _warm(calls: dict[str, Any], n: int) -> None:
    for _ in range(n):  # warm connections and code paths
        for call in calls.values():
            await call()


async def _timed(rate: float, a: argparse.Namespace, call, pid: int | None, upstream_pids: list[int]) -> Run:
    """One run, with the CPU time of the proxy process ``pid`` (if any), of the upstreams and of this client."""
    p0, c0 = cpu_seconds(pid) if pid else float("nan"), cpu_seconds(None)
    u0 = sum(cpu_seconds(u) for u in upstream_pids)
    run = await _load(rate, a.duration, call)
    run.cpu_proxy = cpu_seconds(pid) - p0 if pid else float("nan")
    run.cpu_client = cpu_seconds(None) - c0
    run.cpu_upstream = sum(cpu_seconds(u) for u in upstream_pids) - u0
    return run


def _calls(a: argparse.Namespace, url: dict[str, str], proxies: dict[str, str], client: Any) -> dict[str, Any]:
    """path name -> a no-argument coroutine function doing one request on it with ``client`` (a LeanClient or
    an aiohttp session) that returns its (first byte, end) times."""
    body = {"prompt": list(range(a.prompt_tokens)), "max_tokens": a.max_tokens, "stream": True}
    raw = json.dumps(body).encode()
    urls = {"direct decode": url["decode"], "router deflect path": url["router_deflect"]}
    if not a.skip_prefill_path:
        urls["router two-hop path"] = url["router_prefill"]
        urls |= {f"proxy {name}": purl.rstrip("/") + "/v1/completions" for name, purl in proxies.items()}
    if isinstance(client, LeanClient):
        def addr(u: str) -> tuple[str, int]:
            host, port = u.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
            return host, int(port)

        def lean(u: str) -> Any:
            target, data = addr(u), request_bytes(*addr(u), "/v1/completions", raw)
            return lambda: _lean_stream(client, target, data)

        calls = {name: lean(u) for name, u in urls.items()}
        if not a.skip_prefill_path:
            p_addr, d_addr = addr(url["prefill"]), addr(url["decode"])
            p_data = request_bytes(*p_addr, "/v1/completions", dumps(prefill_hop_body(body)))
            calls["direct two hops"] = lambda: _lean_two_hops(client, p_addr, d_addr, p_data, raw)
    else:
        def plain(u: str) -> Any:
            return lambda: _stream(client, u, raw)

        calls = {name: plain(u) for name, u in urls.items()}
        if not a.skip_prefill_path:
            calls["direct two hops"] = lambda: _two_hops(client, url["prefill"], url["decode"], body)
    order = ["direct decode", "router deflect path", "direct two hops", "router two-hop path"]
    return {k: calls[k] for k in [*(o for o in order if o in calls), *(k for k in calls if k not in order)]}


async def _run_rate(a: argparse.Namespace, rate: float, url: dict[str, str], proxies: dict[str, str],
                    pids: dict[str, int], upstream_pids: list[int]) -> dict[str, list[Run]]:
    """Alternating runs at ``rate`` of every path; returns {path: [Run, ...]}."""
    if a.client == "lean":
        client: Any = LeanClient()
        session = None
    else:
        session = client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                 timeout=aiohttp.ClientTimeout(total=60))
    try:
        calls = _calls(a, url, proxies, client)
        runs: dict[str, list] = {k: [] for k in calls}
        await _warm(calls, 20)
        for _ in range(a.repeats):
            for name, call in calls.items():
                runs[name].append(await _timed(rate, a, call, pids.get(name), upstream_pids))
    finally:
        if session is not None:
            await session.close()
        else:
            client.close()
    return runs


def summarize(runs: list[Run]) -> dict[str, Any]:
    """One path's runs merged: n, failures, end-to-end p50/p99 (ms), the load generator's send lag p99 (ms),
    CPU ms per answered request of the proxy under test, of the upstreams and of the load generator, and the
    proxy's utilisation (its CPU seconds over the runs' wall seconds: the share of one core it used)."""
    e2e = np.concatenate([r.e2e for r in runs]) * 1e3
    lag = np.concatenate([r.lag for r in runs]) * 1e3
    n = int(len(e2e))
    p50, p99 = _pct(e2e) if n else (float("nan"),) * 2
    per_req = 1e3 / n if n else float("nan")
    wall = sum(r.wall for r in runs)
    return {"n": n, "failed": sum(r.failures for r in runs), "p50_ms": p50, "p99_ms": p99,
            "send_lag_p99_ms": float(np.percentile(lag, 99)) if len(lag) else float("nan"),
            "proxy_cpu_ms_per_req": sum(r.cpu_proxy for r in runs) * per_req,
            "proxy_util": sum(r.cpu_proxy for r in runs) / wall if wall > 0 else float("nan"),
            "upstream_cpu_ms_per_req": sum(r.cpu_upstream for r in runs) * per_req,
            "client_cpu_ms_per_req": sum(r.cpu_client for r in runs) * per_req}


_HEAD = (f"  {'path':<26}{'n':>7}{'failed':>7}{'p50':>10}{'p99':>10}{'added p50':>11}{'added p99':>11}"
         f"{'proxy cpu':>11}{'proxy util':>11}{'upstr cpu':>11}{'client cpu':>11}{'send lag p99':>14}")


def _table(rate: float, runs: dict[str, list[Run]]) -> dict:
    """Added p50/p99 of each proxied path over its direct counterpart, end to end, in ms."""
    out: dict[str, Any] = {k: summarize(v) for k, v in runs.items()}
    base = {"router deflect path": "direct decode"}
    base |= {k: "direct two hops" for k in out if k.startswith(("router two-hop", "proxy "))}
    print(f"\n{rate:g} req/s, end to end (send to last byte), ms; added = path minus its direct call; cpu = CPU ms "
          "per request of the proxy under test, of both upstreams together and of this load generator; proxy util = "
          "the proxy's CPU seconds per wall second (1.0 = one core busy); send lag = how late the load generator "
          "sent (a large one means the load generator, not the path, was the limit)")
    print(_HEAD)
    nan = float("nan")
    for name, row in out.items():
        if name in base and out[base[name]]["n"] and row["n"]:
            row |= {"added_p50_ms": row["p50_ms"] - out[base[name]]["p50_ms"],
                    "added_p99_ms": row["p99_ms"] - out[base[name]]["p99_ms"]}
        print(f"  {name:<26}{row['n']:>7}{row['failed']:>7} {row['p50_ms']:>9.3f} {row['p99_ms']:>9.3f}"
              f" {row.get('added_p50_ms', nan):>10.3f} {row.get('added_p99_ms', nan):>10.3f}"
              f" {row['proxy_cpu_ms_per_req']:>10.3f} {row.get('proxy_util', nan):>10.3f}"
              f" {row.get('upstream_cpu_ms_per_req', nan):>10.3f} {row['client_cpu_ms_per_req']:>10.3f}"
              f" {row['send_lag_p99_ms']:>13.3f}")
    r = out.get("router two-hop path", {})
    for name, row in list(out.items()):
        if name.startswith("proxy ") and "added_p50_ms" in row and row["added_p50_ms"] > 0 and "added_p50_ms" in r:
            ratio = (r["added_p50_ms"] / row["added_p50_ms"], r["added_p99_ms"] / row["added_p99_ms"])
            out[f"ratio vs {name}"] = {"p50": ratio[0], "p99": ratio[1]}
            print(f"  router two-hop added / {name} added: p50 {ratio[0]:.2f}x, p99 {ratio[1]:.2f}x")
    return out


#: (group, test on a profile entry's file name and function name), first match wins (``--router-profile``).
_STARTUP_FILES = ("importlib", "/re/_", "typing.py", "/yaml/", "/enum.py", "/attr/", "numpy/", "/abc.py",
                  "dataclasses.py", "inspect.py")
_STARTUP_BUILTINS = ("marshal.loads", "builtins.compile", "_imp.", "set_default_verify_paths", "__build_class__",
                     "io.open_code", "builtins.exec", "builtins.__import__", "'read' of '_io")
_PROFILE_GROUPS: tuple[tuple[str, Any], ...] = (
    ("idle (waiting in epoll)", lambda f, n: f == "~" and "poll' of 'select.epoll" in n),
    ("start-up (imports, compiling)", lambda f, n: any(k in f for k in _STARTUP_FILES) or (
        f == "~" and any(k in n for k in _STARTUP_BUILTINS))),
    ("socket send/recv syscalls", lambda f, n: f == "~" and any(k in n for k in ("'send'", "'recv'", "'connect'",
                                                                                 "'_accept'"))),
    ("router: prefix estimate", lambda f, n: "/serving/prefix_view" in f),
    ("router: own code (serving/, policy, view)", lambda f, n: any(k in f for k in ("/serving/", "/policies/",
                                                                                       "/envs/"))),
    ("aiohttp server (request parsing, responses)", lambda f, n: "aiohttp/web" in f),
    ("aiohttp client (upstream requests, streams)", lambda f, n: "aiohttp/" in f),
    ("asyncio event loop", lambda f, n: "asyncio/" in f or "selectors" in f),
    ("prometheus_client", lambda f, n: "prometheus_client" in f),
    ("json", lambda f, n: "/json/" in f or (f == "~" and "json" in n)),
)


def _group(fname: str, name: str) -> str | None:
    return next((g for g, match in _PROFILE_GROUPS if match(fname, name)), None)


def profile_groups(path: Path | str) -> dict[str, float]:
    """A cProfile file's own time (``tottime``) summed by :data:`_PROFILE_GROUPS`, seconds. A built-in
    function no group claims (``isinstance``, ``len``, a lock) counts for its callers' groups, each the time
    spent in it on their calls; what is left is ``other``."""
    import pstats

    out: dict[str, float] = {}
    for (fname, _line, name), (_cc, _nc, tt, _ct, callers) in pstats.Stats(str(path)).stats.items():
        group = _group(fname, name)
        if group is None and fname == "~" and callers:
            for (cf, _cl, cn), caller_stats in callers.items():
                g = _group(cf, cn) or "other"
                out[g] = out.get(g, 0.0) + caller_stats[2]
            continue
        out[group or "other"] = out.get(group or "other", 0.0) + tt
    return out


def _print_profiles(directory: Path, results: dict) -> None:
    """Where each profiled router's busy time went, as shares of its busy time (idle and start-up left out);
    with the run's CPU ms per request from ``/proc``, each share in ms per request."""
    for policy, path_name in (("always_deflect", "router deflect path"), ("round_robin", "router two-hop path")):
        f = directory / f"router-{policy}.prof"
        if not f.exists():
            continue
        groups = profile_groups(f)
        busy = {k: v for k, v in groups.items() if not k.startswith(("idle", "start-up"))}
        total = sum(busy.values())
        rows = [r for rate in results["rates"].values() for k, r in rate.items() if k == path_name]
        cpu = float(np.mean([r["proxy_cpu_ms_per_req"] for r in rows])) if rows else float("nan")
        print(f"\nrouter {policy} under cProfile ({f}): share of its busy time, and that share of the "
              f"{cpu:.3f} CPU ms per request measured under the profiler")
        for k, v in sorted(busy.items(), key=lambda kv: -kv[1]):
            print(f"  {k:<46}{100 * v / total:6.1f} %{cpu * v / total:9.3f} ms")
        results[f"profile_{policy}"] = {k: v / total for k, v in busy.items()}


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
    ap.add_argument("--upstream", choices=["lean", "emulator"], default="lean",
                    help="upstreams: lean stand-ins that answer at once (scripts/lean_http.py; light enough for "
                         "hundreds of req/s) or the engine emulators (deflectlab emulate, at --time-scale)")
    ap.add_argument("--token-gap-ms", type=float, default=0.0,
                    help="lean decode stand-in: wall ms between streamed events (0: the next loop turn)")
    ap.add_argument("--client", choices=["lean", "aiohttp"], default="lean",
                    help="load generator: raw asyncio keep-alive connections (scripts/lean_http.py) or aiohttp")
    ap.add_argument("--router-profile", type=Path, default=None,
                    help="run the routers under cProfile and write DIR/router-<policy>.prof when they stop")
    ap.add_argument("--skip-prefill-path", action="store_true")
    ap.add_argument("--decisions", type=int, default=20000, help="decisions timed per policy in process (0: skip)")
    ap.add_argument("--trained", type=Path, default=None, metavar="DIR",
                    help="the exported policy of the 'learned' decision rows (default: experiments/trained)")
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


def _start(a: argparse.Namespace, procs: Processes, ports: dict[str, int], log_dir: Path) -> tuple[Any, Any, list]:
    """Start the two upstreams (lean stand-ins or emulators) and the two routers; (deflect router, two-hop
    router, upstream processes) once all answer."""
    if a.upstream == "lean":
        gap = ["--token-gap-ms", str(a.token_gap_ms)]
        up = [procs.start(["--role", role, "--port", str(ports[role]), *gap], f"lean-{role}",
                          module="deflectlab.scripts.lean_http") for role in ("prefill", "decode")]
    else:
        up = [procs.emulator(ports[role], role, a.time_scale) for role in ("prefill", "decode")]
    for role, proc in zip(("prefill", "decode"), up):
        _up(f"http://127.0.0.1:{ports[role]}/health", proc, log_dir)
    common = ["--time-scale", str(a.time_scale), "--event-loop", a.router_loop]
    if a.router_profile is not None:
        a.router_profile.mkdir(parents=True, exist_ok=True)

    def prof(pol: str) -> tuple[str, ...]:
        return () if a.router_profile is None else (
            "-m", "cProfile", "-o", str(a.router_profile.resolve() / f"router-{pol}.prof"))

    r1 = procs.router(ports["router_deflect"], [ports["prefill"]], [ports["decode"]], "always_deflect", *common,
                      python_args=prof("always_deflect"))
    r2 = procs.router(ports["router_prefill"], [ports["prefill"]], [ports["decode"]], "round_robin", *common,
                      python_args=prof("round_robin"))
    _up(f"http://127.0.0.1:{ports['router_deflect']}/healthcheck", r1, log_dir)
    _up(f"http://127.0.0.1:{ports['router_prefill']}/healthcheck", r2, log_dir)
    return r1, r2, up


def _live_stats(ports: dict[str, int], results: dict) -> None:
    for name, port in (("always_deflect", ports["router_deflect"]), ("round_robin", ports["router_prefill"])):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
            st = json.load(r)
        results[f"router_stats_{name}"] = st
        dec, ov = st["decision_us"], st["overhead_us"]
        print(f"\nlive router ({name}): decision p50 {dec.get('p50', float('nan')):.1f} us, p99 "
              f"{dec.get('p99', float('nan')):.1f} us; body read to upstream send p50 "
              f"{ov.get('p50', float('nan')):.1f} us, p99 {ov.get('p99', float('nan')):.1f} us; "
              f"outcomes {st['requests']}, in flight {st['requests_in_flight']}")


def _check(a: argparse.Namespace) -> None:
    if a.duration <= 0 or a.repeats < 1 or any(r <= 0 for r in a.rates):
        raise SystemExit("--duration and --rates must be > 0 and --repeats >= 1")
    if a.token_gap_ms < 0:
        raise SystemExit("--token-gap-ms must be >= 0")
    names = [n for n, _ in a.proxy] + [n for n, _ in a.proxy_cmd]
    if len(set(names)) != len(names):
        raise SystemExit(f"--proxy and --proxy-cmd names must differ, got {names}")
    unknown = {n for n, _ in a.proxy_pid} - {n for n, _ in a.proxy}
    if unknown:
        raise SystemExit(f"--proxy-pid names no --proxy: {', '.join(sorted(unknown))}")


def _loadavg() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{cores} cores (load average {load}), shared by the routers, the upstreams and this load generator"


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    from deflectlab.scripts.cmd_dagger import parse_shapes

    try:
        shapes = tuple(parse_shapes(a.decision_shapes))
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"--decision-shapes: {e}") from None
    if a.decisions_only is not None:
        res = {"decisions": bench_decisions(a.decisions, shapes, tuple(a.decisions_only), a.trained)}
        if a.json:
            a.json.write_text(json.dumps(res, indent=2, default=float))
        return 0
    _check(a)
    results: dict = {"args": vars(a) | {"json": str(a.json), "router_profile": str(a.router_profile)}, "rates": {}}
    free = iter(free_ports(4))
    ports = {"prefill": a.prefill_port or next(free), "decode": a.decode_port or next(free),
             "router_deflect": next(free), "router_prefill": next(free)}
    log_dir = Path(tempfile.mkdtemp(prefix="bench_router-"))  # files, not pipes nobody reads (a full pipe stalls)
    with Processes(log_dir) as procs:
        r1, r2, up = _start(a, procs, ports, log_dir)
        url = _paths(a, ports)
        proxies, pids = dict(a.proxy), {f"proxy {n}": pid for n, pid in a.proxy_pid}
        for name, cmd in a.proxy_cmd:
            proxies[name], pids[f"proxy {name}"] = _start_proxy(procs, name, cmd, ports, log_dir)
        upstream = ("lean stand-ins (scripts/lean_http.py, token gap "
                    f"{a.token_gap_ms:g} ms)" if a.upstream == "lean" else f"emulators at time scale {a.time_scale:g}")
        print(f"{a.prompt_tokens}-token prompts, {a.max_tokens} streamed tokens, upstreams: {upstream} (prefill "
              f":{ports['prefill']}, decode :{ports['decode']}), {a.repeats} alternating runs of {a.duration:g} s "
              f"per path and rate; routers' event loop {a.router_loop}; load generator: {a.client} client on "
              f"{_client_loop(a.client_loop)}; {_machine()}; process logs in {log_dir}", flush=True)
        if not proxies:
            print("no --proxy given: the router is timed against direct calls only; to compare with vLLM's toy "
                  "proxy, start it in front of --prefill-port/--decode-port and pass --proxy toy=URL")
        for rate in a.rates:
            pids |= {"router deflect path": r1.pid, "router two-hop path": r2.pid}
            load0 = _loadavg()
            runs = asyncio.run(_run_rate(a, rate, url, proxies, pids, [u.pid for u in up]))
            results["rates"][f"{rate:g}"] = _table(rate, runs)
            results.setdefault("load_average", {})[f"{rate:g}"] = {"before": load0, "after": _loadavg()}
            print(f"  machine load average (1 min) before and after this rate's runs: {load0:.2f}, {_loadavg():.2f}")
        _live_stats(ports, results)
    if a.router_profile is not None:  # the routers wrote their profiles when they stopped
        _print_profiles(a.router_profile, results)
    if a.decisions > 0:
        results["decisions"] = bench_decisions(a.decisions, shapes, trained=a.trained)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
