"""Export a trained policy for the router: ONNX network + JSON manifest (+ numpy weights for the fast path).

``export(model, out_dir)`` writes

``policy.onnx``
    ``(obs [N, F] float32, action_mask [N, A] bool) -> (action [N] int64, logits [N, A] float32)``: the actor
    (PPO/MaskablePPO) or Q-network (DQN) with masked entries set to ``-1e9`` and the greedy action their argmax
    (``torch.onnx.export(..., dynamo=False)``; the dynamo exporter needs onnxscript and failed on SB3 policies).
``policy_mlp.npz``
    the same MLP as plain arrays (``W0, b0, ...``; loaded with ``allow_pickle=False``) for the runtime's numpy
    fast path.
``manifest.json``
    what the runtime checks before it trusts the files: the feature schema (name, version, every feature's
    bounds), the action layout, the cluster shape (P, D), profiles and SLOs the policy was trained for, the chunk
    rule, the network and SHA-256 of both weight files, and where the policy came from.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deflectlab.agents.policy_io import MASKED_LOGIT, MaskedPolicyModule, cluster_of, load_policy_net, mlp_layers
from deflectlab.envs import features as F
from deflectlab.policies.runtime import MANIFEST_FORMAT, MANIFEST_VERSION


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export(model: str | Path, out_dir: str | Path, which: str = "best", opset: int = 17) -> Path:
    """Export the policy of a run directory (or model zip inside one) to ``out_dir``; returns the manifest path.

    :param model: run directory or SB3 model zip (its run's ``config.yaml`` gives the network's shape).
    :param out_dir: output directory (created).
    :param which: ``best`` (``best_model.zip``, the best periodic evaluation) or ``final`` (``model.zip``).
    :param opset: ONNX opset version.
    """
    net, cfg, zip_path = load_policy_net(model, which)
    cluster = cluster_of(cfg)
    P, D = cluster.num_prefill, cluster.num_decode
    fs = F.schema(cfg.env.feature_schema)  # the version the policy was trained on, recorded in the manifest
    n_obs = fs.size(P, D)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    actions = cfg.env.actions
    n_act = 2 if actions == "two_way" else P + D  # two_way: prefill or deflect, the runtime picks the node
    module = MaskedPolicyModule(net).eval()
    dummy_obs = torch.zeros(1, n_obs, dtype=torch.float32)
    dummy_mask = torch.ones(1, n_act, dtype=torch.bool)
    onnx_path = out / "policy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, chosen on purpose
        torch.onnx.export(module, (dummy_obs, dummy_mask), str(onnx_path), dynamo=False, opset_version=opset,
                          input_names=["obs", "action_mask"], output_names=["action", "logits"],
                          dynamic_axes={"obs": {0: "batch"}, "action_mask": {0: "batch"}, "action": {0: "batch"},
                                        "logits": {0: "batch"}})
    layers = mlp_layers(net)
    npz_path = out / "policy_mlp.npz"
    arrays: dict[str, np.ndarray] = {}
    for i, (w, b, _) in enumerate(layers):
        arrays[f"W{i}"] = w
        arrays[f"b{i}"] = b
    np.savez(npz_path, **arrays)

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "feature_schema": fs.to_dict(P, D),
        "actions": actions,
        "action_layout": F.action_layout(P, D) if actions == "nodes" else [
            {"action": 0, "kind": "prefill", "node": "lowest est_ttft (envs.actions.TwoWay)"},
            {"action": 1, "kind": "deflect", "node": "lowest est_ttft among valid decode nodes"}],
        "chunk_rule": {
            "doc": "deflect actions use envs.features.ChunkSolver: the largest chunk whose slowest step keeps "
                   "the TBT SLO by the decode profile, capped by the node's free token budget",
            "min_chunk_tokens": F.MIN_CHUNK_TOKENS,
            "ctx_round_tokens": F.CTX_ROUND_TOKENS,
            "prompt_round_tokens": F.PROMPT_ROUND_TOKENS,
        },
        "cluster": {
            "num_prefill": P, "num_decode": D,
            "prefill_profile": cluster.prefill_profile, "decode_profile": cluster.decode_profile,
            "prefill_max_batched_tokens": cluster.prefill_max_batched_tokens,
            "decode_max_batched_tokens": cluster.decode_max_batched_tokens,
            "max_num_seqs": cluster.max_num_seqs,
        },
        "slo": {"ttft_slo_s": cluster.ttft_slo_s, "tbt_slo_s": cluster.tbt_slo_s},
        "network": {
            "algo": cfg.algo, "kind": "q_values" if cfg.algo == "dqn" else "logits",
            "net_arch": list(cfg.policy.net_arch), "activation": cfg.policy.activation,
            "layers": [{"in": int(w.shape[1]), "out": int(w.shape[0]), "activation": a} for w, _, a in layers],
            "masked_logit": MASKED_LOGIT,
            "inputs": {"obs": ["batch", n_obs], "action_mask": ["batch", n_act]},
            "outputs": {"action": ["batch"], "logits": ["batch", n_act]},
        },
        "files": {
            "onnx": {"path": onnx_path.name, "sha256": sha256(onnx_path), "opset": opset},
            "numpy": {"path": npz_path.name, "sha256": sha256(npz_path)},
        },
        "source": {"model": str(zip_path), "run": cfg.name, "seed": cfg.seed, "env": cfg.env.kwargs(),
                   "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    man_path = out / "manifest.json"
    man_path.write_text(json.dumps(manifest, indent=2, default=str))
    return man_path


def compare_actions(model: str | Path, export_dir: str | Path, which: str = "best", n: int = 200,
                    seed: int | None = None) -> dict[str, int]:
    """Step an evaluation episode with the in-process policy and count the decisions where the exported policy
    (onnx and numpy backends) picks the same action on the same observation and mask."""
    from deflectlab.agents.policy_io import masked_action
    from deflectlab.envs.gym_env import DeflectionEnv
    from deflectlab.policies.runtime import OnnxPolicy

    net, cfg, _ = load_policy_net(model, which)
    env = DeflectionEnv(**cfg.eval_env_kwargs())
    onnx_pol = OnnxPolicy(export_dir, backend="onnx")
    np_pol = OnnxPolicy(export_dir, backend="numpy")
    obs, _ = env.reset(seed=cfg.eval.seed if seed is None else seed)
    agree = agree_np = k = 0
    while k < n:
        mask = env.action_masks()
        a = masked_action(net, obs, mask)
        agree += int(onnx_pol.act(obs, mask) == a)
        agree_np += int(np_pol.act(obs, mask) == a)
        k += 1
        obs, _, done, _, _ = env.step(a)
        if done:
            obs, _ = env.reset()
    return {"n": k, "agree": agree, "agree_numpy": agree_np}
