"""The router's CPU per request, measured in one process. Prints numbers; asserts nothing.

    python scripts/bench_router_cpu.py [--requests 3000] [--concurrency 8] [--rounds 3] [--event-loop asyncio]

The lean upstream stand-ins (``scripts/lean_http.py``), the router (``round_robin`` for the two-hop path,
``always_deflect`` for the deflect path) and a closed-loop lean client all run on one event loop in this
process, so ``time.process_time`` counts every CPU cycle of an exchange, both ends of each loopback send
included, and other processes on the machine do not enter it (they slow the wall clock, not this count).
Each path's figure is the best of ``--rounds`` rounds of ``--requests`` requests (CPU ms per request). The
direct rows (the client calling the stand-ins itself: the decode stand-in alone, or both hops) are the same
work without the router, so ``router - direct`` is the router's own CPU per request. The router's background
work (``/metrics`` scrapes and ``/health`` probes) runs during the rounds and is counted too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from aiohttp import web

from deflectlab.scripts.lean_http import LeanClient, Upstream, request_bytes, serve_upstream
from deflectlab.serving.procs import free_ports
from deflectlab.serving.protocol import dumps, prefill_hop_body, with_kv_params
from deflectlab.serving.router import Router, pick_event_loop
from deflectlab.serving.router_config import RouterConfig

H = "127.0.0.1"


async def _closed_loop(n: int, concurrency: int, one: Any) -> float:
    """CPU seconds per request of ``n`` calls of ``one()``, ``concurrency`` at a time."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            r = await one()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {bytes(r.body)[:200]!r}")

    t0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - t0) / n


async def _bench(a: argparse.Namespace) -> dict[str, float]:
    p_port, d_port, rr_port, ad_port = free_ports(4)
    tasks = []
    for role, port in (("prefill", p_port), ("decode", d_port)):
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(serve_upstream(Upstream(role, port), H, ready)))
        await ready.wait()
    runners = []
    for policy, port in (("round_robin", rr_port), ("always_deflect", ad_port)):
        router = Router(RouterConfig([(H, p_port)], [(H, d_port)], policy, time_scale=0.001))
        runner = web.AppRunner(router.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, H, port).start()
        runners.append(runner)
    body = {"prompt": list(range(a.prompt_tokens)), "max_tokens": a.max_tokens, "stream": True}
    raw = json.dumps(body).encode()
    client = LeanClient()
    p_data = request_bytes(H, p_port, "/v1/completions", dumps(prefill_hop_body(body)))

    async def two_hops() -> Any:
        r = await client.request((H, p_port), p_data, keep_body=True)
        kvp = json.loads(r.body)["kv_transfer_params"]
        return await client.request((H, d_port), request_bytes(H, d_port, "/v1/completions",
                                                               with_kv_params(raw, kvp)))

    def plain(port: int) -> Any:
        data = request_bytes(H, port, "/v1/completions", raw)
        return lambda: client.request((H, port), data, keep_body=True)

    paths = {"direct decode": plain(d_port), "router deflect path": plain(ad_port),
             "direct two hops": two_hops, "router two-hop path": plain(rr_port)}
    best = dict.fromkeys(paths, float("inf"))
    try:
        for one in paths.values():
            await _closed_loop(200, a.concurrency, one)  # warm connections and code paths
        for _ in range(a.rounds):
            for name, one in paths.items():
                best[name] = min(best[name], await _closed_loop(a.requests, a.concurrency, one))
    finally:
        client.close()
        for runner in runners:
            await runner.cleanup()
        for t in tasks:
            t.cancel()
    return {k: v * 1e3 for k, v in best.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="requests per path and round")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight (closed loop)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per path; the best counts")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8, help="streamed tokens per request")
    ap.add_argument("--event-loop", choices=["asyncio", "uvloop", "auto"], default="asyncio")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    a = ap.parse_args(argv)
    if a.requests < 1 or a.concurrency < 1 or a.rounds < 1:
        raise SystemExit("--requests, --concurrency and --rounds must be >= 1")
    loop = pick_event_loop(a.event_loop)
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
    out = asyncio.run(_bench(a))
    print(f"CPU ms per request, one process (stand-ins + router + client), best of {a.rounds} x {a.requests} "
          f"requests, {a.concurrency} in flight, {a.prompt_tokens}-token prompts, {a.max_tokens} streamed tokens, "
          f"{loop} loop:")
    for name, ms in out.items():
        print(f"  {name:<22}{ms:8.3f}")
    for path, base in (("router deflect path", "direct decode"), ("router two-hop path", "direct two hops")):
        print(f"  {path} - {base}: {out[path] - out[base]:.3f} ms of CPU per request")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
