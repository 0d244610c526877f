"""Export to ONNX + manifest, and the runtime that loads it: same actions as in-process, clear refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from deflectlab.agents.export import export  # noqa: E402
from deflectlab.agents.policy_io import load_policy_net, masked_action  # noqa: E402
from deflectlab.agents.train import train  # noqa: E402
from deflectlab.envs.config import ClusterConfig  # noqa: E402
from deflectlab.envs.features import FEATURE_SCHEMA  # noqa: E402
from deflectlab.envs.gym_env import DeflectionEnv  # noqa: E402
from deflectlab.envs.simulator import ClusterSim  # noqa: E402
from deflectlab.policies.registry import make_policy  # noqa: E402
from deflectlab.policies.runtime import OnnxPolicy, PolicyFileError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _tiny(tmp: Path, algo: str) -> dict:
    params = {"n_steps": 128, "batch_size": 64, "n_epochs": 2} if algo != "dqn" else \
        {"learning_starts": 64, "buffer_size": 2048}
    return {"name": "exp", "algo": algo, "seed": 2, "total_timesteps": 384, "n_envs": 2, "algo_params": params,
            "policy": {"net_arch": [32, 32], "activation": "relu" if algo == "dqn" else "tanh"},
            "env": {"window_s": 40}, "eval": {"every_steps": 0, "episodes": 1, "baselines": []},
            "wandb": {"enabled": False}, "out_dir": str(tmp / "runs")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for algo in ("maskable_ppo", "ppo", "dqn"):
        res = train(_tiny(tmp, algo))
        out[algo] = (Path(res.run_dir), export(res.run_dir, tmp / f"exported-{algo}").parent)
    return out


def _observations(n: int = 300):
    """Observations and masks from real episodes, plus random masks (never all False)."""
    env = DeflectionEnv(window_s=60)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=4)
    out = []
    for _ in range(n):
        m = env.action_masks()
        out.append((obs, m))
        rm = rng.random(4) < 0.6
        rm[rng.integers(4)] = True
        out.append((obs, rm))
        obs, _, done, _, _ = env.step(int(rng.integers(4)))
        if done:
            obs, _ = env.reset()
    return out


@pytest.mark.parametrize("algo", ["maskable_ppo", "ppo", "dqn"])
def test_exported_policy_acts_like_the_in_process_one(runs, algo):
    run_dir, exp = runs[algo]
    net, cfg, _ = load_policy_net(run_dir)
    onnx_pol = OnnxPolicy(exp, backend="onnx")
    np_pol = OnnxPolicy(exp, backend="numpy")
    model = None
    if algo == "maskable_ppo":
        from sb3_contrib import MaskablePPO

        model = MaskablePPO.load(run_dir / "best_model.zip", device="cpu")  # SB3's own loader, as reference
    for obs, mask in _observations():
        a = masked_action(net, obs, mask)
        assert mask[a]
        assert onnx_pol.act(obs, mask) == a
        assert np_pol.act(obs, mask) == a
        if model is not None:
            assert int(model.predict(obs, action_masks=mask, deterministic=True)[0]) == a


def test_manifest_describes_the_policy(runs):
    _, exp = runs["maskable_ppo"]
    man = json.loads((exp / "manifest.json").read_text())
    assert man["feature_schema"]["name"] == FEATURE_SCHEMA.name
    assert man["feature_schema"]["version"] == FEATURE_SCHEMA.version
    assert man["feature_schema"]["names"] == FEATURE_SCHEMA.names(2, 2)
    lo, hi = FEATURE_SCHEMA.bounds(2, 2)
    assert man["feature_schema"]["low"] == lo.tolist() and man["feature_schema"]["high"] == hi.tolist()
    assert [a["kind"] for a in man["action_layout"]] == ["prefill", "prefill", "deflect", "deflect"]
    assert man["cluster"]["num_prefill"] == 2 and man["cluster"]["num_decode"] == 2
    assert man["cluster"]["decode_profile"] == "a100-80gb_deepseek-v2-lite"
    assert man["slo"] == {"ttft_slo_s": 1.0, "tbt_slo_s": 0.1}
    assert man["network"]["layers"][-1]["out"] == 4


def test_learned_policy_from_the_registry_runs_a_simulation(runs):
    _, exp = runs["maskable_ppo"]
    env = DeflectionEnv(window_s=60)
    w, _ = env.episode_workload(1_000_000)
    results = []
    for backend in ("onnx", "numpy"):
        pol = make_policy(f"learned:path={exp / 'policy.onnx'},backend={backend}")
        res = ClusterSim(env.config, w).run(pol)
        results.append(res.records["path"].tolist())
        assert res.summary["completed"] + res.summary["rejected"] == len(w)
    assert results[0] == results[1]


def _copy(exp: Path, tmp: Path) -> Path:
    d = tmp / "copy"
    shutil.copytree(exp, d)
    return d


def test_refuses_mismatched_clusters(runs):
    _, exp = runs["maskable_ppo"]
    pol = OnnxPolicy(exp)
    w = DeflectionEnv(window_s=60).episode_workload(0)[0]
    with pytest.raises(PolicyFileError, match="trained for 2P2D, the cluster is 3P2D"):
        ClusterSim(ClusterConfig(num_prefill=3, num_decode=2), w).run(pol)
    with pytest.raises(PolicyFileError, match="SLOs"):
        ClusterSim(ClusterConfig(ttft_slo_s=2.0), w).run(OnnxPolicy(exp))
    with pytest.raises(PolicyFileError, match="profile"):
        ClusterSim(ClusterConfig(decode_profile="h100-80gb_llama-3-8b", prefill_profile="h100-80gb_llama-3-8b"),
                   w).run(OnnxPolicy(exp))
    ClusterSim(ClusterConfig(ttft_slo_s=2.0), w).run(OnnxPolicy(exp, strict=False))  # allowed when asked


def test_refuses_missing_corrupt_and_foreign_files(runs, tmp_path):
    _, exp = runs["maskable_ppo"]
    with pytest.raises(PolicyFileError, match="not found"):
        OnnxPolicy(tmp_path / "nothing")
    d = _copy(exp, tmp_path)
    (d / "policy_mlp.npz").unlink()
    with pytest.raises(PolicyFileError, match="missing"):
        OnnxPolicy(d)
    shutil.rmtree(d)
    d = _copy(exp, tmp_path)
    raw = bytearray((d / "policy.onnx").read_bytes())
    raw[len(raw) // 2:] = b"\x00" * (len(raw) - len(raw) // 2)
    (d / "policy.onnx").write_bytes(bytes(raw))
    with pytest.raises(PolicyFileError, match="SHA-256"):
        OnnxPolicy(d)
    man = json.loads((d / "manifest.json").read_text())  # even with a matching hash, a broken model is refused
    import hashlib

    man["files"]["onnx"]["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(PolicyFileError, match="onnxruntime cannot load"):
        OnnxPolicy(d)
    shutil.rmtree(d)
    d = _copy(exp, tmp_path)
    man = json.loads((d / "manifest.json").read_text())
    man["feature_schema"]["version"] = 99  # a version this code does not build
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(PolicyFileError, match="features"):
        OnnxPolicy(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(PolicyFileError, match="JSON"):
        OnnxPolicy(d)
    (d / "manifest.json").unlink()
    with pytest.raises(PolicyFileError, match="manifest"):
        OnnxPolicy(d)
    with pytest.raises(ValueError, match="backend"):
        OnnxPolicy(exp, backend="torch")


def test_loading_never_unpickles(runs, monkeypatch):
    import pickle

    def boom(*a, **k):
        raise AssertionError("a policy file was unpickled")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    run_dir, exp = runs["maskable_ppo"]
    OnnxPolicy(exp, backend="onnx")
    OnnxPolicy(exp, backend="numpy")
    load_policy_net(run_dir)  # the training side reads weights with torch.load(weights_only=True)


def test_export_cli_subprocess(runs, tmp_path):
    run_dir, _ = runs["ppo"]
    p = subprocess.run([sys.executable, "-m", "deflectlab.scripts.cli", "export", "--model", str(run_dir), "--out",
                        str(tmp_path / "cli"), "--check", "100"], cwd=REPO, capture_output=True, text=True,
                       timeout=240, env={**os.environ, "WANDB_MODE": "offline"})
    assert p.returncode == 0, p.stderr
    assert "100/100 decisions agree (onnx), 100/100 (numpy)" in p.stdout
    assert (tmp_path / "cli" / "manifest.json").is_file()
    p = subprocess.run([sys.executable, "-m", "deflectlab.scripts.cli", "export", "--model", str(tmp_path), "--out",
                        str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "no best_model.zip or model.zip" in p.stderr


def test_the_v1_trained_policy_loads_and_matches_its_model():
    kept = REPO / "experiments" / "trained_v1"
    assert (kept / "manifest.json").is_file(), "the repository ships the v1 policy in experiments/trained_v1"
    onnx_pol, np_pol = OnnxPolicy(kept), OnnxPolicy(kept, backend="numpy")
    net, cfg, _ = load_policy_net(kept / "sb3_model.zip")
    assert cfg.algo == onnx_pol.manifest["network"]["algo"]
    for obs, mask in _observations(100):
        a = masked_action(net, obs, mask)
        assert onnx_pol.act(obs, mask) == a == np_pol.act(obs, mask)


def test_two_way_policy_exports_and_routes_like_in_process(tmp_path):
    """The kept RL policy (experiments/rl/policy_scratch_s1: two-way actions, prefill or deflect, the node with
    the lowest est_ttft) exports with its action space in the manifest, and the runtime routes a busy window
    exactly as the in-process network does, with either backend."""
    from deflectlab.agents.evaluation import NetPolicy

    run = REPO / "experiments" / "rl" / "policy_scratch_s1"
    exp = export(run, tmp_path / "exported", which="final").parent
    man = json.loads((exp / "manifest.json").read_text())
    assert man["actions"] == "two_way" and [a["kind"] for a in man["action_layout"]] == ["prefill", "deflect"]
    assert man["network"]["layers"][-1]["out"] == 2
    net, cfg, _ = load_policy_net(run, "final")
    env = DeflectionEnv(**{**cfg.eval_env_kwargs(), "window_s": 120, "load": 3.0})
    w, _ = env.episode_workload(1_000_000)
    ref = ClusterSim(env.config, w).run(NetPolicy(net, actions="two_way"))
    paths = ref.records["path"].tolist()
    assert len(set(paths)) == 2  # it both prefilled and deflected on this window
    for backend in ("onnx", "numpy"):
        got = ClusterSim(env.config, w).run(OnnxPolicy(exp, backend=backend))
        assert got.records["path"].tolist() == paths
        assert got.records["decode_node"].tolist() == ref.records["decode_node"].tolist()


def test_unknown_action_space_is_refused(runs, tmp_path):
    _, exp = runs["maskable_ppo"]
    bad = tmp_path / "bad"
    shutil.copytree(exp, bad)
    man = json.loads((bad / "manifest.json").read_text())
    man["actions"] = "three_way"
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(PolicyFileError, match="unknown action space 'three_way'"):
        OnnxPolicy(bad)


@pytest.mark.parametrize("folder", ["trained", "trained_dagger"])
def test_the_shipped_shape_generic_policies_run_every_shape(folder):
    """experiments/trained (ES fine-tuned) and experiments/trained_dagger (its start): one export for every
    shape; ONNX, numpy and the torch network agree. The DAgger network, on shapes it never saw, still follows
    its teacher's rule (deflect prompts well under 3,072 tokens, prefill ones well over), checked against the
    prompt lengths of the states it decided on; the ES network was trained away from that rule on purpose."""
    import math

    import torch

    from deflectlab.agents.setnet import SetPolicyNet, masked_argmax, split_obs

    kept = REPO / "experiments" / folder
    assert (kept / "manifest.json").is_file(), f"the repository ships a shape-generic policy in experiments/{folder}"
    onnx_pol, np_pol = OnnxPolicy(kept), OnnxPolicy(kept, backend="numpy")
    man = onnx_pol.manifest
    assert man["format_version"] == {"trained": 3, "trained_dagger": 2}[folder]  # the kept one re-exported
    assert {"2P2D", "4P4D"} <= set(man["trained_on"]["shapes"])
    net = SetPolicyNet(man["network"]["hidden"])
    with np.load(kept / man["files"]["numpy"]["path"], allow_pickle=False) as z:
        net.load_state_dict({k: torch.as_tensor(z[k]) for k in z.files})
    net.eval()
    for P, D in ((2, 2), (4, 4), (8, 8)):
        env = DeflectionEnv(window_s=60, load=[2.0, 2.0], cluster={"num_prefill": P, "num_decode": D})
        obs, _ = env.reset(seed=5)
        acts, rule = [], []
        for _ in range(150):
            m = env.action_masks()
            with torch.no_grad():
                logits = net(*split_obs(torch.as_tensor(obs[None]), P, D))[0][0].numpy()
            best = logits[masked_argmax(logits, m)]
            a = onnx_pol.act(obs, m)
            # both backends pick a best valid action of the torch network (identical nodes tie: either one)
            for b in (a, np_pol.act(obs, m)):
                assert m[b] and logits[b] >= best - 1e-4
            L = math.expm1(float(obs[0]) * math.log1p(131072))
            if (L < 2000 or L > 5000) and m[P:].any():
                rule.append((a >= P) == (L < 2000))
            acts.append(a)
            obs, _, done, _, _ = env.step(a)
            if done:
                break
        assert len(set(acts)) >= 3 and len(rule) >= 50  # not vacuous: several nodes, both kinds of prompt
        if folder == "trained_dagger":
            assert sum(rule) / len(rule) >= 0.95, (P, D, sum(rule) / len(rule))
