"""Building, loading and running trained policies: the SB3 side of the policy file format.

* :func:`make_policy_net` builds an untrained SB3 policy network for a config (no environment needed).
* :func:`load_policy_net` loads a trained one from a run directory or a model zip *without unpickling*: the
  network's shape comes from the run's ``config.yaml``, the weights from the zip's ``policy.pth`` read with
  ``torch.load(weights_only=True)``.
* :class:`MaskedPolicyModule` is the network as one ``torch.nn.Module``: ``(obs, action_mask) -> (action,
  masked logits)``; masked logits (or Q-values for DQN) are set to :data:`MASKED_LOGIT` and the action is their
  argmax. It is what gets exported to ONNX, and :func:`masked_action` is the in-process reference.
* :func:`mlp_layers` extracts the same network as numpy ``(W, b, activation)`` layers for the runtime's numpy
  fast path.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from deflectlab.agents.config import TrainConfig, load_config
from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.features import schema

if TYPE_CHECKING:
    from stable_baselines3.common.policies import BasePolicy

#: The logit given to masked actions (finite, so ONNX and numpy agree bit for bit).
MASKED_LOGIT = -1e9

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}


def spaces_for(cluster: ClusterConfig, feature_schema: int = 1, actions: str = "nodes"
               ) -> tuple[spaces.Box, spaces.Discrete]:
    """Observation and action spaces of a cluster shape under feature schema ``feature_schema`` (as the
    environment builds them; ``actions`` is the environment's action space, ``envs.actions``)."""
    lo, hi = schema(feature_schema).bounds(cluster.num_prefill, cluster.num_decode)
    n = 2 if actions == "two_way" else cluster.num_prefill + cluster.num_decode
    return spaces.Box(lo, hi, dtype=np.float32), spaces.Discrete(n)


def cluster_of(cfg: TrainConfig) -> ClusterConfig:
    return ClusterConfig.coerce(cfg.env.cluster)


def policy_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    return {"net_arch": list(cfg.policy.net_arch), "activation_fn": ACTIVATIONS[cfg.policy.activation]}


def make_policy_net(cfg: TrainConfig) -> BasePolicy:
    """An untrained policy network of the shape ``cfg`` trains (CPU, eval mode)."""
    obs_space, act_space = spaces_for(cluster_of(cfg), cfg.env.feature_schema, cfg.env.actions)
    kw = policy_kwargs(cfg)
    if cfg.algo == "dqn":
        from stable_baselines3.dqn.policies import DQNPolicy

        net: BasePolicy = DQNPolicy(obs_space, act_space, lambda _: 0.0, **kw)
    elif cfg.algo == "maskable_ppo":
        from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

        net = MaskableActorCriticPolicy(obs_space, act_space, lambda _: 0.0, **kw)
    else:
        from stable_baselines3.common.policies import ActorCriticPolicy

        net = ActorCriticPolicy(obs_space, act_space, lambda _: 0.0, **kw)
    net.set_training_mode(False)
    return net


def find_run(model: str | Path, which: str = "best") -> tuple[Path, Path]:
    """``(run_dir, model_zip)`` for a run directory (its ``best_model.zip``, else ``model.zip``; ``which="final"``
    prefers ``model.zip``, ``"pretrained"`` takes ``pretrained_model.zip``) or a zip inside a run directory (the
    config is looked up in its parents)."""
    p = Path(model)
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    if p.is_dir():
        order = {"best": ["best_model.zip", "model.zip"], "final": ["model.zip", "best_model.zip"],
                 "pretrained": ["pretrained_model.zip"]}.get(which)
        if order is None:
            raise ValueError(f"which must be best, final or pretrained, got {which!r}")
        for name in order:
            if (p / name).is_file():
                return p, p / name
        raise FileNotFoundError(f"{p}: no best_model.zip or model.zip in this run directory")
    for parent in [p.parent, *p.parents][:3]:
        if (parent / "config.yaml").is_file():
            return parent, p
    raise FileNotFoundError(f"{p}: no config.yaml in its directory or the two above; the network's shape is "
                            "read from the run's resolved config (policy files are never unpickled)")


def load_state_dict_from_zip(zip_path: Path) -> dict[str, torch.Tensor]:
    """The ``policy.pth`` state dict of an SB3 model zip, read with ``weights_only=True`` (no pickle code runs)."""
    try:
        with zipfile.ZipFile(zip_path) as z:
            if "policy.pth" not in z.namelist():
                raise ValueError(f"{zip_path}: not a stable-baselines3 model zip (no policy.pth)")
            raw = z.read("policy.pth")
    except zipfile.BadZipFile:
        raise ValueError(f"{zip_path}: not a zip file") from None
    try:
        sd = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for corrupt or unsafe data
        raise ValueError(f"{zip_path}: policy.pth is not a plain tensor state dict ({e})") from None
    return sd


def load_policy_net(model: str | Path, which: str = "best") -> tuple[BasePolicy, TrainConfig, Path]:
    """Load a trained policy network: ``(net, its run's config, the zip read)``."""
    run_dir, zip_path = find_run(model, which)
    cfg = load_config(run_dir / "config.yaml")
    net = make_policy_net(cfg)
    sd = load_state_dict_from_zip(zip_path)
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{zip_path}: weights do not match the network of {run_dir / 'config.yaml'}: {e}") from None
    net.set_training_mode(False)
    return net, cfg, zip_path


class MaskedPolicyModule(nn.Module):
    """``(obs [N, F] float32, action_mask [N, A] bool) -> (action [N] int64, masked logits [N, A] float32)``.

    Logits are the actor's for PPO/MaskablePPO and the Q-values for DQN; the greedy action is the argmax of the
    masked values, which is also what ``MaskablePPO.predict(..., deterministic=True)`` returns.
    """

    def __init__(self, net: BasePolicy) -> None:
        super().__init__()
        self.is_q = hasattr(net, "q_net")
        self.body: nn.Module
        self.head: nn.Module | None
        if self.is_q:
            self.body = net.q_net.q_net  # type: ignore[union-attr,assignment]
            self.head = None
        else:
            self.body = net.mlp_extractor.policy_net  # type: ignore[union-attr,assignment]
            self.head = net.action_net  # type: ignore[assignment]

    def forward(self, obs: torch.Tensor, action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.body(obs)
        if self.head is not None:
            x = self.head(x)
        masked = torch.where(action_mask, x, torch.full_like(x, MASKED_LOGIT))
        return torch.argmax(masked, dim=1), masked


def masked_action(net: BasePolicy, obs: np.ndarray, mask: np.ndarray) -> int:
    """The greedy action of ``net`` for one observation under ``mask`` (in-process reference)."""
    mod = MaskedPolicyModule(net)
    with torch.no_grad():
        a, _ = mod(torch.as_tensor(obs, dtype=torch.float32).reshape(1, -1),
                   torch.as_tensor(mask, dtype=torch.bool).reshape(1, -1))
    return int(a[0])


def mlp_layers(net: BasePolicy) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """The network as numpy layers ``(W [out, in], b [out], activation after it: tanh | relu | none)``."""
    mod = MaskedPolicyModule(net)
    seq = list(mod.body.children()) + ([mod.head] if mod.head is not None else [])
    layers: list[tuple[np.ndarray, np.ndarray, str]] = []
    for m in seq:
        if isinstance(m, nn.Linear):
            layers.append((m.weight.detach().numpy().astype(np.float32).copy(),
                           m.bias.detach().numpy().astype(np.float32).copy(), "none"))
        elif isinstance(m, (nn.Tanh, nn.ReLU)):
            if not layers or layers[-1][2] != "none":
                raise ValueError(f"unsupported layer order in {net}")
            w, b, _ = layers[-1]
            layers[-1] = (w, b, "tanh" if isinstance(m, nn.Tanh) else "relu")
        else:
            raise ValueError(f"layer {type(m).__name__} is not supported by the numpy fast path")
    return layers
