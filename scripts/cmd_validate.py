"""``deflectlab validate``: a profile's predictions against measured step times and transfers.

    deflectlab validate --profile h100_llama-3-8b.yaml --data measurements.csv --out runs/validate

Writes ``validation.json`` (error per kind: MAPE, median and p95 absolute percentage error, signed bias;
every row's prediction) and ``predicted_vs_measured.png`` (log-log scatter coloured by kind, with y = x).
Step rows are predicted as ``step_s - overhead_s`` (measured seconds exclude the engine's per-step overhead,
see ``docs/calibration.md``); ``--with-overhead`` adds it for measurements that include it.

Rows the profile was fitted to are no validation. The fit report beside the profile (``<stem>.fit.json``,
written by ``deflectlab calibrate``) names every fitted and every held-out row; without it, rows from the files
the profile records as its calibration data count as fitted. When fitted rows are among ``--data``, validate
says so loudly, scores the other rows separately, and ``--held-out`` scores only those.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
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
    p.add_argument("--held-out", action="store_true",
                   help="score only rows the profile was not fitted to (per its .fit.json or calibration data)")
    p.set_defaults(func=run)


def _row_key(origin: str) -> tuple[str, str]:
    """``(resolved file, line)`` of a row's ``file:line`` origin."""
    f, _, line = origin.rpartition(":")
    return str(Path(f).resolve()), line


def fit_rows(profile_arg: str, profile) -> tuple[Callable[[Measurement], bool], str]:
    """A test for "this row was used to fit the profile", and where that knowledge comes from.

    From ``<profile stem>.fit.json`` beside a profile file (the exact rows), else from the files the profile's
    ``meta.calibration.data`` lists (every row of those files); else no row counts as fitted.
    """
    path = Path(profile_arg)
    report = path.with_name(path.stem + ".fit.json")
    if path.suffix in (".yaml", ".yml") and report.is_file():
        doc = json.loads(report.read_text())
        keys = {_row_key(r["origin"]) for r in doc.get("predictions", [])}
        return (lambda m: _row_key(m.origin) in keys), f"the fit report {report}"
    files = {str(Path(f).resolve()) for f in (profile.meta.get("calibration") or {}).get("data", [])}
    if files:
        return (lambda m: _row_key(m.origin)[0] in files), "the profile's calibration data files"
    return (lambda m: False), "nothing (no fit report, no calibration data recorded)"


def _choose_rows(args: argparse.Namespace, profile, rows: list[Measurement]) -> tuple[list[Measurement], int]:
    """The rows to score and how many of them the fit used; warns loudly when that is not zero."""
    used, where = fit_rows(args.profile, profile)
    n_fit = sum(used(m) for m in rows)
    if args.held_out:
        rows = [m for m in rows if not used(m)]
        if not rows:
            raise ValueError(f"--held-out: every row of the data was used to fit {profile.name} (per {where}); "
                             "measure new rows, or calibrate with --holdout")
        return rows, 0
    if n_fit:
        print(f"deflectlab validate: WARNING: {n_fit} of {len(rows)} rows were used to fit {profile.name} "
              f"(per {where}): their errors are in-sample, not a validation. The other {len(rows) - n_fit} "
              "rows are scored separately below; --held-out scores only them.", file=sys.stderr)
    return rows, n_fit


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
    rows, n_fit = _choose_rows(args, profile, read_many(args.data))
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
        "scored": "held-out rows only" if args.held_out else "all rows",
        "rows_used_by_fit": n_fit,
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
    what = "held-out rows" if args.held_out else (f"rows, {n_fit} of them fitted (in-sample)" if n_fit else "rows")
    print(f"profile {profile.name} against {len(rows)} {what} of {', '.join(str(d) for d in args.data)}")
    _print_table({**by_kind, "all": overall})
    if n_fit and n_fit < len(rows):
        fresh = np.array([not m for m in _fitted_mask(args, profile, rows)])
        sub = [m for m, f in zip(rows, fresh) if f]
        doc["not_fitted"] = {"by_kind": errors_by_kind(sub, predicted[fresh]),
                             "overall": error_stats(measured[fresh], predicted[fresh])}
        json_path.write_text(json.dumps(doc, indent=2))
        print(f"  of which the {len(sub)} rows the fit did not use:")
        _print_table({**doc["not_fitted"]["by_kind"], "all": doc["not_fitted"]["overall"]})
    print(f"wrote {json_path} and {png_path}")
    return 0


def _fitted_mask(args: argparse.Namespace, profile, rows: list[Measurement]) -> list[bool]:
    used, _ = fit_rows(args.profile, profile)
    return [used(m) for m in rows]


def _print_table(stats: dict[str, dict[str, float]]) -> None:
    print("  kind         rows    MAPE %  median %   p95 %   bias %")
    for kind, s in stats.items():
        print(f"  {kind:<10} {s['n']:>6} {s['mape_pct']:>9.2f} {s['median_ape_pct']:>9.2f} {s['p95_ape_pct']:>7.2f} "
              f"{s['bias_pct']:>8.2f}")
