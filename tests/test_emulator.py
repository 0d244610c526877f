"""The engine emulator: vLLM's API shapes, metrics, kv_transfer_params, errors, and timing equal to the
simulator's (model time, so exact whatever the wall clock does)."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.workloads import Workload
from deflectlab.policies.registry import make_policy
from deflectlab.serving.emulator import FILLER, EmulatorConfig, filler_text, make_app

SCALE = 0.01  # 100x faster than the modelled GPU


async def _emulator(aiohttp_client, **kw):
    return await aiohttp_client(make_app(EmulatorConfig(time_scale=SCALE, **kw)))


async def _metrics(client) -> dict[str, list]:
    text = await (await client.get("/metrics")).text()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _sse_events(raw: bytes) -> list:
    """Parse an SSE body strictly: every event is one ``data: <json>`` line plus a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n")
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _sim_one(prompt: int, out: int, policy: str) -> dict:
    # rdma: the emulator times the engines and the transfer with the profile's terms; the router's hop and
    # step alignment happen for real in front of it, so the simulator must not add them here
    cfg = ClusterConfig(num_prefill=1, num_decode=1, handoff="rdma")
    wl = Workload(np.array([0.0]), np.array([prompt]), np.array([out]))
    res = ClusterSim(cfg, wl).run(make_policy(policy))
    return {k: float(res.records[k][0]) for k in ("ttft_s", "e2e_s", "prefill_exec_s", "transfer_s")}


async def test_completion_json_shape(aiohttp_client):
    c = await _emulator(aiohttp_client)
    resp = await c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 5},
                        headers={"X-Request-Id": "abc"})
    assert resp.status == 200
    body = await resp.json()
    assert body["id"] == "cmpl-abc" and body["object"] == "text_completion"
    assert body["model"] == EmulatorConfig().model_name
    (ch,) = body["choices"]
    assert ch["text"] == filler_text(5) and ch["finish_reason"] == "length" and ch["index"] == 0
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
                             "prompt_tokens_details": None}
    assert body["kv_transfer_params"] is None


@pytest.mark.parametrize("include_usage", [False, True])
async def test_completion_stream_is_well_formed(aiohttp_client, include_usage):
    c = await _emulator(aiohttp_client)
    body = {"prompt": "some text to count", "max_tokens": 7, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    resp = await c.post("/v1/completions", json=body)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    ev = _sse_events(await resp.read())
    assert ev[-1] == "[DONE]"
    tokens = [e for e in ev[:-1] if e["choices"]]
    assert [e["choices"][0]["text"] for e in tokens] == [FILLER[i] for i in range(7)]
    assert [e["choices"][0]["finish_reason"] for e in tokens] == [None] * 6 + ["length"]
    assert all(e["object"] == "text_completion" and e["id"] == tokens[0]["id"] for e in tokens)
    if include_usage:
        assert ev[-2]["choices"] == [] and ev[-2]["usage"] == {"prompt_tokens": 5, "completion_tokens": 7,
                                                                "total_tokens": 12}
    else:
        assert len(ev) == 8


async def test_chat_stream_and_json(aiohttp_client):
    c = await _emulator(aiohttp_client)
    msgs = [{"role": "user", "content": "hello"}]
    resp = await c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 3, "stream": True,
                                                     "stream_options": {"include_usage": True}})
    ev = _sse_events(await resp.read())
    assert ev[-1] == "[DONE]" and ev[-2]["usage"]["completion_tokens"] == 3
    assert ev[0]["object"] == "chat.completion.chunk" and ev[0]["id"].startswith("chatcmpl-")
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"]["content"] for e in ev[1:4]] == list(FILLER[:3])
    assert ev[3]["choices"][0]["finish_reason"] == "length"
    resp = await c.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 2})
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": filler_text(2), "tool_calls": []}


async def test_models_health_and_metric_names(aiohttp_client):
    c = await _emulator(aiohttp_client, model_name="my/model", engine_label="0")
    assert (await c.get("/health")).status == 200
    models = await (await c.get("/v1/models")).json()
    assert models["data"][0]["id"] == "my/model" and models["data"][0]["max_model_len"] == 32768
    await (await c.post("/v1/completions", json={"prompt": [1] * 40, "max_tokens": 4})).read()
    m = await _metrics(c)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:time_to_first_token_seconds",
                 "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds"):
        assert name in m, name
        for s in m[name]:
            assert s.labels["model_name"] == "my/model" and s.labels["engine"] == "0"
    val = {s.name: s.value for f in m.values() for s in f if "le" not in s.labels}
    assert val["vllm:prompt_tokens_total"] == 40 and val["vllm:generation_tokens_total"] == 4
    assert val["vllm:time_to_first_token_seconds_count"] == 1
    assert val["vllm:inter_token_latency_seconds_count"] == 3
    assert val["vllm:num_requests_running"] == 0 and val["vllm:num_requests_waiting"] == 0


@pytest.mark.parametrize("path,body,code,needle", [
    ("/v1/completions", b"{oops", 400, "not valid JSON"),
    ("/v1/completions", b'{"max_tokens": 3}', 400, "'prompt' is required"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "'messages' must be a non-empty list"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', 400, "'max_tokens' must be at least 1"),
    ("/v1/completions", b'{"prompt": [1, 2, 3, 4, 5, 6, 7, 8, 9]}', 400, "maximum context length is 8 tokens"),
    ("/v1/completions", b'{"prompt": [1, 2], "max_tokens": 7}', 400, "(2 in the messages, 7 in the completion)"),
    ("/v1/completions", b'{"prompt": ["a", "b"]}', 400, "one prompt per request"),
    ("/v1/completions", b'{"prompt": "x", "model": "other"}', 404, "The model `other` does not exist."),
    ("/v1/completions", b'{"prompt": "x", "kv_transfer_params": {"do_remote_prefill": true}}', 400,
     "needs remote_engine_id"),
])
async def test_bad_requests_get_vllm_style_errors(aiohttp_client, path, body, code, needle):
    c = await _emulator(aiohttp_client, max_model_len=8)
    resp = await c.post(path, data=body)
    assert resp.status == code
    err = await resp.json()
    assert set(err) == {"object", "message", "type", "param", "code"}
    assert err["object"] == "error" and err["code"] == code and needle in err["message"]


async def test_deflected_request_times_exactly_as_the_simulator(aiohttp_client):
    c = await _emulator(aiohttp_client, role="decode")
    resp = await c.post("/v1/completions", json={"prompt": list(range(3000)), "max_tokens": 6})
    assert resp.status == 200
    m = {s.name: s.value for f in (await _metrics(c)).values() for s in f}
    sim = _sim_one(3000, 6, "always_deflect")
    assert m["vllm:time_to_first_token_seconds_sum"] == pytest.approx(sim["ttft_s"], rel=1e-9)
    assert m["vllm:e2e_request_latency_seconds_sum"] == pytest.approx(sim["e2e_s"], rel=1e-9)


async def test_prefill_then_handoff_matches_the_simulator_and_frees_the_kv(aiohttp_client):
    p = await _emulator(aiohttp_client, role="prefill")
    d = await _emulator(aiohttp_client, role="decode")
    prompt = list(range(2500))
    resp = await p.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "stream": False,
                                                "kv_transfer_params": {"do_remote_decode": True,
                                                                       "do_remote_prefill": False}})
    pj = await resp.json()
    kvp = pj["kv_transfer_params"]
    assert set(kvp) == {"do_remote_prefill", "do_remote_decode", "remote_engine_id", "remote_block_ids",
                        "remote_host", "remote_port", "tp_size"}
    assert kvp["do_remote_prefill"] is True and kvp["do_remote_decode"] is False and kvp["tp_size"] == 1
    assert len(kvp["remote_block_ids"]) == math.ceil(2500 / 16)
    assert (kvp["remote_host"], kvp["remote_port"]) == ("127.0.0.1", p.server.port)
    assert pj["usage"]["completion_tokens"] == 1
    pm = {s.name: s.value for f in (await _metrics(p)).values() for s in f}
    assert pm["vllm:kv_cache_usage_perc"] > 0  # held until the decode side pulls it

    resp = await d.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "kv_transfer_params": kvp})
    assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 4
    for _ in range(100):  # the release call to P is asynchronous
        pm = {s.name: s.value for f in (await _metrics(p)).values() for s in f}
        if pm["vllm:kv_cache_usage_perc"] == 0:
            break
        await asyncio.sleep(0.01)
    assert pm["vllm:kv_cache_usage_perc"] == 0
    dm = {s.name: s.value for f in (await _metrics(d)).values() for s in f}
    sim = _sim_one(2500, 4, "round_robin")
    # P's TTFT is the prefill; D's (from its own arrival) the transfer plus the first step
    assert pm["vllm:time_to_first_token_seconds_sum"] == pytest.approx(sim["prefill_exec_s"], rel=1e-9)
    assert pm["vllm:time_to_first_token_seconds_sum"] + dm["vllm:time_to_first_token_seconds_sum"] == \
        pytest.approx(sim["ttft_s"], rel=1e-9)


async def test_chunk_cap_header_slows_a_deflected_prefill(aiohttp_client):
    c = await _emulator(aiohttp_client, role="both")
    body = {"prompt": list(range(2000)), "max_tokens": 1}
    await (await c.post("/v1/completions", json=body)).read()
    await (await c.post("/v1/completions", json=body, headers={"X-Deflectlab-Chunk-Cap": "256"})).read()
    ttft = [s.value for s in (await _metrics(c))["vllm:time_to_first_token_seconds"]
            if s.name.endswith("_sum")][0]
    one = _sim_one(2000, 1, "always_deflect")["ttft_s"]
    capped = _sim_one(2000, 1, "always_deflect:chunk=256")["ttft_s"]
    assert capped > one
    assert ttft == pytest.approx(one + capped, rel=1e-9)
    resp = await c.post("/v1/completions", json=body, headers={"X-Deflectlab-Chunk-Cap": "0"})
    assert resp.status == 400


async def _kvp_from_vanished_prefill(aiohttp_client, prompt: list[int]) -> dict:
    """Producer params from a prefill emulator that is then shut down before anyone reads the KV."""
    p = await _emulator(aiohttp_client, role="prefill")
    resp = await p.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True, "do_remote_prefill": False}})
    kvp = (await resp.json())["kv_transfer_params"]
    await p.close()
    return kvp


async def test_kv_read_from_a_vanished_prefill_is_recomputed_by_default(aiohttp_client):
    prompt = list(range(2500))
    kvp = await _kvp_from_vanished_prefill(aiohttp_client, prompt)
    d = await _emulator(aiohttp_client, role="decode")  # kv_load_failure_policy: vLLM's default, recompute
    resp = await d.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "kv_transfer_params": kvp})
    assert resp.status == 200 and (await resp.json())["usage"]["completion_tokens"] == 4
    dm = {s.name: s.value for f in (await _metrics(d)).values() for s in f}
    assert dm["deflectlab_emulator_kv_load_failures_total"] == 1
    # the modelled transfer ran, then the prompt was prefilled here, exactly as a deflected one
    defl = _sim_one(2500, 4, "always_deflect")
    transfer = _sim_one(2500, 4, "round_robin")["transfer_s"]
    assert dm["vllm:time_to_first_token_seconds_sum"] == pytest.approx(transfer + defl["ttft_s"], rel=1e-9)
    assert dm["vllm:kv_cache_usage_perc"] == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_kv_read_failure_with_policy_fail_ends_the_request_with_an_error(aiohttp_client, stream):
    prompt = list(range(300))
    kvp = await _kvp_from_vanished_prefill(aiohttp_client, prompt)
    d = await _emulator(aiohttp_client, role="decode", kv_load_failure_policy="fail")
    resp = await d.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "stream": stream,
                                                "kv_transfer_params": kvp})
    if stream:
        events = _sse_events(await resp.read())
        assert resp.status == 200 and "[DONE]" not in events
        err = events[-1]["error"]
    else:
        assert resp.status == 500
        err = await resp.json()
    assert err["code"] == 500 and "kv_load_failure_policy=fail" in err["message"]
    dm = {s.name: s.value for f in (await _metrics(d)).values() for s in f}
    assert dm["vllm:kv_cache_usage_perc"] == 0 and dm["vllm:num_requests_running"] == 0
    ok = await d.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2})  # the instance still serves
    assert ok.status == 200
