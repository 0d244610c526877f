"""Export a shape-generic :class:`~deflectlab.agents.setnet.SetPolicyNet` (manifest format version 2).

``policy.onnx``: ``(request [N, R], prefill [N, P, F_p], decode [N, D, F_d], action_mask [N, P + D] bool) ->
(action [N] int64, logits [N, P + D])`` with ``N``, ``P`` and ``D`` dynamic, so one file serves every cluster
shape; ``R, F_p, F_d`` are the block sizes of the network's feature schema (3, 6, 11 for v1; 3, 7, 12 for v2).
``policy_set.npz``: the same weights by parameter name for the runtime's numpy path. ``manifest.json``: the
feature schema's name, version and blocks (not an expanded, shape-bound list), the profiles and SLOs, the
shapes, traces and profiles it was trained on, SHA-256 of both files. The runtime
(:mod:`deflectlab.policies.runtime`) reads manifest version 1 (fixed shape MLP) and version 2 (this), each with
feature schema 1 or 2.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deflectlab.agents.export import sha256
from deflectlab.agents.setnet import MASKED_LOGIT, SetPolicyModule, SetPolicyNet, block_sizes
from deflectlab.envs import features as F
from deflectlab.envs.config import ClusterConfig
from deflectlab.policies.runtime import MANIFEST_FORMAT, SET_MANIFEST_VERSION


def export_set(net: SetPolicyNet, out_dir: str | Path, cluster: ClusterConfig, trained_on: dict[str, Any],
               source: dict[str, Any] | None = None, opset: int = 17) -> Path:
    """Write ``policy.onnx``, ``policy_set.npz`` and ``manifest.json`` under ``out_dir``; returns the manifest.

    :param cluster: the profiles, budgets and SLOs the policy serves (its shape is not binding).
    :param trained_on: what it saw: ``{"shapes": ["2P2D", ...], "traces": [...], "loads": [...], ...}``.

    The feature schema is the network's own (``net.feature_schema``), recorded in the manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = SetPolicyModule(net).eval()
    n_req, n_pre, n_dec = block_sizes(net.feature_schema)
    args = (torch.zeros(1, n_req), torch.zeros(1, 2, n_pre), torch.zeros(1, 3, n_dec),
            torch.ones(1, 5, dtype=torch.bool))
    onnx_path = out / "policy.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter, chosen on purpose (as agents.export)
        torch.onnx.export(module, args, str(onnx_path), dynamo=False, opset_version=opset,
                          input_names=["request", "prefill", "decode", "action_mask"],
                          output_names=["action", "logits"],
                          dynamic_axes={"request": {0: "batch"}, "prefill": {0: "batch", 1: "P"},
                                        "decode": {0: "batch", 1: "D"}, "action_mask": {0: "batch", 1: "A"},
                                        "action": {0: "batch"}, "logits": {0: "batch", 1: "A"}})
    npz_path = out / "policy_set.npz"
    np.savez(npz_path, **net.arrays())
    schema = F.schema(net.feature_schema).to_dict()
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": SET_MANIFEST_VERSION,
        "feature_schema": schema,
        "action_layout": "prefill nodes 0..P-1, then deflect to decode nodes 0..D-1 (envs.features.action_layout)",
        "chunk_rule": {"min_chunk_tokens": F.MIN_CHUNK_TOKENS, "ctx_round_tokens": F.CTX_ROUND_TOKENS,
                       "prompt_round_tokens": F.PROMPT_ROUND_TOKENS},
        "cluster": {"shape": "any (P >= 1, D >= 1)", "prefill_profile": cluster.prefill_profile,
                    "decode_profile": cluster.decode_profile,
                    "prefill_max_batched_tokens": cluster.prefill_max_batched_tokens,
                    "decode_max_batched_tokens": cluster.decode_max_batched_tokens,
                    "max_num_seqs": cluster.max_num_seqs},
        "slo": {"ttft_slo_s": cluster.ttft_slo_s, "tbt_slo_s": cluster.tbt_slo_s},
        "trained_on": trained_on,
        "network": {"kind": "set_logits", "hidden": net.hidden, "masked_logit": MASKED_LOGIT,
                    "inputs": {"request": ["batch", n_req], "prefill": ["batch", "P", n_pre],
                               "decode": ["batch", "D", n_dec], "action_mask": ["batch", "P+D"]},
                    "outputs": {"action": ["batch"], "logits": ["batch", "P+D"]}},
        "files": {"onnx": {"path": onnx_path.name, "sha256": sha256(onnx_path), "opset": opset},
                  "numpy": {"path": npz_path.name, "sha256": sha256(npz_path)}},
        "source": {**(source or {}), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    man = out / "manifest.json"
    man.write_text(json.dumps(manifest, indent=2, default=str))
    return man


def load_set_net(path: str | Path) -> SetPolicyNet:
    """The :class:`SetPolicyNet` of an exported shape-generic policy (a folder :func:`export_set` wrote), from
    its numpy weights (read with ``allow_pickle=False``), to train further (``deflectlab dagger --init``).

    The manifest is checked as the runtime checks it (format, feature schema, SHA-256 of both files); a
    fixed-shape (version 1) export, or weights that do not fit the manifest's network, is a
    :class:`~deflectlab.policies.runtime.PolicyFileError` naming the problem.
    """
    from deflectlab.agents.dagger import net_from_arrays
    from deflectlab.policies.runtime import PolicyFileError, load_manifest

    d, man = load_manifest(path)
    if man.get("format_version") != SET_MANIFEST_VERSION:
        raise PolicyFileError(f"{d}: a fixed-shape policy (manifest format version {man.get('format_version')}); "
                              f"only a shape-generic export (version {SET_MANIFEST_VERSION}) can start DAgger or "
                              "fine-tuning")
    try:
        hidden = int(man["network"]["hidden"])
        schema = int(man["feature_schema"]["version"])
        f = d / man["files"]["numpy"]["path"]
    except (KeyError, TypeError, ValueError) as e:
        raise PolicyFileError(f"{d}/manifest.json: lacks the network's width or feature schema ({e})") from None
    try:
        with np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise PolicyFileError(f"{f}: not a readable numpy weight file: {e}") from None
    try:
        return net_from_arrays(arrays, hidden, schema)
    except ValueError as e:
        raise PolicyFileError(f"{f}: {e}") from None
