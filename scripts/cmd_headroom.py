"""``deflectlab headroom``: the clairvoyant lookahead planner against the heuristics (how much room is left).

    deflectlab headroom --out experiments/headroom --jobs 2

On held-out windows of both Azure traces at 1x-3x load, runs never-deflect, the proactive deflector, the best
tuned heuristic and the lookahead planner (clairvoyant: it knows the window's future arrivals), then a horizon
sweep of the planner. Writes ``report.md`` and ``headroom.json``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected non-negative numbers, got {text!r}")
    return vals


def _names(text: str) -> tuple[str, ...]:
    vals = tuple(x.strip() for x in text.split(",") if x.strip())
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one trace name")
    return vals


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser("headroom", help=help_text, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/headroom"), help="output folder")
    p.add_argument("--traces", type=_names, default=("azure_code", "azure_conv"), help="comma-separated traces")
    p.add_argument("--loads", type=_floats, default=(1.0, 2.0, 3.0), help="x the recorded rate, comma-separated")
    p.add_argument("--episodes", type=int, default=4, help="held-out episodes per (trace, load), >= 2")
    p.add_argument("--window", type=float, default=120.0, help="episode window, trace seconds")
    p.add_argument("--horizon", type=float, default=5.0, help="the table's planner horizon, simulated seconds")
    p.add_argument("--sweep-horizons", type=_floats, default=(0.5, 1.0, 2.0, 5.0, 10.0),
                   help="planner horizons of the sweep, seconds")
    p.add_argument("--sweep-trace", default="azure_code", help="the sweep's trace")
    p.add_argument("--sweep-load", type=float, default=3.0, help="the sweep's load")
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--learned", action="append", default=[], metavar="LABEL=SPEC",
                   help="instead of the planner: evaluate this learned policy (e.g. dagger=learned:path=DIR) "
                        "against the heuristics with paired differences; repeatable")
    p.add_argument("--shapes", default="2x2", help="with --learned: cluster shapes PxD, comma-separated")
    p.set_defaults(func=run)


def _learned(a: argparse.Namespace) -> int:
    from deflectlab.experiments.learned_eval import evaluate_learned, write_learned
    from deflectlab.scripts.cmd_dagger import parse_shapes
    from deflectlab.scripts.options import labelled

    try:
        learned = labelled(a.learned, "LABEL=SPEC")
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"deflectlab headroom: --learned: {e}") from None
    try:
        shapes = parse_shapes(a.shapes)
    except argparse.ArgumentTypeError as e:
        raise SystemExit(f"deflectlab headroom: --shapes: {e}") from None
    settings = [(s, tr, ld) for s in shapes for tr in a.traces for ld in a.loads]
    res = evaluate_learned(learned, settings, a.episodes, window_s=a.window, jobs=a.jobs)
    path = write_learned(res, a.out, "deflectlab " + " ".join(shlex.quote(x) for x in sys.argv[1:]))
    print(path.read_text())
    print(f"wrote {path}")
    return 0


def run(a: argparse.Namespace) -> int:
    from deflectlab.experiments.headroom import HeadroomSpec, run_headroom, write_report

    if a.jobs < 1:
        raise SystemExit("deflectlab headroom: --jobs must be >= 1")
    if a.learned:
        return _learned(a)
    try:
        spec = HeadroomSpec(traces=a.traces, loads=a.loads, episodes=a.episodes, window_s=a.window,
                            horizon_s=a.horizon, sweep_horizons=a.sweep_horizons, sweep_trace=a.sweep_trace,
                            sweep_load=a.sweep_load, jobs=a.jobs)
    except ValueError as e:
        raise SystemExit(f"deflectlab {e}") from None
    res = run_headroom(spec)
    path = write_report(res, a.out, "deflectlab " + " ".join(shlex.quote(x) for x in sys.argv[1:]))
    print(path.read_text())
    print(f"wrote {path}")
    return 0
