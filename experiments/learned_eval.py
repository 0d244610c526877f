"""Evaluate a learned policy against the heuristics on held-out episodes, with paired differences.

Every policy replays the same held-out episodes (``experiments.headroom.episode``: windows in [1200, 1800) s,
drawn as the environment draws them) on each (shape, trace, load) setting; the table gives pooled SLO
attainment, P95 TTFT, and each learned policy's paired per-episode difference against the best tuned
heuristic with a 95 % Student-t interval. A policy that refuses a shape (the fixed-shape v1 export on 4P4D)
is shown as not applicable.

A setting is ``(shape, trace, load)`` or ``(shape, trace, load, variant)``: a variant draws the episodes
differently (``{"label": "gamma CV 4", "arrival": "gamma", "cv": 4.0}``, or ``start_s`` for a trace shorter
than the held-out span; see ``experiments.headroom.episode``) and is named in the table's trace column.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from deflectlab.experiments.headroom import baseline_policies, paired_ci, pooled, winner_label
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
                     jobs: int = 1, heuristics: dict[str, str] | None = None) -> dict[str, Any]:
    """Run heuristics and ``learned`` (label -> policy spec) on ``episodes`` held-out episodes of each
    ``(shape, trace, load)``. ``heuristics``: label -> spec, one label starting "best tuned" (default:
    :func:`experiments.headroom.baseline_policies`, from the shipped tuning)."""
    heur = heuristics or baseline_policies()
    best = winner_label(heur)
    pols = {**heur, **learned}
    settings = [parse_setting(s) for s in settings]
    tasks = [(tr, ld, seed0 + i, window_s, handoff, spec, shape, var) for shape, tr, ld, var in settings
             for i in range(episodes) for spec in pols.values()]
    t0 = time.perf_counter()
    if jobs <= 1:
        rows = [_safe_run(t) for t in tasks]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as ex:
            rows = list(ex.map(_safe_run, tasks, chunksize=4))
    return {"policies": pols, "best": best, "settings": [[list(s), t, ld, v] for s, t, ld, v in settings],
            "episodes": episodes, "window_s": window_s, "seed0": seed0, "rows": [r for r in rows if r],
            "wall_s": time.perf_counter() - t0}


def parse_setting(s: tuple | list) -> tuple[tuple[int, int], str, float, dict[str, Any]]:
    if len(s) not in (3, 4):
        raise ValueError(f"a setting is (shape, trace, load) or (shape, trace, load, variant), got {s!r}")
    var = dict(s[3]) if len(s) == 4 and s[3] else {}
    if var and not var.get("label"):
        raise ValueError(f"setting {s!r}: a variant needs a 'label' (it names the row in the table)")
    return (int(s[0][0]), int(s[0][1])), str(s[1]), float(s[2]), var


def select_rows(rows, shape, trace, load, spec, variant=""):
    return sorted((r for r in rows if r["shape"] == shape and r["trace"] == trace and r["load"] == load
                   and r["policy"] == spec and r.get("variant", "") == variant), key=lambda r: r["seed"])


def paired(res: dict[str, Any], setting: tuple | list, label: str, against: str) -> tuple[float, float, int] | None:
    """Paired per-episode SLO-attainment difference ``label - against`` (policy labels of ``res``) on one
    setting: ``(mean, 95 % half-width, episodes)``, or None when either policy did not run there."""
    (P, D), tr, ld, var = parse_setting(setting)
    pols, rows = res["policies"], res["rows"]
    a = select_rows(rows, f"{P}P{D}D", tr, ld, pols[label], var.get("label", ""))
    b = select_rows(rows, f"{P}P{D}D", tr, ld, pols[against], var.get("label", ""))
    if not a or not b:
        return None
    if [r["seed"] for r in a] != [r["seed"] for r in b]:
        raise ValueError(f"{label} and {against} ran on different episodes in {setting!r}")
    m, h = paired_ci([r["slo_attainment"] for r in a], [r["slo_attainment"] for r in b])
    return m, h, len(a)


def learned_markdown(res: dict[str, Any], command: str) -> str:
    pols, rows = res["policies"], res["rows"]
    best = pols[res["best"]]
    learned = [k for k in pols if k not in baseline_policies()]
    head = ["shape", "trace", "load", *(f"{k} SLO / P95 TTFT" for k in pols),
            *(f"{k} - best tuned (points, 95 % CI)" for k in learned)]
    out = []
    for setting in res["settings"]:
        (P, D), tr, ld, var = parse_setting(setting)
        shape, vl = f"{P}P{D}D", var.get("label", "")
        cells: list[Any] = [shape, f"{tr} ({vl})" if vl else tr, f"{ld:g}x"]
        for spec in pols.values():
            rs = select_rows(rows, shape, tr, ld, spec, vl)
            cells.append(f"{pooled(rs):.4f} / {np.mean([r['ttft_p95_s'] for r in rs]):.2f} s" if rs else "n/a")
        base = [r["slo_attainment"] for r in select_rows(rows, shape, tr, ld, best, vl)]
        for k in learned:
            rs = select_rows(rows, shape, tr, ld, pols[k], vl)
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


def fmt_diff(p: tuple[float, float, int] | None) -> str:
    """A paired difference (mean, 95 % half-width, n) in points of SLO attainment."""
    return "n/a" if p is None else f"{100 * p[0]:+.2f} ± {100 * p[1]:.2f}"


def subject_markdown(res: dict[str, Any], command: str, subject: str, short: str, title: str, intro: str,
                     extra: tuple[str, Any] | None = None) -> str:
    """One learned policy (``subject``, a label of ``res['policies']``) against every other policy of an
    :func:`evaluate_learned` result: per setting, each policy's pooled SLO attainment and ``short - other`` paired
    per episode; then the settings where its interval lies entirely below zero.

    :param intro: the paragraph after the command (which windows, what the differences are).
    :param extra: ``(column name, function of the setting -> str)``, a column after the load.
    """
    pols = res["policies"]
    others = [k for k in pols if k != subject]
    head = ["shape", "trace", "load", *([extra[0]] if extra else []), *(f"{k} SLO" for k in pols),
            *(f"{short} - {k} (points, 95 % CI)" for k in others)]
    rows, losses = [], []
    for s in res["settings"]:
        (P, D), tr, ld, var = parse_setting(s)
        vl = var.get("label", "")
        cells: list[Any] = [f"{P}P{D}D", f"{tr} ({vl})" if vl else tr, f"{ld:g}x",
                            *([extra[1](s) or "-"] if extra else [])]
        for spec in pols.values():
            rs = select_rows(res["rows"], f"{P}P{D}D", tr, ld, spec, vl)
            cells.append(f"{pooled(rs):.4f}" if rs else "n/a")
        for k in others:
            d = paired(res, s, subject, k)
            cells.append(fmt_diff(d))
            if d is not None and d[0] + d[1] < 0:
                losses.append(f"{P}P{D}D {tr}{f' ({vl})' if vl else ''} {ld:g}x vs {k}: {fmt_diff(d)}")
        rows.append(cells)
    lines = [f"# {title}", "",
             f"Command: `{command}` ({res['wall_s']:.0f} s wall on 2 shared cores). {intro}", "",
             "Policies: " + "; ".join(f"{k} = `{v}`" for k, v in pols.items()) + ".", ""]
    lines += table(head, rows)
    lines += ["", f"## Where the {short} policy loses (interval entirely below zero)", ""]
    lines += [f"* {x}" for x in losses] or ["* nowhere"]
    return "\n".join(lines + [""])


def write_evaluation(res: dict[str, Any], out: Path, command: str, markdown: str) -> None:
    """``evaluation.json`` (every per-episode row and the command) and ``evaluation.md`` in ``out``; prints the
    markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps({**res, "command": command}, separators=(",", ":"),
                                                    default=float))
    (out / "evaluation.md").write_text(markdown)
    print(markdown)
