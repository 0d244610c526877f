"""``deflectlab main``: the README's main job (motivation study, then the policy comparison)."""

from __future__ import annotations

import argparse
from pathlib import Path

from deflectlab.experiments.main_job import DEFAULT_RATES, run_main


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser("main", help=help_text,
                       description=__doc__)
    p.add_argument("--out", type=Path, default=Path("results/main"), help="output folder (report.md inside)")
    p.add_argument("--rates", type=float, nargs="+", default=list(DEFAULT_RATES),
                   help="offered loads, requests/s")
    p.add_argument("--no-compare", action="store_true", help="only the never-deflect motivation study")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    report = run_main(a.out, rates=tuple(a.rates), compare=not a.no_compare)
    print(report.read_text())
    print(f"wrote {report}")
    return 0
