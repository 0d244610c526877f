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
    p.add_argument("--no-sensitivity", action="store_true", help="skip the hand-off sensitivity section")
    p.add_argument("--handoff", default=None,
                   help="KV hand-off transport preset (vllm-nixl, rdma, tcp; default vllm-nixl), e.g. "
                        "vllm-nixl:dispatch_s=0.2")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    if a.handoff is not None:
        from deflectlab.envs.handoff import HandoffError, parse_handoff

        try:
            parse_handoff(a.handoff)
        except HandoffError as e:
            raise SystemExit(f"deflectlab main: --handoff: {e}") from None
    report = run_main(a.out, rates=tuple(a.rates), compare=not a.no_compare, handoff=a.handoff,
                      sensitivity=not a.no_sensitivity)
    print(report.read_text())
    print(f"wrote {report}")
    return 0
