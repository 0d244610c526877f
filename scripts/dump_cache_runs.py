"""Exactness check for prefix-cache speed work: dump what a set of simulations produced, compare with a reference.

    python scripts/dump_cache_runs.py OUT.json           # dump every case
    python scripts/dump_cache_runs.py OUT.json REF.json  # and compare with a dump made before a change

A change to the cache's or the nodes' code that is meant to be exact must leave every case identical (the
protocol in docs/prefix_cache.md, "Speed"). To dump an older commit, export its tree (``git archive COMMIT | tar
-x -C DIR/deflectlab``) and run this script with ``PYTHONPATH=DIR``.

Each case dumps the ``ClusterSim.run`` summary (less its wall-clock and decision-time fields), the event count,
every request's slots (timestamps, hits, nodes, preemptions, TBT runs; whether it still holds cached blocks),
every decode node's segment log and block counts, and every node's cache: evictions, cached blocks, free blocks
and the free blocks in LRU order. The cases: round_robin, always_deflect and proactive on 2P2D and 16P16D, the
cache off, on and on with hashes no two requests share, at the bundled Mooncake trace's rate and at 3x; and on
2P2D and 1P3D with 150,000-, 300,000- and 1,000,000-token KV pools (evictions, preemptions, rejections), shared
and unshared hashes: 72 cases, about 25 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable, Iterator

from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.profile import load_profile
from deflectlab.envs.request import Request
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.workloads import Workload, make_workload
from deflectlab.policies.registry import make_policy

_VOLATILE = {"wall_s", "sim_loop_s", "metrics_s", "sim_requests_per_wall_s", "decision_us_mean"}
_SLOTS = sorted(s for s in Request.__slots__ if s not in ("p_held", "d_held", "hashes"))
POLICIES = ("round_robin", "always_deflect", "proactive")


def unshared(wl: Workload) -> Workload:
    """The same requests with hashes no two of them share (as ``scripts/bench_simulator.py``'s "no sharing" case;
    written out here, so that this script runs unchanged against an older tree)."""
    nxt, hashes = 0, []
    for h in wl.hash_ids:
        hashes.append(list(range(nxt, nxt + len(h))))
        nxt += len(h)
    return Workload(wl.arrival_s, wl.input_tokens, wl.output_tokens, hash_ids=hashes)


def dump(sim: ClusterSim, policy: str) -> str:
    """Run ``sim`` under ``policy`` and return what it produced, as text."""
    res = sim.run(make_policy(policy))
    out = [repr(sorted((k, v) for k, v in res.summary.items() if k not in _VOLATILE)), f"events {sim.events}"]
    out += [repr([getattr(r, s) for s in _SLOTS] + [r.p_held is None, r.d_held is None]) for r in sim.requests]
    for d in sim.decode:
        out.append(repr([list(d.log_n0), list(d.log_k), list(d.log_a), list(d.log_b), list(d.log_bsz),
                         list(d.log_join), d.steps_done, d.preemptions, d.static_blocks, d.peak_blocks]))
    for n in (*sim.prefill, *sim.decode):
        c = n.cache
        if c is not None:
            out.append(repr([c.evictions, len(c), c.n_free, c.free_blocks, c.free_hashes()]))
    return "\n".join(out)


def cases() -> Iterator[tuple[str, Callable[[], ClusterSim], str]]:
    """``(name, make the simulation, policy)`` for every case (see the module's docstring)."""
    wl = make_workload("mooncake_synthetic")
    rate3 = 3 * len(wl) / wl.duration_s
    for rate, w in (("1x", wl), ("3x", make_workload("mooncake_synthetic", rate=rate3))):
        for shape in ("2p2d", "16p16d"):
            for pol in POLICIES:
                for cache, on, ww in (("off", False, w), ("on", True, w), ("unshared", True, unshared(w))):
                    yield (f"{rate} {shape} {pol} {cache}",
                           lambda s=shape, o=on, x=ww: ClusterSim(ClusterConfig.from_shape(s, prefix_cache=o), x), pol)
    base = load_profile("a100-80gb_deepseek-v2-lite")
    for kv in (150_000, 300_000, 1_000_000):
        prof = dataclasses.replace(base, kv_capacity_tokens=kv)
        for shape in ("2p2d", "1p3d"):
            for pol in POLICIES:
                for cache, ww in (("on", wl), ("unshared", unshared(wl))):
                    yield (f"kv{kv} {shape} {pol} {cache}",
                           lambda s=shape, x=ww, p=prof: ClusterSim(ClusterConfig.from_shape(s), x, prefill_profile=p,
                                                                    decode_profile=p), pol)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON file to write: {case: dump text}")
    ap.add_argument("ref", nargs="?", help="a dump to compare with (exit status 1 if any case differs)")
    a = ap.parse_args()
    res = {}
    for name, make, pol in cases():
        res[name] = dump(make(), pol)
        print(name, hashlib.sha256(res[name].encode()).hexdigest()[:16], flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f)
    if a.ref:
        try:
            with open(a.ref) as f:
                ref = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit(f"{a.ref}: not a dump of this script ({e})")
        if not isinstance(ref, dict) or not all(isinstance(v, str) for v in ref.values()):
            sys.exit(f"{a.ref}: not a dump of this script (a JSON object of case name -> text)")
        bad = sorted(k for k in ref.keys() | res.keys() if ref.get(k) != res.get(k))
        print(f"{len(ref)} cases in the reference, {len(res)} now, {len(res) - len(bad)} identical; differ: {bad}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
