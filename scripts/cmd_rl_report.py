"""``deflectlab rl-report``: learning curves over seeds and a paired held-out evaluation of trained networks.

    deflectlab rl-report --runs runs/rl/rl-scratch-* --learned scratch_s0=runs/rl/rl-scratch-fixed-...-s0-... \\
        --out experiments/rl

Reads finished training run directories (``deflectlab train``, with or without ``--ray``), plots each run
name's periodic held-out evaluations (one line per seed, their mean, the baselines on the same episodes),
rolls out the no-training diagnosis (``experiments/rl_diagnosis.py``), and evaluates the ``--learned`` networks
with never-deflect, the proactive deflector and the best tuned heuristic on fresh held-out episodes (windows
starting in [1200, 1488] s) at each load, with paired differences and 95 % intervals. Writes ``report.md``,
``curves.png`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser("rl-report", help=help_text, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="training run directories (curves)")
    p.add_argument("--ablation", nargs="*", default=[], help="single runs listed one per row (what each changed)")
    p.add_argument("--learned", action="append", default=[], metavar="LABEL=RUN_DIR",
                   help="a run whose network the final evaluation includes; repeatable")
    p.add_argument("--which", default="final", choices=("final", "best"),
                   help="final network (model.zip) or the best periodic evaluation's")
    p.add_argument("--out", type=Path, default=Path("results/rl"), help="output folder")
    p.add_argument("--episodes", type=int, default=20, help="held-out episodes per load (>= 2)")
    p.add_argument("--loads", type=float, nargs="+", default=[1.0, 2.0, 3.0], help="x the recorded rate")
    p.add_argument("--window", type=float, default=300.0, help="episode window, trace seconds")
    p.add_argument("--wandb-dir", type=Path, default=None,
                   help="where the report's W&B run goes (default OUT/wandb)")
    p.add_argument("--wandb-mode", default="offline", choices=("offline", "online", "disabled"),
                   help="W&B mode of the report's run (offline by default: no network)")
    p.add_argument("--no-diagnosis", action="store_true", help="skip the no-training diagnosis")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deflectlab.experiments.rl_report import write_report
    from deflectlab.scripts.options import labelled

    try:
        learned = labelled(args.learned, "LABEL=RUN_DIR")
    except argparse.ArgumentTypeError as e:
        print(f"deflectlab rl-report: --learned: {e}", file=sys.stderr)
        return 2
    if args.episodes < 2:
        print(f"deflectlab rl-report: --episodes must be >= 2 (a paired interval needs two), got {args.episodes}",
              file=sys.stderr)
        return 2
    command = "deflectlab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    res = write_report(args.runs, args.out, learned, command, episodes=args.episodes, loads=tuple(args.loads),
                       window_s=args.window, diagnosis=not args.no_diagnosis, which=args.which,
                       wandb_dir=args.wandb_dir, wandb_mode=args.wandb_mode,
                       ablation_dirs=args.ablation)
    for r in res["paired"]:
        print(f"{r['load']:g}x {r['policy']}: SLO attainment {r['slo_attainment']:.3f}, vs best "
              f"{100 * r['diff_vs_best']:+.2f} ± {100 * r['ci95']:.2f} points")
    print(f"written to {args.out}")
    return 0
