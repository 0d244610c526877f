"""Cluster configuration: typed, validated at the edge, written as JSON beside every result."""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from deflectlab.envs.parsing import ConfigError, parse_value  # noqa: F401 - re-exported for the layers above


def check_number(
    value: Any, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
    hi_open: bool = False, integer: bool = False, unit: str = "", what: str = "", error: type[ValueError] = ConfigError,
) -> Any:
    """``value`` as a float (an int when ``integer``) if it is a finite number in range, else an ``error`` (a
    :class:`ConfigError` unless told) naming ``what`` (the owner: a policy, a reward), ``name``, the range, the
    unit and the value. Bounds are inclusive unless ``lo_open``/``hi_open``; booleans are not numbers."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
    ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        bounds = [f"{'>' if lo_open else '>='} {lo:g}"] if lo is not None else []
        bounds += [f"{'<' if hi_open else '<='} {hi:g}"] if hi is not None else []
        kind = "an integer" if integer else "a finite number"
        rng = (" " + " and ".join(bounds)) if bounds else ""
        raise error(f"{what + ': ' if what else ''}{name} must be {kind}{rng}{f' ({unit})' if unit else ''}, "
                    f"got {value!r}")
    return int(value) if integer else float(value)


def check_range(value: Any, name: str, *, positive: bool = False, unit: str = "", what: str = ""
                ) -> tuple[float, float]:
    """A number ``x`` as ``(x, x)``, or a ``(low, high)`` pair with ``low <= high``; each a finite number (> 0
    when ``positive``). Errors as :func:`check_number`'s."""
    pair = [value, value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
        raise ConfigError(f"{what + ': ' if what else ''}{name} must be a number or a (low, high) range, got {value!r}")
    lo, hi = (check_number(x, name, lo=0.0 if positive else None, lo_open=positive, unit=unit, what=what)
              for x in pair)
    if lo > hi:
        raise ConfigError(f"{what + ': ' if what else ''}{name} range must have low <= high, got {value!r}")
    return lo, hi


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


def cli_field(default: Any, help: str, *, unit: str = "", aliases: tuple[str, ...] = (), choices: tuple[Any, ...] = (),
              flag: str | None = "", factory: Any = None) -> Any:
    """A dataclass field that carries its command-line form (``scripts/options.py`` builds the flags from it).

    :param help: what the field means (one line; the flag's help).
    :param unit: the unit, printed after the help (``seconds``, ``tokens``).
    :param aliases: older flag names still accepted.
    :param choices: the allowed values of a string field (or of an int field, as ints: ``feature_schema``).
    :param flag: the flag name; ``""`` derives it from the field name (``ttft_slo_s`` -> ``--ttft-slo-s``, so a
        unit suffix in the name shows in the flag), None means no flag of its own.
    :param factory: builds a mutable default (a list, a dict) in place of ``default``.
    """
    meta = {"help": help, "unit": unit, "aliases": aliases, "choices": choices, "flag": flag}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


#: How a prefill-path request's decode node is chosen when the policy leaves it open.
DECODE_BALANCERS = ("least_loaded", "round_robin")


@dataclass(frozen=True)
class ClusterConfig:
    """Shape and engine settings of an xPyD cluster. Each field's meaning and unit are in its ``cli_field``
    (they are also the command-line flags' help texts)."""

    num_prefill: int = cli_field(2, "prefill nodes (one vLLM instance each); flags: --shape", flag=None)
    num_decode: int = cli_field(2, "decode nodes; flags: --shape", flag=None)
    prefill_profile: str = cli_field("a100-80gb_deepseek-v2-lite",
                                     "latency profile of the prefill nodes (bundled name or YAML path)")
    decode_profile: str = cli_field("a100-80gb_deepseek-v2-lite",
                                    "latency profile of the decode nodes; may differ from the prefill pool's")
    prefill_max_batched_tokens: int = cli_field(
        8192, "token budget of one prefill step (vLLM max_num_batched_tokens); longer prompts are chunked",
        unit="tokens", aliases=("--prefill-budget",))
    decode_max_batched_tokens: int = cli_field(
        2048, "token budget of one decode step, decodes plus deflected prefill chunks (vLLM V1 chunked prefill)",
        unit="tokens", aliases=("--decode-budget",))
    max_num_seqs: int = cli_field(256, "most requests admitted on one decode node at once (vLLM max_num_seqs)",
                                  unit="requests")
    decode_balancer: str = cli_field(
        "least_loaded", "decode node of a prefill-path request the policy leaves open: least_loaded (fewest "
        "admitted plus waiting requests) or round_robin", choices=DECODE_BALANCERS)
    ttft_slo_s: float = cli_field(1.0, "time-to-first-token SLO", unit="seconds", aliases=("--ttft-slo",))
    tbt_slo_s: float = cli_field(0.1, "SLO on a request's P95 time between tokens", unit="seconds",
                                 aliases=("--tbt-slo",))
    handoff: str = cli_field(
        "vllm-nixl", "KV hand-off transport preset: vllm-nixl, rdma or tcp, optionally with terms, e.g. "
        "vllm-nixl:dispatch_s=0.2 (envs/handoff.py, docs/fidelity.md)")
    prefix_cache: bool = cli_field(
        True, "automatic prefix caching on every node (vLLM V1's default) where the trace has block hashes "
        "(Mooncake); --no-prefix-cache turns it off (docs/prefix_cache.md)")

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
        if self.decode_balancer not in DECODE_BALANCERS:
            raise ConfigError(f"decode_balancer must be one of {', '.join(DECODE_BALANCERS)}, got "
                              f"{self.decode_balancer!r}")
        for name in ("ttft_slo_s", "tbt_slo_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"{name} must be a number > 0 (seconds), got {v!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ConfigError(f"prefix_cache must be true or false, got {self.prefix_cache!r}")
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
    def coerce(cls, cluster: ClusterConfig | dict[str, Any] | str | None) -> ClusterConfig:
        """A config from a config, a mapping of its fields (``shape`` allowed in place of the node counts), a
        shape such as ``"2p2d"``, or None (the defaults)."""
        if cluster is None:
            return cls()
        if isinstance(cluster, cls):
            return cluster
        if isinstance(cluster, str):
            return cls.from_shape(cluster)
        if isinstance(cluster, dict):
            d = dict(cluster)
            return cls.from_shape(d.pop("shape"), **d) if "shape" in d else cls.from_dict(d)
        raise ConfigError(f"cluster must be a ClusterConfig, a mapping or a shape like '2p2d', got {cluster!r}")

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
