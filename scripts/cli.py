"""The ``deflectlab`` console command.

Each subcommand lives in its own module ``scripts/cmd_<name>.py`` exposing ``register(subparsers)``, which
adds an argparse parser with ``set_defaults(func=...)``; this file discovers them, so adding a command never
touches another's code.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import scripts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deflectlab",
        description="Load-aware prefill deflection for disaggregated LLM serving: simulate, compare, train, serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(scripts.__path__), key=lambda m: m.name):
        if mod.name.startswith("cmd_"):
            importlib.import_module(f"scripts.{mod.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"deflectlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
