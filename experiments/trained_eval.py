"""The kept policy's evaluation: the shape-generic policy in ``experiments/trained`` (ES fine-tuning of the DAgger
network in ``experiments/trained_dagger``) against the heuristics, the network it started from, and the
fixed-shape v1 policy, on held-out episodes, with paired differences.

    python -m deflectlab.experiments.trained_eval --out experiments/trained --episodes 20 --jobs 2

Settings (:data:`SETTINGS`): both Azure traces at 1x-3x on 2P2D and 4P4D (the training shapes), 3P3D and 8P8D
(shapes the policy never saw; 8P8D also at 6x and 9x on the code trace, where it is loaded at all); a
synthetic Gamma CV-4 arrival process with the code trace's lengths (never trained on); the Mooncake-style trace
(never trained on; its 1,022 s are shorter than the held-out span, so its windows start in its second half)
on 8P8D. Every policy replays the same episodes of a setting
(``experiments.headroom.episode``); the policy's differences are paired per episode with 95 % Student-t
intervals. Writes ``evaluation.json`` (every per-episode row) and ``evaluation.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from deflectlab.experiments.markdown import table

HERE = Path(__file__).parent
KEPT = "learned:path=experiments/trained"
V1 = "learned:path=experiments/trained_v1"
DAGGER = "learned:path=experiments/trained_dagger"
GAMMA4 = {"label": "gamma CV 4", "arrival": "gamma", "cv": 4.0}
#: the Mooncake-style trace is 1,022 s long: windows start in its second half (it is not trained on at all)
MOONCAKE = {"label": "second half", "start_s": [511.0, None]}
TRAINED_SHAPES = ("2P2D", "4P4D")
SETTINGS: list[tuple] = (
    [((n, n), tr, ld) for n in (2, 3, 4, 8) for tr in ("azure_code", "azure_conv") for ld in (1.0, 2.0, 3.0)]
    + [((8, 8), "azure_code", ld) for ld in (6.0, 9.0)]
    + [((n, n), "azure_code", ld, GAMMA4) for n in (2, 4) for ld in (1.0, 2.0)]
    + [((8, 8), "mooncake_synthetic", ld, MOONCAKE) for ld in (0.5, 1.0)]
)


def novelty(setting: tuple | list) -> str:
    """What the policy did not see in a setting: shape, arrival process, trace (empty: all seen in training)."""
    (p, d), tr, *rest = setting[:3]
    var = setting[3] if len(setting) > 3 and setting[3] else {}
    out = []
    if f"{p}P{d}D" not in TRAINED_SHAPES:
        out.append("shape")
    if var.get("arrival", "trace") != "trace":
        out.append("arrivals")
    if tr not in ("azure_code", "azure_conv"):
        out.append("trace")
    return ", ".join(out)


def evaluate(episodes: int, jobs: int, kept: str = KEPT, v1: str = V1, window_s: float = 120.0,
             settings: list[tuple] | None = None, start: str = DAGGER) -> dict[str, Any]:
    from deflectlab.experiments.learned_eval import evaluate_learned

    return evaluate_learned({"kept (shape-generic)": kept, "DAgger (ES start)": start, "v1 (2P2D MLP)": v1},
                            settings or SETTINGS, episodes, window_s=window_s, jobs=jobs)


def evaluation_markdown(res: dict[str, Any], command: str) -> str:
    from deflectlab.experiments.learned_eval import subject_markdown

    intro = (f"{res['episodes']} held-out episodes per setting ({res['window_s']:g}-s windows; Azure traces: starts "
             "in [1200, end - window] s, after every training window; Mooncake-style: starts in its second half), "
             f"seeds {res['seed0']}.., the same episodes for every policy. SLO: attainment pooled over requests. "
             "Differences: the kept policy minus each other policy, paired per episode, mean ± 95 % Student-t "
             "half-width, in points of SLO attainment. `unseen`: what the kept policy never saw in training "
             "(its start, the DAgger network, trained on 2P2D and 4P4D, both Azure traces, recorded arrivals, 1-3x "
             "load; ES then trained it on the code trace: 2P2D at 1-3x, 4P4D at 3x, and Gamma CV-2 arrivals at 2-3x "
             "on 2P2D, so the Gamma CV-4 rows are an unseen CV, not an unseen kind of arrival process).")
    return subject_markdown(res, command, "kept (shape-generic)", "kept", "The kept policy on held-out episodes",
                            intro, extra=("unseen", novelty))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/trained_eval"))
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--kept", default=KEPT, help="the policy spec evaluated")
    ap.add_argument("--v1", default=V1, help="the fixed-shape policy it is set against")
    ap.add_argument("--start", default=DAGGER, help="the network the kept policy was fine-tuned from")
    a = ap.parse_args(argv)
    if a.episodes < 2 or a.jobs < 1:
        raise SystemExit("trained_eval: --episodes must be >= 2 and --jobs >= 1")
    command = "python -m deflectlab.experiments.trained_eval " + " ".join(shlex.quote(x) for x in
                                                                          (argv if argv is not None else sys.argv[1:]))
    res = evaluate(a.episodes, a.jobs, a.kept, a.v1, start=a.start)
    from deflectlab.experiments.learned_eval import write_evaluation

    write_evaluation(res, a.out, command, evaluation_markdown(res, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _rel(p: Path) -> str:
    """``p`` relative to the repository (no machine path in a report), else as given."""
    try:
        return str(p.resolve().relative_to(HERE.parent.resolve()))
    except ValueError:
        return p.name


def headroom_and_learned_summary(trained: Path = HERE / "trained", headroom: Path = HERE / "headroom",
                                 es: Path = HERE / "es") -> str:
    """The main job's section on the planner and the kept learned policy, both read from committed runs (the
    planner takes minutes, the 20-episode evaluation a few): per trace and load on 2P2D, the planner's and
    the kept policy's paired differences against the best tuned heuristic, each on its own run's episodes.
    Empty when neither run is there."""
    from deflectlab.experiments.headroom import paired_ci, pooled, rows_by
    from deflectlab.experiments.learned_eval import fmt_diff as _fmt
    from deflectlab.experiments.learned_eval import paired, select_rows

    hr_path, ev_path = headroom / "headroom.json", trained / "evaluation.json"
    hr = json.loads(hr_path.read_text()) if hr_path.is_file() else None
    ev = json.loads(ev_path.read_text()) if ev_path.is_file() else None
    if hr is None and ev is None:
        return ""
    rows = []
    for tr in ("azure_code", "azure_conv"):
        for ld in (1.0, 2.0, 3.0):
            cells: list[Any] = [tr, f"{ld:g}x"]
            if hr is not None and ld in hr["spec"]["loads"] and tr in hr["spec"]["traces"]:
                best, plan = hr["policies"][hr["best"]], hr["policies"]["lookahead (clairvoyant)"]
                b, p = rows_by(hr["rows"], tr, ld, best), rows_by(hr["rows"], tr, ld, plan)
                m, h = paired_ci([r["slo_attainment"] for r in p], [r["slo_attainment"] for r in b])
                cells += [f"{pooled(b):.4f}", f"{pooled(p):.4f}", f"{100 * m:+.2f} ± {100 * h:.2f} ({len(p)})"]
            else:
                cells += ["n/a"] * 3
            if ev is not None:
                s = ((2, 2), tr, ld)
                best = ev["policies"][ev["best"]]
                kept = select_rows(ev["rows"], "2P2D", tr, ld, ev["policies"]["kept (shape-generic)"])
                b = select_rows(ev["rows"], "2P2D", tr, ld, best)
                d = paired(ev, s, "kept (shape-generic)", ev["best"])
                start = "DAgger (ES start)" if "DAgger (ES start)" in ev["policies"] else "v1 (2P2D MLP)"
                v1 = paired(ev, s, "kept (shape-generic)", start)
                cells += [f"{pooled(b):.4f}" if b else "n/a", f"{pooled(kept):.4f}" if kept else "n/a",
                          _fmt(d) + (f" ({d[2]})" if d else ""), _fmt(v1)]
            else:
                cells += ["n/a"] * 4
            rows.append(cells)
    head = ["trace", "load", "best tuned SLO (headroom run)", "planner SLO", "planner - best tuned (points, episodes)",
            "best tuned SLO (evaluation)", "kept learned SLO", "kept - best tuned (points, episodes)",
            "kept - its start (points)"]
    lines = ["## The clairvoyant planner and the kept learned policy (2P2D)", "",
             "Neither is rerun by the main job; both come from committed runs, each on its own held-out episodes "
             "(so compare each against the best tuned heuristic in its own run, not across runs). Planner: "
             f"`{_rel(headroom / 'report.md')}` (`{(hr or {}).get('command', 'n/a')}`), clairvoyant, not deployable. "
             "Kept learned policy (`experiments/trained`, shape-generic, ES fine-tuning of the DAgger network in "
             f"`experiments/trained_dagger`, its start): `{_rel(trained / 'evaluation.md')}` "
             f"(`{(ev or {}).get('command', 'n/a')}`), where 4P4D, 8P8D, Gamma CV-4 and Mooncake-style results "
             "are. Differences are paired per episode, mean ± 95 % half-width, in points of SLO attainment.", ""]
    lines += table(head, rows)
    lines += training_span_summary(es)
    return "\n".join(lines + [""])


def training_span_summary(es_dir: Path, subject: str = "es_mixed") -> list[str]:
    """Lines on the kept (ES) policy on *training-span* episodes, read from ``experiments/es/evaluation.json``
    (``experiments.es_eval``): where its gains are, and that they are in-distribution. Empty without that run."""
    from deflectlab.experiments.learned_eval import fmt_diff, paired

    path = es_dir / "evaluation.json"
    if not path.is_file():
        return []
    ev = json.loads(path.read_text())
    if subject not in ev["policies"]:
        return []
    out = []
    for s in ev["settings"]:
        if not (len(s) > 3 and s[3] and s[3].get("label") == "training span"):
            continue
        diffs = [(k, paired(ev, s, subject, k)) for k in ev["policies"] if k != subject and k != "never_deflect"]
        out.append(f"* {s[0][0]}P{s[0][1]}D {s[1]} {s[2]:g}x: " + ", ".join(
            f"vs {k} {fmt_diff(d)}" for k, d in diffs if d is not None))
    if not out:
        return []
    return ["", f"On *training-span* windows (other episodes from the part of the trace ES trained on, so "
            f"in-distribution, not held out; `{_rel(es_dir / 'README.md')}`), the kept policy ({subject}) against "
            "each other policy, in points (paired per episode, mean ± 95 % half-width). The clairvoyant planner's "
            "rollouts continue with the tuned threshold:", "", *out]
