"""The router's counters: Prometheus series (``GET /metrics``), plain dicts (``GET /stats``), and a log that
speaks once per change of state.

Every client request ends in exactly one outcome of :data:`OUTCOMES`; ``deflectlab_router_requests_total``
summed over outcomes equals the requests received.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("deflectlab.router")

#: How a client request ended (exactly one each).
OUTCOMES = ("ok", "bad_request", "request_too_large", "upstream_client_error", "upstream_error", "timeout",
            "no_instance", "client_disconnected", "router_error")
#: Routing decisions (implicit_deflect is counted on top of prefill, when P returned no kv_transfer_params).
DECISION_KINDS = ("prefill", "deflect", "implicit_deflect", "forced_deflect")
#: Why a request was deflected without asking the policy.
FORCED_REASONS = ("no_prefill_configured", "no_live_prefill", "prefill_failed", "no_live_decode")
#: Why the policy's decision was replaced.
FALLBACK_REASONS = ("policy_error", "invalid_decision", "dead_instance")
#: Why a policy decision was made on a partly stale view (a decision with both counts under both).
STALE_REASONS = ("prefill_metrics_stale", "decode_metrics_stale")
#: Why an instance left rotation.
OUT_REASONS = ("connect", "disconnect", "http_5xx", "timeout", "health")
#: Why a scrape failed (the instance's metrics go stale; it stays in rotation).
SCRAPE_FAILURES = ("http_status", "timeout", "connection", "parse")

HOP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
               120.0, 300.0)
DECISION_BUCKETS = (1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)


class StateLog:
    """Logs a warning when a named state changes (not on every request in that state)."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}

    def set(self, key: str, state: str, message: str) -> bool:
        if self.states.get(key) == state:
            return False
        first = key not in self.states
        self.states[key] = state
        if not (first and state == "ok"):
            log.warning("%s", message)
        return True


def _labelled(counter: Counter, label: str, values: tuple[str, ...]) -> dict[str, Any]:
    return {v: counter.labels(**{label: v}) for v in values}


class RouterMetrics:
    """All of the router's counters and histograms, Prometheus and plain."""

    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry()
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.decisions = dict.fromkeys(DECISION_KINDS, 0)
        self.forced = dict.fromkeys(FORCED_REASONS, 0)
        self.fallbacks = dict.fromkeys(FALLBACK_REASONS, 0)
        self.stale_decisions = dict.fromkeys(STALE_REASONS, 0)
        self.decision_s: deque[float] = deque(maxlen=200_000)
        self.overhead_s: deque[float] = deque(maxlen=200_000)
        self.states = StateLog()
        self._outcome = _labelled(Counter("deflectlab_router_requests", "Client requests by outcome (one each).",
                                          ["outcome"], registry=reg), "outcome", OUTCOMES)
        self._decision = _labelled(Counter("deflectlab_router_decisions", "Routing decisions by kind (implicit_"
                                           "deflect: prefill-path requests whose prefill instance returned no "
                                           "kv_transfer_params).", ["kind"], registry=reg), "kind", DECISION_KINDS)
        self._forced = _labelled(Counter("deflectlab_router_forced_deflections", "Requests deflected without "
                                         "asking the policy, by reason.", ["reason"], registry=reg), "reason",
                                 FORCED_REASONS)
        self._fallback = _labelled(Counter("deflectlab_router_policy_fallbacks", "Policy decisions replaced by "
                                           "the router, by reason.", ["reason"], registry=reg), "reason",
                                   FALLBACK_REASONS)
        self._stale = _labelled(Counter("deflectlab_router_stale_view_decisions", "Policy decisions made while "
                                        "some instance in rotation had stale metrics (its view from the router's "
                                        "own counters), by pool.", ["reason"], registry=reg), "reason", STALE_REASONS)
        self.out_of_rotation = Counter("deflectlab_router_instance_out_of_rotation", "Times an instance left "
                                       "rotation, by reason.", ["role", "instance", "reason"], registry=reg)
        self.scrape_failures = Counter("deflectlab_router_scrape_failures", "Failed /metrics scrapes, by reason "
                                       "(metrics go stale; the instance stays in rotation).",
                                       ["role", "instance", "reason"], registry=reg)
        self.timeouts = Counter("deflectlab_router_timeouts", "Upstream waits that ran out, by hop.",
                                ["hop", "instance"], registry=reg)
        self.retries = Counter("deflectlab_router_retries", "Requests retried on another instance after a "
                               "connection failure.", ["hop"], registry=reg)
        self.up = Gauge("deflectlab_router_instance_up", "1 while an instance is in rotation.",
                        ["role", "instance"], registry=reg)
        self.stale = Gauge("deflectlab_router_instance_metrics_stale", "1 while an instance's scraped metrics are "
                           "stale.", ["role", "instance"], registry=reg)
        self.inflight = Gauge("deflectlab_router_requests_in_flight", "Client requests being served.", registry=reg)
        self.inflight.set_function(lambda: self.in_flight_now)  # read at scrape time: no locked update per request
        self.hop = Histogram("deflectlab_router_hop_seconds", "Upstream hop latency, wall seconds: prefill "
                             "(whole answer), decode_first_byte, decode_total.", ["hop", "instance"],
                             buckets=HOP_BUCKETS, registry=reg)
        self._decide = Histogram("deflectlab_router_decision_seconds", "Time in policy.decide (view build "
                                 "included), seconds.", buckets=DECISION_BUCKETS, registry=reg)
        self._overhead = Histogram("deflectlab_router_overhead_seconds", "Router time from a request's body "
                                   "read to its first upstream request sent, seconds.", buckets=DECISION_BUCKETS,
                                   registry=reg)
        self._hop_children: dict[tuple[str, str], Any] = {}
        self.in_flight_now = 0

    def hop_timer(self, hop: str, label: str) -> Any:
        key = (hop, label)
        c = self._hop_children.get(key)
        if c is None:
            c = self._hop_children[key] = self.hop.labels(hop=hop, instance=label)
        return c

    def outcome(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self._outcome[outcome].inc()

    def decided(self, kind: str) -> None:
        self.decisions[kind] += 1
        self._decision[kind].inc()

    def forced_deflect(self, reason: str) -> None:
        self.forced[reason] += 1
        self._forced[reason].inc()
        self.decided("forced_deflect")

    def fallback(self, reason: str) -> None:
        self.fallbacks[reason] += 1
        self._fallback[reason].inc()

    def stale_decision(self, reason: str) -> None:
        self.stale_decisions[reason] += 1
        self._stale[reason].inc()

    def decide_time(self, dt: float) -> None:
        self.decision_s.append(dt)
        self._decide.observe(dt)

    def overhead(self, dt: float) -> None:
        self.overhead_s.append(dt)
        self._overhead.observe(dt)
