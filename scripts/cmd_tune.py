"""``deflectlab tune``: grid-search the threshold heuristics' parameters on training windows.

    deflectlab tune azure_code --rates 3.21 5 8            # writes runs/tune/tuned_azure_code_2p2d.yaml
    deflectlab compare azure_code --tuned runs/tune/tuned_azure_code_2p2d.yaml

The shipped file ``experiments/policies/tuned_<trace>_<shape>.yaml`` (what ``compare --tuned auto`` and
``main`` read) is replaced only when ``--out`` names it.

Training seeds (default 100-104) must differ from the evaluation seeds; unless ``--span`` is given the training
windows are 300 s from the first half of the trace (see :mod:`experiments.tuning`). The objective is mean SLO
attainment over every training (rate, seed) run, ties broken by the lower mean P95 TTFT.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from deflectlab.experiments.compare import DEFAULT_RATES, ComparisonConfig
from deflectlab.scripts.cmd_compare import add_common_args, config_from_args, tuned_path_for
from deflectlab.scripts.options import add_policies_flag, parse_policies

#: Where ``tune`` writes by default: a run folder, never the shipped file that ``compare --tuned auto`` reads.
DEFAULT_OUT_DIR = Path("runs") / "tune"


def default_out(cfg: ComparisonConfig) -> Path:
    """``runs/tune/tuned_<trace>_<shape>.yaml``: the shipped file's name, outside the package."""
    return DEFAULT_OUT_DIR / tuned_path_for(cfg).name


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    from deflectlab.experiments.tuning import GRIDS, TRAIN_SEEDS

    p = sub.add_parser("tune", help=help_text,
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, DEFAULT_RATES, f"{TRAIN_SEEDS[0]}-{TRAIN_SEEDS[-1]}", "300")
    add_policies_flag(p, tuple(GRIDS), "policies to tune (names of the tuning grids)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"YAML to write (default {DEFAULT_OUT_DIR}/tuned_<trace>_<shape>.yaml; the shipped "
                        "experiments/policies/ file is written only when named here)")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from deflectlab.envs.workloads import load_trace
    from deflectlab.experiments.tuning import TRAIN_SPAN_FRACTION, save_tuned, tune

    cfg = config_from_args(a, ("round_robin",))
    if cfg.span is None:  # training windows from the first half of the trace, unless told otherwise
        end = float(load_trace(cfg.trace).arrival_s[-1])
        cfg = replace(cfg, span=(0.0, end * TRAIN_SPAN_FRACTION))
    results = tune(cfg, parse_policies(a.policies), progress=not a.no_progress)
    out = a.out or default_out(cfg)
    save_tuned(results, out, cfg, command=cfg.command)
    for name, r in results.items():
        params = ", ".join(f"{k}={v}" for k, v in r.best.items())
        print(f"{name:<20} {params:<34} SLO attainment {r.slo_attainment:6.1%}  P95 TTFT {r.ttft_p95_s:7.3f} s")
    shipped = tuned_path_for(cfg)
    note = (" (the shipped file: compare --tuned auto and main read it)" if out.resolve() == shipped.resolve()
            else f"; use it with `deflectlab compare --tuned {out}` (the shipped {shipped.name} is unchanged)")
    print(f"wrote {out}{note}", file=sys.stderr)
    return 0
