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
import shlex
import sys
from pathlib import Path
from typing import Any

TUNED = "fine-tuned (PPO)"
KEPT_LABEL = "kept (imitation)"
KEPT = "learned:path=experiments/trained_dagger"  # the network the fine-tuning started from
#: windows from the span fine-tuning trained on (starts in [0, 1080] s, ending by 1,200 s): not held out, they
#: show what fine-tuning learned where it learned it (fresh episodes, the same span)
TRAIN_SPAN = {"label": "training span", "start_s": [0.0, 1080.0]}
SETTINGS: list[tuple] = ([((2, 2), "azure_code", ld) for ld in (1.0, 2.0, 3.0)]
                         + [((2, 2), "azure_conv", 2.0), ((4, 4), "azure_code", 3.0)]
                         + [((2, 2), "azure_code", ld, TRAIN_SPAN) for ld in (2.0, 3.0)])


def evaluation_markdown(res: dict[str, Any], command: str) -> str:
    from deflectlab.experiments.learned_eval import subject_markdown

    intro = (f"{res['episodes']} held-out episodes per setting ({res['window_s']:g}-s windows starting in "
             "[1200, end - window] s, except the rows marked 'training span': windows starting in [0, 1080] s, the "
             f"span fine-tuning trained on), seeds {res['seed0']}.., the same episodes for every policy. SLO: "
             "attainment pooled over requests. Differences: the fine-tuned policy minus each other policy, paired "
             "per episode, mean ± 95 % Student-t half-width, in points of SLO attainment.")
    return subject_markdown(res, command, TUNED, "fine-tuned", "The PPO fine-tuned policy on held-out episodes",
                            intro)


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
    from deflectlab.experiments.learned_eval import evaluate_learned, write_evaluation

    command = "python -m deflectlab.experiments.finetune_eval " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    res = evaluate_learned({TUNED: a.tuned, KEPT_LABEL: a.kept}, SETTINGS, a.episodes, jobs=a.jobs)
    write_evaluation(res, a.out, command, evaluation_markdown(res, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
