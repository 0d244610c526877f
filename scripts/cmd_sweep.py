"""``deflectlab sweep``: run a W&B sweep YAML with `wandb agent`, or locally with Optuna / the sweeps package."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser(
        "sweep", help=help_text,
        description="Run experiments/sweeps/<name>.yaml. With W&B credentials (WANDB_API_KEY, WANDB_MODE not "
                    "offline) the sweep is created on the server and this process runs as a wandb agent; "
                    "otherwise trials run locally with Optuna (SQLite in the sweep directory, --workers processes).")
    p.add_argument("sweep", help="W&B sweep YAML")
    p.add_argument("--backend", default="auto", choices=["auto", "wandb", "optuna", "sweeps"])
    p.add_argument("--trials", type=int, default=8, help="trials in total")
    p.add_argument("--workers", type=int, default=2, help="parallel worker processes (optuna)")
    p.add_argument("--config", help="base training config (default: the one in the sweep's command)")
    p.add_argument("--out-dir", default="runs/sweeps", help="sweeps are written under this directory")
    p.add_argument("--project", default="deflectlab", help="W&B project (wandb backend)")
    p.add_argument("--seed", type=int, default=0, help="seed of the local samplers")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override for every trial, over the sweep's values (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deflectlab.agents.config import parse_value
    from deflectlab.agents.sweep import run_sweep

    ov = {}
    for o in args.overrides or []:
        k, eq, v = o.partition("=")
        if not eq:
            raise ValueError(f"override {o!r} is not KEY=VALUE")
        ov[k] = parse_value(v)
    out = run_sweep(args.sweep, backend=args.backend, trials=args.trials, workers=args.workers,
                    out_dir=args.out_dir, config=args.config, overrides=ov, project=args.project, seed=args.seed)
    keys = ("backend", "dir", "base_config", "cloned_expert", "overrides", "planned_timesteps_per_trial", "best")
    print(json.dumps({k: out.get(k) for k in keys}, indent=2, default=str))
    return 0
