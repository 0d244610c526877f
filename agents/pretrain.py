"""Imitation warm start: behaviour cloning of a heuristic before reinforcement learning (PPO and MaskablePPO).

RL from scratch has to discover, from a noisy cluster-wide reward, what the proactive deflector computes in
closed form. Cloning a heuristic first starts PPO from that policy; PPO then only has to improve on it. The
demonstrations are collected through the training vector environment itself (so a ``VecNormalize`` reward
scaler sees them too): at every step each environment asks its own expert (``DeflectionEnv.expert_action``)
and carries out its action. The actor is fitted by masked cross-entropy; the critic, optionally, to the
demonstrations' discounted returns (Monte Carlo, within complete episodes), so that PPO's first advantages
are not noise that would undo the cloning.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import torch


def _bar(total: int, desc: str, unit: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress)


def collect_demos(venv: Any, expert: str, steps: int, progress: bool = False) -> dict[str, np.ndarray]:
    """Roll the expert out in ``venv`` for about ``steps`` decisions: ``obs, masks, actions, rewards, dones``
    arrays of shape ``[T, n_envs, ...]`` (rewards as the vector env returns them, normalised or not).
    ``progress``: a bar on stderr, in decisions."""
    from deflectlab.policies.registry import make_policy

    n = venv.num_envs
    for i in range(n):  # one expert per environment, so per-run state (round-robin pointers) stays separate
        venv.env_method("set_expert", make_policy(expert), indices=[i])
    obs = venv.reset()
    o, m, a, r, d = [], [], [], [], []
    rounds = max(steps // n, 1)
    with _bar(rounds * n, f"cloning {expert}: demonstrations", "decision", progress) as bar:
        for _ in range(rounds):
            obs = _demo_step(venv, obs, (o, m, a, r, d))
            bar.update(n)
    return {"obs": np.asarray(o, np.float32), "masks": np.asarray(m, bool), "actions": np.asarray(a),
            "rewards": np.asarray(r, np.float32), "dones": np.asarray(d, bool)}


def _demo_step(venv: Any, obs: Any, out: tuple[list, ...]) -> Any:
    """One step of every environment under its own expert (``set_expert``), appended to ``out`` (obs, masks,
    actions, rewards, dones)."""
    o, m, a, r, d = out
    acts = np.asarray(venv.env_method("expert_action"), dtype=np.int64)
    o.append(obs)
    m.append(np.stack(venv.env_method("action_masks")))
    a.append(acts)
    obs, rew, done, _ = venv.step(acts)
    r.append(rew)
    d.append(done)
    return obs


def discounted_returns(rewards: np.ndarray, dones: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Per ``[T, n]`` step, the discounted return to its episode's end, and whether that end lies in the data."""
    T, n = rewards.shape
    ret = np.zeros((T, n), np.float32)
    valid = np.zeros((T, n), bool)
    g = np.zeros(n, np.float32)
    seen_end = np.zeros(n, bool)
    for t in range(T - 1, -1, -1):
        g = np.where(dones[t], 0.0, g)
        seen_end |= dones[t]
        g = rewards[t] + gamma * g
        ret[t] = g
        valid[t] = seen_end
    return ret, valid


def _bc_batch(policy: Any, opt: Any, data: tuple[torch.Tensor, ...], idx: torch.Tensor, fit_value: bool,
              stats: dict[str, float]) -> None:
    """One gradient step on the demonstrations ``idx``: masked cross-entropy, plus the critic's MSE to the
    discounted returns where known (``fit_value``); records the losses in ``stats``."""
    obs, masks, acts, ret_t, valid_t = data
    features = policy.extract_features(obs[idx])
    latent_pi, latent_vf = policy.mlp_extractor(features)
    logits = torch.where(masks[idx], policy.action_net(latent_pi), torch.full((1,), -1e8))
    loss = torch.nn.functional.cross_entropy(logits, acts[idx])
    stats["bc_loss"] = loss.item()
    if fit_value:
        v = policy.value_net(latent_vf).squeeze(-1)
        ok = valid_t[idx]
        if ok.any():
            vloss = torch.nn.functional.mse_loss(v[ok], ret_t[idx][ok])
            stats["value_loss"] = vloss.item()
            loss = loss + 0.5 * vloss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.5)
    opt.step()


def behaviour_clone(policy: Any, demos: dict[str, np.ndarray], *, epochs: int, batch_size: int,
                    learning_rate: float, gamma: float, fit_value: bool, seed: int,
                    progress: bool = False) -> dict[str, float]:
    """Fit an SB3 actor-critic ``policy`` to the demonstrations; returns the final losses and the agreement
    (share of demonstration actions the greedy masked policy reproduces). ``progress``: a bar on stderr, in
    epochs, showing the last batch's losses."""
    obs = torch.as_tensor(demos["obs"].reshape(-1, demos["obs"].shape[-1]))
    masks = torch.as_tensor(demos["masks"].reshape(-1, demos["masks"].shape[-1]))
    acts = torch.as_tensor(demos["actions"].reshape(-1))
    ret, valid = discounted_returns(demos["rewards"], demos["dones"], gamma)
    ret_t = torch.as_tensor(ret.reshape(-1))
    valid_t = torch.as_tensor(valid.reshape(-1))
    N = len(acts)
    opt = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(seed)
    policy.set_training_mode(True)
    stats = {"bc_loss": float("nan"), "value_loss": float("nan")}
    data = (obs, masks, acts, ret_t, valid_t)
    with _bar(epochs, f"cloning: fitting {N} decisions", "epoch", progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(N, generator=gen)
            for i in range(0, N, batch_size):
                _bc_batch(policy, opt, data, perm[i:i + batch_size], fit_value, stats)
            bar.set_postfix(bc_loss=f"{stats['bc_loss']:.3f}", refresh=False)
            bar.update(1)
    policy.set_training_mode(False)
    with torch.no_grad():
        features = policy.extract_features(obs)
        latent_pi, _ = policy.mlp_extractor(features)
        logits = torch.where(masks, policy.action_net(latent_pi), torch.full((1,), -1e8))
        stats["agreement"] = float((logits.argmax(dim=1) == acts).float().mean())
    stats["samples"] = float(N)
    return stats
