"""Latency profiles: the step-time model of one vLLM instance, kept as data.

A profile describes one (hardware, model, tensor-parallel degree). The time of one engine step is

    step_s = overhead_s
           + linear(num_tokens)                         # every linear operator, MoE expert reads folded in
           + decode_attn_s_per_token * decode_ctx_tokens  # decode attention: KV bytes read from HBM
           + decode_attn_s_per_seq * decode_seqs
           + prefill_attn_sq_s * sum(c_i ** 2)           # causal attention of a chunk with itself
           + prefill_attn_cross_s * sum(c_i * p_i)       # a chunk of c_i tokens against p_i prior tokens

where ``num_tokens`` is every token in the step (one per running decode plus the prefill chunk tokens) and
``linear`` is piecewise linear through measured or derived knots (flat at small token counts, where the
weights' memory traffic dominates, then linear in tokens). With the number of tokens fixed, the step time is
affine in the decode context and in the chunks' prior context, which is what lets the decode node jump over
many identical steps in closed form (see ``envs.decode_node``).

Profiles live as YAML in ``envs/profiles/``; each term carries the source of its value. Use
:func:`load_profile` with a bundled name (``a100-80gb_deepseek-v2-lite``) or a path.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PROFILE_DIR = Path(__file__).parent / "profiles"

#: Scalar terms every profile must define, each as ``{value: ..., source: "..."}``.
SCALAR_TERMS: dict[str, str] = {
    "overhead_s": "fixed time per engine step (scheduling, sampling, LM head), seconds",
    "decode_attn_s_per_token": "decode attention time per KV token read (whole model), seconds",
    "decode_attn_s_per_seq": "decode attention fixed time per running sequence (whole model), seconds",
    "prefill_attn_sq_s": "prefill attention time per squared chunk token (whole model), seconds",
    "prefill_attn_cross_s": "prefill attention time per (chunk token x prior context token), seconds",
    "kv_bytes_per_token": "KV-cache bytes per token (all layers), bytes",
    "kv_capacity_tokens": "KV-cache capacity of one instance, tokens",
    "kv_block_tokens": "tokens per KV block (allocation granularity), tokens",
    "nic_bandwidth_Bps": "effective KV-transfer bandwidth of one node's NIC, bytes per second",
    "kv_transfer_overhead_s": "fixed cost per KV transfer (setup, notification), seconds",
}


class ProfileError(ValueError):
    """A profile file is missing, malformed, or has a bad value."""


@dataclass(frozen=True)
class LatencyModel:
    """Step-time model of one engine instance. All times in seconds, sizes in tokens or bytes.

    :param name: profile name (file stem for bundled profiles).
    :param hardware: accelerator, e.g. ``A100-80GB``.
    :param model: model name, e.g. ``DeepSeek-V2-Lite``.
    :param tensor_parallel: tensor-parallel degree of one instance.
    :param linear_tokens: knot positions of the linear-operator curve, tokens, strictly increasing.
    :param linear_s: linear-operator time at each knot, seconds.
    :param sources: where each number came from (term name -> citation).
    """

    name: str
    hardware: str
    model: str
    tensor_parallel: int
    overhead_s: float
    decode_attn_s_per_token: float
    decode_attn_s_per_seq: float
    prefill_attn_sq_s: float
    prefill_attn_cross_s: float
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    kv_block_tokens: int
    nic_bandwidth_Bps: float
    kv_transfer_overhead_s: float
    linear_tokens: tuple[float, ...]
    linear_s: tuple[float, ...]
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.linear_tokens) != len(self.linear_s) or len(self.linear_tokens) < 2:
            raise ProfileError(f"profile {self.name}: linear needs >= 2 knots with one time each")
        if any(b <= a for a, b in zip(self.linear_tokens, self.linear_tokens[1:])):
            raise ProfileError(f"profile {self.name}: linear.tokens must be strictly increasing")
        if any(s <= 0 for s in self.linear_s):
            raise ProfileError(f"profile {self.name}: linear.seconds must be positive")
        for term in SCALAR_TERMS:
            v = getattr(self, term)
            if not (isinstance(v, (int, float)) and math.isfinite(v)) or v < 0:
                raise ProfileError(f"profile {self.name}: {term} must be a finite number >= 0, got {v!r}")
        for term in ("kv_bytes_per_token", "kv_capacity_tokens", "kv_block_tokens", "nic_bandwidth_Bps"):
            if getattr(self, term) <= 0:
                raise ProfileError(f"profile {self.name}: {term} must be > 0")
        # Slopes of each linear segment, the last one extended beyond the last knot.
        slopes = [
            (s1 - s0) / (t1 - t0)
            for t0, t1, s0, s1 in zip(self.linear_tokens, self.linear_tokens[1:], self.linear_s, self.linear_s[1:])
        ]
        object.__setattr__(self, "_slopes", tuple(slopes))
        object.__setattr__(self, "_linear_cache", {})  # token count -> seconds (steps repeat token counts)

    # -- the model ---------------------------------------------------------------------------------------
    def linear(self, num_tokens: float) -> float:
        """Linear-operator time of a step with ``num_tokens`` tokens, seconds (flat below the first knot)."""
        knots = self.linear_tokens
        if num_tokens <= knots[0]:
            return self.linear_s[0]
        i = bisect_right(knots, num_tokens) - 1
        if i >= len(knots) - 1:
            i = len(knots) - 2
        return self.linear_s[i] + self._slopes[i] * (num_tokens - knots[i])  # type: ignore[attr-defined]

    def step_s(
        self,
        num_tokens: float,
        decode_seqs: int = 0,
        decode_ctx_tokens: float = 0.0,
        chunk_sq: float = 0.0,
        chunk_cross: float = 0.0,
    ) -> float:
        """Time of one engine step, seconds.

        :param num_tokens: all tokens in the step (decode tokens plus prefill chunk tokens).
        :param decode_seqs: running decode sequences in the step.
        :param decode_ctx_tokens: KV tokens the decodes read (sum of their context lengths).
        :param chunk_sq: sum over prefill chunks of chunk_tokens ** 2.
        :param chunk_cross: sum over prefill chunks of chunk_tokens * prior_context_tokens.
        """
        if num_tokens <= 0:
            return 0.0
        cache = self._linear_cache  # type: ignore[attr-defined]
        lin = cache.get(num_tokens)
        if lin is None:
            lin = cache[num_tokens] = self.linear(num_tokens)
        return (
            self.overhead_s
            + lin
            + self.decode_attn_s_per_token * decode_ctx_tokens
            + self.decode_attn_s_per_seq * decode_seqs
            + self.prefill_attn_sq_s * chunk_sq
            + self.prefill_attn_cross_s * chunk_cross
        )

    def prefill_s(self, prompt_tokens: float, prior_tokens: float = 0.0) -> float:
        """Time to prefill one prompt alone in one step, seconds."""
        return self.step_s(prompt_tokens, chunk_sq=prompt_tokens**2, chunk_cross=prompt_tokens * prior_tokens)

    def decode_step_s(self, batch: int, ctx_tokens: float) -> float:
        """Time of a pure decode step of ``batch`` sequences reading ``ctx_tokens`` KV tokens, seconds."""
        return self.step_s(batch, batch, ctx_tokens)

    def transfer_s(self, tokens: float) -> float:
        """Uncontended KV hand-off time of ``tokens`` prompt tokens: overhead plus bytes over bandwidth."""
        return self.kv_transfer_overhead_s + tokens * self.kv_bytes_per_token / self.nic_bandwidth_Bps

    def prefill_tokens_per_s(self, chunk_tokens: float = 2048.0) -> float:
        """Sustained prefill throughput at a given batch size, tokens per second (for queue estimates)."""
        return chunk_tokens / self.prefill_s(chunk_tokens)

    def blocks(self, tokens: int) -> int:
        """KV blocks needed for ``tokens`` tokens."""
        return -(-tokens // self.kv_block_tokens)

    # -- data --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The profile as the YAML document :func:`load_profile` reads."""
        def num(v: Any) -> float | int:
            return int(v) if isinstance(v, int) else float(v)

        terms = {t: {"value": num(getattr(self, t)), "source": self.sources.get(t, "")} for t in SCALAR_TERMS}
        return {
            "name": self.name,
            "hardware": self.hardware,
            "model": self.model,
            "tensor_parallel": self.tensor_parallel,
            "terms": terms,
            "linear": {
                "tokens": [float(t) for t in self.linear_tokens],
                "seconds": [float(v) for v in self.linear_s],
                "source": self.sources.get("linear", ""),
            },
            **({"meta": self.meta} if self.meta else {}),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, width=110))
        return path


def _scalar_terms(terms: dict[str, Any], origin: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Each scalar term's value and source from a profile's ``terms`` mapping (every term present, numeric,
    with a source)."""
    unknown = set(terms) - set(SCALAR_TERMS)
    if unknown:
        raise ProfileError(f"{origin}: unknown term(s) {sorted(unknown)}; known: {sorted(SCALAR_TERMS)}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for term in SCALAR_TERMS:
        entry = terms.get(term)
        if entry is None:
            raise ProfileError(f"{origin}: missing term '{term}' ({SCALAR_TERMS[term]})")
        if not isinstance(entry, dict) or "value" not in entry:
            raise ProfileError(f"{origin}: term '{term}' must be {{value: ..., source: ...}}")
        if not str(entry.get("source", "")).strip():
            raise ProfileError(f"{origin}: term '{term}' has no source; every number must cite one")
        try:
            values[term] = float(entry["value"])
        except (TypeError, ValueError):
            raise ProfileError(f"{origin}: term '{term}' value {entry['value']!r} is not a number") from None
        sources[term] = str(entry["source"])
    for term in ("kv_bytes_per_token", "kv_capacity_tokens", "kv_block_tokens"):
        values[term] = int(values[term])
    return values, sources


def profile_from_dict(doc: Any, origin: str = "<dict>") -> LatencyModel:
    """Validate a profile document (as YAML loads it) into a :class:`LatencyModel`."""
    if not isinstance(doc, dict):
        raise ProfileError(f"{origin}: a profile must be a mapping, got {type(doc).__name__}")
    known = {"name", "hardware", "model", "tensor_parallel", "terms", "linear", "meta"}
    extra = set(doc) - known
    if extra:
        raise ProfileError(f"{origin}: unknown key(s) {sorted(extra)}; expected {sorted(known)}")
    for key in ("name", "hardware", "model", "terms", "linear"):
        if key not in doc:
            raise ProfileError(f"{origin}: missing key '{key}'")
    terms = doc["terms"]
    if not isinstance(terms, dict):
        raise ProfileError(f"{origin}: 'terms' must be a mapping of term -> {{value, source}}")
    values, sources = _scalar_terms(terms, origin)
    lin = doc["linear"]
    if not isinstance(lin, dict) or "tokens" not in lin or "seconds" not in lin:
        raise ProfileError(f"{origin}: 'linear' must have 'tokens' and 'seconds' lists")
    if not str(lin.get("source", "")).strip():
        raise ProfileError(f"{origin}: 'linear' has no source")
    try:
        tokens = tuple(float(t) for t in lin["tokens"])
        secs = tuple(float(s) for s in lin["seconds"])
    except (TypeError, ValueError):
        raise ProfileError(f"{origin}: linear.tokens and linear.seconds must be lists of numbers") from None
    sources["linear"] = str(lin["source"])
    try:
        tp = int(doc.get("tensor_parallel", 1))
    except (TypeError, ValueError):
        raise ProfileError(f"{origin}: tensor_parallel must be an integer") from None
    try:
        return LatencyModel(
            name=str(doc["name"]),
            hardware=str(doc["hardware"]),
            model=str(doc["model"]),
            tensor_parallel=tp,
            linear_tokens=tokens,
            linear_s=secs,
            sources=sources,
            meta=dict(doc.get("meta") or {}),
            **values,
        )
    except ProfileError as e:
        raise ProfileError(f"{origin}: {e}") from None


def bundled_profiles() -> list[str]:
    """Names of the profiles shipped with deflectlab."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> LatencyModel:
    """Load a bundled profile by name, or a profile YAML by path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ProfileError(f"profile file not found: {p}")
        origin = str(p)
        text = p.read_text()
    else:
        res = resources.files("deflectlab.envs.profiles").joinpath(f"{name_or_path}.yaml")
        if not res.is_file():
            raise ProfileError(f"unknown profile '{name_or_path}'; bundled: {', '.join(bundled_profiles())}")
        origin = f"profile '{name_or_path}'"
        text = res.read_text()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ProfileError(f"{origin}: not valid YAML: {e}") from None
    return profile_from_dict(doc, origin)
