"""The one decision interface shared by the simulator, the Gymnasium environment and the router.

A policy is asked once per arriving request::

    decision = policy.decide(view, request)

``view`` is a read-only :class:`ClusterView` of the cluster at that instant and ``request`` anything with
``rid``, ``arrival_s`` and ``input_tokens`` (a policy must not look at the output length: the router does not
know it). The answer is a :class:`Decision`: ``Decision.prefill(p, d)`` runs the prefill on prefill node ``p``
and decodes on decode node ``d`` (``None`` leaves ``d`` to the decode balancer at hand-off time);
``Decision.deflect(d, chunk)`` runs prefill and decode on decode node ``d``, the prefill in chunks of at most
``chunk`` tokens per step (``None``: the node's token budget).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from deflectlab.envs.profile import LatencyModel

PREFILL = 0
DEFLECT = 1


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes.

    :param kind: :data:`PREFILL` or :data:`DEFLECT`.
    :param prefill_node: prefill node index (prefill path only).
    :param decode_node: decode node index; on the prefill path ``None`` defers to the decode balancer.
    :param chunk_cap: deflect path only: most prefill tokens of this request per decode step, tokens.
    :param estimates: optional numbers the policy based its choice on (e.g. estimated TTFT per path, seconds),
        kept with the request so their error against the outcome can be measured.
    """

    kind: int
    prefill_node: int | None = None
    decode_node: int | None = None
    chunk_cap: int | None = None
    estimates: dict[str, float] | None = field(default=None, compare=False)

    @staticmethod
    def prefill(p: int, d: int | None = None, estimates: dict[str, float] | None = None) -> Decision:
        return Decision(PREFILL, p, d, None, estimates)

    @staticmethod
    def deflect(d: int, chunk: int | None = None, estimates: dict[str, float] | None = None) -> Decision:
        return Decision(DEFLECT, None, d, chunk, estimates)

    @property
    def deflected(self) -> bool:
        return self.kind == DEFLECT

    def __str__(self) -> str:
        if self.kind == PREFILL:
            return f"prefill(p={self.prefill_node}, d={self.decode_node})"
        return f"deflect(d={self.decode_node}, chunk={self.chunk_cap})"


@dataclass(slots=True)
class PrefillNodeView:
    """What a policy may know about one prefill node. Tokens are prompt tokens; times in seconds.

    :param waiting_requests: requests queued or partly prefilled on the node.
    :param waiting_tokens: prompt tokens still to prefill there (the running step's included).
    :param busy_until_s: absolute time the running step ends (``now`` when idle).
    :param kv_free_tokens: free KV-cache tokens (KV of finished prefills is held until the decode side pulls it).
    :param held_handoffs: finished prefills whose KV has not yet been pulled by a decode node.
    :param egress_bytes: KV bytes still to send from this node (in flight or waiting for decode admission).
    :param cached_tokens: prompt tokens of the arriving request this node holds in its prefix cache (its expected
        hit: they would not be prefilled again); 0 without a prefix cache.
    """

    index: int
    profile: LatencyModel
    max_batched_tokens: int
    waiting_requests: int = 0
    waiting_tokens: int = 0
    busy_until_s: float = 0.0
    kv_free_tokens: int = 0
    held_handoffs: int = 0
    egress_bytes: float = 0.0
    cached_tokens: int = 0


@dataclass(slots=True)
class DecodeNodeView:
    """What a policy may know about one decode node. Tokens and seconds.

    :param batch_size: running decode sequences.
    :param context_tokens: KV tokens those decodes read per step.
    :param kv_free_tokens: free KV-cache tokens, reservations of admitted requests subtracted.
    :param deflected_waiting_tokens: prompt tokens of deflected prefills not yet computed on this node.
    :param deflected_waiting_requests: deflected requests still prefilling (or queued) on this node.
    :param inbound_handoffs: prefill-path requests bound for this node whose KV has not arrived yet.
    :param ingress_bytes: KV bytes still to arrive over this node's NIC.
    :param step_s: duration of the node's current (or last) step, seconds.
    :param waiting_admission: requests waiting for KV room on this node.
    :param cached_tokens: prompt tokens of the arriving request this node holds in its prefix cache: a deflected
        prefill would skip them, a hand-off would not move them; 0 without a prefix cache.
    """

    index: int
    profile: LatencyModel
    max_batched_tokens: int
    max_num_seqs: int
    batch_size: int = 0
    context_tokens: int = 0
    kv_free_tokens: int = 0
    deflected_waiting_tokens: int = 0
    deflected_waiting_requests: int = 0
    inbound_handoffs: int = 0
    ingress_bytes: float = 0.0
    step_s: float = 0.0
    waiting_admission: int = 0
    cached_tokens: int = 0


#: the longest window :meth:`ClusterView.recent_arrivals` answers, seconds (the router keeps this much history)
RECENT_MAX_S = 10.0


class ClusterView:
    """Read-only snapshot of the cluster at one decision.

    The node lists can be given directly (the router does) or built on first access by ``builder`` (the
    simulator does, so policies that never look pay nothing).

    :param now_s: time of the decision, seconds.
    :param ttft_slo_s: time-to-first-token SLO, seconds.
    :param tbt_slo_s: time-between-tokens SLO, seconds.
    :param arrival_rate_per_s: recent request arrival rate (exponentially weighted), requests per second; or a
        function computing it on first access (the simulator's, so policies that never look pay nothing).
    :param handoff: the cluster's KV hand-off preset (:class:`envs.handoff.Handoff`) for hand-off estimates
        (:func:`envs.handoff.handoff_estimate_s`); None: the latency profile's transfer terms only.
    :param recent: the arrival history: ``recent(window_s)`` gives ``(requests, prompt tokens)`` that arrived in
        ``(now - window_s, now]``, the arriving request included (:meth:`recent_arrivals`; windows up to
        :data:`RECENT_MAX_S`); None where the view has none (a view built by hand).

    ``dead_prefill`` and ``dead_decode`` are the indices of nodes out of rotation: none in the model; the router's
    view (``serving.load_view.RouterView``) lists the instances it has taken out, which every configured shape
    keeps in the view so fixed-shape policies keep their shape, and which no policy may pick.
    """

    #: indices of prefill / decode nodes out of rotation (see above)
    dead_prefill: tuple[int, ...] = ()
    dead_decode: tuple[int, ...] = ()

    __slots__ = ("now_s", "ttft_slo_s", "tbt_slo_s", "_rate", "num_prefill", "num_decode", "_prefill",
                 "_decode", "_builder", "handoff", "_recent")

    def __init__(
        self,
        now_s: float,
        ttft_slo_s: float,
        tbt_slo_s: float,
        arrival_rate_per_s: float | Callable[[], float] = 0.0,
        prefill: list[PrefillNodeView] | None = None,
        decode: list[DecodeNodeView] | None = None,
        builder: Callable[[], tuple[list[PrefillNodeView], list[DecodeNodeView]]] | None = None,
        num_prefill: int | None = None,
        num_decode: int | None = None,
        handoff: Any = None,
        recent: Callable[[float], tuple[int, int]] | None = None,
    ) -> None:
        if builder is None and (prefill is None or decode is None):
            raise ValueError("ClusterView needs node lists or a builder")
        if builder is not None and (num_prefill is None or num_decode is None):
            raise ValueError("a lazily built ClusterView needs num_prefill and num_decode")
        self.num_prefill = len(prefill) if prefill is not None else num_prefill
        self.num_decode = len(decode) if decode is not None else num_decode
        self.now_s = now_s
        self.ttft_slo_s = ttft_slo_s
        self.tbt_slo_s = tbt_slo_s
        self._rate = arrival_rate_per_s
        self._prefill = prefill
        self._decode = decode
        self._builder = builder
        self.handoff = handoff
        self._recent = recent

    def recent_arrivals(self, window_s: float) -> tuple[int, int]:
        """``(requests, prompt tokens)`` that arrived in the last ``window_s`` seconds (``(now - window_s, now]``),
        the arriving request included; ``window_s`` at most :data:`RECENT_MAX_S`."""
        if self._recent is None:
            raise ValueError("this ClusterView carries no arrival history (recent=None): the simulator's and the "
                             "router's views do; feature schema 4 needs it")
        if not 0.0 < window_s <= RECENT_MAX_S:
            raise ValueError(f"recent_arrivals: window_s must be in (0, {RECENT_MAX_S:g}] seconds, got {window_s!r}")
        return self._recent(window_s)

    @property
    def arrival_rate_per_s(self) -> float:
        rate = self._rate
        if not isinstance(rate, float):
            rate = self._rate = float(rate() if callable(rate) else rate)
        return rate

    def _build(self) -> None:
        assert self._builder is not None
        self._prefill, self._decode = self._builder()

    @property
    def prefill(self) -> list[PrefillNodeView]:
        if self._prefill is None:
            self._build()
        return self._prefill  # type: ignore[return-value]

    @property
    def decode(self) -> list[DecodeNodeView]:
        if self._decode is None:
            self._build()
        return self._decode  # type: ignore[return-value]



def decode_load(d: DecodeNodeView) -> int:
    """Requests on or bound for decode node ``d``: its running batch, deflected prefills waiting there, and
    prefill-path requests whose KV is on its way. The one measure of decode load that policies share."""
    return d.batch_size + d.deflected_waiting_requests + d.inbound_handoffs


def least_loaded_decode(view: ClusterView) -> DecodeNodeView:
    """The decode node with the least :func:`decode_load` (ties: lowest index), as the cluster's least-loaded
    decode balancer picks it."""
    decode = view.decode
    best = decode[0]
    best_load = decode_load(best)
    for d in decode:
        load = decode_load(d)
        if load < best_load:
            best, best_load = d, load
    return best


@runtime_checkable
class RequestLike(Protocol):
    rid: int
    arrival_s: float
    input_tokens: int


class Policy:
    """Base class of every routing policy. Subclasses set ``name`` and implement :meth:`decide`."""

    name: str = "policy"
    #: False for policies that can serve a cluster with no prefill nodes (aggregated serving on the decode nodes)
    needs_prefill_nodes: bool = True

    def decide(self, view: ClusterView, request: RequestLike) -> Decision:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self, seed: int | None = None) -> None:
        """Forget per-run state (round-robin pointers, caches) before a new run."""

    def taken(self, view: ClusterView, request: RequestLike, decision: Decision) -> None:
        """The decision actually taken for ``request``, the one this policy last decided on at ``view``, where another
        policy acted (a teacher labelling a learner's states). A policy that keeps state on its own decisions
        (the proactive deflector's tracked deflections) replaces its own with this one; by default nothing."""

    def params(self) -> dict[str, Any]:
        """The policy's parameters, for reports and the resolved config."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"
