"""Export a shape-generic :class:`~deflectlab.agents.setnet.SetPolicyNet` (manifest format version 3).

``policy.onnx``: the network for one decision, ``(request [1, R], prefill [P, F_p], decode [D, F_d],
action_mask [P + D, 1] bool) -> (action [1] int64, logits [P + D, 1])`` (the masked logits), with ``P`` and
``D`` dynamic, so one file serves every cluster shape; ``R, F_p, F_d`` are the block sizes of the network's
feature schema (3, 6, 11 for v1; 3, 7, 12 for v2). :func:`decision_graph` writes it from the weights, as 2-D
``Gemm`` layers that onnxruntime fuses with their ``tanh``: 19 operators where the traced, batched graph of
format version 2 has 41 after onnxruntime's own fusions, and about 13 us against 21 us a decision at 2P2D
(``scripts/bench_router.py``; docs/design.md). Its actions equal the torch network's (``tests/test_setnet.py``).
``policy_set.npz``: the same weights by parameter name for the runtime's numpy path. ``manifest.json``: the
feature schema's name, version and blocks (not an expanded, shape-bound list), the profiles and SLOs, the
shapes, traces and profiles it was trained on, SHA-256 of both files. The runtime
(:mod:`deflectlab.policies.runtime`) reads manifest version 1 (fixed shape MLP), version 2 (shape-generic, a
batched graph traced by ``torch.onnx.export``, as exported before) and version 3 (this), with any feature
schema it builds; :func:`reexport_set` rewrites a version 2 export as version 3 (``deflectlab export --model
<export folder>``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from deflectlab.agents.export import sha256
from deflectlab.agents.setnet import MASKED_LOGIT, SetPolicyNet, block_sizes
from deflectlab.envs import features as F
from deflectlab.envs.config import ClusterConfig
from deflectlab.policies.runtime import (
    MANIFEST_FORMAT,
    SET_MANIFEST_VERSION,
    SET_MANIFEST_VERSIONS,
    PolicyFileError,
    load_manifest,
)


def export_set(net: SetPolicyNet, out_dir: str | Path, cluster: ClusterConfig, trained_on: dict[str, Any],
               source: dict[str, Any] | None = None) -> Path:
    """Write ``policy.onnx``, ``policy_set.npz`` and ``manifest.json`` under ``out_dir``; returns the manifest.

    :param cluster: the profiles, budgets and SLOs the policy serves (its shape is not binding).
    :param trained_on: what it saw: ``{"shapes": ["2P2D", ...], "traces": [...], "loads": [...], ...}``.

    The feature schema is the network's own (``net.feature_schema``), recorded in the manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_req, n_pre, n_dec = block_sizes(net.feature_schema)
    onnx_path = out / "policy.onnx"
    onnx_path.write_bytes(decision_graph(net.arrays()).SerializeToString())
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
                    "inputs": {"request": [1, n_req], "prefill": ["P", n_pre], "decode": ["D", n_dec],
                               "action_mask": ["P+D", 1]},
                    "outputs": {"action": [1], "logits": ["P+D", 1]}},
        "files": {"onnx": {"path": onnx_path.name, "sha256": sha256(onnx_path), "opset": DECISION_OPSET},
                  "numpy": {"path": npz_path.name, "sha256": sha256(npz_path)}},
        "source": {**(source or {}), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    man = out / "manifest.json"
    man.write_text(json.dumps(manifest, indent=2, default=str))
    return man


#: the ONNX opset of :func:`decision_graph` (``ReduceMean``/``ReduceMax`` take ``axes`` as an attribute up to 17)
DECISION_OPSET = 17


def decision_graph(w: dict[str, np.ndarray]) -> Any:
    """The set network with weights ``w`` (by state-dict name, :meth:`SetPolicyNet.arrays`) as an ONNX model
    for one decision (the module docstring gives its inputs and outputs).

    The same arithmetic as :meth:`SetPolicyNet.forward`, laid out for onnxruntime: every layer a 2-D ``Gemm``
    (which it fuses with the ``tanh`` after it), the pooled context's two projections in one ``Gemm`` with
    the node layers' biases folded in, and each node score's context term passed as that ``Gemm``'s bias.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits: list[Any] = []
    nodes: list[Any] = []

    def const(name: str, a: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(a, np.float32), name))
        return name

    def gemm(x: str, layer: str, out: str, c: str | None = None, tanh: bool = False) -> str:
        """``out = [tanh](x @ W.T + c)``, ``c`` the layer's bias (as a row) unless given."""
        if c is None:
            c = const(f"{layer}.b", w[f"{layer}.bias"].reshape(1, -1))
        y = f"{out}.lin" if tanh else out
        nodes.append(helper.make_node("Gemm", [x, const(f"{layer}.wt", w[f"{layer}.weight"].T), c], [y]))
        if tanh:
            nodes.append(helper.make_node("Tanh", [y], [out]))
        return out

    ep = gemm(gemm("prefill", "phi_p.0", "h_p", tanh=True), "phi_p.2", "e_p", tanh=True)  # [P, H]
    ed = gemm(gemm("decode", "phi_d.0", "h_d", tanh=True), "phi_d.2", "e_d", tanh=True)  # [D, H]
    for e, k in ((ep, "p"), (ed, "d")):
        nodes.append(helper.make_node("ReduceMean", [e], [f"mean_{k}"], axes=[0], keepdims=1))
        nodes.append(helper.make_node("ReduceMax", [e], [f"max_{k}"], axes=[0], keepdims=1))
    nodes.append(helper.make_node("Concat", ["request", "mean_p", "max_p", "mean_d", "max_d"], ["pooled"], axis=1))
    g = gemm("pooled", "rho.0", "g", tanh=True)  # [1, H]
    ctx_w = np.concatenate([w["psi_p_ctx.weight"], w["psi_d_ctx.weight"]], 0).T
    ctx_b = np.concatenate([w["psi_p_node.bias"] + w.get("psi_p_ctx.bias", 0.0),
                            w["psi_d_node.bias"] + w.get("psi_d_ctx.bias", 0.0)]).reshape(1, -1)
    nodes.append(helper.make_node("Gemm", [g, const("ctx.wt", ctx_w), const("ctx.b", ctx_b)], ["ctx"]))
    nodes.append(helper.make_node("Split", ["ctx"], ["ctx_p", "ctx_d"], axis=1))
    sp = gemm(gemm(ep, "psi_p_node", "u_p", c="ctx_p", tanh=True), "psi_p_out", "s_p")  # [P, 1]
    sd = gemm(gemm(ed, "psi_d_node", "u_d", c="ctx_d", tanh=True), "psi_d_out", "s_d")  # [D, 1]
    nodes.append(helper.make_node("Concat", [sp, sd], ["scores"], axis=0))
    nodes.append(helper.make_node("Where", ["action_mask", "scores", const("masked", np.full((1, 1), MASKED_LOGIT))],
                                  ["logits"]))
    nodes.append(helper.make_node("ArgMax", ["logits"], ["action"], axis=0, keepdims=0))
    n_req = w["rho.0.weight"].shape[1] - 4 * w["phi_p.0.weight"].shape[0]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "deflectlab_set_decision",
        [helper.make_tensor_value_info("request", f, [1, n_req]),
         helper.make_tensor_value_info("prefill", f, ["P", w["phi_p.0.weight"].shape[1]]),
         helper.make_tensor_value_info("decode", f, ["D", w["phi_d.0.weight"].shape[1]]),
         helper.make_tensor_value_info("action_mask", TensorProto.BOOL, ["A", 1])],
        [helper.make_tensor_value_info("action", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("logits", f, ["A", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", DECISION_OPSET)],
                              producer_name="deflectlab")
    onnx.checker.check_model(model, full_check=True)
    return model


def reexport_set(src: str | Path, out_dir: str | Path) -> Path:
    """Write the shape-generic export at ``src`` (any version this code reads) at the current format version
    under ``out_dir`` (may be ``src``): the same weights, profiles, SLOs and provenance, the ONNX graph rebuilt
    (:func:`decision_graph`). Returns the new manifest."""
    d, man = load_manifest(src)
    if man.get("format_version") not in SET_MANIFEST_VERSIONS:
        raise PolicyFileError(f"{d}: a fixed-shape policy (manifest format version {man.get('format_version')}) "
                              "has no other format to be re-exported at; export its training run again "
                              "(deflectlab export --model <run>)")
    net = load_set_net(d)
    c, slo = man["cluster"], man["slo"]
    try:
        cluster = ClusterConfig(prefill_profile=c["prefill_profile"], decode_profile=c["decode_profile"],
                                prefill_max_batched_tokens=c["prefill_max_batched_tokens"],
                                decode_max_batched_tokens=c["decode_max_batched_tokens"],
                                max_num_seqs=c["max_num_seqs"], ttft_slo_s=slo["ttft_slo_s"],
                                tbt_slo_s=slo["tbt_slo_s"])
    except (KeyError, TypeError, ValueError) as e:
        raise PolicyFileError(f"{d}/manifest.json: cannot rebuild its cluster ({e})") from None
    source = {k: v for k, v in (man.get("source") or {}).items() if k != "exported_at"}
    source["reexported_from"] = {"format_version": man["format_version"], "exported_at":
                                 (man.get("source") or {}).get("exported_at")}
    return export_set(net, out_dir, cluster, man.get("trained_on") or {}, source=source)


def compare_exports(a: str | Path, b: str | Path, n: int = 200, seed: int = 0) -> tuple[int, int]:
    """``(agree, total)``: on ``n`` random observations and masks each of 2P2D, 4P4D and 3P5D, how often two
    shape-generic exports (e.g. one and its :func:`reexport_set`) pick the same action through onnxruntime."""
    from deflectlab.policies.runtime import OnnxPolicy

    pa, pb = OnnxPolicy(a, backend="onnx"), OnnxPolicy(b, backend="onnx")
    size = F.schema(pa.manifest["feature_schema"]["version"]).size
    rng = np.random.default_rng(seed)
    agree = total = 0
    for P, D in ((2, 2), (4, 4), (3, 5)):
        for _ in range(n):
            obs = rng.random(size(P, D), dtype=np.float32)
            mask = rng.random(P + D) < 0.8
            mask[rng.integers(P + D)] = True
            agree += pa.act(obs, mask) == pb.act(obs, mask)
            total += 1
    return agree, total


def load_set_net(path: str | Path) -> SetPolicyNet:
    """The :class:`SetPolicyNet` of an exported shape-generic policy (a folder :func:`export_set` wrote), from
    its numpy weights (read with ``allow_pickle=False``), to train further (``deflectlab dagger --init``).

    The manifest is checked as the runtime checks it (format, feature schema, SHA-256 of both files); a
    fixed-shape (version 1) export, or weights that do not fit the manifest's network, is a
    :class:`~deflectlab.policies.runtime.PolicyFileError` naming the problem.
    """
    from deflectlab.agents.dagger import net_from_arrays

    d, man = load_manifest(path)
    if man.get("format_version") not in SET_MANIFEST_VERSIONS:
        raise PolicyFileError(f"{d}: a fixed-shape policy (manifest format version {man.get('format_version')}); "
                              f"only a shape-generic export (version {' or '.join(map(str, SET_MANIFEST_VERSIONS))}) "
                              "can start DAgger or fine-tuning")
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
