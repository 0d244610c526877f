"""A block-by-block prefix cache: the straightforward reading of vLLM V1's semantics, one dict entry per block.

It is the reference the span-based ``envs.prefix_cache.PrefixCache`` is checked against (same interface):
every cached block with its count of holding requests (0: free but cached), the free ones again in LRU order.
"""

from __future__ import annotations

from deflectlab.envs.prefix_cache import Holding  # the record of what a request holds: ranges of its hash list


class BlockCache:
    def __init__(self, unit: int) -> None:
        self.unit = unit
        self.cnt: dict[int, int] = {}
        self.free: dict[int, None] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.cnt)

    def __contains__(self, h: int) -> bool:
        return h in self.cnt

    @property
    def start(self) -> dict[int, int]:  # a block that begins a prompt is cached iff it is here
        return self.cnt

    def free_hashes(self) -> list[int]:
        return list(self.free)

    @property
    def held_blocks(self) -> int:
        return sum(1 for c in self.cnt.values() if c)

    @property
    def n_free(self) -> int:
        return len(self.free)

    def match(self, hashes: list[int], n_max: int) -> tuple[int, int]:
        hit = shared = 0
        for h in hashes[:n_max]:
            if h not in self.cnt:
                break
            hit += 1
            shared += self.cnt[h] > 0
        return hit, shared

    def acquire(self, hashes: list[int], hit: int) -> Holding:
        for h in hashes[:hit]:
            if self.cnt[h] == 0:
                del self.free[h]
            self.cnt[h] += 1
        return Holding(hashes, hit)

    def may_find(self, held: Holding) -> bool:
        return any(h in self.cnt for h in held.hashes[held.n:])

    def try_register(self, held: Holding, hi: int) -> bool:  # only when no new block is cached yet
        if self.may_find(held):
            return False
        self.register(held, hi)
        return True

    def add_new(self, hashes: list[int], hi: int) -> Holding | None:
        held = Holding(hashes)
        return held if self.try_register(held, hi) else None

    def register(self, held: Holding, hi: int) -> None:
        for i in range(held.n, hi):
            if held.hashes[i] not in self.cnt:  # one cached meanwhile by another request stays that one's
                self.cnt[held.hashes[i]] = 1
                held.ranges += (i, i + 1)
        held.n = max(held.n, hi)

    def release(self, held: Holding, keep: int | None = None) -> int:
        if keep is not None:  # the evictions due before the blocks are freed
            self.trim_to(keep)
        r = held.ranges
        blocks = [held.hashes[i] for k in range(0, len(r), 2) for i in range(r[k], r[k + 1])]
        still = 0
        for h in reversed(blocks):
            self.cnt[h] -= 1
            if self.cnt[h]:
                still += 1
            else:
                self.free[h] = None
        held.ranges = []
        return still

    def trim(self, room: int) -> None:
        self.trim_to(room // self.unit if room > 0 else 0)

    def trim_to(self, keep: int) -> None:
        while len(self.free) > max(keep, 0):
            h = next(iter(self.free))
            del self.free[h]
            del self.cnt[h]
            self.evictions += 1

    @property
    def free_blocks(self) -> int:
        return len(self.free) * self.unit
