"""Pictures of a policy comparison (matplotlib, Agg backend, PNG).

* ``ttft_p95_vs_load.png``: P95 TTFT against offered load, one line per policy (mean over seeds, bars from
  the lowest to the highest seed), log scale;
* ``slo_attainment_vs_load.png``: SLO attainment (TTFT and TBT) against load;
* ``tbt_slo_attainment_vs_load.png``: TBT SLO attainment against load (what deflection costs);
* ``ttft_cdf.png``: TTFT CDFs of every policy at one load, pooled over seeds;
* ``ttft_breakdown_p95.png``: where the P95 TTFT goes, per policy, at that load (stacked bars; the mean over
  seeds of each component's mean over the requests at or above P95).

Policies whose plotted values are identical share one line, labelled ``a = b = c``, so every legend entry is a
visible line; legends show policy names with paths shortened (:func:`experiments.labels.policy_label`); every
figure with error bars says what they are. A y axis is logarithmic where the values span a decade or more.

This module knows the comparison only through :class:`ComparisonLike` (it does not import
:mod:`experiments.compare`, which calls it). The CDF and breakdown pictures reuse :mod:`experiments.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deflectlab.envs.metrics import COMPONENTS
from deflectlab.experiments.labels import policy_label
from deflectlab.experiments.plots import plot_breakdown, plot_ttft_cdf


class ComparisonLike(Protocol):
    """What the plots read of a comparison result (:class:`experiments.compare.ComparisonResult`)."""

    config: Any
    runs: list[Any]

    def table(self) -> list[dict[str, Any]]: ...

    def cdf_rate(self) -> float | None: ...


def merge_identical(series: dict[str, Any]) -> dict[str, Any]:
    """Series with equal values (``numpy.array_equal``, NaN equal to NaN) merged under ``"a = b = c"``, first
    appearance order kept."""
    groups: list[tuple[list[str], Any]] = []
    for label, values in series.items():
        for names, v in groups:
            if _same(v, values):
                names.append(label)
                break
        else:
            groups.append(([label], values))
    return {" = ".join(names): v for names, v in groups}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    a, b = np.asarray(a, float), np.asarray(b, float)
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))


def spans_decades(values: Sequence[float] | np.ndarray, ratio: float = 10.0) -> bool:
    """True when the finite positive values span at least ``ratio`` (max / min): worth a log axis."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    return len(v) > 1 and float(v.max() / v.min()) >= ratio


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _x(rate: float | None, trace_rate: float | None) -> float:
    return float(rate if rate is not None else (trace_rate or math.nan))


def _series(result: ComparisonLike, metric: str, scale: float) -> dict[str, tuple[np.ndarray, ...]]:
    """Per policy label: ``(x, mean, lowest, highest)`` over loads of ``metric`` (means and extremes over
    seeds; the extremes are NaN where the table has none)."""
    cfg = result.config
    table = result.table()
    out: dict[str, tuple[np.ndarray, ...]] = {}
    for policy in cfg.policies:
        rows = sorted((a for a in table if a["policy"] == policy), key=lambda a: cfg.rates.index(a["rate"]))
        if not rows:
            continue
        trace_rate = rows[0].get("offered_rate_rps")
        xs = np.array([_x(a["rate"], trace_rate) for a in rows])
        cols = [np.array([a.get(k, math.nan) for a in rows], float) * scale
                for k in (metric, f"{metric}_min", f"{metric}_max")]
        out[policy_label(policy)] = (xs, *cols)
    return out


def plot_metric_vs_load(result: ComparisonLike, metric: str, path: Path, ylabel: str, title: str,
                        logy: bool | None = None, scale: float = 1.0) -> Path:
    """One line per group of policies with identical values: the per-load mean over seeds of ``metric``, with
    bars from the lowest to the highest seed where recorded. ``logy=None``: log scale when values span a decade."""
    plt = _plt()
    seeds = len(result.config.seeds)
    series = merge_identical(_series(result, metric, scale))
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    bars = False
    for label, (xs, ys, lo, hi) in series.items():
        style = {"lw": 2.2} if label.startswith("proactive") or " proactive" in label else {"lw": 1.2}
        if seeds > 1 and np.isfinite(lo).any():
            err = np.vstack([np.maximum(ys - lo, 0), np.maximum(hi - ys, 0)])
            ax.errorbar(xs, ys, yerr=np.nan_to_num(err), marker="o", ms=4, capsize=3, label=label, **style)
            bars = True
        else:
            ax.plot(xs, ys, marker="o", ms=4, label=label, **style)
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel(ylabel)
    values = np.concatenate([np.concatenate([v[1], v[2], v[3]]) for v in series.values()]) if series else []
    if logy if logy is not None else spans_decades(values):
        ax.set_yscale("log")
        ax.set_ylabel(ylabel + ", log scale")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=1 if len(series) < 5 else 2)
    if bars:
        fig.text(0.01, 0.01, f"markers: mean over {seeds} seeds (workload windows); bars: lowest to highest seed",
                 fontsize=7, ha="left", va="bottom")
    if len(series) < len(result.config.policies):
        fig.text(0.99, 0.01, "a = b: identical values, one line", fontsize=7, ha="right", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(result: ComparisonLike, out: Path) -> dict[str, Path]:
    """Write every comparison picture into ``out``; returns ``{title: path}`` in report order."""
    cfg = result.config
    cl = cfg.cluster
    where = f"{cl.shape}, {Path(cfg.trace).name}"
    plots: dict[str, Path] = {}
    plots["P95 TTFT vs load"] = plot_metric_vs_load(
        result, "ttft_p95_s", out / "ttft_p95_vs_load.png", "P95 TTFT (s)", f"P95 TTFT vs load ({where})")
    plots["SLO attainment vs load"] = plot_metric_vs_load(
        result, "slo_attainment", out / "slo_attainment_vs_load.png", "SLO attainment (%)",
        f"SLO attainment vs load (TTFT <= {cl.ttft_slo_s:g} s, P95 TBT <= {cl.tbt_slo_s:g} s)", logy=False,
        scale=100.0)
    plots["TBT SLO attainment vs load"] = plot_metric_vs_load(
        result, "tbt_slo_attainment", out / "tbt_slo_attainment_vs_load.png", "TBT SLO attainment (%)",
        f"Requests with P95 TBT <= {cl.tbt_slo_s:g} s ({where})", logy=False, scale=100.0)

    rate = result.cdf_rate()
    at = "as recorded" if rate is None else f"{rate:g} req/s"
    cdfs: dict[str, np.ndarray] = {}
    bars: dict[str, dict[str, float]] = {}
    for policy in cfg.policies:
        runs = [r for r in result.runs if r.policy == policy and r.rate == rate]
        if not runs:
            continue
        cdfs[policy_label(policy)] = np.concatenate([r.ttft_s for r in runs])
        bars[policy_label(policy)] = {
            c: float(np.nanmean([(r.summary.get("ttft_breakdown_p95") or {}).get(c, math.nan) for r in runs]))
            for c in COMPONENTS}
    plots[f"TTFT CDF at {at}"] = plot_ttft_cdf(merge_identical(cdfs), out / "ttft_cdf.png",
                                               title=f"TTFT CDF at {at}, pooled over seeds ({where})",
                                               slo_s=cl.ttft_slo_s)
    plots[f"P95 TTFT breakdown at {at}"] = plot_breakdown(
        bars, out / "ttft_breakdown_p95.png",
        title=f"Where P95 TTFT goes at {at} (mean over requests at or above P95, mean over seeds)")
    return plots
