"""The router's overhead work: the decode hop's body spliced rather than re-serialised, a relayed stream's
headers sent with its first chunk, the event loop choice, and bench_router's own arithmetic and flags."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
from pathlib import Path

import pytest
from aiohttp import web

from deflectlab.serving.protocol import with_kv_params
from deflectlab.serving.router import Call, Router, _StreamOut, pick_event_loop
from deflectlab.serving.router_config import RouterConfig

REPO = Path(__file__).resolve().parents[1]
KVP = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "e-1", "remote_block_ids": [4, 5],
       "remote_host": "10.0.0.7", "remote_port": 5600, "tp_size": 1}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_router", REPO / "scripts" / "bench_router.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("raw", [
    b'{"prompt":[1,2,3],"max_tokens":8,"stream":true}',
    b' \n{ "prompt" : "a } b \\" {" ,\n  "stream": false }\r\n\t',  # braces and quotes inside a string
    json.dumps({"messages": [{"role": "user", "content": "h\u00e9llo \u2603"}], "n": {"x": [{}]}},
               ensure_ascii=False).encode(),
])
def test_with_kv_params_adds_the_params_and_keeps_every_other_byte(raw):
    out = with_kv_params(raw, KVP)
    assert json.loads(out) == {**json.loads(raw), "kv_transfer_params": KVP}
    head = raw.strip(b" \t\r\n")[:-1]  # the client's bytes up to its closing brace are sent as they came
    assert out[:len(head)] == head and out.endswith(b"}")


@pytest.mark.parametrize("raw", [
    '{"prompt": "x"}'.encode("utf-16"), '{"prompt": "x"}'.encode("utf-16-le"), '{"prompt": "x"}'.encode("utf-16-be"),
    '{"prompt": "x"}'.encode("utf-32"), b'\xef\xbb\xbf{"prompt": "x"}', b"{}", b" {  } ",
])
def test_with_kv_params_declines_bodies_it_cannot_splice(raw):
    assert with_kv_params(raw, KVP) is None


def _call(raw: bytes) -> Call:
    call = Call.__new__(Call)
    call.raw, call.body, call.headers = raw, json.loads(raw), {"X-Request-Id": "r"}
    return call


def test_decode_body_splices_and_falls_back_to_a_full_dump():
    r = Router(RouterConfig([("127.0.0.1", 1)], [("127.0.0.1", 2)], "round_robin"))
    raw = b'{"prompt": [5, 6], "stream": true}'
    data, hdrs = r._decode_body(_call(raw), KVP, None)
    assert data.startswith(b'{"prompt": [5, 6], "stream": true') and json.loads(data)["kv_transfer_params"] == KVP
    own = b'{"prompt": [5], "kv_transfer_params": {"do_remote_decode": true}}'  # the client's own params: replaced
    data, _ = r._decode_body(_call(own), KVP, None)
    assert json.loads(data) == {"prompt": [5], "kv_transfer_params": KVP}
    data, hdrs = r._decode_body(_call(raw), None, 64)  # the deflect path: the client's bytes, the cap in a header
    assert data is not None and data == raw and hdrs["X-Deflectlab-Chunk-Cap"] == "64"


async def _slow_decode(request: web.Request) -> web.StreamResponse:
    """A decode instance that sends its 200 headers at once and its first chunk 0.3 s later."""
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(0.3)
    await resp.write(b'data: {"choices":[{"text":" a"}]}\n\n')
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _ok(request: web.Request) -> web.Response:
    return web.Response()


async def test_a_streams_headers_arrive_with_its_first_chunk(aiohttp_server):
    d = web.Application()
    d.router.add_post("/v1/completions", _slow_decode)
    d.router.add_get("/health", _ok)
    ds = await aiohttp_server(d)
    router = Router(RouterConfig([], [("127.0.0.1", ds.port)], "round_robin"))
    rs = await aiohttp_server(router.app())
    reader, writer = await asyncio.open_connection("127.0.0.1", rs.port)
    body = b'{"prompt": [1, 2], "max_tokens": 1, "stream": true}'
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    first = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    # the router holds D's 200 until D's first chunk: the client's first read has both (one send, one wake-up)
    assert first.startswith(b"HTTP/1.1 200") and b"data: " in first


SSE = [b'data: {"choices":[{"index":0,"text":" a"}]}\n\n', b'data: {"choices":[{"index":0,"text":" b"}]}\n\n']


@pytest.mark.parametrize("done", [True, False])
async def test_a_stream_that_arrived_whole_leaves_in_one_write_with_its_end(aiohttp_server, aiohttp_client,
                                                                            monkeypatch, done):
    """D's whole answer (and its end) came in one read: the router relays it with the end of its own answer in
    one write_eof, no separate write; a stream without [DONE] gets the router's error event in that write."""
    d_bytes = b"".join(SSE) + (b"data: [DONE]\n\n" if done else b"")

    async def whole(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=d_bytes, headers={"Content-Type": "text/event-stream"})

    d = web.Application()
    d.router.add_post("/v1/completions", whole)
    d.router.add_get("/health", _ok)
    ds = await aiohttp_server(d)
    router = Router(RouterConfig([], [("127.0.0.1", ds.port)], "round_robin"))  # no prefill: deflected
    calls: list[tuple[str, bytes]] = []
    write, write_eof = _StreamOut.write, _StreamOut.write_eof

    async def spy_write(self, data):
        calls.append(("write", bytes(data)))
        return await write(self, data)

    async def spy_eof(self, data=b""):
        calls.append(("write_eof", bytes(data)))
        return await write_eof(self, data)

    monkeypatch.setattr(_StreamOut, "write", spy_write)
    monkeypatch.setattr(_StreamOut, "write_eof", spy_eof)
    client = await aiohttp_client(router.app())
    r = await client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2, "stream": True})
    got = await r.read()
    # one write_eof with every byte, no write; later calls are aiohttp's own closing write_eof(), a no-op by then
    assert r.status == 200 and calls[0] == ("write_eof", got) and set(calls[1:]) <= {("write_eof", b"")}
    if done:
        assert got == d_bytes and router.outcomes["ok"] == 1
    else:
        assert got.startswith(d_bytes) and router.outcomes["upstream_error"] == 1
        err = json.loads(got[len(d_bytes):].strip()[len(b"data: "):])["error"]
        assert "ended its stream on the decode hop without [DONE]" in err["message"]


async def test_in_flight_gauge_reads_the_router_count(aiohttp_client):
    router = Router(RouterConfig([], [("127.0.0.1", 2)], "round_robin"))
    client = await aiohttp_client(router.app())
    router.m.in_flight_now = 3  # as if three requests were being served
    page = await (await client.get("/metrics")).text()
    assert "deflectlab_router_requests_in_flight 3.0" in page.splitlines()


def test_pick_event_loop():
    try:
        assert pick_event_loop("asyncio") == "asyncio"
        has_uvloop = importlib.util.find_spec("uvloop") is not None
        assert pick_event_loop("auto") == ("uvloop" if has_uvloop else "asyncio")
        if has_uvloop:
            assert pick_event_loop("uvloop") == "uvloop"
            assert type(asyncio.get_event_loop_policy()).__module__.startswith("uvloop")
        else:
            with pytest.raises(ValueError, match="pip install uvloop"):
                pick_event_loop("uvloop")
        with pytest.raises(ValueError, match="'trio'"):
            pick_event_loop("trio")
    finally:
        asyncio.set_event_loop_policy(None)


def test_bench_summary_and_table_by_hand():
    b = _bench()

    def run(e2e_ms, cpu_proxy, cpu_client, lag_ms=(0.0,), failures=0):
        r = b.Run([x / 1e3 for x in e2e_ms], [0.0] * len(e2e_ms), failures, [x / 1e3 for x in lag_ms])
        r.cpu_proxy, r.cpu_client, r.cpu_upstream, r.wall = cpu_proxy, cpu_client, 0.003, 0.5
        return r

    runs = {
        "direct two hops": [run([1, 2], float("nan"), 0.001), run([3, 4], float("nan"), 0.001)],
        "router two-hop path": [run([2, 3], 0.002, 0.001), run([4, 5], 0.002, 0.001, failures=1)],
        "proxy toy": [run([5, 6, 7, 8], 0.020, 0.002, lag_ms=(1.0, 3.0))],
    }
    out = b._table(100, runs)
    two_hop = out["router two-hop path"]
    # percentiles with linear interpolation: p50 of 2,3,4,5 is 3.5 ms, p99 is 4 + 0.97 = 4.97 ms
    assert two_hop["n"] == 4 and two_hop["failed"] == 1
    assert two_hop["p50_ms"] == pytest.approx(3.5) and two_hop["p99_ms"] == pytest.approx(4.97)
    assert two_hop["added_p50_ms"] == pytest.approx(1.0) and two_hop["added_p99_ms"] == pytest.approx(1.0)
    assert two_hop["proxy_cpu_ms_per_req"] == pytest.approx(1.0)  # 4 ms of CPU over 4 answers
    assert two_hop["client_cpu_ms_per_req"] == pytest.approx(0.5)
    assert two_hop["upstream_cpu_ms_per_req"] == pytest.approx(1.5)  # 6 ms of upstream CPU over 4 answers
    assert two_hop["proxy_util"] == pytest.approx(0.004)  # 4 ms of CPU in 1 s of wall time
    toy = out["proxy toy"]  # p50 6.5 - 2.5 = 4.0 added; CPU 20 ms over 4 answers
    assert toy["added_p50_ms"] == pytest.approx(4.0) and toy["proxy_cpu_ms_per_req"] == pytest.approx(5.0)
    assert toy["send_lag_p99_ms"] == pytest.approx(1.0 + 0.99 * 2.0)
    assert out["ratio vs proxy toy"]["p50"] == pytest.approx(1.0 / 4.0)


def test_bench_cpu_seconds_reads_proc_like_process_time():
    b = _bench()
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("no /proc")
    p0, t0 = b.cpu_seconds(os.getpid()), b.cpu_seconds(None)
    x = 0
    while b.cpu_seconds(None) - t0 < 0.3:  # burn 0.3 s of this process's CPU
        x += 1
    dp, dt = b.cpu_seconds(os.getpid()) - p0, b.cpu_seconds(None) - t0
    assert dp == pytest.approx(dt, abs=0.05)  # /proc counts in clock ticks (10 ms)
    assert b.cpu_seconds(2**22 + 12345) != b.cpu_seconds(2**22 + 12345)  # no such process: NaN


@pytest.mark.parametrize("parse,text,needle", [
    ("_proxy_arg", "toy", "NAME=http"), ("_proxy_arg", "toy=localhost:1", "NAME=http"),
    ("_cmd_arg", "toy=python proxy.py --port 1", "{port}"), ("_cmd_arg", "python x.py --port {port}", "{port}"),
    ("_pid_arg", "toy=abc", "NAME=PID"),
])
def test_bench_flags_name_the_problem(parse, text, needle):
    with pytest.raises(argparse.ArgumentTypeError, match=needle.replace("{", r"\{").replace("}", r"\}")):
        getattr(_bench(), parse)(text)


def test_bench_starts_a_proxy_command_and_reports_one_that_dies(tmp_path):
    import sys

    from deflectlab.serving.procs import Processes

    b = _bench()
    ports = {"prefill": 1111, "decode": 2222}
    with Processes() as procs:
        url, pid = b._start_proxy(procs, "web", f"{sys.executable} -m http.server {{port}} --bind 127.0.0.1",
                                  ports, tmp_path)
        web = procs.procs[-1]
        assert url.startswith("http://127.0.0.1:") and web.pid == pid and web.poll() is None
        with pytest.raises(SystemExit, match=r"--proxy-cmd bad exited with 3.*ports 1111 2222"):
            b._start_proxy(procs, "bad", f"{sys.executable} -c \"import sys; print('ports', *sys.argv[1:]); "
                                         f"sys.exit(3)\" {{prefill_port}} {{decode_port}} {{port}}", ports, tmp_path)
    assert web.poll() is not None  # stopped with the emulators and routers


def test_bench_profile_groups_keep_every_second_and_charge_builtins_to_callers(tmp_path):
    import cProfile
    import pstats

    from deflectlab.serving.prefix_view import request_block_hashes

    body = {"prompt": list(range(256))}
    prof = cProfile.Profile()
    prof.runcall(lambda: [request_block_hashes(body, 16) for _ in range(200)] + [json.dumps(body)])
    prof.dump_stats(tmp_path / "p.prof")
    groups = _bench().profile_groups(tmp_path / "p.prof")
    stats = pstats.Stats(str(tmp_path / "p.prof")).stats
    assert sum(groups.values()) == pytest.approx(sum(v[2] for v in stats.values()), rel=1e-6)  # nothing lost
    # the hashing's built-ins (blake2b, array, int.from_bytes, ...) are the prefix estimate's: its group holds
    # all of their time, and exactly the time under request_block_hashes (its cumulative time: a structural check,
    # not a share of the profile, which a descheduling on a loaded machine can move)
    blake = sum(v[2] for (f, _, n), v in stats.items() if f == "~" and "blake2b" in n)
    assert blake > 0 and groups["router: prefix estimate"] >= blake
    under = next(v[3] for (f, _, n), v in stats.items() if n == "request_block_hashes")
    assert groups["router: prefix estimate"] == pytest.approx(under, rel=1e-6)
