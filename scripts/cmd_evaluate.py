"""``deflectlab evaluate``: learned and heuristic policies on the same evaluation episodes, as a table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="compare policies on a config's evaluation episodes",
        description="Every policy replays the same episodes (DeflectionEnv.episode_workload of each evaluation "
                    "seed); prints a markdown table and writes evaluation.json/.md.")
    p.add_argument("--config", help="training config whose env/eval sections define the episodes "
                                    "(default: the --model run's config)")
    p.add_argument("--model", help="a trained run directory (or model zip) to include as 'learned'")
    p.add_argument("--which", default="best", choices=["best", "final"])
    p.add_argument("--policies", default=None,
                   help="comma-separated registry specs, e.g. round_robin,proactive,learned:path=dir "
                        "(default: the config's baselines); separate a spec's own parameters with ';'")
    p.add_argument("--episodes", type=int, help="override eval.episodes")
    p.add_argument("--seed", type=int, help="override the first evaluation seed")
    p.add_argument("--out", help="write evaluation.json and evaluation.md here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the config "
                   "(e.g. eval.env.load=3.0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agents.config import load_config
    from agents.evaluation import NetPolicy, available_baselines, evaluate, table

    if not args.config and not args.model:
        raise ValueError("give --config or --model")
    net = None
    if args.model:
        from agents.policy_io import find_run, load_policy_net

        net, run_cfg, _ = load_policy_net(args.model, args.which)
    cfg_src = args.config or str(find_run(args.model, args.which)[0] / "config.yaml")
    ov = list(args.overrides or [])
    if args.episodes is not None:
        ov.append(f"eval.episodes={args.episodes}")
    if args.seed is not None:
        ov.append(f"eval.seed={args.seed}")
    cfg = load_config(cfg_src, ov)
    if args.policies:
        specs = [s.strip().replace(";", ",") for s in args.policies.split(",") if s.strip()]
    else:
        specs, missing = available_baselines(list(cfg.eval.baselines))
        if missing:
            print(f"skipping unavailable baselines: {', '.join(missing)}")
    pols: dict = {s: s for s in specs}
    if net is not None:
        pols = {"learned": NetPolicy(net), **pols}
    rep = evaluate(pols, cfg.eval_env_kwargs(), cfg.eval_seeds(), progress=True)
    md = table(rep)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(rep, indent=2, default=float))
        (out / "evaluation.md").write_text(f"seeds {rep['seeds']}\n\n{md}\n")
    return 0
