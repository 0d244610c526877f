"""The Gymnasium environment: one ``step()`` per routing decision of an xPyD cluster replaying a trace window."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding

from deflectlab.envs.actions import ACTION_SPACES, TwoWay, est_ttft_columns
from deflectlab.envs.config import ClusterConfig, ConfigError, check_number, check_range, cli_field, from_mapping
from deflectlab.envs.features import SCHEMAS, FeatureBuilder, action_layout, schema
from deflectlab.envs.profile import load_profile
from deflectlab.envs.rewards import StepStats, make_reward
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.splits import describe, pick, resolve, start_ranges
from deflectlab.envs.view import Policy
from deflectlab.envs.workloads import ARRIVALS, Workload, load_trace, make_workload

#: A window is redrawn (deterministically, from the same generator) while it holds fewer requests than this.
_MAX_REDRAWS = 64


@dataclass
class EnvConfig:
    """The arguments of :class:`DeflectionEnv`, defined once: the environment, the trainer's ``env`` config
    section (``agents.config``) and its overrides all use this class. Validated on construction."""

    cluster: Any = cli_field(None, factory=dict, flag=None,
                             help="a ClusterConfig, a mapping of its fields (shape: 2p2d allowed), or a shape")
    trace: str = cli_field("azure_code", "bundled trace name (azure_code, azure_conv) or a trace file path")
    load: float | list[float] = cli_field(
        None, factory=lambda: [2.0, 4.0], unit="x the recorded rate",
        help="arrival-rate multiplier over the window's recorded rate: a number or a [low, high] range sampled "
             "uniformly per episode")
    window_s: float = cli_field(300.0, "window length; the episode lasts window_s / load simulated seconds",
                                unit="trace seconds")
    window_start_s: list[Any] = cli_field(
        None, factory=lambda: [0.0, None], unit="trace seconds",
        help="[low, high] range of window starts, or a list of such ranges (a start is drawn uniformly over "
             "their union; envs.splits); high None: the trace end minus window_s. Disjoint ranges hold "
             "evaluation windows out of training")
    arrival: str | list[str] = cli_field(
        "trace", "trace replays recorded arrival times; poisson, gamma and onoff draw synthetic arrivals at the "
        "scaled rate with lengths sampled from the window; a list of these: one drawn uniformly per episode",
        choices=ARRIVALS)
    cv: float | list[float] = cli_field(
        1.0, "coefficient of variation of the gaps for arrival=gamma: a number or a [low, high] range sampled "
        "uniformly per episode")
    max_requests: int | None = cli_field(None, "cap on requests per episode (the window's first ones)",
                                         unit="requests")
    min_requests: int = cli_field(20, "windows with fewer requests are redrawn", unit="requests")
    reward: Any = cli_field("composite", "reward preset name, mapping or list (envs.rewards)", flag=None)
    feature_schema: int = cli_field(
        1, "observation's feature schema version (envs.features.SCHEMAS): 1, no prefix cache (the shipped "
        "policy's); 2 adds each node's cached share of the prompt and cache-aware TTFT estimates; 3 adds the "
        "proactive deflector's own per-path estimates and chunk caps (envs.estimates)",
        choices=tuple(SCHEMAS))
    actions: str = cli_field("nodes", "action space: nodes (prefill node i or decode node j, Discrete(P + D)) or "
                             "two_way (prefill or deflect, node by lowest estimated TTFT, Discrete(2); envs.actions)",
                             choices=ACTION_SPACES)

    def __post_init__(self) -> None:
        check_range(self.load, "load", positive=True, unit="x the recorded rate")
        check_number(self.window_s, "window_s", lo=0.0, lo_open=True, unit="trace seconds")
        if self.window_start_s is not None:
            try:
                start_ranges(self.window_start_s)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        kinds = [self.arrival] if isinstance(self.arrival, str) else self.arrival
        if not isinstance(kinds, (list, tuple)) or not kinds:
            raise ConfigError(f"arrival must be a name or a non-empty list of names, got {self.arrival!r}")
        for kind in kinds:
            if kind not in ARRIVALS:
                raise ConfigError(f"unknown arrival {kind!r}; known: {', '.join(ARRIVALS)}")
        check_range(self.cv, "cv", positive=True)
        if self.max_requests is not None:
            check_number(self.max_requests, "max_requests", lo=1, integer=True, unit="requests")
        check_number(self.min_requests, "min_requests", lo=1, integer=True, unit="requests")
        if isinstance(self.feature_schema, bool) or self.feature_schema not in SCHEMAS:
            raise ConfigError(f"unknown feature_schema {self.feature_schema!r}; known versions: "
                              f"{', '.join(map(str, SCHEMAS))}")
        if self.actions not in ACTION_SPACES:
            raise ConfigError(f"unknown actions {self.actions!r}; known: {', '.join(ACTION_SPACES)}")

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


class DeflectionEnv(gym.Env):
    """Route each arriving request of a disaggregated LLM cluster: prefill it on a prefill node, or deflect it to
    a decode node.

    Make it with ``import deflectlab.envs; gymnasium.make("deflectlab/Deflection-v0", **kwargs)`` (the import
    registers it), or ``gymnasium.make("deflectlab.envs:deflectlab/Deflection-v0", **kwargs)``, which imports it
    itself; or construct ``DeflectionEnv(**kwargs)`` directly.

    ## Description

    A discrete-event model of a cluster of ``P`` prefill and ``D`` decode nodes (``envs.simulator.ClusterSim``,
    default 2P2D A100-80GB serving DeepSeek-V2-Lite) replays a window of a request trace. Every arriving request
    needs a routing decision; ``step(action)`` applies it and runs the simulation to the next arrival, whose
    decision is the next step. Under bursty load the prefill queue and the KV hand-off dominate tail TTFT;
    deflecting a prefill to a decode node (chunked into its decode batches, no KV transfer) avoids both, at the
    cost of slower steps for the decodes already running there (the deflection paper, arXiv 2607.02043).

    ## Action Space

    ``Discrete(P + D)``. Action ``i < P``: prefill on prefill node ``i``, decode node chosen by the cluster's
    decode balancer at hand-off time. Action ``P + j``: deflect to decode node ``j`` with the chunk cap of
    ``envs.features.ChunkSolver``: the largest chunk whose slowest step (the prompt's last chunk, next to
    ``j``'s running batch) keeps the TBT SLO by the profile, capped by ``j``'s free token budget, at least 32
    tokens. :meth:`action_masks` marks decode nodes without free KV room for the prompt invalid (the output
    length is unknown, as in a router); prefill actions are always valid, and the mask is never all False.
    Invalid actions are still carried out (the request waits for KV room) so agents without masking work.
    With ``actions="two_way"``: ``Discrete(2)``, 0 = prefill on the prefill node with the lowest estimated TTFT,
    1 = deflect to the valid decode node with the lowest estimated TTFT (valid when some decode node is);
    ``envs.actions``.

    ## Observation Space

    ``Box(low, high, (3 + 6P + 11D,), float32)`` with ``feature_schema=1`` (the default), the versioned
    ``envs.features.FEATURE_SCHEMA`` (``deflectlab.features`` v1); ``Box(low, high, (3 + 7P + 12D,), float32)``
    with ``feature_schema=2`` (``envs.features.FEATURE_SCHEMA_V2``). Either is built by
    ``envs.features.FeatureBuilder(feature_schema)`` from the cluster view and the prompt length only -- the
    router builds the same vector; ``feature_names`` lists them in order. Squashed features are
    ``x / (x + scale)``. Schema 1:

    | block | feature | raw unit | transform, scale | bounds |
    |---|---|---|---|---|
    | request | ``input_tokens`` | tokens | log1p(L) / log1p(131072) | [0, 1] |
    | request | ``prefill_s`` | TTFT SLOs | squash, 1 | [0, 1] |
    | request | ``arrival_rate`` | requests/s | squash, 10 | [0, 1] |
    | prefill i | ``waiting_requests`` | requests | squash, 8 | [0, 1] |
    | prefill i | ``waiting_tokens`` | tokens | squash, 16384 | [0, 1] |
    | prefill i | ``est_wait`` | TTFT SLOs | squash, 1 | [0, 1] |
    | prefill i | ``est_ttft`` (T_P) | TTFT SLOs | squash, 1 | [0, 1] |
    | prefill i | ``kv_free`` | share of capacity | ratio | [0, 1] |
    | prefill i | ``egress_backlog`` | TTFT SLOs | squash, 1 | [0, 1] |
    | decode j | ``batch`` | share of max_num_seqs | ratio | [0, 1] |
    | decode j | ``context`` | share of KV capacity | ratio | [0, 1] |
    | decode j | ``kv_free`` | share of KV capacity | ratio | [0, 1] |
    | decode j | ``deflected_waiting_tokens`` | tokens | squash, 8192 | [0, 1] |
    | decode j | ``deflected_waiting_requests`` | requests | squash, 2 | [0, 1] |
    | decode j | ``inbound_handoffs`` | requests | squash, 8 | [0, 1] |
    | decode j | ``waiting_admission`` | requests | squash, 8 | [0, 1] |
    | decode j | ``tbt_headroom`` | TBT SLOs | (slo - step) / slo | [-1, 1] |
    | decode j | ``chunk`` | share of token budget | ratio | [0, 1] |
    | decode j | ``est_ttft`` (T_D) | TTFT SLOs | squash, 1 (1 = infeasible) | [0, 1] |
    | decode j | ``kv_fits`` | flag | 0/1 | [0, 1] |

    Schema 2 appends ``cached`` to each prefill and each decode block: the prompt tokens the node holds in its
    prefix cache over ``L`` (ratio, [0, 1]; 0 on traces without block hashes or with ``prefix_cache`` off), and
    its ``est_ttft`` features count only the uncached tokens and time the hand-off by the cluster's preset
    (``envs.handoff.handoff_estimate_s``, dispatch delay included; ``docs/prefix_cache.md``).

    ## Rewards

    A pluggable object from ``envs.rewards`` (``reward=`` takes a preset name, a mapping, a list or an object).
    The default ``"composite"`` adds, per step: minus the time integral of requests waiting for their first
    token over the step (request-seconds / TTFT SLO, Park-style and additive: an episode sums to exactly
    ``-sum(TTFT) / ttft_slo_s``); minus one per first-token event over the TTFT SLO (and per rejected request);
    minus 0.02 per estimated token gap over the TBT SLO.

    ## Starting State

    ``reset(seed)`` draws an episode from the seed alone: a window start uniform in ``window_start_s`` (trace
    seconds) and a load multiplier uniform in ``load``; the window's ``window_s`` seconds of trace are replayed
    ``load`` times faster (recorded burstiness kept). Windows with fewer than ``min_requests`` requests are
    redrawn from the same generator. The cluster starts empty; the first observation is the first request's.
    :meth:`episode_workload` returns the same workload for a seed without stepping, so heuristics can be run on
    exactly the episodes an agent sees.

    ## Episode End

    The episode terminates after the window's last request is routed: that final ``step()`` drains the
    simulation (every routed request finishes), its reward covers the drain, and ``info["metrics"]`` holds the
    run summary of ``envs.metrics.collect`` (SLO attainment, TTFT/TBT percentiles, deflection rate, ...). There
    is no truncation.

    ## Arguments

    The fields of :class:`EnvConfig` as keyword arguments (``DeflectionEnv(load=3.0, window_s=120)``, which is
    what ``gymnasium.make`` passes on), or ``config=EnvConfig(...)``; their meanings and units are there. An
    unknown argument is an error that names it.

    ## Calibration

    Step times, KV sizes and NIC bandwidth come from the cluster's latency profiles (``envs/profiles``, each
    number with its source). Default load range 2-4x the recorded rate of ``azure_code``: there 2P2D round robin
    has a P95 TTFT of 10-19 s against a 1 s SLO and SLO attainment 0.48-0.12, because bursts saturate the
    prefill pool (mean prefill utilisation over the trace 0.3-0.6, saturated during bursts) while decode nodes have
    room (``python scripts/bench_env.py --calibrate`` re-measures it; ``experiments/trained/README.md``).

    ## Reward variants

    ``"latency"`` (mean TTFT), ``"slo"`` (TTFT SLO misses), ``"tbt"`` (TBT gaps), ``"composite"`` (default),
    ``"attainment"``, ``"per_request"`` (each decision charged with its own request's estimated SLO miss at once,
    corrected to the actual outcome at the request's deadline), or
    any weighted list, e.g. ``[{"name": "latency", "scale": 0.5}, {"name": "slo", "miss": 2, "slope": 0.1}]``.

    ## Version History

    * v0: initial version (feature schema ``deflectlab.features`` v1); ``feature_schema=2`` selects v2 (the
      default stays 1).
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, render_mode: str | None = None, **kwargs: Any) -> None:
        if render_mode is not None:
            raise ValueError(f"DeflectionEnv has no render modes, got render_mode={render_mode!r}")
        if config is not None and kwargs:
            raise ValueError("give DeflectionEnv an EnvConfig or its fields as keyword arguments, not both")
        cfg = self.env_config = config if config is not None else from_mapping(EnvConfig, kwargs, "DeflectionEnv")
        self.config = ClusterConfig.coerce(cfg.cluster or None)
        self.prefill_profile = load_profile(self.config.prefill_profile)
        self.decode_profile = load_profile(self.config.decode_profile)
        self.trace_name = cfg.trace
        self._trace = load_trace(cfg.trace)
        self.load_range = check_range(cfg.load, "load", positive=True, unit="x the recorded rate")
        self.window_s = float(cfg.window_s)
        self.window_start_ranges = resolve(start_ranges(cfg.window_start_s if cfg.window_start_s is not None
                                                        else [0.0, None]),
                                           float(self._trace.arrival_s[-1]) - self.window_s)
        #: the arrival processes an episode draws from (one, uniformly) and the gamma CV range
        self.arrivals = (cfg.arrival,) if isinstance(cfg.arrival, str) else tuple(cfg.arrival)
        self.cv_range = check_range(cfg.cv, "cv", positive=True)
        self.max_requests = cfg.max_requests
        self.min_requests = cfg.min_requests
        self.reward_fn = make_reward(cfg.reward)
        self._track_deadlines = self.reward_fn.needs_deadlines
        self._track_estimates = self.reward_fn.needs_estimates
        self._expert: Policy | None = None

        P, D = self.config.num_prefill, self.config.num_decode
        self.num_prefill, self.num_decode = P, D
        #: the observation's layout (``envs.features.SCHEMAS[config.feature_schema]``)
        self.feature_schema = schema(int(cfg.feature_schema))
        low, high = self.feature_schema.bounds(P, D)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.two_way = TwoWay(P, D, self.feature_schema.version) if cfg.actions == "two_way" else None
        self.action_space = spaces.Discrete(2 if self.two_way else P + D)
        self.action_layout = action_layout(P, D) if self.two_way is None else [
            {"action": 0, "kind": "prefill", "node": "lowest est_ttft"},
            {"action": 1, "kind": "deflect", "node": "lowest est_ttft among valid"}]
        self._est_cols = [c for cols in est_ttft_columns(P, D, self.feature_schema.version) for c in cols]
        self.feature_names = self.feature_schema.names(P, D)

        self._fb = FeatureBuilder(self.feature_schema.version)
        self.sim: ClusterSim | None = None
        self._req: Any = None
        self._p_queues: list[deque] = []  # routed to prefill node p, prefill not done (FCFS)
        self._d_queues: list[deque] = []  # deflected to decode node d, first chunk not started (FCFS)
        self._in_flight: list[Any] = []  # prefilled, or deflected and prefilling; no first token yet
        self._n_waiting = 0
        self._by_arrival: deque = deque()  # routed requests whose TTFT deadline has not passed, by arrival
        self._est_by_arrival: deque = deque()  # their estimated misses (rewards that need estimates)
        self._tbt_marks: list[int] = []
        self._obs = np.zeros(low.shape, dtype=np.float32)
        self.episode_info: dict[str, Any] = {}

    # -- episodes ------------------------------------------------------------------------------------------
    def episode_workload(self, seed: int | None = None, rng: np.random.Generator | None = None
                         ) -> tuple[Workload, dict[str, Any]]:
        """The workload ``reset(seed=seed)`` replays, and how it was drawn (``start_s``, ``load``, ``requests``).

        A pure function of ``seed`` (or of ``rng``'s state when given instead).
        """
        if rng is None:
            rng, _ = seeding.np_random(seed)
        ranges = self.window_start_ranges
        t = self._trace.arrival_s
        for _ in range(_MAX_REDRAWS):
            # one range: rng.uniform(lo, hi), as before ranges could be several (the same double is drawn)
            start = float(pick(rng.random(), ranges)) if len(ranges) > 1 or ranges[0][1] > ranges[0][0] \
                else ranges[0][0]
            load = float(rng.uniform(*self.load_range)) if self.load_range[1] > self.load_range[0] \
                else self.load_range[0]
            i0 = int(np.searchsorted(t, start, side="left"))
            i1 = int(np.searchsorted(t, start + self.window_s, side="left"))
            n = i1 - i0 if self.max_requests is None else min(i1 - i0, self.max_requests)
            if n >= self.min_requests and (n < 2 or t[i0 + n - 1] > t[i0]):
                break
        else:
            raise ValueError(
                f"no window of {self.window_s:g} trace seconds starting in {describe(ranges)} of {self.trace_name} "
                f"holds {self.min_requests} requests in {_MAX_REDRAWS} draws; lower min_requests or widen the window")
        span = float(t[i0 + n - 1] - t[i0]) if n >= 2 else 0.0
        # the window's recorded rate (the whole trace's if the window has no span), times the load
        window_rate = (n - 1) / span if span > 0 else (len(t) - 1) / max(float(t[-1]), 1e-9)
        # a mix of processes or a CV range draws here, after the window (one process and one CV draw nothing, so
        # their episodes are those of before mixes existed)
        arrival = self.arrivals[int(rng.integers(len(self.arrivals)))] if len(self.arrivals) > 1 else self.arrivals[0]
        lo, hi = self.cv_range
        cv = float(rng.uniform(lo, hi)) if arrival == "gamma" and hi > lo else lo
        w = make_workload(self._trace, start_s=start, duration_s=self.window_s, num_requests=self.max_requests,
                          rate=load * window_rate if span > 0 or arrival != "trace" else None,
                          arrival=arrival, cv=cv, seed=int(rng.integers(0, 2**31 - 1)))
        info = {"start_s": start, "load": load, "requests": len(w), "trace": self.trace_name}
        if len(self.arrivals) > 1 or hi > lo:
            info.update(arrival=arrival, cv=cv if arrival == "gamma" else None)
        return w, info

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if options and "workload" in options:
            w = options["workload"]
            if not isinstance(w, Workload):
                raise ValueError("options['workload'] must be an envs.workloads.Workload")
            meta: dict[str, Any] = {"requests": len(w), "trace": "given"}
        else:
            w, meta = self.episode_workload(rng=self.np_random)
        self.episode_info = meta
        self._fb.reset()  # a new run (feature schema 3 keeps estimator state across one)
        sim = self.sim = ClusterSim(self.config, w, self.prefill_profile, self.decode_profile)
        self._p_queues = [deque() for _ in sim.prefill]
        self._d_queues = [deque() for _ in sim.decode]
        self._in_flight = []
        self._by_arrival = deque()
        self._est_by_arrival = deque()
        self._n_waiting = 0
        self._tbt_marks = [0] * len(sim.decode)
        self._req = sim.advance()
        self._obs = self._fb.build(sim.view(), self._req)
        return self._obs, dict(meta)

    @property
    def current_request(self) -> Any:
        """The request awaiting this step's decision (None after the episode ended)."""
        return self._req

    def current_view(self) -> Any:
        """The cluster view of this step's decision (what the observation was built from)."""
        if self.sim is None:
            raise RuntimeError("call reset() first")
        return self.sim.view()

    def set_expert(self, policy: Policy) -> None:
        """Keep ``policy`` (built by the caller, e.g. ``policies.registry.make_policy("proactive")``) as this
        environment's expert for :meth:`expert_action`; its per-run state stays with this environment."""
        if not callable(getattr(policy, "decide", None)):
            raise ValueError(f"an expert needs a decide(view, request) method, got {policy!r}")
        self._expert = policy

    def expert_action(self, policy: Policy | None = None) -> int:
        """The action ``policy`` (default: the one given to :meth:`set_expert`) takes for the current request: its
        decision's node, in this environment's action layout (the chunk cap is the environment's)."""
        pol = self._expert if policy is None else policy
        if pol is None:
            raise RuntimeError("no expert: pass a policy, or call set_expert() first")
        if self._req is None:
            raise RuntimeError("no request awaits a decision; call reset()")
        d = pol.decide(self.sim.view(), self._req)  # type: ignore[union-attr]
        node = self.num_prefill + int(d.decode_node) if d.deflected else int(d.prefill_node)  # type: ignore[arg-type]
        return node if self.two_way is None else self.two_way.of_node_action(node)

    def action_masks(self) -> np.ndarray:
        """Valid actions for the current request (MaskablePPO calls this): decode nodes without KV room are
        invalid (``two_way``: deflect is valid when some decode node is); never all False."""
        if self.two_way is not None:
            return self.two_way.mask(self._fb.mask)
        return self._fb.mask

    def node_action(self, action: Any) -> int:
        """The node action (``Discrete(P + D)``) an action of this environment's action space carries out."""
        if self.two_way is None:
            return int(action)
        return self.two_way.node_action(int(action), self._obs, self._fb.mask)

    def estimated_miss(self, node_action: int) -> float:
        """1.0 if the estimated TTFT of the current request on ``node_action``'s path (its ``est_ttft`` feature,
        squashed: over 0.5 is over one SLO; 1 is an infeasible deflection) is over the TTFT SLO, else 0.0."""
        return 1.0 if float(self._obs[self._est_cols[node_action]]) > 0.5 else 0.0

    # -- the decision --------------------------------------------------------------------------------------
    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        sim = self.sim
        if sim is None or self._req is None:
            raise RuntimeError("call reset() before step(), and again after the episode terminated")
        req = self._req
        node_act = self.node_action(action)
        #: the decision the last step took (a labelling teacher is told it: ``Policy.taken``)
        self.last_decision = decision = self._fb.decision(node_act)
        sim.route(req, decision)
        rf = self.reward_fn
        stats = StepStats(ttft_slo_s=sim.config.ttft_slo_s, tbt_slo_s=sim.config.tbt_slo_s)
        if req.reject_reason is not None:
            stats.rejected = 1
        else:
            self._n_waiting += 1
            if self._track_deadlines:
                self._by_arrival.append(req)
            if self._track_estimates:
                stats.decision_est_miss = self.estimated_miss(node_act)
                self._est_by_arrival.append(stats.decision_est_miss)
            if req.deflected:
                self._d_queues[req.d_node].append(req)
            else:
                self._p_queues[req.p_node].append(req)
        t0 = sim.now
        nxt = sim.advance()
        t1 = sim.now
        stats.dt_s = t1 - t0
        self._waiting(stats, t1, rf.needs_first_tokens)
        if rf.needs_deadlines:
            self._deadlines(stats, t1 if nxt is not None else math.inf)
        if rf.needs_tbt:
            self._tbt_gaps(stats)
        reward = float(rf(stats))
        info: dict[str, Any] = {}
        if nxt is None:
            from deflectlab.envs.metrics import collect

            self._req = None
            summary = collect(sim, policy_name="env").summary
            info["metrics"] = summary
            info["episode_info"] = dict(self.episode_info)
            # the terminal observation: the drained cluster, seen by the last request
            self._obs = self._fb.build(sim.view(), req)
            return self._obs, reward, True, False, info
        self._req = nxt
        self._obs = self._fb.build(sim.view(), nxt)
        return self._obs, reward, False, False, info

    def _waiting(self, stats: StepStats, t1: float, want_ttfts: bool) -> None:
        """Integral of requests waiting for their first token over (t0, t1]; first-token events in it.

        Every waiting request arrived at or before t0, so the integral is ``n x dt`` minus, for each one whose
        first token came at ``tf <= t1``, the part ``t1 - tf`` after it. Requests still queued on a prefill node
        (or deflected ones whose first chunk has not run) cannot have a first token; those queues are FCFS, so only
        their heads are checked, and only requests past that stage are scanned.
        """
        integral = self._n_waiting * stats.dt_s
        moved = self._in_flight
        for q in self._p_queues:
            while q and q[0].t_p_end >= 0.0:
                moved.append(q.popleft())
        for q in self._d_queues:
            while q and q[0].t_d_start >= 0.0:
                moved.append(q.popleft())
        keep = []
        done = 0
        ttfts = stats.ttfts_s
        for r in moved:
            tf = r.t_first_token
            if 0.0 <= tf <= t1:
                integral -= t1 - tf
                done += 1
                if want_ttfts:
                    ttfts.append(tf - r.arrival_s)
            else:
                keep.append(r)
        self._in_flight = keep
        self._n_waiting -= done
        stats.waiting_integral = integral

    def _deadlines(self, stats: StepStats, t1: float) -> None:
        """Requests whose deadline (arrival + TTFT SLO) passed by ``t1`` without a first token by then."""
        q = self._by_arrival
        slo = stats.ttft_slo_s
        misses = 0
        est = 0.0
        eq = self._est_by_arrival if self._track_estimates else None
        while q and q[0].arrival_s + slo <= t1:
            r = q.popleft()
            if eq is not None:
                est += eq.popleft()
            tf = r.t_first_token
            if not 0.0 <= tf <= r.arrival_s + slo:
                misses += 1
        stats.deadline_misses = misses
        stats.deadline_est_misses = est

    def _tbt_gaps(self, stats: StepStats) -> None:
        """Token gaps over the TBT SLO in the decode segments logged since the last step (running batch as the
        number of gaps per slow step)."""
        tau = stats.tbt_slo_s
        gaps = 0.0
        marks = self._tbt_marks
        for i, node in enumerate(self.sim.decode):  # type: ignore[union-attr]
            n = len(node.log_k)
            m = marks[i]
            if n == m:
                continue
            slow = 0
            la, lb, lk = node.log_a, node.log_b, node.log_k
            for s in range(m, n):
                a, b, k = la[s], lb[s], lk[s]
                if a + b * (k - 1) <= tau:
                    continue
                if b <= 0.0 or a > tau:
                    slow += k
                else:  # steps j with a + b j > tau: j > (tau - a) / b
                    slow += k - (int((tau - a) / b) + 1)
            marks[i] = n
            if slow:
                gaps += slow * max(node.batch_size, 1)
        stats.tbt_violation_gaps = gaps
