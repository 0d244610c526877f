"""Exactness check for speed work on the path estimates (:mod:`envs.estimates`, :mod:`policies.proactive`): dump
every decision and estimate of a set of simulations, compare with a reference.

    python scripts/dump_estimates.py OUT.txt            # dump every case
    python scripts/dump_estimates.py OUT.txt REF.txt    # and compare with a dump made before a change

A change meant to be exact must leave the dump byte for byte identical (``cmp OUT.txt REF.txt``). To dump an older
commit, export its tree (``git archive COMMIT | tar -x -C DIR/deflectlab``) and run this script with
``PYTHONPATH=DIR``.

Each case runs a simulation under a proactive deflector and writes, per decision, the decision (prefill or deflect,
node, chunk cap) and the ``repr`` of every number in ``Decision.estimates``, then the run's summary (less its
wall-clock and decision-time fields). The feature cases also build schema 3 and 4 observations (a
:class:`envs.features.FeatureBuilder` over the views of the proactive run, told each decision taken) and write,
per decision, the observation's and mask's bytes (hashed) and the ``repr`` of the builder's estimator's per-node
:meth:`~envs.estimates.PathEstimator.prefill_estimates` and :meth:`~envs.estimates.PathEstimator.deflect_estimates`.
The cases: 2P2D, 4P4D and 16P16D; ``azure_code`` and ``azure_conv`` at 1x, 2x and 3x their trace's rate (scaled
with the cluster's size); the proactive deflector with its defaults, ``margin=0.2,min_chunk=512``,
``tbt_safety=0.8,max_chunk=1024``, ``min_chunk=32``, ``sharing=serial`` and ``sharing=queue``; and the bundled
Mooncake trace with prefix caching on (2P2D and 16P16D, 1x and 3x).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Iterator
from typing import Any

from deflectlab.envs.config import ClusterConfig, parse_shape
from deflectlab.envs.features import FeatureBuilder
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.workloads import make_workload
from deflectlab.policies.registry import make_policy

_VOLATILE = {"wall_s", "sim_loop_s", "metrics_s", "sim_requests_per_wall_s", "decision_us_mean"}
SHAPES = ("2p2d", "4p4d", "16p16d")
TRACES = ("azure_code", "azure_conv")
LOADS = (1, 2, 3)
POLICIES = ("proactive", "proactive:margin=0.2,min_chunk=512", "proactive:tbt_safety=0.8,max_chunk=1024",
            "proactive:min_chunk=32", "proactive:sharing=serial", "proactive:sharing=queue")
REQUESTS_PER_2P2D = 600  # requests per case at 2P2D (scaled with the cluster)


def trace_rate(trace: str) -> float:
    """The bundled trace's own mean rate, requests/s."""
    wl = make_workload(trace)
    return len(wl) / wl.duration_s


def run_case(sim: ClusterSim, spec: str, features: bool) -> list[str]:
    """Run ``sim`` under the policy ``spec``; the dump's lines of every decision (and observation) and the summary."""
    policy = make_policy(spec)
    inner = policy.decide
    out: list[str] = []
    builders: list[tuple[FeatureBuilder, list[str]]] = []
    if features:
        for version in (3, 4):
            fb = FeatureBuilder(version)
            rec: list[str] = []
            est: Any = fb._est  # record the estimator's per-node numbers (features.py calls these two)
            pe, de = est.prefill_estimates, est.deflect_estimates

            def prefill_estimates(*a: Any, _f: Any = pe, _r: list[str] = rec, **k: Any) -> list[float]:
                v = _f(*a, **k)
                _r.append("P " + repr(v))
                return v

            def deflect_estimates(*a: Any, _f: Any = de, _r: list[str] = rec, **k: Any) -> list[tuple[int, float]]:
                v = _f(*a, **k)
                _r.append("D " + repr(v))
                return v

            est.prefill_estimates, est.deflect_estimates = prefill_estimates, deflect_estimates
            builders.append((fb, rec))

    def decide(view: Any, req: Any) -> Any:
        obs = []
        for fb, rec in builders:
            x = fb.build(view, req)
            m = fb.mask
            obs.append(hashlib.sha256(x.tobytes() + m.tobytes()).hexdigest()[:16] + " " + " | ".join(rec))
            rec.clear()
        dec = inner(view, req)
        for fb, _ in builders:
            fb.taken(dec)
        est = dec.estimates
        est_s = "-" if est is None else " ".join(f"{k}={v!r}" for k, v in sorted(est.items()))
        out.append(f"{req.rid} {dec} {est_s}")
        out.extend(f"  f{v} {o}" for v, o in zip((3, 4), obs))
        return dec

    policy.decide = decide  # type: ignore[method-assign]
    for fb, _ in builders:
        fb.reset()
    res = sim.run(policy)
    out.append("summary " + repr(sorted((k, v) for k, v in res.summary.items() if k not in _VOLATILE)))
    return out


def cases() -> Iterator[tuple[str, ClusterSim, str, bool]]:
    """``(name, simulation, policy spec, with features)`` for every case (see the module's docstring)."""
    for trace in TRACES:
        rate = trace_rate(trace)
        for shape in SHAPES:
            p, d = parse_shape(shape)
            scale = max(p, d) / 2.0
            n = int(REQUESTS_PER_2P2D * scale)
            for load in LOADS:
                wl = make_workload(trace, num_requests=n, rate=rate * load * scale)
                for spec in POLICIES:
                    feats = spec == "proactive"
                    yield (f"{trace} {shape} {load}x {spec}", ClusterSim(ClusterConfig.from_shape(shape), wl), spec,
                           feats)
    rate = trace_rate("mooncake_synthetic")
    for shape in ("2p2d", "16p16d"):
        p, d = parse_shape(shape)
        scale = max(p, d) / 2.0
        for load in (1, 3):
            wl = make_workload("mooncake_synthetic", num_requests=int(REQUESTS_PER_2P2D * scale),
                               rate=rate * load * scale)
            for spec in ("proactive", "proactive:margin=0.2,min_chunk=512"):
                yield (f"mooncake_synthetic cache {shape} {load}x {spec}",
                       ClusterSim(ClusterConfig.from_shape(shape, prefix_cache=True), wl), spec, spec == "proactive")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="text file to write")
    ap.add_argument("ref", nargs="?", help="a dump to compare with (exit status 1 if any line differs)")
    a = ap.parse_args()
    n_dec = 0
    with open(a.out, "w") as f:
        for name, sim, spec, feats in cases():
            lines = run_case(sim, spec, feats)
            n_dec += sum(1 for ln in lines if not ln.startswith((" ", "summary")))
            text = "\n".join(lines)
            f.write(f"== {name}\n{text}\n")
            print(name, len(lines), hashlib.sha256(text.encode()).hexdigest()[:16], flush=True)
    print(f"{n_dec} decisions dumped to {a.out}")
    if a.ref:
        try:
            with open(a.out) as f, open(a.ref) as g:
                now, ref = f.read().splitlines(), g.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            sys.exit(f"{a.ref}: cannot read it as a dump of this script ({e})")
        bad = [i for i, (x, y) in enumerate(zip(now, ref)) if x != y]
        same = not bad and len(now) == len(ref)
        print(f"{len(ref)} lines in the reference, {len(now)} now: " + ("identical" if same else
              f"{len(bad)} differ, first at line {bad[0] + 1 if bad else min(len(now), len(ref)) + 1}"))
        sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
