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

The load view (:mod:`serving.load_view`) has every configured instance, dead ones shown unusable, from the
router's in-flight counters and each instance's ``/metrics``; rotation comes from ``/health`` probes and
from the request path (:mod:`serving.liveness`), never from ``/metrics``.

The failure model (each request ends in exactly one outcome of ``deflectlab_router_requests_total``; the
table in docs/serving.md lists what the router does in each case and which metric shows it):

* malformed request: 400 naming the problem (``bad_request``); a body over ``max_body_bytes``: 413 with a JSON
  error (``request_too_large``);
* an upstream 4xx is passed to the client unchanged (``upstream_client_error``);
* an upstream 5xx or non-JSON prefill answer: 502 naming the instance and hop (``upstream_error``), and the
  instance leaves rotation until ``/health`` answers;
* a refused or dropped connection before anything reached the client: the instance leaves rotation and the
  request is retried on another instance (``deflectlab_router_retries_total``); mid-stream, once the 200
  headers are out, the stream ends with an SSE event ``data: {"error": {...}}`` naming instance and hop, and
  no ``[DONE]`` (``upstream_error``);
* a wait that runs out (prefill hop, decode first byte, idle gap between chunks): 504, or an SSE error event
  once streaming (``timeout``); the instance is suspect, out of rotation for a while;
* every prefill instance out of rotation: ``--no-prefill deflect`` (the default) deflects the request
  (``deflectlab_router_forced_deflections_total{reason}``), ``--no-prefill reject`` answers 503
  (``no_instance``); every decode instance out of rotation: each is tried in turn (a restarted instance
  answers before its probe), then 502;
* a client that disconnects: ``client_disconnected``; a completed answer: ``ok``;
* a policy that raises, returns an invalid decision or picks an instance out of rotation: the router replaces
  the decision (``deflectlab_router_policy_fallbacks_total{reason}``). An exported policy's ``check_cluster``
  runs at start-up, so a cluster it was not trained for is refused then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from deflectlab.envs.profile import load_profile
from deflectlab.envs.view import DEFLECT, Decision, Policy
from deflectlab.policies.registry import make_policy
from deflectlab.serving.liveness import Liveness
from deflectlab.serving.load_view import Instance, RateEstimate, RecentArrivals, RouterView, ViewBuilder
from deflectlab.serving.prefix_view import PrefixView
from deflectlab.serving.protocol import (
    CHUNK_CAP_HEADER,
    RequestError,
    dumps,
    error_body,
    parse_request,
    prefill_hop_body,
    stream_error_event,
    with_kv_params,
)
from deflectlab.serving.router_config import RouterConfig
from deflectlab.serving.router_metrics import DECISION_KINDS, OUTCOMES, RouterMetrics  # noqa: F401 - re-exported

log = logging.getLogger("deflectlab.router")

_CONN_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)
_DONE_TAIL = b"data: [DONE]\n\n"
_TAIL = 1024  # bytes of a stream's end kept to see how it ended


class RoutedRequest:
    """What the policy is told about a request: never its output length (the router does not know it)."""

    __slots__ = ("rid", "arrival_s", "input_tokens", "hashes")

    def __init__(self, rid: int, arrival_s: float, input_tokens: int, hashes: list[int] | None = None) -> None:
        self.rid = rid
        self.arrival_s = arrival_s
        self.input_tokens = input_tokens
        self.hashes = hashes  # the prompt's block hashes (serving/prefix_view.py), for the cache estimate


@dataclass(slots=True)
class Route:
    """Where one request goes: the prefill path (``prefill`` set; ``decode`` None lets the balancer pick after
    the prefill) or a deflection (``prefill`` None, ``decode`` set, ``chunk_cap`` the policy's cap or None)."""

    prefill: Instance | None
    decode: Instance | None
    chunk_cap: int | None = None

    @property
    def deflected(self) -> bool:
        return self.prefill is None


class Call:
    """One client request on its way through the router."""

    __slots__ = ("request", "raw", "body", "stream", "rid", "headers", "path", "n_tok", "t_in", "outcome")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.outcome: str | None = None
        self.t_in = 0.0

    @property
    def client_gone(self) -> bool:
        tr = self.request.transport
        return tr is None or tr.is_closing()


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


def _what_failed(e: BaseException) -> str:
    """A plain description of a connection failure (no library internals)."""
    if isinstance(e, (aiohttp.ClientConnectorError, ConnectionRefusedError)):
        return "refused the connection"
    if isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, ConnectionResetError)):
        return "closed the connection"
    return f"failed ({type(e).__name__})"


class Router:
    """The router's state, its upstream calls, and its HTTP handlers.

    :param config: the router's settings (:class:`RouterConfig`).
    """

    def __init__(self, config: RouterConfig) -> None:
        if not isinstance(config, RouterConfig):
            raise TypeError(f"Router takes a RouterConfig, got {type(config).__name__}")
        self.cfg = config
        c = config.cluster
        self.prefill = [Instance("prefill", i, h, int(p)) for i, (h, p) in enumerate(config.prefill)]
        self.decode = [Instance("decode", i, h, int(p)) for i, (h, p) in enumerate(config.decode)]
        self.policy = load_policy(config.policy)
        self.policy_spec = config.policy if isinstance(config.policy, str) else self.policy.name
        self.policy.reset()
        pp = load_profile(c.prefill_profile)
        dp = pp if c.decode_profile == c.prefill_profile else load_profile(c.decode_profile)
        self.views = ViewBuilder(pp, dp, c.prefill_max_batched_tokens, c.decode_max_batched_tokens, c.max_num_seqs,
                                 c.ttft_slo_s, c.tbt_slo_s)
        self.prefix = PrefixView(len(self.prefill), len(self.decode), pp, dp) if c.prefix_cache else None
        check = getattr(self.policy, "check_cluster", None)
        if callable(check):  # an exported policy refuses a cluster it was not trained for, now
            check(self.views.view(0.0, 0.0, self.prefill, self.decode))
        self.time_scale = float(config.time_scale)
        self.m = RouterMetrics()
        self.live = Liveness(config, self.prefill + self.decode, self.m)
        self.rate = RateEstimate()
        self.recent = RecentArrivals()
        self.session: aiohttp.ClientSession | None = None
        self._t0 = time.monotonic()
        self._seq = 0
        self._rr_decode = 0
        self._rr_fallback = 0

    # -- counters ---------------------------------------------------------------------------------------------
    @property
    def outcomes(self) -> dict[str, int]:
        return self.m.outcomes

    @property
    def decisions(self) -> dict[str, int]:
        return self.m.decisions

    def _end(self, call: Call, outcome: str) -> None:
        """Count ``call``'s outcome (the first one given; a request has exactly one)."""
        if call.outcome is None:
            call.outcome = outcome
            self.m.outcome(outcome)

    def _error(self, call: Call, outcome: str, message: str, code: int, err_type: str) -> web.Response:
        self._end(call, outcome)
        return web.json_response(error_body(message, code, err_type), status=code)

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
        if self.cfg.cluster.decode_balancer == "round_robin":
            d = live[self._rr_decode % len(live)]
            self._rr_decode += 1
            return d
        best = live[0]
        for d in live[1:]:
            if d.active < best.active:
                best = d
        return best

    def _least_loaded_prefill(self, exclude: set[int] | None) -> Instance | None:
        live = [p for p in self.prefill if p.alive and not (exclude and p.index in exclude)]
        return min(live, key=lambda p: p.inflight_tokens) if live else None

    def decide(self, req: RoutedRequest, exclude_p: set[int] | None = None) -> Route | None:
        """Where ``req`` goes; None when it is to be rejected (no prefill instance, ``no_prefill=reject``)."""
        forced = self._forced_reason(exclude_p)
        if forced is not None:
            if forced in ("no_live_prefill", "prefill_failed") and self.cfg.no_prefill == "reject":
                self.m.states.set("prefill pool", "reject", "no prefill instance in rotation: rejecting requests "
                                  "(--no-prefill reject)")
                return None
            if forced != "no_prefill_configured":
                self.m.states.set("prefill pool", forced, f"no usable instance ({forced}): deflecting every "
                                  "request to a decode instance (--no-prefill deflect)")
            self.m.forced_deflect(forced)
            return Route(None, self._balance())
        self.m.states.set("prefill pool", "ok", "prefill and decode instances usable again: the policy decides")
        view = self.views.view(req.arrival_s, self.rate.at(req.arrival_s), self.prefill, self.decode, self.recent)
        if view.stale_prefill:
            self.m.stale_decision("prefill_metrics_stale")
        if view.stale_decode:
            self.m.stale_decision("decode_metrics_stale")
        t0 = time.perf_counter()
        if self.prefix is not None and req.hashes:
            self.prefix.annotate(view, req.hashes, req.input_tokens)
        dec, reason = self._ask_policy(view, req)
        self.m.decide_time(time.perf_counter() - t0)
        if dec is None:
            self.m.fallback(reason)
            p = self._fallback_prefill(exclude_p)
            self.m.decided("prefill")
            route = Route(p, None)
        else:
            route = self._apply(dec, exclude_p)
        if self.prefix is not None and req.hashes:
            self.prefix.record(req.hashes, route.prefill.index if route.prefill else None,
                               route.decode.index if route.decode else None)
        return route

    def _forced_reason(self, exclude_p: set[int] | None) -> str | None:
        if not self.prefill:
            return "no_prefill_configured"
        if not any(d.alive for d in self.decode):
            return "no_live_decode"
        if any(p.alive and not (exclude_p and p.index in exclude_p) for p in self.prefill):
            return None
        return "prefill_failed" if exclude_p else "no_live_prefill"

    def _ask_policy(self, view: RouterView, req: RoutedRequest) -> tuple[Decision | None, str]:
        try:
            dec = self.policy.decide(view, req)
        except Exception as e:  # noqa: BLE001 - a broken policy must not take the router down
            self.m.states.set("policy", "error", f"policy {self.policy_spec} raised {type(e).__name__}: {e}; "
                              "round robin over live prefill instances meanwhile")
            return None, "policy_error"
        why = self._invalid(dec)
        if why:
            self.m.states.set("policy", "invalid", f"policy {self.policy_spec} returned an invalid decision ({why}); "
                              "round robin over live prefill instances meanwhile")
            return None, "invalid_decision"
        self.m.states.set("policy", "ok", f"policy {self.policy_spec} decides again")
        return dec, ""

    def _fallback_prefill(self, exclude_p: set[int] | None) -> Instance:
        live = [p for p in self.prefill if p.alive and not (exclude_p and p.index in exclude_p)]
        p = live[self._rr_fallback % len(live)]
        self._rr_fallback += 1
        return p

    def _apply(self, dec: Decision, exclude_p: set[int] | None) -> Route:
        """The policy's decision, with any instance out of rotation replaced (counted ``dead_instance``)."""
        d = self.decode[dec.decode_node] if dec.decode_node is not None else None
        if d is not None and not d.alive:
            self.m.fallback("dead_instance")
            d = self._balance() if dec.kind == DEFLECT else None
        if dec.kind == DEFLECT:
            self.m.decided("deflect")
            return Route(None, d, dec.chunk_cap)
        p = self.prefill[dec.prefill_node]  # type: ignore[index]
        if not p.alive or (exclude_p and p.index in exclude_p):
            if not p.alive:
                self.m.fallback("dead_instance")
            p = self._least_loaded_prefill(exclude_p)  # not None: _forced_reason found one
        self.m.decided("prefill")
        return Route(p, d)

    def _invalid(self, dec: object) -> str:
        """Why ``dec`` is not a valid decision for the configured cluster ('' when it is)."""
        if not isinstance(dec, Decision):
            return f"{dec!r} is not a Decision"
        n_p, n_d = len(self.prefill), len(self.decode)
        d = dec.decode_node
        if d is not None and not 0 <= d < n_d:
            return f"{dec}: decode node out of range 0..{n_d - 1}"
        if dec.kind == DEFLECT:
            if d is None:
                return f"{dec}: a deflection must name its decode node"
            if dec.chunk_cap is not None and dec.chunk_cap < 1:
                return f"{dec}: chunk cap must be >= 1"
            return ""
        p = dec.prefill_node
        if p is None or not 0 <= p < n_p:
            return f"{dec}: prefill node out of range 0..{n_p - 1}"
        return ""

    # -- HTTP: entry ---------------------------------------------------------------------------------------
    async def handle_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.m.in_flight_now += 1
        call = Call(request)
        try:
            resp = await self._route(call, chat)
            if call.outcome is None:
                log.error("request %s ended without an outcome; counted router_error", getattr(call, "rid", "?"))
                self._end(call, "router_error")
            return resp
        except asyncio.CancelledError:
            self._end(call, "client_disconnected")
            raise
        except Exception as e:
            log.exception("router error")
            return self._error(call, "router_error", f"router error: {type(e).__name__}: {e}", 500,
                               "InternalServerError")
        finally:
            self.m.in_flight_now -= 1

    async def _read(self, call: Call, chat: bool) -> web.Response | None:
        """Read and check the body into ``call``; an error response when it is bad."""
        request = call.request
        try:
            call.raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(call, "request_too_large", f"request body is larger than the router's limit of "
                               f"{self.cfg.max_body_bytes} bytes", 413, "RequestEntityTooLargeError")
        call.t_in = time.perf_counter()
        try:
            pr = parse_request(call.raw, chat)
        except RequestError as e:
            self._end(call, "bad_request")
            return web.json_response(error_body(e.message, e.code, e.err_type, e.param), status=e.code)
        call.body, call.stream, call.n_tok = pr.body, pr.stream, pr.total_prompt_tokens
        call.rid = request.headers.get("X-Request-Id") or str(uuid.uuid4())
        headers = {"X-Request-Id": call.rid, "Content-Type": "application/json"}
        auth = request.headers.get("Authorization")
        if auth is None and os.environ.get("OPENAI_API_KEY"):
            auth = f"Bearer {os.environ['OPENAI_API_KEY']}"
        if auth:
            headers["Authorization"] = auth
        call.headers = headers
        call.path = "/v1/chat/completions" if chat else "/v1/completions"
        return None

    async def _route(self, call: Call, chat: bool) -> web.StreamResponse:
        bad = await self._read(call, chat)
        if bad is not None:
            return bad
        now = self.model_now()
        self.rate.arrival(now)
        self.recent.arrival(now, call.n_tok)
        self._seq += 1
        req = RoutedRequest(self._seq, now, call.n_tok, self.prefix.hashes(call.body) if self.prefix else None)
        tried_p: set[int] = set()
        while True:
            route = self.decide(req, tried_p)
            if route is None:
                return self._error(call, "no_instance", "no prefill instance is in rotation and the router runs "
                                   "with --no-prefill reject", 503, "ServiceUnavailableError")
            if route.deflected:
                if route.decode is None:
                    return self._error(call, "no_instance", "no decode instance is configured", 503,
                                       "ServiceUnavailableError")
                return await self._decode_hop(call, route.decode, None, None, route.chunk_cap)
            p = route.prefill
            assert p is not None
            res = await self._prefill_hop(call, p)
            if res is _RETRY:
                tried_p.add(p.index)
                self.m.retries.labels(hop="prefill").inc()
                continue
            if isinstance(res, web.StreamResponse):
                return res
            return await self._after_prefill(call, p, route.decode, res)  # type: ignore[arg-type]

    async def _after_prefill(self, call: Call, p: Instance, d: Instance | None, kvp: dict[str, Any] | None
                             ) -> web.StreamResponse:
        if kvp is None:
            self.m.decided("implicit_deflect")
        if d is None or not d.alive:
            d = self._balance()
        if d is None or call.client_gone:
            if kvp is not None:
                self._unhold(p, call.n_tok)
            if d is None:
                return self._error(call, "no_instance", "no decode instance is configured", 503,
                                   "ServiceUnavailableError")
            self._end(call, "client_disconnected")
            return web.Response(status=499)
        return await self._decode_hop(call, d, kvp, p if kvp is not None else None, None)

    def _overhead(self, call: Call) -> None:
        if call.t_in:
            self.m.overhead(time.perf_counter() - call.t_in)
            call.t_in = 0.0

    # -- HTTP: the prefill hop -----------------------------------------------------------------------------
    async def _prefill_hop(self, call: Call, p: Instance) -> object:
        """P's ``kv_transfer_params`` (None: implicit deflection), :data:`_RETRY`, or an error response."""
        assert self.session is not None
        body = dumps(prefill_hop_body(call.body))
        self._overhead(call)
        p.inflight += 1
        p.inflight_tokens += call.n_tok
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.cfg.prefill_timeout_s):
                async with self.session.post(p.base_url + call.path, data=body, headers=call.headers) as resp:
                    data = await resp.read()
                    status = resp.status
        except aiohttp.ConnectionTimeoutError as e:
            self.live.out(p, "connect", f"prefill hop: {_what_failed(e)}")
            return _RETRY
        except TimeoutError:
            why = f"prefill instance {p.label} did not answer the prefill hop within {self.cfg.prefill_timeout_s:g} s"
            self.live.timed_out(p, "prefill", why)
            return self._error(call, "timeout", why, 504, "GatewayTimeoutError")
        except _CONN_ERRORS as e:
            self.live.out(p, "connect" if isinstance(e, aiohttp.ClientConnectorError) else "disconnect",
                          f"prefill hop: {_what_failed(e)}")
            return _RETRY
        finally:
            p.inflight -= 1
            p.inflight_tokens -= call.n_tok
        self.m.hop_timer("prefill", p.label).observe(time.perf_counter() - t0)
        if status != 200:
            return self._upstream_status(call, "prefill", p, status, data)
        p.timeouts = 0
        try:
            pj = json.loads(data)
        except ValueError:
            return self._error(call, "upstream_error", f"prefill instance {p.label} returned a non-JSON answer "
                               "on the prefill hop", 502, "BadGatewayError")
        kvp = pj.get("kv_transfer_params") if isinstance(pj, dict) else None
        if not kvp:
            return None
        p.held += 1
        p.held_tokens += call.n_tok
        return kvp

    def _upstream_status(self, call: Call, hop: str, inst: Instance, status: int, data: bytes) -> web.Response:
        if 400 <= status < 500:  # the client's request is at fault: pass vLLM's answer on unchanged
            self._end(call, "upstream_client_error")
            return web.Response(body=data, status=status, content_type="application/json")
        try:
            msg = json.loads(data).get("message") or data[:200].decode(errors="replace")
        except (ValueError, AttributeError):
            msg = data[:200].decode(errors="replace")
        if status >= 500:
            self.live.out(inst, "http_5xx", f"{hop} hop answered HTTP {status}")
        return self._error(call, "upstream_error", f"{inst.role} instance {inst.label} answered HTTP {status} on "
                           f"the {hop} hop: {msg}", 502, "BadGatewayError")

    def _unhold(self, p: Instance, n_tok: int) -> None:
        p.held -= 1
        p.held_tokens -= n_tok

    # -- HTTP: the decode hop ------------------------------------------------------------------------------
    def _decode_body(self, call: Call, kvp: dict[str, Any] | None, chunk: int | None
                     ) -> tuple[bytes, dict[str, str]]:
        body = call.body
        if kvp is not None:
            spliced = None if "kv_transfer_params" in body else with_kv_params(call.raw, kvp)
            data = spliced if spliced is not None else dumps({**body, "kv_transfer_params": kvp})
        elif "kv_transfer_params" in body:
            data = dumps({k: v for k, v in body.items() if k != "kv_transfer_params"})
        else:
            data = call.raw  # the deflect path forwards the client's bytes untouched
        hdrs = call.headers if chunk is None else {**call.headers, CHUNK_CAP_HEADER: str(chunk)}
        return data, hdrs

    def _enter(self, d: Instance, handoff: bool, n_tok: int) -> None:
        d.active += 1
        if handoff:
            d.inbound += 1
            d.inbound_tokens += n_tok
        else:
            d.defl_waiting += 1
            d.defl_waiting_tokens += n_tok

    async def _open_decode(self, call: Call, d: Instance, data: bytes, hdrs: dict[str, str], handoff: bool,
                           deadline: float) -> tuple[Instance, aiohttp.ClientResponse | web.Response]:
        """POST the decode hop, retrying on other decode instances while connections fail; (instance, its
        response) or (instance, an error response for the client)."""
        assert self.session is not None
        tried: set[int] = set()
        while True:
            self._enter(d, handoff, call.n_tok)
            try:
                async with asyncio.timeout_at(deadline):
                    return d, await self.session.post(d.base_url + call.path, data=data, headers=hdrs)
            except TimeoutError as e:
                self._leave(d, handoff, call.n_tok, False, 0)
                if isinstance(e, aiohttp.ConnectionTimeoutError):
                    err: BaseException = e
                else:
                    return d, self._timeout_response(call, d, "decode_first_byte")
            except _CONN_ERRORS as e:
                self._leave(d, handoff, call.n_tok, False, 0)
                err = e
            except asyncio.CancelledError:  # the client left
                self._leave(d, handoff, call.n_tok, False, 0)
                raise
            self.live.out(d, "connect", f"decode hop: {_what_failed(err)}")
            tried.add(d.index)
            nd = self._balance(tried)
            if nd is None:
                return d, self._error(call, "upstream_error", f"decode instance {d.label} {_what_failed(err)} on "
                                      "the decode hop and no other decode instance answered", 502, "BadGatewayError")
            self.m.retries.labels(hop="decode").inc()
            d = nd

    def _timeout_response(self, call: Call, d: Instance, hop: str) -> web.Response:
        limit = self.cfg.decode_first_byte_timeout_s
        why = f"decode instance {d.label} sent no first byte on the decode hop within {limit:g} s"
        self.live.timed_out(d, hop, why)
        return self._error(call, "timeout", why, 504, "GatewayTimeoutError")

    async def _decode_hop(self, call: Call, d: Instance, kvp: dict[str, Any] | None, p: Instance | None,
                          chunk: int | None) -> web.StreamResponse:
        data, hdrs = self._decode_body(call, kvp, chunk)
        handoff = kvp is not None
        self._overhead(call)
        t0 = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + self.cfg.decode_first_byte_timeout_s
        st = _StreamState(p, handoff)
        resp: object = None
        try:
            d, resp = await self._open_decode(call, d, data, hdrs, handoff, deadline)
        finally:
            if p is not None and not isinstance(resp, aiohttp.ClientResponse):
                self._unhold(p, call.n_tok)  # no decode answer: P's held KV is no longer the router's concern
        if not isinstance(resp, aiohttp.ClientResponse):
            return resp  # type: ignore[return-value]
        try:
            if resp.status != 200:
                return await self._decode_status(call, d, resp)
            if not call.stream:
                return await self._relay_json(call, d, resp, deadline, st)
            return await self._relay_stream(call, d, resp, deadline, st)
        finally:
            resp.release()
            self.m.hop_timer("decode_total", d.label).observe(time.perf_counter() - t0)
            if not st.decoding and p is not None:
                self._unhold(p, call.n_tok)
            self._leave(d, handoff, call.n_tok, st.decoding, st.events)

    async def _decode_status(self, call: Call, d: Instance, resp: aiohttp.ClientResponse) -> web.Response:
        try:
            async with asyncio.timeout(self.cfg.stream_idle_timeout_s):
                err = await resp.read()
        except (TimeoutError, *_CONN_ERRORS):
            err = b""
        return self._upstream_status(call, "decode", d, resp.status, err)

    async def _relay_json(self, call: Call, d: Instance, resp: aiohttp.ClientResponse, deadline: float,
                          st: _StreamState) -> web.StreamResponse:
        """A non-streamed answer: it arrives whole at its end, so the first-byte deadline covers it all."""
        try:
            async with asyncio.timeout_at(deadline):
                out_bytes = await resp.read()
        except TimeoutError:
            return self._timeout_response(call, d, "decode_first_byte")
        except _CONN_ERRORS as e:
            self.live.out(d, "disconnect", f"decode hop: {_what_failed(e)}")
            return self._error(call, "upstream_error", f"decode instance {d.label} {_what_failed(e)} before "
                               "its answer on the decode hop was complete", 502, "BadGatewayError")
        self._first_byte(call, d, st)
        if call.client_gone:
            self._end(call, "client_disconnected")
        else:
            self._end(call, "ok")
        return web.Response(body=out_bytes, status=200, headers={
            "Content-Type": resp.headers.get("Content-Type", "application/json"), "X-Request-Id": call.rid})

    async def _relay_stream(self, call: Call, d: Instance, resp: aiohttp.ClientResponse, deadline: float,
                            st: _StreamState) -> web.StreamResponse:
        out = _StreamOut(status=200, headers={
            "Content-Type": resp.headers.get("Content-Type", "text/event-stream; charset=utf-8"),
            "X-Request-Id": call.rid})
        try:
            await out.prepare(call.request)
        except ConnectionResetError:
            self._end(call, "client_disconnected")
            return out
        content = resp.content
        tail = b""
        idle = self.cfg.stream_idle_timeout_s
        while True:
            try:
                if st.decoding:
                    async with asyncio.timeout(idle):
                        chunk_b = await content.readany()
                else:
                    async with asyncio.timeout_at(deadline):
                        chunk_b = await content.readany()
            except TimeoutError:
                return await self._stream_broke(call, d, out, st, None)
            except _CONN_ERRORS as e:
                return await self._stream_broke(call, d, out, st, e)
            if not chunk_b:
                break
            if not st.decoding:
                self._first_byte(call, d, st)
            k = chunk_b.count(b"data:")
            st.events += k
            d.decoding_ctx += k
            tail = chunk_b[-_TAIL:] if len(chunk_b) >= _TAIL else (tail + chunk_b)[-_TAIL:]
            if content.at_eof():  # D's stream already ended: its last bytes go out with the end of ours
                return await self._stream_end(call, d, out, tail, chunk_b)
            try:
                await out.write(chunk_b)
            except ConnectionResetError:
                self._end(call, "client_disconnected")
                return out
        return await self._stream_end(call, d, out, tail)

    async def _stream_end(self, call: Call, d: Instance, out: web.StreamResponse, tail: bytes, last: bytes = b""
                          ) -> web.StreamResponse:
        """D's stream ended (its ``tail``); ``last``: its final bytes, not yet relayed, sent with our end in one
        write (one send and one client wake-up fewer than two writes)."""
        if tail.endswith(_DONE_TAIL):
            outcome, extra = "ok", b""
        elif b'data: {"error"' in tail:  # the decode instance's own error event, passed on as it is
            outcome, extra = "upstream_error", b""
        else:
            outcome, extra = "upstream_error", stream_error_event(f"decode instance {d.label} ended its stream on "
                                                                  "the decode hop without [DONE]")
        try:
            await out.write_eof(last + extra if extra else last)
        except ConnectionResetError:
            if last:  # the client left before D's last bytes reached it
                self._end(call, "client_disconnected")
                return out
            # else every byte of D's was written; the client closed first (after [DONE])
        self._end(call, outcome)
        return out

    async def _stream_broke(self, call: Call, d: Instance, out: web.StreamResponse, st: _StreamState,
                            e: BaseException | None) -> web.StreamResponse:
        """The decode hop broke (``e``) or went idle (``e`` None) after the 200 headers went out."""
        if e is None:
            phase = "no first token" if not st.decoding else "no chunk"
            limit = self.cfg.stream_idle_timeout_s if st.decoding else self.cfg.decode_first_byte_timeout_s
            why = f"decode instance {d.label} sent {phase} on the decode hop for {limit:g} s"
            self.live.timed_out(d, "decode_idle" if st.decoding else "decode_first_byte", why)
            self._end(call, "timeout")
            await self._write_quietly(out, stream_error_event(why, 504, "GatewayTimeoutError"))
        else:
            why = f"decode instance {d.label} {_what_failed(e)} mid-stream on the decode hop after {st.events} events"
            self.live.out(d, "disconnect", why)
            self._end(call, "upstream_error")
            await self._write_quietly(out, stream_error_event(why))
        return out

    @staticmethod
    async def _write_quietly(out: web.StreamResponse, data: bytes) -> None:
        try:
            await out.write(data)
        except ConnectionResetError:
            pass

    def _first_byte(self, call: Call, d: Instance, st: _StreamState) -> None:
        st.decoding = True
        self.m.hop_timer("decode_first_byte", d.label).observe(time.perf_counter() - st.t0)
        d.timeouts = 0
        n_tok = call.n_tok
        if st.handoff:
            d.inbound -= 1
            d.inbound_tokens -= n_tok
        else:
            d.defl_waiting -= 1
            d.defl_waiting_tokens -= n_tok
        if st.p is not None:
            self._unhold(st.p, n_tok)
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

    # -- HTTP: the rest --------------------------------------------------------------------------------------
    async def handle_models(self, request: web.Request) -> web.Response:
        """``GET /v1/models`` of the first decode instance that answers (clients and benchmarks ask for it)."""
        assert self.session is not None
        for d in sorted(self.decode, key=lambda i: not i.alive):
            try:
                async with asyncio.timeout(self.cfg.health_timeout_s):
                    async with self.session.get(d.base_url + "/v1/models") as r:
                        return web.Response(body=await r.read(), status=r.status, content_type="application/json")
            except (TimeoutError, *_CONN_ERRORS):
                continue
        return web.json_response(error_body("no decode instance answered /v1/models", 502, "BadGatewayError"),
                                 status=502)

    async def handle_healthcheck(self, request: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok", "prefill_instances": len(self.prefill), "decode_instances": len(self.decode),
            "live_prefill_instances": sum(p.alive for p in self.prefill),
            "live_decode_instances": sum(d.alive for d in self.decode), "policy": self.policy_spec,
            "policy_class": type(self.policy).__name__, "no_prefill": self.cfg.no_prefill})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.m.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def stats(self) -> dict[str, Any]:
        """Counters and recent timing percentiles (microseconds), as ``GET /stats`` returns them."""
        m = self.m
        return {
            "policy": self.policy_spec, "requests": dict(m.outcomes), "requests_in_flight": m.in_flight_now,
            "decisions": dict(m.decisions), "forced_deflections": dict(m.forced),
            "policy_fallbacks": dict(m.fallbacks), "stale_view_decisions": dict(m.stale_decisions),
            "retries": {hop: int(m.registry.get_sample_value("deflectlab_router_retries_total", {"hop": hop}) or 0)
                        for hop in ("prefill", "decode")},
            "decision_us": _pct_us(m.decision_s), "overhead_us": _pct_us(m.overhead_s),
            "instances": self.live.snapshot(),
        }

    async def handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _on_startup(self, app: web.Application) -> None:
        # DummyCookieJar: a proxy keeps no cookies (one client's would reach another's requests), and skips the
        # jar's filtering on every upstream request
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s),
            cookie_jar=aiohttp.DummyCookieJar())
        self._t0 = time.monotonic()
        self.live.start(self.session)

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.live.stop()
        if self.session is not None:
            await self.session.close()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
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


class _StreamOut(web.StreamResponse):
    """A relayed stream whose status line and headers leave with its first chunk, in one send: one syscall and
    one client wake-up fewer per request (aiohttp's ``web.Response`` buffers its headers the same way)."""

    _send_headers_immediately = False


class _StreamState:
    """The decode hop's progress: past the first byte yet, SSE events relayed, and the prefill instance whose
    held KV the first byte releases."""

    __slots__ = ("p", "handoff", "decoding", "events", "t0")

    def __init__(self, p: Instance | None, handoff: bool) -> None:
        self.p = p
        self.handoff = handoff
        self.decoding = False
        self.events = 0
        self.t0 = time.perf_counter()


_RETRY = object()
ROUTER_KEY: web.AppKey[Router] = web.AppKey("router", Router)


def pair_instances(hosts: list[str], ports: list[int], what: str) -> list[tuple[str, int]]:
    """Pair ``--X-hosts`` with ``--X-ports`` (one host is used for every port)."""
    if len(hosts) == 1 and len(ports) > 1:
        hosts = hosts * len(ports)
    if len(hosts) != len(ports):
        raise ValueError(f"number of {what} hosts ({len(hosts)}) must match number of {what} ports ({len(ports)})")
    return list(zip(hosts, ports))


def pick_event_loop(event_loop: str) -> str:
    """Install the event loop policy for ``event_loop`` (asyncio, uvloop, or auto: uvloop when it is
    installed, else asyncio) and return the loop chosen."""
    if event_loop not in ("asyncio", "uvloop", "auto"):
        raise ValueError(f"event_loop must be asyncio, uvloop or auto, got {event_loop!r}")
    if event_loop == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if event_loop == "auto":
            return "asyncio"
        raise ValueError("--event-loop uvloop needs the uvloop package: pip install uvloop") from None
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def serve(router: Router, host: str = "127.0.0.1", port: int = 8000, event_loop: str = "asyncio") -> None:
    """Run the router until interrupted, on the standard asyncio loop, on uvloop (``pip install uvloop``), or
    on uvloop when it is installed (``auto``)."""
    from prometheus_client import disable_created_metrics

    event_loop = pick_event_loop(event_loop)
    disable_created_metrics()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"deflectlab router: policy={router.policy_spec} no_prefill={router.cfg.no_prefill} "
          f"prefill={[i.label for i in router.prefill]} decode={[i.label for i in router.decode]} "
          f"event_loop={event_loop} on http://{host}:{port}", flush=True)
    # handler_cancellation: a client that disconnects cancels its handler (counted client_disconnected, its
    # upstream requests closed), also while the router waits on an upstream.
    web.run_app(router.app(), host=host, port=port, print=None, access_log=None, handler_cancellation=True)
