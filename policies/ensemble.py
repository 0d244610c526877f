"""``ensemble``: a majority vote of exported learned policies.

RL from scratch gives networks whose held-out results differ by seed (``experiments/rl_v4_blocked``: six seeds of
one recipe range from -0.34 to +0.24 points against the best heuristic at 1x). A vote over the seeds of one run,
all of them and none chosen by their held-out results, trades that variance for one decision per request.

Each member decides on the same view. The ensemble takes the kind (prefill or deflect) most members chose, ties
going to ``tie``; within that kind, the decision most of those members chose (the first of them on ties). Every
member whose own decision differs is told the one taken (:meth:`Policy.taken`), so members that keep state across
a run (feature schema 3 on: the estimator's tracked deflections) follow the run as it went.

Spec: ``ensemble:paths=DIR+DIR+...`` (``+`` between export directories, since ``,`` separates parameters),
``tie=prefill|deflect``, ``backend=auto|onnx|numpy``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from deflectlab.envs.view import ClusterView, Decision, Policy, RequestLike
from deflectlab.policies.runtime import OnnxPolicy

TIES = ("prefill", "deflect")


class Ensemble(Policy):
    """Majority vote of exported learned policies (see the module docstring).

    :param paths: export directories joined by ``+`` (at least one).
    :param tie: the kind taken when as many members prefill as deflect.
    :param backend: the members' backend (:class:`~deflectlab.policies.runtime.OnnxPolicy`).
    """

    name = "ensemble"

    def __init__(self, paths: str | None = None, tie: str = "prefill", backend: str = "auto") -> None:
        parts = [p for p in str(paths).split("+") if p.strip()] if paths is not None else []
        if not parts:
            raise ValueError("policy 'ensemble': paths must name at least one exported policy (DIR+DIR+...)")
        if tie not in TIES:
            raise ValueError(f"policy 'ensemble': tie must be one of {', '.join(TIES)}, got {tie!r}")
        self.paths, self.tie, self.backend = parts, tie, backend
        self.members = [OnnxPolicy(p.strip(), backend=backend) for p in parts]
        self.needs_prefill_nodes = any(m.needs_prefill_nodes for m in self.members)
        self.last_votes: list[Decision] = []

    def reset(self, seed: int | None = None) -> None:
        for m in self.members:
            m.reset(seed)

    def decide(self, view: ClusterView, request: RequestLike) -> Decision:
        votes = self.last_votes = [m.decide(view, request) for m in self.members]
        deflect = sum(d.deflected for d in votes)
        kind = deflect * 2 > len(votes) or (deflect * 2 == len(votes) and self.tie == "deflect")
        same = [d for d in votes if d.deflected == kind]
        best = Counter(same).most_common(1)[0][1]
        chosen = next(d for d in same if same.count(d) == best)  # the first of the most chosen
        for m, d in zip(self.members, votes, strict=True):
            if d != chosen:
                m.taken(view, request, chosen)
        return chosen

    def taken(self, view: ClusterView, request: RequestLike, decision: Decision) -> None:
        for m in self.members:
            m.taken(view, request, decision)

    def params(self) -> dict[str, Any]:
        return {"paths": "+".join(self.paths), "tie": self.tie, "backend": self.backend}


def register_policies(register: Any) -> None:
    """Add ``ensemble`` (a majority vote of exported policies: ``ensemble:paths=DIR+DIR+DIR``)."""
    register("ensemble", Ensemble)
