"""Pictures of a policy comparison (matplotlib, Agg backend, PNG).

* ``ttft_p95_vs_load.png``: P95 TTFT against offered load, one line per policy (mean over seeds, bars from
  the lowest to the highest seed), log scale;
* ``slo_attainment_vs_load.png``: SLO attainment (TTFT and TBT) against load;
* ``tbt_slo_attainment_vs_load.png``: TBT SLO attainment against load (what deflection costs);
* ``ttft_cdf.png``: TTFT CDFs of every policy at one load, pooled over seeds;
* ``ttft_breakdown_p95.png``: where the P95 TTFT goes, per policy, at that load (stacked bars; the mean over
  seeds of each component's mean over the requests at or above P95).

The CDF and breakdown pictures reuse :mod:`experiments.plots`, the single-run plotting module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from deflectlab.envs.metrics import COMPONENTS
from deflectlab.experiments.plots import plot_breakdown, plot_ttft_cdf

if TYPE_CHECKING:
    from deflectlab.experiments.compare import ComparisonResult


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _x(rate: float | None, trace_rate: float | None) -> float:
    return float(rate if rate is not None else (trace_rate or math.nan))


def plot_metric_vs_load(result: ComparisonResult, metric: str, path: Path, ylabel: str, title: str,
                        logy: bool = False, scale: float = 1.0) -> Path:
    """One line per policy: the per-load mean over seeds of ``metric``, with min-max bars where recorded."""
    plt = _plt()
    table = result.table()
    cfg = result.config
    fig, ax = plt.subplots(figsize=(6.6, 4.3))
    for policy in cfg.policies:
        rows = [a for a in table if a["policy"] == policy]
        rows.sort(key=lambda a: cfg.rates.index(a["rate"]))
        trace_rate = rows[0].get("offered_rate_rps") if rows else None
        xs = np.array([_x(a["rate"], trace_rate) for a in rows])
        ys = np.array([a[metric] for a in rows], float) * scale
        style = {"lw": 2.2} if policy == "proactive" or policy.startswith("proactive:") else {"lw": 1.2}
        if f"{metric}_min" in rows[0]:
            lo = np.array([a[f"{metric}_min"] for a in rows], float) * scale
            hi = np.array([a[f"{metric}_max"] for a in rows], float) * scale
            ax.errorbar(xs, ys, yerr=np.vstack([np.maximum(ys - lo, 0), np.maximum(hi - ys, 0)]), marker="o", ms=4,
                        capsize=3, label=policy, **style)
        else:
            ax.plot(xs, ys, marker="o", ms=4, label=policy, **style)
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(result: ComparisonResult, out: Path) -> dict[str, Path]:
    """Write every comparison picture into ``out``; returns ``{title: path}`` in report order."""
    cfg = result.config
    cl = cfg.cluster
    where = f"{cl.shape}, {cfg.trace}"
    plots: dict[str, Path] = {}
    plots["P95 TTFT vs load"] = plot_metric_vs_load(
        result, "ttft_p95_s", out / "ttft_p95_vs_load.png", "P95 TTFT (s)", f"P95 TTFT vs load ({where})",
        logy=True)
    plots["SLO attainment vs load"] = plot_metric_vs_load(
        result, "slo_attainment", out / "slo_attainment_vs_load.png", "SLO attainment (%)",
        f"SLO attainment vs load (TTFT <= {cl.ttft_slo_s:g} s, P95 TBT <= {cl.tbt_slo_s:g} s)", scale=100.0)
    plots["TBT SLO attainment vs load"] = plot_metric_vs_load(
        result, "tbt_slo_attainment", out / "tbt_slo_attainment_vs_load.png", "TBT SLO attainment (%)",
        f"Requests with P95 TBT <= {cl.tbt_slo_s:g} s ({where})", scale=100.0)

    rate = result.cdf_rate()
    at = "as recorded" if rate is None else f"{rate:g} req/s"
    cdfs: dict[str, np.ndarray] = {}
    bars: dict[str, dict[str, float]] = {}
    for policy in cfg.policies:
        runs = [r for r in result.runs if r.policy == policy and r.rate == rate]
        if not runs:
            continue
        cdfs[policy] = np.concatenate([r.ttft_s for r in runs])
        bars[policy] = {c: float(np.nanmean([(r.summary.get("ttft_breakdown_p95") or {}).get(c, math.nan)
                                              for r in runs])) for c in COMPONENTS}
    plots[f"TTFT CDF at {at}"] = plot_ttft_cdf(cdfs, out / "ttft_cdf.png",
                                               title=f"TTFT CDF at {at}, pooled over seeds ({where})",
                                               slo_s=cl.ttft_slo_s)
    plots[f"P95 TTFT breakdown at {at}"] = plot_breakdown(
        bars, out / "ttft_breakdown_p95.png",
        title=f"Where P95 TTFT goes at {at} (mean over requests at or above P95, mean over seeds)")
    return plots
