"""Pictures of runs: TTFT CDFs and the P95 TTFT breakdown as stacked bars (matplotlib, Agg, PNG)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from deflectlab.envs.metrics import RunResult

COLORS = {
    "p_queue": "#d62728", "prefill_exec": "#1f77b4", "handoff_wait": "#ff7f0e", "transfer": "#9467bd",
    "decode_wait": "#8c564b", "first_step": "#7f7f7f", "d_queue": "#e377c2", "chunked_prefill": "#17becf",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, title: str, path: Path) -> Path:
    """Title, grid and legend; write the PNG and free the figure."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ttft_cdf(series: Mapping[str, np.ndarray], path: Path, title: str = "TTFT CDF",
                  slo_s: float | None = None) -> Path:
    """One CDF line per label (TTFT in seconds, log x axis)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, x in series.items():
        x = np.sort(np.asarray(x, float)[np.isfinite(x)])
        if len(x):
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=label)
    if slo_s:
        ax.axvline(slo_s, color="k", ls=":", lw=1, label=f"TTFT SLO {slo_s:g} s")
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    return _finish(plt, fig, ax, title, path)


def plot_breakdown(bars: Mapping[str, Mapping[str, float]], path: Path,
                   title: str = "Where P95 TTFT goes (mean over requests at or above P95)") -> Path:
    """Stacked bars: one bar per label, one segment per TTFT component (seconds)."""
    from deflectlab.envs.metrics import COMPONENT_LABELS, COMPONENTS

    plt = _plt()
    labels = list(bars)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(labels) + 2.5), 4.6))
    bottom = np.zeros(len(labels))
    for comp in COMPONENTS:
        vals = np.array([bars[lb].get(comp, 0.0) or 0.0 for lb in labels])
        vals = np.where(np.isfinite(vals), vals, 0.0)
        if not vals.any():
            continue
        ax.bar(labels, vals, bottom=bottom, label=COMPONENT_LABELS[comp], color=COLORS[comp])
        bottom += vals
    ax.set_ylabel("seconds")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_vs_load(xs: Sequence[float], series: Mapping[str, Sequence[float]], path: Path, ylabel: str,
                 title: str, logy: bool = False) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for label, ys in series.items():
        ax.plot(xs, [y if y is not None and not math.isnan(y) else np.nan for y in ys], marker="o", label=label)
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    return _finish(plt, fig, ax, title, path)


def plot_run(result: RunResult, out: Path) -> list[Path]:
    """The standard pictures of one simulated run."""
    from deflectlab.experiments.labels import policy_label

    s = result.summary
    name = policy_label(s.get("policy") or "run")
    return [
        plot_ttft_cdf({name: result.records["ttft_s"]}, out / "ttft_cdf.png",
                      slo_s=s.get("slo", {}).get("ttft_slo_s")),
        plot_breakdown({name: s["ttft_breakdown_p95"]}, out / "ttft_breakdown_p95.png"),
    ]
