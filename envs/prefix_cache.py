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
nodes evict lazily: before every lookup, and before blocks are freed, they trim the free-but-cached blocks to
the pool room left at that instant. The pool only fills in between and eviction is LRU, so this equals evicting
at each step. The cache itself drops evicted spans from its dicts lazily too (:meth:`PrefixCache.trim_to`).

Simplification (documented in docs/prefix_cache.md): a prompt's new blocks are registered (become hits for
others) when its whole prefill is done or its KV has arrived, not chunk by chunk; a request that computed a
block another request registered meanwhile keeps its own copy uncached, as vLLM does.
"""

from __future__ import annotations

from itertools import islice
from operator import attrgetter

# How the blocks are stored. A prompt's blocks enter the cache together, as one contiguous run of its hash
# list, and they leave it together or from the tail: eviction is LRU among free blocks and a request frees its
# blocks last-first, so the newest block of a run is always evicted before the older ones. The cache therefore
# keeps *spans* (a run ``hashes[lo:hi]`` of one prompt's hash list with one holder count), not blocks: a lookup,
# a hold, a release and an eviction touch one or two spans, not ~30 blocks. A span is split when a request holds
# only its head (the hit ends inside it) and shortened from its tail when evicted. This is exact, not an
# approximation: ``tests/test_prefix_cache.py`` plays random operations against a block-by-block reference.
#
# The common request finds no hit and registers all its blocks as one new span. Its record of what it holds and
# that span are then one object (class Holding plays both roles), made at the registration (add_new): one
# allocation per request and node, and a release that touches that object alone.
#
# Why a lookup need only find span *starts*: hashes chain, so a block's predecessor inside its span is its
# parent. A cached block whose parent is not the block before it in its span would be cached twice, which the
# cache never does; so the next cached block of a prompt, once the current span no longer matches, begins a
# span of its own.


_DUE_MAX = 512  # evicted blocks left in the span dicts at most (see PrefixCache.trim_to)
_SPARE_MAX = 256  # evicted span objects kept for reuse at most (PrefixCache.spare)
_NO_TRIM = 1 << 62  # PrefixCache.release's default ``keep``: no eviction first
_KEY = attrgetter("key")  # a span's key in PrefixCache.start


_new = object.__new__  # the hot paths make spans and holdings without a constructor call (half the cost)


class Holding:
    """A request's blocks held in one node's cache, and a span of cached blocks: one class for both roles, so that
    the common request (no hit, its blocks registered as one span) is one object per node, not two.

    As a holding: its hash list ``hashes``, how many of its leading blocks are settled (``n``: the hit, then every
    full block once its KV is computed or received), and the ranges ``[lo, hi)`` of its hash list it holds, as a
    flat tuple ``ranges`` (a block another request cached first is not held by this one; an ``own`` holding's is
    ``(0, n)``, not stored: :meth:`held_ranges`).

    As a span: the cached blocks ``hashes[lo:hi]`` of one prompt, held by ``cnt`` running requests; ``key`` is
    ``hashes[lo]``, its key in :attr:`PrefixCache.start` (kept, so dropping the span reads neither the hash list
    nor its items). Spans made by a split or by :meth:`PrefixCache.register` play this role only (their holding
    slots are unset or stale); a holding plays it too once it registered its blocks as one span (``own``).

    ``own`` marks that common case: a request that found no hit and registered its blocks in one span, which is
    this object itself, while the request holds exactly it. The span is still whole while its ``lo`` is 0 (a split
    gives the head to a new span); the span slots of a holding that never registered so are unset. Once the request
    released it, the object is a span only and its holding slots (``own`` included) are stale: nothing reads them."""

    __slots__ = ("hashes", "n", "ranges", "own", "lo", "hi", "cnt", "key")

    def __init__(self, hashes: list[int], n: int = 0) -> None:
        self.hashes, self.n = hashes, n
        self.ranges: tuple[int, ...] = (0, n) if n else ()
        self.own = False

    @property
    def blocks(self) -> int:
        """Blocks held."""
        r = self.held_ranges()
        return sum(r[1::2]) - sum(r[0::2])

    def held_ranges(self) -> tuple[int, ...]:
        """``ranges``, also for an ``own`` holding, which holds ``(0, n)`` and does not store it (the common case's
        registration makes no tuple)."""
        return (0, self.n) if self.own else self.ranges


def holding(hashes: list[int], n: int = 0) -> Holding:
    """``Holding(hashes, n)``, made without the constructor's call (the hot path: one per request and node)."""
    held = _new(Holding)
    held.hashes = hashes
    held.n = n
    held.ranges = (0, n) if n else ()
    held.own = False
    return held


def _span(ref: list[int], lo: int, hi: int, cnt: int = 1) -> Holding:
    """A span ``ref[lo:hi]`` held by ``cnt`` requests (by default the one that registers it); its holding slots
    stay unset."""
    s = _new(Holding)
    s.hashes = ref
    s.lo = lo
    s.hi = hi
    s.cnt = cnt
    s.key = ref[lo]
    return s


def _common(a: list[int], i: int, b: list[int], j: int, n: int) -> int:
    """Length of the common prefix of ``a[i:i+n]`` and ``b[j:j+n]`` (their first elements are equal, ``n`` >= 1).

    Hashes chain (a block's hash covers its parent's), so two hash lists that agree at one block agree on every
    block before it: the answer is the last ``m`` with ``a[i+m-1] == b[j+m-1]``, and a binary search on single
    blocks finds it (no slices made and compared)."""
    if a[i + n - 1] == b[j + n - 1]:
        return n
    lo, hi = 1, n - 1  # a[i+lo-1] == b[j+lo-1] holds; the answer is below n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[i + mid - 1] == b[j + mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixCache:
    """The cached blocks of one node, as spans (see above): ``start`` maps each span's first hash to it, ``free``
    holds the spans nobody holds in LRU order (least recently used first; within a span the last block goes
    first).

    :param unit: pool blocks (or tokens, as the node counts its pool) one cached (trace) block occupies.
    """

    __slots__ = ("unit", "start", "free", "n_free", "dropped", "risky", "due", "spare")

    def __init__(self, unit: int) -> None:
        self.unit = unit
        self.start: dict[int, Holding] = {}
        # LRU order: a released span joins the tail, a span held again leaves, evictions take the head. An
        # insertion-ordered dict used as an ordered set (keys: the spans, by identity; values unused), so that a
        # span held again leaves in O(1): a deque's remove compared its way past every span before it (about 40
        # cold span objects a hit on the bundled trace)
        self.free: dict[Holding, None] = {}
        self.n_free = 0  # cached blocks nobody holds
        # Blocks evicted, as two sums kept where they change least often: ``dropped`` (gone from the dicts) and
        # ``due`` (evicted, still in ``start`` and ``free``, at the LRU head; see trim_to). The blocks cached are
        # counted only when asked (n_blocks, a scan), so a registration changes no count.
        self.dropped = 0
        self.due = 0
        self.risky: set[int] = set()  # first hashes of cached spans whose registrant did not hold their parent
        # Evicted spans nothing refers to any more, kept for add_new to reuse: a span object per request and node is
        # then not made and freed again (object creation and deallocation are slow paths of the interpreter). A
        # holding must therefore not be used once released (the nodes set theirs to None as they release it).
        self.spare: list[Holding] = []

    @property
    def n_blocks(self) -> int:
        """Cached blocks (a scan over the spans, the evicted ones still in them less: inspection, not the hot
        path; it changes nothing)."""
        return sum(s.hi - s.lo for s in self.start.values()) - self.due

    @property
    def evictions(self) -> int:
        """Blocks evicted so far."""
        return self.dropped + self.due

    def __len__(self) -> int:
        return self.n_blocks

    def __contains__(self, h: int) -> bool:
        """Whether block ``h`` is cached (a scan: for tests and inspection, not the hot path)."""
        if self.due:
            self._drop_evicted()
        return any(h in s.hashes[s.lo:s.hi] for s in self.start.values())

    def free_hashes(self) -> list[int]:
        """The free-but-cached blocks in eviction order (inspection)."""
        if self.due:
            self._drop_evicted()
        return [h for s in self.free for h in reversed(s.hashes[s.lo:s.hi])]

    @property
    def held_blocks(self) -> int:
        """Cached blocks some running request holds."""
        return self.n_blocks - self.n_free

    def match(self, hashes: list[int], n_max: int) -> tuple[int, int]:
        """``(hit, shared)``: the leading blocks of ``hashes[:n_max]`` that are cached, and how many of those a
        running request already holds (they take no new room). No side effect on what is cached."""
        if self.due:
            self._drop_evicted()
        start = self.start
        i = shared = 0
        while i < n_max:
            s = start.get(hashes[i])
            if s is None:
                break
            lo, ref = s.lo, s.hashes
            n = s.hi - lo
            if n > n_max - i:
                n = n_max - i
            # _common's first test inline (the usual hit is a whole span): a call only when the hit ends inside it
            if ref[lo + n - 1] != hashes[i + n - 1]:
                n = _common(ref, lo, hashes, i, n)
            if s.cnt:
                shared += n
            i += n
        return i, shared

    def acquire(self, hashes: list[int], hit: int) -> Holding:
        """Hold the first ``hit`` blocks (as :meth:`match` found them); free ones leave the LRU list."""
        if self.due:
            self._drop_evicted()
        start, free = self.start, self.free
        i = 0
        while i < hit:
            s = start[hashes[i]]
            lo = s.lo
            n = s.hi - lo
            ref = s.hashes
            m = n if n <= hit - i else hit - i
            k = m if ref[lo + m - 1] == hashes[i + m - 1] else _common(ref, lo, hashes, i, m)  # (as in match)
            if k < n:  # held up to inside the span: split it; the tail keeps the span's object and LRU place
                head = _span(ref, lo, lo + k, s.cnt + 1)
                start[head.key] = head
                s.lo = lo + k
                s.key = ref[lo + k]
                start[s.key] = s
                if not s.cnt:
                    self.n_free -= k
            else:
                if not s.cnt:
                    del free[s]  # (a span's identity: Holding has no __eq__ or __hash__)
                    self.n_free -= n
                s.cnt += 1
            i += k
        return holding(hashes, hit)

    def try_register(self, held: Holding, hi: int) -> bool:
        """:meth:`register` for the common case, where none of the new blocks can be cached already (see there:
        no ``risky`` span is cached, the request holds the block before the new ones and the first new one is not
        cached), so what it registers does not depend on evictions. Returns ``False``, changing nothing, in any
        other case: the caller then carries out the evictions due by now and calls :meth:`register`. The check and
        the registration in one call (the hot path: one call per request and node)."""
        lo = held.n
        if hi <= lo:
            return True
        hashes, r, start = held.hashes, held.held_ranges(), self.start
        key = hashes[lo]
        if self.risky or key in start:
            return False
        if not r:
            if lo:  # it holds none of the blocks before the new ones (another request cached them)
                return False
            # No hit and nothing held yet (the common case): the holding itself becomes the span of its blocks.
            # It has never been a span (only a holding with no range can, and a registration gives it one).
            start[key] = held
            held.lo = 0
            held.hi = hi
            held.cnt = 1
            held.key = key
            held.n = hi
            held.own = True  # (so its ranges are (0, hi))
            return True
        if r[-1] != lo:
            return False
        held.n = hi
        start[key] = _span(hashes, lo, hi)
        held.ranges = r[:-1] + (hi,)
        held.own = False  # it holds more than one span now
        return True

    def add_new(self, hashes: list[int], hi: int) -> Holding | None:
        """``try_register(holding(hashes), hi)`` in one call, for a request that holds nothing here yet (it found no
        hit, so the nodes make its holding only now): the new holding, or ``None``, changing nothing, where the
        first block is cached already or a ``risky`` span is (the caller then carries out the evictions due and
        calls :meth:`register` on a new holding). In the common case the holding is the span of its blocks
        (``own``): one object, made once, for the lookup's miss, the registration and the release.

        ``hi`` is at least 1: the nodes leave a prompt with no full block out of the cache altogether."""
        key = hashes[0]
        if self.risky or key in self.start:
            return None
        spare = self.spare
        held = spare.pop() if spare else _new(Holding)  # (every slot is set below but ranges, implicit when own)
        held.hashes = hashes
        held.n = hi
        held.own = True
        held.lo = 0
        held.hi = hi
        held.cnt = 1
        held.key = key
        self.start[key] = held
        return held

    def register(self, held: Holding, hi: int) -> None:
        """The request computed (or received) its blocks up to ``hi``: each not cached yet becomes cached, held by
        it; one cached meanwhile by another request stays that one's (vLLM keeps the first copy and does not cache
        the duplicate).

        Which of the new blocks can be cached already? The first one, if another request registered it
        meanwhile. A later one only if its parent is not cached while it is: an *orphan* span. A request holds
        every block of its prompt before the ones it registers, and it frees its blocks last-first, so a span's
        parent block leaves the LRU list after the span does, unless the span was registered by a request that
        did not hold the parent (it skipped a block another request had cached: ``risky``). So while no such
        span is cached, checking the first new block is exact; otherwise every new block is checked."""
        lo = held.n
        if hi <= lo:
            return
        if self.due:
            self._drop_evicted()
        if held.own:  # (the shortcut is for the common case only, try_register's; a span it is stays one)
            held.ranges = (0, lo)
            held.own = False
        held.n = hi
        hashes, start, r = held.hashes, self.start, held.ranges
        i = lo
        ours = not lo or (r and r[-1] == lo)  # this request holds the block before the new ones
        if not ours:  # the block before is another request's (registering in pieces)
            i += self._continuation(hashes, lo, hi)
        elif not (hashes[lo] in start if not self.risky else any(map(start.__contains__, islice(hashes, lo, hi)))):
            start[hashes[lo]] = _span(hashes, lo, hi)  # the common case: nothing of it cached meanwhile
            held.ranges = r[:-1] + (hi,) if r else (lo, hi)
            return
        while i < hi:  # rare: skip the runs another request cached meanwhile
            s = start.get(hashes[i])
            if s is not None:
                i += _common(s.hashes, s.lo, hashes, i, min(s.hi - s.lo, hi - i))
                ours = False
                continue
            j = i + 1
            while j < hi and hashes[j] not in start:
                j += 1
            self._add(held, i, j, risky=not ours)
            i = j

    def _continuation(self, hashes: list[int], lo: int, hi: int) -> int:
        """How many of ``hashes[lo:hi]`` continue, inside its span, the cached block ``hashes[lo - 1]`` another
        request holds (a scan over the spans: only when one request registers its blocks in pieces)."""
        h = hashes[lo - 1]
        for s in self.start.values():
            ref = s.hashes
            if h in ref[s.lo:s.hi]:
                p = ref.index(h, s.lo, s.hi) + 1
                return _common(ref, p, hashes, lo, min(s.hi - p, hi - lo)) if p < s.hi and ref[p] == hashes[lo] else 0
        return 0

    def _add(self, held: Holding, lo: int, hi: int, risky: bool) -> None:
        h = held.hashes[lo]
        self.start[h] = _span(held.hashes, lo, hi)
        if risky and lo:
            self.risky.add(h)
        r = held.ranges
        held.ranges = r[:-1] + (hi,) if r and r[-1] == lo else r + (lo, hi)

    def release(self, held: Holding, keep: int = _NO_TRIM) -> int:
        """A request frees its blocks (finished or preempted): each goes to the LRU tail once nobody holds it,
        last block first. Returns how many are still held by others (shared blocks).

        With ``keep``, the evictions due before blocks are freed go first: :meth:`trim_to` ``(keep)`` in the same
        call (the hot path: one call per request and node).

        A holding is released once, and not used after: the callers drop it as they release it. The common case (a
        holding that is the span of its blocks, whole) leaves its holding slots as they were, stale: the object
        lives on as a span only, and nothing reads a span's holding slots (:meth:`add_new` sets them all again when
        it reuses the object)."""
        if self.n_free > keep:  # (a call only when an eviction is due)
            self.trim_to(keep)
        if held.own and not held.lo:  # the span of its blocks, whole (add_new, try_register; a split moves lo):
            held.cnt -= 1  # the common case, no hash list read, no other object
            if held.cnt:
                return held.hi
            self.free[held] = None
            self.n_free += held.hi
            return 0
        r = held.held_ranges()
        if not r:  # it holds nothing
            return 0
        held.ranges = ()  # (nothing held any more)
        start, hashes = self.start, held.hashes
        if len(r) == 2:  # one range
            i, hi = r
            s = start[hashes[i]]
            if s.hi - s.lo == hi - i:  # one span: the common case
                s.cnt -= 1
                if s.cnt:
                    return hi - i
                self.free[s] = None
                self.n_free += hi - i
                return 0
        spans = []
        for k in range(0, len(r), 2):
            i, hi = r[k], r[k + 1]
            while i < hi:
                s = start[hashes[i]]
                spans.append(s)
                i += s.hi - s.lo
        still = 0
        free = self.free
        for s in reversed(spans):
            s.cnt -= 1
            if s.cnt:
                still += s.hi - s.lo
            else:
                free[s] = None
                self.n_free += s.hi - s.lo
        return still

    def trim(self, room: int) -> None:
        """Evict least recently used free blocks until they fit in ``room`` (pool blocks, or tokens)."""
        self.trim_to(room // self.unit if room > 0 else 0)

    def trim_to(self, keep: int) -> None:
        """Evict least recently used free blocks until at most ``keep`` are left.

        The counts change at once; the evicted blocks leave ``start`` and ``free`` later, in one pass, before
        anything reads them (:meth:`match`, :meth:`register`, inspection) or once ``_DUE_MAX`` blocks are due.
        That is the same eviction: they are the LRU head, and until they leave nothing but a release changes the
        LRU list, which appends at the tail (:meth:`try_register` adds a span only where ``start`` has none, and
        sends any other case to :meth:`register`)."""
        if self.n_free > keep:
            if keep < 0:
                keep = 0
            self.due += self.n_free - keep
            self.n_free = keep
            if self.due > _DUE_MAX:
                self._drop_evicted()

    def _drop_evicted(self) -> None:
        """Take the ``due`` evicted blocks off the LRU head: whole spans leave, the last one is shortened."""
        over, self.due = self.due, 0
        self.dropped += over
        if over > 0:
            free = self.free
            k = 0  # whole spans to drop: those before the one where ``over`` runs out, least recently used first
            for k, s in enumerate(free):  # (k is read after the loop)
                n = s.hi - s.lo
                if n >= over:
                    if n > over:  # the span's newest blocks go first
                        s.hi -= over
                    else:  # (it goes whole)
                        k += 1
                    break
                over -= n
            if k:
                start = self.start
                gone = list(islice(free, k))
                for s in gone:
                    del free[s]
                    del start[s.key]
                if self.risky:
                    self.risky.difference_update(map(_KEY, gone))
                if len(self.spare) < _SPARE_MAX:  # nothing else refers to them: a request's holding is released
                    self.spare += gone  # before its span can be free, and the nodes drop their reference then

    @property
    def free_blocks(self) -> int:
        """Pool blocks (or tokens) held by free-but-cached blocks."""
        return self.n_free * self.unit


def cache_unit(hash_block_tokens: int, kv_block_tokens: int) -> int:
    """Pool blocks per cached block; the trace's block must be a whole number of the node's blocks."""
    if hash_block_tokens < 1 or hash_block_tokens % kv_block_tokens:
        raise ValueError(f"prefix cache: the trace's hash block ({hash_block_tokens} tokens) must be a positive "
                         f"multiple of the node's KV block ({kv_block_tokens} tokens)")
    return hash_block_tokens // kv_block_tokens


def max_hit_blocks(hashes: list[int], prompt_tokens: int, generated: int, block_tokens: int) -> int:
    """The most leading blocks a lookup may hit: full prompt blocks only, leaving at least one token of the
    sequence (prompt plus ``generated``) to compute.

    The nodes' lookups take it from the request's ``n_full`` (``min(prompt_tokens // block_tokens,
    len(hashes))``, set at arrival) without a call: it is ``n_full``, less one where ``n_full`` blocks are the whole
    sequence (``n_full * block_tokens == prompt_tokens + generated``: a prompt of whole blocks, nothing generated).
    ``tests/test_prefix_cache.py`` checks the two agree."""
    n = prompt_tokens // block_tokens
    m = (prompt_tokens + generated - 1) // block_tokens
    if m < n:
        n = m
    return n if n < len(hashes) else len(hashes)
