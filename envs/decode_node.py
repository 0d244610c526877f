"""Decode node: continuous batching with deflected prefills as chunks, advanced in closed form.

Each step serves every running decode one token, then fills what is left of the token budget with chunks of
deflected prefills (FCFS, each capped by its request's chunk cap): vLLM V1's chunked prefill. Between two
changes of the batch's membership all steps have the same token count, so the step time is affine in the
step index (decode context grows by the batch size per step, a chunk's prior context by its chunk size). The
node therefore schedules one event per *segment* of identical steps, not per step: the segment's end is the
earliest of the next decode completion and the next change of a prefill's chunk. A request that arrives
mid-segment (a finished KV transfer, a deflected prompt) cuts the segment at the end of the step in progress
and joins at that boundary. Step times of each segment are logged as ``(first step, a, b, K)`` so
:mod:`envs.metrics` can recover every request's time-between-tokens samples exactly afterwards.

KV memory: admission reserves a request's prompt plus output blocks (no preemption is modelled); requests
wait FCFS for room, as do KV pulls (a prefill-path request's blocks are reserved before its transfer starts).
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Callable
from heapq import heappop, heappush
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deflectlab.envs.profile import LatencyModel
    from deflectlab.envs.request import Request

_INF_STEPS = 1 << 62


class DecodeNode:
    """One decode instance.

    :param on_admitted: ``on_admitted(request, t)`` for a prefill-path request whose blocks were just
        reserved (its KV transfer may start).
    :param on_finished: ``on_finished(request, t)`` when a request's last token is out.
    :param max_segment_steps: cap on the steps one segment may jump over (``None``: no cap). The engine
        emulator sets 1 so it sees every step and can stream each token in real time.
    :param on_segment_end: ``on_segment_end(t, steps)`` after each segment's bookkeeping (emulator hook).
    """

    def __init__(
        self,
        index: int,
        profile: LatencyModel,
        max_batched_tokens: int,
        max_num_seqs: int,
        schedule: Callable[[float, Callable, object], None],
        on_admitted: Callable[[Request, float], None],
        on_finished: Callable[[Request, float], None],
        max_segment_steps: int | None = None,
        on_segment_end: Callable[[float, int], None] | None = None,
    ) -> None:
        self.index = index
        self.max_segment_steps = max_segment_steps or _INF_STEPS
        self._on_segment_end = on_segment_end
        self.profile = profile
        self.max_batched_tokens = max_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.kv_capacity_tokens = profile.kv_capacity_tokens
        self._schedule = schedule
        self._on_admitted = on_admitted
        self._on_finished = on_finished
        # Step-time coefficients looked up once.
        self._kv_coef = profile.decode_attn_s_per_token
        self._cross_coef = profile.prefill_attn_cross_s

        self.steps_done = 0  # N: steps completed so far
        self.running: list[tuple[int, int, Request]] = []  # heap of (last step, rid, request)
        self.batch_size = 0  # B
        self._ctx_base = 0  # S: the step numbered k reads S + B * k context tokens
        self.prefilling: deque[Request] = deque()  # admitted deflected prompts, FCFS
        self.prefill_waiting_tokens = 0
        self.joiners: list[Request] = []  # KV arrived, waiting for the next step boundary
        self.admit_queue: deque[Request] = deque()
        self.kv_reserved_tokens = 0
        self.admitted = 0
        self.inbound_handoffs = 0  # prefill-path requests bound here, not yet in the batch

        self.active = False
        self._starting = False  # a start is scheduled at the current instant
        self._seg_t0 = 0.0
        self._seg_k = 0
        self._seg_a = 0.0
        self._seg_b = 0.0
        self._seg_full = False  # the segment's steps use the whole token budget
        self._seg_chunks: list[tuple[Request, int]] = []
        self._version = 0
        self.busy_s = 0.0
        self.last_step_s = 0.0
        # Segment log for TBT recovery: steps n0+1 .. n0+k took a + b*j seconds (j = 0..k-1), with a
        # batch of `bsz` running decodes, `join` of which produced their first token in the first step.
        self.log_n0 = array("q")
        self.log_k = array("q")
        self.log_a = array("d")
        self.log_b = array("d")
        self.log_bsz = array("q")
        self.log_join = array("q")
        self._seg_join = 0

    # -- admission -------------------------------------------------------------------------------------------
    def _reservation(self, req: Request) -> int:
        blk = self.profile.kv_block_tokens
        return -(-(req.input_tokens + req.output_tokens) // blk) * blk

    def fits_ever(self, req: Request) -> bool:
        return self._reservation(req) <= self.kv_capacity_tokens

    def submit(self, req: Request, t: float) -> None:
        """Queue ``req`` for admission: a deflected prompt, or a prefill-path request wanting to pull its KV."""
        if not req.deflected:
            self.inbound_handoffs += 1
        self.admit_queue.append(req)
        self.try_admit(t)

    def try_admit(self, t: float) -> None:
        q = self.admit_queue
        poked = False
        while q:
            req = q[0]
            need = req.kv_reserved
            if not need:
                need = req.kv_reserved = self._reservation(req)
            if self.kv_reserved_tokens + need > self.kv_capacity_tokens or self.admitted >= self.max_num_seqs:
                break
            q.popleft()
            self.kv_reserved_tokens += need
            self.admitted += 1
            req.t_admit = t
            if req.deflected:
                self.prefilling.append(req)
                self.prefill_waiting_tokens += req.d_remaining
                poked = True
            else:
                self._on_admitted(req, t)
        if poked:
            self._poke(t, prefill_only=True)

    def join(self, req: Request, t: float) -> None:
        """``req``'s KV has arrived: it joins the batch at the next step boundary."""
        self.joiners.append(req)
        self._poke(t, prefill_only=False)

    def join_event(self, t: float, req: Request) -> None:
        """:meth:`join` with the event loop's ``fn(t, arg)`` signature."""
        self.joiners.append(req)
        self._poke(t, prefill_only=False)

    # -- segments --------------------------------------------------------------------------------------------
    def _poke(self, t: float, prefill_only: bool) -> None:
        """New work: start if idle, else cut the running segment at the end of the step in progress.

        An idle node starts its step through an event at the same instant, so that every request arriving at
        that instant (a batch of KV transfers finishing together, say) is in the first step, as in vLLM.
        """
        if not self.active:
            self.active = True
            self._starting = True
            self._version += 1
            self._schedule(t, self._deferred_start, self._version)
            return
        if self._starting:
            return
        if prefill_only and self._seg_full:
            return  # no budget left for another chunk until the batch changes anyway
        a, b, k = self._seg_a, self._seg_b, self._seg_k
        elapsed = t - self._seg_t0
        # steps fully done by t: largest j with j*a + b*j*(j-1)/2 <= elapsed
        if b > 0.0:
            h = a - 0.5 * b
            j = int((-h + math.sqrt(h * h + 2.0 * b * elapsed)) / b)
        else:
            j = int(elapsed / a)
        while j > 0 and j * a + 0.5 * b * j * (j - 1) > elapsed:
            j -= 1
        while (j + 1) * a + 0.5 * b * (j + 1) * j <= elapsed:
            j += 1
        new_k = j + 1
        if new_k < k:
            self._seg_k = new_k
            self._version += 1
            self._schedule(self._seg_t0 + new_k * a + 0.5 * b * new_k * (new_k - 1), self._end_segment,
                           self._version)

    def _deferred_start(self, t: float, version: object) -> None:
        if version == self._version:
            self._start_segment(t)

    def _start_segment(self, t: float) -> None:
        self._starting = False
        n_done = self.steps_done
        running = self.running
        if self.joiners:
            for r in self.joiners:
                r.t_join = t
                r.first_step = n_done + 1
                r.last_step = n_done + r.output_tokens
                # context read at step k: L + (k - first_step)
                r.ctx_offset = r.input_tokens - n_done - 1
                self._ctx_base += r.ctx_offset
                heappush(running, (r.last_step, r.rid, r))
            self.batch_size += len(self.joiners)
            self.inbound_handoffs -= len(self.joiners)
            new_joiners = self.joiners
            self.joiners = []
        else:
            new_joiners = None
        bsz = self.batch_size
        budget = self.max_batched_tokens - bsz
        k = running[0][0] - n_done if bsz else _INF_STEPS
        chunks: list[tuple[Request, int]] = []
        n_tok = bsz
        sq = cross = 0
        if budget > 0 and self.prefilling:
            for r in self.prefilling:
                c = r.d_remaining
                if c > budget:
                    c = budget
                cap = r.chunk_cap
                if cap and c > cap:
                    c = cap
                if r.t_d_start < 0.0:
                    r.t_d_start = t
                chunks.append((r, c))
                n_tok += c
                sq += c * c
                cross += c * r.d_done
                steps = r.d_remaining // c  # full chunks of this size; a remainder changes the step
                if steps < k:
                    k = steps
                budget -= c
                if budget <= 0:
                    break
        if k > self.max_segment_steps:
            k = self.max_segment_steps
        if n_tok == 0:
            self.active = False
            self.last_step_s = 0.0
            return
        prof = self.profile
        a = prof.step_s(n_tok, bsz, self._ctx_base + bsz * (n_done + 1), sq, cross)
        b = self._kv_coef * bsz + self._cross_coef * sq
        if new_joiners:
            t1 = t + a
            for r in new_joiners:
                r.t_first_token = t1
        self.active = True
        self._seg_t0 = t
        self._seg_k = k
        self._seg_a = a
        self._seg_b = b
        self._seg_full = budget <= 0
        self._seg_join = len(new_joiners) if new_joiners else 0
        self._seg_chunks = chunks
        self.last_step_s = a
        self._version += 1
        self._schedule(t + k * a + 0.5 * b * k * (k - 1), self._end_segment, self._version)

    def _end_segment(self, t: float, version: object) -> None:
        if version != self._version:
            return  # the segment was cut short; a newer event ends it
        k = self._seg_k
        n0 = self.steps_done
        self.log_n0.append(n0)
        self.log_k.append(k)
        self.log_a.append(self._seg_a)
        self.log_b.append(self._seg_b)
        self.log_bsz.append(self.batch_size)
        self.log_join.append(self._seg_join)
        self.busy_s += t - self._seg_t0
        self.last_step_s = self._seg_a + self._seg_b * (k - 1)
        n = self.steps_done = n0 + k
        running = self.running
        freed = False
        for r, c in self._seg_chunks:
            adv = k * c
            r.d_done += adv
            r.d_remaining -= adv
            self.prefill_waiting_tokens -= adv
            if r.d_remaining == 0:
                self.prefilling.remove(r)
                r.t_first_token = t
                r.first_step = n
                r.last_step = n + r.output_tokens - 1
                if r.output_tokens == 1:
                    self._finish(r, t)
                    freed = True
                else:
                    r.ctx_offset = r.input_tokens - n  # context read at step k: L + (k - n)
                    self._ctx_base += r.ctx_offset
                    self.batch_size += 1
                    heappush(running, (r.last_step, r.rid, r))
        while running and running[0][0] == n:
            r = heappop(running)[2]
            self.batch_size -= 1
            self._ctx_base -= r.ctx_offset
            self._finish(r, t)
            freed = True
        if self._on_segment_end is not None:
            self._on_segment_end(t, k)
        if freed and self.admit_queue:
            self.active = False  # admission may poke; the segment below starts once
            self.try_admit(t)
            if self.active:
                return
        self._start_segment(t)

    def _finish(self, r: Request, t: float) -> None:
        r.t_finish = t
        self.kv_reserved_tokens -= r.kv_reserved
        self.admitted -= 1
        self._on_finished(r, t)

    # -- observation -----------------------------------------------------------------------------------------
    def context_tokens(self) -> int:
        """KV tokens the running decodes read in the next step."""
        return self._ctx_base + self.batch_size * (self.steps_done + 1) if self.batch_size else 0
