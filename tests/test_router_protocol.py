"""The router speaks vLLM's disaggregated-serving protocol exactly.

Recording upstreams (aiohttp test servers standing in for vLLM prefill and decode instances) capture the
bodies and headers of both hops; the tests compare them with what vLLM's P/D proxy sends.
"""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from deflectlab.serving.load_view import parse_vllm_metrics
from deflectlab.serving.protocol import (
    CHAT_REPLY_PRIMING_TOKENS,
    CHAT_TOKENS_PER_MESSAGE,
    CHUNK_CAP_HEADER,
    PRODUCER_REQUEST_PARAMS,
    RequestError,
    estimate_text_tokens,
    parse_request,
    prompt_token_counts,
)
from deflectlab.serving.router import Router
from deflectlab.serving.router_config import RouterConfig

P_PARAMS = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "engine-p0",
            "remote_block_ids": [7, 8, 9], "remote_host": "10.0.0.5", "remote_port": 5600, "tp_size": 1}
SSE_BYTES = (b'data: {"id":"cmpl-x","object":"text_completion","choices":[{"index":0,"text":" a"}]}\n\n'
             b'data: {"id":"cmpl-x","object":"text_completion","choices":[{"index":0,"text":" b",'
             b'"finish_reason":"length"}]}\n\ndata: [DONE]\n\n')
JSON_BYTES = b'{"id":"cmpl-x","object":"text_completion","choices":[{"index":0,"text":" a b"}],"weird":  1}'
METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
"""


def make_router(prefill, decode, policy="round_robin", **kw) -> Router:
    return Router(RouterConfig.of(prefill, decode, policy, **kw))


class Upstream:
    """A recording stand-in for one vLLM instance."""

    def __init__(self, role: str, kvp: dict | None = P_PARAMS, status: int = 200) -> None:
        self.role = role
        self.kvp = kvp
        self.status = status
        self.calls: list[dict] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.calls.append({"path": request.path, "headers": request.headers.copy(), "raw": raw,
                           "body": json.loads(raw)})
        if self.status != 200:
            msg = {"object": "error", "message": f"upstream says {self.status}", "type": "X", "code": self.status}
            return web.json_response(msg, status=self.status)
        body = json.loads(raw)
        if self.role == "prefill":
            out = {"id": "cmpl-p", "object": "text_completion", "choices": [{"index": 0, "text": " a"}]}
            if self.kvp is not None:
                out["kv_transfer_params"] = self.kvp
            return web.json_response(out)
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
            await resp.prepare(request)
            await resp.write(SSE_BYTES[:40])
            await resp.write(SSE_BYTES[40:])
            await resp.write_eof()
            return resp
        return web.Response(body=JSON_BYTES, content_type="application/json")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=METRICS)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)


async def _setup(aiohttp_server, aiohttp_client, policy="round_robin", p_kw=None, d_kw=None, n_d=1):
    p = Upstream("prefill", **(p_kw or {}))
    ds = [Upstream("decode", **(d_kw or {})) for _ in range(n_d)]
    ps = await aiohttp_server(p.app())
    dss = [await aiohttp_server(d.app()) for d in ds]
    router = make_router([("127.0.0.1", ps.port)], [("127.0.0.1", s.port) for s in dss], policy)
    client = await aiohttp_client(router.app())
    return router, client, p, ds


def _body(chat: bool, stream: bool) -> dict:
    b: dict = {"model": "m", "max_tokens": 20, "temperature": 0.0, "stream": stream, "min_tokens": 3}
    if chat:
        b["messages"] = [{"role": "user", "content": "hello there"}]
        b["max_completion_tokens"] = 20
        b["min_completion_tokens"] = 2
    else:
        b["prompt"] = [1, 2, 3, 4, 5]
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
async def test_prefill_path_bodies_and_headers(aiohttp_server, aiohttp_client, chat, stream):
    router, client, p, (d,) = await _setup(aiohttp_server, aiohttp_client)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = _body(chat, stream)
    resp = await client.post(path, json=body, headers={"Authorization": "Bearer sk-test"})
    got = await resp.read()
    assert resp.status == 200
    assert got == (SSE_BYTES if stream else JSON_BYTES)  # D's bytes, unchanged

    assert len(p.calls) == 1 and len(d.calls) == 1
    pc, dc = p.calls[0], d.calls[0]
    assert pc["path"] == dc["path"] == path
    expect_p = {k: v for k, v in body.items() if k not in ("stream_options", "min_tokens", "min_completion_tokens")}
    expect_p.update(kv_transfer_params=PRODUCER_REQUEST_PARAMS, stream=False, max_tokens=1)
    if chat:
        expect_p["max_completion_tokens"] = 1
    assert pc["body"] == expect_p
    assert dc["body"] == {**body, "kv_transfer_params": P_PARAMS}  # P's params verbatim, the rest untouched
    rid = pc["headers"]["X-Request-Id"]
    assert rid and dc["headers"]["X-Request-Id"] == rid
    for c in (pc, dc):
        assert c["headers"]["Authorization"] == "Bearer sk-test"
        assert c["headers"]["Content-Type"] == "application/json"
        assert CHUNK_CAP_HEADER not in c["headers"]
    assert router.decisions["prefill"] == 1 and router.outcomes["ok"] == 1


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("stream", [False, True])
async def test_deflect_path_goes_straight_to_decode(aiohttp_server, aiohttp_client, chat, stream):
    router, client, p, (d,) = await _setup(aiohttp_server, aiohttp_client, policy="always_deflect")
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = _body(chat, stream)
    raw = json.dumps(body).encode()
    resp = await client.post(path, data=raw, headers={"X-Request-Id": "client-id-1",
                                                      "Content-Type": "application/json"})
    assert resp.status == 200
    assert await resp.read() == (SSE_BYTES if stream else JSON_BYTES)
    assert p.calls == []
    (dc,) = d.calls
    assert dc["raw"] == raw  # no kv_transfer_params in the client's body: its bytes are forwarded untouched
    assert dc["headers"]["X-Request-Id"] == "client-id-1"
    assert router.decisions["deflect"] == 1


async def test_deflect_path_strips_client_kv_params_and_sends_chunk_cap(aiohttp_server, aiohttp_client):
    router, client, p, (d,) = await _setup(aiohttp_server, aiohttp_client, policy="always_deflect:chunk=256")
    body = {"prompt": "hi", "max_tokens": 4, "kv_transfer_params": {"do_remote_decode": True}}
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 200
    (dc,) = d.calls
    assert dc["body"] == {"prompt": "hi", "max_tokens": 4}
    assert dc["headers"][CHUNK_CAP_HEADER] == "256"


async def test_prefill_answer_without_params_is_an_implicit_deflection(aiohttp_server, aiohttp_client):
    router, client, p, (d,) = await _setup(aiohttp_server, aiohttp_client, p_kw={"kvp": None})
    body = _body(False, True)
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 200 and await resp.read() == SSE_BYTES
    assert d.calls[0]["body"] == body  # D recomputes the prompt: no params
    assert router.decisions["implicit_deflect"] == 1
    metrics = await (await client.get("/metrics")).text()
    assert 'deflectlab_router_decisions_total{kind="implicit_deflect"} 1.0' in metrics


@pytest.mark.parametrize("raw,needle", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"max_tokens": 5}', "'prompt' is required"),
    (b'{"prompt": "x", "max_tokens": 0}', "'max_tokens' must be at least 1"),
    (b'{"prompt": "x", "max_tokens": "7"}', "'max_tokens' must be an integer"),
    (b'{"prompt": [1, -2]}', "token ids must be integers >= 0"),
    (b'{"prompt": {"a": 1}}', "'prompt' must be"),
    (b'{"prompt": "x", "stream": "yes"}', "'stream' must be a boolean"),
])
async def test_malformed_requests_get_400_naming_the_problem(aiohttp_server, aiohttp_client, raw, needle):
    router, client, p, (d,) = await _setup(aiohttp_server, aiohttp_client)
    resp = await client.post("/v1/completions", data=raw)
    assert resp.status == 400
    err = await resp.json()
    assert err["object"] == "error" and err["type"] == "BadRequestError" and err["code"] == 400
    assert needle in err["message"]
    assert p.calls == [] and d.calls == []
    assert router.outcomes["bad_request"] == 1


async def test_chat_without_messages_is_400(aiohttp_server, aiohttp_client):
    router, client, p, (d,) = await _setup(aiohttp_server, aiohttp_client)
    resp = await client.post("/v1/chat/completions", json={"model": "m", "max_tokens": 3})
    assert resp.status == 400
    assert "'messages' is required" in (await resp.json())["message"]


async def test_upstream_4xx_passes_through_and_5xx_becomes_502_naming_the_instance(aiohttp_server, aiohttp_client):
    router, client, p, (d,) = await _setup(aiohttp_server, aiohttp_client, p_kw={"status": 400})
    resp = await client.post("/v1/completions", json={"prompt": "x"})
    assert resp.status == 400 and (await resp.json())["message"] == "upstream says 400"
    assert d.calls == [] and router.outcomes["upstream_client_error"] == 1

    router, client, p, (d,) = await _setup(aiohttp_server, aiohttp_client, d_kw={"status": 500})
    resp = await client.post("/v1/completions", json={"prompt": "x", "stream": True})
    assert resp.status == 502
    err = await resp.json()
    assert err["code"] == 502 and router.decode[0].label in err["message"] and "HTTP 500" in err["message"]
    assert router.outcomes["upstream_error"] == 1


async def test_unreachable_instances_leave_rotation_and_requests_still_succeed(aiohttp_server, aiohttp_client,
                                                                               unused_tcp_port_factory):
    d_live = Upstream("decode")
    d_server = await aiohttp_server(d_live.app())
    dead_p, dead_d = unused_tcp_port_factory(), unused_tcp_port_factory()
    router = make_router([("127.0.0.1", dead_p)], [("127.0.0.1", dead_d), ("127.0.0.1", d_server.port)],
                         "round_robin", decode_balancer="round_robin")
    client = await aiohttp_client(router.app())
    for _ in range(4):
        resp = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert resp.status == 200 and await resp.read() == JSON_BYTES
    assert len(d_live.calls) == 4
    assert not router.prefill[0].alive and not router.decode[0].alive and router.decode[1].alive
    assert router.decisions["forced_deflect"] >= 3  # no live prefill instance: deflected
    assert router.outcomes == {**router.outcomes, "ok": 4}
    health = await (await client.get("/healthcheck")).json()
    assert health["live_prefill_instances"] == 0 and health["live_decode_instances"] == 1
    metrics = await (await client.get("/metrics")).text()
    assert f'deflectlab_router_instance_up{{instance="127.0.0.1:{dead_d}",role="decode"}} 0.0' in metrics


async def test_router_metrics_names(aiohttp_server, aiohttp_client):
    router, client, p, (d,) = await _setup(aiohttp_server, aiohttp_client)
    await (await client.post("/v1/completions", json={"prompt": "x"})).read()
    text = await (await client.get("/metrics")).text()
    for name in ("deflectlab_router_requests_total", "deflectlab_router_decisions_total",
                 "deflectlab_router_hop_seconds_bucket", "deflectlab_router_decision_seconds_bucket",
                 "deflectlab_router_overhead_seconds_bucket", "deflectlab_router_instance_up"):
        assert name in text
    assert 'hop="prefill"' in text and 'hop="decode_first_byte"' in text


def test_prompt_token_count_rules():
    assert prompt_token_counts({"prompt": [5, 6, 7]}, chat=False) == [3]
    assert prompt_token_counts({"prompt": [[5, 6], [7]]}, chat=False) == [2, 1]
    assert prompt_token_counts({"prompt": "abcdefgh"}, chat=False) == [2]
    assert estimate_text_tokens("a") == 1 and estimate_text_tokens("é" * 4) == 2  # utf-8 bytes / 4
    msgs = [{"role": "system", "content": "abcd"},
            {"role": "user", "content": [{"type": "text", "text": "abcdefgh"}, {"type": "image_url"}]}]
    assert prompt_token_counts({"messages": msgs}, chat=True) == [
        CHAT_REPLY_PRIMING_TOKENS + 2 * CHAT_TOKENS_PER_MESSAGE + 1 + 2]
    with pytest.raises(RequestError, match="'prompt' must not be empty"):
        prompt_token_counts({"prompt": ""}, chat=False)
    pr = parse_request(b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 9, '
                       b'"max_completion_tokens": 4}', chat=True)
    assert pr.max_tokens == 4 and pr.stream is False


def test_scraped_gauges_are_summed_over_engines():
    m = parse_vllm_metrics(METRICS)
    assert m["vllm:num_requests_running"] == 3.0
    assert m["vllm:num_requests_waiting"] == 4.0
    assert m["vllm:kv_cache_usage_perc"] == pytest.approx(0.375)
    assert parse_vllm_metrics("") == {}


def test_vllm_commands_print_a_nixl_cluster_behind_the_router():
    from deflectlab.scripts.cli import build_parser
    from deflectlab.scripts.cmd_vllm_commands import vllm_commands

    a = build_parser("vllm-commands").parse_args(["vllm-commands", "--shape", "2p2d", "--model",
                                                  "deepseek-ai/DeepSeek-V2-Lite",
                                   "--base-port", "9100"])
    text = vllm_commands(a)
    assert text.count("vllm serve deepseek-ai/DeepSeek-V2-Lite") == 4
    assert text.count('"kv_role":"kv_producer"') == 2 and text.count('"kv_role":"kv_both"') == 2
    assert "--port 9100" in text and "--port 9101" in text and "--port 9200" in text and "--port 9201" in text
    assert len({ln.split("VLLM_NIXL_SIDE_CHANNEL_PORT=")[1].split()[0] for ln in text.splitlines()
                if "SIDE_CHANNEL_PORT=" in ln}) == 4  # one side channel per instance
    assert "--prefiller-ports 9100 9101" in text and "--decoder-ports 9200 9201" in text


def test_route_cli_pairs_hosts_and_ports():
    from deflectlab.serving.router import pair_instances

    assert pair_instances(["h"], [1, 2], "prefiller") == [("h", 1), ("h", 2)]
    assert pair_instances(["a", "b"], [1, 2], "decoder") == [("a", 1), ("b", 2)]
    with pytest.raises(ValueError, match="number of decoder hosts"):
        pair_instances(["a", "b", "c"], [1, 2], "decoder")
    with pytest.raises(ValueError, match="policy file not found"):
        make_router([], [("127.0.0.1", 1)], "missing_policy.onnx")
    with pytest.raises(ValueError, match="unknown policy"):
        make_router([], [("127.0.0.1", 1)], "no_such_policy")


def test_exported_policy_paths_and_cluster_check(tmp_path):
    from deflectlab.envs.view import Decision, Policy

    with pytest.raises(ValueError, match="manifest.json"):  # a directory goes to the learned runtime
        make_router([], [("127.0.0.1", 1)], str(tmp_path))

    class TwoByTwoOnly(Policy):
        name = "two_by_two_only"

        def check_cluster(self, view):
            if (view.num_prefill, view.num_decode) != (2, 2):
                raise ValueError(f"trained for 2P2D, the cluster is {view.num_prefill}P{view.num_decode}D")

        def decide(self, view, request):
            return Decision.prefill(0)

    with pytest.raises(ValueError, match="trained for 2P2D, the cluster is 1P1D"):
        make_router([("127.0.0.1", 1)], [("127.0.0.1", 2)], TwoByTwoOnly())
    make_router([("127.0.0.1", 1), ("127.0.0.1", 2)], [("127.0.0.1", 3), ("127.0.0.1", 4)], TwoByTwoOnly())
