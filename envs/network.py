"""KV hand-off network: concurrent transfers share each node's NIC max-min fairly, each under its own cap.

Every transfer is a flow from one prefill node's egress to one decode node's ingress. Two separate terms
bound its rate: the per-transfer rate ``flow_cap_bps`` (what one read achieves alone: descriptor posting,
one queue pair) and each NIC's link capacity (``egress_bps``/``ingress_bps``), which the concurrent flows
of that NIC share. Whenever a flow starts or ends the rates are recomputed by progressive filling (max-min
fair share, a flow's own cap acting as a private link), and the next completion is scheduled. The
per-transfer set-up is a fixed delay the simulator adds before a flow starts; it does not occupy the NIC.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from operator import attrgetter, truediv
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deflectlab.envs.request import Request

_RATES_MAX = 4096  # sets of flows whose rates Network keeps at most
_ENDS = attrgetter("src", "dst")
_RATE = attrgetter("rate")
_REMAINING = attrgetter("remaining")
_EPS_BYTES = 1e-3  # a flow with less than a thousandth of a byte left is done (float round-off)


class Flow:
    __slots__ = ("req", "src", "dst", "remaining", "rate", "t_start")

    def __init__(self, req: Request, src: int, dst: int, nbytes: float, t: float) -> None:
        self.req = req
        self.src = src
        self.dst = dst
        self.remaining = nbytes
        self.rate = 0.0
        self.t_start = t


class Network:
    """Max-min fair sharing of P egress and D ingress bandwidth, bytes per second.

    :param egress_bps: NIC link capacity of each prefill node, bytes/s.
    :param ingress_bps: NIC link capacity of each decode node, bytes/s.
    :param schedule: ``schedule(t, fn, arg)`` of the event loop.
    :param on_done: called as ``on_done(flow, t)`` when a flow's last byte arrives.
    """

    def __init__(
        self,
        egress_bps: list[float],
        ingress_bps: list[float],
        schedule: Callable[[float, Callable, object], None],
        on_done: Callable[[Flow, float], None],
        flow_cap_bps: float = float("inf"),
    ) -> None:
        """:param flow_cap_bps: the most one transfer moves per second, bytes/s (``inf``: links only)."""
        self.flow_cap_bps = flow_cap_bps
        self.egress_bps = egress_bps
        self.ingress_bps = ingress_bps
        # the slowest link (the link lists are fixed once the network is made): see _reschedule's fast path
        self._min_link_bps = min(min(egress_bps, default=math.inf), min(ingress_bps, default=math.inf))
        # Progressive filling's rates by the flows' (source, destination) pairs in order: a pure function of them
        # (the links and the cap are fixed), so a set of transfers seen before takes its rates from here, the same
        # floats (shared by state copies: see ClusterSim.copy_state)
        self._rates: dict[tuple[tuple[int, int], ...], tuple[float, ...]] = {}
        self.flows: list[Flow] = []
        self._schedule = schedule
        self._on_done = on_done
        self._t = 0.0
        self._version = 0

    def start(self, req: Request, src: int, dst: int, nbytes: float, t: float) -> None:
        self._advance(t)
        self.flows.append(Flow(req, src, dst, nbytes, t))
        self._reschedule(t)

    def bytes_remaining(self, t: float, src: int | None = None, dst: int | None = None) -> float:
        """Bytes still to move at time ``t``, over all flows or those of one source or destination."""
        dt = t - self._t
        total = 0.0
        for f in self.flows:
            if (src is None or f.src == src) and (dst is None or f.dst == dst):
                total += max(f.remaining - f.rate * dt, 0.0)
        return total

    def _advance(self, t: float) -> None:
        dt = t - self._t
        if dt > 0:
            for f in self.flows:
                f.remaining -= f.rate * dt
        self._t = t

    def _reschedule(self, t: float) -> None:
        flows = self.flows
        self._version += 1
        if not flows:
            return
        if len(flows) == 1:  # the common case: one transfer at the smallest of its caps
            f = flows[0]
            rate = self.flow_cap_bps
            if self.egress_bps[f.src] < rate:
                rate = self.egress_bps[f.src]
            if self.ingress_bps[f.dst] < rate:
                rate = self.ingress_bps[f.dst]
            f.rate = rate
            rem = f.remaining
            t_next = t + (rem if rem > 0.0 else 0.0) / rate
        else:
            cap = self.flow_cap_bps
            if self._min_link_bps / len(flows) > cap:
                # Even if every flow crossed the slowest link, its fair share would exceed the per-transfer cap, so
                # progressive filling fixes every flow at the cap in its first round (_max_min_rates): the same
                # rates, without building the per-link lists (the usual case: flow_cap < link / 2, two flows)
                for f in flows:
                    f.rate = cap
            else:
                key = tuple(map(_ENDS, flows))  # the rates depend on the flows' links, in order, alone
                rates = self._rates.get(key)
                if rates is None:
                    self._max_min_rates()
                    if len(self._rates) < _RATES_MAX:
                        self._rates[key] = tuple(map(_RATE, flows))
                else:
                    for f, r in zip(flows, rates):
                        f.rate = r
            # the earliest completion, min over flows of t + max(remaining, 0) / rate: adding t and clamping at 0
            # are monotone in floating point, so they may go outside the min (the same float, no per-flow bytecode)
            first = min(map(truediv, map(_REMAINING, flows), map(_RATE, flows)))
            t_next = t + (first if first > 0.0 else 0.0)
        self._schedule(t_next, self._on_event, self._version)

    def _max_min_rates(self) -> None:
        """Progressive filling: repeatedly saturate the link with the smallest fair share.

        Links are P egress ``0..P-1`` and D ingress ``P..P+D-1``; per-link capacity left and unfixed-flow counts
        make each round O(links), so a burst of concurrent transfers stays cheap. Each round first fixes, at
        the per-transfer cap, every flow whose cap is below the smallest link share: the water level reaches
        the cap before any link fills, and fixing them only raises the other shares.
        """
        n_src = len(self.egress_bps)
        cap = self.egress_bps + self.ingress_bps  # a new list: capacity left per link
        cnt = [0] * len(cap)
        on_link: list[list[Flow]] = [[] for _ in cap]
        for f in self.flows:
            d = n_src + f.dst
            cnt[f.src] += 1
            cnt[d] += 1
            on_link[f.src].append(f)
            on_link[d].append(f)
            f.rate = -1.0  # unfixed
        left = len(self.flows)
        flow_cap = self.flow_cap_bps
        while left:
            best, best_share = -1, float("inf")
            for link, c in enumerate(cnt):
                if c and cap[link] / c < best_share:
                    best, best_share = link, cap[link] / c
            if flow_cap < best_share:  # every unfixed flow stops at its own cap first
                fixing = [f for f in self.flows if f.rate < 0.0]
                best_share = flow_cap
            else:
                fixing = on_link[best]
            for f in fixing:
                if f.rate < 0.0:
                    f.rate = best_share
                    left -= 1
                    d = n_src + f.dst
                    cap[f.src] -= best_share
                    cap[d] -= best_share
                    cnt[f.src] -= 1
                    cnt[d] -= 1

    def _on_event(self, t: float, version: object) -> None:
        if version != self._version:
            return  # superseded by a later start or finish
        self._advance(t)
        if len(self.flows) == 1:  # the common case: one transfer, and it is done
            done, self.flows = self.flows, []
        else:
            done = [f for f in self.flows if f.remaining <= _EPS_BYTES + 1e-12 * f.rate]
            if not done:  # float round-off left a sliver: finish the closest flow
                done = [min(self.flows, key=lambda f: f.remaining / f.rate)]
            self.flows = [f for f in self.flows if f not in done]
        self._reschedule(t)
        for f in done:
            self._on_done(f, t)
