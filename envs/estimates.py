"""Per-path TTFT estimates of one routing decision: the proactive deflector's model, shared by the policy
(:mod:`policies.proactive`, which adds the decision rule) and feature schema 3 (:mod:`envs.features`, which gives
a learned policy the same estimates and chunk caps).

For a request of ``L`` prompt tokens:

**Prefill path through P node p**: ``T_P(p) = wait_p + prefill(L) + handoff(L) + first_step(d*)``.

* ``wait_p + prefill(L)``: the running step's remainder (``busy_until_s - now``), then the queued tokens and
  this prompt in FCFS steps of ``max_batched_tokens`` tokens at the profile's step time: a fixed overhead per
  step, the linear-operator curve at the step's token count, and the prompts' causal attention, the queued
  ones taken as ``count x E[L^2]`` (the number waiting times the second moment of the prompt lengths this
  policy has seen; ``count x mean^2`` underestimates it by the lengths' dispersion, about 1.9 on the Azure
  traces). The queue is costed at the rate of full steps of the actual mix, not at one tokens/s figure.
* ``handoff(L) = kv_transfer_overhead_s + L x kv_bytes_per_token / bw + egress_bytes / bw`` (docs/design.md's
  formula: the transfer plus the bytes already queued on p's NIC), with the cluster's hand-off preset when the
  view carries one (:func:`envs.handoff.handoff_estimate_s`: its dispatch delay, set-up and rate).
* With prefix caching, node p prefills only ``L - cached_p`` tokens, the hand-off moves only the tokens ``d*``
  does not hold, and a deflection to ``d`` prefills ``L - cached_d`` tokens (the view's ``cached_tokens``).
* ``first_step(d*)``: on ``d*``, the decode node the least-loaded balancer would pick now (fewest sequences
  running, prefilling or bound there), half its current step (the wait for a step boundary) plus the step
  the request joins: the larger of d*'s current step and a decode step with this request's context added.

**Deflect path through D node d** (``B`` running decodes over ``C`` context tokens, TBT SLO ``tau =
tbt_slo_s x tbt_safety``): find the largest chunk cap ``c_d`` whose steps keep the running decodes within
``tau`` by the profile, then estimate ``T_D(d)``; skip ``d`` when ``c_d`` is below ``min_chunk`` (and below
``L``), its free KV is under ``L + output_allowance_tokens`` (a router does not know the output length), or
it already holds ``max_num_seqs`` sequences. The step time of a chunk counts *its attention against the
prompt's earlier chunks* (``prefill_attn_cross_s x c x prior``): the worst chunk of a prompt is its last, after
``L - c`` prior tokens, and without that term a 7k-token prompt's last 2k chunk takes 0.15 s, not the 0.09 s
of its first, and breaks a 0.1 s SLO.

**Sharing a decode node's steps** (``sharing``). The cluster model, like vLLM V1, fills what a decode step's
token budget leaves after the running decodes with chunks of *every* waiting deflected prefill, FCFS, each
capped only by its own cap. A prompt deflected behind another therefore does not wait for it: it runs
alongside, and the step holds the sum of their chunks.

* ``"queue"``: docs/design.md's formula literally: ``c_d`` is the largest chunk with ``step(B, C, c_d) <= tau``
  for this prompt alone, and ``T_D(d) = step_s/2 + ceil((Q_d + L) / c_d) x step(B, C, c_d)`` with ``Q_d`` the
  deflected tokens waiting on ``d``. Because concurrent chunks add up, this breaks the TBT SLO: on
  ``azure_code`` at 3.21 req/s (2P2D, whole trace) TBT SLO attainment fell from 100 % to 90 %; a single slow
  step is the P95 of a 13-token output's 12 TBT samples.
* ``"serial"``: as ``"queue"``, but only onto nodes with no deflected prefill in progress (``Q_d = 0``):
  SLO-safe and stateless, but a node's chunk budget idles between deflections.
* ``"bounded"`` (default): the policy keeps, per decode node, the lanes it placed there (chunk cap, prompt
  length, tokens left), advanced between decisions by a fluid model of the node's FCFS fill at its current
  step time and reconciled with the view (the number of deflected prompts still prefilling there, and their
  tokens left). The cap of a new prompt is the largest whose *worst possible step* stays within ``tau``: the
  node's chunk budget filled by the lanes (and the new one) costliest per token first, each lane at its worst
  chunk (its cap, at its largest possible prior context), next to the decodes running plus those bound to
  join (KV pulls in flight and the deflected prompts, which decode there once prefilled). ``T_D`` comes from
  the same fluid model run forward with the new lane appended: each epoch the FCFS fill gives every lane its
  tokens per step, and the epoch's steps cost the profile's time for them. With no lanes it reduces to
  ``step_s/2 + ceil(L / c_d) x step(B, C, c_d)``, the design's formula at ``Q_d = 0``.

:class:`PathEstimator` keeps the state the estimates need between decisions (the prompt lengths seen, for
``E[L^2]``, and with ``sharing="bounded"`` the lanes placed on each decode node: a caller records each deflection
with :meth:`PathEstimator.add_lane`) and gives the estimate of every node, not only the best.

Speed: plain Python over the view's lists; each profile's terms are unpacked once (:class:`StepModel`) and the
linear-operator curve costs one ``bisect``; the chunk search is a binary search over integers.
``scripts/bench_policies.py`` measures the proactive deflector's ``decide``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from deflectlab.envs.chunking import largest_safe_chunk
from deflectlab.envs.config import check_number
from deflectlab.envs.handoff import handoff_estimate_s
from deflectlab.envs.view import ClusterView, Decision, DecodeNodeView, decode_load

if TYPE_CHECKING:
    from deflectlab.envs.profile import LatencyModel

_EPS_TOKENS = 1e-6
_MAX_EPOCHS = 3  # lanes finishing before a new one that the T_D estimate follows one by one


class StepModel:
    """A latency profile's step-time terms, unpacked once for fast evaluation in ``decide``.

    Mirrors :meth:`envs.profile.LatencyModel.step_s` term by term (checked in ``tests/test_policies.py``).
    """

    __slots__ = ("profile", "lin", "ov", "dattn", "dseq", "sq", "cross", "kvb", "bw", "xov")

    def __init__(self, profile: LatencyModel) -> None:
        self.profile = profile
        self.lin = profile.linear  # linear-operator time of a step of n tokens, seconds
        self.ov = profile.overhead_s
        self.dattn = profile.decode_attn_s_per_token
        self.dseq = profile.decode_attn_s_per_seq
        self.sq = profile.prefill_attn_sq_s
        self.cross = profile.prefill_attn_cross_s
        self.kvb = float(profile.kv_bytes_per_token)
        self.bw = float(profile.nic_bandwidth_Bps)
        self.xov = profile.kv_transfer_overhead_s

    def prompt_attn(self, L: int, budget: int) -> float:
        """Causal attention time of one ``L``-token prompt prefilled in chunks of ``budget``, seconds."""
        if L <= budget:
            return self.sq * L * L
        t = 0.0
        done = 0
        while done < L:
            c = min(budget, L - done)
            t += self.sq * c * c + self.cross * c * done
            done += c
        return t


_MODELS: dict[int, StepModel] = {}


def step_model(profile: LatencyModel) -> StepModel:
    """The cached :class:`StepModel` of ``profile``."""
    m = _MODELS.get(id(profile))
    if m is None or m.profile is not profile:
        m = _MODELS[id(profile)] = StepModel(profile)
    return m


def lane_worst(m: StepModel, tokens: float, L: int) -> float:
    """Worst attention time, seconds, of one step's chunk of an ``L``-token prompt holding at most ``tokens``.

    A chunk of ``t`` tokens comes after at most ``L - t`` earlier tokens of its prompt; ``sq t^2 + cross t (L -
    t)`` is largest at ``t = tokens`` when ``cross <= 2 sq`` (every bundled profile), else at the vertex.
    """
    t = float(tokens)
    if m.cross > 2.0 * m.sq:
        vertex = m.cross * L / (2.0 * (m.cross - m.sq))
        if vertex < t:
            t = vertex
    return m.sq * t * t + m.cross * t * (L - t)


class Lane:
    """One deflected prompt prefilling on a decode node, as the policy models it.

    :param cap: its chunk cap, tokens.
    :param L: its prompt length, tokens.
    :param rem: prompt tokens still to prefill (a fluid estimate), tokens.
    """

    __slots__ = ("cap", "L", "rem")

    def __init__(self, cap: float, L: int, rem: float) -> None:
        self.cap = cap
        self.L = L
        self.rem = rem


class NodeLanes:
    """The lanes the policy placed on one decode node, FCFS, advanced between decisions (``sharing="bounded"``)."""

    __slots__ = ("lanes", "t_last")

    def __init__(self) -> None:
        self.lanes: list[Lane] = []
        self.t_last = 0.0

    def sync(self, now: float, d: DecodeNodeView) -> list[Lane]:
        """Advance the lanes to ``now`` and reconcile them with what the view says, returning them.

        The fluid model runs the node's FCFS fill at its current step time since the last decision. Then the
        lanes are trimmed to the view's count of deflected prompts still prefilling (those with the fewest
        tokens left dropped first) and their tokens left scaled to the view's total. Prompts the policy did not
        place (more in the view than recorded) become lanes at the front, sharing the unexplained tokens, with
        the whole budget as cap.
        """
        lanes = self.lanes
        n_view = d.deflected_waiting_requests
        if n_view == 0:
            lanes.clear()
            self.t_last = now
            return lanes
        budget = d.max_batched_tokens - d.batch_size
        step_s = d.step_s
        if lanes and step_s > 0.0:
            _advance(lanes, (now - self.t_last) / step_s, budget)
        self.t_last = now
        if len(lanes) > n_view:
            keep = sorted(range(len(lanes)), key=lambda i: lanes[i].rem)[len(lanes) - n_view:]
            lanes[:] = [lanes[i] for i in sorted(keep)]
        q_view = float(d.deflected_waiting_tokens)
        tracked = sum(ln.rem for ln in lanes)
        if len(lanes) < n_view:
            u = n_view - len(lanes)
            extra = max(q_view - tracked, float(u))
            lanes[:0] = [Lane(float(budget), int(2 * extra / u) + 1, extra / u) for _ in range(u)]
        elif tracked > 0.0 and q_view > 0.0:
            f = q_view / tracked
            for ln in lanes:
                x = ln.rem * f
                cap = float(ln.L)
                ln.rem = cap if cap < x else x  # min(x, cap), without the call
        return lanes


def _advance(lanes: list[Lane], steps: float, budget: float) -> None:
    """Run the fluid FCFS fill of ``budget`` chunk tokens per step over ``lanes`` for ``steps`` steps (in place),
    dropping the lanes that finish: epoch by epoch, each as long as the first lane to finish in it takes.

    Each lane gets ``min(cap, tokens left, what the lanes ahead left of the budget)`` tokens a step, computed in the
    loop that finds the epoch's length; the list is rebuilt only when a lane is left with no tokens.
    """
    while steps > 1e-9 and lanes:
        alloc = []
        left = budget
        k = steps
        for ln in lanes:
            r = ln.rem
            x = ln.cap if ln.cap < r else r
            if x > left:
                x = left
            if x < 0.0:
                x = 0.0
            alloc.append(x)
            left -= x
            if x > 0.0 and r / x < k:
                k = r / x
        if k <= 0.0:
            break
        done = False
        for ln, a in zip(lanes, alloc):
            ln.rem -= a * k
            if not ln.rem > _EPS_TOKENS:
                done = True
        if done:
            lanes[:] = [ln for ln in lanes if ln.rem > _EPS_TOKENS]
        steps -= k


def _worst_step(m: StepModel, base: float, B: int, L: int, budget: int,
                items: list[tuple[float, float, float, int]]) -> Callable[[int], float]:
    """:meth:`PathEstimator.bounded_chunk`'s bound on the worst step, seconds, as a function of the new lane's chunk
    cap ``c``: ``budget`` chunk tokens filled with the lanes ``items`` (``(cost per token, tokens, cost, prompt
    length)``) and the new one, the costliest per token first, next to decodes costing ``base`` seconds."""
    sq, cross, lin = m.sq, m.cross, m.lin
    simple = cross <= 2.0 * sq
    items.sort(reverse=True)
    n = len(items)
    tok_cum = [0.0]  # prefix sums of the sorted lanes' tokens and costs
    cost_cum = [0.0]
    negk = []
    tok_sum = cost_sum = 0.0
    for k, tok, cost, _ in items:
        tok_sum += tok
        cost_sum += cost
        tok_cum.append(tok_sum)
        cost_cum.append(cost_sum)
        negk.append(-k)

    def partial(i: int, t: float) -> float:  # lane i's cost bound with only t tokens in the step
        v = sq * t * t + cross * t * items[i][3]
        return v if v < items[i][2] else items[i][2]

    def worst(c: int) -> float:
        cost_new = sq * c * c + cross * c * (L - c) if simple else lane_worst(m, c, L)
        k_new = cost_new / c
        pos = bisect_right(negk, -k_new)  # items [0, pos) cost at least as much per token as the new lane
        if tok_cum[pos] >= budget:  # the new lane is not even in the worst step
            j = bisect_right(tok_cum, budget) - 1
            attn = cost_cum[j] + (partial(j, budget - tok_cum[j]) if j < n and tok_cum[j] < budget else 0.0)
            return base + lin(B + budget) + attn
        rem = budget - tok_cum[pos]
        if c >= rem:
            v = sq * rem * rem + cross * rem * L
            return base + lin(B + budget) + cost_cum[pos] + (v if v < cost_new else cost_new)
        rem -= c
        j = bisect_right(tok_cum, tok_cum[pos] + rem, pos) - 1
        attn = cost_cum[pos] + cost_new + cost_cum[j] - cost_cum[pos]
        filled = c + tok_cum[j]
        if j < n and filled < budget:
            attn += partial(j, budget - filled)
            filled = budget
        return base + lin(B + filled) + attn

    return worst


def _worst_step_alone(m: StepModel, base: float, B: int, L: int, budget: int) -> Callable[[int], float]:
    """:func:`_worst_step` with no lane in the step (the common case of a node without deflected prefills): the
    same floats without the empty prefix sums. A chunk is at most ``budget``, so it fills the step only at ``c ==
    budget``, where the bound is the lesser of the partial-lane form and its cost; the ``+ 0.0`` of the empty sums
    and the ``c + 0.0`` tokens filled change no float."""
    sq, cross, lin = m.sq, m.cross, m.lin
    simple = cross <= 2.0 * sq

    def worst(c: int) -> float:
        cost_new = sq * c * c + cross * c * (L - c) if simple else lane_worst(m, c, L)
        if c >= budget:
            rem = float(budget)
            v = sq * rem * rem + cross * rem * L
            return base + lin(B + budget) + (v if v < cost_new else cost_new)
        return base + lin(B + c) + cost_new

    return worst


class PathEstimator:
    """The per-path estimates of the module docstring, with the state they keep between decisions.

    :param tbt_safety: chunk caps keep the estimated step time under ``tbt_safety x tbt_slo_s``; below 1 leaves
        headroom for decodes that join while the chunks run. Dimensionless, in (0, 1].
    :param sharing: how deflected prefills share a decode node's steps: ``"bounded"`` (default), ``"serial"``
        or ``"queue"`` (docs/design.md's formula literally; breaks the TBT SLO under load).
    :param min_chunk: no deflection to a node whose SLO-safe chunk is below this (unless the whole prompt is
        smaller), tokens.
    :param max_chunk: upper bound on the chunk cap, tokens (``None``: no bound but the node's budget).
    :param output_allowance_tokens: KV room kept for the unknown output beyond the prompt, tokens.
    :param what: how errors name the owner (``"policy 'proactive'"``).
    """

    SHARING = ("bounded", "serial", "queue")

    def __init__(self, tbt_safety: float = 1.0, sharing: str = "bounded", min_chunk: int = 512,
                 max_chunk: int | None = None, output_allowance_tokens: int = 256, what: str = "path estimator"
                 ) -> None:
        check_number(tbt_safety, "tbt_safety", lo=0.0, hi=1.0, lo_open=True, what=what)
        if sharing not in self.SHARING:
            raise ValueError(f"{what}: sharing must be one of {', '.join(self.SHARING)}, got {sharing!r}")
        check_number(min_chunk, "min_chunk", lo=1, integer=True, unit="tokens", what=what)
        if max_chunk is not None:
            check_number(max_chunk, "max_chunk", lo=1, integer=True, unit="tokens", what=what)
        check_number(output_allowance_tokens, "output_allowance_tokens", lo=0, integer=True, unit="tokens",
                     what=what)
        self.tbt_safety = float(tbt_safety)
        self.sharing = sharing
        self.min_chunk = int(min_chunk)
        self.max_chunk = None if max_chunk is None else int(max_chunk)
        self.output_allowance_tokens = int(output_allowance_tokens)
        self.reset_estimates()

    def reset_estimates(self) -> None:
        """Forget the prompts seen and the lanes placed (a new run)."""
        self._nodes: list[NodeLanes] = []  # per decode node (sharing="bounded")
        self._n_seen = 0  # prompts seen, and their lengths' first two moments (tokens, tokens^2)
        self._sum_l = 0.0
        self._sum_l2 = 0.0

    def estimator_params(self) -> dict[str, Any]:
        return {"tbt_safety": self.tbt_safety, "sharing": self.sharing, "min_chunk": self.min_chunk,
                "max_chunk": self.max_chunk, "output_allowance_tokens": self.output_allowance_tokens}

    # -- the prefill path ----------------------------------------------------------------------------------
    @staticmethod
    def prefill_ttft(m: StepModel, now: float, busy_until_s: float, W: int, nw: int, budget: int, L: int,
                     egress_bytes: float, dispersion: float = 1.0, handoff_s: float | None = None) -> float:
        """``wait_p + prefill(L) + handoff(L)``, seconds, on a prefill node with ``W`` tokens of ``nw`` prompts
        waiting (the running step's included) and a step budget of ``budget`` tokens.

        :param L: the prompt tokens to prefill (a cached prefix subtracted).
        :param dispersion: ``E[L^2] / E[L]^2`` of prompt lengths, for the queued prompts' attention.
        :param handoff_s: the hand-off estimate (:func:`envs.handoff.handoff_estimate_s`, queued egress
            included); None: the profile's transfer terms for ``L`` tokens and ``egress_bytes``.
        """
        r = busy_until_s - now
        if r > 0.0:
            running = W if W < budget else budget  # the running step's tokens are counted in W
        else:
            r = 0.0
            running = 0
        Wq = W - running
        X = Wq + L
        full = (X - 1) // budget  # full steps before the one that finishes this prompt
        t = r + (full + 1) * m.ov + full * m.lin(budget) + m.lin(X - full * budget)
        if Wq > 0 and nw > 0:
            t += m.sq * Wq * (W / nw) * dispersion  # queued prompts' attention: their number x E[L^2]
        t += m.prompt_attn(L, budget)
        if handoff_s is not None:
            return t + handoff_s
        return t + m.xov + (L * m.kvb + egress_bytes) / m.bw

    # -- the deflect path, docs/design.md's formula ("queue", "serial") ------------------------------------------
    def slo_chunk(self, m: StepModel, B: int, C: int, L: int, budget: int, tau: float) -> int:
        """Largest chunk ``c`` (tokens) whose worst step keeps ``B`` decodes over ``C`` context within ``tau``
        (:func:`envs.chunking.largest_safe_chunk`), at most ``budget`` (the node's token budget after its
        decodes), ``L`` and ``max_chunk``, at least ``min_chunk``; 0 when none fits."""
        hi = budget if budget < L else L
        if self.max_chunk is not None and self.max_chunk < hi:
            hi = self.max_chunk
        lo = self.min_chunk if self.min_chunk < L else L
        return largest_safe_chunk(m.profile, B, C, L, lo, hi, tau)

    @staticmethod
    def queue_ttft(m: StepModel, B: int, C: int, step_s: float, Q: int, nq: int, L: int, c: int) -> float:
        """``T_D = step_s / 2 + ceil((Q + L) / c) x step(B, C, c)``, seconds (docs/design.md).

        ``Q`` deflected tokens of ``nq`` prompts are ahead of this ``L``-token prompt, all at ``c`` tokens per
        step. The step time counts the decode context growing by ``B`` per step, this prompt's chunks'
        attention against its earlier chunks exactly, and the queue's at its mean prompt length.
        """
        n = -(-(Q + L) // c)
        per_step = m.ov + m.dattn * C + m.dseq * B + m.lin(B + c) + m.sq * c * c
        t = 0.5 * step_s + n * per_step + m.dattn * B * n * (n - 1) * 0.5
        nl = -(-L // c)
        t += m.cross * (c * c * (nl - 1) * (nl - 2) * 0.5 + (L - (nl - 1) * c) * (nl - 1) * c)
        if Q > 0 and nq > 0:
            mq = Q / nq  # the queue's mean remaining prompt length, taken as its chunks' mean prior context
            if mq > c:
                t += m.cross * Q * (mq - c) * 0.5
        return t

    # -- the deflect path, "bounded" ------------------------------------------------------------------------
    def bounded_chunk(self, m: StepModel, B: int, C: int, L: int, budget: int, tau: float,
                      lanes: list[Lane]) -> int:
        """Largest chunk cap ``c`` (tokens) for an ``L``-token prompt such that any step the node can form from
        its ``lanes`` plus this prompt stays within ``tau``, next to ``B`` decodes over ``C`` context.

        A step holds at most ``budget`` chunk tokens; a lane gives at most ``min(cap, tokens left)`` of them at
        its worst attention cost (:func:`lane_worst`). The worst step is bounded by filling the budget with
        the costliest lanes per token first, a partial last lane at ``sq t^2 + cross t L``. Returns 0 when even
        the smallest allowed chunk breaks ``tau``. The search stops within 1/64 of the largest cap (below it).
        """
        hi = L if L < budget else budget  # a chunk never exceeds what the step's budget leaves
        if self.max_chunk is not None and self.max_chunk < hi:
            hi = self.max_chunk
        lo = self.min_chunk if self.min_chunk < L else L
        if hi < lo or budget < 1:
            return 0
        sq, cross = m.sq, m.cross
        simple = cross <= 2.0 * sq  # then a lane's worst chunk is its largest (see lane_worst)
        base = m.ov + m.dattn * C + m.dseq * B
        # the lanes that give the step tokens, as (cost per token, tokens, cost, prompt length)
        items = []
        for ln in lanes:
            tok = ln.cap if ln.cap < ln.rem else ln.rem
            if tok > 0.0:
                cost = sq * tok * tok + cross * tok * (ln.L - tok) if simple else lane_worst(m, tok, ln.L)
                items.append((cost / tok, tok, cost, ln.L))
        worst = _worst_step(m, base, B, L, budget, items) if items else _worst_step_alone(m, base, B, L, budget)
        if worst(hi) <= tau:
            return hi
        if worst(lo) > tau:
            return 0
        while hi - lo > 1 + (lo >> 6):  # invariant: worst(lo) <= tau < worst(hi); 1/64 precision is plenty
            mid = (lo + hi) >> 1
            if worst(mid) <= tau:
                lo = mid
            else:
                hi = mid
        return lo

    @staticmethod
    def bounded_ttft(m: StepModel, B: int, C: int, step_s: float, L: int, c: int, budget: int,
                     lanes: list[Lane]) -> float:
        """``T_D``, seconds: the fluid FCFS fill of ``budget`` chunk tokens per step run forward with a new
        lane (cap ``c``, ``L`` tokens) behind ``lanes``, until the new lane's last token.

        In each epoch every lane gets a fixed number of tokens per step; the epoch ends when a lane finishes.
        Its steps cost the profile's time for ``B`` decodes (context growing by ``B`` per step) and the chunks,
        each at its lane's mean prior context over the epoch. The count of steps is rounded up. After
        ``_MAX_EPOCHS`` epochs (a cap that keeps ``decide`` within its time budget when a node holds many lanes)
        the rest is taken in aggregate: the lanes ahead drain their tokens at up to the budget per step while
        this one gets what they leave, then its cap.
        """
        # FCFS lanes still prefilling, as [cap, tokens left, prompt length]; the new lane is the last
        live = [[ln.cap, ln.rem, ln.L] for ln in lanes if ln.rem > _EPS_TOKENS]
        own = [float(c), float(L), L]
        live.append(own)
        base = m.ov + m.dattn * C + m.dseq * B
        growth = m.dattn * B
        sq, cross, lin = m.sq, m.cross, m.lin
        t = 0.5 * step_s
        steps = 0.0
        for _ in range(_MAX_EPOCHS):
            # one epoch: the FCFS fill of the budget; only the lanes it reaches get tokens
            left = float(budget)
            k = math.inf
            active = []
            for lane in live:
                if left <= 0.0:
                    break
                cap, r = lane[0], lane[1]
                a = cap if cap < r else r
                if a > left:
                    a = left
                left -= a
                active.append((lane, a))
                if r / a < k:
                    k = r / a
            if not active:
                return math.inf
            tot = attn = 0.0
            a_own = 0.0
            for lane, a in active:
                tot += a
                attn += sq * a * a + cross * a * (lane[2] - lane[1] + 0.5 * a * k)
                if lane is own:
                    a_own = a
            step = base + growth * (steps + 0.5 * k) + lin(B + tot) + attn
            if a_own > 0.0 and own[1] / a_own <= k + 1e-12:
                whole = math.ceil(steps + own[1] / a_own - 1e-9) - steps  # the first token ends a step
                return t + whole * step
            t += k * step
            steps += k
            done = False
            for lane, a in active:
                lane[1] -= a * k
                if lane[1] <= _EPS_TOKENS:
                    done = True
            if done:
                live = [lane for lane in live if lane[1] > _EPS_TOKENS]
        # many lanes ahead: the rest in aggregate, the lanes ahead draining at up to the budget per step and
        # this one getting what they leave, then its cap
        ahead = [lane for lane in live if lane is not own]
        A = min(float(budget), sum(lane[0] for lane in ahead))
        Q = sum(lane[1] for lane in ahead)
        g = min(own[0], budget - A)
        k1 = Q / A if A > 0.0 else 0.0
        if g > 0.0 and g * k1 >= own[1]:
            k1 = own[1] / g
            k2 = 0.0
        else:
            k2 = (own[1] - g * k1) / own[0]
        a_attn = sum(sq * min(lane[0], budget) ** 2 + cross * min(lane[0], budget) * (lane[2] - lane[1])
                     for lane in ahead[:4])  # the lanes the fill reaches first
        step1 = base + growth * (steps + 0.5 * k1) + lin(B + A + g) + a_attn + sq * g * g
        step2 = base + growth * (steps + k1 + 0.5 * k2) + lin(B + own[0]) + sq * own[0] ** 2
        steps_left = math.ceil(steps + k1 + k2 - 1e-9) - steps
        return t + k1 * step1 + max(steps_left - k1, 0.0) * step2 + cross * own[0] * (L - own[0]) * 0.5


    # -- per node ------------------------------------------------------------------------------------------
    def observe(self, L: int) -> float:
        """Count the prompt; the prompt-length dispersion E[L^2]/E[L]^2 so far (1 until there are a few)."""
        self._n_seen += 1
        self._sum_l += L
        self._sum_l2 += L * L
        n_seen = self._n_seen
        return self._sum_l2 * n_seen / (self._sum_l * self._sum_l) if n_seen >= 16 else 1.0

    @staticmethod
    def first_step(dstar: DecodeNodeView, L: int) -> float:
        """The first decode step of a prefilled request on ``dstar`` (the node the balancer would pick): half the
        running step, then a step with the request joined (at least the running one), seconds."""
        md = step_model(dstar.profile)
        B1 = dstar.batch_size + 1
        join = md.ov + md.lin(B1) + md.dattn * (dstar.context_tokens + L) + md.dseq * B1
        return 0.5 * dstar.step_s + (join if join > dstar.step_s else dstar.step_s)

    def prefill_estimates(self, view: ClusterView, L: int, dispersion: float, d_cached: int = 0) -> list[float]:
        """Each prefill node's estimated TTFT before the first decode step, seconds: the node prefills what it does
        not hold cached, and the hand-off (the cluster's preset) moves what the decode node (``d_cached`` tokens
        held) lacks."""
        out = []
        now = view.now_s
        for p in view.prefill:
            ho = handoff_estimate_s(view.handoff, p.profile, L - d_cached, p.egress_bytes)
            out.append(self.prefill_ttft(step_model(p.profile), now, p.busy_until_s, p.waiting_tokens,
                                         p.waiting_requests, p.max_batched_tokens, L - p.cached_tokens,
                                         p.egress_bytes, dispersion, ho))
        return out

    def deflect_estimates(self, view: ClusterView, L: int) -> list[tuple[int, float]]:
        """Each decode node's ``(chunk cap, estimated deflected TTFT)`` (tokens, seconds); ``(0, inf)`` for a node
        without KV room for the prompt and its output allowance, sequence slots or a TBT-safe chunk. With
        ``sharing="bounded"`` the node's lanes are advanced to now first."""
        decode = view.decode
        tau = view.tbt_slo_s * self.tbt_safety
        need_kv = L + self.output_allowance_tokens
        bounded = self.sharing == "bounded"
        nodes = self._nodes
        while bounded and len(nodes) < len(decode):
            nodes.append(NodeLanes())
        out = []
        for d in decode:
            lanes = nodes[d.index].sync(view.now_s, d) if bounded else None
            if d.kv_free_tokens < need_kv or decode_load(d) >= d.max_num_seqs:
                out.append((0, math.inf))
                continue
            c, t = self.deflect_estimate(d, L - d.cached_tokens, tau, lanes)  # a cached prefix is not prefilled
            out.append((c, t) if c > 0 else (0, math.inf))
        return out

    def add_lane(self, d: int, cap: int, L: int, todo: int) -> Lane | None:
        """Record a deflection of an ``L``-token prompt to decode node ``d`` with chunk cap ``cap``, ``todo`` of its
        tokens to prefill there (a cached prefix is not); only ``sharing="bounded"`` keeps lanes. Returns the
        lane (None without lanes)."""
        if self.sharing != "bounded":
            return None
        ln = Lane(float(cap), L, float(todo))
        self._nodes[d].lanes.append(ln)
        return ln

    def retrack(self, mine: tuple[int, Lane | None] | None, decision: Decision, L: int,
                todo: Callable[[int], int]) -> tuple[int, Lane | None] | None:
        """Replace the deflection ``mine`` (``(node, lane)`` as :meth:`add_lane` recorded it; None: none) with the
        one ``decision`` makes of an ``L``-token prompt, ``todo(d)`` of its tokens to prefill on node ``d``: where
        another policy decided than the one that recorded ``mine``. Returns what is tracked now, for a next call."""
        if mine is not None and mine[1] is not None:
            self.drop_lane(*mine)
        if decision.deflected and decision.chunk_cap:
            d = decision.decode_node
            return d, self.add_lane(d, decision.chunk_cap, L, todo(d))
        return None

    def drop_lane(self, d: int, lane: Lane) -> None:
        """Forget a lane :meth:`add_lane` recorded on decode node ``d`` (the deflection was not taken)."""
        lanes = self._nodes[d].lanes
        for i, ln in enumerate(lanes):
            if ln is lane:
                del lanes[i]
                return

    def deflect_estimate(self, d: DecodeNodeView, L: int, tau: float, lanes: list[Lane] | None
                          ) -> tuple[int, float]:
        """Chunk cap and TTFT estimate of deflecting ``L`` tokens to ``d`` (cap 0: no TBT-safe chunk)."""
        m = step_model(d.profile)
        B, C = d.batch_size, d.context_tokens
        budget = d.max_batched_tokens - B
        if lanes is not None:
            # the batch the chunks will meet: the running decodes and those bound to join while they run
            # (KV pulls in flight; deflected prompts, which decode here once prefilled)
            joins = d.inbound_handoffs + d.deflected_waiting_requests
            c = self.bounded_chunk(m, B + joins, C + joins * L, L, budget - joins, tau, lanes)
            return (c, self.bounded_ttft(m, B, C, d.step_s, L, c, budget, lanes)) if c > 0 else (0, math.inf)
        if self.sharing == "serial" and d.deflected_waiting_requests:
            return 0, math.inf
        c = self.slo_chunk(m, B, C, L, budget, tau)
        if c <= 0:
            return 0, math.inf
        return c, self.queue_ttft(m, B, C, d.step_s, d.deflected_waiting_tokens, d.deflected_waiting_requests, L, c)

