"""End to end: router in front of 2 prefill + 2 decode engine emulators on loopback.

Every request is answered and accounted for, streams are well formed, and faults (an instance killed
mid-stream, a dead prefill instance) give clear errors while later requests succeed elsewhere. The agreement
with the simulator (scripts/agreement.py) runs in a short form (about 15 s).
"""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest

from deflectlab.serving.emulator import EmulatorConfig, make_app
from deflectlab.serving.procs import Processes, free_ports, wait_http
from deflectlab.serving.router import Router
from deflectlab.serving.router_config import RouterConfig

SCALE = 0.02


def make_router(prefill, decode, policy="round_robin", **kw) -> Router:
    return Router(RouterConfig.of(prefill, decode, policy, **kw))


def _check_sse(raw: bytes, n_tokens: int) -> None:
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n")
    blocks = text[:-2].split("\n\n")
    got = 0
    for b in blocks[:-1]:
        assert b.startswith("data: ")
        ev = json.loads(b[6:])
        for ch in ev["choices"]:
            got += bool(ch.get("text") or (ch.get("delta") or {}).get("content"))
    assert got == n_tokens


async def _cluster(aiohttp_server, aiohttp_client, policy: str):
    servers = []
    for role in ("prefill", "prefill", "decode", "decode"):
        servers.append(await aiohttp_server(make_app(EmulatorConfig(role=role, time_scale=SCALE))))
    router = make_router([("127.0.0.1", s.port) for s in servers[:2]], [("127.0.0.1", s.port) for s in servers[2:]],
                    policy, time_scale=SCALE)
    return router, await aiohttp_client(router.app()), servers


@pytest.mark.parametrize("policy", ["round_robin", "always_deflect"])
async def test_every_request_answered_and_streams_well_formed(aiohttp_server, aiohttp_client, policy):
    router, client, servers = await _cluster(aiohttp_server, aiohttp_client, policy)
    rng = random.Random(0)

    async def one(i: int) -> None:
        chat, stream = i % 2 == 0, i % 3 != 0
        n_out = rng.randint(1, 12)
        body: dict = {"max_tokens": n_out, "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": "x" * rng.randint(10, 4000)}]
        else:
            body["prompt"] = list(range(rng.randint(1, 3000)))
        await asyncio.sleep(rng.random() * 0.2)
        resp = await client.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
        assert resp.status == 200
        raw = await resp.read()
        if stream:
            _check_sse(raw, n_out)
        else:
            assert json.loads(raw)["usage"]["completion_tokens"] == n_out

    n = 40
    await asyncio.gather(*(one(i) for i in range(n)))
    assert router.outcomes["ok"] == n and sum(router.outcomes.values()) == n
    kind = "prefill" if policy == "round_robin" else "deflect"
    assert router.decisions[kind] == n
    # every instance saw traffic it should: nothing lost between the hops
    served = []
    for s in servers:
        async with aiohttp.ClientSession() as sess, sess.get(f"http://127.0.0.1:{s.port}/metrics") as r:
            text = await r.text()
        line = next(ln for ln in text.splitlines() if ln.startswith("vllm:request_success_total"))
        served.append(float(line.rsplit(" ", 1)[1]))
    if policy == "round_robin":
        assert sum(served[:2]) == n and sum(served[2:]) == n
    else:
        assert sum(served[:2]) == 0 and sum(served[2:]) == n


async def _post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, bytes]:
    async with session.post(url, json=body) as r:
        return r.status, await r.read()


async def test_decode_killed_mid_stream_gives_error_then_other_instance_serves(aiohttp_client):
    ports = free_ports(2)
    with Processes() as procs:
        ems = [procs.emulator(port, "decode", 0.05) for port in ports]
        for port, p in zip(ports, ems):
            wait_http(f"http://127.0.0.1:{port}/health", proc=p)
        router = make_router([], [("127.0.0.1", port) for port in ports], "always_deflect", time_scale=0.05,
                        decode_balancer="round_robin")
        client = await aiohttp_client(router.app())
        # always_deflect takes decode instances in turn: the first request streams from ports[0]
        resp = await client.post("/v1/completions", json={"prompt": [1] * 100, "max_tokens": 5000, "stream": True})
        assert resp.status == 200
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        procs.kill(ems[0])
        rest = await resp.read()
        events = [ln for ln in rest.split(b"\n") if ln.startswith(b"data: ")]
        assert b"[DONE]" not in rest
        err = json.loads(events[-1][6:])["error"]
        assert err["code"] == 502 and f"127.0.0.1:{ports[0]}" in err["message"]
        assert router.outcomes["upstream_error"] == 1 and not router.decode[0].alive

        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{client.server.port}/v1/completions"
            results = await asyncio.gather(*(_post(s, url, {"prompt": "hi", "max_tokens": 3, "stream": True})
                                             for _ in range(6)))
        for status, raw in results:
            assert status == 200
            _check_sse(raw, 3)
        assert router.outcomes["ok"] == 6

        # restarted on the same port, the instance is probed back into rotation
        again = procs.emulator(ports[0], "decode", 0.05, name="emulator-restarted")
        wait_http(f"http://127.0.0.1:{ports[0]}/health", proc=again)
        for _ in range(100):
            if router.decode[0].alive:
                break
            await asyncio.sleep(0.05)
        assert router.decode[0].alive


async def test_dead_prefill_instance_is_skipped_and_requests_succeed(aiohttp_client):
    ports = free_ports(3)
    with Processes() as procs:
        ems = [procs.emulator(ports[0], "prefill", 0.05), procs.emulator(ports[1], "prefill", 0.05),
               procs.emulator(ports[2], "decode", 0.05)]
        for port, p in zip(ports, ems):
            wait_http(f"http://127.0.0.1:{port}/health", proc=p)
        router = make_router([("127.0.0.1", ports[0]), ("127.0.0.1", ports[1])], [("127.0.0.1", ports[2])],
                        "round_robin", time_scale=0.05)
        client = await aiohttp_client(router.app())
        procs.kill(ems[0])
        for _ in range(6):
            resp = await client.post("/v1/completions", json={"prompt": [3] * 500, "max_tokens": 2})
            assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 2
        assert not router.prefill[0].alive and router.prefill[1].alive
        assert router.outcomes == {**router.outcomes, "ok": 6, "upstream_error": 0}
        assert router.decisions["prefill"] >= 6  # a request first sent to the dead instance is decided again


async def test_oversized_prompt_through_the_router_is_a_400(aiohttp_server, aiohttp_client):
    router, client, _ = await _cluster(aiohttp_server, aiohttp_client, "round_robin")
    models = await (await client.get("/v1/models")).json()  # passed through from a decode instance
    assert models["data"][0]["id"] == EmulatorConfig().model_name
    resp = await client.post("/v1/completions", json={"prompt": [1] * 40000, "max_tokens": 2})
    assert resp.status == 400
    assert "maximum context length is 32768 tokens" in (await resp.json())["message"]
    assert router.outcomes["upstream_client_error"] == 1


def test_agreement_with_the_simulator_short_form(tmp_path, capsys):
    """The HTTP path (router, emulators, client, loopback) adds little to the model's times. This is not a test
    of the model: the emulators run the simulator's own node classes."""
    from deflectlab.scripts.agreement import main

    assert main(["--start", "540", "--window", "20", "--rate", "6", "--policy", "round_robin,always_deflect",
                 "--time-scale", "0.5", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "agreement.json").read_text())["rows"]
    for row in rows:
        assert row["emulated"]["completed"] == row["emulated"]["requests"]
        for q in ("p50", "p95"):  # model seconds; 0.03 s is 15 ms of wall-clock lag at time scale 0.5
            sim, emu = row["simulated"]["ttft_s"][q], row["emulated"]["ttft_s"][q]
            assert abs(emu - sim) <= 0.15 * sim + 0.03, (row["policy"], q, sim, emu)
        sim, emu = row["simulated"]["tbt_s"]["p50"], row["emulated"]["tbt_s"]["p50"]
        assert abs(emu - sim) <= 0.25 * sim, (row["policy"], "tbt p50", sim, emu)  # per token, as simulated


def _run(args: list[str], timeout: float = 90) -> str:
    import subprocess
    import sys

    from deflectlab.serving.procs import REPO

    r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_replay_command_smoke(tmp_path):
    (port,) = free_ports(1)
    with Processes() as procs:
        em = procs.emulator(port, "both", 0.02)
        wait_http(f"http://127.0.0.1:{port}/health", proc=em)
        out = _run(["-m", "deflectlab.scripts.cli", "replay", "--url", f"http://127.0.0.1:{port}",
                    "--trace", "azure_code",
                    "--num-requests", "8", "--rate", "4", "--time-scale", "0.02", "--out", str(tmp_path)])
    assert "8 requests: 8 completed, 0 rejected" in out
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["completed"] == 8 and s["output_token_mismatches"] == 0 and s["ttft_s"]["p50"] > 0
    assert {"ttft_s", "tbt_s", "e2e_s", "slo_attainment", "goodput_rps"} <= set(s)
    rows = (tmp_path / "requests.csv").read_text().splitlines()
    assert len(rows) == 9 and (tmp_path / "ttft_cdf.png").stat().st_size > 0


def test_bench_script_smoke(tmp_path):
    out = _run(["scripts/bench_router.py", "--rates", "40", "--duration", "0.5", "--repeats", "1",
                "--decisions", "200", "--json", str(tmp_path / "bench.json")])
    assert "router deflect path" in out and "policy decision time" in out
    bench = json.loads((tmp_path / "bench.json").read_text())
    table = bench["rates"]["40"]
    assert set(table) == {"direct decode", "router deflect path", "direct two hops", "router two-hop path"}
    for path, row in table.items():  # every request of every path answered
        assert row["failed"] == 0 and row["n"] > 0, path
    assert {"added_p50_ms", "added_p99_ms"} <= set(table["router two-hop path"])
    st = bench["router_stats_always_deflect"]
    assert st["requests"]["ok"] == sum(st["requests"].values()) and st["requests_in_flight"] == 0
    assert bench["decisions"]["round_robin"]["p99_us"] > 0


def test_replay_counts_tbt_per_token_as_the_simulator():
    from deflectlab.serving.replay import RequestRecord, _TokenClock

    r = RequestRecord(0, 0.0, 10, 6)
    clock = _TokenClock(r, scale=0.5, t_send=0.0)
    clock.tokens(1, 1.0)  # first token 1.0 s wall after sending: TTFT 2.0 model s
    clock.tokens(3, 1.3)  # three tokens together 0.3 s later: three steps of 0.1 wall s each
    clock.tokens(0, 1.35)  # an event without text (usage) changes nothing
    clock.tokens(1, 1.4)
    assert r.ttft_s == 2.0 and r.tokens == 5
    assert r.gaps == pytest.approx([0.2, 0.2, 0.2, 0.2])
    r = RequestRecord(1, 0.0, 10, 3)
    clock = _TokenClock(r, scale=1.0, t_send=0.0)
    clock.tokens(2, 1.0)  # the second token came with the first: carried into the next split
    clock.tokens(1, 1.4)
    assert r.ttft_s == 1.0 and r.gaps == pytest.approx([0.2, 0.2])
