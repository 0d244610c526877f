"""Start ``deflectlab emulate`` instances and ``deflectlab route`` with a policy, send requests, report.

    python scripts/smoke_route.py --shape 4x4 --policy learned:path=experiments/trained --requests 200

Every request must be answered (HTTP 200 with the asked number of tokens); prints the router's outcome counts,
its prefill/deflect decisions and its own decision-time percentiles (``GET /stats``). Exits 1 if any request
failed. Process logs go to a fresh temporary folder (printed). Loopback only; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import urllib.request
from pathlib import Path


async def _send(url: str, n: int, seed: int) -> list[bool]:
    import aiohttp

    rng = random.Random(seed)

    async def one(session: aiohttp.ClientSession, i: int) -> bool:
        await asyncio.sleep(rng.random() * n * 0.01)
        out = rng.randint(1, 8)
        body = {"prompt": list(range(rng.choice((50, 400, 1500, 3000, 6000, 12000)))), "max_tokens": out}
        async with session.post(f"{url}/v1/completions", json=body) as r:
            if r.status != 200:
                return False
            return (await r.json())["usage"]["completion_tokens"] == out

    async with aiohttp.ClientSession() as s:
        return list(await asyncio.gather(*(one(s, i) for i in range(n))))


def main(argv: list[str] | None = None) -> int:
    from deflectlab.scripts.cmd_dagger import parse_shapes
    from deflectlab.serving.procs import Processes, free_ports, wait_http

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2x2", help="PxD")
    ap.add_argument("--policy", default="learned:path=experiments/trained")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--time-scale", type=float, default=0.01, help="emulators' wall seconds per model second")
    a = ap.parse_args(argv)
    try:
        ((P, D),) = parse_shapes(a.shape)
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise SystemExit(f"--shape: {e}") from None
    ports = free_ports(P + D + 1)
    log_dir = Path(tempfile.mkdtemp(prefix="smoke_route-"))
    with Processes(log_dir) as procs:
        for i, port in enumerate(ports[:P + D]):
            procs.emulator(port, "prefill" if i < P else "decode", a.time_scale)
        for port in ports[:P + D]:
            wait_http(f"http://127.0.0.1:{port}/health")
        r = procs.router(ports[-1], ports[:P], ports[P:P + D], a.policy, "--time-scale", str(a.time_scale))
        url = f"http://127.0.0.1:{ports[-1]}"
        wait_http(f"{url}/healthcheck", proc=r)
        ok = asyncio.run(_send(url, a.requests, 0))
        with urllib.request.urlopen(f"{url}/stats", timeout=5) as resp:
            st = json.load(resp)
    dec = st["decision_us"]
    print(json.dumps({"shape": f"{P}P{D}D", "policy": a.policy, "requests": len(ok), "answered_ok": sum(ok),
                      "outcomes": st["requests"], "decisions": st.get("decisions"),
                      "decision_us_p50": dec.get("p50"), "decision_us_p99": dec.get("p99"), "logs": str(log_dir)}))
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
