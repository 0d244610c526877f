"""``deflectlab dagger``: imitate a teacher with the shape-generic network (DAgger over a mix of shapes).

    deflectlab dagger --out runs/dagger --shapes 2x2,4x4 --iterations 4
    deflectlab dagger --out runs/dagger_lt --teacher length_threshold:max_len=3072 --window 120
    deflectlab dagger --out runs/dagger --ray --ray-cpus 2        # each iteration's episodes as Ray tasks
    deflectlab dagger --out runs/ft --init experiments/trained_dagger --iterations 0 --shapes 2x2 --ppo-steps 60000

Plays training windows (ending by 1,200 s of each trace) on a mix of shapes, traces and loads; the teacher
(the clairvoyant lookahead planner, or with ``--teacher`` any registered policy) labels every visited state;
the network is retrained on the aggregated labels each iteration. Writes ``dagger_log.json`` and the exported
shape-generic policy under ``OUT/policy`` (``learned:path=OUT/policy``).

``--ray`` (a local Ray) or ``--ray-address ADDR`` (a Ray cluster) labels each iteration's episodes as parallel
Ray tasks; the data set, and so the run, is the same as without Ray. ``--init DIR`` starts from an exported
shape-generic policy's numpy weights (``--iterations 0``: no DAgger, e.g. straight to ``--ppo-steps``).
``--wandb`` logs each iteration's metrics to W&B (offline unless WANDB_API_KEY is set) under ``OUT/wandb``.
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
    from deflectlab.envs.splits import SPLITS

    p = sub.add_parser("dagger", help=help_text, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/dagger"), help="run folder")
    p.add_argument("--shapes", type=parse_shapes, default=[(2, 2), (4, 4)], help="training shapes, PxD comma-separated")
    p.add_argument("--traces", default="azure_code,azure_conv", help="training traces, comma-separated")
    p.add_argument("--loads", type=float, nargs=2, default=(1.0, 3.0), metavar=("LOW", "HIGH"),
                   help="episode load drawn uniformly in [LOW, HIGH] x the recorded rate")
    p.add_argument("--window", type=float, default=60.0, help="episode window, trace seconds")
    p.add_argument("--split", choices=tuple(SPLITS), default="time",
                   help="which blocks of trace time are held out (envs.splits): time holds out [1200, end) s, "
                        "blocked alternating 300-s blocks; training windows come from the other blocks")
    p.add_argument("--window-start", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="window starts drawn in [LOW, HIGH] trace seconds (default: the split's training blocks, "
                        "[0, 1200 - window] for the time split, so every training window ends by 1,200 s)")
    p.add_argument("--teacher", default="",
                   help="label with this registered policy (e.g. length_threshold:max_len=3072) instead of the "
                        "clairvoyant lookahead planner")
    p.add_argument("--beta-decay", type=float, default=0.5,
                   help="the teacher acts with probability beta_decay^iteration (DAgger mixing)")
    p.add_argument("--iterations", type=int, default=4, help="DAgger iterations (0 only with --init)")
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
    p.add_argument("--ppo-lr", type=float, default=3e-5, help="fine-tuning learning rate")
    p.add_argument("--ppo-value-warmup", type=int, default=0, metavar="STEPS",
                   help="first STEPS of --ppo-steps train the value head alone (the policy frozen)")
    p.add_argument("--ppo-vf-coef", type=float, default=0.5, help="fine-tuning value-loss weight")
    p.add_argument("--init", type=Path, default=None, metavar="DIR",
                   help="start from this exported shape-generic policy (its policy_set.npz, read without pickle); "
                        "its width and feature schema replace --hidden and --feature-schema")
    p.add_argument("--ray", action="store_true", help="label each iteration's episodes as Ray tasks (local Ray)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. auto); implies --ray")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--wandb", action="store_true",
                   help="log each iteration's metrics to W&B (offline unless WANDB_API_KEY is set), files in OUT")
    p.set_defaults(func=run)


def _config(a: argparse.Namespace, init_net):
    from deflectlab.agents.dagger import DaggerConfig

    start = tuple(a.window_start) if a.window_start else None
    if not 0 <= a.ppo_value_warmup <= max(a.ppo_steps, 0):
        raise SystemExit(f"deflectlab dagger: --ppo-value-warmup {a.ppo_value_warmup} must be in [0, --ppo-steps]")
    if a.iterations == 0 and init_net is None:
        raise SystemExit("deflectlab dagger: --iterations 0 needs --init DIR (a network to start from)")
    net_kw = ({"hidden": init_net.hidden, "feature_schema": init_net.feature_schema} if init_net is not None else
              {"hidden": a.hidden, **({} if a.feature_schema is None else {"feature_schema": a.feature_schema})})
    if init_net is not None and a.feature_schema is not None and a.feature_schema != init_net.feature_schema:
        raise SystemExit(f"deflectlab dagger: --feature-schema {a.feature_schema}, but --init {a.init} was trained "
                         f"on feature schema v{init_net.feature_schema}")
    try:
        return DaggerConfig(shapes=a.shapes, traces=[t.strip() for t in a.traces.split(",") if t.strip()],
                            loads=tuple(a.loads), window_s=a.window, split=a.split, window_start_s=start,
                            iterations=a.iterations,
                            episodes_per_iteration=a.episodes, max_decisions=a.max_decisions, horizon_s=a.horizon,
                            epochs=a.epochs, seed=a.seed, beta_decay=a.beta_decay, regret_weight=a.regret_weight,
                            teacher=a.teacher, **net_kw)
    except ValueError as e:
        raise SystemExit(f"deflectlab {e}") from None


def _tracker(a: argparse.Namespace, cfg):
    """Progress lines on stderr, and W&B with --wandb."""
    from dataclasses import asdict

    from deflectlab.agents.tracking import Progress, start_run

    run = start_run(f"dagger-{a.out.name}", a.out, {**asdict(cfg), "init": str(a.init or "")}) if a.wandb else None
    return Progress("dagger iteration", ("dagger/states", "dagger/learner_agreement_before_fit",
                                         "dagger/train_accuracy", "dagger/wall_s"), run)


def run(a: argparse.Namespace) -> int:
    from deflectlab.agents.dagger import RayLabeller, train_dagger
    from deflectlab.agents.set_export import export_set, load_set_net
    from deflectlab.envs.config import ClusterConfig

    init_net = load_set_net(a.init) if a.init is not None else None
    cfg = _config(a, init_net)
    labeller = RayLabeller(a.ray_address, a.ray_cpus) if (a.ray or a.ray_address) else None
    tracker = _tracker(a, cfg)
    try:
        net, log = train_dagger(cfg, out=a.out, labeller=labeller, init=init_net, tracker=tracker)
    finally:
        if labeller is not None:
            labeller.close()
    trained_on = {"shapes": [f"{p}P{d}D" for p, d in cfg.shapes], "traces": cfg.traces, "loads": list(cfg.loads),
                  "split": cfg.split, "window_start_s": [list(r) for r in cfg.window_start_s],
                  "profiles": ["a100-80gb_deepseek-v2-lite"],
                  "teacher": cfg.teacher or f"lookahead:horizon_s={cfg.horizon_s:g} (clairvoyant)", "method": "DAgger",
                  "regret_weight": cfg.regret_weight, "feature_schema": cfg.feature_schema, "states": log["states"],
                  **({"init": str(a.init)} if a.init is not None else {})}
    man = export_set(net, a.out / "policy", ClusterConfig(handoff=cfg.handoff), trained_on=trained_on,
                     source={"run": str(a.out), "wall_s": log["wall_s"]})
    if a.ppo_steps > 0:
        from deflectlab.agents.dagger import finetune_ppo

        try:
            tuned, info = finetune_ppo(net, cfg.shapes[0], cfg, a.ppo_steps, lr=a.ppo_lr,
                                       value_warmup=a.ppo_value_warmup, vf_coef=a.ppo_vf_coef)
        except ValueError as e:
            raise SystemExit(f"deflectlab dagger: {e}") from None
        print(json.dumps({"ppo": info}))
        (a.out / "ppo.json").write_text(json.dumps({"ppo": info, "shape": list(cfg.shapes[0]),
                                                    "trace": cfg.traces[0], "loads": list(cfg.loads)}, indent=1))
        tracker.log({f"ppo/{k}": v for k, v in info.items()})
        export_set(tuned, a.out / "policy_ppo", ClusterConfig(handoff=cfg.handoff), trained_on={
            **trained_on, "method": ("DAgger then " if cfg.iterations else "") + f"MaskablePPO {a.ppo_steps} steps "
            f"on {cfg.shapes[0][0]}P{cfg.shapes[0][1]}D ({cfg.traces[0]}, loads {cfg.loads[0]:g}-{cfg.loads[1]:g}x)"},
            source={"run": str(a.out), **info})
    tracker.finish()
    for it in log["iterations"]:
        print(json.dumps({k: it[k] for k in ("iteration", "beta", "states", "labelled", "label_wall_s",
                                              "labelled_per_s", "learner_agreement_before_fit", "train_accuracy",
                                              "majority_label_share", "wall_s")}))
    print(f"wrote {man}")
    return 0
