"""``deflectlab dagger``: imitate a teacher with the shape-generic network (DAgger over a mix of shapes).

    deflectlab dagger --out runs/dagger --shapes 2x2,4x4 --iterations 4
    deflectlab dagger --out runs/dagger_lt --teacher length_threshold:max_len=3072 --window 120

Plays training windows (ending by 1,200 s of each trace) on a mix of shapes, traces and loads; the teacher
(the clairvoyant lookahead planner, or with ``--teacher`` any registered policy) labels every visited state;
the network is retrained on the aggregated labels each iteration. Writes ``dagger_log.json`` and the exported
shape-generic policy under ``OUT/policy`` (``learned:path=OUT/policy``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deflectlab.envs.gym_env import EnvConfig
from deflectlab.scripts.options import add_dataclass_flags


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, (x.strip() for x in text.split(","))):
        p, sep, d = part.lower().partition("x")
        if not sep or not p.isdigit() or not d.isdigit() or int(p) < 1 or int(d) < 1:
            raise argparse.ArgumentTypeError(f"shape {part!r}: expected PxD with P, D >= 1 (e.g. 2x2)")
        out.append((int(p), int(d)))
    if not out:
        raise argparse.ArgumentTypeError("expected at least one shape")
    return out


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser("dagger", help=help_text, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/dagger"), help="run folder")
    p.add_argument("--shapes", type=parse_shapes, default=[(2, 2), (4, 4)], help="training shapes, PxD comma-separated")
    p.add_argument("--traces", default="azure_code,azure_conv", help="training traces, comma-separated")
    p.add_argument("--loads", type=float, nargs=2, default=(1.0, 3.0), metavar=("LOW", "HIGH"),
                   help="episode load drawn uniformly in [LOW, HIGH] x the recorded rate")
    p.add_argument("--window", type=float, default=60.0, help="episode window, trace seconds")
    p.add_argument("--window-start", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="window starts drawn in [LOW, HIGH] trace seconds (default: [0, 1200 - window], so every "
                        "training window ends by 1,200 s, before the held-out evaluation windows)")
    p.add_argument("--teacher", default="",
                   help="label with this registered policy (e.g. length_threshold:max_len=3072) instead of the "
                        "clairvoyant lookahead planner")
    p.add_argument("--beta-decay", type=float, default=0.5,
                   help="the teacher acts with probability beta_decay^iteration (DAgger mixing)")
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--episodes", type=int, default=4, help="episodes per iteration")
    p.add_argument("--max-decisions", type=int, default=300, help="decisions per episode at most")
    p.add_argument("--horizon", type=float, default=2.0, help="the labelling planner's horizon, seconds")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--regret-weight", type=float, default=0.0,
                   help="cost-aware imitation: weigh each state by 1 + W x the requests its worst action loses "
                        "(planner rollouts), targets spread over actions tied on SLO count (0: plain)")
    add_dataclass_flags(p, EnvConfig, only=("feature_schema",))  # --feature-schema
    p.add_argument("--ppo-steps", type=int, default=0,
                   help="then MaskablePPO fine-tuning from the imitation weights on the first shape (0: none); "
                        "exported to OUT/policy_ppo")
    p.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    from deflectlab.agents.dagger import DaggerConfig, train_dagger
    from deflectlab.agents.set_export import export_set
    from deflectlab.envs.config import ClusterConfig

    start = tuple(a.window_start) if a.window_start else (0.0, 1200.0 - a.window)
    if start[0] < 0 or start[1] < start[0]:
        raise SystemExit(f"deflectlab dagger: --window-start {start[0]:g} {start[1]:g}: expected 0 <= LOW <= HIGH "
                         "(with --window over 1,200 s give --window-start explicitly)")
    try:
        cfg = DaggerConfig(shapes=a.shapes, traces=[t.strip() for t in a.traces.split(",") if t.strip()],
                           loads=tuple(a.loads), window_s=a.window, window_start_s=start, iterations=a.iterations,
                           episodes_per_iteration=a.episodes, max_decisions=a.max_decisions, horizon_s=a.horizon,
                           hidden=a.hidden, epochs=a.epochs, seed=a.seed, beta_decay=a.beta_decay,
                           regret_weight=a.regret_weight, teacher=a.teacher,
                           **({} if a.feature_schema is None else {"feature_schema": a.feature_schema}))
    except ValueError as e:
        raise SystemExit(f"deflectlab {e}") from None
    net, log = train_dagger(cfg, out=a.out)
    man = export_set(net, a.out / "policy", ClusterConfig(handoff=cfg.handoff), trained_on={
        "shapes": [f"{p}P{d}D" for p, d in cfg.shapes], "traces": cfg.traces, "loads": list(cfg.loads),
        "window_start_s": list(cfg.window_start_s), "profiles": ["a100-80gb_deepseek-v2-lite"],
        "teacher": cfg.teacher or f"lookahead:horizon_s={cfg.horizon_s:g} (clairvoyant)", "method": "DAgger",
        "regret_weight": cfg.regret_weight, "feature_schema": cfg.feature_schema,
        "states": log["states"]}, source={"run": str(a.out), "wall_s": log["wall_s"]})
    if a.ppo_steps > 0:
        from deflectlab.agents.dagger import finetune_ppo

        tuned, info = finetune_ppo(net, cfg.shapes[0], cfg, a.ppo_steps)
        print(json.dumps({"ppo": info}))
        export_set(tuned, a.out / "policy_ppo", ClusterConfig(handoff=cfg.handoff), trained_on={
            "shapes": [f"{p}P{d}D" for p, d in cfg.shapes], "traces": cfg.traces, "method": "DAgger then "
            f"MaskablePPO {a.ppo_steps} steps on {cfg.shapes[0][0]}P{cfg.shapes[0][1]}D ({cfg.traces[0]})"},
            source={"run": str(a.out), **info})
    for it in log["iterations"]:
        print(json.dumps({k: it[k] for k in ("iteration", "beta", "states", "learner_agreement_before_fit",
                                              "train_accuracy", "majority_label_share", "wall_s")}))
    print(f"wrote {man}")
    return 0
