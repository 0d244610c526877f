"""PPO fine-tuning of the kept imitation network, evaluated: the fine-tuned policy against the kept policy it
started from and the heuristics, on held-out episodes, with paired differences.

    python -m deflectlab.experiments.finetune_eval --out experiments/finetune --episodes 20 --jobs 2

Settings (:data:`SETTINGS`): 2P2D on the code trace at 1x-3x (fine-tuning ran on 2P2D code at 2-3x), and two
settings it was not fine-tuned on (2P2D conversation trace at 2x, 4P4D code at 3x) to show what fine-tuning on
one shape and trace costs elsewhere; and, not held out, 2P2D code at 2x and 3x on windows from the span
fine-tuning trained on (:data:`TRAIN_SPAN`), to show what it learned there. Every policy replays the same
episodes of a setting (``experiments.headroom.episode``; held out: windows starting at 1,200 s or later); the
differences are paired per episode with 95 % Student-t intervals. Writes ``evaluation.json`` (every
per-episode row) and ``evaluation.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from deflectlab.experiments.markdown import table

TUNED = "fine-tuned (PPO)"
KEPT_LABEL = "kept (imitation)"
KEPT = "learned:path=experiments/trained"
#: windows from the span fine-tuning trained on (starts in [0, 1080] s, ending by 1,200 s): not held out, they
#: show what fine-tuning learned where it learned it (fresh episodes, the same span)
TRAIN_SPAN = {"label": "training span", "start_s": [0.0, 1080.0]}
SETTINGS: list[tuple] = ([((2, 2), "azure_code", ld) for ld in (1.0, 2.0, 3.0)]
                         + [((2, 2), "azure_conv", 2.0), ((4, 4), "azure_code", 3.0)]
                         + [((2, 2), "azure_code", ld, TRAIN_SPAN) for ld in (2.0, 3.0)])


def _fmt(p: tuple[float, float, int] | None) -> str:
    return "n/a" if p is None else f"{100 * p[0]:+.2f} ± {100 * p[1]:.2f}"


def evaluation_markdown(res: dict[str, Any], command: str) -> str:
    from deflectlab.experiments.learned_eval import paired, parse_setting, pooled, select_rows

    pols = res["policies"]
    others = [k for k in pols if k != TUNED]
    head = ["shape", "trace", "load", *(f"{k} SLO" for k in pols),
            *(f"fine-tuned - {k} (points, 95 % CI)" for k in others)]
    rows, losses = [], []
    for s in res["settings"]:
        (P, D), tr, ld, var = parse_setting(s)
        vl = var.get("label", "")
        cells: list[Any] = [f"{P}P{D}D", f"{tr} ({vl})" if vl else tr, f"{ld:g}x"]
        for spec in pols.values():
            rs = select_rows(res["rows"], f"{P}P{D}D", tr, ld, spec, vl)
            cells.append(f"{pooled(rs):.4f}" if rs else "n/a")
        for k in others:
            d = paired(res, s, TUNED, k)
            cells.append(_fmt(d))
            if d is not None and d[0] + d[1] < 0:
                losses.append(f"{P}P{D}D {tr}{f' ({vl})' if vl else ''} {ld:g}x vs {k}: {_fmt(d)}")
        rows.append(cells)
    lines = ["# The PPO fine-tuned policy on held-out episodes", "",
             f"Command: `{command}` ({res['wall_s']:.0f} s wall on 2 shared cores). {res['episodes']} held-out "
             f"episodes per setting ({res['window_s']:g}-s windows starting in [1200, end - window] s, except the "
             "rows marked 'training span': windows starting in [0, 1080] s, the span fine-tuning trained on), seeds "
             f"{res['seed0']}.., the same episodes for every policy. SLO: attainment pooled over requests. "
             "Differences: the fine-tuned policy minus each other policy, paired per episode, mean ± 95 % "
             "Student-t half-width, in points of SLO attainment.", "",
             "Policies: " + "; ".join(f"{k} = `{v}`" for k, v in pols.items()) + ".", ""]
    lines += table(head, rows)
    lines += ["", "## Where the fine-tuned policy loses (interval entirely below zero)", ""]
    lines += [f"* {x}" for x in losses] or ["* nowhere"]
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/finetune_eval"))
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--tuned", default="learned:path=experiments/finetune/policy_ppo",
                    help="the fine-tuned policy's spec")
    ap.add_argument("--kept", default=KEPT, help="the policy it started from")
    a = ap.parse_args(argv)
    if a.episodes < 2 or a.jobs < 1:
        raise SystemExit("finetune_eval: --episodes must be >= 2 and --jobs >= 1")
    from deflectlab.experiments.learned_eval import evaluate_learned

    command = "python -m deflectlab.experiments.finetune_eval " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    res = evaluate_learned({TUNED: a.tuned, KEPT_LABEL: a.kept}, SETTINGS, a.episodes, jobs=a.jobs)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "evaluation.json").write_text(json.dumps({**res, "command": command}, separators=(",", ":"),
                                                      default=float))
    md = evaluation_markdown(res, command)
    (a.out / "evaluation.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
