"""Prefill node: one vLLM instance that only prefills (FCFS, token-budgeted batches, chunked long prompts)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from deflectlab.envs.prefix_cache import PrefixCache, cache_unit, holding, max_hit_blocks

if TYPE_CHECKING:
    from deflectlab.envs.profile import LatencyModel
    from deflectlab.envs.request import Request


class PrefillNode:
    """FCFS prefill engine.

    Each step takes queued prompts from the head until ``max_batched_tokens`` is used; a prompt that does not
    fit whole is chunked and continues next step with its prior chunks as context. A prompt's KV blocks are
    allocated when its first chunk is scheduled and stay held after its prefill until the decode side has
    pulled them (:meth:`release`): a full KV cache stalls the head of the queue.

    :param on_prefilled: ``on_prefilled(request, t)`` when a prompt's last chunk completes.
    """

    def __init__(
        self,
        index: int,
        profile: LatencyModel,
        max_batched_tokens: int,
        schedule: Callable[[float, Callable, object], None],
        on_prefilled: Callable[[Request, float], None],
    ) -> None:
        self.index = index
        self.profile = profile
        self.max_batched_tokens = max_batched_tokens
        self.kv_capacity_tokens = profile.kv_capacity_tokens
        self._schedule = schedule
        self._on_prefilled = on_prefilled
        self.queue: deque[Request] = deque()  # waiting or partly prefilled, FCFS
        self.waiting_tokens = 0  # prompt tokens not yet prefilled, the running step's included
        self.kv_used_tokens = 0  # allocated: prefilling, or prefilled and waiting for the pull
        self.held_handoffs = 0
        self.peak_tokens = 0
        self._usage_area = 0.0  # integral of allocated tokens over time, token-seconds
        self._usage_t = 0.0
        self.busy = False
        self.busy_until_s = 0.0
        self.busy_s = 0.0  # accumulated step time, for utilisation
        self._batch: list[tuple[Request, int]] = []
        self.cache: PrefixCache | None = None  # set by enable_prefix_cache
        self.hash_block_tokens = 0

    def enable_prefix_cache(self, hash_block_tokens: int) -> None:
        """Cache prompts' full blocks of ``hash_block_tokens`` tokens (the trace's hash granularity)."""
        cache_unit(hash_block_tokens, self.profile.kv_block_tokens)  # checks the sizes agree
        self.cache = PrefixCache(hash_block_tokens)  # this node counts its pool in tokens
        self.hash_block_tokens = hash_block_tokens

    def enqueue(self, req: Request, t: float) -> None:
        self.queue.append(req)
        self.waiting_tokens += req.p_remaining
        if not self.busy:
            self._start_step(t)

    def release(self, req: Request, t: float) -> None:
        """The decode side has pulled ``req``'s KV: free its blocks (and unblock a stalled queue); its cached
        blocks stay cached (held by others, or free for reuse)."""
        freed = self.profile.blocks(req.input_tokens) * self.profile.kv_block_tokens
        cache = self.cache
        if cache is not None:  # the evictions due before blocks are freed go first (see _lookup)
            bt = self.hash_block_tokens  # the cache's unit: this node counts its pool in tokens
            keep = (self.kv_capacity_tokens - self.kv_used_tokens) // bt
            held = req.p_held
            if held is not None:  # (the blocks still held by others stay in use)
                req.p_held = None
                freed -= cache.release(held, keep) * bt
            elif cache.n_free > keep:  # (a prompt with no full block holds nothing)
                cache.trim_to(keep)
        self._use(-freed, t)
        self.held_handoffs -= 1
        if not self.busy and self.queue:
            self._start_step(t)

    def _use(self, tokens: int, t: float) -> None:
        self._usage_area += self.kv_used_tokens * (t - self._usage_t)
        self._usage_t = t
        self.kv_used_tokens += tokens
        if self.kv_used_tokens > self.peak_tokens:
            self.peak_tokens = self.kv_used_tokens

    def usage_mean(self, t_end: float) -> float:
        """Time-mean of allocated / total KV over ``[0, t_end]`` (vLLM's ``kv_cache_usage_perc``)."""
        area = self._usage_area + self.kv_used_tokens * max(t_end - self._usage_t, 0.0)
        return area / t_end / self.kv_capacity_tokens if t_end > 0 else 0.0

    def _start_step(self, t: float) -> None:
        budget = self.max_batched_tokens
        batch = self._batch = []
        n = sq = cross = 0
        prof, cache = self.profile, self.cache
        for r in self.queue:
            if r.t_p_start < 0.0:
                need = prof.blocks(r.input_tokens) * prof.kv_block_tokens
                if r.n_full and r.hashes[0] in cache.start:  # it may hit (n_full: the cache is on)
                    need = self._lookup(r, need, t)
                    if need < 0:
                        break
                elif self.kv_used_tokens + need > self.kv_capacity_tokens:
                    break  # FCFS: the head waits for KV room
                # (else no hit, whatever is evicted: it holds nothing yet, and its holding is made at _end_step)
                self._use(need, t)
                r.t_p_start = t
            c = r.p_remaining if r.p_remaining < budget else budget
            batch.append((r, c))
            n += c
            sq += c * c
            cross += c * r.p_done
            budget -= c
            if budget <= 0:
                break
        if not batch:
            self.busy = False
            return
        dt = prof.step_s(n, 0, 0, sq, cross)
        self.busy = True
        self.busy_until_s = t + dt
        self.busy_s += dt
        self._schedule(t + dt, self._end_step, None)

    def cached_prefix_tokens(self, hashes: list[int], prompt_tokens: int) -> int:
        """Prompt tokens a lookup now would find cached (after the evictions due by now); no other effect."""
        cache = self.cache
        if not hashes or hashes[0] not in cache.start:
            return 0
        room = self.kv_capacity_tokens - self.kv_used_tokens
        if cache.n_free * cache.unit > room:
            cache.trim_to(room // cache.unit)
        bt = self.hash_block_tokens
        return cache.match(hashes, max_hit_blocks(hashes, prompt_tokens, 0, bt))[0] * bt

    def _lookup(self, r: Request, need: int, t: float) -> int:
        """The prompt's cached prefix, for a prompt whose first block is cached (else it has no hit, whatever is
        evicted: the caller checks): its tokens are not prefilled again, blocks other running prompts hold take no
        new room. Returns the new KV tokens to allocate, or -1 when they do not fit (nothing changed).

        Evictions happen only where their result is read: before a lookup that may hit, before a registration
        that may meet cached blocks (:meth:`_end_step`) and before blocks are freed (:meth:`release`). In
        between the pool only fills (admissions), so evicting then takes the same LRU
        head, in the same order, as evicting at every admission would."""
        cache, bt = self.cache, self.hash_block_tokens
        room = self.kv_capacity_tokens - self.kv_used_tokens  # units: tokens here, cache unit 1 block = bt
        if cache.n_free * bt > room:
            cache.trim_to(room // bt)
        n_max = r.n_full  # max_hit_blocks, from n_full (see there): a prompt of whole blocks recomputes its last one
        if n_max * bt == r.input_tokens:
            n_max -= 1
        hit, shared = cache.match(r.hashes, n_max)
        need -= shared * bt
        if need > room:
            return -1  # FCFS: the head waits for KV room
        if hit:
            r.p_held = cache.acquire(r.hashes, hit)
            cached = hit * bt
            r.p_cached = cached
            r.p_done = cached
            r.p_remaining -= cached
            self.waiting_tokens -= cached
        return need  # (no hit: it holds nothing yet; _end_step makes its holding)

    def _register(self, r: Request, hi: int) -> None:
        """``r``'s blocks up to ``hi`` become cached where some of them may be cached already (the common case's
        shortcut, :meth:`PrefixCache.add_new` or :meth:`PrefixCache.try_register`, declined): the evictions due
        first (see :meth:`_lookup`)."""
        cache = self.cache
        if cache.n_free:
            cache.trim_to((self.kv_capacity_tokens - self.kv_used_tokens) // cache.unit)
        if r.p_held is None:
            r.p_held = holding(r.hashes)
        cache.register(r.p_held, hi)

    def _end_step(self, t: float, _: object) -> None:
        queue = self.queue
        for r, c in self._batch:
            r.p_done += c
            r.p_remaining -= c
            self.waiting_tokens -= c
            if r.p_remaining == 0:
                queue.popleft()  # only the batch's last prompt can be partial, so finished ones are a prefix
                r.t_p_end = t
                hi = r.n_full
                if hi:  # its full blocks become cached (a prompt with none has nothing to do with the cache)
                    if r.p_held is None:  # no hit: it holds nothing yet, its holding is made now (the common case)
                        r.p_held = self.cache.add_new(r.hashes, hi)
                        if r.p_held is None:
                            self._register(r, hi)
                    elif not self.cache.try_register(r.p_held, hi):
                        self._register(r, hi)
                self.held_handoffs += 1
                self._on_prefilled(r, t)
        self.busy = False
        self.busy_until_s = t
        if queue:
            self._start_step(t)
