"""Evaluate a learned policy against the heuristics on held-out episodes, with paired differences.

Every policy replays the same held-out episodes (``experiments.headroom.episode``: windows in [1200, 1800) s,
drawn as the environment draws them) on each (shape, trace, load) setting; the table gives pooled SLO
attainment, P95 TTFT, and each learned policy's paired per-episode difference against the best tuned
heuristic with a 95 % Student-t interval. A policy that refuses a shape (the fixed-shape v1 export on 4P4D)
is shown as not applicable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from deflectlab.experiments.headroom import baseline_policies, paired_ci, pooled
from deflectlab.experiments.markdown import table
from deflectlab.policies.runtime import PolicyFileError


def _safe_run(task: tuple) -> dict[str, Any] | None:
    from deflectlab.experiments.headroom import run_one

    try:
        return run_one(task)
    except PolicyFileError:
        return None


def evaluate_learned(learned: dict[str, str], settings: list[tuple[tuple[int, int], str, float]], episodes: int,
                     window_s: float = 120.0, seed0: int = 4_000_000, handoff: str = "vllm-nixl",
                     jobs: int = 1) -> dict[str, Any]:
    """Run heuristics and ``learned`` (label -> policy spec) on ``episodes`` held-out episodes of each
    ``(shape, trace, load)``."""
    heur = baseline_policies()
    best = next(k for k in heur if k.startswith("best tuned"))
    pols = {**heur, **learned}
    tasks = [(tr, ld, seed0 + i, window_s, handoff, spec, shape) for shape, tr, ld in settings
             for i in range(episodes) for spec in pols.values()]
    t0 = time.perf_counter()
    if jobs <= 1:
        rows = [_safe_run(t) for t in tasks]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as ex:
            rows = list(ex.map(_safe_run, tasks, chunksize=4))
    return {"policies": pols, "best": best, "settings": [[list(s), t, ld] for s, t, ld in settings],
            "episodes": episodes, "window_s": window_s, "seed0": seed0, "rows": [r for r in rows if r],
            "wall_s": time.perf_counter() - t0}


def _sel(rows, shape, trace, load, spec):
    return sorted((r for r in rows if r["shape"] == shape and r["trace"] == trace and r["load"] == load
                   and r["policy"] == spec), key=lambda r: r["seed"])


def learned_markdown(res: dict[str, Any], command: str) -> str:
    pols, rows = res["policies"], res["rows"]
    best = pols[res["best"]]
    learned = [k for k in pols if k not in baseline_policies()]
    head = ["shape", "trace", "load", *(f"{k} SLO / P95 TTFT" for k in pols),
            *(f"{k} - best tuned (points, 95 % CI)" for k in learned)]
    out = []
    for (P, D), tr, ld in res["settings"]:
        shape = f"{P}P{D}D"
        cells: list[Any] = [shape, tr, f"{ld:g}x"]
        for spec in pols.values():
            rs = _sel(rows, shape, tr, ld, spec)
            cells.append(f"{pooled(rs):.4f} / {np.mean([r['ttft_p95_s'] for r in rs]):.2f} s" if rs else "n/a")
        base = [r["slo_attainment"] for r in _sel(rows, shape, tr, ld, best)]
        for k in learned:
            rs = _sel(rows, shape, tr, ld, pols[k])
            if rs:
                m, h = paired_ci([r["slo_attainment"] for r in rs], base)
                cells.append(f"{100 * m:+.2f} ± {100 * h:.2f}")
            else:
                cells.append("n/a")
        out.append(cells)
    lines = ["# Learned policies against the heuristics (held-out episodes)", "",
             f"Command: `{command}` ({res['wall_s']:.0f} s wall on 2 shared cores). {res['episodes']} held-out "
             f"episodes per setting ({res['window_s']:g}-s windows starting in [1200, end - window] s, seeds "
             f"{res['seed0']}..), the same episodes for every policy. Cells: SLO attainment pooled over requests / "
             "mean per-episode P95 TTFT. Differences: paired per episode against the best tuned heuristic.", "",
             "Policies: " + "; ".join(f"{k} = `{v}`" for k, v in pols.items()) + ".", ""]
    return "\n".join(lines + table(head, out) + [""])


def write_learned(res: dict[str, Any], out: Path, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    doc = json.dumps({**res, "command": command}, separators=(",", ":"), default=float)
    (out / "learned_eval.json").write_text(doc)
    path = out / "learned_eval.md"
    path.write_text(learned_markdown(res, command))
    return path
