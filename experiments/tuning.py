"""Fair baselines: tune each threshold heuristic's parameters on training windows before comparing.

A threshold heuristic is only as good as its threshold, and the best one depends on the trace, the cluster and
the load. So before a comparison each heuristic gets the best value of its parameter(s) from a small grid,
chosen on *training* workloads: seeds disjoint from the evaluation seeds and, by default, windows from the
first half of the trace only (``span``), so no evaluation request decides a threshold. The objective is SLO
attainment (TTFT and TBT) averaged over every training (rate, seed) run, ties broken by the lower mean P95
TTFT. One value per policy serves every load, as a deployed threshold would; the proactive deflector is not
tuned (its defaults are used as they are).

The grids are small (8 values; 8 x 8 for ``dynamo_isl_or_load``) and a run of a 300 s window takes about a tenth
of a second, so the search is exhaustive and deterministic rather than sampled (Optuna would add nothing but
noise here). The result is a YAML file that ``deflectlab compare --tuned FILE`` reads::

    meta: {trace: azure_code, rates: [...], seeds: [...], span: [0, 894], objective: ..., cluster: {...}}
    policies:
      length_threshold: {max_len: 1024}
      ...
    trials: {length_threshold: [{params: {...}, slo_attainment: ..., ttft_p95_s: ...}, ...]}
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deflectlab.envs.config import read_yaml
from deflectlab.experiments.compare import ComparisonConfig, run_comparison, spans
from deflectlab.policies.registry import available, make_policy

#: Parameter grids of the tunable heuristics: policy name -> parameter -> values.
GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "length_threshold": {"max_len": (128, 256, 512, 1024, 1536, 2048, 3072, 4096)},
    "queue_threshold": {"max_waiting_tokens": (0, 2048, 4096, 8192, 16384, 32768, 65536, 131072)},
    "dynamo_isl": {"isl_bound": (128, 256, 512, 1024, 1536, 2048, 3072, 4096)},
    "dynamo_load": {"load_frac": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)},
    "dynamo_isl_or_load": {"isl_bound": (256, 512, 1024, 1536, 2048, 3072, 4096, 8192),
                           "load_frac": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)},
    # llm-d-style affinity (policies/prefix_affinity.py): the uncached-prompt threshold for deflecting, and the
    # weight of the cache against the queue (queue_weight stays 2, llm-d's default profile)
    "prefix_affinity": {"pd_threshold": (0, 256, 512, 1024, 2048, 4096, 8192, 16384),
                        "prefix_weight": (0.0, 1.0, 3.0, 10.0)},
}
#: Training seeds used when none are given; the evaluation default is 0, 1, 2.
TRAIN_SEEDS: tuple[int, ...] = (100, 101, 102, 103, 104)
#: Training windows: 300 s of trace time from the first half of the bundled 30-minute trace.
TRAIN_WINDOW_S = 300.0
TRAIN_SPAN_FRACTION = 0.5


@dataclass
class TuneResult:
    """The grid search of one policy.

    :param policy: registry name.
    :param best: the chosen parameters.
    :param slo_attainment: the chosen parameters' mean SLO attainment over the training runs, in [0, 1].
    :param ttft_p95_s: their mean P95 TTFT, seconds.
    :param trials: every grid point with its mean SLO attainment and P95 TTFT, best first.
    """

    policy: str
    best: dict[str, Any]
    slo_attainment: float
    ttft_p95_s: float
    trials: list[dict[str, Any]]


def grid_specs(policy: str, grid: dict[str, tuple[float, ...]] | None = None) -> list[tuple[dict[str, Any], str]]:
    """Every ``(params, spec)`` of ``policy``'s grid."""
    grid = grid or GRIDS.get(policy)
    if not grid:
        raise ValueError(f"tune: policy {policy!r} has no parameter grid; tunable: {', '.join(sorted(GRIDS))}")
    names = list(grid)
    out = []
    for values in itertools.product(*(grid[n] for n in names)):
        params = {n: _plain(v) for n, v in zip(names, values)}
        out.append((params, policy + ":" + ",".join(f"{k}={v}" for k, v in params.items())))
    return out


def _plain(v: Any) -> Any:
    """Grid values as YAML-friendly ints where whole."""
    return int(v) if isinstance(v, (int, float)) and float(v).is_integer() and not isinstance(v, bool) else v


def training_config(cfg: ComparisonConfig, seeds: tuple[int, ...] | None = None) -> ComparisonConfig:
    """``cfg`` made a training config: training seeds, and (unless ``cfg`` names a span) 300 s windows from
    the first half of the trace."""
    from deflectlab.envs.workloads import load_trace

    seeds = seeds or TRAIN_SEEDS
    span = cfg.span
    window = cfg.window_s
    if span is None:
        end = float(load_trace(cfg.trace).arrival_s[-1])
        span = (0.0, end * TRAIN_SPAN_FRACTION)
        window = min(window or TRAIN_WINDOW_S, TRAIN_WINDOW_S)
    return replace(cfg, seeds=tuple(seeds), span=span, window_s=window)


def tune(cfg: ComparisonConfig, policies: tuple[str, ...] | None = None, progress: bool = True
         ) -> dict[str, TuneResult]:
    """Grid-search each policy's parameters on the training workloads of ``cfg`` (its rates, seeds, windows).

    All grid points of all policies run in one :func:`experiments.compare.run_comparison` (identical request
    streams, all cores). ``cfg`` is used as given: build it with :func:`training_config` for the defaults.

    :param cfg: the training setup (trace, rates, seeds, windows, cluster).
    :param policies: registry names to tune (default: every policy with a grid).
    :param progress: show a tqdm bar on stderr.
    :returns: per policy, the best parameters and every trial.
    """
    policies = tuple(policies or GRIDS)
    known = set(available())
    for p in policies:
        if p not in known:
            raise ValueError(f"tune: unknown policy {p!r}; available: {', '.join(sorted(known))}")
    specs: dict[str, tuple[str, dict[str, Any]]] = {}
    for p in policies:
        for params, spec in grid_specs(p):
            make_policy(spec)  # a bad grid value fails here, naming it
            specs[spec] = (p, params)
    run_cfg = replace(cfg, policies=tuple(specs), baseline=next(iter(specs)), tuned=None)
    result = run_comparison(run_cfg, progress=progress)
    per_spec: dict[str, list[tuple[float, float]]] = {}
    for r in result.runs:
        s = r.summary
        per_spec.setdefault(r.policy, []).append((float(s["slo_attainment"]), float(s["ttft_s"]["p95"])))
    out: dict[str, TuneResult] = {}
    for p in policies:
        trials = []
        for spec, (owner, params) in specs.items():
            if owner != p:
                continue
            vals = per_spec[spec]
            slo = float(np.mean([v[0] for v in vals]))
            p95 = float(np.nanmean([v[1] for v in vals])) if any(math.isfinite(v[1]) for v in vals) else math.inf
            trials.append({"params": params, "slo_attainment": slo, "ttft_p95_s": p95})
        trials.sort(key=lambda t: (-round(t["slo_attainment"], 9), t["ttft_p95_s"]))
        best = trials[0]
        out[p] = TuneResult(policy=p, best=dict(best["params"]), slo_attainment=best["slo_attainment"],
                            ttft_p95_s=best["ttft_p95_s"], trials=trials)
    return out


def _span_meta(span: Any) -> list | None:
    """The span as the tuned file records it: ``[lo, hi]``, or ``[[lo, hi], ...]`` for several."""
    if span is None:
        return None
    blocks = spans(span)
    return list(blocks[0]) if len(blocks) == 1 else [list(b) for b in blocks]


def save_tuned(results: dict[str, TuneResult], path: str | Path, cfg: ComparisonConfig,
               command: str | None = None) -> Path:
    """Write the tuned parameters (and how they were found) as the YAML :func:`load_tuned` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": {
            "objective": "mean SLO attainment over the training (rate, seed) runs; ties: lower mean P95 TTFT",
            "trace": cfg.trace, "rates": [r for r in cfg.rates], "seeds": list(cfg.seeds),
            "window_s": cfg.window_s, "span": _span_meta(cfg.span), "arrival": cfg.arrival,
            "cluster": cfg.cluster.to_dict(), "command": command,
        },
        "policies": {p: r.best for p, r in results.items()},
        "scores": {p: {"slo_attainment": round(r.slo_attainment, 6), "ttft_p95_s": round(r.ttft_p95_s, 6)}
                   for p, r in results.items()},
        "trials": {p: [{"params": t["params"], "slo_attainment": round(t["slo_attainment"], 6),
                        "ttft_p95_s": round(t["ttft_p95_s"], 6)} for t in r.trials]
                   for p, r in results.items()},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=110))
    return path


def load_tuned(path: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Read a tuned-parameters file: ``(policy name -> params, meta)``. Every entry must build a policy."""
    path = Path(path)
    doc = read_yaml(path, "tuned-parameters file")
    if not isinstance(doc, dict) or not isinstance(doc.get("policies"), dict):
        raise ValueError(f"{path}: expected a mapping with a 'policies' mapping of policy name -> parameters")
    tuned: dict[str, dict[str, Any]] = {}
    for name, params in doc["policies"].items():
        if not isinstance(params, dict):
            raise ValueError(f"{path}: parameters of {name!r} must be a mapping, got {params!r}")
        try:
            make_policy({"name": name, **params})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        tuned[str(name)] = dict(params)
    meta = doc.get("meta") or {}
    return tuned, meta if isinstance(meta, dict) else {}


def check_disjoint(eval_cfg: ComparisonConfig, meta: dict[str, Any]) -> None:
    """Refuse to evaluate on the seeds the parameters were tuned on (same trace)."""
    train = set(meta.get("seeds") or [])
    if meta.get("trace") == eval_cfg.trace and train & set(eval_cfg.seeds):
        raise ValueError(f"evaluation seeds {sorted(train & set(eval_cfg.seeds))} were used to tune the "
                         f"parameters (training seeds {sorted(train)}); evaluate on other seeds")
