"""Action masking for algorithms that do not take masks (DQN, plain PPO).

MaskablePPO reads ``action_masks()`` from the environment itself. DQN cannot, so during training
:class:`ValidActionWrapper` carries out a valid action in place of an invalid one: a deflection to a decode node
without KV room for the prompt becomes a prefill on prefill node ``j mod P`` (or, with no prefill nodes, the
first valid deflection). The agent then learns the value of what actually happened. At inference every exported
policy, DQN's included, masks its logits / Q-values with the same mask (Q-masking), so it never picks an invalid
action at all.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


def valid_action(action: int, mask: np.ndarray, num_prefill: int) -> int:
    """``action`` if ``mask`` allows it, else the valid action :class:`ValidActionWrapper` substitutes."""
    if mask[action]:
        return action
    if num_prefill > 0:
        return (action - num_prefill) % num_prefill if action >= num_prefill else action
    return int(np.flatnonzero(mask)[0])


class ValidActionWrapper(gym.Wrapper):
    """Replace invalid actions by valid ones (see the module docstring); ``info["action_replaced"]`` says when."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self._num_prefill = int(env.unwrapped.num_prefill)  # type: ignore[attr-defined]

    def action_masks(self) -> np.ndarray:
        return self.env.unwrapped.action_masks()  # type: ignore[attr-defined]

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        a = int(action)
        b = valid_action(a, self.action_masks(), self._num_prefill)
        obs, r, term, trunc, info = self.env.step(b)
        if b != a:
            info["action_replaced"] = True
        return obs, float(r), term, trunc, info
