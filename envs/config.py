"""Cluster configuration: typed, validated at the edge, written as JSON beside every result."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


def from_mapping(cls: Any, d: Any, what: str) -> Any:
    """Build dataclass ``cls`` from a mapping; a key that is not one of its fields is a :class:`ConfigError`
    naming the key and the known ones."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what}: expected a mapping, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    extra = set(d) - known
    if extra:
        raise ConfigError(f"unknown {what} key(s) {sorted(extra)}; known: {sorted(known)}")
    return cls(**d)


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


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """The YAML document at ``path``: a missing file is a ``FileNotFoundError`` naming ``what`` and the path,
    invalid YAML a :class:`ConfigError` naming the path and the parser's complaint."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None


@dataclass(frozen=True)
class ClusterConfig:
    """Shape and engine settings of an xPyD cluster.

    :param num_prefill: prefill nodes (one vLLM instance each).
    :param num_decode: decode nodes.
    :param prefill_profile: latency profile of the prefill nodes (bundled name or YAML path).
    :param decode_profile: latency profile of the decode nodes; may differ from the prefill pool's.
    :param prefill_max_batched_tokens: token budget of one prefill step, tokens (vLLM
        ``max_num_batched_tokens``); longer prompts are chunked across steps.
    :param decode_max_batched_tokens: token budget of one decode step, decodes plus deflected prefill chunks,
        tokens. Deflected prefills fill what the running decodes leave (vLLM V1 chunked prefill).
    :param max_num_seqs: most requests admitted on one decode node at once (vLLM ``max_num_seqs``).
    :param decode_balancer: how a prefill-path request's decode node is chosen when the policy leaves it
        open: ``least_loaded`` (fewest admitted plus waiting requests) or ``round_robin``.
    :param ttft_slo_s: time-to-first-token SLO, seconds.
    :param tbt_slo_s: time-between-tokens SLO on a request's P95 TBT, seconds.
    :param handoff: KV hand-off transport preset, ``NAME`` or ``NAME:term=value,...`` (``vllm-nixl``, ``rdma``,
        ``tcp``; see :mod:`envs.handoff`).
    """

    num_prefill: int = 2
    num_decode: int = 2
    prefill_profile: str = "a100-80gb_deepseek-v2-lite"
    decode_profile: str = "a100-80gb_deepseek-v2-lite"
    prefill_max_batched_tokens: int = 8192
    decode_max_batched_tokens: int = 2048
    max_num_seqs: int = 256
    decode_balancer: str = "least_loaded"
    ttft_slo_s: float = 1.0
    tbt_slo_s: float = 0.1
    handoff: str = "vllm-nixl"

    def __post_init__(self) -> None:
        for name in ("num_prefill", "num_decode"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        if self.num_decode < 1:
            raise ConfigError("num_decode must be >= 1: every request decodes on a decode node")
        for name in ("prefill_max_batched_tokens", "decode_max_batched_tokens", "max_num_seqs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if self.decode_max_batched_tokens <= self.max_num_seqs:
            raise ConfigError(
                f"decode_max_batched_tokens ({self.decode_max_batched_tokens}) must exceed max_num_seqs "
                f"({self.max_num_seqs}) so a full decode batch still fits in one step")
        if self.decode_balancer not in ("least_loaded", "round_robin"):
            raise ConfigError(f"decode_balancer must be 'least_loaded' or 'round_robin', got {self.decode_balancer!r}")
        for name in ("ttft_slo_s", "tbt_slo_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"{name} must be a number > 0 (seconds), got {v!r}")
        from deflectlab.envs.handoff import parse_handoff

        parse_handoff(self.handoff)  # names a bad preset or term

    @property
    def shape(self) -> str:
        return f"{self.num_prefill}p{self.num_decode}d"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterConfig:
        return from_mapping(cls, d, "cluster")

    @classmethod
    def from_shape(cls, shape: str, **kw: Any) -> ClusterConfig:
        p, d = parse_shape(shape)
        return cls.from_dict({"num_prefill": p, "num_decode": d, **kw})


def parse_shape(shape: str) -> tuple[int, int]:
    """``"2p2d"`` -> ``(2, 2)``."""
    m = re.fullmatch(r"\s*(\d+)\s*[pP]\s*(\d+)\s*[dD]\s*", shape)
    if not m:
        raise ConfigError(f"cluster shape {shape!r} is not of the form <x>p<y>d, e.g. 2p2d")
    return int(m.group(1)), int(m.group(2))
