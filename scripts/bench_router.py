"""Router overhead and policy decision time, measured on loopback. Prints numbers; asserts nothing.

    python scripts/bench_router.py [--rate 200] [--duration 10] [--max-tokens 8]

1. Added latency, deflect path: an open-loop stream of streaming completions at ``--rate`` requests/s for
   ``--duration`` s straight to a decode emulator, then the same stream through the router
   (``always_deflect``); added latency = router minus direct, at P50 and P99 of end-to-end time (send to last
   byte) and of time to first byte.
2. Added latency, prefill path: the client doing vLLM's two hops itself (P, then D with P's params) against
   the router doing them (``round_robin``).
3. Policy decision time: ``Router.decide`` (view build included) in process, for every registered policy,
   over a cluster view with load on it; P50/P99/max in microseconds. Also the live router's own decision and
   overhead percentiles from ``GET /stats``.

The emulators run at a tiny time scale (``--time-scale``, default 0.001: a 10 ms step takes 10 us) so the
model adds almost nothing. Router, emulators and this load generator share the machine's cores, so the
numbers include their contention; on 2 cores expect noise between runs.
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
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
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


def _report(name: str, direct: tuple, routed: tuple) -> dict:
    (de, dt, df), (re_, rt, rf) = direct, routed
    out = {}
    print(f"\n{name}: {len(de)} direct / {len(re_)} routed requests ({df} / {rf} failed)")
    print(f"  {'':<22}{'direct p50':>12}{'routed p50':>12}{'added p50':>11}{'direct p99':>12}{'routed p99':>12}"
          f"{'added p99':>11}")
    for label, a, b in (("end to end (ms)", de, re_), ("first byte (ms)", dt, rt)):
        (a50, a99), (b50, b99) = _pct(a * 1e3), _pct(b * 1e3)
        print(f"  {label:<22}{a50:>12.3f}{b50:>12.3f}{b50 - a50:>11.3f}{a99:>12.3f}{b99:>12.3f}{b99 - a99:>11.3f}")
        out[label] = {"direct_p50": a50, "routed_p50": b50, "added_p50": b50 - a50, "direct_p99": a99,
                      "routed_p99": b99, "added_p99": b99 - a99}
    return out


def bench_decisions(n: int = 20000) -> dict:
    """``Router.decide`` per policy, over a loaded 2P2D view (no network)."""
    from deflectlab.policies.registry import available
    from deflectlab.serving.router import RoutedRequest, Router

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
            router = Router([("127.0.0.1", 1), ("127.0.0.1", 2)], [("127.0.0.1", 3), ("127.0.0.1", 4)], spec)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second (open loop, Poisson)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    ap.add_argument("--max-tokens", type=int, default=8, help="output tokens per request")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--time-scale", type=float, default=0.001, help="emulators' wall seconds per model second")
    ap.add_argument("--skip-prefill-path", action="store_true")
    ap.add_argument("--decisions", type=int, default=20000, help="decisions timed per policy in process")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = ap.parse_args(argv)

    results: dict = {"args": vars(a) | {"json": str(a.json)}}
    body = {"prompt": list(range(a.prompt_tokens)), "max_tokens": a.max_tokens, "stream": True}
    raw = json.dumps(body).encode()
    ports = free_ports(4)
    p_port, d_port, r1_port, r2_port = ports
    with Processes() as procs:
        p = procs.emulator(p_port, "prefill", a.time_scale)
        d = procs.emulator(d_port, "decode", a.time_scale)
        wait_http(f"http://127.0.0.1:{p_port}/health", proc=p)
        wait_http(f"http://127.0.0.1:{d_port}/health", proc=d)
        common = ["--time-scale", str(a.time_scale)]
        r1 = procs.router(r1_port, [p_port], [d_port], "always_deflect", *common)
        r2 = procs.router(r2_port, [p_port], [d_port], "round_robin", *common)
        wait_http(f"http://127.0.0.1:{r1_port}/healthcheck", proc=r1)
        wait_http(f"http://127.0.0.1:{r2_port}/healthcheck", proc=r2)

        async def run_all() -> None:
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn) as s:
                d_url = f"http://127.0.0.1:{d_port}/v1/completions"
                p_url = f"http://127.0.0.1:{p_port}/v1/completions"
                r1_url = f"http://127.0.0.1:{r1_port}/v1/completions"
                r2_url = f"http://127.0.0.1:{r2_port}/v1/completions"
                for _ in range(min(50, int(a.rate * a.duration))):  # warm connections and code paths
                    await _stream(s, d_url, raw)
                    await _stream(s, r1_url, raw)
                print(f"{a.rate:g} req/s for {a.duration:g} s per phase, {a.prompt_tokens}-token prompts, "
                      f"{a.max_tokens} streamed tokens, emulators at time scale {a.time_scale:g}", flush=True)
                direct = await _load(a.rate, a.duration, lambda: _stream(s, d_url, raw))
                routed = await _load(a.rate, a.duration, lambda: _stream(s, r1_url, raw))
                results["deflect_path"] = _report("deflect path (always_deflect) vs decode emulator directly",
                                                  direct, routed)
                if not a.skip_prefill_path:
                    for _ in range(min(50, int(a.rate * a.duration))):
                        await _two_hops(s, p_url, d_url, body)
                        await _stream(s, r2_url, raw)
                    direct = await _load(a.rate, a.duration, lambda: _two_hops(s, p_url, d_url, body))
                    routed = await _load(a.rate, a.duration, lambda: _stream(s, r2_url, raw))
                    results["prefill_path"] = _report("prefill path (round_robin) vs the client doing both hops",
                                                      direct, routed)

        asyncio.run(run_all())
        for name, port in (("always_deflect", r1_port), ("round_robin", r2_port)):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
                st = json.load(r)
            results[f"router_stats_{name}"] = st
            dec, ov = st["decision_us"], st["overhead_us"]
            print(f"\nlive router ({name}): decision p50 {dec.get('p50', float('nan')):.1f} us, p99 "
                  f"{dec.get('p99', float('nan')):.1f} us; body read to upstream send p50 "
                  f"{ov.get('p50', float('nan')):.1f} us, p99 {ov.get('p99', float('nan')):.1f} us; "
                  f"outcomes {st['requests']}")
    results["decisions"] = bench_decisions(a.decisions)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
