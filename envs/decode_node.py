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

KV memory, as vLLM V1 manages it and without knowing any output length: admission allocates the prompt's
blocks only (``kv_block_tokens`` per block); requests wait FCFS for blocks and for ``max_num_seqs``, as do KV
pulls (a prefill-path request's blocks are allocated before its read is issued). A running decode takes a new
block in the step whose token no longer fits its last one. Block use is closed-form too: a running decode
whose KV holds ``o + m`` tokens after step ``m`` holds ``ceil((o + m) / blk)`` blocks, so with the sum of the
``o`` (the context base the step time needs anyway) and a histogram of ``o % blk`` the running decodes' blocks
at any step are an O(blk) sum, and an O(1) bound (``floor`` sum plus one block each) settles most checks. A
segment is cut before the first step the pool cannot serve. At that step the newest running decodes are
preempted (V1's default, recompute): their blocks are freed, they go back to the head of the admission
queue, and once re-admitted they recompute prompt plus generated tokens as a chunked prefill and continue.
``preemptions`` counts them.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from operator import mul
from typing import TYPE_CHECKING

from deflectlab.envs.prefix_cache import PrefixCache, cache_unit, holding, max_hit_blocks

if TYPE_CHECKING:
    from deflectlab.envs.profile import LatencyModel
    from deflectlab.envs.request import Request

_INF_STEPS = 1 << 62
_PAD_TABLES: dict[int, tuple[tuple[int, ...], ...]] = {}


def _pad_table(blk: int) -> tuple[tuple[int, ...], ...]:
    """``table[m % blk][p] = (-p - m) % blk``: the tokens a running decode of phase ``p`` lacks to fill its last
    block at step ``m`` (one shared table per block size)."""
    t = _PAD_TABLES.get(blk)
    if t is None:
        t = _PAD_TABLES[blk] = tuple(tuple((-p - r) % blk for p in range(blk)) for r in range(blk))
    return t


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
        self.block_tokens = profile.kv_block_tokens
        self.total_blocks = profile.kv_capacity_tokens // profile.kv_block_tokens
        # Allocated blocks = static_blocks (admitted, not running: pulling, waiting to join, prefilling) plus the
        # running decodes' blocks, derived from their context offsets (see _running_blocks).
        self.static_blocks = 0
        self._phase = [0] * self.block_tokens  # running decodes by ctx_offset % block_tokens
        _pad_table(self.block_tokens)  # made once per block size, shared (not part of the node's state)
        self.preemptions = 0
        self.peak_blocks = 0
        self._usage_area = 0.0  # integral of used blocks over time, block-seconds (for the mean usage)
        self._usage_t = 0.0
        self._usage_last = 0.0
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
        self.admitted = 0
        self.inbound_handoffs = 0  # prefill-path requests bound here, not yet in the batch

        self.active = False
        self._starting = False  # a start is scheduled at the current instant
        self._seg_t0 = 0.0
        self._seg_k = 0
        self._seg_a = 0.0
        self._seg_b = 0.0
        self._retry_admit = False  # a preemption happened: try the admission queue at the next boundary
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
        self.cache: PrefixCache | None = None  # set by enable_prefix_cache
        self.hash_block_tokens = 0

    def enable_prefix_cache(self, hash_block_tokens: int) -> None:
        """Cache prompts' full blocks of ``hash_block_tokens`` tokens (the trace's hash granularity).

        A cached prefix counts as computed: a deflected prompt (or a preempted request's recompute) prefills
        only the rest, and a prefill-path request's KV read moves only the blocks this node lacks. vLLM's
        NixlConnector does the same: the decode scheduler first finds the local prefix hit
        (``num_computed_tokens``); ``NixlConnectorScheduler.get_num_new_matched_tokens`` then asks for
        ``len(prompt) - num_computed_tokens`` tokens from the prefill instance, and ``update_state_after_alloc``
        reads into the request's *unhashed* blocks only (``blocks.get_unhashed_block_ids()``), the worker
        reading the matching tail of the remote block ids (``vllm/distributed/kv_transfer/kv_connector/v1/
        nixl_connector.py``).
        """
        self.cache = PrefixCache(cache_unit(hash_block_tokens, self.block_tokens))
        self.hash_block_tokens = hash_block_tokens

    # -- admission -------------------------------------------------------------------------------------------
    @property
    def kv_reserved_tokens(self) -> int:
        """Allocated KV, tokens (whole blocks), as of the last step boundary."""
        return self.used_blocks * self.block_tokens

    @property
    def used_blocks(self) -> int:
        """Allocated blocks as of the last step boundary (before the next step's new blocks)."""
        return self.static_blocks + self._running_blocks(self.steps_done)

    def _running_blocks(self, m: int) -> int:
        """Blocks the running decodes hold for step ``m``: sum of ``ceil((o + m) / blk)``, exactly."""
        if not self.batch_size:
            return 0
        blk = self.block_tokens
        pad = sum(map(mul, self._phase, _PAD_TABLES[blk][m % blk]))
        return (self._ctx_base + self.batch_size * m + pad) // blk

    def _running_blocks_max(self, m: int) -> int:
        """An upper bound of :meth:`_running_blocks` in O(1)."""
        return (self._ctx_base + self.batch_size * m) // self.block_tokens + self.batch_size if self.batch_size else 0

    def fits_ever(self, req: Request) -> bool:
        """The prompt's blocks fit in an empty pool (nothing about the output is known)."""
        return -(-req.input_tokens // self.block_tokens) <= self.total_blocks

    def submit(self, req: Request, t: float) -> None:
        """Queue ``req`` for admission: a deflected prompt, or a prefill-path request wanting to pull its KV."""
        if not req.deflected:
            self.inbound_handoffs += 1
        self.admit_queue.append(req)
        self.try_admit(t)

    def try_admit(self, t: float) -> None:
        q = self.admit_queue
        poked = tight = False
        bsz = self.batch_size
        seg = self.active and not self._starting and bsz
        # the most the running decodes hold before this segment ends: admitting within it needs no cut
        if seg:
            run_max = (self._ctx_base + bsz * (self.steps_done + self._seg_k)) // self.block_tokens + bsz
        else:
            run_max = self._running_blocks(self.steps_done)
        cache = self.cache
        hit = 0
        while q:
            req = q[0]
            need = kv_need = -(-(req.input_tokens + req.generated) // self.block_tokens)
            if req.n_full and req.hashes[0] in cache.start:  # else no hit, whatever is evicted (n_full: cache on)
                hit, shared = self._lookup(req, t, run_max)
                need -= shared * cache.unit  # blocks a running request holds already: no new room
            else:
                hit = 0
            if self.static_blocks + run_max + need > self.total_blocks and not tight:
                tight = True
                run_max = self.kv_used_blocks(t) - self.static_blocks  # exact: the step in progress's blocks
            if self.static_blocks + run_max + need > self.total_blocks or self.admitted >= self.max_num_seqs:
                if kv_need > self.total_blocks:  # a preempted request that can never fit again
                    q.popleft()
                    req.reject_reason = f"KV capacity exceeded: {req.input_tokens + req.generated} tokens"
                    continue
                break
            q.popleft()
            self.static_blocks += need  # usage is noted at the next step boundary (nothing frees before it)
            req.kv_blocks = kv_need
            self.admitted += 1
            if hit:  # (no hit: it holds nothing yet; its holding is made when its blocks are registered)
                self._hold(req, hit)
            if req.t_admit < 0.0:
                req.t_admit = t
            if req.deflected or req.preemptions:
                req.d_remaining = req.input_tokens + req.generated - req.d_done
                self.prefilling.append(req)
                self.prefill_waiting_tokens += req.d_remaining
                poked = True
            else:
                self._on_admitted(req, t)
        if tight and seg:
            k = self._steps_fitting(self._seg_k)
            if k < self._seg_k:  # end the segment before the first step the pool cannot serve
                a, b = self._seg_a, self._seg_b
                self._seg_k = k
                self._version += 1
                self._schedule(self._seg_t0 + k * a + 0.5 * b * k * (k - 1), self._end_segment, self._version)
        if poked:
            self._poke(t, prefill_only=True)

    def _lookup(self, req: Request, t: float, run_max: int) -> tuple[int, int]:
        """The cached prefix an admission of ``req`` at ``t`` finds (after the evictions due by then):
        ``(hit, shared)`` in cached blocks; for a prompt whose first block is cached (else it has no hit,
        whatever is evicted, and the evictions can wait: see :meth:`_hold`). ``run_max`` bounds the running
        decodes' blocks from above."""
        cache = self.cache
        if cache.n_free and cache.n_free * cache.unit > self.total_blocks - self.static_blocks - run_max:
            self._evict(t)
        n_max = req.n_full  # max_hit_blocks, from n_full (see there): at least one token of the sequence is computed
        if n_max * self.hash_block_tokens == req.input_tokens + req.generated:
            n_max -= 1
        return cache.match(req.hashes, n_max)

    def _hold(self, req: Request, hit: int) -> None:
        """``req`` is admitted with a hit: it holds its cached prefix, which counts as computed (with no hit it holds
        nothing yet, its d_done is 0 as at every admission and its holding is made at the registration:
        :meth:`_take_joiners`, :meth:`_register_prefilled`).

        The evictions its new blocks cause can wait: until the next free the pool only fills (admissions, the
        decodes' growth) and nothing reads the LRU list, because every lookup that may hit, every registration that
        may meet cached blocks, every release and every free evicts what is due first (:meth:`_lookup`,
        :meth:`_take_joiners`, :meth:`_end_segment`, :meth:`_register_prefilled`, :meth:`_preempt`,
        :meth:`abandon_handoff`). So the same LRU head goes, in the same order, as if it went now."""
        req.d_held = self.cache.acquire(req.hashes, hit)
        req.d_done = hit * self.hash_block_tokens
        if req.t_admit < 0.0:
            req.d_cached = req.d_done

    def _note_peak(self) -> None:
        used = self.static_blocks + self._running_blocks(self.steps_done)
        if used > self.peak_blocks:
            self.peak_blocks = used

    def usage_mean(self, t_end: float) -> float:
        """Time-mean of allocated blocks / total blocks over ``[0, t_end]`` (vLLM's ``kv_cache_usage_perc``)."""
        area = self._usage_area + self._usage_last * max(t_end - self._usage_t, 0.0)
        return area / t_end / self.total_blocks if t_end > 0 and self.total_blocks else 0.0

    def join(self, req: Request, t: float) -> None:
        """``req``'s KV has arrived: it joins the batch at the next step boundary."""
        self.joiners.append(req)
        self._poke(t, prefill_only=False)

    def join_event(self, t: float, req: Request) -> None:
        """:meth:`join` with the event loop's ``fn(t, arg)`` signature."""
        self.joiners.append(req)
        self._poke(t, prefill_only=False)

    def recompute_handoff(self, req: Request, t: float) -> None:
        """An admitted prefill-path request whose KV read failed is prefilled here instead (vLLM's
        ``kv_load_failure_policy=recompute``): its prompt blocks are already allocated; it queues as a local,
        chunked prefill like a deflected one."""
        self.inbound_handoffs -= 1
        req.deflected = True
        req.d_remaining = req.input_tokens + req.generated - req.d_done
        self.prefilling.append(req)
        self.prefill_waiting_tokens += req.d_remaining
        self._poke(t, prefill_only=True)

    def abandon_handoff(self, req: Request, t: float) -> None:
        """An admitted prefill-path request whose KV will never arrive (``kv_load_failure_policy=fail``): free its
        blocks and its admission slot, then admit what waits."""
        self.inbound_handoffs -= 1
        cache = self.cache
        if cache is not None and req.hashes is not None:
            if cache.n_free:  # the evictions due before blocks are freed (see _hold)
                self._evict(t)
            if req.d_held is not None:  # (it holds a hit)
                self.static_blocks += cache.release(req.d_held) * cache.unit
                req.d_held = None
        self.static_blocks -= req.kv_blocks
        req.kv_blocks = 0
        self.admitted -= 1
        self.try_admit(t)

    # -- segments --------------------------------------------------------------------------------------------
    def _steps_by(self, t: float) -> int:
        """Steps of the running segment fully done by ``t``: largest j with j*a + b*j*(j-1)/2 <= elapsed."""
        a, b = self._seg_a, self._seg_b
        elapsed = t - self._seg_t0
        if b > 0.0:
            h = a - 0.5 * b
            j = int((-h + math.sqrt(h * h + 2.0 * b * elapsed)) / b)
        else:
            j = int(elapsed / a)
        while j > 0 and j * a + 0.5 * b * j * (j - 1) > elapsed:
            j -= 1
        while (j + 1) * a + 0.5 * b * (j + 1) * j <= elapsed:
            j += 1
        return j

    def next_boundary(self, t: float) -> float:
        """When the engine step in progress at ``t`` ends (``t`` itself when the node is idle)."""
        if not self.active or self._starting:
            return t
        j = self._steps_by(t)
        if j >= self._seg_k:
            return t
        a, b = self._seg_a, self._seg_b
        return self._seg_t0 + (j + 1) * a + 0.5 * b * (j + 1) * j

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
        new_k = self._steps_by(t) + 1
        if new_k < k:
            self._seg_k = new_k
            self._version += 1
            self._schedule(self._seg_t0 + new_k * a + 0.5 * b * new_k * (new_k - 1), self._end_segment,
                           self._version)

    def _deferred_start(self, t: float, version: object) -> None:
        if version == self._version:
            self._start_segment(t)

    # -- block use (closed form) -----------------------------------------------------------------------------
    def _steps_fitting(self, k: int) -> int:
        """The most steps (<= ``k``) of the running segment whose blocks fit in the pool: the running decodes'
        blocks grow with the step, so a bisection over the exact count."""
        n0, free = self.steps_done, self.total_blocks - self.static_blocks
        if self._running_blocks_max(n0 + k) <= free:
            return k
        lo, hi = 0, k  # blocks for step n0 + lo fit, for n0 + hi not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._running_blocks(n0 + mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def kv_used_blocks(self, t: float) -> int:
        """Allocated blocks at ``t``: the step in progress has its blocks already."""
        if not self.active or self._starting or not self.batch_size:
            return self.used_blocks
        j = min(self._steps_by(t), self._seg_k - 1)
        return self.static_blocks + self._running_blocks(self.steps_done + j + 1)

    def _preempt(self, t: float) -> None:
        """Preempt the newest running decodes (vLLM V1, recompute) until their blocks for the next step fit."""
        n0, blk = self.steps_done, self.block_tokens
        free = self.total_blocks - self.static_blocks
        if self.cache is not None and self.cache.n_free:  # the evictions due before blocks are freed (see _hold)
            self.cache.trim_to(self._cache_keep(n0))
        while self.running and self._running_blocks(n0 + 1) > free:
            r = max(self.running, key=lambda e: (e[2].first_step, e[2].rid))[2]
            self.running = [e for e in self.running if e[2] is not r]
            heapify(self.running)
            o = r.ctx_offset
            self.batch_size -= 1
            self._ctx_base -= o
            self._phase[o % blk] -= 1
            self.admitted -= 1
            self.preemptions += 1
            r.preemptions += 1
            if r.tbt_runs is None:
                r.tbt_runs, r.stalls = [], []
            r.tbt_runs.append((r.first_step, n0))
            r.generated += n0 - r.first_step + 1
            r.t_preempt = t
            r.d_done = 0
            r.d_remaining = r.input_tokens + r.generated
            r.kv_blocks = 0
            if r.d_held is not None:  # its cached blocks stay cached (the recompute may hit them)
                self._release_cached(r)
            self.admit_queue.appendleft(r)

    def _take_joiners(self, t: float, n_done: int) -> list[Request]:
        blk, ph, running = self.block_tokens, self._phase, self.running
        cache = self.cache
        if cache is not None:  # the KV arrived: the prompts' new full blocks are cached here now
            for r in self.joiners:  # the common case, where no registration may meet cached blocks
                if r.kv_blocks and r.n_full:
                    if r.d_held is None:  # no hit: it holds nothing yet, its holding is made now
                        r.d_held = cache.add_new(r.hashes, r.n_full)
                        if r.d_held is not None:
                            continue
                    elif cache.try_register(r.d_held, r.n_full):
                        continue
                    self._register_joiners(n_done)  # the rest (those registered here are not registered again)
                    break
        for r in self.joiners:
            if r.kv_blocks:
                self.static_blocks -= r.kv_blocks  # now counted among the running decodes' blocks
            else:  # joined without admission (tests, emulator): its blocks are allocated now
                self.admitted += 1
            r.t_join = t
            r.first_step = n_done + 1
            r.last_step = n_done + r.output_tokens
            # context read at step k: L + (k - first_step)
            r.ctx_offset = r.input_tokens - n_done - 1
            self._ctx_base += r.ctx_offset
            ph[r.ctx_offset % blk] += 1
            heappush(running, (r.last_step, r.rid, r))
        self.batch_size += len(self.joiners)
        self.inbound_handoffs -= len(self.joiners)
        new_joiners = self.joiners
        self.joiners = []
        return new_joiners

    def _register_joiners(self, n_done: int) -> None:
        """Register the joiners' blocks, in order, before their blocks count among the running decodes'; the
        evictions due (as of step ``n_done``) go first, before the first registration that may meet cached
        blocks (see :meth:`_hold`; the ones before it do not read the LRU list)."""
        cache, trimmed = self.cache, False
        for r in self.joiners:
            hi = r.n_full
            if not r.kv_blocks or not hi:
                continue
            if r.d_held is None:
                r.d_held = cache.add_new(r.hashes, hi)
                if r.d_held is not None:
                    continue
            elif cache.try_register(r.d_held, hi):
                continue
            if not trimmed and cache.n_free:
                cache.trim_to(self._cache_keep(n_done))
                trimmed = True
            if r.d_held is None:
                r.d_held = holding(r.hashes)
            cache.register(r.d_held, hi)

    def _start_segment(self, t: float) -> None:
        self._starting = False
        n_done = self.steps_done
        bsz = self.batch_size
        free = self.total_blocks - self.static_blocks
        blk = self.block_tokens
        # O(1) bound first (floor sum plus one block per decode), the exact O(blk) count only when it is close
        preempted = (bsz and (self._ctx_base + bsz * (n_done + 1)) // blk + bsz > free
                     and self._running_blocks(n_done + 1) > free)
        if preempted:
            self._preempt(t)
            self._retry_admit = True  # as vLLM, the waiting queue is tried again at the next step, not this one
        new_joiners = self._take_joiners(t, n_done) if self.joiners else None
        running = self.running
        bsz = self.batch_size
        budget = self.max_batched_tokens - bsz
        k = running[0][0] - n_done if bsz else _INF_STEPS
        if bsz and k > 1 and (self._ctx_base + bsz * (n_done + k)) // blk + bsz > free:
            k = max(self._steps_fitting(k), 1)  # step n_done + 1 fits (after any preemption)
        n_tok = bsz
        if budget > 0 and self.prefilling:
            chunks, c_tok, sq, cross, k, budget = self._pick_chunks(t, budget, k)
            n_tok += c_tok
        else:
            chunks, sq, cross = [], 0, 0
        if k > self.max_segment_steps:
            k = self.max_segment_steps
        if preempted:
            k = 1
        if n_tok == 0:
            self.active = False
            self.last_step_s = 0.0
            if self._retry_admit and self.admit_queue:
                self._retry_admit = False
                self.try_admit(t)
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

    def _pick_chunks(self, t: float, budget: int, k: int):
        """Deflected prompts' chunks for the next step, FCFS in ``budget`` tokens, each under its cap; the
        segment ends (``k``) where a chunk size would change."""
        chunks: list[tuple[Request, int]] = []
        n_tok = sq = cross = 0
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
        return chunks, n_tok, sq, cross, k, budget

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
        # usage: trapezoid time integral (running decodes' blocks to within half a block each), exact peak
        bsz = self.batch_size
        u = self.static_blocks + (self._ctx_base + bsz * n) / self.block_tokens + 0.5 * bsz if bsz else \
            float(self.static_blocks)
        self._usage_area += 0.5 * (self._usage_last + u) * (t - self._usage_t)
        self._usage_t, self._usage_last = t, u
        if u + 0.5 * bsz > self.peak_blocks:
            self._note_peak()
        running = self.running
        ending = running[0][0] == n if running else False  # decodes finish here (not read from the list later:
        # a prompt whose chunks end here may join it, finishing later)
        # The running decodes grew: the evictions due by now, exactly, before this boundary frees blocks (a decode
        # finishes; a prompt whose chunks end here does its own, in _finish_chunks). A boundary that frees nothing
        # leaves them to the next free or read (see _hold): the pool only fills until then, so the same LRU head
        # goes.
        if ending and self.cache is not None and self.cache.n_free:
            cache = self.cache
            # _cache_keep(n), inline: room beside the floor sum of the running decodes' blocks, less one each
            unit = cache.unit
            free = self.total_blocks - self.static_blocks - (self._ctx_base + bsz * n) // self.block_tokens
            if cache.n_free * unit > free - bsz:  # some cached blocks may not fit
                keep = free // unit
                if keep != (free - bsz) // unit:
                    keep = (self.total_blocks - self.static_blocks - self._running_blocks(n)) // unit
                cache.trim_to(keep)
        freed = self._finish_chunks(t, k, n) if self._seg_chunks else False
        if ending:  # (a prompt that joins in _finish_chunks finishes later than n: the heap's head stays)
            blk = self.block_tokens
            while running and running[0][0] == n:
                r = heappop(running)[2]
                self.batch_size -= 1
                self._ctx_base -= r.ctx_offset
                self._phase[r.ctx_offset % blk] -= 1
                self._finish(r, t)
            freed = True
        if self._on_segment_end is not None:
            self._on_segment_end(t, k)
        retry, self._retry_admit = self._retry_admit, False
        if (freed or retry) and self.admit_queue:
            self.active = False  # admission may poke; the segment below starts once
            self.try_admit(t)
            if self.active:
                return
        self._start_segment(t)

    def _finish_chunks(self, t: float, k: int, n: int) -> bool:
        """Advance the segment's prefill chunks by ``k`` steps; a finished prompt produces its next token at
        step ``n`` and joins the running decodes (or finishes). Returns whether blocks were freed."""
        freed = False
        for r, c in self._seg_chunks:
            adv = k * c
            r.d_done += adv
            r.d_remaining -= adv
            self.prefill_waiting_tokens -= adv
            if r.d_remaining == 0:
                self.prefilling.remove(r)
                if r.preemptions:  # a recompute: token generated + 1 comes out of this step
                    r.stalls.append(t - r.t_preempt)
                else:
                    r.t_first_token = t
                r.first_step = n
                r.last_step = n + r.output_tokens - r.generated - 1
                if r.n_full:  # (n_full: the cache is on)
                    self._register_prefilled(r, n)
                elif r.last_step == n and self.cache is not None and self.cache.n_free:  # it frees its blocks next:
                    self.cache.trim_to(self._cache_keep(n))  # the evictions due go first (it holds no cached block)
                self.static_blocks -= r.kv_blocks  # a finished prompt: its blocks are a running decode's now
                if r.last_step == n:
                    self._finish(r, t)
                    freed = True
                else:
                    r.ctx_offset = r.input_tokens + r.generated - n  # context read at step k: L + g + (k - n)
                    self._ctx_base += r.ctx_offset
                    self._phase[r.ctx_offset % self.block_tokens] += 1
                    self.batch_size += 1
                    heappush(self.running, (r.last_step, r.rid, r))
        return freed

    def _register_prefilled(self, r: Request, n: int) -> None:
        """``r``'s prompt is prefilled here (its chunks end at step ``n``): its full blocks become cached. The
        evictions due by now go first when the registration may meet cached blocks or when ``r`` finishes at once
        (its blocks are freed next); see :meth:`_hold`."""
        cache, hi = self.cache, r.n_full
        if r.last_step != n:  # the common case's shortcut
            if r.d_held is None:  # no hit: it holds nothing yet, its holding is made now
                r.d_held = cache.add_new(r.hashes, hi)
                if r.d_held is not None:
                    return
            elif cache.try_register(r.d_held, hi):
                return
        if cache.n_free:
            cache.trim_to(self._cache_keep(n))
        if r.d_held is None:
            r.d_held = holding(r.hashes)
        cache.register(r.d_held, hi)

    def _finish(self, r: Request, t: float) -> None:
        r.t_finish = t
        self.admitted -= 1
        if r.d_held is not None:  # its blocks still held by others were counted once for both: count them again
            held, r.d_held = r.d_held, None
            still = self.cache.release(held)
            if still:
                self.static_blocks += still * self.cache.unit
        self._on_finished(r, t)

    def cached_prefix_tokens(self, hashes: list[int], prompt_tokens: int, t: float) -> int:
        """Prompt tokens an admission at ``t`` would find cached (after the evictions due by then); no other
        effect on the model."""
        cache = self.cache
        if not hashes or hashes[0] not in cache.start:
            return 0
        bsz = self.batch_size
        if cache.n_free and cache.n_free * cache.unit > self.total_blocks - self.static_blocks - (
                (self._ctx_base + bsz * (self.steps_done + self._seg_k)) // self.block_tokens + bsz if bsz else 0):
            self._evict(t)
        bt = self.hash_block_tokens
        return cache.match(hashes, max_hit_blocks(hashes, prompt_tokens, 0, bt))[0] * bt

    def _evict(self, t: float) -> None:
        """Evict the cached free blocks that do not fit beside the blocks allocated at ``t`` (the step in progress
        has its blocks); the callers have checked with a cheap upper bound of the running decodes' blocks that
        some may not fit."""
        m = self.steps_done
        if self.active and not self._starting and self.batch_size:
            m += min(self._steps_by(t), self._seg_k - 1) + 1
        self.cache.trim_to(self._cache_keep(m))

    def _cache_keep(self, m: int) -> int:
        """Cached blocks that fit beside the allocated blocks of step ``m``, exactly: the running decodes hold
        between the floor sum and it plus one block each, and the O(blk) exact count is needed only when those
        two bounds leave room for different numbers of cached blocks."""
        free, unit, bsz = self.total_blocks - self.static_blocks, self.cache.unit, self.batch_size
        if not bsz:
            return free // unit
        lo = (self._ctx_base + bsz * m) // self.block_tokens
        keep = (free - lo) // unit
        if keep != (free - lo - bsz) // unit:
            keep = (free - self._running_blocks(m)) // unit
        return keep

    def _release_cached(self, r: Request) -> None:
        """``r`` gives its cached blocks back: those another request still holds were counted once for both
        (admission subtracted them), so they count again now; the others become free but cached."""
        self.static_blocks += self.cache.release(r.d_held) * self.cache.unit
        r.d_held = None

    # -- observation -----------------------------------------------------------------------------------------
    def context_tokens(self) -> int:
        """KV tokens the running decodes read in the next step."""
        return self._ctx_base + self.batch_size * (self.steps_done + 1) if self.batch_size else 0
