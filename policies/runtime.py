"""Run an exported policy: ``learned:path=<dir or policy.onnx>`` in the registry, :class:`OnnxPolicy` in code.

An export (``deflectlab export``, :mod:`agents.export`) is a directory with ``policy.onnx``, ``policy_mlp.npz`` and
``manifest.json``. Loading checks, and refuses with a clear :class:`PolicyFileError`:

* the manifest's format and version, and that its feature schema is one this code builds (name, a version of
  :data:`envs.features.SCHEMAS`, 1 or 2, and that version's exact feature list), so the network sees the
  features it was trained on: the policy builds its observations with the manifest's schema version;
* both weight files exist and match the SHA-256 in the manifest (a truncated or edited file is refused);
* the ONNX model loads in onnxruntime and has the expected inputs;
* at the first decision, the cluster: ``view.num_prefill``/``view.num_decode`` must equal the manifest's, and
  with ``strict`` (default) the SLOs and the nodes' profile names too.

Nothing is unpickled: ONNX is protobuf, the numpy weights are read with ``allow_pickle=False``.

``decide(view, request)`` builds the observation with :mod:`envs.features` (the environment's builder), runs
the network with the action mask, and maps the action with the environment's layout and chunk rule. Two
backends give the same action: ``onnx`` (onnxruntime, about 14 us per call measured for a 64x64 MLP) and
``numpy`` (the MLP in plain numpy, about 6 us; docs/design.md). For the shape-generic network (manifest version
2 or 3) onnxruntime is the faster of the two (about 13 us for the 2P2D set network's one-decision graph of
version 3, 21 us for version 2's batched one, against 40 us for the numpy path's some forty small array
operations), and its inputs and outputs are bound once per cluster shape (:class:`_Bound`): a decision copies
the observation and the mask into buffers the session reads, with no per-call input dict.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from deflectlab.envs.actions import ACTION_SPACES, TwoWay
from deflectlab.envs.features import FEATURE_SCHEMA, SCHEMAS, FeatureBuilder, FeatureSchema
from deflectlab.envs.view import ClusterView, Decision, Policy, RequestLike

MANIFEST_FORMAT = "deflectlab.policy"
MANIFEST_VERSION = 1
#: Shape-generic policies (agents.setnet: one network for every cluster shape, dynamic node count in ONNX):
#: version 3 (what agents.set_export writes) has a graph for one decision, version 2 a batched one (read still).
SET_MANIFEST_VERSION = 3
SET_MANIFEST_VERSIONS = (2, 3)
_SET_INPUTS = ["request", "prefill", "decode", "action_mask"]
BACKENDS = ("auto", "onnx", "numpy")


class PolicyFileError(ValueError):
    """An exported policy is missing, corrupt, or does not fit this cluster or this code's features."""


def _resolve(path: str | Path) -> tuple[Path, Path]:
    """``(export directory, manifest path)`` for a directory, its ``policy.onnx`` or its ``manifest.json``."""
    p = Path(path)
    if not p.exists():
        raise PolicyFileError(f"exported policy not found: {p}")
    d = p if p.is_dir() else p.parent
    man = d / "manifest.json"
    if not man.is_file():
        raise PolicyFileError(f"{d}: no manifest.json beside the policy (export with `deflectlab export`)")
    return d, man


def load_manifest(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Read and check a policy manifest against this code's feature schema; returns ``(directory, manifest)``."""
    d, man_path = _resolve(path)
    try:
        man = json.loads(man_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PolicyFileError(f"{man_path}: not valid JSON: {e}") from None
    if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT:
        raise PolicyFileError(f"{man_path}: not a deflectlab policy manifest (format {man.get('format')!r})"
                              if isinstance(man, dict) else f"{man_path}: not a deflectlab policy manifest")
    if man.get("format_version") in SET_MANIFEST_VERSIONS:
        _check_set_schema(man, man_path)
        _check_files(d, man, man_path)
        return d, man
    if man.get("format_version") != MANIFEST_VERSION:
        raise PolicyFileError(f"{man_path}: manifest format version {man.get('format_version')!r}; this code reads "
                              f"{MANIFEST_VERSION} (fixed shape) and {' and '.join(map(str, SET_MANIFEST_VERSIONS))} "
                              "(any shape)")
    try:
        fs = man["feature_schema"]
        P, D = int(man["cluster"]["num_prefill"]), int(man["cluster"]["num_decode"])
        man["files"]  # noqa: B018 - presence check (KeyError below)
    except (KeyError, TypeError, ValueError) as e:
        raise PolicyFileError(f"{man_path}: manifest lacks {e}") from None
    if not isinstance(fs, dict):
        raise PolicyFileError(f"{man_path}: manifest's feature_schema is not a mapping")
    sch = _known_schema(fs, man_path)
    if fs.get("names") != sch.names(P, D):
        raise PolicyFileError(f"{man_path}: feature list differs from {sch.name} "
                              f"v{sch.version} for {P}P{D}D (same version, different features)")
    if man.get("actions", "nodes") not in ACTION_SPACES:
        raise PolicyFileError(f"{man_path}: unknown action space {man.get('actions')!r}; this code knows "
                              f"{', '.join(ACTION_SPACES)}")
    _check_files(d, man, man_path)
    return d, man


def _known_schema(fs: dict[str, Any], man_path: Path) -> FeatureSchema:
    """The schema a manifest's ``feature_schema`` names, if this code builds it; else a :class:`PolicyFileError`
    naming the manifest's name and version and the versions this code builds."""
    version = fs.get("version")
    known = fs.get("name") == FEATURE_SCHEMA.name and isinstance(version, int) and not isinstance(version, bool)
    sch = SCHEMAS.get(version) if known else None
    if sch is None:
        raise PolicyFileError(
            f"{man_path}: trained on features {fs.get('name')} v{version}, this code builds "
            f"{FEATURE_SCHEMA.name} v{', v'.join(map(str, SCHEMAS))}; retrain or use the matching deflectlab version")
    return sch


def _check_set_schema(man: dict[str, Any], man_path: Path) -> None:
    """A shape-generic manifest names the schema's blocks, not a shape-bound feature list; any version this
    code builds (:data:`SCHEMAS`) is accepted, with exactly that version's features."""
    fs = man.get("feature_schema")
    if not isinstance(fs, dict) or not isinstance(man.get("files"), dict) or not isinstance(man.get("slo"), dict):
        raise PolicyFileError(f"{man_path}: manifest lacks feature_schema, files or slo")
    sch = _known_schema(fs, man_path)
    for block in ("request", "prefill", "decode"):
        have = [f.get("name") for f in fs.get(block) or [] if isinstance(f, dict)]
        if have != [f.name for f in getattr(sch, block)]:
            raise PolicyFileError(f"{man_path}: the {block} block's features differ from {sch.name} "
                                  f"v{sch.version}")


def _check_files(d: Path, man: dict[str, Any], man_path: Path) -> None:
    files = man["files"]
    for key in ("onnx", "numpy"):
        entry = files.get(key)
        if not entry:
            raise PolicyFileError(f"{man_path}: manifest lists no {key} file")
        f = d / entry["path"]
        if not f.is_file():
            raise PolicyFileError(f"{f}: missing (listed in {man_path.name})")
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if digest != entry.get("sha256"):
            raise PolicyFileError(f"{f}: SHA-256 {digest[:12]}... does not match the manifest's "
                                  f"{str(entry.get('sha256'))[:12]}...: the file is corrupt or was changed")


def set_numpy_logits(w: dict[str, np.ndarray], req: np.ndarray, pre: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """The shape-generic network's logits (agents.setnet.SetPolicyNet) in plain numpy, for one observation
    (``req [R], pre [P, F_p], dec [D, F_d]``, the block sizes of its feature schema: 3, 6, 11 for v1; 3, 7, 12
    for v2): shared node encoders, mean/max pooled context, per-node scores."""
    def lin(x: np.ndarray, name: str) -> np.ndarray:
        y = x @ w[f"{name}.weight"].T
        b = w.get(f"{name}.bias")
        return y if b is None else y + b

    ep = np.tanh(lin(np.tanh(lin(pre, "phi_p.0")), "phi_p.2"))
    ed = np.tanh(lin(np.tanh(lin(dec, "phi_d.0")), "phi_d.2"))
    g = np.tanh(lin(np.concatenate([req, ep.mean(0), ep.max(0), ed.mean(0), ed.max(0)]), "rho.0"))
    sp = lin(np.tanh(lin(ep, "psi_p_node") + lin(g, "psi_p_ctx")), "psi_p_out")[:, 0]
    sd = lin(np.tanh(lin(ed, "psi_d_node") + lin(g, "psi_d_ctx")), "psi_d_out")[:, 0]
    return np.concatenate([sp, sd]).astype(np.float32)


def split_set_obs(sch: FeatureSchema, obs: np.ndarray, num_actions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(request [R], prefill [P, F_p], decode [D, F_d])`` of one flat observation of schema ``sch``; P and D
    are read off its length and the action count (``P + D``). A length that fits no shape is a ``ValueError``."""
    a = num_actions
    n_req, n_pre, n_dec = len(sch.request), len(sch.prefill), len(sch.decode)
    D = (len(obs) - n_req - a * n_pre) // (n_dec - n_pre)
    P = a - D
    if P < 0 or D < 0 or sch.size(P, D) != len(obs):
        raise ValueError(f"observation of {len(obs)} features and a mask of {a} actions fit no cluster shape")
    return obs[:n_req], obs[n_req:n_req + P * n_pre].reshape(P, n_pre), obs[n_req + P * n_pre:].reshape(D, n_dec)


class SetArraysPolicy(Policy):
    """The shape-generic network straight from numpy weights in memory (by state-dict name, as
    ``SetPolicyNet.arrays()`` gives them): what a training loop uses to score many weight vectors in the
    simulator without exporting each. Greedy masked action, the numpy path of :class:`OnnxPolicy`; no manifest,
    so no cluster or SLO checks (an exported policy gets those)."""

    name = "set_arrays"

    def __init__(self, weights: dict[str, np.ndarray], feature_schema: int = 1) -> None:
        missing = missing_set_weights(weights)
        if missing:
            raise ValueError(f"set_arrays: the weights lack {missing}")
        self._w = {k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()}
        self._fb = FeatureBuilder(feature_schema)
        self.feature_schema = int(feature_schema)

    def decide(self, view: ClusterView, request: RequestLike) -> Decision:
        fb = self._fb
        obs = fb.build(view, request)
        mask = fb.mask
        logits = set_numpy_logits(self._w, *split_set_obs(fb.schema, obs, len(mask)))
        return fb.decision(int(np.argmax(np.where(mask, logits, np.float32(-1e9)))))

    def reset(self, seed: int | None = None) -> None:
        self._fb.reset()  # feature schema 3 keeps estimator state across a run

    def taken(self, view: ClusterView, request: RequestLike, decision: Decision) -> None:
        """Another policy decided ``request`` (a learner DAgger lets act): the features track its deflection."""
        self._fb.taken(decision)

    def params(self) -> dict[str, Any]:
        return {"feature_schema": self.feature_schema, "weights": len(self._w)}


def missing_set_weights(arrays: dict[str, np.ndarray]) -> list[str]:
    """The layers of the shape-generic network whose weights ``arrays`` lacks."""
    return [k for k in _SET_KEYS if f"{k}.weight" not in arrays]


_SET_KEYS = ("phi_p.0", "phi_p.2", "phi_d.0", "phi_d.2", "rho.0", "psi_p_node", "psi_p_out", "psi_d_node",
             "psi_d_out")


_BOUND_MAX = 16  # cluster shapes a policy keeps bound buffers for at most (a router serves one)


class _Bound:
    """Input and output buffers of a shape-generic ONNX policy bound to its session for one cluster shape (see
    :meth:`OnnxPolicy._bind`)."""

    __slots__ = ("obs", "mask", "action", "binding", "_values")

    def __init__(self, sess: Any, schema: FeatureSchema, n_obs: int, n_actions: int, batched: bool) -> None:
        import onnxruntime as ort

        self.obs = np.zeros(n_obs, np.float32)
        self.mask = np.ones(n_actions, bool)
        req, pre, dec = split_set_obs(schema, self.obs, n_actions)  # views of self.obs
        self.action = np.zeros(1, np.int64)
        if batched:  # manifest version 2: a batch of one
            arrays = {"request": req.reshape(1, -1), "prefill": pre[None], "decode": dec[None],
                      "action_mask": self.mask.reshape(1, -1), "logits": np.zeros((1, n_actions), np.float32)}
        else:  # version 3: one decision (agents.set_export.decision_graph)
            arrays = {"request": req.reshape(1, -1), "prefill": pre, "decode": dec,
                      "action_mask": self.mask.reshape(-1, 1), "logits": np.zeros((n_actions, 1), np.float32)}
        arrays["action"] = self.action  # (logits bound too, so that no run allocates them)
        # the OrtValues share the arrays' memory (CPU) and hold them; kept here as long as the binding
        self._values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}
        self.binding = sess.io_binding()
        for name in _SET_INPUTS:
            self.binding.bind_ortvalue_input(name, self._values[name])
        for name in ("action", "logits"):
            self.binding.bind_ortvalue_output(name, self._values[name])


class OnnxPolicy(Policy):
    """An exported policy (see the module docstring).

    :param path: export directory, its ``policy.onnx`` or its ``manifest.json``.
    :param backend: ``onnx`` (onnxruntime), ``numpy`` (plain-numpy MLP; same actions) or ``auto``: onnx where
        onnxruntime (the ``serve`` extra) is installed, else numpy, so a base install runs exported policies.
    :param strict: also refuse a cluster whose SLOs or profile names differ from the training cluster's.
    """

    name = "learned"

    def __init__(self, path: str | Path, backend: str = "auto", strict: bool = True) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"policy 'learned': backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "auto":
            backend = "onnx" if importlib.util.find_spec("onnxruntime") is not None else "numpy"
        self.path = str(path)
        self.backend = backend
        self.strict = bool(strict)
        self.dir, self.manifest = load_manifest(path)
        c = self.manifest["cluster"]
        version = self.manifest["feature_schema"]["version"]
        #: a shape-generic policy (manifest version 2 or 3) runs on any P >= 1, D >= 1
        self.generic = self.manifest["format_version"] in SET_MANIFEST_VERSIONS
        if self.generic:
            self.num_prefill = self.num_decode = None
            self.num_obs = None
        else:
            self.num_prefill, self.num_decode = int(c["num_prefill"]), int(c["num_decode"])
            self.num_obs = SCHEMAS[version].size(self.num_prefill, self.num_decode)
        #: ``two_way`` (envs.actions): the network picks prefill or deflect, the node is the lowest est_ttft
        self.two_way = TwoWay(self.num_prefill, self.num_decode, version) \
            if self.manifest.get("actions", "nodes") == "two_way" else None
        self._masked = float(self.manifest["network"].get("masked_logit", -1e9))
        self._fb = FeatureBuilder(version)  # the schema the policy was trained on (1 for the shipped one)
        self._checked = False
        self._bound: dict[int, _Bound] = {}  # the onnx backend's bound buffers by observation size and action count
        if backend == "onnx":
            self._load_onnx()
        else:
            self._load_numpy()

    # -- loading -------------------------------------------------------------------------------------------
    def _load_onnx(self) -> None:
        import onnxruntime as ort

        f = self.dir / self.manifest["files"]["onnx"]["path"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            self._sess = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise PolicyFileError(f"{f}: onnxruntime cannot load it: {e}") from None
        names = [i.name for i in self._sess.get_inputs()]
        if self.generic:
            if names != _SET_INPUTS:
                raise PolicyFileError(f"{f}: inputs {names}, expected {_SET_INPUTS} (a shape-generic policy)")
            inputs = self._sess.get_inputs()
            #: manifest version 2's graph takes a batch (3-D node blocks), version 3's one decision (2-D)
            self._batched = self.manifest["format_version"] == 2
            rank, want = len(inputs[1].shape), 3 if self._batched else 2
            if rank != want:
                raise PolicyFileError(f"{f}: its prefill input has {rank} dimensions, a manifest of format version "
                                      f"{self.manifest['format_version']} needs {want}")
            have = [i.shape[-1] for i in inputs[:3]]
            if have != self._block_sizes():
                raise PolicyFileError(f"{f}: takes blocks of {have} features, the manifest's feature schema "
                                      f"v{self._fb.version} has {self._block_sizes()}")
            return
        if names != ["obs", "action_mask"]:
            raise PolicyFileError(f"{f}: inputs {names}, expected ['obs', 'action_mask']")
        shape = self._sess.get_inputs()[0].shape
        if shape[-1] != self.num_obs:
            raise PolicyFileError(f"{f}: takes {shape[-1]} features, the manifest's schema has {self.num_obs}")

    def _load_numpy(self) -> None:
        f = self.dir / self.manifest["files"]["numpy"]["path"]
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise PolicyFileError(f"{f}: not a readable numpy weight file: {e}") from None
        if self.generic:
            missing = missing_set_weights(arrays)
            if missing:
                raise PolicyFileError(f"{f}: shape-generic weights lack {missing}")
            h = arrays["phi_p.0.weight"].shape[0]
            have = [arrays["rho.0.weight"].shape[1] - 4 * h, arrays["phi_p.0.weight"].shape[1],
                    arrays["phi_d.0.weight"].shape[1]]
            if have != self._block_sizes():
                raise PolicyFileError(f"{f}: weights take blocks of {have} features, the manifest's feature "
                                      f"schema v{self._fb.version} has {self._block_sizes()}")
            self._set_w = {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
            return
        spec = self.manifest["network"]["layers"]
        self._layers: list[tuple[np.ndarray, np.ndarray, str]] = []
        for i, layer in enumerate(spec):
            w, b = arrays.get(f"W{i}"), arrays.get(f"b{i}")
            if w is None or b is None or w.shape != (layer["out"], layer["in"]) or b.shape != (layer["out"],):
                raise PolicyFileError(f"{f}: layer {i} weights missing or not {layer['out']}x{layer['in']}")
            self._layers.append((np.ascontiguousarray(w, np.float32), np.ascontiguousarray(b, np.float32),
                                 layer["activation"]))
        if self._layers[0][0].shape[1] != self.num_obs:
            raise PolicyFileError(f"{f}: takes {self._layers[0][0].shape[1]} features, expected {self.num_obs}")

    def _block_sizes(self) -> list[int]:
        """``[request, per prefill node, per decode node]`` feature counts of the manifest's schema."""
        s = self._fb.schema
        return [len(s.request), len(s.prefill), len(s.decode)]

    # -- checks --------------------------------------------------------------------------------------------
    def check_cluster(self, view: ClusterView) -> None:
        """Refuse a cluster this policy was not trained for (shape; with ``strict`` SLOs and profiles)."""
        P, D = view.num_prefill, view.num_decode
        if self.generic and (P < 1 or D < 1):
            raise PolicyFileError(f"{self.dir}: a shape-generic policy needs at least one prefill and one decode "
                                  f"node, the cluster is {P}P{D}D")
        if not self.generic and (P, D) != (self.num_prefill, self.num_decode):
            raise PolicyFileError(f"{self.dir}: trained for {self.num_prefill}P{self.num_decode}D, the cluster is "
                                  f"{P}P{D}D")
        if self.strict:
            slo = self.manifest["slo"]
            if (abs(view.ttft_slo_s - slo["ttft_slo_s"]) > 1e-9 or abs(view.tbt_slo_s - slo["tbt_slo_s"]) > 1e-9):
                raise PolicyFileError(
                    f"{self.dir}: trained for TTFT/TBT SLOs {slo['ttft_slo_s']}/{slo['tbt_slo_s']} s, the cluster "
                    f"has {view.ttft_slo_s}/{view.tbt_slo_s} s (strict=false to run it anyway)")
            c = self.manifest["cluster"]
            for kind, nodes, want in (("prefill", view.prefill, c["prefill_profile"]),
                                      ("decode", view.decode, c["decode_profile"])):
                for n in nodes:
                    have = getattr(n.profile, "name", None)
                    if have != Path(want).stem and have != want:
                        raise PolicyFileError(f"{self.dir}: trained with {kind} profile {want}, {kind} node "
                                              f"{n.index} has {have} (strict=false to run it anyway)")
        self._checked = True

    # -- deciding ------------------------------------------------------------------------------------------
    def act(self, obs: np.ndarray, mask: np.ndarray) -> int:
        """The greedy masked action for one observation (a shape-generic policy reads P and D off the mask and
        the observation's length)."""
        if self.generic:
            return self._act_set(obs, mask)
        if self.backend == "onnx":
            a, _ = self._sess.run(None, {"obs": obs.reshape(1, -1), "action_mask": mask.reshape(1, -1)})
            return int(a[0])
        x = obs
        for w, b, act in self._layers:
            x = w @ x + b
            if act == "tanh":
                x = np.tanh(x)
            elif act == "relu":
                x = np.maximum(x, 0.0)
        return int(np.argmax(np.where(mask, x, np.float32(self._masked))))

    def _act_set(self, obs: np.ndarray, mask: np.ndarray) -> int:
        if self.backend == "onnx":
            bound = self._bound.get(len(obs) << 16 | len(mask))
            if bound is None:
                bound = self._bind(len(obs), len(mask))
            bound.obs[:] = obs
            bound.mask[:] = mask
            self._sess.run_with_iobinding(bound.binding)
            return int(bound.action[0])
        req, pre, dec = split_set_obs(self._fb.schema, obs, len(mask))
        logits = set_numpy_logits(self._set_w, req, pre, dec)
        return int(np.argmax(np.where(mask, logits, np.float32(self._masked))))

    def _bind(self, n_obs: int, n_actions: int) -> _Bound:
        """Buffers bound to the session's inputs and outputs for one observation size and action count (one
        cluster shape), made at the shape's first decision: a decision then copies the observation and the mask
        in and runs, with no input dict, no per-call arrays and no per-call input checks (onnxruntime's
        ``run_with_iobinding``). The inputs are views of one flat buffer laid out as the observation (request
        block, prefill nodes, decode nodes), so one copy fills all three. A length that fits no shape raises (in
        :func:`split_set_obs`), as on the unbound path."""
        if len(self._bound) >= _BOUND_MAX:
            self._bound.clear()
        bound = self._bound[n_obs << 16 | n_actions] = _Bound(self._sess, self._fb.schema, n_obs, n_actions,
                                                              self._batched)
        return bound

    def decide(self, view: ClusterView, request: RequestLike) -> Decision:
        if self.generic:
            if not self._checked:
                self.check_cluster(view)
            fb = self._fb
            obs = fb.build(view, request)
            return fb.decision(self._act_set(obs, fb.mask))
        if not self._checked:
            self.check_cluster(view)
        elif view.num_prefill != self.num_prefill or view.num_decode != self.num_decode:
            self.check_cluster(view)  # raises
        fb = self._fb
        obs = fb.build(view, request)
        tw = self.two_way
        if tw is not None:
            return fb.decision(tw.node_action(self.act(obs, tw.mask(fb.mask)), obs, fb.mask))
        return fb.decision(self.act(obs, fb.mask))

    def reset(self, seed: int | None = None) -> None:
        self._fb.reset()  # feature schema 3 keeps estimator state across a run

    def taken(self, view: ClusterView, request: RequestLike, decision: Decision) -> None:
        """Another policy decided ``request`` (a learner DAgger lets act): the features track its deflection."""
        self._fb.taken(decision)

    def params(self) -> dict[str, Any]:
        return {"path": self.path, "backend": self.backend, "strict": self.strict}


def register_policies(register: Any) -> None:
    """Add ``learned`` (an exported policy: ``learned:path=<dir>,backend=auto|onnx|numpy,strict=true``)."""
    register("learned", OnnxPolicy)
