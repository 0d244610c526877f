"""One policy for every cluster shape: a permutation-invariant network that scores each candidate node.

The observation (any version of :data:`~deflectlab.envs.features.SCHEMAS`; the network is built for one and
records it as ``feature_schema``) is a request block, one block per prefill node and one per decode node.
:class:`SetPolicyNet` embeds every node block with a shared per-kind encoder (``phi_p``, ``phi_d``), pools the
embeddings (mean and max per kind) into a cluster context together with the request's features, and scores
each node from its own embedding and that context:

    logit(prefill i) = psi_p(phi_p(x_i), g)        logit(decode j) = psi_d(phi_d(x_j), g)
    g = rho(request, mean_i phi_p, max_i phi_p, mean_j phi_d, max_j phi_d)

The same weights therefore run on any P >= 1 and D >= 1; relabelling the nodes relabels the logits
(permutation-equivariant scores, permutation-invariant value ``v(g)``). The first layer of each scorer is split
into a node part and a context part so the context broadcasts over the nodes without any shape-dependent op,
which keeps the ONNX export's node counts dynamic.

* :class:`SetPolicyModule` is what is exported: ``(request [N, R], prefill [N, P, F_p], decode [N, D, F_d],
  action_mask [N, P + D] bool) -> (action [N] int64, logits [N, P + D])``, masked logits at ``MASKED_LOGIT``;
  the block sizes are the schema's (:func:`block_sizes`: 3, 6, 11 for v1; 3, 7, 12 for v2).
* :func:`split_obs` cuts a flat observation of a ``P``x``D`` cluster into the three blocks.
* ``policies.runtime.set_numpy_logits`` is the same network in plain numpy (the runtime's fast path).
* :class:`SetMaskablePolicy` fits the network into sb3-contrib's MaskablePPO as a custom policy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from deflectlab.envs.features import schema

MASKED_LOGIT = -1e9


def block_sizes(feature_schema: int = 1) -> tuple[int, int, int]:
    """``(request, per prefill node, per decode node)`` feature counts of schema version ``feature_schema``
    (an unknown version is a ``ValueError`` naming the known ones)."""
    s = schema(feature_schema)
    return len(s.request), len(s.prefill), len(s.decode)


def split_obs(obs: Any, num_prefill: int, num_decode: int, feature_schema: int = 1) -> tuple[Any, Any, Any]:
    """``(request [N, R], prefill [N, P, F_p], decode [N, D, F_d])`` views of flat observations ``[N, F]``
    (torch tensors or numpy arrays) of schema version ``feature_schema`` (:func:`block_sizes`)."""
    n_req, n_pre, n_dec = block_sizes(feature_schema)
    n = obs.shape[0]
    a, b = n_req, n_req + num_prefill * n_pre
    if obs.shape[1] != b + num_decode * n_dec:
        raise ValueError(f"observation has {obs.shape[1]} features, a {num_prefill}P{num_decode}D cluster has "
                         f"{b + num_decode * n_dec} under feature schema {feature_schema}")
    return (obs[:, :a], obs[:, a:b].reshape(n, num_prefill, n_pre), obs[:, b:].reshape(n, num_decode, n_dec))


class SetPolicyNet(nn.Module):
    """The shape-generic scorer (see the module docstring). ``hidden``: width of every layer;
    ``feature_schema``: the observation's schema version, which sets the encoders' input sizes."""

    def __init__(self, hidden: int = 64, feature_schema: int = 1) -> None:
        super().__init__()
        h = self.hidden = int(hidden)
        n_req, n_pre, n_dec = block_sizes(feature_schema)
        self.feature_schema = int(feature_schema)
        self.phi_p = nn.Sequential(nn.Linear(n_pre, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh())
        self.phi_d = nn.Sequential(nn.Linear(n_dec, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh())
        self.rho = nn.Sequential(nn.Linear(n_req + 4 * h, h), nn.Tanh())
        self.psi_p_node, self.psi_p_ctx, self.psi_p_out = nn.Linear(h, h), nn.Linear(h, h, bias=False), nn.Linear(h, 1)
        self.psi_d_node, self.psi_d_ctx, self.psi_d_out = nn.Linear(h, h), nn.Linear(h, h, bias=False), nn.Linear(h, 1)
        self.value = nn.Linear(h, 1)

    def context(self, req: torch.Tensor, pre: torch.Tensor, dec: torch.Tensor):
        ep, ed = self.phi_p(pre), self.phi_d(dec)
        g = self.rho(torch.cat([req, ep.mean(1), ep.amax(1), ed.mean(1), ed.amax(1)], dim=1))
        return ep, ed, g

    def forward(self, req: torch.Tensor, pre: torch.Tensor, dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, P + D], value [N])``."""
        ep, ed, g = self.context(req, pre, dec)
        sp = self.psi_p_out(torch.tanh(self.psi_p_node(ep) + self.psi_p_ctx(g).unsqueeze(1))).squeeze(-1)
        sd = self.psi_d_out(torch.tanh(self.psi_d_node(ed) + self.psi_d_ctx(g).unsqueeze(1))).squeeze(-1)
        return torch.cat([sp, sd], dim=1), self.value(g).squeeze(-1)

    def flat_logits(self, obs: torch.Tensor, num_prefill: int, num_decode: int) -> torch.Tensor:
        return self(*split_obs(obs, num_prefill, num_decode, self.feature_schema))[0]

    def arrays(self) -> dict[str, np.ndarray]:
        """Every parameter as a float32 array, by its state-dict name (for the numpy fast path)."""
        return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in self.state_dict().items()}


class SetPolicyModule(nn.Module):
    """Export wrapper: ``(request, prefill, decode, action_mask) -> (action, masked logits)``."""

    def __init__(self, net: SetPolicyNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, req, pre, dec, mask):
        logits = self.net(req, pre, dec)[0]
        masked = torch.where(mask, logits, torch.full_like(logits, MASKED_LOGIT))
        return torch.argmax(masked, dim=1), masked


def masked_argmax(logits: np.ndarray, mask: np.ndarray) -> int:
    return int(np.argmax(np.where(mask, logits, np.float32(MASKED_LOGIT))))


def _maskable_base() -> type:
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

    return MaskableActorCriticPolicy


def make_set_policy_class() -> type:
    """:class:`SetMaskablePolicy`, built lazily (sb3-contrib is an optional dependency)."""
    base = _maskable_base()

    class SetMaskablePolicy(base):  # type: ignore[misc, valid-type]
        """MaskablePPO policy whose actor and critic are one :class:`SetPolicyNet` for a ``P``x``D`` env.

        ``policy_kwargs={"num_prefill": P, "num_decode": D, "hidden": 64, "feature_schema": 1}`` (the env's
        ``feature_schema``; a mismatch with the observation space is an error); the weights (``self.set_net``)
        are shape-generic, so they can be copied into a policy of another shape, or exported for any shape.
        """

        def __init__(self, observation_space, action_space, lr_schedule, num_prefill: int = 2,
                     num_decode: int = 2, hidden: int = 64, feature_schema: int = 1, **kwargs: Any) -> None:
            self.num_prefill, self.num_decode, self.hidden = int(num_prefill), int(num_decode), int(hidden)
            self.feature_schema = int(feature_schema)
            want = schema(self.feature_schema).size(self.num_prefill, self.num_decode)
            if observation_space.shape != (want,):
                raise ValueError(f"SetMaskablePolicy: observation space {observation_space.shape} is not feature "
                                 f"schema {self.feature_schema}'s ({want},) for {self.num_prefill}P"
                                 f"{self.num_decode}D; set policy_kwargs num_prefill, num_decode and "
                                 f"feature_schema to the env's")
            kwargs.pop("net_arch", None)
            super().__init__(observation_space, action_space, lr_schedule, net_arch=[], **kwargs)

        def _build(self, lr_schedule) -> None:
            self.set_net = SetPolicyNet(self.hidden, self.feature_schema)
            self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

        def _logits_value(self, obs):
            obs = obs.float().reshape(obs.shape[0], -1)
            return self.set_net(*split_obs(obs, self.num_prefill, self.num_decode, self.feature_schema))

        def _dist(self, logits, action_masks):
            dist = self.action_dist.proba_distribution(action_logits=logits)
            if action_masks is not None:
                dist.apply_masking(action_masks)
            return dist

        def forward(self, obs, deterministic: bool = False, action_masks=None):
            logits, value = self._logits_value(obs)
            dist = self._dist(logits, action_masks)
            actions = dist.get_actions(deterministic=deterministic)
            return actions, value.unsqueeze(-1), dist.log_prob(actions)

        def evaluate_actions(self, obs, actions, action_masks=None):
            logits, value = self._logits_value(obs)
            dist = self._dist(logits, action_masks)
            return value.unsqueeze(-1), dist.log_prob(actions), dist.entropy()

        def get_distribution(self, obs, action_masks=None):
            return self._dist(self._logits_value(obs)[0], action_masks)

        def predict_values(self, obs):
            return self._logits_value(obs)[1].unsqueeze(-1)

        def _predict(self, observation, deterministic: bool = False, action_masks=None):
            return self.get_distribution(observation, action_masks).get_actions(deterministic=deterministic)

    return SetMaskablePolicy
