"""``deflectlab main``: the README's main job (motivation study, then the policy comparison)."""

from __future__ import annotations

import argparse
from pathlib import Path

from deflectlab.experiments.main_job import DEFAULT_RATES, run_main
from deflectlab.scripts.options import add_cluster_flags, add_rates_flag, cluster_from_flags, parse_rates


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser("main", help=help_text,
                       description=__doc__)
    p.add_argument("--out", type=Path, default=Path("results/main"), help="output folder (report.md inside)")
    add_rates_flag(p, DEFAULT_RATES, allow_trace=False)
    add_cluster_flags(p)
    p.add_argument("--no-compare", action="store_true", help="only the never-deflect motivation study")
    p.add_argument("--no-sensitivity", action="store_true", help="skip the hand-off sensitivity section")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    rates = tuple(float(r) for r in parse_rates(a.rates, allow_trace=False))  # type: ignore[arg-type]
    report = run_main(a.out, rates=rates, compare=not a.no_compare, cluster=cluster_from_flags(a),
                      sensitivity=not a.no_sensitivity)
    print(report.read_text())
    print(f"wrote {report}")
    return 0
