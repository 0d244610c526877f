"""The router's picture of the cluster: per-instance counters and scraped metrics, turned into the same
:class:`~deflectlab.envs.view.ClusterView` the simulator builds, so a policy sees the same features in both.

Two sources feed it:

* the router's own in-flight counters, exact for the traffic it sent: prompts waiting at each prefill
  instance, finished prefills whose KV has not been pulled yet, hand-offs and deflected prefills bound for each
  decode instance, and the decoding requests with their context (prompt plus the SSE events streamed so far);
* each instance's ``/metrics`` (``vllm:num_requests_waiting``, ``vllm:num_requests_running``,
  ``vllm:kv_cache_usage_perc``, summed over the ``engine`` label), scraped every 50-100 ms, which also sees
  traffic from other clients.

How each view field is filled (``own`` = the router's counters, ``scraped`` = the last scrape):

=============================  ==================================================================================
``PrefillNodeView``
``waiting_requests``           max(own prompts sent and not answered, scraped waiting + running)
``waiting_tokens``             own: prompt tokens of those prompts (estimate: other clients' prompts are unseen)
``busy_until_s``               ``now`` (unknown from outside; ``waiting_tokens`` includes the running step's work)
``kv_free_tokens``             (1 - scraped kv_cache_usage_perc) x profile KV capacity
``held_handoffs``              own: prefills answered whose decode hop has not produced its first byte
``egress_bytes``               own: their prompt tokens x profile KV bytes per token
``DecodeNodeView``
``batch_size``                 max(own decoding requests, scraped running - own deflected prefills started)
``context_tokens``             own: prompt + streamed events of the decoding requests, scaled up when the
                               scraped batch is larger than the own one
``kv_free_tokens``             (1 - scraped kv_cache_usage_perc) x profile KV capacity
``deflected_waiting_*``        own: deflected requests (and prompt tokens) with no first byte back yet
``inbound_handoffs``           own: prefill-path requests sent to the instance with no first byte back yet
``ingress_bytes``              own: their prompt tokens x KV bytes per token
``step_s``                     profile estimate of one step of the batch above plus a deflected chunk
``waiting_admission``          max(0, scraped waiting - own inbound - own deflected waiting)
=============================  ==================================================================================

Stale metrics. A scrape that fails, or none newer than the router's ``metrics_stale_s``, makes an instance's
metrics stale: its view then uses the router's own counters alone (``scraped`` terms read 0, and the used KV is
the router's estimate: prompt plus streamed tokens of its own requests there). A stale scrape never takes an
instance out of rotation.

Every configured instance is in the view, in configuration order, so a policy trained for a fixed shape keeps
its shape. An instance out of rotation is shown unusable: a prefill instance busy for :data:`DEAD_BUSY_S` with
no free KV, a decode instance full (``max_num_seqs`` running, no free KV, a step of :data:`DEAD_BUSY_S`). The
view (:class:`RouterView`) also lists which instances are dead and which are stale; the router never sends a
request to a dead instance a policy picks anyway (see :mod:`serving.router`).

``now_s`` and ``arrival_rate_per_s`` are in model seconds: wall seconds divided by the router's time scale
(1 with real vLLM; the emulators' time scale when routing emulators).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from deflectlab.envs.profile import LatencyModel
from deflectlab.envs.simulator import RATE_TAU_S
from deflectlab.envs.view import RECENT_MAX_S, ClusterView, DecodeNodeView, PrefillNodeView

#: How long a dead instance is shown busy, seconds: far beyond any SLO, so every policy's estimate rules it out.
DEAD_BUSY_S = 1.0e6

#: The vLLM gauges the router scrapes.
SCRAPED = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """The scraped gauges from a ``/metrics`` page, each summed over its label sets (the ``engine`` label).

    Only the lines of :data:`SCRAPED` are handed to prometheus_client's parser (a real vLLM page has hundreds
    of histogram lines the router does not need). ``kv_cache_usage_perc`` is averaged over engines, as a
    fraction of their summed capacity would need the capacities. Missing gauges are absent from the result.
    """
    keep = [ln for ln in text.splitlines() if ln.startswith(SCRAPED) or (ln.startswith("# TYPE ")
                                                                       and ln[7:].split(" ", 1)[0] in SCRAPED)]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for fam in text_string_to_metric_families("\n".join(keep) + "\n"):
        for s in fam.samples:
            if s.name in SCRAPED:
                sums[s.name] = sums.get(s.name, 0.0) + s.value
                counts[s.name] = counts.get(s.name, 0) + 1
    if "vllm:kv_cache_usage_perc" in sums:
        sums["vllm:kv_cache_usage_perc"] /= counts["vllm:kv_cache_usage_perc"]
    return sums


@dataclass(eq=False)
class Instance:
    """One upstream vLLM (or emulator) instance and what the router knows about it.

    :param role: ``prefill`` or ``decode``.
    :param index: position in the router's list of that role (``--prefiller-hosts`` order).
    :param host: host name or address.
    :param port: HTTP port.
    """

    role: str
    index: int
    host: str
    port: int
    alive: bool = True
    health_failures: int = 0  # consecutive failed /health probes
    suspect_until: float = 0.0  # wall clock (monotonic) before which a timed-out instance stays out
    timeouts: int = 0  # consecutive timeouts
    stale: bool = False  # the last scrape failed, or the last good one is too old
    out_since: float = -1.0  # wall clock (monotonic) it left rotation
    # scraped (summed over engines)
    scraped_waiting: float = 0.0
    scraped_running: float = 0.0
    kv_usage: float = 0.0
    scraped_at: float = -1.0
    # own counters, prefill role
    inflight: int = 0
    inflight_tokens: int = 0
    held: int = 0
    held_tokens: int = 0
    # own counters, decode role
    active: int = 0  # requests on this instance in any phase
    inbound: int = 0
    inbound_tokens: int = 0
    defl_waiting: int = 0
    defl_waiting_tokens: int = 0
    decoding: int = 0
    decoding_ctx: int = 0
    label: str = field(init=False)

    def __post_init__(self) -> None:
        self.label = f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


class RateEstimate:
    """Exponentially weighted arrival rate, requests per (model) second: the simulator's estimate."""

    __slots__ = ("rate", "t")

    def __init__(self) -> None:
        self.rate = 0.0
        self.t = 0.0

    def arrival(self, t: float) -> None:
        self.rate = self.rate * math.exp((self.t - t) / RATE_TAU_S) + 1.0 / RATE_TAU_S
        self.t = t

    def at(self, t: float) -> float:
        return self.rate * math.exp((self.t - t) / RATE_TAU_S)


class RecentArrivals:
    """The router's arrival history for :meth:`ClusterView.recent_arrivals`: the arrival times (model seconds) and
    prompt lengths of the last :data:`~deflectlab.envs.view.RECENT_MAX_S` seconds, as the simulator counts them."""

    __slots__ = ("_log", "_t")

    def __init__(self) -> None:
        self._log: deque[tuple[float, int]] = deque()
        self._t = 0.0

    def arrival(self, t: float, prompt_tokens: int) -> None:
        log = self._log
        log.append((t, prompt_tokens))
        self._t = t
        while log[0][0] <= t - RECENT_MAX_S:  # (the newest entry always stays)
            log.popleft()

    def __call__(self, window_s: float) -> tuple[int, int]:
        """Requests and prompt tokens that arrived in ``(t - window_s, t]``, ``t`` the latest arrival."""
        n = tokens = 0
        lo = self._t - window_s
        for t, k in reversed(self._log):
            if t <= lo:
                break
            n += 1
            tokens += k
        return n, tokens


class ViewBuilder:
    """Builds the policy's :class:`ClusterView` from every configured instance.

    :param prefill_profile: latency model of the prefill instances.
    :param decode_profile: latency model of the decode instances.
    :param prefill_max_batched_tokens: prefill step budget, tokens (vLLM ``--max-num-batched-tokens``).
    :param decode_max_batched_tokens: decode step budget, tokens.
    :param max_num_seqs: decode ``--max-num-seqs``.
    :param ttft_slo_s: TTFT SLO, seconds.
    :param tbt_slo_s: TBT SLO, seconds.
    """

    def __init__(self, prefill_profile: LatencyModel, decode_profile: LatencyModel,
                 prefill_max_batched_tokens: int, decode_max_batched_tokens: int, max_num_seqs: int,
                 ttft_slo_s: float, tbt_slo_s: float) -> None:
        self.pp = prefill_profile
        self.dp = decode_profile
        self.p_budget = prefill_max_batched_tokens
        self.d_budget = decode_max_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.ttft_slo_s = ttft_slo_s
        self.tbt_slo_s = tbt_slo_s

    def prefill_view(self, i: int, p: Instance, now: float) -> PrefillNodeView:
        prof = self.pp
        if not p.alive:
            return PrefillNodeView(index=i, profile=prof, max_batched_tokens=self.p_budget, waiting_requests=p.inflight,
                                   waiting_tokens=p.inflight_tokens, busy_until_s=now + DEAD_BUSY_S, kv_free_tokens=0)
        if p.stale:
            waiting = p.inflight
            kv_free = prof.kv_capacity_tokens - p.inflight_tokens - p.held_tokens
        else:
            waiting = max(p.inflight, int(p.scraped_waiting + p.scraped_running))
            kv_free = int((1.0 - p.kv_usage) * prof.kv_capacity_tokens)
        return PrefillNodeView(
            index=i, profile=prof, max_batched_tokens=self.p_budget, waiting_requests=waiting,
            waiting_tokens=p.inflight_tokens, busy_until_s=now, kv_free_tokens=max(kv_free, 0), held_handoffs=p.held,
            egress_bytes=float(p.held_tokens * prof.kv_bytes_per_token))

    def decode_view(self, i: int, d: Instance) -> DecodeNodeView:
        prof = self.dp
        if not d.alive:
            return DecodeNodeView(index=i, profile=prof, max_batched_tokens=self.d_budget,
                                  max_num_seqs=self.max_num_seqs, batch_size=self.max_num_seqs, kv_free_tokens=0,
                                  step_s=DEAD_BUSY_S)
        own = d.decoding
        batch = own
        ctx = d.decoding_ctx
        started = d.scraped_running - own
        if not d.stale and started > d.defl_waiting:  # more running than we know of: other clients' requests
            batch = int(d.scraped_running) - d.defl_waiting
            if own > 0:
                ctx = int(ctx * batch / own)
        chunk = min(max(self.d_budget - batch, 0), d.defl_waiting_tokens)
        step = prof.step_s(batch + chunk, batch, ctx, chunk * chunk, 0) if batch + chunk else 0.0
        if d.stale:
            kv_free = prof.kv_capacity_tokens - d.decoding_ctx - d.inbound_tokens - d.defl_waiting_tokens
            admission = 0
        else:
            kv_free = int((1.0 - d.kv_usage) * prof.kv_capacity_tokens)
            admission = max(0, int(d.scraped_waiting) - d.inbound - d.defl_waiting)
        return DecodeNodeView(
            index=i, profile=prof, max_batched_tokens=self.d_budget, max_num_seqs=self.max_num_seqs,
            batch_size=batch, context_tokens=ctx, kv_free_tokens=max(kv_free, 0),
            deflected_waiting_tokens=d.defl_waiting_tokens, deflected_waiting_requests=d.defl_waiting,
            inbound_handoffs=d.inbound, ingress_bytes=float(d.inbound_tokens * prof.kv_bytes_per_token),
            step_s=step, waiting_admission=admission)

    def view(self, now: float, rate: float, prefill: list[Instance], decode: list[Instance],
             recent: RecentArrivals | None = None) -> RouterView:
        """A lazily built view of every configured instance; view index ``i`` is ``prefill[i]`` /
        ``decode[i]``, dead ones shown unusable (see the module docstring); ``recent``: the arrival history."""

        def build() -> tuple[list[PrefillNodeView], list[DecodeNodeView]]:
            return ([self.prefill_view(i, p, now) for i, p in enumerate(prefill)],
                    [self.decode_view(i, d) for i, d in enumerate(decode)])

        return RouterView(now, self.ttft_slo_s, self.tbt_slo_s, rate, builder=build, num_prefill=len(prefill),
                          num_decode=len(decode), instances=(prefill, decode), recent=recent)


class RouterView(ClusterView):
    """A :class:`ClusterView` that also says which instances are out of rotation (``dead_*``) and which have
    stale metrics (``stale_*``): tuples of view indices."""

    __slots__ = ("dead_prefill", "dead_decode", "stale_prefill", "stale_decode")

    def __init__(self, *args: object, instances: tuple[list[Instance], list[Instance]], **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.dead_prefill, self.stale_prefill = _out_and_stale(instances[0])
        self.dead_decode, self.stale_decode = _out_and_stale(instances[1])


def _out_and_stale(instances: list[Instance]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(indices out of rotation, indices in rotation with stale metrics)`` (one pass: a decision's hot path, where
    both are nearly always empty)."""
    dead = stale = ()
    for i, x in enumerate(instances):
        if not x.alive:
            dead += (i,)
        elif x.stale:
            stale += (i,)
    return dead, stale
