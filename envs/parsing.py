"""The lowest configuration helpers: the error every bad key or value raises, and the command-line value parser.

They sit below :mod:`deflectlab.envs.config` and :mod:`deflectlab.envs.handoff` so both can use them without
importing each other.
"""

from __future__ import annotations

from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


def parse_value(text: str) -> Any:
    """A value written on a command line (``key=value``): int, float (``3e-4`` too, which YAML 1.1 reads as a
    string), ``none``/``None`` as None, else YAML (``true``, ``null``, lists, plain strings)."""
    if text.strip().lower() == "none":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return yaml.safe_load(text)
