"""``lookahead``: a planner that plays each action forward on a copy of the simulation (clairvoyant by default).

**Clairvoyant, not deployable.** At each decision it copies the running simulation
(:meth:`~deflectlab.envs.simulator.ClusterSim.copy_state`), routes the request with one candidate action, and
plays the copy forward for ``horizon_s`` seconds of the window's *known future arrivals* (routed by a base
policy), then drains the copy with no further arrivals. It picks the action whose copy scores best. It reads
the workload's future (arrival times, prompt lengths, and through the model the output lengths), which no
router knows: it is a reference for how much better than the heuristics deflection could get (the headroom)
and a teacher for imitation, not a policy to serve.

Candidates: the environment's actions (prefill on each prefill node, the decode node left to the balancer;
deflect to each decode node with KV room, with the TBT-safe chunk cap of :class:`~deflectlab.envs.features.
FeatureBuilder`) plus the base policy's own decision, so a planner never scores below its base at a
decision. Objective, over the requests live at the decision plus those arriving within the horizon: the
number that meet their SLO (TTFT <= the TTFT SLO and their own P95 TBT <= the TBT SLO, as
:mod:`~deflectlab.envs.metrics` counts it), ties broken by the lower sum of TTFTs. Rollouts are
deterministic, so one rollout per action and future suffices.

Where the future comes from (``forecast``): ``known`` (the default) reads the window's arrivals, as above;
``replay`` is causal about arrivals: the rollouts see only a persistence forecast built from what a router has
seen (:func:`~.forecasts.replay_forecast`); ``analog`` is causal about the window but knows the arrival process
of a trace's training blocks: each candidate is played on several futures drawn from what followed moments of
those blocks as busy as the present (:class:`~.forecasts.AnalogPool`), and scored by the sum. With
``horizon_s=0`` no future arrival enters a rollout at all (the *myopic* planner): the decision is played against
the present state and drained. None is deployable: every mode
still reads the model's state exactly, including the output lengths of the requests already in the system,
which fix their decode time and memory and which a router does not know. Comparing the modes splits the
headroom into what knowing the future arrivals is worth, what knowing their distribution is worth, and what
planning on the present is worth.

It needs the simulation itself: :meth:`ClusterSim.run` calls :meth:`attach`; the DAgger labeller attaches
the environment's simulation. Without one, ``decide`` is an error saying so.
"""

from __future__ import annotations

import copy
import math
from bisect import bisect_right
from typing import Any

import numpy as np

from deflectlab.envs.features import FeatureBuilder
from deflectlab.envs.simulator import full_blocks
from deflectlab.envs.view import ClusterView, Decision, Policy, RequestLike
from deflectlab.policies.forecasts import AnalogPool, episode_scale, mean_finished_output, replay_forecast

_DRAIN_S = 120.0  # after the horizon, drain the copy at most this long (simulated seconds); unfinished = missed

#: where the rollouts' future arrivals come from: ``known`` (the window's own: clairvoyant), ``replay`` (a
#: persistence forecast from what a router has seen: :func:`~.forecasts.replay_forecast`) or ``analog`` (draws of
#: what followed similar moments of a trace's training blocks: :class:`~.forecasts.AnalogPool`)
FORECASTS = ("known", "replay", "analog")


#: what the rollouts take for the output lengths of requests that have not started decoding: ``known`` (the
#: workload's) or ``mean`` (:func:`mean_finished_output`, what a router can know)
OUTPUTS = ("known", "mean")
def tbt_slo_met(sim: Any, reqs: list, tau: float) -> list[bool]:
    """For each finished request, whether its own P95 TBT <= ``tau``: at least ``ceil(0.95 n)`` of its ``n``
    samples (token steps after the first, each pre-emption run, each pre-emption gap) are <= ``tau``, as
    :mod:`~deflectlab.envs.metrics` counts it. Exact, from the decode nodes' segment logs (steps ``n0+1 ..
    n0+k`` took ``a + b*j`` seconds, ``j = 0..k-1``), with prefix sums over the segments the requests span."""
    n = len(reqs)
    cnt = np.zeros(n)
    over = np.zeros(n)
    runs: dict[int, list[tuple[int, int, int]]] = {}
    for i, r in enumerate(reqs):
        node_runs = runs.setdefault(r.d_node, [])
        for first, last in (r.tbt_runs or ()):
            node_runs.append((i, first + 1, last))
        node_runs.append((i, r.first_step + 1, r.last_step))
        for gap in r.stalls or ():
            cnt[i] += 1
            over[i] += gap > tau
    for d, node_runs in runs.items():
        owner, lo, hi = (np.array(x, dtype=np.int64) for x in zip(*node_runs, strict=True))
        keep = hi >= lo
        if keep.any():
            owner, lo, hi = owner[keep], lo[keep], hi[keep]
            f = _OverCount(sim.decode[d], tau, int(lo.min()))
            cnt += np.bincount(owner, weights=hi - lo + 1, minlength=n)
            over += np.bincount(owner, weights=f(hi) - f(lo - 1), minlength=n)
    return list(cnt - over >= np.ceil(0.95 * cnt - 1e-9))


class _OverCount:
    """``F(s)``: how many of one decode node's steps up to ``s`` took more than ``tau`` (relative to the first
    segment kept, which holds step ``lo_min - 1``; only differences ``F(hi) - F(lo - 1)`` are meaningful)."""

    def __init__(self, node: Any, tau: float, lo_min: int) -> None:
        i0 = max(bisect_right(node.log_n0, lo_min - 2) - 1, 0)
        self.n0 = np.frombuffer(node.log_n0, dtype=np.int64)[i0:]
        self.a = np.frombuffer(node.log_a, dtype=np.float64)[i0:]
        self.b = np.frombuffer(node.log_b, dtype=np.float64)[i0:]
        k = np.frombuffer(node.log_k, dtype=np.int64)[i0:]
        self.tau = tau
        self.c_over = np.concatenate([[0.0], np.cumsum(self._over_first(self.a, self.b, k))])

    def _over_first(self, a: np.ndarray, b: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Of steps ``j = 0..m-1`` taking ``a + b*j`` (``b >= 0``), how many exceed ``tau``."""
        with np.errstate(divide="ignore", invalid="ignore"):
            le_b = np.floor((self.tau - a) / np.where(b > 0, b, 1.0)) + 1
        le = np.where(b > 0, le_b, np.where(a <= self.tau, m, 0))
        return m - np.clip(le, 0, m)

    def __call__(self, s: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.n0, s - 1, side="right") - 1
        ok = i >= 0
        ii = np.where(ok, i, 0)
        m = np.maximum(s - self.n0[ii], 0)
        return np.where(ok, self.c_over[ii] + self._over_first(self.a[ii], self.b[ii], m), 0.0)


class Lookahead(Policy):
    """Clairvoyant one-step lookahead over the window's known arrivals (see the module docstring).

    :param horizon_s: simulated seconds of future arrivals each rollout routes (then it drains).
    :param base: the registry name of the policy that routes the rollouts' future arrivals.
    :param forecast: where the rollouts' future arrivals come from: ``known`` (the window's: clairvoyant),
        ``replay`` (:func:`~.forecasts.replay_forecast`: causal about arrivals) or ``analog`` (``samples`` draws
        from ``pool``'s blocks, :class:`~.forecasts.AnalogPool`: causal about the window, but it knows the
        training blocks' arrival process; each candidate's score is summed over the same draws).
    :param samples: ``forecast=analog``: futures drawn per decision (each candidate is played on every one).
    :param pool: ``forecast=analog``: the trace the futures are drawn from; empty: the episode's own trace.
    :param pool_split: ``forecast=analog``: the split (:mod:`~deflectlab.envs.splits`) whose blocks the pool is.
    :param pool_part: ``forecast=analog``: ``train`` (default) or ``held_out`` blocks of ``pool_split``. An
        episode whose window meets the pool's blocks is refused: the draws would include its own future.
    :param seed: ``forecast=analog``: seed of the draws (:meth:`reset` with a seed re-seeds them).
    :param outputs: the output lengths the rollouts take for requests that have not started decoding (the pending
        one, those queued or in hand-off, the arrivals to come): ``known`` (the workload's) or ``mean`` (the mean
        of recently finished requests', :func:`mean_finished_output`; the workload's until one has finished).
        Requests already decoding keep theirs: the model fixed their last step when they joined.
    :param min_gain: keep the base policy's decision unless another candidate's rollout meets the SLO for at least
        this many more requests (0: always the best candidate, ties on the SLO count broken by the TTFT sum). A
        teacher that departs from its base only where it counts gives labels a network can follow.
    :param base_*: parameters of the base policy (``base_max_len=3072`` for the tuned length threshold).
    """

    name = "lookahead"

    def __init__(self, horizon_s: float = 10.0, base: str = "length_threshold", forecast: str = "known",
                 min_gain: int = 0, outputs: str = "known", samples: int = 4, pool: str = "",
                 pool_split: str = "blocked", pool_part: str = "train", seed: int = 0, **base_params: Any) -> None:
        from deflectlab.policies.registry import make_policy

        if not (isinstance(horizon_s, int | float) and horizon_s >= 0 and math.isfinite(horizon_s)):
            raise ValueError(f"policy 'lookahead': horizon_s must be a finite number >= 0 seconds, got {horizon_s!r}")
        bad = [k for k in base_params if not k.startswith("base_")]
        if bad:
            raise ValueError(f"policy 'lookahead': unknown parameters {bad}; base policy parameters are base_<name>")
        if base == "lookahead":
            raise ValueError("policy 'lookahead': the base policy cannot be lookahead itself")
        if forecast not in FORECASTS:
            raise ValueError(f"policy 'lookahead': forecast must be one of {', '.join(FORECASTS)}, got {forecast!r}")
        if isinstance(min_gain, bool) or not isinstance(min_gain, int) or min_gain < 0:
            raise ValueError(f"policy 'lookahead': min_gain must be a whole number of requests >= 0, got {min_gain!r}")
        if outputs not in OUTPUTS:
            raise ValueError(f"policy 'lookahead': outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")
        _check_whole("samples", samples, 1)
        _check_whole("seed", seed, 0)
        if pool_part not in ("train", "held_out"):
            raise ValueError(f"policy 'lookahead': pool_part must be train or held_out, got {pool_part!r}")
        if forecast == "analog" and horizon_s <= 0:
            raise ValueError("policy 'lookahead': forecast=analog needs horizon_s > 0 (the seconds it forecasts)")
        self.samples = samples
        self.pool = str(pool)
        self.pool_split = pool_split
        self.pool_part = pool_part
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.forecast = forecast
        self.min_gain = min_gain
        self.outputs = outputs
        self.horizon_s = float(horizon_s)
        self.clairvoyant = forecast == "known" and self.horizon_s > 0  # reads the window's future arrivals
        self.base_name = base
        self.base_params = {k[5:]: v for k, v in base_params.items()}
        if base == "length_threshold" and "max_len" not in self.base_params:
            self.base_params["max_len"] = 3072  # tuned: experiments/policies/tuned_azure_code_2p2d.yaml
        self._base = make_policy(base, **self.base_params)
        self._fb = FeatureBuilder()
        self._futures: list[tuple | None] = [None]  # this decision's rollout arrivals (None: the window's own)
        self._pool: AnalogPool | None = None  # forecast="analog": the pool and the episode's time scale (attach)
        self._scale = 1.0
        self._out_est: int | None = None  # this decision's output-length estimate (outputs="mean")
        self._base_decision: Decision | None = None  # the base policy's proposal at this decision (candidates)
        self._sim: Any = None
        self.last_scores: list[tuple[Decision, tuple[int, float]]] = []
        self.decisions = 0
        self.rollouts = 0

    def params(self) -> dict[str, Any]:
        extra = {"samples": self.samples, "pool": self.pool, "pool_split": self.pool_split,
                 "pool_part": self.pool_part, "seed": self.seed} if self.forecast == "analog" else {}
        return {"horizon_s": self.horizon_s, "base": self.base_name, "forecast": self.forecast,
                "min_gain": self.min_gain, "outputs": self.outputs, **extra,
                **{f"base_{k}": v for k, v in self.base_params.items()}}

    def reset(self, seed: int | None = None) -> None:
        self._base.reset(seed)
        self.decisions = self.rollouts = 0
        if seed is not None:
            self._rng = np.random.default_rng((self.seed, seed))

    def attach(self, sim: Any) -> None:
        """Plan on ``sim`` (a :class:`~deflectlab.envs.simulator.ClusterSim` stopped at a decision); an analog
        forecast finds its pool and the episode's time scale here, and refuses a window its pool meets."""
        self._sim = sim
        if self.forecast == "analog":
            trace = self.pool or (getattr(sim.workload, "meta", None) or {}).get("trace")
            if not trace:
                raise ValueError("policy 'lookahead': forecast=analog needs pool=<trace> (this episode's workload "
                                 "does not name its trace)")
            self._pool = AnalogPool.of_split(trace, self.pool_split, self.pool_part)
            self._scale = episode_scale(sim, self._pool, "policy 'lookahead'")

    def candidates(self, view: ClusterView, request: RequestLike) -> list[Decision]:
        """The environment's valid actions' decisions, then the base policy's decision if it is not among them."""
        self._fb.build(view, request)
        mask = self._fb.mask
        out = [self._fb.decision(a) for a in range(len(mask)) if mask[a]]
        if not view.num_prefill:
            out = [d for d in out if d.deflected]
        base = self._base_decision = self._base.decide(view, request)
        if base not in out:
            out.append(base)
        return out

    def decide(self, view: ClusterView, request: RequestLike) -> Decision:
        sim = self._sim
        if sim is None:
            raise RuntimeError("policy 'lookahead' is clairvoyant: it plans on the simulation itself and runs only "
                               "inside ClusterSim.run (or after attach(sim)); it cannot serve live traffic")
        if not sim.requests or sim.requests[-1] is not request:
            raise RuntimeError("policy 'lookahead': the request is not the simulation's pending one")
        self._futures = self._forecasts(sim)
        self._out_est = None if self.outputs == "known" else mean_finished_output(sim)
        if self._out_est is not None:  # the rollouts' unknown output lengths: the estimate, arrivals to come included
            i = sim._next
            self._futures = [(t, p_in, out[:i] + [self._out_est] * (len(t) - i), hashes) for t, p_in, out, hashes
                             in (f or (sim._arr_t, sim._arr_in, sim._arr_out, None) for f in self._futures)]
        best, best_key = None, None
        scores = self.last_scores = []  # (decision, (met, -sum TTFT)) per candidate, for cost-aware imitation
        base = base_key = None
        for dec in self.candidates(view, request):
            key = self.score(dec)
            scores.append((dec, key))
            if best_key is None or key > best_key:
                best, best_key = dec, key
            if dec == self._base_decision:
                base, base_key = dec, key
        self.decisions += 1
        assert best is not None and base is not None and best_key is not None and base_key is not None
        if self.min_gain and best_key[0] - base_key[0] < self.min_gain:
            best = base  # not worth a departure from the base
        if best != base:  # the base tracks what was decided, not what it proposed (proactive's lanes)
            self._base.taken(view, request, best)
        return best

    def taken(self, view: ClusterView, request: RequestLike, decision: Decision) -> None:
        """Another policy decided ``request`` (a learner DAgger lets act): the base tracks that decision."""
        self._base.taken(view, request, decision)

    def _forecasts(self, sim: Any) -> list[tuple | None]:
        """This decision's rollout futures: ``[None]`` (the window's own arrivals) or forecast arrival arrays."""
        if self.forecast == "known":
            return [None]
        if self.forecast == "replay":
            return [replay_forecast(sim, self.horizon_s)]
        assert self._pool is not None
        return list(self._pool.forecasts(sim, self._scale, self.horizon_s, self.horizon_s, self.samples, self._rng))

    def score(self, decision: Decision) -> tuple[int, float]:
        """Play ``decision`` forward on a copy for each of this decision's futures: (requests meeting the SLO,
        minus the sum of their TTFTs), summed over the futures."""
        met, neg_ttft = 0, 0.0
        for future in self._futures:
            m, t = self._rollout(decision, future)
            met += m
            neg_ttft += t
        return met, neg_ttft

    def _rollout(self, decision: Decision, future: tuple | None) -> tuple[int, float]:
        sim = self._sim
        c = sim.copy_state()
        if future is not None:  # the rollouts' arrivals are the forecast's, not the window's
            c._arr_t, c._arr_in, c._arr_out, hashes = future
            if hashes is not None:
                c._hashes = hashes
                c._n_full = full_blocks(c._arr_in, hashes, c._hash_block_tokens)
        self.rollouts += 1
        scored = [r for r in c.requests[c._done_prefix:] if r.reject_reason is None]
        if self._out_est is not None:  # requests not decoding yet: their output length is not known either
            for r in scored:
                if r.last_step < 0:
                    r.output_tokens = self._out_est
        base = copy.deepcopy(self._base)
        if decision != self._base_decision:  # the rollout's base tracks the candidate, not its own proposal
            base.taken(c.view(), c.requests[-1], decision)
        c.route(c.requests[-1], decision)
        t_end = c.now + self.horizon_s
        while c._next < len(c._arr_t) and c._arr_t[c._next] <= t_end:
            r = c.advance()
            c.route(r, base.decide(c.view(), r))
            scored.append(r)
        c.run_events(t_end + _DRAIN_S)
        return _objective(c, scored)


def _check_whole(name: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"policy 'lookahead': {name} must be a whole number >= {lo}, got {v!r}")


def _objective(sim: Any, scored: list) -> tuple[int, float]:
    cfg = sim.config
    ttft_slo, cap = cfg.ttft_slo_s, _DRAIN_S
    met, ttft_sum = 0, 0.0
    tbt_check = []
    for r in scored:
        if r.reject_reason is not None:
            continue
        if r.t_first_token < 0.0:
            ttft_sum += cap
            continue
        ttft = r.t_first_token - r.arrival_s
        ttft_sum += ttft
        if ttft <= ttft_slo and r.t_finish >= 0.0:
            if r.output_tokens <= 1:
                met += 1
            else:
                tbt_check.append(r)
    if tbt_check:
        met += sum(tbt_slo_met(sim, tbt_check, cfg.tbt_slo_s))
    return met, -ttft_sum


def register_policies(register: Any) -> None:
    """Add ``lookahead`` (clairvoyant planner: ``lookahead:horizon_s=10,base=length_threshold,base_max_len=3072``)."""
    register("lookahead", Lookahead)
