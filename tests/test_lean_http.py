"""The benchmark's lean HTTP pieces (scripts/lean_http.py): the incremental response reader against responses
written out by hand, and the upstream stand-ins speaking vLLM's P/D protocol to the lean client and through
the router."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from deflectlab.scripts.lean_http import HttpError, LeanClient, Response, Upstream, request_bytes, serve_upstream
from deflectlab.serving.load_view import parse_vllm_metrics
from deflectlab.serving.procs import free_ports
from deflectlab.serving.router import Router
from deflectlab.serving.router_config import RouterConfig

H = "127.0.0.1"
# chunked: "data: a\n\n" (9 bytes), "data: [DONE]\n\n" (14 = 0xe bytes), a chunk extension, then the end
CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"9\r\ndata: a\n\n\r\ne;ext=1\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
LENGTH = b'HTTP/1.1 400 Bad Request\r\ncontent-length: 11\r\nConnection: close\r\n\r\n{"x": [1]}\n'


@pytest.mark.parametrize("step", [1, 7, len(CHUNKED)])
def test_chunked_response_read_in_pieces(step):
    r = Response(keep_body=True)
    head_end = CHUNKED.index(b"\r\n\r\n") + 4
    done_at = None
    for i in range(0, len(CHUNKED), step):
        if r.feed(CHUNKED[i:i + step], now=float(i)):
            done_at = i
            break
    assert done_at is not None and done_at + step >= len(CHUNKED)  # complete only with the last bytes
    assert r.status == 200 and r.keep_alive and bytes(r.body) == b"data: a\n\ndata: [DONE]\n\n"
    assert r.body_bytes == 23
    # the first body byte is the first one after the chunk-size line "9\r\n": the piece holding it is the clock
    first_body = head_end + 3
    assert r.first_at == float(first_body - first_body % step)
    assert r.end_at == float(done_at)


def test_length_response_and_connection_close():
    r = Response(keep_body=True)
    assert not r.feed(LENGTH[:-3], 1.0)
    assert r.feed(LENGTH[-3:], 2.0)
    assert r.status == 400 and not r.keep_alive and json.loads(bytes(r.body)) == {"x": [1]}
    assert (r.first_at, r.end_at) == (1.0, 2.0)
    empty = Response()
    assert empty.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 3.0) and empty.first_at == 0.0
    old = Response()
    assert old.feed(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", 1.0) and not old.keep_alive


@pytest.mark.parametrize("raw,needle", [
    (b"SSH-2.0-OpenSSH\r\n\r\n", "status line"),
    (b"HTTP/1.1 200 OK\r\n\r\n", "without Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd", "CRLF"),
])
def test_malformed_responses_name_the_problem(raw, needle):
    with pytest.raises(HttpError, match=needle):
        Response().feed(raw, 0.0)


def test_request_bytes_by_hand():
    assert request_bytes("h", 9, "/v1/completions", b"{}", {"X-Request-Id": "r"}) == (
        b"POST /v1/completions HTTP/1.1\r\nHost: h:9\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        b"X-Request-Id: r\r\n\r\n{}")


async def _stand_ins() -> tuple[Upstream, Upstream, list[asyncio.Task]]:
    p_port, d_port = free_ports(2)
    ups, tasks = [Upstream("prefill", p_port), Upstream("decode", d_port)], []
    for up in ups:
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(serve_upstream(up, H, ready)))
        await ready.wait()
    return ups[0], ups[1], tasks


def _events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


async def test_stand_ins_speak_the_pd_protocol():
    p, d, tasks = await _stand_ins()
    p_port, d_port = p.port, d.port
    client = LeanClient()
    try:
        asked = {"prompt": [1, 2, 3], "max_tokens": 1, "stream": False,
                 "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
        r = await client.request((H, p_port), request_bytes(H, p_port, "/v1/completions",
                                                            json.dumps(asked).encode()), keep_body=True)
        kvp = json.loads(bytes(r.body))["kv_transfer_params"]
        assert r.status == 200 and kvp["do_remote_prefill"] is True and kvp["remote_port"] == p_port
        plain = json.dumps({"prompt": [1, 2, 3], "max_tokens": 1}).encode()  # no remote decode asked: no params
        r = await client.request((H, p_port), request_bytes(H, p_port, "/v1/completions", plain), keep_body=True)
        assert "kv_transfer_params" not in json.loads(bytes(r.body))
        body = json.dumps({"prompt": [1], "max_tokens": 3, "stream": True, "kv_transfer_params": kvp}).encode()
        r = await client.request((H, d_port), request_bytes(H, d_port, "/v1/completions", body), keep_body=True)
        ev = _events(bytes(r.body))
        assert r.status == 200 and len(ev) == 4 and ev[-1] == b"data: [DONE]"  # 3 tokens, then [DONE]
        assert d.handoffs == 1 and d.running == 0
        assert [json.loads(e[6:])["choices"][0]["finish_reason"] for e in ev[:3]] == [None, None, "length"]
        bad = await client.request((H, d_port), request_bytes(H, d_port, "/v1/completions", b"{nope"),
                                   keep_body=True)
        assert bad.status == 400 and "bad JSON" in json.loads(bytes(bad.body))["message"]
        assert len(client._idle[(H, d_port)]) == 1  # the same keep-alive connection served all three
        reader, writer = await asyncio.open_connection(H, d_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        page = (await reader.read()).split(b"\r\n\r\n", 1)[1].decode()
        writer.close()
        assert parse_vllm_metrics(page) == {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0,
                                            "vllm:kv_cache_usage_perc": 0.0}
    finally:
        client.close()
        for t in tasks:
            t.cancel()


@pytest.mark.parametrize("policy,decision", [("round_robin", "prefill"), ("always_deflect", "deflect")])
async def test_router_between_the_stand_ins(policy, decision):
    p, d, tasks = await _stand_ins()
    router = Router(RouterConfig([(H, p.port)], [(H, d.port)], policy, time_scale=0.001))
    runner = web.AppRunner(router.app())
    await runner.setup()
    r_port = free_ports(1)[0]
    await web.TCPSite(runner, H, r_port).start()
    client = LeanClient()
    try:
        body = json.dumps({"prompt": list(range(40)), "max_tokens": 5, "stream": True}).encode()
        for _ in range(3):
            r = await client.request((H, r_port), request_bytes(H, r_port, "/v1/completions", body), keep_body=True)
            ev = _events(bytes(r.body))
            assert r.status == 200 and len(ev) == 6 and ev[-1] == b"data: [DONE]"
        assert router.outcomes["ok"] == 3 and router.decisions[decision] == 3
        assert d.handoffs == (3 if decision == "prefill" else 0)  # P's params reached D on the two-hop path only
        assert router.m.in_flight_now == 0
    finally:
        client.close()
        await runner.cleanup()
        for t in tasks:
            t.cancel()
