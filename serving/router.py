"""The deflection router: a drop-in for vLLM's disaggregated-serving proxy that asks a policy, per request,
whether to prefill on a prefill instance (and hand the KV off) or deflect the prefill to a decode instance.

Wire protocol (vLLM's P/D proxy, ``tests/v1/kv_connector/nixl_integration/toy_proxy_server.py``; NixlConnector):

* prefill path: POST a copy of the client's body to prefill instance P with ``kv_transfer_params =
  {"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null, "remote_block_ids": null,
  "remote_host": null, "remote_port": null}``, ``stream: false``, ``max_tokens: 1`` (and
  ``max_completion_tokens: 1`` if present), without ``stream_options``, ``min_tokens``,
  ``min_completion_tokens``; then POST the client's body plus the ``kv_transfer_params`` P returned, verbatim,
  to decode instance D and stream D's bytes back unchanged. A P answer without ``kv_transfer_params`` means D
  recomputes the prompt: counted as an implicit deflection (D gets the body without params).
* deflect path: POST the client's body, without ``kv_transfer_params``, straight to D (with the policy's
  chunk cap in the ``X-Deflectlab-Chunk-Cap`` header, which vLLM ignores and the emulator honours).

Both hops carry the same ``X-Request-Id`` (the client's, else a fresh UUID) and the client's
``Authorization`` header (else ``Bearer $OPENAI_API_KEY`` when that is set, as vLLM's proxy does).

The load view (see :mod:`serving.load_view`) comes from the router's in-flight counters and from scraping every
instance's ``/metrics`` every ``scrape_interval_s``. The policy sees only live instances; its indices are
mapped back to the configured ones.

Failures, and how each outcome is counted in ``deflectlab_router_requests_total{outcome}``:

* malformed request: 400 naming the problem (``bad_request``);
* an upstream 4xx (e.g. vLLM's "maximum context length" 400) is passed to the client unchanged
  (``upstream_client_error``);
* an upstream 5xx, non-JSON prefill answer, or a connection lost mid-answer: 502 with a JSON error naming the
  instance (``upstream_error``); mid-stream, once the 200 headers are out, the stream ends with an SSE event
  ``data: {"error": {...}}`` and no ``[DONE]``;
* an instance that cannot be connected to, or that dropped a connection, leaves rotation at once (as does
  one whose ``/metrics`` fails twice in a row) and the request is retried on another instance when nothing
  has reached the client yet (``deflectlab_router_retries_total``); the scraper keeps probing a dead instance
  every ``dead_probe_interval_s`` and puts it back when ``/metrics`` answers again;
* with no live prefill instance, or no live decode instance, the request is deflected (decision kind
  ``forced_deflect``) and every decode instance is tried in turn, live or not (a restarted instance answers
  before the probe notices); when all fail the answer is 502;
* a client that disconnects mid-stream: ``client_disconnected``; a completed answer: ``ok``;
* a policy that raises or returns an invalid decision (e.g. an exported policy, trained for a fixed shape,
  while an instance is out of rotation): round robin for that request, decision kind ``policy_fallback``. An
  exported policy's ``check_cluster`` runs at start-up, so a cluster it was not trained for is refused then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.profile import LatencyModel, load_profile
from deflectlab.envs.view import DEFLECT, Decision, Policy
from deflectlab.policies.registry import make_policy
from deflectlab.serving.load_view import Instance, RateEstimate, ViewBuilder, parse_vllm_metrics
from deflectlab.serving.protocol import (
    CHUNK_CAP_HEADER,
    RequestError,
    dumps,
    error_body,
    parse_request,
    prefill_hop_body,
    stream_error_event,
)

log = logging.getLogger("deflectlab.router")

OUTCOMES = ("ok", "bad_request", "upstream_client_error", "upstream_error", "no_instance", "client_disconnected")
DECISION_KINDS = ("prefill", "deflect", "implicit_deflect", "forced_deflect", "policy_fallback")
HOP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
               120.0, 300.0)
DECISION_BUCKETS = (1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
_CONN_ERRORS = (aiohttp.ClientConnectionError, asyncio.TimeoutError, OSError)


class RoutedRequest:
    """What the policy is told about a request: never its output length (the router does not know it)."""

    __slots__ = ("rid", "arrival_s", "input_tokens")

    def __init__(self, rid: int, arrival_s: float, input_tokens: int) -> None:
        self.rid = rid
        self.arrival_s = arrival_s
        self.input_tokens = input_tokens


def load_policy(spec: str | Policy) -> Policy:
    """A registry spec (``round_robin``, ``proactive:margin=0.1``) or an exported policy (its directory, its
    ``policy.onnx`` or its ``manifest.json``), loaded by the registry's ``learned`` runtime."""
    if isinstance(spec, Policy):
        return spec
    p = Path(spec)
    if p.exists() or p.suffix in (".onnx", ".json"):
        if not p.exists():
            raise ValueError(f"policy file not found: {spec}")
        try:
            return make_policy({"name": "learned", "path": spec})
        except ValueError as e:
            if "unknown policy 'learned'" in str(e):
                raise ValueError(f"{spec} looks like an exported policy, but no 'learned' policy runtime is "
                                 "registered (policies/runtime.py)") from None
            raise
    return make_policy(spec)


def _pct_us(xs: Any) -> dict[str, float]:
    a = np.fromiter(xs, float)
    if not len(a):
        return {"n": 0}
    p50, p99 = np.percentile(a, [50, 99])
    return {"n": int(len(a)), "p50": float(p50) * 1e6, "p99": float(p99) * 1e6, "max": float(a.max()) * 1e6}


class Router:
    """The router's state, its upstream calls, and its HTTP handlers.

    :param prefill: ``(host, port)`` of each prefill instance (may be empty: everything is deflected).
    :param decode: ``(host, port)`` of each decode instance (at least one).
    :param policy: a :class:`Policy`, a registry spec, or an exported policy file.
    :param prefill_profile: latency model of the prefill instances (bundled name, path or loaded).
    :param decode_profile: latency model of the decode instances (default: the prefill one).
    :param ttft_slo_s: TTFT SLO given to the policy, seconds.
    :param tbt_slo_s: TBT SLO given to the policy, seconds.
    :param time_scale: wall seconds per model second of the instances (1 for vLLM; the emulators' setting).
    :param scrape_interval_s: period of the ``/metrics`` scrape of live instances, wall seconds.
    :param dead_probe_interval_s: period of the probe of dead instances, wall seconds.
    :param decode_balancer: decode instance for a prefill-path request the policy leaves open:
        ``least_loaded`` (fewest requests in flight, as the simulator's balancer) or ``round_robin``.
    :param prefill_max_batched_tokens: prefill instances' step budget, tokens (for the view).
    :param decode_max_batched_tokens: decode instances' step budget, tokens (for the view).
    :param max_num_seqs: decode instances' ``--max-num-seqs`` (for the view).
    """

    def __init__(
        self,
        prefill: list[tuple[str, int]],
        decode: list[tuple[str, int]],
        policy: Policy | str = "round_robin",
        *,
        prefill_profile: str | LatencyModel = ClusterConfig.prefill_profile,
        decode_profile: str | LatencyModel | None = None,
        ttft_slo_s: float = ClusterConfig.ttft_slo_s,
        tbt_slo_s: float = ClusterConfig.tbt_slo_s,
        time_scale: float = 1.0,
        scrape_interval_s: float = 0.075,
        dead_probe_interval_s: float = 0.5,
        decode_balancer: str = ClusterConfig.decode_balancer,
        prefill_max_batched_tokens: int = ClusterConfig.prefill_max_batched_tokens,
        decode_max_batched_tokens: int = ClusterConfig.decode_max_batched_tokens,
        max_num_seqs: int = ClusterConfig.max_num_seqs,
    ) -> None:
        if not decode:
            raise ValueError("the router needs at least one decode instance")
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
        if decode_balancer not in ("least_loaded", "round_robin"):
            raise ValueError(f"decode_balancer must be least_loaded or round_robin, got {decode_balancer!r}")
        if not 0 < scrape_interval_s <= 10:
            raise ValueError(f"scrape_interval_s must be in (0, 10] seconds, got {scrape_interval_s!r}")
        self.prefill = [Instance("prefill", i, h, int(p)) for i, (h, p) in enumerate(prefill)]
        self.decode = [Instance("decode", i, h, int(p)) for i, (h, p) in enumerate(decode)]
        self.policy = load_policy(policy)
        self.policy.reset()
        pp = prefill_profile if isinstance(prefill_profile, LatencyModel) else load_profile(prefill_profile)
        dp = pp if decode_profile is None else (
            decode_profile if isinstance(decode_profile, LatencyModel) else load_profile(decode_profile))
        self.views = ViewBuilder(pp, dp, prefill_max_batched_tokens, decode_max_batched_tokens, max_num_seqs,
                                 ttft_slo_s, tbt_slo_s)
        check = getattr(self.policy, "check_cluster", None)
        if callable(check):  # an exported policy refuses a cluster it was not trained for, here, not later
            check(self.views.view(0.0, 0.0, self.prefill, self.decode))
        self.time_scale = float(time_scale)
        self.scrape_interval_s = scrape_interval_s
        self.dead_probe_interval_s = dead_probe_interval_s
        self.decode_balancer = decode_balancer
        self.rate = RateEstimate()
        self.session: aiohttp.ClientSession | None = None
        self._t0 = time.monotonic()
        self._seq = 0
        self._rr_decode = 0
        self._rr_fallback = 0
        self._scrapers: list[asyncio.Task] = []
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.decisions = dict.fromkeys(DECISION_KINDS, 0)
        self.decision_s: deque[float] = deque(maxlen=200_000)
        self.overhead_s: deque[float] = deque(maxlen=200_000)
        self._policy_error_logged = False
        self._init_metrics()

    # -- metrics --------------------------------------------------------------------------------------------
    def _init_metrics(self) -> None:
        reg = self.registry = CollectorRegistry()
        m_out = Counter("deflectlab_router_requests", "Client requests by outcome.", ["outcome"], registry=reg)
        self._m_outcome = {k: m_out.labels(outcome=k) for k in OUTCOMES}
        m_dec = Counter("deflectlab_router_decisions", "Routing decisions by kind (implicit_deflect: prefill-path "
                        "requests whose prefill instance returned no kv_transfer_params).", ["kind"], registry=reg)
        self._m_decision = {k: m_dec.labels(kind=k) for k in DECISION_KINDS}
        self._m_hop = Histogram("deflectlab_router_hop_seconds", "Upstream hop latency, wall seconds: prefill "
                                "(whole answer), decode_first_byte, decode_total.", ["hop", "instance"],
                                buckets=HOP_BUCKETS, registry=reg)
        self._m_decide = Histogram("deflectlab_router_decision_seconds", "Time in policy.decide (view build "
                                   "included), seconds.", buckets=DECISION_BUCKETS, registry=reg)
        self._m_overhead = Histogram("deflectlab_router_overhead_seconds", "Router time from a request's body "
                                     "read to its first upstream request sent, seconds.", buckets=DECISION_BUCKETS,
                                     registry=reg)
        self._m_retries = Counter("deflectlab_router_retries", "Requests retried on another instance after a "
                                  "connection failure.", ["hop"], registry=reg)
        self._m_up = Gauge("deflectlab_router_instance_up", "1 while an instance is in rotation.",
                           ["role", "instance"], registry=reg)
        self._m_inflight = Gauge("deflectlab_router_requests_in_flight", "Client requests being served.",
                                 registry=reg)
        for inst in self.prefill + self.decode:
            self._m_up.labels(role=inst.role, instance=inst.label).set(1)
        self._hop_children: dict[tuple[str, str], Any] = {}

    def _hop(self, hop: str, inst: Instance) -> Any:
        key = (hop, inst.label)
        c = self._hop_children.get(key)
        if c is None:
            c = self._hop_children[key] = self._m_hop.labels(hop=hop, instance=inst.label)
        return c

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self._m_outcome[outcome].inc()

    def _decided(self, kind: str) -> None:
        self.decisions[kind] += 1
        self._m_decision[kind].inc()

    # -- liveness -------------------------------------------------------------------------------------------
    def _mark_dead(self, inst: Instance, why: object) -> None:
        if inst.alive:
            inst.alive = False
            self._m_up.labels(role=inst.role, instance=inst.label).set(0)
            log.warning("%s instance %s out of rotation: %s", inst.role, inst.label, why)

    def _mark_alive(self, inst: Instance) -> None:
        if not inst.alive:
            inst.alive = True
            inst.consecutive_failures = 0
            self._m_up.labels(role=inst.role, instance=inst.label).set(1)
            log.warning("%s instance %s back in rotation", inst.role, inst.label)

    async def _scrape(self, inst: Instance) -> None:
        assert self.session is not None
        try:
            async with self.session.get(inst.base_url + "/metrics",
                                        timeout=aiohttp.ClientTimeout(total=max(1.0, 5 * self.scrape_interval_s))
                                        ) as r:
                if r.status != 200:
                    raise aiohttp.ClientResponseError(r.request_info, (), status=r.status, message="metrics")
                text = await r.text()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            inst.consecutive_failures += 1
            if inst.consecutive_failures >= 2:
                self._mark_dead(inst, f"/metrics failed: {e!r}")
            return
        m = parse_vllm_metrics(text)
        inst.scraped_waiting = m.get("vllm:num_requests_waiting", 0.0)
        inst.scraped_running = m.get("vllm:num_requests_running", 0.0)
        inst.kv_usage = m.get("vllm:kv_cache_usage_perc", 0.0)
        inst.scraped_at = time.monotonic()
        inst.consecutive_failures = 0
        self._mark_alive(inst)

    async def _scrape_loop(self, inst: Instance) -> None:
        """Scrape one instance every ``scrape_interval_s`` while live, every ``dead_probe_interval_s`` while
        dead (one loop per instance, so a slow instance never delays the others' view)."""
        while True:
            await self._scrape(inst)
            await asyncio.sleep(self.scrape_interval_s if inst.alive else self.dead_probe_interval_s)

    # -- decisions ------------------------------------------------------------------------------------------
    def model_now(self) -> float:
        return (time.monotonic() - self._t0) / self.time_scale

    def _balance(self, exclude: set[int] | None = None) -> Instance | None:
        """The decode instance the balancer picks among live ones not in ``exclude``; when none is live, the
        first one not excluded (it may be back before the probe notices: a failed connection is quick)."""
        cand = [d for d in self.decode if not exclude or d.index not in exclude]
        live = [d for d in cand if d.alive]
        if not live:
            return cand[0] if cand else None
        if self.decode_balancer == "round_robin":
            d = live[self._rr_decode % len(live)]
            self._rr_decode += 1
            return d
        best = live[0]
        for d in live[1:]:
            if d.active < best.active:
                best = d
        return best

    def decide(self, req: RoutedRequest, exclude_p: set[int] | None = None
               ) -> tuple[int, Instance | None, Instance | None, int | None]:
        """``(kind, prefill instance, decode instance or None, chunk cap)`` for a request; the decode
        instance is ``None`` on the prefill path when the balancer is to pick it after the prefill."""
        live_p = [p for p in self.prefill if p.alive and (not exclude_p or p.index not in exclude_p)]
        live_d = [d for d in self.decode if d.alive]
        if not live_d or not live_p:
            self._decided("forced_deflect")
            return DEFLECT, None, self._balance(), None
        view = self.views.view(req.arrival_s, self.rate.at(req.arrival_s), live_p, live_d)
        t0 = time.perf_counter()
        try:
            dec = self.policy.decide(view, req)
            ok = self._valid(dec, len(live_p), len(live_d))
        except Exception as e:  # noqa: BLE001 - a broken policy must not take the router down
            ok = False
            if not self._policy_error_logged:
                log.exception("policy %s failed (%s); falling back to round robin", self.policy.name, e)
                self._policy_error_logged = True
        dt = time.perf_counter() - t0
        self.decision_s.append(dt)
        self._m_decide.observe(dt)
        if not ok:
            self._decided("policy_fallback")
            p = live_p[self._rr_fallback % len(live_p)]
            self._rr_fallback += 1
            return 0, p, None, None
        if dec.kind == DEFLECT:
            self._decided("deflect")
            return DEFLECT, None, live_d[dec.decode_node], dec.chunk_cap  # type: ignore[index]
        self._decided("prefill")
        d = live_d[dec.decode_node] if dec.decode_node is not None else None
        return 0, live_p[dec.prefill_node], d, None  # type: ignore[index]

    def _valid(self, dec: Decision, n_p: int, n_d: int) -> bool:
        if not isinstance(dec, Decision):
            raise TypeError(f"policy returned {dec!r}, not a Decision")
        d = dec.decode_node
        if d is not None and not 0 <= d < n_d:
            raise ValueError(f"{dec}: decode node out of range 0..{n_d - 1}")
        if dec.kind == DEFLECT:
            if d is None:
                raise ValueError(f"{dec}: a deflection must name its decode node")
            if dec.chunk_cap is not None and dec.chunk_cap < 1:
                raise ValueError(f"{dec}: chunk cap must be >= 1")
            return True
        p = dec.prefill_node
        if p is None or not 0 <= p < n_p:
            raise ValueError(f"{dec}: prefill node out of range 0..{n_p - 1}")
        return True

    # -- HTTP -----------------------------------------------------------------------------------------------
    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self._m_inflight.inc()
        try:
            return await self._route(request, chat)
        finally:
            self._m_inflight.dec()

    def _error(self, outcome: str, message: str, code: int, err_type: str) -> web.Response:
        self._count(outcome)
        return web.json_response(error_body(message, code, err_type), status=code)

    async def _route(self, request: web.Request, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        t_in = time.perf_counter()
        try:
            pr = parse_request(raw, chat)
        except RequestError as e:
            self._count("bad_request")
            return web.json_response(error_body(e.message, e.code, e.err_type, e.param), status=e.code)
        rid = request.headers.get("X-Request-Id") or str(uuid.uuid4())
        headers = {"X-Request-Id": rid, "Content-Type": "application/json"}
        auth = request.headers.get("Authorization")
        if auth is None and os.environ.get("OPENAI_API_KEY"):
            auth = f"Bearer {os.environ['OPENAI_API_KEY']}"
        if auth:
            headers["Authorization"] = auth
        path = "/v1/chat/completions" if chat else "/v1/completions"
        n_tok = pr.total_prompt_tokens
        now = self.model_now()
        self.rate.arrival(now)
        self._seq += 1
        req = RoutedRequest(self._seq, now, n_tok)
        tried_p: set[int] = set()
        while True:
            kind, p, d, chunk = self.decide(req, tried_p)
            if kind == DEFLECT:
                if d is None:
                    return self._error("no_instance", "no decode instance is live", 503, "ServiceUnavailableError")
                return await self._decode_hop(request, pr.body, raw, pr.stream, rid, headers, path, d, None, None,
                                              chunk, n_tok, t_in)
            assert p is not None
            body = dumps(prefill_hop_body(pr.body))
            if t_in:
                self._overhead(t_in)
                t_in = 0.0
            res = await self._prefill_hop(p, path, body, headers, n_tok)
            if res is _RETRY:
                tried_p.add(p.index)
                self._m_retries.labels(hop="prefill").inc()
                continue
            if isinstance(res, web.Response):
                return res
            kvp: dict[str, Any] | None = res  # type: ignore[assignment]
            if kvp is None:
                self._decided("implicit_deflect")
            if d is None or not d.alive:
                d = self._balance()
            if d is None:
                if kvp is not None:
                    p.held -= 1
                    p.held_tokens -= n_tok
                return self._error("no_instance", "no decode instance is live", 503, "ServiceUnavailableError")
            return await self._decode_hop(request, pr.body, raw, pr.stream, rid, headers, path, d, kvp,
                                          p if kvp is not None else None, None, n_tok, 0.0)

    def _overhead(self, t_in: float) -> None:
        dt = time.perf_counter() - t_in
        self.overhead_s.append(dt)
        self._m_overhead.observe(dt)

    async def _prefill_hop(self, p: Instance, path: str, body: bytes, headers: dict[str, str], n_tok: int
                           ) -> object:
        """The prefill hop: P's ``kv_transfer_params`` (None: implicit deflection), :data:`_RETRY`, or an
        error response for the client."""
        assert self.session is not None
        p.inflight += 1
        p.inflight_tokens += n_tok
        t0 = time.perf_counter()
        try:
            async with self.session.post(p.base_url + path, data=body, headers=headers) as resp:
                data = await resp.read()
                status = resp.status
        except _CONN_ERRORS as e:
            self._mark_dead(p, f"prefill hop: {e!r}")
            return _RETRY
        finally:
            p.inflight -= 1
            p.inflight_tokens -= n_tok
        self._hop("prefill", p).observe(time.perf_counter() - t0)
        if status != 200:
            return self._upstream_status("prefill", p, status, data)
        try:
            pj = json.loads(data)
        except ValueError:
            return self._error("upstream_error", f"prefill instance {p.label} returned a non-JSON answer",
                               502, "BadGatewayError")
        kvp = pj.get("kv_transfer_params") if isinstance(pj, dict) else None
        if not kvp:
            return None
        p.held += 1
        p.held_tokens += n_tok
        return kvp

    def _upstream_status(self, role: str, inst: Instance, status: int, data: bytes) -> web.Response:
        if 400 <= status < 500:  # the client's request is at fault: pass vLLM's answer on unchanged
            self._count("upstream_client_error")
            return web.Response(body=data, status=status, content_type="application/json")
        try:
            msg = json.loads(data).get("message") or data[:200].decode(errors="replace")
        except (ValueError, AttributeError):
            msg = data[:200].decode(errors="replace")
        return self._error("upstream_error", f"{role} instance {inst.label} answered HTTP {status}: {msg}", 502,
                           "BadGatewayError")

    async def _decode_hop(self, request: web.Request, body: dict[str, Any], raw: bytes, stream: bool, rid: str,
                          headers: dict[str, str], path: str, d: Instance, kvp: dict[str, Any] | None,
                          p: Instance | None, chunk: int | None, n_tok: int, t_in: float) -> web.StreamResponse:
        assert self.session is not None
        if kvp is not None:
            data = dumps({**body, "kv_transfer_params": kvp})
        elif "kv_transfer_params" in body:
            data = dumps({k: v for k, v in body.items() if k != "kv_transfer_params"})
        else:
            data = raw  # the deflect path forwards the client's bytes untouched
        hdrs = headers if chunk is None else {**headers, CHUNK_CAP_HEADER: str(chunk)}
        handoff = kvp is not None
        tried: set[int] = set()
        if t_in:
            self._overhead(t_in)
        while True:
            d.active += 1
            if handoff:
                d.inbound += 1
                d.inbound_tokens += n_tok
            else:
                d.defl_waiting += 1
                d.defl_waiting_tokens += n_tok
            t0 = time.perf_counter()
            try:
                resp = await self.session.post(d.base_url + path, data=data, headers=hdrs)
                break
            except _CONN_ERRORS as e:
                self._mark_dead(d, f"decode hop: {e!r}")
                self._leave(d, handoff, n_tok, False, 0)
                tried.add(d.index)
                nd = self._balance(tried)
                if nd is None:
                    if p is not None:
                        p.held -= 1
                        p.held_tokens -= n_tok
                    return self._error("upstream_error", f"decode instance {d.label} failed ({e!r}) and no other "
                                       "decode instance is live", 502, "BadGatewayError")
                self._m_retries.labels(hop="decode").inc()
                d = nd
        decoding = False
        events = 0
        try:
            if resp.status != 200:
                try:
                    err = await resp.read()
                except _CONN_ERRORS:
                    err = b""
                return self._upstream_status("decode", d, resp.status, err)
            if not stream:
                try:
                    out_bytes = await resp.read()
                except _CONN_ERRORS as e:
                    self._mark_dead(d, f"decode hop: {e!r}")
                    return self._error("upstream_error", f"decode instance {d.label} failed mid-answer: {e!r}",
                                       502, "BadGatewayError")
                self._hop("decode_first_byte", d).observe(time.perf_counter() - t0)
                self._count("ok")
                return web.Response(body=out_bytes, status=200,
                                    headers={"Content-Type": resp.headers.get("Content-Type", "application/json"),
                                             "X-Request-Id": rid})
            out = web.StreamResponse(status=200, headers={
                "Content-Type": resp.headers.get("Content-Type", "text/event-stream; charset=utf-8"),
                "X-Request-Id": rid})
            await out.prepare(request)
            content = resp.content
            while True:
                try:
                    chunk_b = await content.readany()
                except _CONN_ERRORS + (aiohttp.ClientPayloadError,) as e:
                    self._mark_dead(d, f"decode stream broke: {e!r}")
                    self._count("upstream_error")
                    try:
                        await out.write(stream_error_event(f"decode instance {d.label} failed mid-stream: {e!r}"))
                    except ConnectionResetError:
                        pass
                    return out
                if not chunk_b:
                    break
                if not decoding:
                    decoding = True
                    self._hop("decode_first_byte", d).observe(time.perf_counter() - t0)
                    self._first_byte(d, p, handoff, n_tok)
                k = chunk_b.count(b"data:")
                events += k
                d.decoding_ctx += k
                try:
                    await out.write(chunk_b)
                except ConnectionResetError:
                    self._count("client_disconnected")
                    return out
            try:
                await out.write_eof()
            except ConnectionResetError:
                pass  # every byte was written; the client closed first (after [DONE])
            self._count("ok")
            return out
        finally:
            resp.release()
            self._hop("decode_total", d).observe(time.perf_counter() - t0)
            if not decoding and p is not None:
                p.held -= 1
                p.held_tokens -= n_tok
            self._leave(d, handoff, n_tok, decoding, events)

    def _first_byte(self, d: Instance, p: Instance | None, handoff: bool, n_tok: int) -> None:
        if handoff:
            d.inbound -= 1
            d.inbound_tokens -= n_tok
        else:
            d.defl_waiting -= 1
            d.defl_waiting_tokens -= n_tok
        if p is not None:
            p.held -= 1
            p.held_tokens -= n_tok
        d.decoding += 1
        d.decoding_ctx += n_tok

    def _leave(self, d: Instance, handoff: bool, n_tok: int, decoding: bool, events: int) -> None:
        d.active -= 1
        if decoding:
            d.decoding -= 1
            d.decoding_ctx -= n_tok + events
        elif handoff:
            d.inbound -= 1
            d.inbound_tokens -= n_tok
        else:
            d.defl_waiting -= 1
            d.defl_waiting_tokens -= n_tok

    async def handle_models(self, request: web.Request) -> web.Response:
        """``GET /v1/models`` of the first decode instance that answers (clients and benchmarks ask for it)."""
        assert self.session is not None
        for d in sorted(self.decode, key=lambda i: not i.alive):
            try:
                async with self.session.get(d.base_url + "/v1/models") as r:
                    return web.Response(body=await r.read(), status=r.status, content_type="application/json")
            except _CONN_ERRORS:
                continue
        return web.json_response(error_body("no decode instance answered /v1/models", 502, "BadGatewayError"),
                                 status=502)

    async def handle_healthcheck(self, request: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok", "prefill_instances": len(self.prefill), "decode_instances": len(self.decode),
            "live_prefill_instances": sum(p.alive for p in self.prefill),
            "live_decode_instances": sum(d.alive for d in self.decode), "policy": self.policy.name})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def stats(self) -> dict[str, Any]:
        """Counters and recent timing percentiles (microseconds), as ``GET /stats`` returns them."""
        return {
            "policy": self.policy.name, "requests": dict(self.outcomes), "decisions": dict(self.decisions),
            "decision_us": _pct_us(self.decision_s), "overhead_us": _pct_us(self.overhead_s),
            "instances": [{"role": i.role, "instance": i.label, "alive": i.alive, "waiting": i.scraped_waiting,
                           "running": i.scraped_running, "kv_cache_usage_perc": i.kv_usage}
                          for i in self.prefill + self.decode],
        }

    async def handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _on_startup(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0))
        self._t0 = time.monotonic()
        self._scrapers = [asyncio.create_task(self._scrape_loop(i)) for i in self.prefill + self.decode]

    async def _on_cleanup(self, app: web.Application) -> None:
        for t in self._scrapers:
            t.cancel()
        await asyncio.gather(*self._scrapers, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app[ROUTER_KEY] = self
        app.router.add_post("/v1/completions", self.handle_completions)
        app.router.add_post("/v1/chat/completions", self.handle_chat)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/healthcheck", self.handle_healthcheck)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/stats", self.handle_stats)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app


_RETRY = object()
ROUTER_KEY: web.AppKey[Router] = web.AppKey("router", Router)


def pair_instances(hosts: list[str], ports: list[int], what: str) -> list[tuple[str, int]]:
    """Pair ``--X-hosts`` with ``--X-ports`` (one host is used for every port)."""
    if len(hosts) == 1 and len(ports) > 1:
        hosts = hosts * len(ports)
    if len(hosts) != len(ports):
        raise ValueError(f"number of {what} hosts ({len(hosts)}) must match number of {what} ports ({len(ports)})")
    return list(zip(hosts, ports))


def serve(router: Router, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the router until interrupted."""
    from prometheus_client import disable_created_metrics

    disable_created_metrics()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"deflectlab router: policy={router.policy.name} prefill={[i.label for i in router.prefill]} "
          f"decode={[i.label for i in router.decode]} on http://{host}:{port}", flush=True)
    web.run_app(router.app(), host=host, port=port, print=None, access_log=None)
