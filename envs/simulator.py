"""The event loop of the xPyD cluster model.

A heap of ``(time, seq, handler, arg)``; each handler may schedule more. Arrivals are not pushed on the heap:
they come from the workload's sorted arrays and are merged with the heap, and each one stops the loop for a
routing decision. :meth:`ClusterSim.advance` runs to the next arrival and returns it; :meth:`ClusterSim.route`
applies a :class:`~deflectlab.envs.view.Decision`; :meth:`ClusterSim.run` does both with a policy until the end.
The Gymnasium environment calls ``advance``/``route`` itself, one decision per ``step()``.

Why not SimPy: it is the user's preferred engine, but on this kind of machine a SimPy queue ran 640k events/s
against 1.6M for a plain ``heapq`` loop, and stopping at every arrival for an outside decision (as every
routing step needs) 72k decisions/s against 500k (measured for docs/design.md; ``scripts/bench_simulator.py``
re-measures the SimPy side on an M/D/1 prefill queue). The 50,000 requests/s goal leaves about 20 us per
request for everything, so the hot loop is plain Python over a heap.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right
from collections.abc import Callable
from heapq import heappop, heappush
from typing import TYPE_CHECKING

import numpy as np

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.decode_node import DecodeNode
from deflectlab.envs.handoff import parse_handoff
from deflectlab.envs.network import Flow, Network
from deflectlab.envs.prefill_node import PrefillNode
from deflectlab.envs.profile import LatencyModel, load_profile
from deflectlab.envs.request import Request
from deflectlab.envs.view import DEFLECT, ClusterView, Decision, DecodeNodeView, Policy, PrefillNodeView

if TYPE_CHECKING:
    from deflectlab.envs.metrics import RunResult
    from deflectlab.envs.workloads import Workload

RATE_TAU_S = 10.0  # time constant of the arrival-rate estimate in the view, seconds


class DecisionError(ValueError):
    """A policy returned a decision the cluster cannot carry out (bad node index, no prefill nodes, ...)."""


def full_blocks(input_tokens: list[int], hashes: list[list[int]], block_tokens: int) -> list[int]:
    """Each prompt's full blocks with a hash (``Request.n_full``; a hash list shorter than the prompt's full blocks:
    as many as it names), for every arrival at once in array operations, not a few bytecodes per arrival in
    :meth:`ClusterSim.advance` (nor a ``min`` call per arrival, whose argument parsing costs more)."""
    lengths = np.fromiter(map(len, hashes), np.int64, len(hashes))
    return np.minimum(np.asarray(input_tokens, np.int64) // block_tokens, lengths).tolist()


class ClusterSim:
    """Discrete-event model of one xPyD cluster replaying one workload.

    :param config: cluster shape, profiles, budgets and SLOs.
    :param workload: the requests to replay (arrival seconds, prompt and output tokens).
    :param prefill_profile: override the config's prefill profile with a loaded model.
    :param decode_profile: override the config's decode profile with a loaded model.
    """

    def __init__(
        self,
        config: ClusterConfig,
        workload: Workload,
        prefill_profile: LatencyModel | None = None,
        decode_profile: LatencyModel | None = None,
    ) -> None:
        self.config = config
        self.workload = workload
        self.prefill_profile = prefill_profile or load_profile(config.prefill_profile)
        self.decode_profile = decode_profile or load_profile(config.decode_profile)
        if self.prefill_profile.kv_bytes_per_token != self.decode_profile.kv_bytes_per_token:
            raise ValueError(
                f"prefill profile {self.prefill_profile.name} and decode profile {self.decode_profile.name} "
                "disagree on KV bytes per token: they must serve the same model")
        self.now = 0.0
        self.events = 0
        self._heap: list[tuple[float, int, Callable, object]] = []
        self._seq = 0
        self._arr_t = [float(x) for x in workload.arrival_s]
        self._arr_in = [int(x) for x in workload.input_tokens]
        self._arr_out = [int(x) for x in workload.output_tokens]
        self._next = 0
        self.requests: list[Request] = []
        self.finished = 0
        self.rejected = 0
        self.deflections = 0
        self._rate = 0.0
        self._rate_t = 0.0
        self._rr_decode = 0
        self.decision_s = 0.0  # wall time spent in policy.decide, seconds
        self._done_prefix = 0  # requests[:k] are finished or rejected (copy_state shares them)

        sched = self.schedule
        self.prefill = [
            PrefillNode(i, self.prefill_profile, config.prefill_max_batched_tokens, sched, self._prefilled)
            for i in range(config.num_prefill)
        ]
        self.decode = [
            DecodeNode(i, self.decode_profile, config.decode_max_batched_tokens, config.max_num_seqs, sched,
                       self._admitted, self._finished)
            for i in range(config.num_decode)
        ]
        # The hand-off's transport: per-transfer set-up and rate (the preset's, else the profiles'), per-NIC
        # link capacity shared max-min, the dispatch delay and whether reads wait for a decode step boundary.
        ho = self.handoff = parse_handoff(config.handoff)
        pp, dp = self.prefill_profile, self.decode_profile
        self._bw = ho.transfer_Bps or min(pp.nic_bandwidth_Bps, dp.nic_bandwidth_Bps)
        self.xfer_setup_s = pp.kv_transfer_overhead_s if ho.setup_s is None else ho.setup_s
        self._dispatch_s = ho.dispatch_s
        self._read_at_step = ho.read_at_step
        self.network = Network([ho.link_Bps] * config.num_prefill, [ho.link_Bps] * config.num_decode,
                               sched, self._transferred, flow_cap_bps=self._bw)
        self._num_prefill, self._num_decode = len(self.prefill), len(self.decode)
        self._kv_bytes = pp.kv_bytes_per_token
        self._hashes = self._enable_prefix_cache()

    def _enable_prefix_cache(self) -> list[list[int]] | None:
        """Prefix caching on every node when the config asks for it and the trace has block hashes; returns the
        per-request hashes (None: no lookups, the model without a cache)."""
        hashes = getattr(self.workload, "hash_ids", None)
        self._hash_block_tokens = 0
        self.prefix_cache = bool(self.config.prefix_cache and hashes is not None)
        if not self.prefix_cache:
            return None
        bt = self._hash_block_tokens = self.workload.hash_block_tokens
        for n in (*self.prefill, *self.decode):
            n.enable_prefix_cache(bt)
        self._n_full = full_blocks(self._arr_in, hashes, bt)
        return hashes

    # -- event loop ------------------------------------------------------------------------------------------
    def schedule(self, t: float, fn: Callable[[float, object], None], arg: object) -> None:
        self._seq += 1
        heappush(self._heap, (t, self._seq, fn, arg))

    def advance(self) -> Request | None:
        """Run events up to the next arrival and return that request, or ``None`` once everything is done."""
        heap = self._heap
        arr_t = self._arr_t
        n_arr = len(arr_t)
        i = self._next
        t_arr = arr_t[i] if i < n_arr else math.inf
        events = 0
        t = self.now
        while heap and heap[0][0] <= t_arr:
            t, _, fn, arg = heappop(heap)
            fn(t, arg)  # handlers get the time; nothing reads self.now while events run
            events += 1
        self.events += events
        if i >= n_arr:
            self.now = t
            return None
        self._next = i + 1
        self.now = t_arr
        req = Request(i, t_arr, self._arr_in[i], self._arr_out[i])
        if self._hashes is not None:
            req.hashes = self._hashes[i]
            req.n_full = self._n_full[i]
        self.requests.append(req)
        # exponentially weighted arrival rate, requests per second
        self._rate = self._rate * math.exp((self._rate_t - t_arr) / RATE_TAU_S) + 1.0 / RATE_TAU_S
        self._rate_t = t_arr
        return req

    def view(self) -> ClusterView:
        """The read-only cluster view a policy sees now (node lists built on first access)."""
        cfg = self.config
        return ClusterView(self.now, cfg.ttft_slo_s, cfg.tbt_slo_s, self._rate_now, builder=self._build_view,
                           num_prefill=self._num_prefill, num_decode=self._num_decode, handoff=self.handoff,
                           recent=self._recent_arrivals)

    def _recent_arrivals(self, window_s: float) -> tuple[int, int]:
        """Requests and prompt tokens that arrived in ``(now - window_s, now]`` (the view's arrival history)."""
        i = self._next
        lo = bisect_right(self._arr_t, self.now - window_s, 0, i)
        return i - lo, sum(self._arr_in[lo:i])

    def _rate_now(self) -> float:
        return self._rate * math.exp((self._rate_t - self.now) / RATE_TAU_S)

    def _build_view(self) -> tuple[list[PrefillNodeView], list[DecodeNodeView]]:
        now, net = self.now, self.network
        pv = [
            PrefillNodeView(
                index=p.index, profile=p.profile, max_batched_tokens=p.max_batched_tokens,
                waiting_requests=len(p.queue), waiting_tokens=p.waiting_tokens,
                busy_until_s=p.busy_until_s if p.busy else now,
                kv_free_tokens=p.kv_capacity_tokens - p.kv_used_tokens, held_handoffs=p.held_handoffs,
                egress_bytes=net.bytes_remaining(now, src=p.index) if net.flows else 0.0)
            for p in self.prefill
        ]
        dv = [
            DecodeNodeView(
                index=d.index, profile=d.profile, max_batched_tokens=d.max_batched_tokens,
                max_num_seqs=d.max_num_seqs, batch_size=d.batch_size, context_tokens=d.context_tokens(),
                kv_free_tokens=(d.total_blocks - d.kv_used_blocks(now)) * d.block_tokens,
                deflected_waiting_tokens=d.prefill_waiting_tokens,
                deflected_waiting_requests=len(d.prefilling), inbound_handoffs=d.inbound_handoffs,
                ingress_bytes=net.bytes_remaining(now, dst=d.index) if net.flows else 0.0,
                step_s=d.last_step_s, waiting_admission=len(d.admit_queue))
            for d in self.decode
        ]
        req = self.requests[-1] if self._hashes is not None and self.requests else None
        if req is not None and req.t_p_start < 0.0 and req.t_admit < 0.0:  # the arriving request, not yet routed
            for v, p in zip(pv, self.prefill):
                v.cached_tokens = p.cached_prefix_tokens(req.hashes, req.input_tokens)
            for v, d in zip(dv, self.decode):
                v.cached_tokens = d.cached_prefix_tokens(req.hashes, req.input_tokens, now)
        return pv, dv

    def route(self, req: Request, decision: Decision) -> None:
        """Carry out ``decision`` for the request :meth:`advance` returned."""
        t = self.now
        d = decision.decode_node
        if d is not None and not 0 <= d < len(self.decode):
            raise DecisionError(f"{decision}: decode node {d} out of range 0..{len(self.decode) - 1}")
        req.estimates = decision.estimates
        if decision.kind == DEFLECT:
            if d is None:
                raise DecisionError(f"{decision}: a deflection must name its decode node")
            node = self.decode[d]
            if not node.fits_ever(req):
                self._reject(req, f"prompt {req.input_tokens} tokens exceeds decode node {d}'s KV capacity "
                                  f"{node.kv_capacity_tokens}")
                return
            req.deflected = True
            req.d_node = d
            cap = decision.chunk_cap
            if cap is not None and cap < 1:
                raise DecisionError(f"{decision}: chunk cap must be >= 1 token")
            req.chunk_cap = cap or 0
            self.deflections += 1
            node.submit(req, t)
            return
        p = decision.prefill_node
        if p is None or not 0 <= p < len(self.prefill):
            raise DecisionError(f"{decision}: prefill node {p} out of range 0..{len(self.prefill) - 1}")
        pnode = self.prefill[p]
        if pnode.profile.blocks(req.input_tokens) * pnode.profile.kv_block_tokens > pnode.kv_capacity_tokens:
            self._reject(req, f"prompt {req.input_tokens} tokens exceeds prefill node {p}'s KV capacity")
            return
        if not (self.decode[d].fits_ever(req) if d is not None else self._fits_all_decode(req)):
            self._reject(req, f"prompt {req.input_tokens} tokens exceeds a decode node's KV capacity")
            return
        req.p_node = p
        req.d_node = -1 if d is None else d
        pnode.enqueue(req, t)

    def _fits_all_decode(self, req: Request) -> bool:
        for n in self.decode:
            if not n.fits_ever(req):
                return False
        return True

    def _reject(self, req: Request, reason: str) -> None:
        req.reject_reason = reason
        self.rejected += 1

    # -- hand-off --------------------------------------------------------------------------------------------
    def _prefilled(self, req: Request, t: float) -> None:
        """Prefill done: P's response and the router's second hop take ``dispatch_s``."""
        if self._dispatch_s > 0.0:
            self.schedule(t + self._dispatch_s, self._dispatched, req)
        else:
            self._dispatched(t, req)

    def _dispatched(self, t: float, req: Request) -> None:
        """The request reaches its decode node, which allocates the prompt's blocks (or queues it)."""
        req.t_dispatch = t
        d = req.d_node
        if d < 0:
            d = req.d_node = self._balance()
        self.decode[d].submit(req, t)

    def _balance(self) -> int:
        if self.config.decode_balancer == "round_robin":
            d = self._rr_decode
            self._rr_decode = (d + 1) % len(self.decode)
            return d
        best, best_load = 0, 1 << 62
        for d in self.decode:
            load = d.admitted + len(d.admit_queue)
            if load < best_load:
                best, best_load = d.index, load
        return best

    def _admitted(self, req: Request, t: float) -> None:
        """Blocks allocated: the read is issued at the decode engine's next step boundary (or at once); after
        its set-up (posting the read) the bytes move. One event covers both waits."""
        tb = self.decode[req.d_node].next_boundary(t) if self._read_at_step else t
        req.t_read = tb
        ts = tb + self.xfer_setup_s
        if ts > t:
            self.schedule(ts, self._read, req)
        else:
            self._read(t, req)

    def _read(self, t: float, req: Request) -> None:
        """Set-up done: the bytes start moving (the NIC is not busy during the set-up). Only the prompt blocks the
        decode node did not hold already move (NixlConnector reads into unhashed blocks only)."""
        nbytes = (req.input_tokens - req.d_cached) * self._kv_bytes
        req.xfer_ideal_s = self.xfer_setup_s + nbytes / self._bw
        self.network.start(req, req.p_node, req.d_node, nbytes, t)

    def _transferred(self, flow: Flow, t: float) -> None:
        """The last byte is in: P frees the blocks; the decode node sees it at its next step boundary."""
        req = flow.req
        self.prefill[req.p_node].release(req, t)
        req.t_xfer_end = t
        self.decode[req.d_node].join(req, t)

    def _finished(self, req: Request, t: float) -> None:
        self.finished += 1

    # -- state copy (lookahead planning) ---------------------------------------------------------------------
    def copy_state(self) -> ClusterSim:
        """An independent copy of this simulation as it stands, to be played forward without touching this one.

        Mutable state (nodes, queues, heap, network flows, live requests, step logs) is copied attribute by
        attribute (:class:`~deflectlab.envs.statecopy.StateCopier`); immutable things are shared: config,
        profiles, the workload and its arrival arrays, and the requests already finished or rejected.
        The request :meth:`advance` returned and that is not yet routed is copied too: route the copy's
        ``requests[-1]`` in the copy.
        """
        from deflectlab.envs.statecopy import StateCopier

        reqs = self.requests
        k, n = self._done_prefix, len(reqs)
        while k < n and (reqs[k].t_finish >= 0.0 or reqs[k].reject_reason is not None):
            k += 1
        self._done_prefix = k
        shared: list[object] = [self.config, self.workload, self.prefill_profile, self.decode_profile, self.handoff,
                                self._arr_t, self._arr_in, self._arr_out]
        shared.extend(node.profile for node in self.prefill)
        shared.extend(node.profile for node in self.decode)
        shared.extend(reqs[:k])
        shared.append(self.network._rates)  # a cache of a pure function: copies may share and extend it
        if self._hashes is not None:  # the trace's hash lists: read-only, referenced by requests and cache spans
            shared.append(self._hashes)
            shared.extend(self._hashes)
            shared.append(self._n_full)
        cp = StateCopier(shared)
        new = object.__new__(type(self))
        cp.memo[id(self)] = new
        nd = new.__dict__
        for name, v in self.__dict__.items():
            if name != "requests":
                nd[name] = cp.copy(v)
        new.requests = reqs[:k] + [cp.copy(r) for r in reqs[k:]]
        return new

    def run_events(self, until: float = math.inf) -> None:
        """Run queued events up to time ``until`` without taking further arrivals (a planner's drain)."""
        heap = self._heap
        t = self.now
        events = 0
        while heap and heap[0][0] <= until:
            t, _, fn, arg = heappop(heap)
            fn(t, arg)
            events += 1
        self.events += events
        self.now = max(self.now, t)

    # -- whole runs ------------------------------------------------------------------------------------------
    def run(self, policy: Policy, progress: bool = False) -> RunResult:
        """Replay the whole workload under ``policy`` and return the run's metrics."""
        from deflectlab.envs.metrics import collect

        if not self.prefill and policy.needs_prefill_nodes:
            raise DecisionError(f"policy {policy.name!r} routes requests to prefill nodes, but the cluster "
                                f"{self.config.shape} has none; use always_deflect or proactive")
        policy.reset()
        attach = getattr(policy, "attach", None)
        if attach is not None:  # a planner that plays this simulation forward (policies.lookahead)
            attach(self)
        wall0 = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self._arr_t), unit="req", desc=f"simulate {policy.name}", leave=False)
        decide = policy.decide
        view = self.view
        route = self.route
        advance = self.advance
        clock = time.perf_counter
        dec_s = 0.0
        n = 0
        while (req := advance()) is not None:
            t0 = clock()
            decision = decide(view(), req)
            dec_s += clock() - t0
            route(req, decision)
            n += 1
            if bar is not None and n % 2000 == 0:
                bar.update(2000)
        if bar is not None:
            bar.update(n % 2000)
            bar.close()
        self.decision_s = dec_s
        loop_s = time.perf_counter() - wall0
        result = collect(self, policy_name=policy.name)
        wall = time.perf_counter() - wall0
        result.summary.update(wall_s=wall, sim_loop_s=loop_s, metrics_s=wall - loop_s,
                              sim_requests_per_wall_s=len(self.requests) / wall if wall > 0 else float("nan"))
        return result
