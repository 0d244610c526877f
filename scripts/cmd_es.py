"""``deflectlab es``: fine-tune a shape-generic policy on the episode objective by evolution strategies.

    deflectlab es --init experiments/trained_dagger --out runs/es --iterations 60 --jobs 2
    deflectlab es --init experiments/trained_dagger --out runs/es --settings 2x2:azure_code:2,2x2:azure_code:3 --ray

Each iteration perturbs the weights in ``--pairs`` antithetic pairs, plays every candidate on the same fresh
training episodes (``--episodes`` per setting, windows ending by 1,200 s of each trace), and takes an Adam step
along the rank-shaped ES gradient of the score (SLO attainment, P95 TTFT as a tie-break). Every
``--validate-every`` iterations the current weights play fixed validation episodes (training windows too); the
best of those is exported to ``OUT/policy`` (``learned:path=OUT/policy``) and ``OUT/es_log.json`` has every
iteration. ``--reference SPEC`` also plays a registered policy on the validation episodes, for the log.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deflectlab.scripts.cmd_dagger import parse_shapes


def parse_settings(text: str) -> list[tuple]:
    """``PxD:trace:load[:arrival:cv]`` items, comma-separated (e.g. ``2x2:azure_code:3``,
    ``2x2:azure_code:2:gamma:2``)."""
    out: list[tuple] = []
    for part in filter(None, (x.strip() for x in text.split(","))):
        bits = part.split(":")
        if len(bits) not in (3, 5):
            raise argparse.ArgumentTypeError(f"setting {part!r}: expected PxD:trace:load[:arrival:cv] "
                                             "(e.g. 2x2:azure_code:3 or 2x2:azure_code:2:gamma:2)")
        nums = []
        for b in (bits[2], *bits[4:]):
            try:
                nums.append(float(b))
            except ValueError:
                raise argparse.ArgumentTypeError(f"setting {part!r}: {b!r} is not a number") from None
        shape = parse_shapes(bits[0])[0]
        out.append((shape, bits[1], nums[0]) if len(bits) == 3 else (shape, bits[1], nums[0], bits[3], nums[1]))
    if not out:
        raise argparse.ArgumentTypeError("expected at least one setting")
    return out


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    from deflectlab.agents.es import EsConfig
    from deflectlab.envs.splits import SPLITS

    d = EsConfig()
    p = sub.add_parser("es", help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", type=Path, metavar="DIR",
                       help="the exported shape-generic policy to start from (its policy_set.npz, read without pickle)")
    start.add_argument("--scratch", action="store_true",
                       help="start from a freshly initialized network (torch seeded by --seed; width --hidden): RL "
                            "from scratch, no imitation")
    p.add_argument("--hidden", type=int, default=64, help="network width with --scratch")
    p.add_argument("--out", type=Path, default=Path("runs/es"), help="run folder")
    p.add_argument("--settings", type=parse_settings, default=d.settings,
                   help="training settings PxD:trace:load, comma-separated (default: 2P2D code 1-3x, 4P4D code 3x, "
                        "2P2D conversation 3x)")
    p.add_argument("--episodes", type=int, default=d.episodes, help="training episodes per setting per iteration")
    p.add_argument("--window", type=float, default=d.window_s, help="episode window, trace seconds")
    p.add_argument("--split", choices=tuple(SPLITS), default=d.split,
                   help="which blocks of trace time are held out (envs.splits): time holds out [1200, end) s, "
                        "blocked alternating 300-s blocks; training windows come from the other blocks")
    p.add_argument("--window-start", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="window starts in [LOW, HIGH] trace seconds (default: the split's training blocks, "
                        "[0, 1200 - window] for the time split)")
    p.add_argument("--validation-start", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="validation windows start in [LOW, HIGH] trace seconds (default: the training ranges); "
                        "they may not reach into a held-out block")
    p.add_argument("--weigh", choices=("episodes", "requests"), default=d.weigh,
                   help="within a setting, episodes weigh equally or by their requests (pooled)")
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--pairs", type=int, default=d.pairs, help="antithetic pairs per iteration")
    p.add_argument("--sigma", type=float, default=d.sigma, help="perturbation scale")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam step size")
    p.add_argument("--params", default="", help="only perturb weights whose names start with these prefixes "
                                               "(comma-separated, e.g. psi_p,psi_d; default: all)")
    p.add_argument("--tie-weight", type=float, default=d.tie_weight,
                   help="weight of the P95 TTFT (in TTFT SLOs) against SLO attainment in the score")
    p.add_argument("--validate-every", type=int, default=d.validate_every)
    p.add_argument("--validation-episodes", type=int, default=d.validation_episodes, help="per setting")
    p.add_argument("--reference", default="", help="a registered policy also played on the validation episodes")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--ray", action="store_true", help="play candidates as Ray tasks (local Ray with --jobs CPUs)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. auto); implies --ray")
    p.add_argument("--wandb", action="store_true",
                   help="log each iteration to W&B (offline unless WANDB_API_KEY is set), files in OUT")
    p.set_defaults(func=run)


def config(a: argparse.Namespace):
    from deflectlab.agents.es import EsConfig

    start = tuple(a.window_start) if a.window_start else None
    try:
        return EsConfig(settings=a.settings, episodes=a.episodes, window_s=a.window, split=a.split,
                        window_start_s=start,
                        validation_start_s=tuple(a.validation_start) if a.validation_start else None, weigh=a.weigh,
                        iterations=a.iterations, pairs=a.pairs, sigma=a.sigma, lr=a.lr,
                        params=tuple(x.strip() for x in a.params.split(",") if x.strip()), tie_weight=a.tie_weight,
                        validate_every=a.validate_every, validation_episodes=a.validation_episodes, seed=a.seed)
    except ValueError as e:
        raise SystemExit(f"deflectlab {e}") from None


def run(a: argparse.Namespace) -> int:
    import shlex
    import sys
    from dataclasses import asdict

    from deflectlab.agents.dagger import net_from_arrays
    from deflectlab.agents.es import train_es
    from deflectlab.agents.set_export import export_set, load_set_net
    from deflectlab.agents.tracking import Progress, start_run
    from deflectlab.envs.config import ClusterConfig

    if a.jobs < 1:
        raise SystemExit("deflectlab es: --jobs must be >= 1")
    if a.scratch:
        import torch

        from deflectlab.agents.setnet import SetPolicyNet

        torch.manual_seed(a.seed)
        init = SetPolicyNet(a.hidden).eval()
    else:
        init = load_set_net(a.init)
    cfg = config(a)
    origin = "a fresh network (no imitation)" if a.scratch else str(a.init)
    tracker = Progress("es iteration", ("es/validation_slo", "es/candidates_mean_slo", "es/step_norm",
                                        "es/wall_s"),
                       start_run(f"es-{a.out.name}", a.out, {**asdict(cfg), "init": origin}) if a.wandb else None)
    w, log = train_es(cfg, init.arrays(), init.feature_schema, out=a.out, jobs=a.jobs, use_ray=a.ray,
                      ray_address=a.ray_address, reference=a.reference, tracker=tracker)
    tracker.finish()
    trained_on = {"method": f"evolution strategies from {origin} ({cfg.iterations} iterations x {2 * cfg.pairs} "
                            f"candidates, best on validation at iteration {log['best_iteration']})",
                  "settings": [f"{p}P{q}D {tr} {ld:g}x" + ("" if arr == "trace" else f" {arr} CV {cv:g}")
                               for (p, q), tr, ld, arr, cv in cfg.settings],
                  "shapes": sorted({f"{s[0][0]}P{s[0][1]}D" for s in cfg.settings}),
                  "traces": sorted({s[1] for s in cfg.settings}),
                  "split": cfg.split, "window_start_s": [list(r) for r in cfg.window_start_s],
                  "profiles": ["a100-80gb_deepseek-v2-lite"],
                  "feature_schema": init.feature_schema, "init": origin}
    man = export_set(net_from_arrays(w, init.hidden, init.feature_schema), a.out / "policy",
                     ClusterConfig(handoff=cfg.handoff), trained_on=trained_on,
                     source={"run": str(a.out), "wall_s": log["wall_s"],
                             "command": "deflectlab " + shlex.join(sys.argv[1:])})
    for v in log["validations"]:
        print(json.dumps(v))
    print(json.dumps({k: log.get(k) for k in ("reference", "best_iteration", "best_validation_objective", "wall_s",
                                              "episodes_per_s")}))
    print(f"wrote {man}")
    return 0
