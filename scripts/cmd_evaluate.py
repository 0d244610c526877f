"""``deflectlab evaluate``: learned and heuristic policies on the same evaluation episodes, as a table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deflectlab.scripts.options import (
    add_cluster_flags,
    add_policies_flag,
    add_seeds_flag,
    cluster_flags_given,
    cluster_from_flags,
    parse_loads,
    parse_policies,
    parse_seeds,
)


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser(
        "evaluate", help=help_text,
        description="Every policy replays the same episodes (DeflectionEnv.episode_workload of each evaluation "
                    "seed); prints a markdown table and writes evaluation.json/.md.")
    p.add_argument("--config", help="training config whose env/eval sections define the episodes "
                                    "(default: the --model run's config)")
    p.add_argument("--model", action="append", default=[],
                   help="a trained run directory (or model zip) to include, as 'learned'; repeatable as "
                        "NAME=PATH[@best|final|pretrained] to compare several")
    p.add_argument("--which", default="best", choices=["best", "final", "pretrained"],
                   help="which checkpoint of a run (default: best periodic evaluation)")
    add_policies_flag(p, None, "heuristics to evaluate, e.g. round_robin proactive learned:path=DIR (default: the "
                               "config's baselines)")
    add_seeds_flag(p, "the config's eval.seed .. eval.seed + eval.episodes - 1", "evaluation seeds, one episode each")
    p.set_defaults(seeds=None)
    p.add_argument("--episodes", type=int, help="override eval.episodes")
    p.add_argument("--seed", type=int, help="deprecated: the first evaluation seed (use --seeds)")
    p.add_argument("--loads", nargs="+", default=None, metavar="MULTIPLIER",
                   help="fixed load multipliers of the windows' recorded rate (not requests/s: that is --rates "
                        "elsewhere), each its own table, besides the config's own evaluation episodes (e.g. 2 3 4)")
    add_cluster_flags(p)
    p.add_argument("--out", help="write evaluation.json and evaluation.md here")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the config "
                   "(e.g. eval.env.load=3.0)")
    p.set_defaults(func=run)


def eval_seeds(args: argparse.Namespace, cfg) -> list[int]:
    """``--seeds`` if given (each at or above the evaluation seed base, so training never saw them), else the
    config's evaluation seeds (after ``--seed``/``--episodes``)."""
    from deflectlab.agents.config import EVAL_SEED_BASE

    if args.seeds is None:
        return cfg.eval_seeds()
    seeds = list(parse_seeds(args.seeds))
    if min(seeds) < EVAL_SEED_BASE:
        raise ValueError(f"--seeds: evaluation seeds must be >= {EVAL_SEED_BASE} (training environments are "
                         f"seeded below it), got {min(seeds)}")
    return seeds


def run(args: argparse.Namespace) -> int:
    from deflectlab.agents.config import load_config
    from deflectlab.agents.evaluation import NetPolicy, available_baselines, evaluate, table

    if not args.config and not args.model:
        raise ValueError("give --config or --model")
    from deflectlab.agents.policy_io import find_run, load_policy_net

    learned: dict = {}
    first_run = None
    for i, m in enumerate(args.model):
        name, eq, rest = m.partition("=")
        if not eq:
            name, rest = ("learned" if len(args.model) == 1 else f"learned{i}"), m
        path, _, which = rest.partition("@")
        net, run_cfg, _ = load_policy_net(path, which or args.which)
        learned[name] = NetPolicy(net, name=name, feature_schema=run_cfg.env.feature_schema,
                                  actions=run_cfg.env.actions)
        first_run = first_run or find_run(path, which or args.which)[0]
    cfg_src = args.config or str(first_run / "config.yaml")
    ov = list(args.overrides or [])
    if args.episodes is not None:
        ov.append(f"eval.episodes={args.episodes}")
    if args.seed is not None:
        ov.append(f"eval.seed={args.seed}")
    cfg = load_config(cfg_src, ov)
    if args.policies:
        specs = list(parse_policies(args.policies))
    else:
        specs, missing = available_baselines(list(cfg.eval.baselines))
        if missing:
            print(f"skipping unavailable baselines: {', '.join(missing)}")
    pols: dict = {**learned, **{s: s for s in specs}}
    base = cfg.eval_env_kwargs()
    if cluster_flags_given(args):
        base["cluster"] = cluster_from_flags(args, base["cluster"]).to_dict()
    seeds = eval_seeds(args, cfg)
    conditions = [("evaluation episodes (load " + "-".join(f"{x:g}" for x in base["load"]) + ")", base)]
    for x in (parse_loads(args.loads) if args.loads else ()):
        conditions.append((f"load {x:g}", {**base, "load": [x, x]}))
    reports, parts = {}, []
    for title, env_kwargs in conditions:
        rep = evaluate(pols, env_kwargs, seeds, progress=True)
        reports[title] = rep
        md = table(rep)
        parts.append(f"### {title}\n\nseeds {rep.seeds[0]}..{rep.seeds[-1]}, windows starting in "
                     f"{env_kwargs['window_start_s']} s of {env_kwargs['trace']}, {env_kwargs['window_s']:g} s long\n\n"
                     f"{md}\n")
        print(parts[-1])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(
            json.dumps({t: r.to_json() for t, r in reports.items()}, separators=(",", ":"), default=float))
        (out / "evaluation.md").write_text("\n".join(parts))
    return 0
