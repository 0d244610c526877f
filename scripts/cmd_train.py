"""``deflectlab train``: train an RL agent from a YAML config (locally, or as Ray Tune trials)."""

from __future__ import annotations

import argparse
import json
import os

from deflectlab.envs.gym_env import EnvConfig
from deflectlab.scripts.options import add_dataclass_flags, parse_seeds


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser(
        "train", help=help_text,
        description="Train an agent from a config (experiments/train_*.yaml). Extra KEY=VALUE arguments override "
                    "config keys by dotted path (algo_params.learning_rate=3e-4), which is also how `wandb agent` "
                    "passes sweep parameters (${args_no_hyphens}).")
    p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override (repeatable; same as a positional KEY=VALUE)")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--total-timesteps", type=int, help="override total_timesteps")
    p.add_argument("--out-dir", help="override out_dir")
    add_dataclass_flags(p, EnvConfig, only=("feature_schema",))  # --feature-schema: override env.feature_schema
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="print SB3's log table")
    p.add_argument("--ray", action="store_true", help="run as Ray Tune trials (a local Ray, no cluster needed)")
    p.add_argument("--ray-address", help="join this Ray cluster (e.g. auto, ray://head:10001); implies --ray")
    p.add_argument("--ray-seeds", nargs="+", default=None, metavar="SEED",
                   help="training seeds, one trial each: integers or inclusive ranges, e.g. 0 1 or 0-3 "
                        "(default: the config's)")
    p.add_argument("--ray-sweep", help="a W&B sweep YAML whose search space Ray Tune samples")
    p.add_argument("--ray-samples", type=int, default=1, help="samples of --ray-sweep's space per seed")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> list[str]:
    ov = list(args.overrides or []) + list(args.set_overrides or [])
    for flag, key in (("seed", "seed"), ("total_timesteps", "total_timesteps"), ("out_dir", "out_dir")):
        v = getattr(args, flag)
        if v is not None:
            ov.append(f"{key}={v}")
    if args.feature_schema is not None:
        ov.append(f"env.feature_schema={args.feature_schema}")
    for o in ov:
        if "=" not in o:
            raise ValueError(f"override {o!r} is not KEY=VALUE")
    return ov


def tie_note(rows: list[dict]) -> str | None:
    """A note when trials of different seeds scored exactly alike, saying what that does and does not mean."""
    by_score: dict[float, list] = {}
    for r in rows:
        if r.get("slo_attainment") is not None:
            by_score.setdefault(r["slo_attainment"], []).append(r.get("seed"))
    ties = [seeds for seeds in by_score.values() if len(set(seeds)) > 1]
    if not ties:
        return None
    return ("note: seeds " + "; ".join(", ".join(map(str, t)) for t in ties) + " scored exactly the same SLO "
            "attainment. Each trial ran its own seed (see its run_dir, named -s<seed>-, and its weights), but a "
            "briefly trained policy tends to send nearly every request to one prefill node; the prefill nodes are "
            "interchangeable, so two such policies score alike whichever node they pick. Train longer "
            "(total_timesteps) for the seed to show in the score.")


def run(args: argparse.Namespace) -> int:
    if os.environ.get("WANDB_MODE") is None and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
    ov = _overrides(args)
    if args.ray or args.ray_address:
        import sys

        from deflectlab.agents.ray_tune import RayUnavailable, run_ray

        seeds = list(parse_seeds(args.ray_seeds, "--ray-seeds")) if args.ray_seeds else None
        try:
            rows = run_ray(args.config, seeds=seeds, sweep=args.ray_sweep, num_samples=args.ray_samples,
                           address=args.ray_address, num_cpus=args.ray_cpus, overrides=ov)
        except RayUnavailable as e:
            print(f"deflectlab train: error: {e}", file=sys.stderr)
            return 3
        for r in rows:
            print(json.dumps(r, default=str))
        note = tie_note(rows)
        if note:
            print(note, file=sys.stderr)
        return 0
    from deflectlab.agents.train import train

    res = train(args.config, overrides=ov, progress=not args.no_progress, verbose=args.verbose)
    asked = "" if res.timesteps == res.requested_timesteps else f" ({res.requested_timesteps} asked, rounded up)"
    print(f"run {res.run_name}: {res.timesteps} RL steps{asked} in {res.learn_s:.1f} s of rollouts and updates "
          f"({res.steps_per_s:.0f} steps/s); behaviour cloning {res.pretrain_s:.1f} s, evaluations "
          f"{res.eval_s:.1f} s; {res.wall_s:.1f} s from cloning to the final evaluation")
    print(f"evaluation SLO attainment {res.objective:.3f} (best periodic {res.best_eval_slo_attainment:.3f}); "
          + ", ".join(f"{k} {v['slo_attainment']:.3f}" for k, v in res.baselines.items()))
    print(f"written to {res.run_dir}")
    return 0
