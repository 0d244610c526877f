"""``deflectlab calibrate``: fit a latency profile to measured step times and transfers; report the fit error.

    deflectlab calibrate --data measurements.csv --base a100-80gb_llama-3-8b --name h100_llama-3-8b \\
        --out h100_llama-3-8b.yaml [--holdout 0.3 --seed 0] [--json]

The measurement CSV format and the fit are described in ``envs/calibration.py`` and ``docs/calibration.md``.
Writes the profile (loadable by ``envs.profile.load_profile``) and the fit report beside it
(``<out stem>.fit.json``); prints the report (``--json``: as JSON). The report warns when a fitted term is
poorly determined (standard error above 50 % of its value) or held-out rows are predicted with a MAPE above
10 % (overall or for one kind); ``--strict`` then exits 1. Hardware and model names come from the rows'
``source`` (what ``deflectlab profile-gpu`` measured), else ``--hardware``/``--model``, else the base profile
(with a warning).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from deflectlab.envs.calibration import Measurement, fit_profile, read_many, split_holdout, with_holdout
from deflectlab.envs.profile import SCALAR_TERMS, load_profile


def parse_set(items: list[str]) -> dict[str, float]:
    """``TERM=VALUE`` pairs into a dict, each term checked against the profile's scalar terms."""
    out: dict[str, float] = {}
    for item in items:
        term, sep, value = item.partition("=")
        term = term.strip()
        if not sep or term not in SCALAR_TERMS:
            raise ValueError(f"--set {item!r}: expected TERM=VALUE with TERM one of {', '.join(SCALAR_TERMS)}")
        try:
            out[term] = float(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: value {value!r} is not a number") from None
    return out


def parse_knots(text: str | None) -> list[float] | None:
    """Comma-separated knot positions (tokens), or None."""
    if not text:
        return None
    try:
        return [float(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--knots {text!r}: expected comma-separated token counts, e.g. 1,64,512,4096") from None


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser(
        "calibrate",
        help=help_text,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        type=Path,
        help="measurement CSV(s): kind,num_tokens,decode_seqs,decode_ctx_tokens,chunk_tokens,"
        "prior_tokens,bytes,seconds[,source]",
    )
    p.add_argument(
        "--base",
        default=None,
        help="profile (bundled name or YAML path) for the terms the data does not determine",
    )
    p.add_argument("--name", required=True, help="name of the fitted profile")
    p.add_argument("--out", required=True, type=Path, help="profile YAML to write")
    p.add_argument("--hardware", default=None,
                   help="accelerator name (default: the device the rows' profile-gpu source names, else the base's)")
    p.add_argument("--model", default=None,
                   help="model name (default: the shape the rows' profile-gpu source names, else the base's)")
    p.add_argument("--tensor-parallel", type=int, default=None, help="tensor-parallel degree (default: the base's)")
    p.add_argument("--knots", default=None, help="linear-curve knots, tokens, comma-separated (default: automatic)")
    p.add_argument(
        "--set",
        dest="set_terms",
        action="append",
        default=[],
        metavar="TERM=VALUE",
        help="fix a scalar term instead of fitting it or taking it from the base (repeatable); "
        "e.g. overhead_s=0.002, kv_bytes_per_token=131072",
    )
    p.add_argument("--provenance", default="", help="how the data was measured, appended to every fitted source")
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction of each kind's rows held out of the fit and reported on (0: none); the written "
        "profile is the one fitted without them",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the holdout split")
    p.add_argument("--json", action="store_true", help="print the fit report as JSON instead of text")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when the report has a warning (a poorly determined term, a high held-out error); "
                        "the profile and report are still written")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = read_many(args.data)
    base = load_profile(args.base) if args.base else None
    held: list[Measurement] = []
    if args.holdout:
        rows, held = split_holdout(rows, args.holdout, np.random.default_rng(args.seed))
    profile, report = fit_profile(
        rows,
        base=base,
        knots=parse_knots(args.knots),
        name=args.name,
        hardware=args.hardware,
        model=args.model,
        provenance=args.provenance,
        tensor_parallel=args.tensor_parallel,
        set_terms=parse_set(args.set_terms),
        set_source="set on the deflectlab calibrate command line (--set)",
    )
    if args.holdout:
        report = with_holdout(report, profile, held, args.holdout, args.seed)
    out = profile.save(args.out)
    report_path = out.with_name(out.stem + ".fit.json")
    report_path.write_text(report.to_json())
    if args.json:
        print(json.dumps({"profile": str(out), "report": str(report_path), **report.to_dict()}, indent=2))
    else:
        print(report.format())
        print(f"wrote {out} and {report_path}")
    if not args.holdout:
        print("note: no rows held out (--holdout 0), so every error above is in-sample", file=sys.stderr)
    for w in report.warnings:
        print(f"deflectlab calibrate: warning: {w}", file=sys.stderr)
    if args.strict and report.warnings:
        print(f"deflectlab calibrate: --strict: {len(report.warnings)} warning(s), exit 1", file=sys.stderr)
        return 1
    return 0
