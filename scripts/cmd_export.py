"""``deflectlab export``: a trained run's policy as ONNX + manifest (+ numpy weights) for the router."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, help_text: str) -> None:
    p = sub.add_parser("export", help=help_text,
                       description="Write policy.onnx, policy_mlp.npz and manifest.json; run them with the "
                                   "policy spec learned:path=<out>.")
    p.add_argument("--model", required=True,
                   help="run directory, or a model zip inside one; or a shape-generic export (a folder with a "
                        "manifest.json), rewritten at the current format version (same weights)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--which", default="best", choices=["best", "final", "pretrained"],
                   help="best_model.zip (best periodic evaluation) or model.zip (end of training)")
    p.add_argument("--check", type=int, default=200, metavar="N",
                   help="compare exported and in-process actions on N decisions of an evaluation episode (0: skip)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.check < 0:
        raise ValueError(f"--check must be >= 0 decisions, got {args.check}")

    if (Path(args.model) / "manifest.json").is_file():
        return _reexport(args)
    from deflectlab.agents.export import export

    man = export(args.model, args.out, which=args.which)
    print(f"exported to {man.parent} (manifest {man.name})")
    if args.check:
        from deflectlab.agents.export import compare_actions

        res = compare_actions(args.model, man.parent, args.which, args.check)
        print(f"check: {res['agree']}/{res['n']} decisions agree (onnx), {res['agree_numpy']}/{res['n']} (numpy)")
        if res["agree"] != res["n"] or res["agree_numpy"] != res["n"]:
            return 1
    return 0


def _reexport(args: argparse.Namespace) -> int:
    """An older shape-generic export at the current format: same weights, graph rebuilt; ``--check`` compares
    the two ONNX graphs' actions on random observations of three cluster shapes."""
    from deflectlab.agents.set_export import compare_exports, reexport_set

    man = reexport_set(args.model, args.out)
    print(f"re-exported {args.model} to {man.parent} (manifest {man.name})")
    if args.check:
        agree, n = compare_exports(args.model, man.parent, args.check)
        print(f"check: {agree}/{n} random observations give the same action on both exports")
        if agree != n:
            return 1
    return 0
