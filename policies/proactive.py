"""The paper's proactive deflector: estimate TTFT on every path, deflect when the decode side is faster.

Source: "Towards Load-Aware Prefill Deflection for Disaggregated LLM Serving" (arXiv 2607.02043), as written
out in docs/design.md ("Policies"). The per-path estimates ``T_P(p)`` (prefill on node ``p``, hand-off, first
decode step) and ``T_D(d)`` with chunk cap ``c_d`` (a chunked prefill on decode node ``d``), and how deflected
prefills share a decode node's steps (``sharing``), are :mod:`envs.estimates`' (its docstring gives them);
feature schema 3 gives a learned policy the same numbers.

Deflect to ``argmin T_D`` with chunk cap ``c_d`` when ``min T_D < (1 - margin) x min T_P``, else prefill on
``argmin T_P``. The decision carries ``estimates = {"ttft_s": the chosen path's estimate, "ttft_prefill_s":
min T_P, "ttft_deflect_s": min T_D}`` (a key is absent when no node of that kind qualifies), so the metrics
report the estimate error against the simulated TTFT. ``scripts/bench_policies.py`` measures ``decide``.
"""

from __future__ import annotations

import math
from typing import Any

from deflectlab.envs.config import check_number
from deflectlab.envs.estimates import PathEstimator
from deflectlab.envs.view import ClusterView, Decision, Policy, RequestLike, least_loaded_decode


class ProactiveDeflector(PathEstimator, Policy):
    """The paper's proactive deflector (the module docstring gives the rule, :mod:`envs.estimates` the
    estimates and ``sharing``).

    :param margin: deflect only when the best deflect path's TTFT estimate is below ``(1 - margin)`` times
        the best prefill path's; 0 deflects whenever it is estimated faster. Dimensionless, in [0, 1).
    :param tbt_safety: chunk caps keep the estimated step time under ``tbt_safety x tbt_slo_s``; below 1 leaves
        headroom for decodes that join while the chunks run. Dimensionless, in (0, 1].
    :param sharing: how deflected prefills share a decode node's steps: ``"bounded"`` (default), ``"serial"``
        or ``"queue"`` (docs/design.md's formula literally; breaks the TBT SLO under load).
    :param min_chunk: no deflection to a node whose SLO-safe chunk is below this (unless the whole prompt is
        smaller), tokens. A prompt that may only take a few hundred tokens per step (a long one, whose chunks
        attend to a long prefix) holds a decode node's step-time budget for many steps; 512 was chosen on the
        training windows of :mod:`experiments.tuning` (mean SLO attainment 97.7 % against 97.2 % at 32, 2P2D
        ``azure_code``), as the baselines' thresholds are.
    :param max_chunk: upper bound on the chunk cap, tokens (``None``: no bound but the node's budget).
    :param output_allowance_tokens: KV room kept for the unknown output beyond the prompt, tokens.
    :param pin_decode: on the prefill path, name the decode node ``d*`` used in the estimate; by default the
        decode node is left to the cluster's balancer, which picks it at hand-off time with fresher state.
    """

    name = "proactive"
    needs_prefill_nodes = False  # with no prefill nodes every request takes the best decode node

    def __init__(self, margin: float = 0.0, tbt_safety: float = 1.0, sharing: str = "bounded",
                 min_chunk: int = 512, max_chunk: int | None = None, output_allowance_tokens: int = 256,
                 pin_decode: bool = False) -> None:
        check_number(margin, "margin", lo=0.0, hi=1.0, hi_open=True, what="policy 'proactive'")
        if not isinstance(pin_decode, bool):
            raise ValueError(f"policy 'proactive': pin_decode must be true or false, got {pin_decode!r}")
        super().__init__(tbt_safety, sharing, min_chunk, max_chunk, output_allowance_tokens,
                         what="policy 'proactive'")
        self.margin = float(margin)
        self.pin_decode = pin_decode

    def reset(self, seed: int | None = None) -> None:
        self.reset_estimates()
        self._mine: tuple[int, Any] | None = None  # the lane of this policy's last deflection (see taken)

    def taken(self, view: ClusterView, request: RequestLike, decision: Decision) -> None:
        """Another policy decided ``request``: track its deflection, not the one this policy chose (or was last
        told: a second call replaces the first's)."""
        L = request.input_tokens
        self._mine = self.retrack(self._mine, decision, L, lambda d: L - view.decode[d].cached_tokens)

    def params(self) -> dict[str, Any]:
        return {"margin": self.margin, **self.estimator_params(), "pin_decode": self.pin_decode}

    # -- the decision --------------------------------------------------------------------------------------
    def decide(self, view: ClusterView, request: RequestLike) -> Decision:
        L = request.input_tokens
        self._mine = None
        dispersion = self.observe(L)
        dstar = least_loaded_decode(view)
        best_p, t_p = self._best_prefill(view, L, dispersion, dstar.cached_tokens)
        t_p += self.first_step(dstar, L)
        best_d, best_c, t_d = self._best_deflection(view, L)
        if best_d >= 0 and (best_p < 0 or t_d < (1.0 - self.margin) * t_p):
            self._mine = (best_d, self.add_lane(best_d, best_c, L, L - view.decode[best_d].cached_tokens))
            est = {"ttft_s": t_d, "ttft_deflect_s": t_d}
            if best_p >= 0:
                est["ttft_prefill_s"] = t_p
            return Decision.deflect(best_d, best_c, est)
        if best_p < 0:  # no prefill node and no decode node with room: queue on the roomiest decode node
            d_any = max(view.decode, key=lambda d: d.kv_free_tokens).index
            return Decision.deflect(d_any, None, None)
        est = {"ttft_s": t_p, "ttft_prefill_s": t_p}
        if best_d >= 0:
            est["ttft_deflect_s"] = t_d
        return Decision.prefill(best_p, dstar.index if self.pin_decode else None, est)

    def _best_prefill(self, view: ClusterView, L: int, dispersion: float, d_cached: int = 0) -> tuple[int, float]:
        """The prefill node with the lowest :meth:`prefill_estimates` (first on ties) and that estimate."""
        best_p, t_p = -1, math.inf
        for p, t in zip(view.prefill, self.prefill_estimates(view, L, dispersion, d_cached)):
            if t < t_p:
                best_p, t_p = p.index, t
        return best_p, t_p

    def _best_deflection(self, view: ClusterView, L: int) -> tuple[int, int, float]:
        """The decode node with the lowest :meth:`deflect_estimates` (first on ties), its chunk cap and the estimate
        (``-1, 0, inf`` when no node has room, sequence slots and a TBT-safe chunk)."""
        best_d, best_c, t_d = -1, 0, math.inf
        for d, (c, t) in zip(view.decode, self.deflect_estimates(view, L)):
            if c > 0 and t < t_d:
                best_d, best_c, t_d = d.index, c, t
        return best_d, best_c, t_d


def register_policies(register) -> None:
    """Add the proactive deflector to the registry (called by :mod:`policies.registry`)."""
    register("proactive", ProactiveDeflector)
