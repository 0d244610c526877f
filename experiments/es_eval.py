"""The ES-fine-tuned policies against the heuristics and the network they started from, on held-out windows and,
labelled as such, on other episodes of the training span.

    python -m deflectlab.experiments.es_eval --out experiments/es --episodes 20 --jobs 2 \\
        --es es_mixed=learned:path=experiments/trained --es es_bursty=learned:path=experiments/es/es_bursty \\
        --planner lookahead:horizon_s=2,base=length_threshold,base_max_len=3072

Settings (:data:`SETTINGS`): the code trace on 2P2D at 1-3x and on 3P3D/4P4D at 3x, the conversation trace on
2P2D at 3x, Gamma CV-4 arrivals on 2P2D at 2x (all held out: windows start at 1,200 s or later), and the code
trace on 2P2D at 2x and 3x with windows from the *training span* (starts in [0, 1080] s: never these episodes,
seeds 4,000,000.., but the part of the trace ES trained on). The second group is not an evaluation of
generalization; it shows how much of a gain is specific to the training span. Every policy replays the same
episodes of a setting (``experiments.headroom.episode``); paired differences with 95 % Student-t intervals.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from deflectlab.experiments.trained_eval import DAGGER as KEPT
from deflectlab.experiments.trained_eval import GAMMA4

PLANNER = "planner (clairvoyant)"
TRAIN_SPAN = {"label": "training span", "start_s": [0.0, 1080.0]}
SETTINGS: list[tuple] = (
    [((2, 2), "azure_code", ld) for ld in (1.0, 2.0, 3.0)]
    + [((3, 3), "azure_code", 3.0), ((4, 4), "azure_code", 3.0), ((2, 2), "azure_conv", 3.0),
       ((2, 2), "azure_code", 2.0, GAMMA4)]
    + [((2, 2), "azure_code", ld, TRAIN_SPAN) for ld in (2.0, 3.0)]
)


def windows(setting: tuple | list) -> str:
    var = setting[3] if len(setting) > 3 and setting[3] else {}
    return "training span" if var.get("label") == TRAIN_SPAN["label"] else "held out"


def parse_named(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SPEC (e.g. es=learned:path=runs/es/policy)")
    return name, spec


def evaluate(es: dict[str, str], episodes: int, jobs: int, kept: str = KEPT, planner: str = "") -> dict[str, Any]:
    """Every policy on every setting; with ``planner`` (a lookahead spec) the clairvoyant planner too, on the
    training-span settings only (where the learned policies' gains are; its held-out headroom is
    ``experiments/headroom``)."""
    from deflectlab.experiments.learned_eval import evaluate_learned

    res = evaluate_learned({"DAgger (ES start)": kept, **es}, SETTINGS, episodes, jobs=jobs)
    if planner:
        span = [s for s in SETTINGS if windows(s) == "training span"]
        more = evaluate_learned({PLANNER: planner}, span, episodes, jobs=jobs)
        res["policies"][PLANNER] = planner
        res["rows"] += [r for r in more["rows"] if r["policy"] == planner]
        res["wall_s"] += more["wall_s"]
    return res


def markdown(res: dict[str, Any], command: str, subject: str) -> str:
    from deflectlab.experiments.learned_eval import subject_markdown

    intro = (f"{res['episodes']} episodes per setting ({res['window_s']:g}-s windows, seeds {res['seed0']}..), the "
             "same episodes for every policy. `windows`: held out (starts in [1200, end - window] s, after every "
             "training window) or training span (starts in [0, 1080] s: other episodes of the part of the trace "
             "the ES runs trained and validated on; not a test of generalization). SLO: attainment pooled over "
             "requests. Differences: the subject minus each other policy, paired per episode, mean ± 95 % "
             "Student-t half-width, in points of SLO attainment.")
    return subject_markdown(res, command, subject, subject, f"{subject}: ES fine-tuning against its start and "
                            "the heuristics", intro, extra=("windows", windows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/es_eval"))
    ap.add_argument("--es", type=parse_named, action="append", required=True, metavar="NAME=SPEC",
                    help="an ES policy to evaluate (repeatable)")
    ap.add_argument("--kept", default=KEPT, help="the network the ES runs started from")
    ap.add_argument("--planner", default="", metavar="SPEC",
                    help="also the clairvoyant planner (e.g. lookahead:horizon_s=2) on the training-span settings")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args(argv)
    if a.episodes < 2 or a.jobs < 1:
        raise SystemExit("es_eval: --episodes must be >= 2 and --jobs >= 1")
    command = "python -m deflectlab.experiments.es_eval " + shlex.join(argv if argv is not None else sys.argv[1:])
    res = evaluate(dict(a.es), a.episodes, a.jobs, a.kept, a.planner)
    from deflectlab.experiments.learned_eval import write_evaluation

    md = "\n".join(markdown(res, command, name) for name, _ in a.es)
    write_evaluation(res, a.out, command, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
