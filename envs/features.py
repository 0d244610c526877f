"""The feature builder: the one observation of a routing decision, shared by the environment, the exported-policy
runtime and the router.

``build_observation(view, request)`` turns a :class:`~envs.view.ClusterView` and the arriving request into a
fixed-length ``float32`` vector for a cluster of ``P`` prefill and ``D`` decode nodes. It reads only fields of the
view and its node views (profiles included) and ``request.input_tokens``: the router knows exactly these, so a
policy sees the same features in simulation and in front of real vLLM servers.

Every feature has known bounds, so an exported policy needs no running normaliser. Unbounded quantities are
squashed with ``x / (x + scale)`` into ``[0, 1)`` (``scale`` is where the feature reads 0.5: resolution is best
around it); ratios to a capacity are clipped into ``[0, 1]``; the TBT headroom is clipped into ``[-1, 1]``. Times
are measured in SLOs (seconds over ``ttft_slo_s`` or ``tbt_slo_s``) so a feature of 0.5 means "one SLO".

Versions (:data:`SCHEMAS`): **1** (:data:`FEATURE_SCHEMA`, :data:`SCHEMA_VERSION`, the default and the shipped
policy's) estimates the hand-off from the latency profile's transfer terms and knows no prefix cache; **2**
(:data:`FEATURE_SCHEMA_V2`) adds each node's cached share of the prompt and its ``est_ttft`` features use the hits
(a node prefills only what it does not hold, a hand-off moves only what the decode node lacks) and the cluster's
hand-off preset (:func:`envs.handoff.handoff_estimate_s`, dispatch delay included); **3**
(:data:`FEATURE_SCHEMA_V3`) adds the proactive deflector's own estimates, ``path_ttft`` per node, ``path_chunk`` per
decode node, and per node whether it is its side's best and its ratio to the other side's best
(:class:`envs.estimates.PathEstimator`, whose state -- the prompt lengths seen and the deflected prompts placed on
each decode node -- the builder keeps across a run: :meth:`FeatureBuilder.decision` records each deflection and
:meth:`FeatureBuilder.reset` starts a new run), and a deflection takes the estimator's chunk cap (the chunk rule
below where the estimator finds none), so a network over it can represent the tuned proactive rule exactly and learn
where to depart from it; **4** (:data:`FEATURE_SCHEMA_V4`) adds the recent arrival process to the request block
(requests and prompt tokens of the last second, prompt tokens per second over the last 10 s:
:meth:`ClusterView.recent_arrivals`, which the simulator and the router both answer from the arrivals they saw).
A schema-1 policy sees exactly the features it was trained on.

Layout (:data:`FEATURE_SCHEMA`, version :data:`SCHEMA_VERSION`): the request block, then one block per prefill
node in index order, then one block per decode node. Changing any feature, its order, its transform or its
scale is a new schema version: exported policies record the version and the runtime refuses a mismatch.

Action layout (shared with the environment and the runtime): ``Discrete(P + D)``; action ``i < P`` is
``Decision.prefill(i)`` (decode node left to the cluster's balancer), action ``P + j`` is
``Decision.deflect(j, chunk)`` with ``chunk`` from :class:`ChunkSolver`: the largest prefill chunk whose decode
step, next to node ``j``'s running batch, keeps within the TBT SLO by the profile, capped by the node's token
budget, and at least :data:`MIN_CHUNK_TOKENS` (if even that breaks the SLO, the batch is already over it).

The estimates follow the proactive deflector in docs/design.md: ``T_P(p) = wait_p + prefill(L) + handoff(L) +
first_step`` and ``T_D(d) = ceil((Q_d + L) / c_d) * step(B, C, c_d)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from deflectlab.envs.chunking import largest_safe_chunk, worst_chunk_step_s
from deflectlab.envs.estimates import PathEstimator
from deflectlab.envs.handoff import handoff_estimate_s
from deflectlab.envs.view import ClusterView, Decision, least_loaded_decode

if TYPE_CHECKING:
    from deflectlab.envs.profile import LatencyModel

SCHEMA_NAME = "deflectlab.features"
SCHEMA_VERSION = 1

#: Smallest chunk cap a deflection gets, tokens: below it the per-step overhead dominates (the profile's
#: linear-operator time is flat up to about 64 tokens on A100).
MIN_CHUNK_TOKENS = 32
#: Context tokens are rounded up to a multiple of this before the chunk search, so results can be cached.
#: On the bundled A100 profiles 1,024 tokens of decode attention cost about 17 us, against a 100 ms TBT SLO.
CTX_ROUND_TOKENS = 1024
#: Prompt lengths are rounded up to a multiple of this for the chunk search (its cross-attention term), tokens.
PROMPT_ROUND_TOKENS = 256
#: Prompt length that reads 1.0 on the log scale of ``request.input_tokens``, tokens.
MAX_PROMPT_TOKENS = 131072
#: Chunk size at which a prefill node's sustained throughput is taken for queue-wait estimates, tokens.
PREFILL_RATE_CHUNK_TOKENS = 2048
#: Schema 3's estimator: no deflect path where the largest TBT-safe chunk is below this (unless the prompt is
#: shorter), tokens. Fitted: the tuned proactive deflector's ``min_chunk`` on the blocked split's training blocks
#: (``experiments/blocked/tuned_blocked.yaml``, 2P2D code trace, 1-3x), so schema 3 carries exactly the estimates and
#: caps of that rule; a learned policy may still deflect to such a node, with the chunk rule's cap.
PATH_MIN_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class FeatureSpec:
    """One feature of the observation.

    :param name: feature name; per-node features are named ``prefill[i].<name>`` / ``decode[j].<name>``.
    :param unit: unit of the raw quantity before normalisation.
    :param transform: ``squash`` (``x / (x + scale)``), ``ratio`` (``x / scale`` clipped), ``log``
        (``log1p(x) / log1p(scale)`` clipped), ``headroom`` (``(scale - x) / scale`` clipped) or ``flag``.
    :param scale: the transform's scale, in ``unit`` (for SLO-relative units the SLO itself is 1).
    :param low: lower bound of the normalised value.
    :param high: upper bound of the normalised value.
    :param doc: what it measures and why a policy needs it.
    """

    name: str
    unit: str
    transform: str
    scale: float
    low: float
    high: float
    doc: str


def _f(name: str, unit: str, transform: str, scale: float, doc: str, low: float = 0.0, high: float = 1.0
       ) -> FeatureSpec:
    return FeatureSpec(name, unit, transform, float(scale), low, high, doc)


@dataclass(frozen=True)
class FeatureSchema:
    """The versioned observation layout. ``request`` once, ``prefill`` per prefill node, ``decode`` per decode node."""

    name: str
    version: int
    request: tuple[FeatureSpec, ...]
    prefill: tuple[FeatureSpec, ...]
    decode: tuple[FeatureSpec, ...]

    def size(self, num_prefill: int, num_decode: int) -> int:
        return len(self.request) + num_prefill * len(self.prefill) + num_decode * len(self.decode)

    def specs(self, num_prefill: int, num_decode: int) -> list[FeatureSpec]:
        """Every feature in observation order, per-node names expanded (``prefill[0].est_wait``)."""
        out = list(self.request)
        for i in range(num_prefill):
            out += [FeatureSpec(f"prefill[{i}].{s.name}", *astuple_rest(s)) for s in self.prefill]
        for j in range(num_decode):
            out += [FeatureSpec(f"decode[{j}].{s.name}", *astuple_rest(s)) for s in self.decode]
        return out

    def names(self, num_prefill: int, num_decode: int) -> list[str]:
        return [s.name for s in self.specs(num_prefill, num_decode)]

    def bounds(self, num_prefill: int, num_decode: int) -> tuple[np.ndarray, np.ndarray]:
        specs = self.specs(num_prefill, num_decode)
        return (np.array([s.low for s in specs], dtype=np.float32),
                np.array([s.high for s in specs], dtype=np.float32))

    def to_dict(self, num_prefill: int | None = None, num_decode: int | None = None) -> dict[str, Any]:
        """JSON form for manifests; with a cluster shape, also the expanded names and bounds."""
        d: dict[str, Any] = {
            "name": self.name, "version": self.version,
            "request": [asdict(s) for s in self.request],
            "prefill": [asdict(s) for s in self.prefill],
            "decode": [asdict(s) for s in self.decode],
        }
        if num_prefill is not None and num_decode is not None:
            lo, hi = self.bounds(num_prefill, num_decode)
            d["size"] = self.size(num_prefill, num_decode)
            d["names"] = self.names(num_prefill, num_decode)
            d["low"] = lo.tolist()
            d["high"] = hi.tolist()
        return d


def astuple_rest(s: FeatureSpec) -> tuple:
    return (s.unit, s.transform, s.scale, s.low, s.high, s.doc)


SLO = "TTFT SLOs (seconds / ttft_slo_s)"

FEATURE_SCHEMA = FeatureSchema(
    name=SCHEMA_NAME,
    version=SCHEMA_VERSION,
    request=(
        _f("input_tokens", "tokens", "log", MAX_PROMPT_TOKENS,
           "prompt length L on a log scale (1.0 at 131,072 tokens)"),
        _f("prefill_s", SLO, "squash", 1.0,
           "time to prefill L alone on a prefill node, by the prefill profile (decode profile if P = 0)"),
        _f("arrival_rate", "requests/s", "squash", 10.0,
           "recent arrival rate (exponentially weighted, the view's arrival_rate_per_s)"),
    ),
    prefill=(
        _f("waiting_requests", "requests", "squash", 8.0, "requests queued or prefilling on the node"),
        _f("waiting_tokens", "tokens", "squash", 16384.0, "prompt tokens still to prefill on the node"),
        _f("est_wait", SLO, "squash", 1.0,
           "estimated wait before this request's prefill starts: running step's remainder + waiting tokens at "
           "the profile's sustained prefill rate (2,048-token chunks)"),
        _f("est_ttft", SLO, "squash", 1.0,
           "estimated TTFT on this prefill path: wait + prefill(L) + KV hand-off(L) + queued egress bytes / NIC "
           "bandwidth + first decode step (docs/design.md, proactive deflector)"),
        _f("kv_free", "share of KV capacity", "ratio", 1.0, "free KV-cache tokens over capacity"),
        _f("egress_backlog", SLO, "squash", 1.0,
           "KV bytes still to send from this node, as seconds at NIC bandwidth (hand-off congestion)"),
    ),
    decode=(
        _f("batch", "share of max_num_seqs", "ratio", 1.0, "running decode sequences over max_num_seqs"),
        _f("context", "share of KV capacity", "ratio", 1.0, "KV tokens the running decodes read per step"),
        _f("kv_free", "share of KV capacity", "ratio", 1.0, "free KV-cache tokens (reservations subtracted)"),
        _f("deflected_waiting_tokens", "tokens", "squash", 8192.0,
           "prompt tokens of deflected prefills not yet computed on this node"),
        _f("deflected_waiting_requests", "requests", "squash", 2.0,
           "deflected prefills in progress on this node (a new one would share steps with them)"),
        _f("inbound_handoffs", "requests", "squash", 8.0, "prefill-path requests whose KV is on its way here"),
        _f("waiting_admission", "requests", "squash", 8.0, "requests waiting for KV room on this node"),
        _f("tbt_headroom", "TBT SLOs", "headroom", 1.0,
           "(tbt_slo_s - current step time) / tbt_slo_s: negative when running decodes already miss the TBT SLO",
           low=-1.0),
        _f("chunk", "share of the token budget", "ratio", 1.0,
           "largest deflected-prefill chunk keeping the step within the TBT SLO, over the node's token budget"),
        _f("est_ttft", SLO, "squash", 1.0,
           "estimated TTFT if deflected here: ceil((Q_d + L) / chunk) steps of step(B, C, chunk); 1.0 when the "
           "prompt's KV does not fit now or no chunk keeps the TBT SLO"),
        _f("kv_fits", "flag", "flag", 1.0, "1 when the prompt's KV blocks fit in the free KV now (the action mask)"),
    ),
)


def _v2(spec: FeatureSpec, doc: str) -> FeatureSpec:
    return replace(spec, doc=doc)


#: Schema 2: schema 1 with each node's cached share of the prompt, and TTFT estimates that use the hits and the
#: cluster's hand-off preset.
FEATURE_SCHEMA_V2 = FeatureSchema(
    name=SCHEMA_NAME,
    version=2,
    request=FEATURE_SCHEMA.request,
    prefill=tuple(
        _v2(s, "estimated TTFT on this prefill path: wait + prefill(L - cached here) + hand-off of the tokens the "
               "least-loaded decode node does not hold, by the cluster's preset (dispatch, set-up, rate; queued "
               "egress bytes included) + first decode step") if s.name == "est_ttft" else s
        for s in FEATURE_SCHEMA.prefill) + (
        _f("cached", "share of the prompt", "ratio", 1.0,
           "prompt tokens this node holds in its prefix cache (not prefilled again) over the prompt length"),),
    decode=tuple(
        _v2(s, "estimated TTFT if deflected here: ceil((Q_d + L - cached here) / chunk) steps of step(B, C, chunk); "
               "1.0 when the prompt's KV does not fit now or no chunk keeps the TBT SLO") if s.name == "est_ttft"
        else s for s in FEATURE_SCHEMA.decode) + (
        _f("cached", "share of the prompt", "ratio", 1.0,
           "prompt tokens this node holds in its prefix cache (a deflection skips them, a hand-off does not move "
           "them) over the prompt length"),),
)
#: Schema 3: schema 2 with the proactive deflector's own per-path estimates (:mod:`envs.estimates`, the
#: estimator's state kept across the run's decisions) and, on a deflection, its chunk cap.
FEATURE_SCHEMA_V3 = FeatureSchema(
    name=SCHEMA_NAME,
    version=3,
    request=FEATURE_SCHEMA.request,
    prefill=FEATURE_SCHEMA_V2.prefill + (
        _f("path_ttft", SLO, "squash", 1.0,
           "the proactive deflector's T_P on this node (envs.estimates: FCFS steps of the queue and the prompt, "
           "the queued prompts' attention at E[L^2], the preset's hand-off of what the least-loaded decode node "
           "lacks) plus the first decode step there"),
        _f("path_best", "flag", "flag", 1.0, "1 on the prefill node with the lowest T_P (the first on ties)"),
        _f("path_vs_other", "ratio of estimates", "squash", 1.0,
           "T_P here over the lowest T_D of a decode node (0 when no deflection is feasible): the proactive "
           "deflector prefills on its best node when its best decode path's ratio is at least 1 - margin"),),
    decode=FEATURE_SCHEMA_V2.decode + (
        _f("path_ttft", SLO, "squash", 1.0,
           "the proactive deflector's T_D on this node (envs.estimates, sharing 'bounded': the fluid FCFS fill "
           "of the deflected prompts it tracks there with this one appended); 1.0 when the node has no KV room "
           "for the prompt and 256 output tokens, no sequence slot or no TBT-safe chunk of 1,024 tokens or more "
           "(the whole prompt if shorter)"),
        _f("path_chunk", "share of the token budget", "ratio", 1.0,
           "the chunk cap a deflection here gets (the largest whose worst step, next to the prompts already "
           "deflected there and the decodes bound to join, keeps the TBT SLO), over the node's token budget; "
           "0 when infeasible as above"),
        _f("path_best", "flag", "flag", 1.0,
           "1 on the feasible decode node with the lowest T_D (the first on ties); 0 everywhere when none is"),
        _f("path_vs_other", "ratio of estimates", "squash", 1.0,
           "T_D here over the lowest T_P of a prefill node (1.0 when infeasible; 0 with no prefill node, where "
           "only deflections are possible): the proactive deflector deflects to its best node when this is below "
           "1 - margin"),),
)
#: Schema 4: schema 3 with the recent arrival process in the request block (ClusterView.recent_arrivals), so a
#: policy can tell a burst's onset from a steady load the exponentially weighted rate (10 s) smooths over.
FEATURE_SCHEMA_V4 = FeatureSchema(
    name=SCHEMA_NAME,
    version=4,
    request=FEATURE_SCHEMA.request + (
        _f("recent_requests_1s", "requests", "squash", 4.0,
           "requests that arrived in the last second, this one included"),
        _f("recent_tokens_1s", "tokens", "squash", 16384.0,
           "prompt tokens that arrived in the last second, this one's included"),
        _f("recent_tokens_10s", "tokens/s", "squash", 16384.0,
           "prompt tokens that arrived in the last 10 seconds, per second (this one's included)"),
    ),
    prefill=FEATURE_SCHEMA_V3.prefill,
    decode=FEATURE_SCHEMA_V3.decode,
)
#: Every schema this code builds, by version.
SCHEMAS: dict[int, FeatureSchema] = {1: FEATURE_SCHEMA, 2: FEATURE_SCHEMA_V2, 3: FEATURE_SCHEMA_V3,
                                     4: FEATURE_SCHEMA_V4}
LATEST_SCHEMA_VERSION = 4


def schema(version: int) -> FeatureSchema:
    """The feature schema of ``version``; an unknown one is a ``ValueError`` naming the known ones."""
    s = SCHEMAS.get(version)
    if s is None:
        raise ValueError(f"unknown feature schema version {version!r}; known: {sorted(SCHEMAS)}")
    return s


def action_layout(num_prefill: int, num_decode: int) -> list[dict[str, Any]]:
    """``[{"index": a, "kind": "prefill"|"deflect", "node": i}, ...]`` for ``Discrete(P + D)``."""
    return ([{"index": i, "kind": "prefill", "node": i} for i in range(num_prefill)]
            + [{"index": num_prefill + j, "kind": "deflect", "node": j} for j in range(num_decode)])


# ------------------------------------------------------------------------------------------------ chunk rule

class ChunkSolver:
    """Largest deflected-prefill chunk that keeps a decode node's step within the TBT SLO, by the profile.

    A decode node running ``B`` sequences that read ``C`` context tokens, prefilling an ``L``-token prompt in
    chunks of ``c`` tokens, runs its slowest step at the prompt's last full chunk, which attends to the ``L - c``
    tokens before it: ``step(B + c tokens, B seqs, C ctx, c**2, c * (L - c))`` (:meth:`LatencyModel.step_s`;
    a prompt that fits in one chunk has no prior context). That time grows with ``c`` for ``c <= L``, so a
    binary search finds the largest ``c <= min(L, budget)``, ``budget = max_batched_tokens - B``, keeping it
    within ``tbt_slo_s``. ``C`` is rounded up to a multiple of :data:`CTX_ROUND_TOKENS` and ``L`` to a multiple of
    :data:`PROMPT_ROUND_TOKENS` (both conservative) so answers can be cached by ``(B, C, L)``.

    The rule bounds the step time of one deflected prefill next to the running decodes. The decode node fills
    its token budget FCFS with chunks of every deflected prefill it holds, each under its own cap, so two
    deflections in flight on one node can share a step and exceed the SLO together; the observation exposes
    ``deflected_waiting_requests`` so a policy can avoid that.

    :param profile: the decode node's latency profile.
    :param tbt_slo_s: time-between-tokens SLO, seconds.
    :param max_batched_tokens: the node's token budget per step, tokens.
    """

    __slots__ = ("profile", "tbt_slo_s", "max_batched_tokens", "_cache")

    def __init__(self, profile: LatencyModel, tbt_slo_s: float, max_batched_tokens: int) -> None:
        self.profile = profile
        self.tbt_slo_s = tbt_slo_s
        self.max_batched_tokens = max_batched_tokens
        self._cache: dict[tuple[int, int, int], tuple[int, float]] = {}

    def step_s(self, batch: int, context_tokens: float, chunk: int, prompt_tokens: int) -> float:
        """The slowest step of an ``prompt_tokens`` prompt chunked by ``chunk`` next to the batch, seconds."""
        return worst_chunk_step_s(self.profile, batch, context_tokens, chunk, prompt_tokens)

    def solve(self, batch: int, context_tokens: int, prompt_tokens: int) -> tuple[int, float]:
        """``(chunk_tokens, step_s)``: the largest chunk (0 if none keeps the SLO) and its slowest step, seconds."""
        key = (batch, (context_tokens + CTX_ROUND_TOKENS - 1) // CTX_ROUND_TOKENS,
               (prompt_tokens + PROMPT_ROUND_TOKENS - 1) // PROMPT_ROUND_TOKENS)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if len(self._cache) >= 1 << 17:
            self._cache.clear()
        B = batch
        ctx = float(key[1] * CTX_ROUND_TOKENS)
        L = key[2] * PROMPT_ROUND_TOKENS
        top = min(self.max_batched_tokens - B, L)
        if top <= 0:
            out = (0, self.profile.decode_step_s(B, ctx))
        else:
            c = largest_safe_chunk(self.profile, B, ctx, L, 1, top, self.tbt_slo_s)
            out = (c, worst_chunk_step_s(self.profile, B, ctx, c if c else 1, L))
        self._cache[key] = out
        return out


# ------------------------------------------------------------------------------------------------ the builder

class _ProfileConsts:
    """Per-profile numbers the builder needs often (looked up once)."""

    __slots__ = ("profile", "prefill_rate", "kv_capacity", "block", "bw", "_per_prompt")

    def __init__(self, profile: LatencyModel) -> None:
        self.profile = profile
        self.prefill_rate = profile.prefill_tokens_per_s(PREFILL_RATE_CHUNK_TOKENS)
        self.kv_capacity = float(profile.kv_capacity_tokens)
        self.block = profile.kv_block_tokens
        self.bw = profile.nic_bandwidth_Bps
        self._per_prompt: dict[tuple[int, int], tuple[float, float, float]] = {}

    def per_prompt(self, L: int, budget: int) -> tuple[float, float, float]:
        """``(prefill_s, handoff_s, idle first decode step_s)`` of an ``L``-token prompt, cached by length."""
        hit = self._per_prompt.get((L, budget))
        if hit is None:
            prof = self.profile
            pre = prof.prefill_s(L) if L <= budget else _chunked_prefill_s(prof, L, budget)
            hit = (pre, prof.transfer_s(L), prof.decode_step_s(1, L))
            if len(self._per_prompt) > 65536:
                self._per_prompt.clear()
            self._per_prompt[(L, budget)] = hit
        return hit


class FeatureBuilder:
    """Builds observations, action masks and decisions for one request at a time.

    :meth:`build` computes the observation and, in the same pass, the action mask and each decode node's chunk
    cap; :meth:`decision` then maps an action to a :class:`~envs.view.Decision` with those caps. The
    environment and the runtime both use it, so an action means the same thing in both.
    """

    def __init__(self, version: int = SCHEMA_VERSION) -> None:
        self.schema = schema(version)
        self.version = version
        self._consts: dict[int, _ProfileConsts] = {}
        self._solvers: dict[tuple[int, float, int], ChunkSolver] = {}
        self.num_prefill = 0
        self.num_decode = 0
        self.chunk_caps: list[int] = []
        self._mask_list: list[bool] = []
        self._mask: np.ndarray | None = None
        #: schema 3: the proactive deflector's estimator (its state spans a run) and the last build's numbers
        self._est = PathEstimator(min_chunk=PATH_MIN_CHUNK_TOKENS, what="feature schema 3") if version >= 3 else None
        self._path_caps: list[int] = []
        self._last_L = 0
        self._last_todo: list[int] = []
        self._last_lane: tuple[int, Any] | None = None  # the deflection decision() last recorded (see taken)

    def reset(self) -> None:
        """Start a new run: schema 3 forgets the prompts seen and the deflections placed (no effect on 1 and 2)."""
        if self._est is not None:
            self._est.reset_estimates()

    def _paths(self, view: ClusterView, L: int, dstar: Any) -> tuple[list[tuple[float, ...]], list[tuple[float, ...]]]:
        """Schema 3's features of each prefill and decode node (in schema order) from the estimator's ``T_P(p)``
        (the first decode step on ``dstar`` included) and ``(c_d, T_D(d))``; counts the prompt and advances the
        tracked deflections to now."""
        est = self._est
        t_first = est.first_step(dstar, L)
        t_p = [t + t_first for t in est.prefill_estimates(view, L, est.observe(L), dstar.cached_tokens)]
        paths = est.deflect_estimates(view, L)
        self._path_caps = [c for c, _ in paths]
        self._last_L = L
        self._last_todo = [L - d.cached_tokens for d in view.decode]
        inv_slo = 1.0 / view.ttft_slo_s
        best_p = min(range(len(t_p)), key=t_p.__getitem__) if t_p else -1
        min_p = t_p[best_p] if t_p else math.inf
        ok = [j for j, (c, t) in enumerate(paths) if c > 0 and t < math.inf]
        best_d = min(ok, key=lambda j: paths[j][1]) if ok else -1
        min_d = paths[best_d][1] if ok else math.inf
        pre = []
        for i, t in enumerate(t_p):
            x, r = t * inv_slo, t / min_d if ok else 0.0
            pre.append((x / (x + _S_PATH), 1.0 if i == best_p else 0.0, r / (r + 1.0)))
        dec = []
        for j, (c, t) in enumerate(paths):
            d = view.decode[j]
            if c > 0 and t < math.inf:
                x, r = t * inv_slo, t / min_p
                dec.append((x / (x + _S_PATH), c / d.max_batched_tokens, 1.0 if j == best_d else 0.0,
                            r / (r + 1.0)))
            else:
                dec.append((1.0, 0.0, 0.0, 1.0))
        return pre, dec

    def _pc(self, profile: LatencyModel) -> _ProfileConsts:
        c = self._consts.get(id(profile))
        if c is None or c.profile is not profile:
            c = self._consts[id(profile)] = _ProfileConsts(profile)
        return c

    def _solver(self, profile: LatencyModel, tbt_slo_s: float, budget: int) -> ChunkSolver:
        key = (id(profile), tbt_slo_s, budget)
        s = self._solvers.get(key)
        if s is None or s.profile is not profile:
            s = self._solvers[key] = ChunkSolver(profile, tbt_slo_s, budget)
        return s

    def build(self, view: ClusterView, request: Any) -> np.ndarray:
        """The observation for ``request`` arriving at ``view`` (``float32``, the layout of this builder's schema
        version)."""
        L = int(request.input_tokens)
        now = view.now_s
        slo = view.ttft_slo_s
        inv_slo = 1.0 / slo
        tbt = view.tbt_slo_s
        pv = view.prefill
        dv = view.decode
        P = len(pv)
        D = len(dv)
        self.num_prefill, self.num_decode = P, D
        rate = view.arrival_rate_per_s

        v2 = self.version >= 2
        dstar = least_loaded_decode(view) if v2 else None
        d_hit = dstar.cached_tokens if v2 else 0  # the hand-off's destination holds these
        path_p, path_d = self._paths(view, L, dstar) if self._est is not None else ((), ())
        first_prof = pv[0].profile if P else dv[0].profile
        fpc = self._pc(first_prof)
        prefill_L, handoff_L, idle_step_L = fpc.per_prompt(L, pv[0].max_batched_tokens if P else L)
        x = prefill_L * inv_slo
        obs = [min(math.log1p(L) / _LOG_MAX_PROMPT, 1.0), x / (x + _S_PREFILL), rate / (rate + _S_RATE)]
        if self.version >= 4:
            obs += _recent_features(view)

        # first decode step of a prefill-path request: the fastest decode node's current step (or an idle step)
        first_step = math.inf
        for d in dv:
            s = d.step_s if d.step_s > 0.0 else idle_step_L
            if s < first_step:
                first_step = s
        for i, p in enumerate(pv):
            pc = fpc if p.profile is first_prof else self._pc(p.profile)
            rem = p.busy_until_s - now
            wait = (rem if rem > 0.0 else 0.0) + p.waiting_tokens / pc.prefill_rate
            egress = p.egress_bytes / pc.bw
            wr = p.waiting_requests
            wt = p.waiting_tokens
            x = wait * inv_slo
            if v2:
                pre = pc.per_prompt(L - p.cached_tokens, p.max_batched_tokens)[0] if p.cached_tokens else prefill_L
                y = (wait + pre + handoff_estimate_s(view.handoff, p.profile, L - d_hit, p.egress_bytes)
                     + first_step) * inv_slo
            else:
                y = (wait + prefill_L + handoff_L + egress + first_step) * inv_slo
            e = egress * inv_slo
            kv = p.kv_free_tokens / pc.kv_capacity
            obs += (wr / (wr + _S_PWR), wt / (wt + _S_PWT), x / (x + _S_PWAIT), y / (y + _S_PTTFT),
                    kv if kv < 1.0 else 1.0, e / (e + _S_EGRESS))
            if v2:
                obs.append(p.cached_tokens / L)
            if path_p:
                obs += path_p[i]

        caps = self.chunk_caps = [0] * D
        mask = [True] * (P + D)
        any_ok = P > 0
        d_prof = d_budget = solve = None  # the last decode node's profile and budget (nodes nearly always share them)
        for j, d in enumerate(dv):
            if d.profile is not d_prof or d.max_batched_tokens != d_budget:
                d_prof, d_budget = d.profile, d.max_batched_tokens
                pc = self._pc(d_prof)
                solve = self._solver(d_prof, tbt, d_budget).solve
                need = -(-L // pc.block) * pc.block
            fits = d.kv_free_tokens >= need
            mask[P + j] = fits
            any_ok = any_ok or fits
            B = d.batch_size
            chunk, step_c = solve(B, d.context_tokens, L)
            caps[j] = chunk if chunk >= MIN_CHUNK_TOKENS else MIN_CHUNK_TOKENS
            if fits and chunk >= MIN_CHUNK_TOKENS:
                todo = L - d.cached_tokens if v2 else L
                t_d = -(-(d.deflected_waiting_tokens + todo) // chunk) * step_c * inv_slo
                est = t_d / (t_d + _S_DTTFT)
            else:
                est = 1.0
            h = (tbt - d.step_s) / tbt
            kv = d.kv_free_tokens / pc.kv_capacity
            dwt = d.deflected_waiting_tokens
            dwr = d.deflected_waiting_requests
            ih = d.inbound_handoffs
            wa = d.waiting_admission
            obs += (B / d.max_num_seqs, min(d.context_tokens / pc.kv_capacity, 1.0),
                    (kv if kv < 1.0 else 1.0) if kv > 0.0 else 0.0, dwt / (dwt + _S_DWT), dwr / (dwr + _S_DWR),
                    ih / (ih + _S_IH), wa / (wa + _S_WA), (h if h > -1.0 else -1.0), chunk / d.max_batched_tokens, est,
                    1.0 if fits else 0.0)
            if v2:
                obs.append(d.cached_tokens / L)
            if path_d:
                obs += path_d[j]
        self._mask_list = _final_mask(view, mask, any_ok, P)
        self._mask = None
        return np.array(obs, dtype=np.float32)

    @property
    def mask(self) -> np.ndarray:
        """The action mask of the last :meth:`build` (``bool``, length ``P + D``): decode nodes without KV room
        for the prompt and nodes out of rotation (``view.dead_prefill``, ``view.dead_decode``) are invalid; never
        all False."""
        if self._mask is None:
            self._mask = np.array(self._mask_list, dtype=bool)
        return self._mask

    def decision(self, action: int) -> Decision:
        """Map an action of ``Discrete(P + D)`` to a decision, with the chunk caps of the last :meth:`build`."""
        P = self.num_prefill
        self._last_lane = None
        if 0 <= action < P:
            return Decision.prefill(action)
        j = action - P
        if not 0 <= j < self.num_decode:
            raise ValueError(f"action {action} out of range 0..{P + self.num_decode - 1}")
        if self._est is None:
            return Decision.deflect(j, self.chunk_caps[j])
        cap = self._path_caps[j] or self.chunk_caps[j]  # the estimator's cap; the chunk rule's where it has none
        self._last_lane = (j, self._est.add_lane(j, cap, self._last_L, self._last_todo[j]))  # tracked from now on
        return Decision.deflect(j, cap)

    def taken(self, decision: Decision) -> None:
        """The decision actually taken for the request of the last :meth:`build`, where another policy acted (a
        learner in DAgger): schema 3 on, the estimator tracks that deflection instead of the one :meth:`decision`
        recorded (a second call replaces the first's); no effect on schemas 1 and 2."""
        if self._est is not None:
            self._last_lane = self._est.retrack(self._last_lane, decision, self._last_L, self._last_todo.__getitem__)


_LOG_MAX_PROMPT = math.log1p(MAX_PROMPT_TOKENS)


def _scales(block: tuple[FeatureSpec, ...]) -> dict[str, float]:
    return {spec.name: spec.scale for spec in block}


# the squash scales, read from the schema (written once, there)
_RQ = _scales(FEATURE_SCHEMA.request)
_PF = _scales(FEATURE_SCHEMA.prefill)
_DC = _scales(FEATURE_SCHEMA.decode)
_S_RATE, _S_PREFILL = _RQ["arrival_rate"], _RQ["prefill_s"]
_S_PWR, _S_PWT, _S_PWAIT, _S_PTTFT, _S_EGRESS = (_PF[k] for k in (
    "waiting_requests", "waiting_tokens", "est_wait", "est_ttft", "egress_backlog"))
_S_DWT, _S_DWR, _S_IH, _S_WA, _S_DTTFT = (_DC[k] for k in (
    "deflected_waiting_tokens", "deflected_waiting_requests", "inbound_handoffs", "waiting_admission", "est_ttft"))
_S_PATH = _scales(FEATURE_SCHEMA_V3.prefill)["path_ttft"]
_S_R1, _S_K1, _S_K10 = (_scales(FEATURE_SCHEMA_V4.request)[k] for k in (
    "recent_requests_1s", "recent_tokens_1s", "recent_tokens_10s"))


def _final_mask(view: ClusterView, mask: list[bool], any_ok: bool, P: int) -> list[bool]:
    """The action mask with the nodes out of rotation (the router's view) masked too, and never all False: with
    no prefill nodes and no KV room anywhere, every action is allowed."""
    for k in view.dead_prefill:
        mask[k] = False
    for k in view.dead_decode:
        mask[P + k] = False
    if view.dead_prefill or view.dead_decode:
        any_ok = any(mask)
    return mask if any_ok else [True] * len(mask)


def _recent_features(view: ClusterView) -> tuple[float, float, float]:
    """Schema 4's recent arrival process: requests and prompt tokens of the last second, prompt tokens per second
    over the last 10 s, squashed."""
    n1, k1 = view.recent_arrivals(1.0)
    k10 = view.recent_arrivals(10.0)[1] / 10.0
    return n1 / (n1 + _S_R1), k1 / (k1 + _S_K1), k10 / (k10 + _S_K10)


def _chunked_prefill_s(profile: LatencyModel, L: int, budget: int) -> float:
    """Prefill time of a prompt longer than one step's budget: chunks of ``budget`` tokens, each attending to the
    chunks before it."""
    t = 0.0
    done = 0
    while done < L:
        c = min(budget, L - done)
        t += profile.step_s(c, 0, 0.0, float(c * c), float(c * done))
        done += c
    return t


_BUILDERS: dict[int, FeatureBuilder] = {}


def build_observation(view: ClusterView, request: Any, version: int = SCHEMA_VERSION) -> np.ndarray:
    """The observation of ``request`` arriving at ``view``: ``float32`` of length
    ``schema(version).size(P, D)``, each feature within its schema bounds."""
    b = _BUILDERS.get(version)
    if b is None:
        b = _BUILDERS[version] = FeatureBuilder(version)
    return b.build(view, request)
