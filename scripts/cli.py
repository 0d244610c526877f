"""The ``deflectlab`` console command.

Each subcommand lives in its own module ``deflectlab/scripts/cmd_<name>.py`` exposing ``register(subparsers)``,
which adds an argparse parser with ``set_defaults(func=...)``. Only the module of the command being run is
imported, so ``deflectlab --help`` is instant and a command never fails because another command's optional
dependencies (the ``rl`` or ``serve`` extra) are missing. A command whose extra is missing exits 2 with one line
naming the extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command -> one-line help, in the order ``--help`` lists them. The module is ``cmd_<command with _ for ->``.
COMMANDS: dict[str, str] = {
    "simulate": "replay a trace on a simulated xPyD cluster under one policy",
    "main": "the main job: where tail TTFT goes, and which deflection policy helps",
    "compare": "compare policies over loads and seeds on identical request streams",
    "sensitivity": "how the conclusions move with the KV hand-off: transport presets and dispatch delay",
    "headroom": "the clairvoyant lookahead planner against the heuristics: how much room is left",
    "tune": "tune the threshold heuristics on training windows (fair baselines)",
    "train": "train PPO / MaskablePPO / DQN on the deflection environment",
    "dagger": "imitate the clairvoyant lookahead planner with the shape-generic network (DAgger)",
    "es": "fine-tune a shape-generic policy on the episode score by evolution strategies",
    "rl-report": "learning curves over seeds and a paired held-out evaluation of trained networks",
    "evaluate": "compare policies on a config's evaluation episodes",
    "sweep": "hyperparameter sweep from a W&B sweep YAML (W&B server, or local Optuna)",
    "export": "export a trained policy (ONNX + JSON manifest)",
    "emulate": "run an emulated vLLM instance timed by the cluster model",
    "route": "run the deflection router in front of vLLM (or emulated) P/D instances",
    "replay": "replay a trace window against an OpenAI-compatible endpoint",
    "vllm-commands": "print the commands for a vLLM P/D cluster behind the router",
    "profile-gpu": "measure step times of a model-shaped transformer; write a calibration CSV",
    "calibrate": "fit a latency profile to measured step times (CSV) and report the error",
    "validate": "compare a profile's predictions with measured step times (CSV)",
}

#: top-level module of an optional dependency -> the extra that installs it (pyproject.toml).
OPTIONAL_MODULES: dict[str, str] = {
    "torch": "rl", "stable_baselines3": "rl", "sb3_contrib": "rl", "wandb": "rl", "optuna": "rl",
    "sweeps": "rl", "onnx": "rl", "ray": "rl", "pyarrow": "rl",
    "aiohttp": "serve", "prometheus_client": "serve", "onnxruntime": "serve",
}


def module_name(command: str) -> str:
    return f"deflectlab.scripts.cmd_{command.replace('-', '_')}"


def _chosen(argv: list[str]) -> str | None:
    """The subcommand named in ``argv``: the first word that is not an option."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command listed, and ``command``'s own module registered (imported)."""
    parser = argparse.ArgumentParser(
        prog="deflectlab",
        description="Load-aware prefill deflection for disaggregated LLM serving: simulate, compare, train, serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if name == command:
            importlib.import_module(module_name(name)).register(sub, help_text)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    parser.set_defaults(_commands=sub.choices)
    return parser


def command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The subcommand's own parser (its usage is what an error in that command prints), else the top one."""
    return parser.get_default("_commands").get(command, parser) if command else parser


def parse(parser: argparse.ArgumentParser, command: str | None, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag is reported by the subcommand's parser, with its usage."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command_parser(parser, command).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """The extra that installs the module ``e`` could not find, if it is an optional dependency."""
    return OPTIONAL_MODULES.get((e.name or "").split(".")[0])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _chosen(argv)
    parser = None
    try:
        parser = build_parser(command)
        args = parse(parser, command, argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        extra = missing_extra(e)
        if extra is None:
            raise
        print(f"deflectlab {command}: error: this command needs the '{extra}' extra ({e.name} is missing): "
              f"pip install 'deflectlab[{extra}]'", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # user errors: the command's usage and one clear line
        if parser is not None:
            command_parser(parser, command).print_usage(sys.stderr)
        print(f"deflectlab {command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
