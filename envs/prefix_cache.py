"""Block-level prefix cache of one node, with vLLM V1's automatic prefix caching semantics.

What vLLM V1 does (``vllm/v1/core/kv_cache_manager.py``, ``vllm/v1/core/block_pool.py``; on by default since
V1, on prefill and decode instances alike), and how this model follows it:

* **Hashes chain over full blocks.** A block's hash covers its tokens and its parent's hash, so equal hashes
  mean equal prefixes up to that block; only full blocks are hashed. The model takes the chained hashes from
  the trace: Mooncake's ``hash_ids`` are exactly that, one per 512-token block (the Mooncake trace README,
  ``kvcache-ai/Mooncake`` ``FAST25-release/traces``). A prompt's last, partial block is never cached.
* **A hit is the longest cached prefix**, capped so that at least one prompt token is computed (vLLM
  recomputes the last token to sample from it: ``max_cache_hit_length = num_tokens - 1``).
* **Cached blocks live in the same KV pool as running requests.** A block some running request references is
  counted once however many share it; a cached block nobody references is *free but cached*: it is reused on a
  hit and evicted, least recently used first, when the pool needs room. vLLM's ``kv_cache_usage_perc`` counts
  those blocks as free, and so does the model's usage.
* **Freed blocks go to the LRU tail in reverse order** (a request's last block is evicted before its first).

A cached block of the trace stands for ``unit`` blocks of the node's pool (512 / ``kv_block_tokens``). The
nodes evict lazily: before every lookup they trim the free-but-cached blocks to the pool room left at that
instant. Nothing reads the cache between two lookups and eviction is LRU, so this equals evicting at each step.

Simplification (documented in docs/prefix_cache.md): a prompt's new blocks are registered (become hits for
others) when its whole prefill is done or its KV has arrived, not chunk by chunk; a request that computed a
block another request registered meanwhile keeps its own copy uncached, as vLLM does.
"""

from __future__ import annotations

from itertools import filterfalse, islice, takewhile


class PrefixCache:
    """The cached blocks of one node: every cached block with its count of holding requests (0: free but cached),
    and the free ones again in LRU order. Two plain dicts; the per-block work of looking up, registering and
    releasing runs in C-level iterators (a Mooncake prompt is ~30 blocks, handled on two nodes).

    :param unit: pool blocks (or tokens, as the node counts its pool) one cached (trace) block occupies.
    """

    __slots__ = ("unit", "cnt", "free", "evictions")

    def __init__(self, unit: int) -> None:
        self.unit = unit
        self.cnt: dict[int, int] = {}  # hash -> running requests holding it (0: free but cached)
        # the blocks with count 0, least recently used first: a plain dict keeps insertion order and a block
        # leaves it when held again, so its order is LRU order (cheaper than an OrderedDict)
        self.free: dict[int, None] = {}
        self.evictions = 0

    def __contains__(self, h: int) -> bool:
        return h in self.cnt

    def __len__(self) -> int:
        return len(self.cnt)

    def match(self, hashes: list[int], n_max: int) -> tuple[int, int]:
        """``(hit, shared)``: the leading blocks of ``hashes[:n_max]`` that are cached, and how many of those a
        running request already holds (they take no new room). No side effect."""
        cnt = self.cnt
        counts = list(map(cnt.__getitem__, takewhile(cnt.__contains__, islice(hashes, n_max))))
        return len(counts), len(counts) - counts.count(0)

    def acquire(self, hashes: list[int], hit: int) -> list[int]:
        """Hold the first ``hit`` blocks (free ones leave the LRU list); returns the list of held hashes."""
        cnt, free = self.cnt, self.free
        out = hashes[:hit]
        for h in out:
            c = cnt[h]
            if not c:
                del free[h]
            cnt[h] = c + 1
        return out

    def register(self, hashes: list[int], lo: int, hi: int, out: list[int]) -> None:
        """A request computed (or received) blocks ``lo..hi-1``: each not cached yet becomes cached, held by it
        (appended to ``out``); one cached meanwhile by another request stays that one's (vLLM keeps the first
        copy and does not cache the duplicate). Chained hashes never repeat inside one prompt."""
        cnt = self.cnt
        new = list(filterfalse(cnt.__contains__, islice(hashes, lo, hi)))
        if new:
            cnt.update(dict.fromkeys(new, 1))
            out += new

    def release(self, out: list[int]) -> int:
        """A request frees its blocks (finished or preempted): each goes to the LRU tail once nobody holds it,
        last block first. Returns how many are still held by others (shared blocks)."""
        cnt, free = self.cnt, self.free
        counts = list(map(cnt.__getitem__, out))
        if counts.count(1) == len(counts):  # the common case: nobody else holds any of them
            cnt.update(dict.fromkeys(out, 0))
            free.update(dict.fromkeys(reversed(out)))
            return 0
        still = 0
        for i in range(len(out) - 1, -1, -1):
            h, c = out[i], counts[i] - 1
            cnt[h] = c
            if c:
                still += 1
            else:
                free[h] = None
        return still

    def trim(self, room: int) -> None:
        """Evict least recently used free blocks until they fit in ``room`` (pool blocks, or tokens)."""
        self.trim_to(room // self.unit if room > 0 else 0)

    def trim_to(self, keep: int) -> None:
        """Evict least recently used free blocks until at most ``keep`` are left."""
        free = self.free
        over = len(free) - (keep if keep > 0 else 0)
        if over > 0:
            cnt = self.cnt
            for h in list(islice(free, over)):
                del free[h]
                del cnt[h]
            self.evictions += over

    @property
    def free_blocks(self) -> int:
        """Pool blocks (or tokens) held by free-but-cached blocks."""
        return len(self.free) * self.unit


def cache_unit(hash_block_tokens: int, kv_block_tokens: int) -> int:
    """Pool blocks per cached block; the trace's block must be a whole number of the node's blocks."""
    if hash_block_tokens < 1 or hash_block_tokens % kv_block_tokens:
        raise ValueError(f"prefix cache: the trace's hash block ({hash_block_tokens} tokens) must be a positive "
                         f"multiple of the node's KV block ({kv_block_tokens} tokens)")
    return hash_block_tokens // kv_block_tokens


def max_hit_blocks(hashes: list[int], prompt_tokens: int, generated: int, block_tokens: int) -> int:
    """The most leading blocks a lookup may hit: full prompt blocks only, leaving at least one token of the
    sequence (prompt plus ``generated``) to compute."""
    n = prompt_tokens // block_tokens
    m = (prompt_tokens + generated - 1) // block_tokens
    if m < n:
        n = m
    return n if n < len(hashes) else len(hashes)
