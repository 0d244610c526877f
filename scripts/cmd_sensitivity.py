"""``deflectlab sensitivity``: how the conclusions move with the KV hand-off (transport presets, dispatch delay).

    deflectlab sensitivity --out results/sensitivity

For each transport preset (vllm-nixl, rdma, tcp) and for vllm-nixl with its dispatch (orchestration) delay
swept over 0-400 ms: where P95 TTFT goes under never-deflect, and what the proactive deflector and the best
tuned prompt-length threshold gain over it. Writes ``report.md``, ``sensitivity.json`` and two plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return vals


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return vals


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    from deflectlab.experiments.sensitivity import RATES

    p = sub.add_parser("sensitivity", help=help_text, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/sensitivity"), help="output folder")
    p.add_argument("--rates", type=_floats, default=RATES,
                   help=f"loads, requests/s, comma-separated (default {','.join(f'{r:g}' for r in RATES)})")
    p.add_argument("--train-seeds", type=_ints, default=(100, 101), help="threshold-tuning windows' seeds")
    p.add_argument("--eval-seeds", type=_ints, default=(0, 1), help="held-out comparison windows' seeds")
    p.add_argument("--window", type=float, default=300.0, help="window length, trace seconds")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from deflectlab.experiments.sensitivity import run_sensitivity, sensitivity_markdown

    if a.window <= 0:
        raise SystemExit("deflectlab sensitivity: --window must be > 0 seconds")
    doc = run_sensitivity(a.out, rates=a.rates, train_seeds=a.train_seeds, eval_seeds=a.eval_seeds,
                          window_s=a.window, workers=a.workers, progress=not a.no_progress)
    md = sensitivity_markdown(doc)
    (a.out / "report.md").write_text("# deflectlab sensitivity\n\n" + md)
    print(md)
    print(f"wrote {a.out / 'report.md'}")
    return 0
