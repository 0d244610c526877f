"""The analog forecast of the lookahead planner: analogues drawn from a trace's training blocks, checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import planner_scores, play

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.workloads import Trace, Workload, make_workload
from deflectlab.policies.forecasts import ANALOG_STEP_S, AnalogPool
from deflectlab.policies.lookahead import Lookahead
from deflectlab.policies.registry import make_policy

CFG = ClusterConfig(handoff="vllm-nixl")


def _window(start_s: float = 300.0, load: float = 3.0) -> Workload:
    """A held-out-block window of the code trace (blocked split) replayed at ``load`` times its rate."""
    probe = make_workload("azure_code", start_s=start_s, duration_s=60.0)
    return make_workload("azure_code", start_s=start_s, duration_s=60.0, rate=load * probe.mean_rate)


def _toy_pool() -> AnalogPool:
    """Two blocks of a made-up trace: a quiet one (an arrival every 2 s) and a busy one (every 0.25 s)."""
    t = np.concatenate([np.arange(0.0, 40.0, 2.0), np.arange(100.0, 140.0, 0.25)])
    n = len(t)
    trace = Trace("toy", t, np.arange(1, n + 1) * 10, np.arange(1, n + 1) + 5, None, "test")
    return AnalogPool(trace, [(0.0, 40.0), (100.0, 140.0)], "toy")


def test_the_analogues_are_the_nearest_moments_and_their_futures_are_the_pool_s():
    pool = _toy_pool()
    scale, past, fut = 0.5, 2.0, 2.0  # 2 simulated s = 4 trace s
    starts, counts = pool.grid(scale, past, fut)
    # by hand: grid points every 0.1 trace s from a block's start + 4 s to its end - 4 s, counts in (s - 4, s]
    t = pool.trace.arrival_s
    want = [a + 4.0 + k * ANALOG_STEP_S / scale for a, b in pool.blocks for k in range(1000)
            if a + 4.0 + k * ANALOG_STEP_S / scale < b - 4.0 - 1e-9]
    assert np.allclose(starts, want)
    assert list(counts) == [sum(1 for x in t if s - 4.0 < x <= s) for s in starts]
    rng = np.random.default_rng(0)
    # a quiet present (2 arrivals in 4 trace s) draws from the quiet block, a busy one (16) from the busy block
    assert all(s < 40 for s in pool.draw(2, scale, past, fut, 5, rng))
    assert all(s > 100 for s in pool.draw(16, scale, past, fut, 5, rng))
    # 10 is nearer 16 than 2: the busy block again; and more draws than exact matches take the next nearest
    assert all(s > 100 for s in pool.draw(10, scale, past, fut, 3, rng))
    got = pool.draw(2, scale, past, fut, len(starts), rng)
    assert sorted(got) == sorted(starts)  # every candidate, once
    with pytest.raises(ValueError, match=f"toy: {len(starts) + 1} draws asked, but it has only {len(starts)} "
                                         "candidate moments at 2x load"):
        pool.draw(2, scale, past, fut, len(starts) + 1, rng)
    d = np.abs(counts[np.searchsorted(starts, got)] - 2)
    assert list(d) == sorted(d)  # nearest first

    # the future of one analogue, by hand, appended to a simulation's own arrivals up to now
    sim = ClusterSim(CFG, _window(load=1.0))
    play(sim, make_policy("never_deflect"), stop=30)
    s = 110.1
    f_t, f_in, f_out, hashes = pool.future(sim, s, scale, fut)
    i = sim._next
    assert hashes is None and f_t[:i] == sim._arr_t[:i] and f_in[:i] == sim._arr_in[:i]
    js = [j for j, x in enumerate(t) if s < x <= s + 4.0]
    assert len(js) == 16
    assert np.allclose(f_t[i:], [sim.now + (t[j] - s) * scale for j in js])
    assert f_in[i:] == [int(pool.trace.input_tokens[j]) for j in js]
    assert f_out[i:] == [int(pool.trace.output_tokens[j]) for j in js]


def test_the_analog_planner_does_not_read_the_window_s_future():
    """Two windows equal up to request 40 and different after it: the analog planner scores every candidate of the
    first 40 decisions the same in both (same seed), and its draws differ from one seed to another."""
    a = _window()
    later = np.arange(len(a)) >= 40
    b = Workload(a.arrival_s, np.where(later, 12000, a.input_tokens), a.output_tokens, meta=a.meta)

    def scores(wl, seed=0):
        pol = Lookahead(horizon_s=2.0, base="proactive", forecast="analog", samples=2, seed=seed)
        return planner_scores(ClusterSim(CFG, wl), pol, 40), pol

    sa, pol = scores(a)
    assert sa == scores(b)[0]
    assert sa != scores(a, seed=1)[0]
    assert pol.rollouts == 2 * sum(len(x) for x in sa)  # every candidate on both draws
    assert pol._scale == pytest.approx(1 / 3) and pol._pool.label == "azure_code (blocked split, train blocks)"
    assert not pol.clairvoyant


def test_an_episode_inside_the_pool_or_synthetic_is_refused():
    sim = ClusterSim(CFG, _window(start_s=650.0))  # a training block of the blocked split
    with pytest.raises(ValueError, match=r"window \[650, 710\) s of azure_code meets the analog pool"):
        make_policy("lookahead:horizon_s=2,forecast=analog").attach(sim)
    make_policy("lookahead:horizon_s=2,forecast=analog,pool_part=held_out").attach(sim)  # held-out blocks: fine
    gamma = make_workload("azure_code", start_s=300, num_requests=50, arrival="gamma", cv=4, rate=3.0)
    with pytest.raises(ValueError, match="needs a trace-replay episode"):
        make_policy("lookahead:horizon_s=2,forecast=analog").attach(ClusterSim(CFG, gamma))
    bare = Workload(np.array([0.0, 1.0]), np.array([100, 100]), np.array([5, 5]))
    with pytest.raises(ValueError, match="needs pool=<trace>"):
        make_policy("lookahead:horizon_s=2,forecast=analog").attach(ClusterSim(CFG, bare))


@pytest.mark.parametrize("spec, msg", [
    ("forecast=analog,samples=0", "samples must be a whole number >= 1"),
    ("forecast=analog,seed=-1", "seed must be a whole number >= 0"),
    ("forecast=analog,pool_part=test", "pool_part must be train or held_out"),
    ("forecast=analog,horizon_s=0", "forecast=analog needs horizon_s > 0"),
])
def test_bad_analog_parameters_are_named(spec, msg):
    with pytest.raises(ValueError, match=msg):
        make_policy(f"lookahead:{spec}")


def test_an_unknown_split_is_named():
    with pytest.raises(ValueError, match="unknown split 'weekly'"):
        make_policy("lookahead:horizon_s=2,forecast=analog,pool_split=weekly").attach(ClusterSim(CFG, _window()))


def test_reset_with_a_seed_reseeds_the_draws():
    """The draws are a function of the planner's seed and the seed ``reset`` is given (none: the planner's own)."""
    pool = _toy_pool()

    def draws(seed, reset_seed):
        pol = Lookahead(horizon_s=2.0, forecast="analog", seed=seed)
        pol.reset(reset_seed)
        return list(pool.draw(16, 0.5, 2.0, 2.0, 10, pol._rng))

    assert draws(0, 5) == draws(0, 5) and draws(0, None) == draws(0, None)
    assert len({tuple(draws(0, 5)), tuple(draws(0, 6)), tuple(draws(1, 5)), tuple(draws(0, None))}) == 4
