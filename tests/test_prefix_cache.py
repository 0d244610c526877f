"""Prefix caching on every node (envs/prefix_cache.py): hits against a hand-written LRU, the compute and transfer
they save, the KV pool shared with running requests, and the model with the cache off."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from block_cache_ref import BlockCache  # tests/block_cache_ref.py (pytest puts tests/ on the path)

from deflectlab.envs import decode_node, prefill_node, prefix_cache, simulator
from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.prefix_cache import PrefixCache
from deflectlab.envs.profile import load_profile
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.workloads import Workload, make_workload
from deflectlab.policies.registry import make_policy

PROFILE = "a100-80gb_deepseek-v2-lite"
BT = 512  # tokens a Mooncake hash stands for
BLK = 16  # the profile's KV block, tokens
ROOT = Path(__file__).resolve().parents[1]


def _profile(kv_tokens: int | None = None):
    p = load_profile(PROFILE)
    return dataclasses.replace(p, kv_capacity_tokens=kv_tokens) if kv_tokens else p


def _sim(reqs, shape="1p1d", kv_tokens=None, gap=100.0, **cluster) -> ClusterSim:
    """``reqs``: (prompt tokens, output tokens, hashes[, arrival]) per request; arrivals ``gap`` apart if not given."""
    arr = [r[3] if len(r) > 3 else i * gap for i, r in enumerate(reqs)]
    wl = Workload(np.array(arr, float), np.array([r[0] for r in reqs]), np.array([r[1] for r in reqs]),
                  hash_ids=[list(r[2]) for r in reqs])
    prof = _profile(kv_tokens)
    return ClusterSim(ClusterConfig.from_shape(shape, **cluster), wl, prefill_profile=prof, decode_profile=prof)


def _run(sim, policy):
    sim.run(make_policy(policy))
    return sim.requests


# -- the hand-computed reference -----------------------------------------------------------------------------
def reference_hits(reqs, pool: int, unit: int, need_of) -> list[int]:
    """vLLM's prefix cache for requests that run one at a time, written as plainly as possible: a list in LRU
    order (front = next evicted); a request's hit is its longest cached prefix of full blocks leaving one token
    to compute; its blocks come out of the list; room is made for its allocation (``need_of(L)`` pool units);
    its new full blocks are cached; at the end all of them go to the back, last block first."""
    lru: list[int] = []
    hits = []
    for L, _, h in reqs:
        n_max = min(len(h), L // BT, (L - 1) // BT)
        hit = 0
        while hit < n_max and h[hit] in lru:
            hit += 1
        for x in h[:hit]:
            lru.remove(x)
        while len(lru) * unit > pool - need_of(L):
            lru.pop(0)
        mine = h[:hit] + [x for x in h[hit:L // BT] if x not in lru]
        lru.extend(reversed(mine))
        hits.append(hit * BT)
    return hits


def _sequential_trace(n=40, seed=7):
    """Prompts from a few prefix families, 1-4 full blocks plus (mostly) a partial tail of its own, one output
    token; a prompt of whole blocks exercises the cap that leaves a token to compute."""
    rng = np.random.default_rng(seed)
    families = [[100 * f + j for j in range(6)] for f in range(5)]
    reqs, uid = [], 10_000
    for _ in range(n):
        fam, k = families[rng.integers(len(families))], int(rng.integers(1, 5))
        tail = int(rng.choice([0, 37, 300]))
        h = fam[:k] + ([uid] if tail else [])
        uid += 1
        reqs.append((k * BT + tail, 1, h))
    return reqs


def test_hits_equal_a_hand_computed_lru_on_the_decode_node():
    """Deflected prompts one at a time on a decode pool of 8 cached blocks' room: hits, evictions and all."""
    reqs = _sequential_trace()
    kv = 8 * BT
    got = [r.d_cached for r in _run(_sim(reqs, kv_tokens=kv), "always_deflect")]
    want = reference_hits(reqs, kv // BLK, BT // BLK, lambda L: -(-L // BLK))
    assert got == want
    assert 0 < sum(want) < sum(r[0] for r in reqs)  # some hits, some misses
    seen, evicted = set(), 0
    for w, (L, _, h) in zip(want, reqs):
        evicted += w == 0 and h[0] in seen and (L - 1) // BT > 0  # a prefix seen before, gone: the pool is small
        seen.add(h[0])
    assert evicted > 0


def test_hits_equal_the_reference_on_both_pools_of_the_prefill_path():
    reqs = _sequential_trace(seed=11)
    kv = 8 * BT
    done = _run(_sim(reqs, kv_tokens=kv), "round_robin")
    want = reference_hits(reqs, kv, BT, lambda L: -(-L // BLK) * BLK)  # the prefill node counts tokens
    assert [r.p_cached for r in done] == want
    assert [r.d_cached for r in done] == want  # the decode pool is the same size and sees the same sequence


def test_prefix_hit_rate_is_the_cached_share_of_prompt_tokens():
    reqs = _sequential_trace(seed=3)
    sim = _sim(reqs, kv_tokens=8 * BT)
    res = sim.run(make_policy("always_deflect"))
    want = reference_hits(reqs, 8 * BT // BLK, BT // BLK, lambda L: -(-L // BLK))
    s = res.summary
    assert s["prefix_cache"] is True
    assert s["prefix_hit_rate"]["decode"] == pytest.approx(sum(want) / sum(r[0] for r in reqs), rel=1e-12)
    assert s["prefix_hit_rate"]["prefill"] == 0.0  # nothing was prefilled on a prefill node


# -- what a hit saves ------------------------------------------------------------------------------------------
def test_cached_prefill_is_cheaper_by_exactly_the_cached_tokens():
    """Second prompt shares 3 blocks: its prefill step computes L - 1536 tokens with 1536 of prior context."""
    L = 4 * BT + 200
    reqs = [(L, 1, [1, 2, 3, 4, 5]), (L, 1, [1, 2, 3, 9, 10])]
    prof = _profile()
    first, second = _run(_sim(reqs), "round_robin")
    h = 3 * BT
    assert (first.p_cached, second.p_cached) == (0, h)
    assert first.t_p_end - first.t_p_start == pytest.approx(prof.step_s(L, 0, 0, L * L, 0), rel=1e-12)
    c = L - h
    assert second.t_p_end - second.t_p_start == pytest.approx(prof.step_s(c, 0, 0, c * c, c * h), rel=1e-12)


def test_deflected_prefill_skips_the_cached_prefix():
    """Deflected: the chunks start after the cached prefix; step by step, each chunk's step as the profile
    prices it (budget 2048 tokens, prior context = cached + earlier chunks)."""
    L = 5 * BT + 100
    reqs = [(L, 1, [1, 2, 3, 4, 5, 6]), (L, 1, [1, 2, 3, 4, 7, 8])]
    prof = _profile()
    _, second = _run(_sim(reqs), "always_deflect")
    done = 4 * BT
    assert second.d_cached == done
    t = 0.0
    while done < L:
        c = min(L - done, 2048)
        t += prof.step_s(c, 0, 0, c * c, c * done)
        done += c
    assert second.ttft_s == pytest.approx(t, rel=1e-9)


def test_handoff_moves_only_the_blocks_the_decode_node_lacks():
    L = 3 * BT + 100
    reqs = [(L, 2, [1, 2, 3, 4]), (L, 2, [1, 2, 8, 9]), (L, 2, [20, 21, 22, 23])]
    sim = _sim(reqs)
    a, b, c = _run(sim, "round_robin")
    kvb, bw, setup = sim.prefill_profile.kv_bytes_per_token, sim._bw, sim.xfer_setup_s
    assert (a.d_cached, b.d_cached, c.d_cached) == (0, 2 * BT, 0)
    assert a.xfer_ideal_s == pytest.approx(setup + L * kvb / bw, rel=1e-12)
    assert b.xfer_ideal_s == pytest.approx(setup + (L - 2 * BT) * kvb / bw, rel=1e-12)
    assert c.xfer_ideal_s == pytest.approx(a.xfer_ideal_s, rel=1e-12)


def test_short_prompts_and_short_hash_lists():
    """A prompt shorter than a block has nothing to do with the cache (no hit, nothing cached); a hash list shorter
    than the prompt's full blocks caches only the blocks it names. By hand: A (5 full blocks, 3 hashes) caches 3
    blocks on both nodes; B (a 300-token prompt opening like A) finds nothing; C (A's prompt again) finds A's 3."""
    L = 5 * BT + 10
    reqs = [(L, 2, [1, 2, 3]), (300, 2, [1]), (L, 2, [1, 2, 3])]
    a, b, c = _run(_sim(reqs), "round_robin")
    assert (a.n_full, b.n_full, c.n_full) == (3, 0, 3)
    assert (a.p_cached, a.d_cached, b.p_cached, b.d_cached) == (0, 0, 0, 0)
    assert (c.p_cached, c.d_cached) == (3 * BT, 3 * BT)


def test_the_nodes_max_hit_from_n_full_is_max_hit_blocks():
    """The nodes' lookups take the most blocks a hit may cover from ``Request.n_full`` (less one where those blocks
    are the whole sequence), not from a call: the same as ``max_hit_blocks`` for every prompt length (around block
    multiples), tokens generated before a preemption and hash list length."""
    for tokens in (*range(1, 5 * BT, 97), *(k * BT + d for k in range(1, 5) for d in (-1, 0, 1))):
        for generated in (0, 1, 2, BT - 1, BT, 3 * BT):
            for n_hashes in range(7):
                h = list(range(n_hashes))
                n_full = min(tokens // BT, n_hashes)  # as the simulator sets it (simulator.full_blocks)
                n_max = n_full - (n_full * BT == tokens + generated)
                assert n_max == prefix_cache.max_hit_blocks(h, tokens, generated, BT), (tokens, generated, n_hashes)


# -- one KV pool for running requests and cached blocks ---------------------------------------------------------
def test_running_requests_evict_cached_blocks_and_shared_blocks_count_once():
    """A (3 blocks) finishes; B (no shared prefix) then runs and grows to 219 of 256 blocks; C, after B, has
    A's prefix but finds only its first block: B's admission left room for 2 cached blocks (A's last block was
    evicted first), its growth for 1. Without B, C finds all three."""
    kv = 8 * BT  # 256 blocks of 16 tokens
    a = (3 * BT + 1, 1, [1, 2, 3, 4], 0.0)
    b = (3000, 500, [50, 51, 52, 53, 54, 55], 10.0)
    c = (3 * BT + 1, 1, [1, 2, 3, 5], 200.0)
    with_b = _run(_sim([a, b, c], kv_tokens=kv), "always_deflect")
    assert with_b[1].t_finish < c[3]  # the eviction happened while B ran, not at C's lookup
    assert with_b[2].d_cached == BT
    without_b = _run(_sim([a, c], kv_tokens=kv), "always_deflect")
    assert without_b[1].d_cached == 3 * BT


def test_blocks_two_running_requests_share_take_room_once():
    L = 3 * BT + 1
    reqs = [(L, 2000, [1, 2, 3, 4], 0.0), (L, 2000, [1, 2, 3, 5], 1.0)]
    used = {}
    for on in (True, False):
        sim = _sim(reqs, prefix_cache=on)
        pol = make_policy("always_deflect")
        sim.advance()
        sim.route(sim.requests[0], pol.decide(sim.view(), sim.requests[0]))
        req = sim.advance()
        sim.route(req, pol.decide(sim.view(), req))
        assert req.t_admit == 1.0 and sim.requests[0].t_finish < 0  # both in the pool
        used[on] = sim.decode[0].kv_used_blocks(1.0)
    assert used[False] - used[True] == 3 * BT // BLK  # three 512-token blocks, 32 pool blocks each


def test_a_mooncake_run_leaves_no_block_held():
    wl = make_workload("mooncake_synthetic", num_requests=400)
    sim = ClusterSim(ClusterConfig.from_shape("2p2d"), wl)
    res = sim.run(make_policy("proactive"))
    assert res.summary["completed"] + res.summary["rejected"] == 400
    assert 0 < res.summary["prefix_hit_rate"]["decode"] < 1 and 0 < res.summary["prefix_hit_rate"]["prefill"] < 1
    for n in (*sim.prefill, *sim.decode):
        assert n.cache is not None and n.cache.held_blocks == 0  # every block given back
    assert all(d.used_blocks == 0 for d in sim.decode) and all(p.kv_used_tokens == 0 for p in sim.prefill)
    for d in sim.decode:
        assert d.cache.free_blocks <= d.total_blocks


class _EagerDecodeNode(decode_node.DecodeNode):
    """The decode node evicting at every instant the pool grows: before every lookup, after every admission and
    at every segment end (the running decodes' growth; the reading of vLLM closest to the letter). The model
    defers those evictions to the next lookup that may hit, release or free (``DecodeNode._hold``); this is the
    reference that deferral must equal."""

    def _lookup(self, req, t, run_max):
        if self.cache.n_free:
            self._evict(t)
        return self.cache.match(req.hashes, prefix_cache.max_hit_blocks(req.hashes, req.input_tokens,
                                                                          req.generated, self.hash_block_tokens))

    def _hold(self, req, hit):
        super()._hold(req, hit)
        if self.cache.n_free:
            self._evict(self._now)

    def try_admit(self, t):
        self._now = t
        if self.cache is not None and self.cache.n_free and self.admit_queue:
            self._evict(t)  # before the queue head's lookup; later heads follow an admission (evicted in _hold)
        super().try_admit(t)

    def _end_segment(self, t, version):
        if version == self._version and self.cache.n_free:  # the running decodes grew: evict at every boundary
            self.cache.trim_to(self._cache_keep(self.steps_done + self._seg_k))
        super()._end_segment(t, version)


class _EagerPrefillNode(prefill_node.PrefillNode):
    """The prefill node evicting at every instant its pool grows: after every admission's allocation (see
    _EagerDecodeNode; a lookup then finds nothing left to evict)."""

    def _use(self, tokens, t):
        super()._use(tokens, t)
        if tokens > 0:
            self.cache.trim(self.kv_capacity_tokens - self.kv_used_tokens)


@pytest.mark.parametrize("policy", ["always_deflect", "round_robin", "proactive"])
def test_deferred_evictions_equal_evicting_at_once(policy, monkeypatch):
    """On the Mooncake trace with tight pools (evictions, preemptions, rejections), deferring evictions gives the
    timelines, hits, evicted blocks and final cache contents of evicting at every instant, on both pools."""
    wl = make_workload("mooncake_synthetic")  # the whole trace: a shorter one missed a case once
    prof = _profile(150_000)
    runs = []
    for dcls, pcls in ((decode_node.DecodeNode, prefill_node.PrefillNode), (_EagerDecodeNode, _EagerPrefillNode)):
        monkeypatch.setattr(simulator, "DecodeNode", dcls)
        monkeypatch.setattr(simulator, "PrefillNode", pcls)
        sim = ClusterSim(ClusterConfig.from_shape("2p2d"), wl, prefill_profile=prof, decode_profile=prof)
        sim.run(make_policy(policy))
        assert all(type(d) is dcls for d in sim.decode) and all(type(p) is pcls for p in sim.prefill)
        runs.append(([tuple(getattr(r, k) for k in (*TIMES, "p_cached", "d_cached")) for r in sim.requests],
                     [(n.cache.evictions, n.cache.free_hashes(), len(n.cache)) for n in (*sim.prefill, *sim.decode)],
                     sum(d.preemptions for d in sim.decode)))
    assert sum(e for e, *_ in runs[1][1]) > 0 and any(r[-1] for r in runs[1][0])  # evictions and hits
    assert runs[0] == runs[1]
    if policy == "always_deflect":
        assert runs[1][2] > 0  # preemptions release held blocks


# -- the cache off -----------------------------------------------------------------------------------------------
TIMES = ("t_p_start", "t_p_end", "t_dispatch", "t_admit", "t_read", "t_xfer_end", "t_join", "t_d_start",
         "t_first_token", "t_finish", "xfer_ideal_s")


@pytest.mark.parametrize("policy", ["proactive", "round_robin"])
def test_no_prefix_cache_is_the_model_without_a_cache(policy):
    """``prefix_cache=False`` on a trace with hashes gives the timelines of the same trace without hashes
    (where the nodes have no cache at all), and the cache on changes them."""
    wl = make_workload("mooncake_synthetic", num_requests=300)
    bare = Workload(wl.arrival_s, wl.input_tokens, wl.output_tokens)
    runs = {}
    for name, w, on in (("off", wl, False), ("bare", bare, True), ("on", wl, True)):
        sim = ClusterSim(ClusterConfig.from_shape("2p2d", prefix_cache=on), w)
        sim.run(make_policy(policy))
        runs[name] = [tuple(getattr(r, k) for k in TIMES) for r in sim.requests]
        assert all(n.cache is None for n in sim.decode) == (name != "on")
    assert runs["off"] == runs["bare"]
    assert runs["on"] != runs["off"]


def test_no_prefix_cache_flag():
    out = subprocess.run([sys.executable, "-m", "deflectlab.scripts.cli", "simulate", "--trace", "mooncake_synthetic",
                          "--num-requests", "60", "--no-prefix-cache", "--json"], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=300).stdout
    s = json.loads(out)
    assert s["prefix_cache"] is False and s["prefix_hit_rate"] == {"prefill": 0.0, "decode": 0.0}


# -- the cache alone ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [PrefixCache, BlockCache])
def test_cache_lru_order_and_sharing(cls):
    c = cls(unit=1)
    held_a = c.acquire([1, 2, 3], 0)
    c.register(held_a, 3)
    held_b = c.acquire([1, 2, 9], c.match([1, 2, 9], 3)[0])
    assert held_b.blocks == 2 and c.match([1, 2, 3], 3) == (3, 3)  # all held: no new room needed
    assert c.release(held_a) == 2  # 1 and 2 still held by b
    assert c.free_hashes() == [3]
    assert c.release(held_b) == 0
    assert c.free_hashes() == [3, 2, 1]  # last block first
    c.trim(2)
    assert c.free_hashes() == [2, 1] and 3 not in c and c.evictions == 1
    assert c.match([1, 2, 3], 3) == (2, 0)


def _random_prompts(rng: random.Random, n: int) -> list[list[int]]:
    """Chained hash lists with shared prefixes: each prompt extends a prefix of an earlier one (a new
    conversation turn, a shared system prompt) or starts afresh; equal hashes mean equal prefixes."""
    prompts: list[list[int]] = []
    nxt = 0
    for _ in range(n):
        base = list(rng.choice(prompts)[:rng.randint(0, 12)]) if prompts and rng.random() < 0.8 else []
        new = rng.randint(0 if base else 1, 8)
        prompts.append(base + list(range(nxt, nxt + new)))
        nxt += new
    return prompts


@pytest.mark.parametrize("seed", range(6))
def test_spans_equal_a_block_by_block_cache(seed):
    """Random interleavings of lookups, holds, registrations (also after another request cached the same blocks
    meanwhile), releases and evictions: the span cache answers exactly like the block-by-block reference."""
    rng = random.Random(seed)
    prompts = _random_prompts(rng, 60)
    caches = (PrefixCache(unit=2), BlockCache(unit=2))
    live: list[tuple[list[int], list]] = []  # (hashes, [holding in each cache])
    for step in range(1500):
        op = rng.random()
        if op < 0.35 or not live:  # admit: look up, hold the hit (maybe capped), register later
            h = rng.choice(prompts)
            n_max = rng.randint(0, len(h))
            got = [c.match(h, n_max) for c in caches]
            assert got[0] == got[1], (step, h, n_max)
            if not got[0][0] and rng.random() < 0.5:  # as the nodes do: no hit, no holding until its registration
                live.append((h, [None, None]))
            else:
                live.append((h, [c.acquire(h, got[0][0]) for c in caches]))
        elif op < 0.6:  # a request's KV is computed: its blocks up to some point become cached
            h, held = rng.choice(live)
            if held[0] is None:  # the nodes' way for a request with no hit: once, all its full blocks
                for j, c in enumerate(caches):
                    held[j] = c.add_new(h, len(h))
                    if held[j] is None:  # declined (a block may be cached already): the general way
                        held[j] = prefix_cache.holding(h)
                        c.register(held[j], len(h))
            else:
                hi = rng.randint(held[1].n, len(h))
                if rng.random() < 0.5:  # as the nodes do: the common case's shortcut first (or it changes nothing)
                    assert caches[0].try_register(held[0], hi) or caches[0].register(held[0], hi) is None
                else:
                    caches[0].register(held[0], hi)
                caches[1].register(held[1], hi)
            assert held[0].blocks == held[1].blocks
        elif op < 0.85:  # a request finishes or is preempted, half the time evicting what is due first
            h, held = live.pop(rng.randrange(len(live)))
            if held[0] is None:  # it holds nothing (no hit, not registered): the nodes release nothing
                pass
            elif rng.random() < 0.5:
                assert caches[0].release(held[0]) == caches[1].release(held[1])
            else:
                keep = rng.randint(0, caches[1].n_free + 1)
                assert caches[0].release(held[0], keep) == caches[1].release(held[1], keep)
        else:  # the pool needs room
            keep = rng.randint(0, caches[1].n_free + 1)
            for c in caches:
                c.trim_to(keep)
        a, b = caches
        assert (len(a), a.n_free, a.held_blocks, a.evictions) == (len(b), b.n_free, b.held_blocks, b.evictions)
        if step % 50 == 0:
            assert a.free_hashes() == b.free_hashes()
            assert all((x in a) == (x in b) for p in prompts for x in p)


def test_reused_span_objects_answer_like_the_block_by_block_cache():
    """Evicted span objects are reused for new requests' spans (PrefixCache.spare) and the free spans are an
    insertion-ordered dict: requests that hit and miss, a few live at a time, on a pool that keeps evicting, get every
    answer of the block-by-block reference, and span objects were reused."""
    rng = random.Random(11)
    prompts = _random_prompts(rng, 80)
    caches = (PrefixCache(unit=1), BlockCache(unit=1))
    live: list[list] = []
    reused = 0
    for step in range(3000):
        if len(live) < 4 and (not live or rng.random() < 0.5):  # admit and, at once, compute its blocks
            h = rng.choice(prompts)
            hit, shared = caches[0].match(h, len(h))
            assert (hit, shared) == caches[1].match(h, len(h)), step
            spare = len(caches[0].spare)
            held = [c.add_new(h, len(h)) if not hit else None for c in caches]
            reused += len(caches[0].spare) < spare
            for j, c in enumerate(caches):
                if held[j] is None:  # a hit, or add_new declined: hold the hit and register the rest
                    held[j] = c.acquire(h, hit)
                    c.register(held[j], len(h))
            live.append(held)
        else:  # the oldest or a random one finishes, the pool having room for 0 to 40 free blocks first
            held = live.pop(rng.randrange(len(live)))
            keep = rng.randint(0, 40)
            assert caches[0].release(held[0], keep) == caches[1].release(held[1], keep)
        a, b = caches
        assert (len(a), a.n_free, a.held_blocks, a.evictions) == (len(b), b.n_free, b.held_blocks, b.evictions)
        if step % 100 == 0:
            assert a.free_hashes() == b.free_hashes()
    assert reused > 100 and caches[0].evictions > 1000


def test_evictions_left_in_the_span_dicts_stay_bounded_and_exact():
    """Evicted blocks leave the span dicts lazily (PrefixCache.trim_to): with no lookup for a long time (unshared
    prompts, the pool always full) the counts follow the block-by-block reference at once, at most
    ``_DUE_MAX`` evicted blocks linger, and the blocks left cached are the reference's."""
    caches = (PrefixCache(unit=1), BlockCache(unit=1))
    for i in range(400):
        h = list(range(10 * i, 10 * i + 10))
        held = [c.acquire(h, 0) for c in caches]
        for c, x in zip(caches, held, strict=True):
            assert c.try_register(x, 10)
            c.release(x)
            c.trim_to(25)  # a full pool: 25 free blocks fit
        a, b = caches
        assert (len(a), a.n_free, a.evictions) == (len(b), b.n_free, b.evictions) == (min(10 * i + 10, 25),) * 2 + (
            max(10 * i - 15, 0),)
        assert sum(s.hi - s.lo for s in a.start.values()) <= 25 + prefix_cache._DUE_MAX
    # LRU first, newest block of a prompt first: prompt 397's first five blocks, then 398's and 399's ten
    assert a.free_hashes() == b.free_hashes() == [*range(3974, 3969, -1), *range(3989, 3979, -1),
                                                  *range(3999, 3989, -1)]
    assert sum(s.hi - s.lo for s in a.start.values()) == 25  # the inspection dropped the rest


@pytest.mark.parametrize("policy", ["proactive", "always_deflect", "round_robin"])
def test_simulation_with_spans_equals_block_by_block(policy, monkeypatch):
    """The whole model on the Mooncake trace, under memory pressure (evictions), gives the same timelines with
    the span cache as with the block-by-block reference."""
    wl = make_workload("mooncake_synthetic", num_requests=500)
    prof = _profile(400_000)
    runs = []
    for cls in (PrefixCache, BlockCache):
        monkeypatch.setattr(decode_node, "PrefixCache", cls)
        monkeypatch.setattr(prefill_node, "PrefixCache", cls)
        sim = ClusterSim(ClusterConfig.from_shape("2p2d"), wl, prefill_profile=prof, decode_profile=prof)
        sim.run(make_policy(policy))
        assert all(type(n.cache) is cls for n in (*sim.prefill, *sim.decode))
        runs.append(([tuple(getattr(r, k) for k in (*TIMES, "p_cached", "d_cached")) for r in sim.requests],
                     [n.cache.evictions for n in (*sim.prefill, *sim.decode)]))
    assert sum(runs[1][1]) > 0  # the pool was tight enough to evict
    assert runs[0] == runs[1]


def test_trace_block_must_be_a_whole_number_of_node_blocks():
    wl = Workload(np.array([0.0]), np.array([600]), np.array([2]), hash_ids=[[1, 2]], hash_block_tokens=500)
    with pytest.raises(ValueError, match="multiple of the node's KV block"):
        ClusterSim(ClusterConfig.from_shape("1p1d"), wl)
