"""Policies by name, with parameters: what configs and the CLI use."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deflectlab.envs.config import parse_value
from deflectlab.envs.view import Policy

_REGISTRY: dict[str, Callable[..., Policy]] = {}


def register(name: str, factory: Callable[..., Policy]) -> None:
    _REGISTRY[name] = factory


def _load_builtins() -> None:
    from deflectlab.policies import heuristics

    register("round_robin", heuristics.RoundRobin)
    register("never_deflect", heuristics.RoundRobin)
    register("always_deflect", heuristics.AlwaysDeflect)
    for extra in (
        "deflectlab.policies.heuristics_extra", "deflectlab.policies.proactive", "deflectlab.policies.runtime",
        "deflectlab.policies.prefix_affinity",
        "deflectlab.policies.lookahead", "deflectlab.policies.ensemble",
    ):
        try:
            mod = __import__(extra, fromlist=["register_policies"])
        except ModuleNotFoundError as e:
            if e.name != extra:
                raise
            continue
        mod.register_policies(register)


def available() -> list[str]:
    if not _REGISTRY:
        _load_builtins()
    return sorted(_REGISTRY)


def make_policy(spec: str | dict[str, Any] | Policy, **params: Any) -> Policy:
    """Build a policy from a name (``"round_robin"``), ``"name:key=value,key=value"``, or a mapping
    ``{"name": ..., **params}``. Unknown names and bad parameters are errors that name them."""
    if isinstance(spec, Policy):
        return spec
    if not _REGISTRY:
        _load_builtins()
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name", None)
        if not name:
            raise ValueError(f"policy mapping needs a 'name': {spec}")
        params = {**spec, **params}
    else:
        name, _, rest = spec.partition(":")
        for kv in filter(None, rest.split(",")):
            k, eq, v = kv.partition("=")
            if not eq:
                raise ValueError(f"policy parameter {kv!r} in {spec!r} is not key=value")
            params[k.strip()] = parse_value(v.strip())
    name = name.strip()
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"policy {name!r}: bad parameters {params}: {e}") from None
