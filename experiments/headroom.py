"""The headroom experiment: how much better than the heuristics could deflection get?

The clairvoyant lookahead planner (:mod:`deflectlab.policies.lookahead`) is run against never-deflect, the
proactive deflector and the best tuned heuristic (the prompt-length threshold that won the tuning on the
training windows, ``experiments/policies/tuned_azure_code_2p2d.yaml``) on the same held-out windows of both
bundled Azure traces, at 1x-3x their recorded rate. The planner's margin over the best heuristic is the
*headroom* a learned (non-clairvoyant) policy could at most hope to close. A horizon sweep shows whether the
planner's score has converged in its horizon.

Episodes are drawn exactly as the Gymnasium environment draws them (``DeflectionEnv.episode_workload``): a
window of ``window_s`` trace seconds starting uniformly in the held-out span, its arrivals compressed by the
load factor. The tuned thresholds saw only windows in [0, 894) s of the code trace, so [1200, 1800) s is
held out for both traces.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deflectlab.experiments.markdown import table

TUNED_FILE = Path(__file__).parent / "policies" / "tuned_azure_code_2p2d.yaml"
#: held out from the tuning windows ([0, 894) s of the code trace) and from the kept policy's training ([0, 1200) s)
HELD_OUT_START_S = (1200.0, None)
PLANNER = "lookahead"
#: Student-t 0.975 quantiles for the 95 % confidence interval of a mean paired difference, by degrees of freedom.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


@dataclass
class HeadroomSpec:
    """What the experiment runs. Seeds ``seed0 + i`` draw episode ``i`` of every (trace, load) setting."""

    traces: tuple[str, ...] = ("azure_code", "azure_conv")
    loads: tuple[float, ...] = (1.0, 2.0, 3.0)
    episodes: int = 4
    window_s: float = 120.0
    seed0: int = 3_000_000
    horizon_s: float = 5.0
    sweep_horizons: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
    sweep_trace: str = "azure_code"
    sweep_load: float = 3.0
    handoff: str = "vllm-nixl"
    jobs: int = 1
    heuristics: dict[str, str] = field(default_factory=dict)  # label -> policy spec; filled from the tuned file

    def __post_init__(self) -> None:
        if self.episodes < 2:
            raise ValueError(f"headroom: episodes must be >= 2 (a confidence interval needs two), got {self.episodes}")
        if not self.loads or min(self.loads) <= 0:
            raise ValueError(f"headroom: loads must be positive multiples of the recorded rate, got {self.loads}")
        if not self.sweep_horizons or min(self.sweep_horizons) < 0:
            raise ValueError(f"headroom: sweep horizons must be >= 0 seconds, got {self.sweep_horizons}")
        if self.window_s <= 0:
            raise ValueError(f"headroom: window_s must be > 0 seconds, got {self.window_s}")


#: the label prefix of the tuning winner among a comparison's heuristics (``best tuned (<name>)``)
WINNER_PREFIX = "best tuned"


def winner_label(heuristics: dict[str, str] | list[str]) -> str:
    """The label of the tuning winner among ``heuristics`` (labels, or label -> spec)."""
    return next(k for k in heuristics if k.startswith(WINNER_PREFIX))


def baseline_policies(tuned_file: Path = TUNED_FILE) -> dict[str, str]:
    """never-deflect, the proactive deflector and the best tuned heuristic (the tuning's winner)."""
    from deflectlab.experiments.tuning import load_tuned

    tuned, meta = load_tuned(tuned_file)
    best = _tuning_winner(tuned_file)
    params = ",".join(f"{k}={v}" for k, v in tuned[best].items())
    return {"never_deflect": "round_robin", "proactive": "proactive", f"{WINNER_PREFIX} ({best})": f"{best}:{params}"}


def _tuning_winner(tuned_file: Path) -> str:
    import yaml

    scores = (yaml.safe_load(tuned_file.read_text()) or {}).get("scores") or {}
    if not scores:
        raise ValueError(f"{tuned_file}: no 'scores' to pick the best tuned heuristic from")
    return max(scores, key=lambda n: (scores[n]["slo_attainment"], -scores[n]["ttft_p95_s"]))


def planner_spec(horizon_s: float, best_spec: str) -> str:
    """The planner, its rollouts' future arrivals routed by the best tuned heuristic."""
    name, _, params = best_spec.partition(":")
    base = ",".join(f"base_{kv}" for kv in params.split(",") if kv)
    return f"{PLANNER}:horizon_s={horizon_s:g},base={name}" + (f",{base}" if base else "")


def episode(trace: str, load: float, seed: int, window_s: float, handoff: str, shape: tuple[int, int] = (2, 2),
            variant: dict[str, Any] | None = None):
    """The workload of one held-out episode, drawn as the environment draws it, and its cluster config.

    ``variant`` (optional) changes how it is drawn: ``arrival`` (``trace``, ``poisson``, ``gamma``, ...) and ``cv``
    (the arrival process of ``envs.workloads``, lengths still from the trace's window), ``start_s`` (the span of
    window starts, default :data:`HELD_OUT_START_S`; a trace shorter than 1,200 s needs its own).
    """
    from deflectlab.envs.gym_env import DeflectionEnv

    v = variant or {}
    env = DeflectionEnv(trace=trace, load=[load, load], window_s=window_s,
                        window_start_s=list(v.get("start_s", HELD_OUT_START_S)),
                        arrival=v.get("arrival", "trace"), cv=float(v.get("cv", 1.0)),
                        cluster={"handoff": handoff, "num_prefill": shape[0], "num_decode": shape[1]})
    wl, meta = env.episode_workload(seed=seed)
    return env.config, wl, meta


def run_one(task: tuple) -> dict[str, Any]:
    """One policy on one episode: SLO attainment, P95 TTFT, deflected share, wall time and decisions/s.

    ``task``: ``(trace, load, seed, window_s, handoff, spec[, shape[, variant]])`` (see :func:`episode`)."""
    from deflectlab.envs.simulator import ClusterSim
    from deflectlab.policies.registry import make_policy

    trace, load, seed, window_s, handoff, spec = task[:6]
    shape = task[6] if len(task) > 6 else (2, 2)
    variant = task[7] if len(task) > 7 else None
    cfg, wl, meta = episode(trace, load, seed, window_s, handoff, shape, variant)
    sim = ClusterSim(cfg, wl)
    t0 = time.perf_counter()
    s = sim.run(make_policy(spec)).summary
    wall = time.perf_counter() - t0
    n = s["requests"]
    return {"trace": trace, "load": load, "seed": seed, "policy": spec, "requests": n,
            "shape": f"{shape[0]}P{shape[1]}D", "variant": (variant or {}).get("label", ""),
            "slo_met": round(s["slo_attainment"] * n), "slo_attainment": s["slo_attainment"],
            "ttft_p95_s": s["ttft_s"]["p95"], "deflected": sim.deflections / n if n else math.nan,
            "wall_s": wall, "decisions_per_s": n / max(sim.decision_s, 1e-9), "start_s": meta["start_s"]}


def run_all(tasks: list[tuple], jobs: int) -> list[dict[str, Any]]:
    """:func:`run_one` on every task, in ``jobs`` processes (in order)."""
    if jobs <= 1:
        return [run_one(t) for t in tasks]
    with ProcessPoolExecutor(jobs) as ex:
        return list(ex.map(run_one, tasks, chunksize=1))


def run_headroom(spec: HeadroomSpec) -> dict[str, Any]:
    """Run the table and the sweep; returns the raw rows and the aggregated results."""
    heur = spec.heuristics or baseline_policies()
    best_label = winner_label(heur)
    policies = {**heur, "lookahead (clairvoyant)": planner_spec(spec.horizon_s, heur[best_label])}
    seeds = [spec.seed0 + i for i in range(spec.episodes)]
    tasks = [(tr, ld, sd, spec.window_s, spec.handoff, p) for tr in spec.traces for ld in spec.loads
             for sd in seeds for p in policies.values()]
    sweep = {h: planner_spec(h, heur[best_label]) for h in spec.sweep_horizons}
    tasks += [(spec.sweep_trace, spec.sweep_load, sd, spec.window_s, spec.handoff, p) for sd in seeds
              for h, p in sweep.items() if p not in policies.values() or spec.sweep_load not in spec.loads
              or spec.sweep_trace not in spec.traces]
    t0 = time.perf_counter()
    rows = run_all(tasks, spec.jobs)
    wall = time.perf_counter() - t0
    return {"spec": asdict(spec), "policies": policies, "best": best_label, "sweep_specs": sweep,
            "rows": rows, "wall_s": wall}


def rows_by(rows: list[dict[str, Any]], trace: str, load: float, policy: str) -> list[dict[str, Any]]:
    out = [r for r in rows if r["trace"] == trace and r["load"] == load and r["policy"] == policy]
    return sorted(out, key=lambda r: r["seed"])


def paired_ci(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of ``a - b`` over paired episodes and the half-width of its 95 % Student-t interval."""
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    if n < 2:
        return float(d.mean()) if n else math.nan, math.nan
    df = n - 1
    t = _T975[max(k for k in _T975 if k <= df)] if df <= 30 else 1.96
    return float(d.mean()), float(t * d.std(ddof=1) / math.sqrt(n))


def pooled(rs: list[dict[str, Any]]) -> float:
    """SLO attainment pooled over the episodes' requests."""
    n = sum(r["requests"] for r in rs)
    return sum(r["slo_met"] for r in rs) / n if n else math.nan


def HEAD(policies: dict[str, str]) -> list[str]:  # noqa: N802 - a column list, named like a constant
    return ["trace", "load", "requests", *policies.keys(), "headroom, pooled (points)",
            "headroom, paired per episode (points, 95 % CI)", "planner decisions/s"]


def headroom_rows(res: dict[str, Any]) -> list[list[Any]]:
    """One row per (trace, load): pooled attainment per policy, then planner minus best heuristic with its CI."""
    spec, pol, rows = res["spec"], res["policies"], res["rows"]
    best, plan = pol[res["best"]], pol["lookahead (clairvoyant)"]
    out = []
    for tr in spec["traces"]:
        for ld in spec["loads"]:
            cells: list[Any] = [tr, f"{ld:g}x", sum(r["requests"] for r in rows_by(rows, tr, ld, best))]
            cells += [f"{pooled(rows_by(rows, tr, ld, p)):.4f}" for p in pol.values()]
            m, h = paired_ci([r["slo_attainment"] for r in rows_by(rows, tr, ld, plan)],
                             [r["slo_attainment"] for r in rows_by(rows, tr, ld, best)])
            cells.append(f"{100 * (pooled(rows_by(rows, tr, ld, plan)) - pooled(rows_by(rows, tr, ld, best))):+.2f}")
            cells.append(f"{100 * m:+.2f} ± {100 * h:.2f}")
            cells.append(f"{np.mean([r['decisions_per_s'] for r in rows_by(rows, tr, ld, plan)]):.0f}")
            out.append(cells)
    return out


def sweep_rows(res: dict[str, Any]) -> list[list[Any]]:
    spec, rows = res["spec"], res["rows"]
    tr, ld = spec["sweep_trace"], spec["sweep_load"]
    best = res["policies"][res["best"]]
    base = rows_by(rows, tr, ld, best)
    out = []
    for h, p in res["sweep_specs"].items():
        rs = rows_by(rows, tr, ld, p)
        m, ci = paired_ci([r["slo_attainment"] for r in rs], [r["slo_attainment"] for r in base])
        out.append([f"{float(h):g}", f"{pooled(rs):.4f}", f"{100 * m:+.2f} ± {100 * ci:.2f}",
                    f"{np.mean([r['ttft_p95_s'] for r in rs]):.3f}", f"{np.mean([r['deflected'] for r in rs]):.3f}",
                    f"{np.mean([r['decisions_per_s'] for r in rs]):.0f}"])
    return out


def write_report(res: dict[str, Any], out: Path, command: str) -> Path:
    """``report.md`` and ``headroom.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    res = {**res, "command": command}
    (out / "headroom.json").write_text(json.dumps(res, indent=1, default=float))
    spec, pol = res["spec"], res["policies"]
    lines = [
        "# Headroom: the clairvoyant lookahead planner against the heuristics", "",
        f"Command: `{command}` ({res['wall_s']:.0f} s wall; the 2-core machine was shared with other runs, so "
        "times and decisions/s are indicative).", "",
        "**The planner is clairvoyant**: it knows the window's future arrivals (and, through the model, their "
        "output lengths). It measures how much room there is above the heuristics; it is not deployable.", "",
        f"Held-out episodes: {spec['episodes']} per setting, {spec['window_s']:g}-s windows starting in "
        f"[{HELD_OUT_START_S[0]:g}, end - window] s of each trace, arrivals compressed by the load factor, "
        f"2P2D A100 DeepSeek-V2-Lite, hand-off `{spec['handoff']}`, TTFT SLO 1 s, TBT SLO 0.1 s. The same "
        f"episodes for every policy (seeds {spec['seed0']}..{spec['seed0'] + spec['episodes'] - 1}).", "",
        "Policies: " + "; ".join(f"{k} = `{v}`" for k, v in pol.items()) + ".", "",
        "SLO attainment pooled over the episodes' requests. Headroom = planner - best tuned heuristic, in "
        "points: pooled over requests, and as the mean of the per-episode differences with a 95 % Student-t "
        "interval (episodes weigh equally there, so the two differ when episodes differ in size).", "",
    ]
    lines += table(HEAD(pol), headroom_rows(res))
    lines += ["", f"## Horizon sweep ({spec['sweep_trace']}, {spec['sweep_load']:g}x load)", "",
              "The planner's score against its horizon (seconds of future arrivals each rollout routes before it "
              "drains); the difference is against the best tuned heuristic on the same episodes.", ""]
    lines += table(["horizon (s)", "SLO attainment", "vs best tuned (points)", "mean P95 TTFT (s)", "deflected",
                    "decisions/s"], sweep_rows(res))
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


COMMITTED = Path(__file__).parent / "headroom"


def headroom_summary(folder: Path = COMMITTED) -> str:
    """The main job's short headroom section, read from the committed run (the planner takes minutes, so the
    main job does not rerun it); empty when there is none."""
    path = folder / "headroom.json"
    if not path.is_file():
        return ""
    res = json.loads(path.read_text())
    lines = ["## Headroom: the clairvoyant lookahead planner", "",
             "How much better than the heuristics a policy could get: the lookahead planner (clairvoyant about "
             "each window's future arrivals; a reference, not deployable) on held-out windows of both Azure "
             "traces. Not rerun by the main job (it takes minutes); from the committed run "
             "`experiments/headroom/report.md` (`" + res.get("command", "deflectlab headroom") + "`), where the "
             "horizon sweep is.", ""]
    lines += table(HEAD(res["policies"]), headroom_rows(res))
    return "\n".join(lines + [""])
