"""Training configuration: typed dataclasses validated from YAML at the edge.

A config file is the YAML form of :class:`TrainConfig`; a wrong key or value is a :class:`ConfigError` that names
it (``env.lod: unknown key``). Dotted overrides (``algo_params.learning_rate=3e-4``) apply on top, as the CLI,
sweeps and Ray trials do. The resolved config is written beside every run (``config.yaml``).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from deflectlab.envs.config import ConfigError, parse_value, read_yaml
from deflectlab.envs.gym_env import EnvConfig

ALGOS = ("ppo", "maskable_ppo", "dqn")
#: Evaluation episodes use seeds from here up; training environments are seeded below it.
EVAL_SEED_BASE = 1_000_000

_STRICT = ConfigDict(extra="forbid")


@dataclass(config=_STRICT)
class EvalConfig:
    """Periodic evaluation on fixed seeds, against heuristics."""

    every_steps: Annotated[int, Field(ge=0, description="evaluate every this many steps (0: at the end only)")] = \
        50_000
    episodes: Annotated[int, Field(ge=1, description="evaluation episodes (seeds seed .. seed + episodes - 1)")] = 6
    seed: Annotated[int, Field(ge=EVAL_SEED_BASE, description="first evaluation seed")] = EVAL_SEED_BASE
    env: Annotated[dict[str, Any], Field(description="overrides of `env` for evaluation (held-out windows)")] = \
        field(default_factory=dict)
    baselines: Annotated[list[str], Field(description="heuristic registry specs compared on the same seeds; "
                                                      "unavailable ones are skipped")] = field(
        default_factory=lambda: ["round_robin", "least_loaded", "proactive"])


@dataclass(config=_STRICT)
class PolicyNetConfig:
    """The policy (and value) network: an MLP."""

    net_arch: Annotated[list[int], Field(description="hidden layer widths")] = field(default_factory=lambda: [64, 64])
    activation: Annotated[str, Field(description="tanh | relu")] = "tanh"


@dataclass(config=_STRICT)
class PretrainConfig:
    """Behaviour cloning of a heuristic before RL (PPO / MaskablePPO only); see :mod:`agents.pretrain`."""

    expert: Annotated[str | None, Field(description="heuristic registry spec to imitate; None: off")] = None
    steps: Annotated[int, Field(ge=1, description="demonstration decisions to collect")] = 50_000
    epochs: Annotated[int, Field(ge=1, description="passes over the demonstrations")] = 10
    batch_size: Annotated[int, Field(ge=1)] = 256
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    fit_value: Annotated[bool, Field(description="also fit the critic to the demonstrations' returns")] = True


@dataclass(config=_STRICT)
class WandbConfig:
    """Weights & Biases logging. ``mode: auto`` is offline unless WANDB_API_KEY is set and WANDB_MODE is not
    ``offline``."""

    enabled: bool = True
    project: str = "deflectlab"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: Annotated[str, Field(description="auto | offline | online | disabled")] = "auto"


@dataclass(config=_STRICT)
class TrainConfig:
    """One training run.

    ``algo_params`` go to the stable-baselines3 constructor as they are (``learning_rate``, ``n_steps``,
    ``batch_size``, ``gamma``, ``ent_coef``, ...); unknown names are an error.
    """

    name: Annotated[str, Field(description="scenario name, the first part of the run name")]
    algo: Annotated[str, Field(description="ppo | maskable_ppo | dqn")] = "maskable_ppo"
    seed: Annotated[int, Field(ge=0, description="seeds torch, numpy and the training environments")] = 0
    total_timesteps: Annotated[int, Field(ge=1, description="environment steps (routing decisions)")] = 100_000
    n_envs: Annotated[int, Field(ge=1, description="parallel environments")] = 4
    vec_env: Annotated[str, Field(description="dummy (one process) | subproc (one process per env)")] = "dummy"
    torch_threads: Annotated[int, Field(ge=1, description="torch intra-op threads per training process")] = 1
    normalize_reward: Annotated[bool, Field(description="scale rewards by a running return std")] = True
    algo_params: dict[str, Any] = field(default_factory=dict)
    policy: PolicyNetConfig = field(default_factory=PolicyNetConfig)
    env: EnvConfig = field(default_factory=EnvConfig)  # the environment's own config class (envs.gym_env)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    checkpoint_every: Annotated[int, Field(ge=0, description="checkpoint every this many steps (0: never)")] = 0
    wandb: WandbConfig = field(default_factory=WandbConfig)
    out_dir: Annotated[str, Field(description="runs are written under this directory")] = "runs"

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.vec_env not in ("dummy", "subproc"):
            raise ValueError(f"vec_env must be 'dummy' or 'subproc', got {self.vec_env!r}")
        if self.policy.activation not in ("tanh", "relu"):
            raise ValueError(f"policy.activation must be 'tanh' or 'relu', got {self.policy.activation!r}")
        if self.wandb.mode not in ("auto", "offline", "online", "disabled"):
            raise ValueError(f"wandb.mode must be auto, offline, online or disabled, got {self.wandb.mode!r}")
        if self.pretrain.expert is not None and self.algo == "dqn":
            raise ValueError("pretrain.expert (behaviour cloning) is for ppo and maskable_ppo, not dqn")
        if self.eval.env.get("feature_schema", self.env.feature_schema) != self.env.feature_schema:
            raise ValueError(f"eval.env.feature_schema ({self.eval.env['feature_schema']!r}) must equal "
                             f"env.feature_schema ({self.env.feature_schema}): a policy sees one feature schema")
        if train_seed(self.seed, self.n_envs - 1) >= self.eval.seed:
            raise ValueError(f"training seeds ({self.seed} x 1000 + env index) must stay below the evaluation "
                             f"seeds ({self.eval.seed}..)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def eval_env_kwargs(self) -> dict[str, Any]:
        """The evaluation environment: ``env`` with ``eval.env`` overrides (unknown keys are an error)."""
        d = self.env.kwargs()
        extra = set(self.eval.env) - set(d)
        if extra:
            raise ConfigError(f"eval.env: unknown key(s) {sorted(extra)}; known: {sorted(d)}")
        d.update(copy.deepcopy(self.eval.env))
        return d

    def eval_seeds(self) -> list[int]:
        return list(range(self.eval.seed, self.eval.seed + self.eval.episodes))


def train_seed(seed: int, env_index: int) -> int:
    """Seed of training environment ``env_index`` of a run seeded ``seed`` (episodes then follow its stream)."""
    return seed * 1000 + env_index


_ADAPTER = TypeAdapter(TrainConfig)


def config_from_dict(d: dict[str, Any], origin: str = "config") -> TrainConfig:
    """Validate a mapping into a :class:`TrainConfig`; errors name every bad key."""
    if not isinstance(d, dict):
        raise ConfigError(f"{origin}: a training config is a mapping, got {type(d).__name__}")
    try:
        return _ADAPTER.validate_python(d)
    except ValidationError as e:
        raise ConfigError(f"{origin}: " + "; ".join(_fmt_error(x) for x in e.errors())) from None


def _fmt_error(err: Any) -> str:
    loc = ".".join(str(x) for x in err.get("loc", ())) or "(top level)"
    if err.get("type") in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"{loc}: unknown key"
    if err.get("type") == "missing":
        return f"{loc}: required key missing"
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "value_error":
        return msg.removeprefix("Value error, ") if loc == "(top level)" else f"{loc}: {msg}"
    return f"{loc}: {msg} (got {err.get('input')!r})"


def apply_overrides(d: dict[str, Any], overrides: dict[str, Any] | list[str] | None) -> dict[str, Any]:
    """Set dotted keys (``{"algo_params.learning_rate": 3e-4}`` or ``["seed=3"]``; string values are parsed as
    YAML) in a copy of ``d``."""
    out = copy.deepcopy(d)
    if not overrides:
        return out
    items: list[tuple[str, Any]]
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for s in overrides:
            k, eq, v = s.partition("=")
            if not eq:
                raise ConfigError(f"override {s!r} is not key=value")
            items.append((k.strip(), parse_value(v)))
    for key, value in items:
        parts = key.split(".")
        cur = out
        for p in parts[:-1]:
            nxt = cur.get(p)
            if nxt is None:
                nxt = cur[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a mapping")
            cur = nxt
        cur[parts[-1]] = value
    return out


def load_config(source: str | Path | dict[str, Any] | TrainConfig,
                overrides: dict[str, Any] | list[str] | None = None) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML path, a mapping or a config, with dotted overrides applied."""
    if isinstance(source, TrainConfig):
        if not overrides:
            return source
        return config_from_dict(apply_overrides(source.to_dict(), overrides), "config")
    origin = "config"
    if isinstance(source, (str, Path)):
        origin = str(source)
        d = read_yaml(source, "training config")
    else:
        d = source
    return config_from_dict(apply_overrides(d or {}, overrides), origin)


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (and JSON beside it)."""
    import json

    p = Path(path)
    d = cfg.to_dict()
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    p.with_suffix(".json").write_text(json.dumps(d, indent=2))
