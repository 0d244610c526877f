"""Router overhead and policy decision time, measured on loopback. Prints numbers; asserts nothing.

    python scripts/bench_router.py [--rates 100 500] [--duration 5] [--repeats 2] [--proxy toy=http://...]

1. Added latency: open-loop streams of streaming completions at each ``--rates`` value, in alternating runs of
   every path against one prefill and one decode emulator: the decode emulator directly; the router's deflect
   path (``always_deflect``); the client doing vLLM's two hops itself (P, then D with P's params); the
   router's two-hop path (``round_robin``); and any other proxy given by ``--proxy NAME=URL``. Added latency =
   a path's end-to-end P50/P99 minus its direct counterpart's. This script never contains a proxy's code: to
   compare with vLLM's toy P/D proxy (``tests/v1/kv_connector/nixl_integration/toy_proxy_server.py``), start
   it yourself in front of ``--prefill-port`` and ``--decode-port`` and pass its URL.
2. Policy decision time: ``Router.decide`` (view build included) in process, for every registered policy,
   over a cluster view with load on it; P50/P99/max in microseconds. Also the live router's own decision and
   overhead percentiles from ``GET /stats``.

The emulators run at a tiny time scale (``--time-scale``, default 0.001: a 10 ms step takes 10 us) so the
model adds almost nothing. Router, emulators and this load generator share the machine's cores, so the
numbers include their contention (the load generator saturates first at high rates); expect noise between
runs on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from deflectlab.serving.procs import Processes, free_ports, wait_http


async def _load(rate: float, duration_s: float, call) -> tuple[np.ndarray, np.ndarray, int]:
    """Open-loop Poisson arrivals; returns (end-to-end s, first byte s, failures)."""
    rng = random.Random(1)
    e2e, ttfb = [], []
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
        tasks.append(asyncio.ensure_future(one()))
        t_next += rng.expovariate(rate)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    return np.array(e2e), np.array(ttfb), failures


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


def bench_decisions(n: int = 20000) -> dict:
    """``Router.decide`` per policy, over a loaded 2P2D view (no network)."""
    from deflectlab.policies.registry import available
    from deflectlab.serving.router import RoutedRequest, Router
    from deflectlab.serving.router_config import RouterConfig

    rng = random.Random(0)
    out = {}
    print(f"\npolicy decision time, Router.decide with view build, {n} decisions each (us):")
    print(f"  {'policy':<22}{'p50':>8}{'p99':>8}{'max':>9}")
    trained = Path(__file__).resolve().parents[1] / "experiments" / "trained"
    specs = [(n, n) for n in available() if n != "learned"]
    specs += [("learned (onnxruntime)", f"learned:path={trained}"),  # the exported MLP of experiments/trained
              ("learned (numpy)", f"learned:path={trained},backend=numpy")]
    for name, spec in specs:
        try:
            router = Router(RouterConfig([("127.0.0.1", 1), ("127.0.0.1", 2)], [("127.0.0.1", 3), ("127.0.0.1", 4)],
                                         spec))
        except ValueError as e:  # a policy that needs parameters (e.g. a file)
            print(f"  {name:<22} skipped: {e}")
            continue
        for inst in router.prefill:
            inst.inflight, inst.inflight_tokens, inst.held, inst.held_tokens = 5, 12000, 2, 4000
            inst.kv_usage = 0.2
        for inst in router.decode:
            inst.decoding, inst.decoding_ctx, inst.defl_waiting, inst.defl_waiting_tokens = 40, 90000, 1, 2000
            inst.active, inst.scraped_running, inst.kv_usage = 42, 41, 0.3
        times = np.empty(n)
        clock = time.perf_counter
        for i in range(n):
            req = RoutedRequest(i, i * 0.01, rng.randint(50, 8000))
            t0 = clock()
            router.decide(req)
            times[i] = clock() - t0
        us = times * 1e6
        p50, p99 = np.percentile(us, [50, 99])
        out[name] = {"p50_us": float(p50), "p99_us": float(p99), "max_us": float(us.max())}
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


async def _run_rate(a: argparse.Namespace, rate: float, url: dict[str, str], proxies: dict[str, str]) -> dict:
    """Alternating runs at ``rate`` of every path; returns {path: [(e2e, ttfb, failures), ...]}."""
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
                runs[name].append(await _load(rate, a.duration, lambda c=call: c(s)))
    return runs


def _merge(runs: list) -> tuple[np.ndarray, np.ndarray, int]:
    return (np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs]), sum(r[2] for r in runs))


def _table(rate: float, runs: dict[str, list]) -> dict:
    """Added p50/p99 of each proxied path over its direct counterpart, end to end, in ms."""
    merged = {k: _merge(v) for k, v in runs.items()}
    base = {"router deflect path": "direct decode"}
    base |= {k: "direct two hops" for k in merged if k.startswith(("router two-hop", "proxy "))}
    out: dict[str, Any] = {}
    print(f"\n{rate:g} req/s, end to end (send to last byte), ms; added = path minus its direct call")
    print(f"  {'path':<26}{'n':>7}{'failed':>7}{'p50':>9}{'p99':>9}{'added p50':>11}{'added p99':>11}")
    for name, (e2e, _, fails) in merged.items():
        p50, p99 = _pct(e2e * 1e3) if len(e2e) else (float("nan"),) * 2
        row = {"n": int(len(e2e)), "failed": fails, "p50_ms": p50, "p99_ms": p99}
        if name in base:
            b50, b99 = _pct(merged[base[name]][0] * 1e3)
            row |= {"added_p50_ms": p50 - b50, "added_p99_ms": p99 - b99}
        out[name] = row
        print(f"  {name:<26}{row['n']:>7}{fails:>7}{p50:>9.3f}{p99:>9.3f}"
              f"{row.get('added_p50_ms', float('nan')):>11.3f}{row.get('added_p99_ms', float('nan')):>11.3f}")
    r = out.get("router two-hop path", {})
    for name, row in out.items():
        if name.startswith("proxy ") and "added_p50_ms" in row and row["added_p50_ms"] > 0:
            ratio = (r["added_p50_ms"] / row["added_p50_ms"], r["added_p99_ms"] / row["added_p99_ms"])
            out[f"ratio vs {name}"] = {"p50": ratio[0], "p99": ratio[1]}
            print(f"  router two-hop added / {name} added: p50 {ratio[0]:.2f}x, p99 {ratio[1]:.2f}x")
    return out


def _proxy_arg(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith("http"):
        raise argparse.ArgumentTypeError(f"--proxy wants NAME=http://host:port, got {text!r}")
    return name, url


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
    ap.add_argument("--skip-prefill-path", action="store_true")
    ap.add_argument("--decisions", type=int, default=20000, help="decisions timed per policy in process")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    if a.duration <= 0 or a.repeats < 1 or any(r <= 0 for r in a.rates):
        raise SystemExit("--duration and --rates must be > 0 and --repeats >= 1")
    results: dict = {"args": vars(a) | {"json": str(a.json)}, "rates": {}}
    free = iter(free_ports(4))
    ports = {"prefill": a.prefill_port or next(free), "decode": a.decode_port or next(free),
             "router_deflect": next(free), "router_prefill": next(free)}
    with Processes() as procs:
        p = procs.emulator(ports["prefill"], "prefill", a.time_scale)
        d = procs.emulator(ports["decode"], "decode", a.time_scale)
        wait_http(f"http://127.0.0.1:{ports['prefill']}/health", proc=p)
        wait_http(f"http://127.0.0.1:{ports['decode']}/health", proc=d)
        common = ["--time-scale", str(a.time_scale)]
        r1 = procs.router(ports["router_deflect"], [ports["prefill"]], [ports["decode"]], "always_deflect", *common)
        r2 = procs.router(ports["router_prefill"], [ports["prefill"]], [ports["decode"]], "round_robin", *common)
        wait_http(f"http://127.0.0.1:{ports['router_deflect']}/healthcheck", proc=r1)
        wait_http(f"http://127.0.0.1:{ports['router_prefill']}/healthcheck", proc=r2)
        url = _paths(a, ports)
        print(f"{a.prompt_tokens}-token prompts, {a.max_tokens} streamed tokens, emulators at time scale "
              f"{a.time_scale:g} (prefill :{ports['prefill']}, decode :{ports['decode']}), {a.repeats} alternating "
              f"runs of {a.duration:g} s per path and rate", flush=True)
        if not a.proxy:
            print("no --proxy given: the router is timed against direct calls only; to compare with vLLM's toy "
                  "proxy, start it in front of --prefill-port/--decode-port and pass --proxy toy=URL")
        for rate in a.rates:
            runs = asyncio.run(_run_rate(a, rate, url, dict(a.proxy)))
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
    results["decisions"] = bench_decisions(a.decisions)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
