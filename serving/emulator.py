"""The engine emulator: a vLLM stand-in for tests and demos without GPUs.

It speaks vLLM's OpenAI-compatible HTTP API (``POST /v1/completions`` and ``/v1/chat/completions``, JSON and
SSE streaming, ``GET /v1/models``, ``/health``, ``/metrics`` with vLLM's metric names) and vLLM's
disaggregated-serving ``kv_transfer_params``, and times every request with the simulator's own step
schedulers (:class:`envs.prefill_node.PrefillNode`, :class:`envs.decode_node.DecodeNode`) driven in real time
from the asyncio loop, so a trace replayed through router and emulators and the same trace simulated agree.

Time. Model time runs ``1 / time_scale`` times as fast as the wall clock: an event the schedulers put at
model time ``t`` fires at wall time ``t0 + t * time_scale`` (``loop.call_at``), and a request arriving at wall
time ``w`` enters the model at ``(w - t0) / time_scale`` (never before the last event already handled).
``--time-scale 0.1`` runs ten times faster than the modelled GPU. Latencies in ``/metrics`` are model seconds
(wall seconds at time scale 1). The decode node runs one step per segment (``max_segment_steps=1``) and
reports each step (``on_segment_end``), so every request's tokens stream out at the step that made them.

Roles and ``kv_transfer_params`` (vLLM's NixlConnector protocol):

* ``do_remote_decode: true`` (a producer request, sent by the router to a prefill instance): the prompt is
  prefilled and answered with one token (``max_tokens`` is taken as 1) and producer params
  ``{"do_remote_prefill": true, "do_remote_decode": false, "remote_engine_id", "remote_block_ids",
  "remote_host", "remote_port", "tp_size": 1}``. On a ``prefill`` instance the prefill is a
  :class:`~envs.prefill_node.PrefillNode` step and the KV blocks stay held until the decode side has pulled
  them (the decode emulator tells ``POST /emulator/kv_release`` on ``remote_host:remote_port``, which here is
  the emulator's HTTP address, not a NIXL side channel) or ``kv_hold_timeout_s`` passes (vLLM's
  ``VLLM_NIXL_ABORT_REQUEST_TIMEOUT``). On a ``decode``/``both`` instance (vLLM ``kv_both``) it is a chunked
  prefill inside the decode batches.
* ``do_remote_prefill: true`` (a consumer request, P's params passed on by the router): the decode node
  reserves the request's KV blocks (admission), waits the modelled hand-off ``profile.transfer_s(prompt)``
  (uncontended: the simulator's NIC sharing between concurrent transfers is not emulated), then the request
  joins the batch at the next step boundary, whose step produces its first token. While the transfer runs, the
  decode emulator asks P (``POST /emulator/kv_read``) whether it still holds the blocks; when P is gone or
  no longer holds them the KV load fails, and the request is recomputed here as a local prefill or fails
  (HTTP 500, or an SSE error event once streaming), as vLLM's ``kv_load_failure_policy`` (``recompute``, its
  default, or ``fail``) says.
* no params: on a ``decode``/``both`` instance the prompt is prefilled locally in chunks inside the decode
  batches (a deflected prefill; the chunk cap comes from the ``X-Deflectlab-Chunk-Cap`` header, else the
  step's token budget). On a ``prefill`` instance it is prefilled by the prefill node and then decoded on a
  local decode node with no transfer (routers never send this; it keeps the instance a working server).

``decode`` and ``both`` behave the same: a decode instance started with ``kv_both``, as recommended for
deflection.

Output. The text is deterministic filler (:data:`FILLER`, one word per token). The output length is always
``max_tokens`` (``max_completion_tokens`` for chat if given): the filler never ends early, as with
``ignore_eos: true``; ``min_tokens`` is accepted and therefore always met. Without ``max_tokens``: 16 for
completions (vLLM's default), ``--default-max-tokens`` for chat (vLLM would allow the rest of the context
and stop at EOS, which the filler has no notion of). ``finish_reason`` is ``"length"``.

Not emulated: batched prompts and ``n > 1`` (400), logprobs, stop strings, prefix caching, preemption, and
cancellation (a client that disconnects stops receiving, but its request runs to the end in the model).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.decode_node import DecodeNode
from deflectlab.envs.prefill_node import PrefillNode
from deflectlab.envs.profile import LatencyModel, load_profile
from deflectlab.envs.request import Request
from deflectlab.serving.protocol import (
    CHUNK_CAP_HEADER,
    ParsedRequest,
    RequestError,
    error_body,
    parse_request,
    stream_error_event,
)

ROLES = ("prefill", "decode", "both")
#: vLLM's ``kv_load_failure_policy`` values (vllm/config/kv_transfer.py); the first is vLLM's default.
KV_LOAD_FAILURE_POLICIES = ("recompute", "fail")

#: Output filler, one word per token, cycled.
FILLER = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".", " Then", " it",
          " runs", " back", " home", " and", " sleeps", ",")
_FILLER_JSON = tuple(json.dumps(w).encode() for w in FILLER)

#: vLLM's histogram buckets (vllm/v1/metrics/loggers.py), seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


def filler_text(n: int) -> str:
    """The deterministic output text of ``n`` tokens."""
    k = len(FILLER)
    return "".join(FILLER[i % k] for i in range(n))


@dataclass
class EmulatorConfig:
    """Settings of one emulated vLLM instance.

    :param role: ``prefill`` (a ``kv_producer`` instance), ``decode`` or ``both`` (``kv_both``).
    :param profile: latency profile (bundled name or YAML path) timing every step.
    :param model_name: the served model name (``/v1/models``, responses, metric label ``model_name``).
    :param time_scale: wall seconds per model second (0.1 runs ten times faster than the modelled GPU), > 0.
    :param max_model_len: longest prompt plus output, tokens (longer requests get 400 as in vLLM).
    :param max_num_batched_tokens: token budget of one step, tokens (None: the cluster default of the role,
        8192 for prefill, 2048 for decode/both).
    :param max_num_seqs: most requests admitted on the decode node at once.
    :param default_max_tokens: output length of a chat request without ``max_tokens``, tokens.
    :param kv_hold_timeout_s: a prefilled request's KV is freed after this long if never pulled, model seconds.
    :param engine_label: value of the ``engine`` label on every metric (vLLM: the engine index).
    :param kv_load_failure_policy: what a decode instance does when the KV read from the prefill instance
        fails (that instance vanished, or no longer holds the blocks): ``recompute`` the prompt locally, or
        ``fail`` the request. vLLM's ``KVTransferConfig.kv_load_failure_policy`` (``--kv-transfer-config
        '{..., "kv_load_failure_policy": "fail"}'``), default ``recompute``.
    """

    role: str = "both"
    profile: str = "a100-80gb_deepseek-v2-lite"
    model_name: str = "deepseek-ai/DeepSeek-V2-Lite"
    time_scale: float = 1.0
    max_model_len: int = 32768
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = ClusterConfig.max_num_seqs
    default_max_tokens: int = 256
    kv_hold_timeout_s: float = 120.0
    engine_label: str = "0"
    kv_load_failure_policy: str = "recompute"

    def __post_init__(self) -> None:
        if self.kv_load_failure_policy not in KV_LOAD_FAILURE_POLICIES:
            raise ValueError(f"kv_load_failure_policy must be one of {', '.join(KV_LOAD_FAILURE_POLICIES)}, got "
                             f"{self.kv_load_failure_policy!r}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not (isinstance(self.time_scale, (int, float)) and self.time_scale > 0):
            raise ValueError(f"time_scale must be > 0 (wall seconds per model second), got {self.time_scale!r}")
        for name in ("max_model_len", "max_num_seqs", "default_max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.max_num_batched_tokens is not None and (
                not isinstance(self.max_num_batched_tokens, int) or self.max_num_batched_tokens < 1):
            raise ValueError(f"max_num_batched_tokens must be an integer >= 1, got {self.max_num_batched_tokens!r}")
        if not self.kv_hold_timeout_s > 0:
            raise ValueError(f"kv_hold_timeout_s must be > 0 seconds, got {self.kv_hold_timeout_s!r}")

    @property
    def batched_tokens(self) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        d = ClusterConfig()
        return d.prefill_max_batched_tokens if self.role == "prefill" else d.decode_max_batched_tokens


class _Stream:
    """One HTTP request in flight: its model request, what has been emitted, and what waits to be written."""

    __slots__ = ("req", "chat", "stream", "include_usage", "resp_id", "created", "producer", "remote",
                 "local_handoff", "emitted", "t_last", "parts", "wake", "done", "kv_out", "head", "tail",
                 "tail_last", "abandoned", "kv_read", "failed")

    def __init__(self, req: Request, pr: ParsedRequest, resp_id: str, model_json: bytes, producer: bool) -> None:
        self.req = req
        self.chat = pr.chat
        self.stream = pr.stream
        so = pr.body.get("stream_options") or {}
        self.include_usage = bool(so.get("include_usage")) if pr.stream else False
        self.resp_id = resp_id
        self.created = int(time.time())
        self.producer = producer
        self.remote: tuple[Any, Any, Any, int] | None = None  # (host, port, engine id, first block) of P
        self.local_handoff = False
        self.emitted = 0
        self.t_last = 0.0
        self.parts: list[bytes] = []
        self.wake = asyncio.Event()
        self.done = False
        self.kv_out: dict[str, Any] | None = None
        self.abandoned = False
        self.kv_read: asyncio.Future | None = None  # the consumer's KV read from P: True when P held the KV
        self.failed = ""  # why the request failed (kv_load_failure_policy=fail)
        if pr.stream:
            # SSE chunk = head + json(token text) + tail; built once per request.
            rid = json.dumps(resp_id).encode()
            if pr.chat:
                self.head = (b'data: {"id":' + rid + b',"object":"chat.completion.chunk","created":'
                             + str(self.created).encode() + b',"model":' + model_json
                             + b',"choices":[{"index":0,"delta":{"content":')
                self.tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
                self.tail_last = b'},"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'
            else:
                self.head = (b'data: {"id":' + rid + b',"object":"text_completion","created":'
                             + str(self.created).encode() + b',"model":' + model_json
                             + b',"choices":[{"index":0,"text":')
                self.tail = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
                self.tail_last = b',"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'


class EngineEmulator:
    """One emulated vLLM instance: the model's nodes, the HTTP handlers, and the metrics.

    :param config: the instance's settings.
    :param profile: a loaded latency model (default: ``config.profile`` loaded).
    """

    def __init__(self, config: EmulatorConfig, profile: LatencyModel | None = None) -> None:
        self.config = config
        self.profile = profile or load_profile(config.profile)
        self.engine_id = str(uuid.uuid4())
        self._scale = float(config.time_scale)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._last_t = 0.0
        self._rid = 0
        self._next_block = 1
        self._streams: dict[int, _Stream] = {}
        self._held: dict[int, Request] = {}  # first block id -> prefilled request whose KV P still holds
        self._tasks: set[asyncio.Task] = set()
        self._session: ClientSession | None = None
        self._model_json = json.dumps(config.model_name).encode()
        budget = config.batched_tokens
        self.prefill: PrefillNode | None = None
        if config.role == "prefill":
            self.prefill = PrefillNode(0, self.profile, budget, self.schedule, self._on_prefilled)
        # Every role has a decode node: a prefill instance uses it only for requests sent without params.
        d_budget = budget if config.role != "prefill" else ClusterConfig().decode_max_batched_tokens
        self.decode = DecodeNode(0, self.profile, d_budget, config.max_num_seqs, self.schedule,
                                 self._on_admitted, self._on_finished, max_segment_steps=1,
                                 on_segment_end=self._on_step)
        self._init_metrics()

    # -- clock ----------------------------------------------------------------------------------------------
    def start_clock(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()

    def now(self) -> float:
        """Model time now, seconds (never before the last event handled)."""
        assert self._loop is not None, "the emulator's clock starts with its app"
        t = (self._loop.time() - self._t0) / self._scale
        return t if t > self._last_t else self._last_t

    def schedule(self, t: float, fn: Any, arg: object) -> None:
        """The schedulers' ``schedule(t, fn, arg)``: call ``fn(t, arg)`` at model time ``t``, in real time."""
        assert self._loop is not None
        self._loop.call_at(self._t0 + t * self._scale, self._fire, fn, t, arg)

    def _fire(self, fn: Any, t: float, arg: object) -> None:
        if t > self._last_t:
            self._last_t = t
        fn(t, arg)

    # -- metrics --------------------------------------------------------------------------------------------
    def _init_metrics(self) -> None:
        reg = self.registry = CollectorRegistry()
        labels = ("model_name", "engine")
        lv = {"model_name": self.config.model_name, "engine": self.config.engine_label}
        Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", labels,
              registry=reg).labels(**lv).set_function(lambda: self._counts()[0])
        Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels,
              registry=reg).labels(**lv).set_function(lambda: self._counts()[1])
        Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels,
              registry=reg).labels(**lv).set_function(self._kv_usage)
        self._m_prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels,
                                 registry=reg).labels(**lv)
        self._m_gen = Counter("vllm:generation_tokens", "Number of generation tokens processed.", labels,
                              registry=reg).labels(**lv)
        self._m_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in "
                                 "seconds (model seconds in the emulator).", labels, buckets=TTFT_BUCKETS,
                                 registry=reg).labels(**lv)
        self._m_itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in "
                                "seconds (model seconds in the emulator).", labels, buckets=ITL_BUCKETS,
                                registry=reg).labels(**lv)
        self._m_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in "
                                "seconds (model seconds in the emulator).", labels, buckets=E2E_BUCKETS,
                                registry=reg).labels(**lv)
        self._m_kv_failures = Counter("deflectlab_emulator_kv_load_failures", "KV reads from a prefill instance "
                                      "that failed (emulator only).", registry=reg)
        self._m_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                  labels + ("finished_reason",), registry=reg).labels(**lv, finished_reason="length")

    def _counts(self) -> tuple[int, int]:
        """(running, waiting) as vLLM counts them: waiting includes requests waiting for remote KV."""
        d = self.decode
        running = d.batch_size + sum(1 for r in d.prefilling if r.t_d_start >= 0.0)
        waiting = (sum(1 for r in d.admit_queue if r.deflected) + d.inbound_handoffs
                   + sum(1 for r in d.prefilling if r.t_d_start < 0.0))
        p = self.prefill
        if p is not None:
            started = sum(1 for r in p.queue if r.t_p_start >= 0.0)
            running += started
            waiting += len(p.queue) - started
        return running, waiting

    def _kv_usage(self) -> float:
        if self.prefill is not None:
            return self.prefill.kv_used_tokens / self.prefill.kv_capacity_tokens
        return self.decode.kv_reserved_tokens / self.decode.kv_capacity_tokens

    # -- requests -------------------------------------------------------------------------------------------
    def _check(self, pr: ParsedRequest) -> tuple[int, int, bool, bool]:
        """The emulator's own checks beyond :func:`parse_request`; returns (prompt, output, producer, consumer)."""
        body = pr.body
        model = body.get("model")
        if model is not None and model != self.config.model_name:
            raise RequestError(f"The model `{model}` does not exist.", code=404, err_type="NotFoundError",
                               param="model")
        if len(pr.prompt_tokens) != 1:
            raise RequestError("the emulator serves one prompt per request; send batched prompts separately",
                               param="prompt")
        n = body.get("n")
        if n is not None and n != 1:
            raise RequestError("the emulator serves n=1 only", param="n")
        kvp = body.get("kv_transfer_params") or {}
        producer = bool(kvp.get("do_remote_decode"))
        consumer = bool(kvp.get("do_remote_prefill")) and not producer
        if consumer:
            missing = [k for k in ("remote_engine_id", "remote_block_ids", "remote_host", "remote_port")
                       if kvp.get(k) is None]
            if missing or not isinstance(kvp.get("remote_block_ids"), list):
                need = ", ".join(missing) or "a list of remote_block_ids"
                raise RequestError(f"kv_transfer_params with do_remote_prefill needs {need}",
                                   param="kv_transfer_params")
        prompt = pr.prompt_tokens[0]
        if producer:
            out = 1
        elif pr.max_tokens is not None:
            out = pr.max_tokens
        else:
            out = self.config.default_max_tokens if pr.chat else 16
        max_len = self.config.max_model_len
        if prompt > max_len:
            raise RequestError(
                f"This model's maximum context length is {max_len} tokens. However, you requested {prompt} "
                f"tokens in the messages, Please reduce the length of the messages.", param="prompt")
        if prompt + out > max_len:
            raise RequestError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt + out} tokens ({prompt} in the messages, {out} in the completion). Please reduce the "
                "length of the messages or completion.", param="max_tokens")
        prof = self.profile
        if self.prefill is not None and producer:
            if prof.blocks(prompt) * prof.kv_block_tokens > self.prefill.kv_capacity_tokens:
                raise RequestError(f"prompt of {prompt} tokens exceeds the KV cache ({self.prefill.kv_capacity_tokens} "
                                   "tokens)", param="prompt")
        elif prof.blocks(prompt + out) * prof.kv_block_tokens > self.decode.kv_capacity_tokens:
            raise RequestError(f"prompt plus output of {prompt + out} tokens exceeds the KV cache "
                               f"({self.decode.kv_capacity_tokens} tokens)", param="prompt")
        return prompt, out, producer, consumer

    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        try:
            pr = parse_request(raw, chat)
            prompt, out, producer, consumer = self._check(pr)
            cap = request.headers.get(CHUNK_CAP_HEADER)
            chunk_cap = 0
            if cap is not None:
                try:
                    chunk_cap = int(cap)
                except ValueError:
                    chunk_cap = -1
                if chunk_cap < 1:
                    raise RequestError(f"header {CHUNK_CAP_HEADER} must be an integer >= 1, got {cap!r}")
        except RequestError as e:
            return json_error(e)
        now = self.now()
        self._rid += 1
        req = Request(self._rid, now, prompt, out)
        base = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        st = _Stream(req, pr, f"{'chatcmpl' if chat else 'cmpl'}-{base}", self._model_json, producer)
        self._streams[req.rid] = st
        self._m_prompt.inc(prompt)
        if producer:  # where a decode instance pulls the KV from (here: this emulator's HTTP address)
            sock = request.transport.get_extra_info("sockname") if request.transport else None
            st.kv_out = {"remote_host": sock[0] if sock else request.host.split(":")[0],
                         "remote_port": sock[1] if sock else None}
        if producer and self.prefill is not None:
            self.prefill.enqueue(req, now)
        elif consumer:
            kvp = pr.body["kv_transfer_params"]
            blocks = kvp["remote_block_ids"]
            st.remote = (kvp["remote_host"], kvp["remote_port"], kvp["remote_engine_id"],
                         blocks[0] if blocks else -1)
            self.decode.submit(req, now)
        elif self.prefill is not None:
            st.local_handoff = True
            self.prefill.enqueue(req, now)
        else:
            req.deflected = True
            req.chunk_cap = chunk_cap
            self.decode.submit(req, now)
        if pr.stream:
            return await self._respond_stream(request, st)
        return await self._respond_json(st, pr)

    async def _respond_stream(self, request: web.Request, st: _Stream) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        try:
            while True:
                await st.wake.wait()
                st.wake.clear()
                if st.parts:
                    data = b"".join(st.parts)
                    st.parts.clear()
                    await resp.write(data)
                if st.done:
                    break
            await resp.write_eof()
        except ConnectionResetError:
            st.abandoned = True  # the client left; the request still runs to its end in the model
        return resp

    async def _respond_json(self, st: _Stream, pr: ParsedRequest) -> web.Response:
        while not st.done:
            await st.wake.wait()
            st.wake.clear()
        if st.failed:
            return web.json_response(error_body(st.failed, 500, "InternalServerError"), status=500)
        req = st.req
        text = filler_text(req.output_tokens)
        usage = {"prompt_tokens": req.input_tokens, "total_tokens": req.input_tokens + req.output_tokens,
                 "completion_tokens": req.output_tokens, "prompt_tokens_details": None}
        if st.chat:
            body: dict[str, Any] = {
                "id": st.resp_id, "object": "chat.completion", "created": st.created, "model": self.config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                             "logprobs": None, "finish_reason": "length", "stop_reason": None}],
                "usage": usage, "prompt_logprobs": None, "kv_transfer_params": st.kv_out,
            }
        else:
            body = {
                "id": st.resp_id, "object": "text_completion", "created": st.created, "model": self.config.model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                             "stop_reason": None, "prompt_logprobs": None}],
                "usage": usage, "kv_transfer_params": st.kv_out,
            }
        return web.json_response(body)

    # -- the model's callbacks ------------------------------------------------------------------------------
    def _emit(self, st: _Stream, upto: int, t: float) -> None:
        """Tokens ``st.emitted + 1 .. upto`` were produced at model time ``t``."""
        n = upto - st.emitted
        if n <= 0:
            return
        if st.emitted == 0:
            self._m_ttft.observe(t - st.req.arrival_s)
        else:
            self._m_itl.observe(t - st.t_last)
        for _ in range(n - 1):
            self._m_itl.observe(0.0)
        self._m_gen.inc(n)
        if st.stream and not st.abandoned:
            k = len(_FILLER_JSON)
            out = st.req.output_tokens
            parts = st.parts
            if st.emitted == 0 and st.chat:
                parts.append(st.head[: -len(b'"content":')] + b'"role":"assistant","content":""},'
                             b'"logprobs":null,"finish_reason":null}]}\n\n')
            for i in range(st.emitted, upto):
                parts.append(st.head + _FILLER_JSON[i % k] + (st.tail_last if i == out - 1 else st.tail))
            st.wake.set()
        st.emitted = upto
        st.t_last = t

    def _finish(self, st: _Stream, t: float) -> None:
        req = st.req
        self._emit(st, req.output_tokens, t)
        self._m_e2e.observe(t - req.arrival_s)
        self._m_success.inc()
        if st.stream and not st.abandoned:
            if st.include_usage:
                obj = "chat.completion.chunk" if st.chat else "text_completion"
                usage = {"id": st.resp_id, "object": obj, "created": st.created, "model": self.config.model_name,
                         "choices": [], "usage": {"prompt_tokens": req.input_tokens,
                                                  "total_tokens": req.input_tokens + req.output_tokens,
                                                  "completion_tokens": req.output_tokens}}
                st.parts.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
            st.parts.append(b"data: [DONE]\n\n")
        st.done = True
        st.wake.set()
        del self._streams[req.rid]

    def _producer_params(self, st: _Stream) -> int:
        """Fill ``st``'s producer ``kv_transfer_params``; returns the first KV block id."""
        prof = self.profile
        nb = prof.blocks(st.req.input_tokens)
        b0 = self._next_block
        self._next_block += nb
        where = st.kv_out or {}
        st.kv_out = {
            "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
            "remote_block_ids": list(range(b0, b0 + nb)), "remote_host": where.get("remote_host"),
            "remote_port": where.get("remote_port"), "tp_size": 1,
        }
        return b0

    def _on_prefilled(self, req: Request, t: float) -> None:
        st = self._streams[req.rid]
        if st.producer:
            b0 = self._producer_params(st)
            self._held[b0] = req
            self.schedule(t + self.config.kv_hold_timeout_s, self._hold_expired, b0)
            self._finish(st, t)
        else:
            self.decode.submit(req, t)  # decoded here: a local hand-off, no transfer

    def _hold_expired(self, t: float, b0: object) -> None:
        req = self._held.pop(b0, None) if isinstance(b0, int) else None
        if req is not None and self.prefill is not None:
            self.prefill.release(req, t)

    def release_held(self, first_block: int) -> bool:
        """The decode side pulled the KV whose first block is ``first_block``: free it."""
        req = self._held.pop(first_block, None)
        if req is None or self.prefill is None:
            return False
        self.prefill.release(req, self.now())
        return True

    def _on_admitted(self, req: Request, t: float) -> None:
        st = self._streams[req.rid]
        delay = 0.0
        if st.remote is not None:
            delay = self.profile.transfer_s(req.input_tokens)
            if st.remote[2] != self.engine_id:  # read the KV from P while the modelled transfer runs
                st.kv_read = asyncio.ensure_future(self._read_remote(st.remote))
        self.schedule(t + delay, self._kv_arrived, req)

    def _kv_arrived(self, t: float, req: object) -> None:
        r: Request = req  # type: ignore[assignment]
        st = self._streams[r.rid]
        read = st.kv_read
        if read is not None and not read.done():
            # The read's answer (loopback HTTP) is late in wall time: carry on when it comes, at the model time
            # of the transfer's end or of the last event handled since, so the read itself takes no model time.
            read.add_done_callback(lambda _f: self._kv_arrived(max(t, self._last_t), r))
            return
        if read is not None and not read.result():
            self._kv_load_failed(st, t)
            return
        self.decode.join(r, t)
        if st.remote is not None:
            self._release_remote(st.remote)
        elif st.local_handoff and self.prefill is not None:
            self.prefill.release(r, t)

    def _kv_load_failed(self, st: _Stream, t: float) -> None:
        """The KV read from P failed: ``recompute`` the prompt here as a local (deflected) prefill, or ``fail``
        the request, as vLLM's ``kv_load_failure_policy`` says."""
        self._m_kv_failures.inc()
        r = st.req
        d = self.decode
        d.inbound_handoffs -= 1
        if self.config.kv_load_failure_policy == "recompute":
            r.deflected = True
            d.prefilling.append(r)
            d.prefill_waiting_tokens += r.d_remaining
            d._poke(t, prefill_only=True)  # noqa: SLF001 - the node's own entry point for new prefill work
            return
        d.static_blocks -= r.kv_blocks  # the blocks admission reserved for the read
        r.kv_blocks = 0
        d.admitted -= 1
        d.try_admit(t)
        st.failed = (f"KV transfer from the prefill instance {st.remote[0]}:{st.remote[1]} failed "  # type: ignore[index]
                     "(kv_load_failure_policy=fail)")
        if st.stream and not st.abandoned:
            st.parts.append(stream_error_event(st.failed, 500, "InternalServerError"))
        st.done = True
        st.wake.set()
        del self._streams[r.rid]

    async def _read_remote(self, remote: tuple[Any, Any, Any, int]) -> bool:
        """Whether P at ``remote`` still holds the KV (the emulator's stand-in for the NIXL read)."""
        host, port, engine_id, b0 = remote
        if self._session is None:
            self._session = ClientSession(timeout=ClientTimeout(total=5))
        try:
            async with self._session.post(f"http://{host}:{port}/emulator/kv_read",
                                          json={"remote_engine_id": engine_id, "first_block": b0}) as r:
                return r.status == 200 and bool((await r.json()).get("held"))
        except Exception:  # noqa: BLE001 - P gone or unreadable: the read failed
            return False

    def _release_remote(self, remote: tuple[Any, Any, Any, int]) -> None:
        host, port, engine_id, b0 = remote
        if engine_id == self.engine_id:
            self.release_held(b0)
            return
        task = asyncio.ensure_future(self._post_release(host, port, engine_id, b0))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post_release(self, host: Any, port: Any, engine_id: Any, b0: int) -> None:
        if self._session is None:
            self._session = ClientSession(timeout=ClientTimeout(total=5))
        try:
            async with self._session.post(f"http://{host}:{port}/emulator/kv_release",
                                          json={"remote_engine_id": engine_id, "first_block": b0}) as r:
                await r.read()
        except Exception:  # noqa: BLE001 - P gone: its hold timeout frees the blocks (or it no longer exists)
            pass

    def _on_step(self, t: float, steps: int) -> None:
        n = self.decode.steps_done
        streams = self._streams
        for _, _, r in self.decode.running:
            st = streams[r.rid]
            produced = n - r.first_step + 1
            if produced > st.emitted:
                self._emit(st, produced, t)

    def _on_finished(self, req: Request, t: float) -> None:
        st = self._streams[req.rid]
        if st.producer:
            self._producer_params(st)
        self._finish(st, t)

    # -- other endpoints ------------------------------------------------------------------------------------
    async def handle_models(self, request: web.Request) -> web.Response:
        m = self.config.model_name
        return web.json_response({"object": "list", "data": [{
            "id": m, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": m,
            "parent": None, "max_model_len": self.config.max_model_len}]})

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_release(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            b0 = int(body["first_block"])
        except (ValueError, KeyError, TypeError):
            return json_error(RequestError("kv_release needs {'remote_engine_id', 'first_block'}"))
        if body.get("remote_engine_id") not in (None, self.engine_id):
            return web.json_response({"released": False, "reason": "other engine"})
        return web.json_response({"released": self.release_held(b0)})

    async def handle_read(self, request: web.Request) -> web.Response:
        """Whether this instance holds the KV a decode instance is about to read (the NIXL read's stand-in)."""
        try:
            body = await request.json()
            b0 = int(body["first_block"])
        except (ValueError, KeyError, TypeError):
            return json_error(RequestError("kv_read needs {'remote_engine_id', 'first_block'}"))
        held = body.get("remote_engine_id") in (None, self.engine_id) and b0 in self._held
        return web.json_response({"held": held})

    async def _on_startup(self, app: web.Application) -> None:
        self.start_clock()

    async def _on_cleanup(self, app: web.Application) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._session is not None:
            await self._session.close()

    def app(self) -> web.Application:
        """The aiohttp application serving this instance."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app[EMULATOR_KEY] = self
        app.router.add_post("/v1/completions", self.handle_completions)
        app.router.add_post("/v1/chat/completions", self.handle_chat)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_post("/emulator/kv_release", self.handle_release)
        app.router.add_post("/emulator/kv_read", self.handle_read)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app


EMULATOR_KEY: web.AppKey[EngineEmulator] = web.AppKey("emulator", EngineEmulator)


def json_error(e: RequestError) -> web.Response:
    return web.json_response(error_body(e.message, e.code, e.err_type, e.param), status=e.code)


def make_app(config: EmulatorConfig, profile: LatencyModel | None = None) -> web.Application:
    return EngineEmulator(config, profile).app()


def serve(config: EmulatorConfig, host: str = "127.0.0.1", port: int = 8100) -> None:
    """Run one emulator until interrupted."""
    app = make_app(config)
    print(f"deflectlab emulator: role={config.role} model={config.model_name} profile={config.profile} "
          f"time_scale={config.time_scale:g} on http://{host}:{port}", flush=True)
    web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True)
