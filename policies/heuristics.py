"""Heuristic routing policies. Each cites where its rule comes from."""

from __future__ import annotations

from typing import Any

from deflectlab.envs.view import ClusterView, Decision, Policy, RequestLike


class RoundRobin(Policy):
    """Never deflect: prefill nodes in turn, decode node left to the cluster's decode balancer.

    The default of vLLM's disaggregated-serving proxy example (round robin over prefill and decode instances).
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def reset(self, seed: int | None = None) -> None:
        self._next = 0

    def decide(self, view: ClusterView, request: RequestLike) -> Decision:
        n = view.num_prefill
        p = self._next % n
        self._next = p + 1
        return Decision.prefill(p)


class AlwaysDeflect(Policy):
    """Always deflect: aggregated serving on the decode nodes (prefill chunked into decode batches).

    Decode node by round robin, chunks up to the node's token budget (``chunk`` caps them if given).

    :param chunk: per-request chunk cap, tokens (``None``: the node's budget).
    """

    name = "always_deflect"
    needs_prefill_nodes = False

    def __init__(self, chunk: int | None = None) -> None:
        self.chunk = chunk
        self._next = 0

    def reset(self, seed: int | None = None) -> None:
        self._next = 0

    def decide(self, view: ClusterView, request: RequestLike) -> Decision:
        d = self._next % view.num_decode
        self._next = d + 1
        return Decision.deflect(d, self.chunk)

    def params(self) -> dict[str, Any]:
        return {"chunk": self.chunk}
