"""Readable names of policy specs for tables and legends.

A spec may carry a file path (``learned:path=/home/me/deflectlab/experiments/trained``); a report or a legend
shows it relative to the working directory or to the repository (``learned:path=experiments/trained``), or
else by its last component, never as an absolute machine path.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

#: the folder that holds ``experiments/`` (the repository, or ``site-packages/deflectlab`` when installed)
_ROOT = Path(__file__).resolve().parents[1]


def short_path(value: str) -> str:
    """``value`` relative to the working directory or the repository when it is under one, else its name."""
    p = Path(value)
    if not p.is_absolute():
        return value
    for base in (Path.cwd(), _ROOT):
        try:
            return p.resolve().relative_to(base.resolve()).as_posix() or "."
        except ValueError:
            continue
    return p.name or value


def policy_label(spec: str) -> str:
    """``spec`` with every absolute path parameter shortened (see :func:`short_path`)."""
    name, sep, params = spec.partition(":")
    if not sep:
        return spec
    parts = []
    for kv in params.split(","):
        k, eq, v = kv.partition("=")
        looks_like_path = eq and (os.sep in v or v.startswith("~"))
        parts.append(f"{k}={short_path(os.path.expanduser(v))}" if looks_like_path else kv)
    return f"{name}:{','.join(parts)}"


def labelled(items: Iterable[str], what: str = "LABEL=VALUE") -> dict[str, str]:
    """``["a=x", "b=y"]`` -> ``{"a": "x", "b": "y"}`` (repeatable ``--flag LABEL=VALUE`` options); an item without
    a label or a value is an ``argparse.ArgumentTypeError`` naming it."""
    out: dict[str, str] = {}
    for item in items:
        label, eq, value = item.partition("=")
        if not eq or not label.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not {what}")
        out[label.strip()] = value.strip()
    return out
