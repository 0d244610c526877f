"""The decode node's closed-form segments against a naive step-by-step reference.

The reference below advances one engine step at a time with the same scheduling rule (every running decode
one token, then deflected prefill chunks FCFS in the remaining budget, each capped by its request's cap). The
node under test jumps over whole segments and cuts them when requests arrive; both must give the same
first-token and finish times and the same time-between-tokens samples, to float precision.
"""

from __future__ import annotations

import heapq
import math
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import simple_profile

from deflectlab.envs.decode_node import DecodeNode
from deflectlab.envs.metrics import tbt_pieces
from deflectlab.envs.request import Request


class Loop:
    """A minimal event loop with the simulator's schedule(t, fn, arg) contract."""

    def __init__(self) -> None:
        self.heap: list = []
        self.seq = 0

    def schedule(self, t, fn, arg) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, arg))

    def run(self) -> None:
        while self.heap:
            t, _, fn, arg = heapq.heappop(self.heap)
            fn(t, arg)


def run_node(profile, budget, arrivals, admit_joins=False):
    """arrivals: (time, L, O, kind, cap) with kind 'join' (KV arrived) or 'deflect'. With ``admit_joins`` a
    'join' is first admitted (its prompt's blocks allocated, FCFS with the deflected prompts) and joins then."""
    loop = Loop()
    node = DecodeNode(0, profile, budget, 10_000, loop.schedule,
                      (lambda r, t: node.join(r, t)) if admit_joins else (lambda r, t: None), lambda r, t: None)
    reqs = []
    for i, (t, L, O, kind, cap) in enumerate(arrivals):
        r = Request(i, t, L, O)
        r.d_node = 0
        if kind == "deflect":
            r.deflected = True
            r.chunk_cap = cap or 0
            loop.schedule(t, lambda tt, rr: node.submit(rr, tt), r)
        elif admit_joins:
            loop.schedule(t, lambda tt, rr: node.submit(rr, tt), r)
        else:
            loop.schedule(t, lambda tt, rr: node.join(rr, tt), r)
        reqs.append(r)
    loop.run()
    return node, reqs


def reference(profile, budget, arrivals):
    """Step-by-step reference: token times of every request."""
    pending = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])
    tokens: dict[int, list[float]] = {i: [] for i in range(len(arrivals))}
    running: list[dict] = []
    prefilling: list[dict] = []
    t = 0.0
    while pending or running or prefilling:
        if not running and not prefilling:
            t = max(t, arrivals[pending[0]][0])
        while pending and arrivals[pending[0]][0] <= t:
            i = pending.pop(0)
            _, L, O, kind, cap = arrivals[i]
            if kind == "join":
                running.append({"i": i, "ctx": L, "left": O})
            else:
                prefilling.append({"i": i, "L": L, "O": O, "done": 0, "cap": cap})
        B = len(running)
        left = budget - B
        chunks = []
        for p in prefilling:
            if left <= 0:
                break
            c = min(p["L"] - p["done"], left, p["cap"] or 1 << 60)
            chunks.append((p, c))
            left -= c
        n_tok = B + sum(c for _, c in chunks)
        dt = profile.step_s(n_tok, B, sum(r["ctx"] for r in running), sum(c * c for _, c in chunks),
                            sum(c * p["done"] for p, c in chunks))
        t_end = t + dt
        for r in running:
            tokens[r["i"]].append(t_end)
            r["ctx"] += 1
            r["left"] -= 1
        running = [r for r in running if r["left"] > 0]
        for p, c in chunks:
            p["done"] += c
            if p["done"] == p["L"]:
                prefilling.remove(p)
                tokens[p["i"]].append(t_end)
                if p["O"] > 1:
                    running.append({"i": p["i"], "ctx": p["L"] + 1, "left": p["O"] - 1})
        t = t_end
    return tokens


def random_arrivals(rng, n, horizon_s, deflect_share=0.4, cap=True):
    out = []
    for _ in range(n):
        kind = "deflect" if rng.random() < deflect_share else "join"
        out.append((float(rng.uniform(0, horizon_s)), int(rng.integers(16, 3000)), int(rng.integers(1, 120)),
                    kind, int(rng.integers(64, 1024)) if cap and rng.random() < 0.5 else None))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_closed_form_matches_step_by_step(seed):
    rng = np.random.default_rng(seed)
    prof = simple_profile()
    arrivals = random_arrivals(rng, 40, horizon_s=3.0)
    node, reqs = run_node(prof, 2048, arrivals)
    ref = reference(prof, 2048, arrivals)
    for r in reqs:
        toks = ref[r.rid]
        assert len(toks) == r.output_tokens
        assert r.t_first_token == pytest.approx(toks[0], rel=1e-9, abs=1e-9)
        assert r.t_finish == pytest.approx(toks[-1], rel=1e-9, abs=1e-9)
    # TBT samples recovered from the segment log equal the reference's gaps, request by request.
    d = np.zeros(len(reqs), np.int64)
    first = np.array([r.first_step for r in reqs])
    last = np.array([r.last_step for r in reqs])
    owner, a, b, j0, j1 = tbt_pieces(SimpleNamespace(decode=[node]), d, first, last)
    for r in reqs:
        gaps = np.diff(ref[r.rid])
        m = owner == r.rid
        got = np.concatenate([a[k] + b[k] * np.arange(j0[k], j1[k] + 1) for k in np.flatnonzero(m)]) \
            if m.any() else np.zeros(0)
        assert len(got) == len(gaps)
        np.testing.assert_allclose(np.sort(got), np.sort(gaps), rtol=1e-7, atol=1e-9)


def test_single_decode_tbt_is_the_arithmetic():
    """One request alone: step k reads L + k - 1 context tokens; every gap is known in closed form."""
    prof = simple_profile()
    L, O = 1000, 50
    node, (r,) = run_node(prof, 2048, [(0.0, L, O, "join", None)])
    steps = [prof.step_s(1, 1, L + k) for k in range(O)]
    assert r.t_first_token == pytest.approx(steps[0], abs=1e-12)
    assert r.t_finish == pytest.approx(sum(steps), abs=1e-12)
    mean_tbt = (r.t_finish - r.t_first_token) / (O - 1)
    assert mean_tbt == pytest.approx(np.mean(steps[1:]), rel=1e-12)


def test_deflected_chunk_slows_the_steps_it_shares():
    """A decode running alone, then a 1500-token deflected prompt in 500-token chunks: exactly three steps
    carry a chunk, and each of them costs what the step-time formula says."""
    prof = simple_profile()
    L, O = 800, 40
    step0 = prof.step_s(1, 1, L)
    t_defl = 5.5 * step0  # arrives mid-step: joins at the next boundary
    node, (dec, defl) = run_node(prof, 2048, [(0.0, L, O, "join", None), (t_defl, 1500, 5, "deflect", 500)])
    ref = reference(prof, 2048, [(0.0, L, O, "join", None), (t_defl, 1500, 5, "deflect", 500)])
    gaps = np.diff(ref[0])
    shared = [prof.step_s(1 + 500, 1, L + 6 + j, 500**2, 500 * 500 * j) for j in range(3)]
    np.testing.assert_allclose(gaps[5:8], shared, rtol=1e-12)
    # Step k of the lone decode reads L + k context tokens, so each step is a little longer than step0. The
    # deflected prompt arrives inside step 5 (the sixth) and its first chunk starts when that step ends.
    boundaries = np.cumsum([prof.step_s(1, 1, L + k) for k in range(7)])
    assert boundaries[4] < t_defl < boundaries[5]
    assert defl.t_d_start == pytest.approx(boundaries[5], rel=1e-12)
    assert defl.t_first_token == pytest.approx(ref[1][0], rel=1e-12)
    assert dec.t_finish == pytest.approx(ref[0][-1], rel=1e-12)
    # the decode's TBT samples include the three slow steps, the rest are plain decode steps
    assert max(gaps) == pytest.approx(max(shared), rel=1e-12)


def test_budget_and_cap_limit_chunks():
    prof = simple_profile()
    # 3 running decodes leave 61 tokens of a 64-token budget: chunk = min(cap 40, 61) = 40
    arr = [(0.0, 100, 30, "join", None)] * 3 + [(1e-6, 200, 2, "deflect", 40)]
    node, reqs = run_node(prof, 64, arr)
    ref = reference(prof, 64, arr)
    assert reqs[3].t_first_token == pytest.approx(ref[3][0], rel=1e-12)
    assert math.isclose(reqs[3].t_finish, ref[3][-1], rel_tol=1e-12)


# -- KV blocks: growth and preemption against a step-by-step reference ---------------------------------------
def reference_kv(profile, budget, arrivals):
    """Step-by-step reference with vLLM V1 block accounting: admission takes the prompt's blocks (FCFS), every
    running decode takes a block in the step whose token starts a new one, and when a step cannot get its
    blocks the newest running decodes are preempted (recompute: prompt plus generated tokens, as a chunked
    prefill once re-admitted). Returns each request's token times and its preemption count."""
    blk = profile.kv_block_tokens
    total = profile.kv_capacity_tokens // blk

    def nb(x):
        return -(-x // blk)

    st = SimpleNamespace(used=0, queue=[], prefilling=[], running=[], joiners=[])
    tokens = {i: [] for i in range(len(arrivals))}
    preempts = dict.fromkeys(range(len(arrivals)), 0)
    pending = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])

    def try_admit():
        while st.queue:
            job = st.queue[0]
            need = nb(job["L"])
            if st.used + need > total:
                break
            st.queue.pop(0)
            st.used += need
            job["held"] = need
            if job["join"]:
                st.joiners.append(job)
            else:
                st.prefilling.append(job)

    def arrive(i):
        _, L, O, kind, cap = arrivals[i]
        st.queue.append({"i": i, "L": L, "done": 0, "cap": cap, "join": kind == "join"})
        try_admit()

    t, n, retry = 0.0, 0, False
    while pending or st.running or st.prefilling or st.joiners or st.queue:
        # step boundary at t: preempt (newest first) until the running decodes' new blocks fit
        need = sum(nb(r["ctx"]) - r["held"] for r in st.running)
        while need > total - st.used:
            v = max(st.running, key=lambda r: (r["first"], r["i"]))
            st.running.remove(v)
            st.used -= v["held"]
            need -= nb(v["ctx"]) - v["held"]
            preempts[v["i"]] += 1
            st.queue.insert(0, {"i": v["i"], "L": arrivals[v["i"]][1] + len(tokens[v["i"]]), "done": 0,
                                "cap": arrivals[v["i"]][4] if arrivals[v["i"]][3] == "deflect" else None,
                                "join": False})
            retry = True
        for job in st.joiners:
            st.running.append({"i": job["i"], "ctx": job["L"], "held": job["held"], "first": n + 1,
                               "left": arrivals[job["i"]][2]})
        st.joiners = []
        for r in st.running:
            st.used += nb(r["ctx"]) - r["held"]
            r["held"] = nb(r["ctx"])
        left = budget - len(st.running)
        chunks = []
        for p in st.prefilling:
            if left <= 0:
                break
            c = min(p["L"] - p["done"], left, p["cap"] or 1 << 60)
            chunks.append((p, c))
            left -= c
        if not st.running and not chunks:
            if retry and st.queue:
                retry = False
                try_admit()
                if st.prefilling:
                    continue
            assert pending, "reference stuck"
            t = max(t, arrivals[pending[0]][0])
            while pending and arrivals[pending[0]][0] <= t:
                arrive(pending.pop(0))
            continue
        B = len(st.running)
        dt = profile.step_s(B + sum(c for _, c in chunks), B, sum(r["ctx"] for r in st.running),
                            sum(c * c for _, c in chunks), sum(c * p["done"] for p, c in chunks))
        t_end = t + dt
        n += 1
        while pending and arrivals[pending[0]][0] < t_end:
            arrive(pending.pop(0))
        freed = False
        for r in st.running:
            tokens[r["i"]].append(t_end)
            r["ctx"] += 1
            r["left"] -= 1
            if r["left"] == 0:
                st.used -= r["held"]
                freed = True
        st.running = [r for r in st.running if r["left"] > 0]
        for p, c in chunks:
            p["done"] += c
            if p["done"] == p["L"]:
                st.prefilling.remove(p)
                i = p["i"]
                tokens[i].append(t_end)
                left_tok = arrivals[i][2] - len(tokens[i])
                if left_tok > 0:
                    st.running.append({"i": i, "ctx": p["L"] + 1, "held": p["held"], "first": n, "left": left_tok})
                else:
                    st.used -= p["held"]
                    freed = True
        t = t_end
        if (freed or retry) and st.queue:
            try_admit()
        retry = False
    return tokens, preempts


def _node_token_gaps(node, r):
    """A request's TBT samples from the node: segment-log steps of each run, plus each preemption's gap."""
    runs = list(r.tbt_runs or []) + [(r.first_step, r.last_step)]
    d = np.zeros(len(runs), np.int64)
    first = np.array([f for f, _ in runs])
    last = np.array([x for _, x in runs])
    owner, a, b, j0, j1 = tbt_pieces(SimpleNamespace(decode=[node]), d, first, last)
    got = [a[k] + b[k] * np.arange(j0[k], j1[k] + 1) for k in range(len(owner))]
    return np.concatenate(got + [np.asarray(r.stalls or [], float)])


@pytest.mark.parametrize("seed, blk, cap_tokens", [(0, 16, 6000), (1, 16, 4000), (2, 4, 3000), (3, 1, 5000),
                                                   (4, 16, 3500), (5, 8, 8000)])
def test_closed_form_blocks_and_preemption_match_step_by_step(seed, blk, cap_tokens):
    """Admission waits for blocks (FCFS), blocks grow step by step, the newest decodes are preempted and
    recomputed: first-token, finish and every TBT sample (preemption gaps included) as the reference."""
    rng = np.random.default_rng(seed)
    prof = simple_profile(kv_block_tokens=blk, kv_capacity_tokens=cap_tokens)
    arrivals = []
    for _ in range(30):
        kind = "deflect" if rng.random() < 0.4 else "join"
        arrivals.append((float(rng.uniform(0, 2.0)), int(rng.integers(16, 900)), int(rng.integers(1, 300)), kind,
                         int(rng.integers(64, 512)) if rng.random() < 0.5 else None))
    node, reqs = run_node(prof, 2048, arrivals, admit_joins=True)
    ref, preempts = reference_kv(prof, 2048, arrivals)
    assert sum(preempts.values()) > 0, "the pool is small enough to preempt"
    assert node.preemptions == sum(preempts.values())
    for r in reqs:
        toks = ref[r.rid]
        assert len(toks) == r.output_tokens, "nothing lost: every output token is produced"
        assert r.preemptions == preempts[r.rid]
        assert r.t_first_token == pytest.approx(toks[0], rel=1e-9, abs=1e-9)
        assert r.t_finish == pytest.approx(toks[-1], rel=1e-9, abs=1e-9)
        gaps = _node_token_gaps(node, r)
        np.testing.assert_allclose(np.sort(gaps), np.sort(np.diff(toks)), rtol=1e-7, atol=1e-9)
    assert node.used_blocks == 0 and node.peak_blocks <= node.total_blocks
