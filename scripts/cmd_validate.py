"""``deflectlab validate``: a profile's predictions against measured step times and transfers.

    deflectlab validate --profile h100_llama-3-8b.yaml --data measurements.csv --out runs/validate

Writes ``validation.json`` (error per kind: MAPE, median and p95 absolute percentage error, signed bias;
every row's prediction) and ``predicted_vs_measured.png`` (log-log scatter coloured by kind, with y = x).
Step rows are predicted as ``step_s - overhead_s`` (measured seconds exclude the engine's per-step overhead,
see ``docs/calibration.md``); ``--with-overhead`` adds it for measurements that include it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from deflectlab.envs.calibration import (
    KINDS,
    Measurement,
    error_stats,
    errors_by_kind,
    predict,
    read_many,
    row_predictions,
)
from deflectlab.envs.profile import load_profile

KIND_COLOURS = {"prefill": "tab:blue", "decode": "tab:orange", "mixed": "tab:green", "transfer": "tab:purple"}


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser(
        "validate",
        help=help_text,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profile", required=True, help="profile: bundled name or YAML path")
    p.add_argument("--data", nargs="+", required=True, type=Path, help="measurement CSV(s)")
    p.add_argument("--out", required=True, type=Path, help="directory for validation.json and the plot")
    p.add_argument(
        "--with-overhead",
        action="store_true",
        help="the measured seconds include the engine's per-step overhead: predict step_s itself",
    )
    p.set_defaults(func=run)


def plot(rows: list[Measurement], predicted: np.ndarray, title: str, path: Path) -> Path:
    """Log-log scatter of predicted against measured seconds, coloured by kind, with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = np.array([m.seconds for m in rows])
    kinds = np.array([m.kind for m in rows])
    fig, ax = plt.subplots(figsize=(6, 6))
    for kind in KINDS:
        sel = kinds == kind
        if sel.any():
            ax.scatter(
                measured[sel],
                predicted[sel],
                s=14,
                alpha=0.75,
                color=KIND_COLOURS[kind],
                label=f"{kind} ({int(sel.sum())})",
            )
    pos = np.concatenate([measured, predicted[predicted > 0]])
    lo, hi = pos.min() / 1.5, pos.max() * 1.5
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="y = x")
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(lo, hi),
        ylim=(lo, hi),
        xlabel="measured, s",
        ylabel="predicted, s",
        title=title,
    )
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    rows = read_many(args.data)
    predicted = predict(profile, rows, with_overhead=args.with_overhead)
    measured = np.array([m.seconds for m in rows])
    by_kind = errors_by_kind(rows, predicted)
    overall = error_stats(measured, predicted)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {
        "profile": profile.name,
        "profile_path": str(args.profile),
        "data": [str(d) for d in args.data],
        "with_overhead": bool(args.with_overhead),
        "overall": overall,
        "by_kind": by_kind,
        "rows": row_predictions(rows, predicted),
    }
    json_path = args.out / "validation.json"
    json_path.write_text(json.dumps(doc, indent=2))
    png_path = plot(
        rows,
        predicted,
        f"{profile.name} vs {', '.join(d.name for d in args.data)}",
        args.out / "predicted_vs_measured.png",
    )
    print(f"profile {profile.name} against {len(rows)} rows of {', '.join(str(d) for d in args.data)}")
    print("  kind         rows    MAPE %  median %   p95 %   bias %")
    for kind, s in {**by_kind, "all": overall}.items():
        print(
            f"  {kind:<10} {s['n']:>6} {s['mape_pct']:>9.2f} {s['median_ape_pct']:>9.2f} "
            f"{s['p95_ape_pct']:>7.2f} "
            f"{s['bias_pct']:>8.2f}"
        )
    print(f"wrote {json_path} and {png_path}")
    return 0
