"""Rewards of the deflection environment: small, pluggable objects with stated units.

Between two routing decisions (one ``step()``) the environment measures what happened in the cluster and hands
it to the reward as a :class:`StepStats`; a reward turns that into one float. Rewards never look at the cluster
themselves, so they cost nothing to swap and are easy to test. The environment only gathers what a reward
declares it needs (``needs_first_tokens``, ``needs_tbt``).

Terms (each a penalty, so rewards are <= 0):

``latency`` -- :class:`WaitingTimeIntegral`
    Minus the time integral of the number of requests waiting for their first token, over the step, in
    request-seconds divided by the TTFT SLO (so one request waiting one SLO costs 1). It is additive (Park's
    load-balance reward): over an episode that ends drained it sums to exactly ``-sum(TTFT_i) / ttft_slo_s``,
    i.e. it minimises mean TTFT, and it arrives densely, at every step, which helps credit assignment.
``slo`` -- :class:`SLOHinge`
    ``miss`` per request over the TTFT SLO, plus ``slope`` times the excess in SLOs (``max(0, TTFT / ttft_slo_s
    - 1)``, a hinge, on first-token events); a rejected request counts as a miss. Units: missed requests (plus
    SLOs of excess). It targets SLO attainment directly. With ``at="first_token"`` (default) a miss is charged
    when the late first token comes, possibly many seconds after the decision that caused it; with
    ``at="deadline"`` it is charged as soon as a request has waited one SLO without a first token (same total,
    earlier credit).
``tbt`` -- :class:`TBTViolation`
    Token gaps over the TBT SLO during the step, estimated from the decode nodes' segment logs: each decode
    step slower than ``tbt_slo_s`` counts the node's running batch (taken at the end of the step) as gaps.
    Units: token gaps (times ``weight``). A request misses its TBT SLO when more than 5 % of its gaps are over,
    so for short outputs (the code trace's median is 13 tokens) one slow step is enough.

``request`` -- :class:`RequestOutcome`
    Decision-local credit for SLO attainment. Each decision is charged ``miss`` at once if the estimated TTFT of
    its own request on the chosen path (the observation's ``est_ttft`` of the node it went to, the proactive
    deflector's formula) is over the SLO; when the request's deadline (arrival + TTFT SLO) passes, the
    estimate is corrected to the truth: ``correction x miss x (actual miss - estimated miss)``. With
    ``correction=1`` an episode sums to exactly the ``slo`` (``at="deadline"``) total, ``-miss x`` (misses +
    rejections), but most of the signal arrives at the decision that caused it, not seconds and hundreds of
    decisions later among other requests' outcomes; ``correction=0`` is the estimate alone (a bandit reward).

``composite`` (the default) is ``latency + slo + 0.02 x tbt``; ``attainment`` is ``slo(at=deadline) + 0.2 x tbt +
0.05 x latency``, aimed at SLO attainment with a little dense shaping; ``per_request`` is ``request + 0.2 x
tbt``, the same aim with decision-local credit; see :data:`PRESETS`. Build any reward with
:func:`make_reward` from a name, a mapping ``{"name": ..., **params}``, a list of those (summed), or an object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from deflectlab.envs.config import check_number


@dataclass(slots=True)
class StepStats:
    """What happened between two decisions (times in seconds).

    :param dt_s: length of the interval, seconds.
    :param waiting_integral: integral over the interval of the number of requests waiting for their first token,
        request-seconds.
    :param ttfts_s: TTFT of every request whose first token came in the interval (only if a reward needs them).
    :param tbt_violation_gaps: estimated token gaps over the TBT SLO in the interval (only if a reward needs it).
    :param deadline_misses: requests whose TTFT deadline (arrival + SLO) passed in the interval without a first
        token (only if a reward needs them).
    :param rejected: requests the cluster rejected at this decision (cannot fit any KV cache).
    :param decision_est_miss: 1 if the estimated TTFT of this step's own request on the path it was sent is over
        the TTFT SLO, else 0 (0 for a rejected request; only if a reward needs estimates).
    :param deadline_est_misses: the sum of ``decision_est_miss`` over the requests whose deadline passed in the
        interval (the ones counted in ``deadline_misses``'s scan; only if a reward needs estimates).
    :param ttft_slo_s: the cluster's TTFT SLO, seconds.
    :param tbt_slo_s: the cluster's TBT SLO, seconds.
    """

    dt_s: float = 0.0
    waiting_integral: float = 0.0
    ttfts_s: list[float] = field(default_factory=list)
    tbt_violation_gaps: float = 0.0
    deadline_misses: int = 0
    rejected: int = 0
    decision_est_miss: float = 0.0
    deadline_est_misses: float = 0.0
    ttft_slo_s: float = 1.0
    tbt_slo_s: float = 0.1


class Reward:
    """A reward term. Subclasses set ``name``, the ``needs_*`` flags and implement :meth:`__call__`."""

    name = "reward"
    needs_first_tokens = False
    needs_deadlines = False
    needs_tbt = False
    needs_estimates = False

    def __call__(self, s: StepStats) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return {}

    def spec(self) -> dict[str, Any]:
        """JSON form, accepted back by :func:`make_reward`."""
        return {"name": self.name, **self.params()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


class WaitingTimeIntegral(Reward):
    """Minus the time integral of requests waiting for their first token, in request x TTFT-SLOs.

    :param scale: multiplier (dimensionless); 1 makes one request waiting one TTFT SLO cost 1.
    """

    name = "latency"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = check_number(scale, "scale", lo=0.0, what="reward")

    def __call__(self, s: StepStats) -> float:
        return -self.scale * s.waiting_integral / s.ttft_slo_s

    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}


class SLOHinge(Reward):
    """Penalty per request over the TTFT SLO (and per rejected request).

    :param miss: cost of one request over its TTFT SLO (or rejected), in requests.
    :param slope: cost per TTFT SLO of excess (``max(0, TTFT / slo - 1)``), the hinge's slope, charged at the
        first token.
    :param at: ``"first_token"``: charge a miss at the late first token; ``"deadline"``: as soon as the request
        has waited one SLO without one.
    """

    name = "slo"

    def __init__(self, miss: float = 1.0, slope: float = 0.0, at: str = "first_token") -> None:
        self.miss = check_number(miss, "miss", lo=0.0, what="reward")
        self.slope = check_number(slope, "slope", lo=0.0, what="reward")
        if at not in ("first_token", "deadline"):
            raise ValueError(f"reward 'slo': at must be 'first_token' or 'deadline', got {at!r}")
        self.at = at
        self.needs_deadlines = at == "deadline"
        self.needs_first_tokens = at == "first_token" or self.slope > 0.0

    def __call__(self, s: StepStats) -> float:
        slo = s.ttft_slo_s
        miss, slope = self.miss, self.slope
        if self.at == "deadline":
            cost = miss * (s.rejected + s.deadline_misses)
            if slope:
                for t in s.ttfts_s:
                    if t > slo:
                        cost += slope * (t / slo - 1.0)
            return -cost
        cost = miss * s.rejected
        for t in s.ttfts_s:
            if t > slo:
                cost += miss + slope * (t / slo - 1.0)
        return -cost

    def params(self) -> dict[str, Any]:
        return {"miss": self.miss, "slope": self.slope, "at": self.at}


class TBTViolation(Reward):
    """Minus the (estimated) token gaps over the TBT SLO, times ``weight``.

    :param weight: cost of one token gap over the TBT SLO (dimensionless).
    """

    name = "tbt"
    needs_tbt = True

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = check_number(weight, "weight", lo=0.0, what="reward")

    def __call__(self, s: StepStats) -> float:
        return -self.weight * s.tbt_violation_gaps

    def params(self) -> dict[str, Any]:
        return {"weight": self.weight}


class RequestOutcome(Reward):
    """Each decision's own request: its estimated SLO miss at the decision, corrected to the actual outcome at
    its deadline.

    :param miss: cost of one request over its TTFT SLO (or rejected), in requests.
    :param correction: weight in [0, 1] of the correction ``actual - estimated`` charged at the deadline; 1 makes
        the episode total that of ``slo`` with ``at="deadline"``, 0 keeps the estimate alone.
    """

    name = "request"
    needs_deadlines = True
    needs_estimates = True

    def __init__(self, miss: float = 1.0, correction: float = 1.0) -> None:
        self.miss = check_number(miss, "miss", lo=0.0, what="reward")
        self.correction = check_number(correction, "correction", lo=0.0, hi=1.0, what="reward")

    def __call__(self, s: StepStats) -> float:
        late = s.deadline_misses - s.deadline_est_misses
        return -self.miss * (s.rejected + s.decision_est_miss + self.correction * late)

    def params(self) -> dict[str, Any]:
        return {"miss": self.miss, "correction": self.correction}


class Composite(Reward):
    """The sum of several terms.

    :param terms: the rewards to add.
    """

    name = "composite"

    def __init__(self, terms: Sequence[Reward]) -> None:
        if not terms:
            raise ValueError("a composite reward needs at least one term")
        self.terms = list(terms)
        self.needs_first_tokens = any(t.needs_first_tokens for t in self.terms)
        self.needs_deadlines = any(t.needs_deadlines for t in self.terms)
        self.needs_tbt = any(t.needs_tbt for t in self.terms)
        self.needs_estimates = any(t.needs_estimates for t in self.terms)

    def __call__(self, s: StepStats) -> float:
        return sum(t(s) for t in self.terms)

    def params(self) -> dict[str, Any]:
        return {"terms": [t.spec() for t in self.terms]}


_CLASSES: dict[str, type[Reward]] = {"latency": WaitingTimeIntegral, "slo": SLOHinge, "tbt": TBTViolation,
                                     "request": RequestOutcome}

#: Named rewards; ``make_reward(name)`` builds one.
PRESETS: dict[str, Any] = {
    "latency": {"name": "latency"},
    "slo": {"name": "slo"},
    "tbt": {"name": "tbt"},
    "composite": [{"name": "latency", "scale": 1.0}, {"name": "slo", "miss": 1.0}, {"name": "tbt", "weight": 0.02}],
    "attainment": [{"name": "slo", "miss": 1.0, "at": "deadline"}, {"name": "tbt", "weight": 0.2},
                   {"name": "latency", "scale": 0.05}],
    "per_request": [{"name": "request", "miss": 1.0, "correction": 1.0}, {"name": "tbt", "weight": 0.2}],
}


def make_reward(spec: str | dict[str, Any] | Sequence[Any] | Reward) -> Reward:
    """A reward from a preset name, a mapping ``{"name": ..., **params}``, a list (summed) or an object."""
    if isinstance(spec, Reward):
        return spec
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown reward {spec!r}; known: {', '.join(sorted(PRESETS))}")
        return make_reward(PRESETS[spec])
    if isinstance(spec, dict):
        d = dict(spec)
        name = d.pop("name", None)
        if name == "composite":
            terms = d.pop("terms", PRESETS["composite"])
            if d:
                raise ValueError(f"reward 'composite': unknown parameter(s) {sorted(d)}; known: ['terms']")
            return Composite([make_reward(t) for t in terms])
        if name not in _CLASSES:
            raise ValueError(f"reward mapping needs a 'name' among {sorted(_CLASSES) + ['composite']}, got {name!r}")
        try:
            return _CLASSES[name](**d)
        except TypeError as e:
            raise ValueError(f"reward {name!r}: bad parameters {d}: {e}") from None
    if isinstance(spec, (list, tuple)):
        return Composite([make_reward(t) for t in spec])
    raise ValueError(f"a reward is a name, a mapping, a list or a Reward object, got {spec!r}")
