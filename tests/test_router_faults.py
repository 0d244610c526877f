"""The router under faults: liveness from /health and the request path (never from /metrics), bounded waits,
``--no-prefill``, one counted outcome per request, and a fixed-shape policy with an instance down.

Upstreams are small aiohttp stand-ins whose faults are switched on per test; the router runs with short
intervals and timeouts (tenths of a second) so every case ends in well under a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from deflectlab.serving.router import Router
from deflectlab.serving.router_config import RouterConfig

P_PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "e", "remote_block_ids": [1],
            "remote_host": "127.0.0.1", "remote_port": 1, "tp_size": 1}
SSE = [b'data: {"choices":[{"index":0,"text":" a"}]}\n\n', b'data: {"choices":[{"index":0,"text":" b"}]}\n\n',
       b"data: [DONE]\n\n"]
FAST = {"scrape_interval_s": 0.02, "metrics_stale_s": 0.15, "health_interval_s": 0.05, "dead_probe_interval_s": 0.03,
        "health_timeout_s": 0.15, "prefill_timeout_s": 0.3, "decode_first_byte_timeout_s": 0.3,
        "stream_idle_timeout_s": 0.3, "suspect_hold_s": 0.1}
TRAINED = Path(__file__).resolve().parents[1] / "experiments" / "trained"
TRAINED_V1 = Path(__file__).resolve().parents[1] / "experiments" / "trained_v1"


class Fake:
    """A vLLM stand-in whose faults are switched per test."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.calls = 0
        self.metrics_status = 200
        self.metrics_delay = 0.0
        self.health_status = 200
        self.status = 200
        self.hang = False  # accept, never answer
        self.stall_after_first = False  # stream one chunk, then go silent
        self.die_after_first = False  # stream one chunk, then drop the connection

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        if self.status != 200:
            return web.json_response({"object": "error", "message": "engine broke", "code": self.status},
                                     status=self.status)
        if self.role == "prefill":
            return web.json_response({"choices": [{"text": " a"}], "kv_transfer_params": P_PARAMS})
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": " a b"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(SSE[0])
        if self.stall_after_first:
            await asyncio.sleep(3600)
        if self.die_after_first:
            request.transport.close()
            return resp
        for chunk in SSE[1:]:
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def metrics(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.metrics_delay)
        if self.metrics_status != 200:
            return web.Response(status=self.metrics_status, text="not here")
        return web.Response(text="vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
                                 "vllm:kv_cache_usage_perc 0.1\n")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.health_status)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        return app


async def _cluster(aiohttp_server, aiohttp_client, policy="never_deflect", n_p=2, n_d=2, server_kwargs=None, **kw):
    fakes = [Fake("prefill") for _ in range(n_p)] + [Fake("decode") for _ in range(n_d)]
    servers = [await aiohttp_server(f.app()) for f in fakes]
    cfg = RouterConfig.of([("127.0.0.1", s.port) for s in servers[:n_p]],
                          [("127.0.0.1", s.port) for s in servers[n_p:]], policy, **(FAST | kw))
    router = Router(cfg)
    client = await aiohttp_client(router.app(), server_kwargs=server_kwargs or {})
    return router, client, fakes[:n_p], fakes[n_p:], servers


async def _until(cond, timeout: float = 2.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def _balanced(router: Router, sent: int) -> None:
    """Every request sent ended in exactly one outcome, and none is left in flight."""
    assert sum(router.outcomes.values()) == sent, router.outcomes
    assert router.m.in_flight_now == 0


async def _complete(client, n: int, stream: bool = True) -> list[int]:
    out = []
    for _ in range(n):
        r = await client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2, "stream": stream})
        await r.read()
        out.append(r.status)
    return out


@pytest.mark.parametrize("fault", ["metrics_404", "metrics_slow"])
async def test_failing_metrics_only_make_the_view_stale(aiohttp_server, aiohttp_client, fault):
    router, client, ps, ds, _ = await _cluster(aiohttp_server, aiohttp_client)
    for f in ps + ds:
        if fault == "metrics_404":
            f.metrics_status = 404
        else:
            f.metrics_delay = 0.5  # over metrics_stale_s
    await _until(lambda: all(i.stale for i in router.prefill + router.decode))
    await asyncio.sleep(0.3)  # several failed scrapes in a row
    assert await _complete(client, 4) == [200] * 4
    assert all(i.alive for i in router.prefill + router.decode)
    assert [f.calls for f in ps] == [2, 2] and sum(f.calls for f in ds) == 4  # both hops every time
    assert router.decisions["prefill"] == 4 and router.decisions["forced_deflect"] == 0
    st = router.stats()
    assert all(i["metrics_stale"] and i["alive"] for i in st["instances"])
    assert st["stale_view_decisions"] == {"prefill_metrics_stale": 4, "decode_metrics_stale": 4}
    text = await (await client.get("/metrics")).text()
    label = router.prefill[0].label
    assert f'deflectlab_router_instance_metrics_stale{{instance="{label}",role="prefill"}} 1.0' in text
    reason = "http_status" if fault == "metrics_404" else "timeout"
    assert f'reason="{reason}"' in text and "deflectlab_router_scrape_failures_total" in text
    assert 'deflectlab_router_stale_view_decisions_total{reason="prefill_metrics_stale"} 4.0' in text
    _balanced(router, 4)


async def test_stale_view_uses_the_routers_own_counters(aiohttp_server, aiohttp_client):
    router, client, ps, ds, _ = await _cluster(aiohttp_server, aiohttp_client)
    p = router.prefill[0]
    p.scraped_waiting, p.scraped_running, p.kv_usage = 9.0, 1.0, 0.5
    p.inflight, p.inflight_tokens, p.held_tokens = 2, 300, 100
    fresh = router.views.prefill_view(0, p, 0.0)
    assert fresh.waiting_requests == 10 and fresh.kv_free_tokens == int(0.5 * p_cap(router))
    p.stale = True
    stale = router.views.prefill_view(0, p, 0.0)
    assert stale.waiting_requests == 2 and stale.kv_free_tokens == p_cap(router) - 400


def p_cap(router: Router) -> int:
    return router.views.pp.kv_capacity_tokens


async def test_failing_health_takes_an_instance_out_and_back(aiohttp_server, aiohttp_client):
    router, client, ps, ds, _ = await _cluster(aiohttp_server, aiohttp_client)
    ps[0].health_status = 503
    await _until(lambda: not router.prefill[0].alive)
    assert await _complete(client, 4) == [200] * 4
    calls = ps[0].calls
    assert calls == 0 and ps[1].calls == 4
    assert router.m.fallbacks["dead_instance"] == 2  # never_deflect picked the dead one twice: replaced
    ps[0].health_status = 200
    await _until(lambda: router.prefill[0].alive)
    assert await _complete(client, 2) == [200] * 2
    assert ps[0].calls == 1
    _balanced(router, 6)


async def test_5xx_takes_an_instance_out_until_health_answers(aiohttp_server, aiohttp_client):
    router, client, ps, ds, _ = await _cluster(aiohttp_server, aiohttp_client, n_p=1)
    ps[0].status, ps[0].health_status = 500, 503
    r = await client.post("/v1/completions", json={"prompt": "x"})
    err = await r.json()
    assert r.status == 502 and router.prefill[0].label in err["message"] and "prefill hop" in err["message"]
    assert not router.prefill[0].alive
    assert await _complete(client, 2) == [200, 200]  # deflected meanwhile (--no-prefill deflect)
    assert router.m.forced["no_live_prefill"] == 2
    ps[0].status, ps[0].health_status = 200, 200
    await _until(lambda: router.prefill[0].alive)
    _balanced(router, 3)


async def test_refused_connection_retries_on_the_other_instance(aiohttp_server, aiohttp_client):
    # probes far apart: the request path finds the refused connection first
    router, client, ps, ds, servers = await _cluster(aiohttp_server, aiohttp_client, health_interval_s=10.0)
    await asyncio.sleep(0.05)
    await servers[0].close()
    assert await _complete(client, 4) == [200] * 4
    assert not router.prefill[0].alive and ps[1].calls == 4
    value = router.m.registry.get_sample_value
    assert value("deflectlab_router_retries_total", {"hop": "prefill"}) == 1  # the first request, on P1
    assert value("deflectlab_router_instance_out_of_rotation_total", {
        "role": "prefill", "instance": router.prefill[0].label, "reason": "connect"}) == 1
    assert router.m.fallbacks["dead_instance"] == 2  # never_deflect picks P0 for requests 2 and 4: replaced
    _balanced(router, 4)


async def test_no_prefill_reject_answers_503_and_deflect_is_counted_and_logged_once(aiohttp_server, aiohttp_client,
                                                                                   caplog):
    router, client, ps, ds, _ = await _cluster(aiohttp_server, aiohttp_client, no_prefill="reject")
    for f in ps:
        f.health_status = 503
    await _until(lambda: not any(p.alive for p in router.prefill))
    r = await client.post("/v1/completions", json={"prompt": "x"})
    assert r.status == 503 and "--no-prefill reject" in (await r.json())["message"]
    assert router.outcomes["no_instance"] == 1

    router, client, ps, ds, _ = await _cluster(aiohttp_server, aiohttp_client)
    for f in ps:
        f.health_status = 503
    await _until(lambda: not any(p.alive for p in router.prefill))
    with caplog.at_level(logging.WARNING, logger="deflectlab.router"):
        assert await _complete(client, 5) == [200] * 5
    assert router.m.forced["no_live_prefill"] == 5 and sum(f.calls for f in ps) == 0
    assert sum("--no-prefill deflect" in rec.message for rec in caplog.records) == 1  # once per change of state
    text = await (await client.get("/metrics")).text()
    assert 'deflectlab_router_forced_deflections_total{reason="no_live_prefill"} 5.0' in text


async def test_hung_prefill_gets_504_in_time_and_is_suspect(aiohttp_server, aiohttp_client):
    router, client, ps, ds, _ = await _cluster(aiohttp_server, aiohttp_client, n_p=1)
    ps[0].hang = True
    t0 = asyncio.get_running_loop().time()
    r = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    waited = asyncio.get_running_loop().time() - t0
    err = await r.json()
    assert r.status == 504 and err["type"] == "GatewayTimeoutError"
    assert router.prefill[0].label in err["message"] and "prefill hop" in err["message"]
    assert 0.3 <= waited < 2.0  # the configured 0.3 s, not forever
    assert not router.prefill[0].alive and router.prefill[0].timeouts == 1
    assert router.outcomes["timeout"] == 1
    ps[0].hang = False
    await _until(lambda: router.prefill[0].alive)  # health answers after the suspect hold
    _balanced(router, 1)


async def test_decode_first_byte_and_idle_timeouts(aiohttp_server, aiohttp_client):
    router, client, ps, ds, _ = await _cluster(aiohttp_server, aiohttp_client, policy="always_deflect", n_d=1)
    ds[0].hang = True
    r = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    err = await r.json()
    assert r.status == 504 and "first byte" in err["message"] and router.decode[0].label in err["message"]
    ds[0].hang = False
    await _until(lambda: router.decode[0].alive)
    ds[0].stall_after_first = True
    r = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    raw = await r.read()
    assert r.status == 200 and raw.startswith(SSE[0]) and b"[DONE]" not in raw
    ev = json.loads(raw[len(SSE[0]):].split(b"\n")[0][6:])["error"]
    assert ev["code"] == 504 and "no chunk on the decode hop for 0.3 s" in ev["message"]
    assert router.outcomes["timeout"] == 2
    _balanced(router, 2)


async def test_decode_dying_mid_stream_names_instance_and_hop(aiohttp_server, aiohttp_client):
    router, client, ps, ds, servers = await _cluster(aiohttp_server, aiohttp_client, policy="always_deflect", n_d=1)
    ds[0].die_after_first = True  # the decode instance drops the connection mid-stream
    r = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert r.status == 200
    rest = await r.read()
    assert rest.startswith(SSE[0]) and b"[DONE]" not in rest
    msg = json.loads(rest.strip().split(b"\n")[-1][6:])["error"]["message"]
    assert msg.startswith(f"decode instance {router.decode[0].label} closed the connection mid-stream on the "
                          "decode hop")
    assert "Error" not in msg and "aiohttp" not in msg  # no library internals
    assert router.outcomes["upstream_error"] == 1
    _balanced(router, 1)


async def test_oversized_body_chat_hint_and_healthcheck(aiohttp_server, aiohttp_client):
    router, client, ps, ds, _ = await _cluster(aiohttp_server, aiohttp_client, max_body_bytes=10_000)
    r = await client.post("/v1/completions", json={"prompt": "x" * 20_000})
    err = await r.json()
    assert r.status == 413 and err["object"] == "error" and err["code"] == 413 and "10000 bytes" in err["message"]
    r = await client.post("/v1/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 400 and "/v1/chat/completions" in (await r.json())["message"]
    health = await (await client.get("/healthcheck")).json()
    assert health["policy"] == "never_deflect" and health["no_prefill"] == "deflect"
    assert router.outcomes["request_too_large"] == 1 and router.outcomes["bad_request"] == 1
    _balanced(router, 2)


async def test_client_disconnect_is_counted_and_nothing_stays_in_flight(aiohttp_server, aiohttp_client):
    # the router is served with handler_cancellation, as serve() runs it: a client that leaves ends the handler
    router, client, ps, ds, _ = await _cluster(aiohttp_server, aiohttp_client, policy="always_deflect", n_d=1,
                                               server_kwargs={"handler_cancellation": True},
                                               stream_idle_timeout_s=5.0, decode_first_byte_timeout_s=5.0)
    url = f"http://127.0.0.1:{client.server.port}/v1/completions"
    ds[0].stall_after_first = True
    async with aiohttp.ClientSession() as s:
        r = await s.post(url, json={"prompt": "x", "stream": True})
        await r.content.readline()
        r.close()  # gives up mid-stream
    await _until(lambda: router.m.in_flight_now == 0)
    ds[0].stall_after_first, ds[0].hang = False, True
    async with aiohttp.ClientSession() as s:  # gives up while the router waits for the first byte
        with pytest.raises(asyncio.TimeoutError):
            await s.post(url, json={"prompt": "x", "stream": False}, timeout=aiohttp.ClientTimeout(total=0.2))
    await _until(lambda: router.m.in_flight_now == 0)
    assert router.outcomes["client_disconnected"] == 2
    _balanced(router, 2)
    assert router.decode[0].active == 0 and router.decode[0].defl_waiting_tokens == 0


def _route_with_one_down(policy: str, down: tuple[str, int]):
    from deflectlab.serving.router import RoutedRequest

    router = Router(RouterConfig.of([("127.0.0.1", 1), ("127.0.0.1", 2)], [("127.0.0.1", 3), ("127.0.0.1", 4)],
                                    policy))
    dead = getattr(router, down[0])[down[1]]
    router.live.out(dead, "health", "test")
    view = router.views.view(0.0, 1.0, router.prefill, router.decode)
    assert (view.num_prefill, view.num_decode) == (2, 2)  # the configured shape, the dead instance included
    assert getattr(view, f"dead_{down[0]}") == (down[1],)
    used = set()
    for i in range(200):
        route = router.decide(RoutedRequest(i, i * 0.05, (100, 500, 2000, 6000)[i % 4]))
        for inst in (route.prefill, route.decode):
            if inst is not None:
                used.add((inst.role, inst.index))
    assert (dead.role, dead.index) not in used  # never routed to the dead instance
    return router


@pytest.mark.parametrize("down", [("prefill", 0), ("prefill", 1), ("decode", 0), ("decode", 1)])
def test_v1_learned_policy_keeps_its_shape_with_one_node_down(down):
    router = _route_with_one_down(f"learned:path={TRAINED_V1}", down)
    # the fixed-shape v1 policy itself avoided the dead instance: nothing replaced, no error, no fallback
    assert router.m.fallbacks == {"policy_error": 0, "invalid_decision": 0, "dead_instance": 0}
    assert router.decisions["forced_deflect"] == 0 and router.decisions["prefill"] > 0


@pytest.mark.parametrize("down", [("prefill", 0), ("prefill", 1), ("decode", 0), ("decode", 1)])
def test_shipped_learned_policy_keeps_its_shape_with_one_node_down(down):
    """The shipped shape-generic policy gets the configured shape with the dead instance masked as invalid
    (``ClusterView.dead_*``), so it never names it: nothing replaced, and short prompts are still deflected."""
    router = _route_with_one_down(f"learned:path={TRAINED}", down)
    assert router.m.fallbacks == {"policy_error": 0, "invalid_decision": 0, "dead_instance": 0}
    assert router.decisions["forced_deflect"] == 0
    assert router.decisions["prefill"] > 0 and router.decisions["deflect"] > 0


@pytest.mark.parametrize("policy", ["recompute", "fail"])
async def test_prefill_lost_after_answering_the_decode_side_result_is_passed_on(aiohttp_server, aiohttp_client,
                                                                                policy):
    from deflectlab.serving.emulator import EmulatorConfig, make_app

    p = Fake("prefill")  # answers with kv_transfer_params of an instance that is gone (nothing on port 1)
    p_server = await aiohttp_server(p.app())
    d_server = await aiohttp_server(make_app(EmulatorConfig(role="decode", time_scale=0.01,
                                                            kv_load_failure_policy=policy)))
    router = Router(RouterConfig.of([("127.0.0.1", p_server.port)], [("127.0.0.1", d_server.port)],
                                    "never_deflect", **FAST))
    client = await aiohttp_client(router.app())
    body = {"prompt": list(range(300)), "max_tokens": 3}
    r_json = await client.post("/v1/completions", json=body)
    await _until(lambda: router.decode[0].alive)  # a 500 takes D out until its /health answers
    r_sse = await client.post("/v1/completions", json=body | {"stream": True})
    raw = await r_sse.read()
    if policy == "recompute":  # vLLM's default: D prefills the prompt itself, the client sees a normal answer
        assert r_json.status == 200 and (await r_json.json())["usage"]["completion_tokens"] == 3
        assert r_sse.status == 200 and raw.endswith(b"data: [DONE]\n\n")
        assert router.outcomes["ok"] == 2
    else:
        err = await r_json.json()
        assert r_json.status == 502 and router.decode[0].label in err["message"]
        assert "kv_load_failure_policy=fail" in err["message"]
        assert r_sse.status == 200 and b"[DONE]" not in raw
        events = [ln for ln in raw.split(b"\n") if ln.startswith(b"data: ")]
        assert len(events) == 1 and b"kv_load_failure_policy=fail" in events[0]  # D's own event, passed on
        assert router.outcomes["upstream_error"] == 2
    _balanced(router, 2)


async def test_a_router_bug_is_a_500_json_error_counted_once(aiohttp_server, aiohttp_client, monkeypatch):
    router, client, ps, ds, _ = await _cluster(aiohttp_server, aiohttp_client)

    async def bug(call, p):
        raise KeyError("oops")

    monkeypatch.setattr(router, "_prefill_hop", bug)
    r = await client.post("/v1/completions", json={"prompt": "x"})
    err = await r.json()
    assert r.status == 500 and err["object"] == "error" and "KeyError" in err["message"]
    assert router.outcomes["router_error"] == 1
    _balanced(router, 1)


async def test_a_failing_policy_falls_back_and_says_why(aiohttp_server, aiohttp_client, caplog):
    from deflectlab.envs.view import Policy

    class Broken(Policy):
        name = "broken"

        def decide(self, view, request):
            raise RuntimeError("no model loaded")

    router, client, ps, ds, _ = await _cluster(aiohttp_server, aiohttp_client, policy=Broken())
    with caplog.at_level(logging.WARNING, logger="deflectlab.router"):
        assert await _complete(client, 3) == [200] * 3
    assert router.m.fallbacks["policy_error"] == 3 and router.decisions["prefill"] == 3
    assert sum("no model loaded" in rec.message for rec in caplog.records) == 1  # logged once
    assert [f.calls for f in ps] == [2, 1]  # round robin over live prefill instances
    _balanced(router, 3)
