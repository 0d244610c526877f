"""The shape-generic policy: permutation equivariance, ONNX with a dynamic node count, runtime on any shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deflectlab.agents.set_export import export_set
from deflectlab.agents.setnet import SetPolicyNet, make_set_policy_class, masked_argmax, split_obs
from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.gym_env import DeflectionEnv
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.workloads import make_workload
from deflectlab.policies.registry import make_policy
from deflectlab.policies.runtime import OnnxPolicy, PolicyFileError

SHAPES = ((2, 2), (4, 4), (3, 5))


def _net(seed: int = 0) -> SetPolicyNet:
    torch.manual_seed(seed)
    net = SetPolicyNet(hidden=16)
    with torch.no_grad():  # larger weights than the default init, so the scores differ clearly between nodes
        for p in net.parameters():
            p.mul_(3.0)
    return net.eval()


def _env(P: int, D: int) -> DeflectionEnv:
    return DeflectionEnv(trace="azure_code", load=[3.0, 3.0], window_s=60.0, window_start_s=[1200, 1500],
                         cluster={"num_prefill": P, "num_decode": D})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = _net()
    d = tmp_path_factory.mktemp("setpol")
    export_set(net, d, ClusterConfig(), trained_on={"shapes": ["2P2D"], "traces": ["azure_code"]})
    return net, d


def test_scores_are_permutation_equivariant():
    net = _net(1)
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(4, 3 + 3 * 6 + 4 * 11, generator=g)
    req, pre, dec = split_obs(obs, 3, 4)
    logits, value = net(req, pre, dec)
    pp, pd = torch.tensor([2, 0, 1]), torch.tensor([3, 1, 0, 2])
    logits2, value2 = net(req, pre[:, pp], dec[:, pd])
    assert torch.allclose(logits2[:, :3], logits[:, :3][:, pp], atol=1e-6)
    assert torch.allclose(logits2[:, 3:], logits[:, 3:][:, pd], atol=1e-6)
    assert torch.allclose(value2, value, atol=1e-6)


def test_split_obs_names_a_shape_mismatch():
    with pytest.raises(ValueError, match="2P2D cluster has 37"):
        split_obs(np.zeros((1, 40)), 2, 2)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_same_actions_in_process_onnx_and_numpy(exported, shape):
    net, d = exported
    onnx_pol, np_pol = OnnxPolicy(d, backend="onnx"), OnnxPolicy(d, backend="numpy")
    env = _env(*shape)
    obs, _ = env.reset(seed=3)
    acts = []
    for _ in range(150):
        mask = env.action_masks()
        with torch.no_grad():
            logits = net.flat_logits(torch.as_tensor(obs[None]), *shape)[0].numpy()
        a = masked_argmax(logits, mask)
        assert onnx_pol.act(obs, mask) == a == np_pol.act(obs, mask)
        acts.append(a)
        obs, _, done, _, _ = env.step(a)
        if done:
            obs, _ = env.reset()
    assert len(set(acts)) >= 2  # the check is not vacuous: the network picks different nodes


def test_one_onnx_policy_alternating_shapes_keeps_the_network_s_actions(exported):
    """The onnx backend binds buffers per shape at its first decision there; one policy that alternates between
    shapes (and batches of random observations, far from the training states) must still act as the network."""
    net, d = exported
    pol = OnnxPolicy(d, backend="onnx")
    rng = np.random.default_rng(5)
    acts = set()
    for i in range(240):
        P, D = SHAPES[i % 3]
        obs = rng.random(pol._fb.schema.size(P, D), dtype=np.float32)
        mask = rng.random(P + D) < 0.7
        mask[rng.integers(P + D)] = True
        with torch.no_grad():
            logits = net.flat_logits(torch.as_tensor(obs[None]), P, D)[0].numpy()
        a = masked_argmax(logits, mask)
        assert pol.act(obs, mask) == a
        assert mask[a]
        acts.add((P, D, a))
    assert len(pol._bound) == 3
    assert len(acts) >= 9  # not vacuous: several nodes picked on every shape


def test_learned_spec_runs_any_shape_and_keeps_v1(exported):
    _, d = exported
    man = json.loads((d / "manifest.json").read_text())
    assert man["format_version"] == 3 and man["trained_on"]["shapes"] == ["2P2D"]
    wl = make_workload("azure_code", num_requests=120, arrival="poisson", rate=6.0, seed=2)
    for P, D in SHAPES:
        res = ClusterSim(ClusterConfig(num_prefill=P, num_decode=D), wl).run(make_policy(f"learned:path={d}"))
        assert res.summary["requests"] == 120
    # the shipped fixed-shape (v1) policy still loads, and still refuses another shape
    v1 = make_policy("learned:path=experiments/trained_v1")
    ClusterSim(ClusterConfig(), wl).run(v1)
    with pytest.raises(PolicyFileError, match="trained for 2P2D"):
        ClusterSim(ClusterConfig(num_prefill=4, num_decode=4), wl).run(
            make_policy("learned:path=experiments/trained_v1"))


def test_corrupt_set_weights_are_refused(exported, tmp_path):
    _, d = exported
    for f in d.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "policy_set.npz").write_bytes(b"junk")
    with pytest.raises(PolicyFileError, match="SHA-256"):
        OnnxPolicy(tmp_path)


def test_sb3_maskable_policy_trains_and_exports_the_same_actions(tmp_path):
    from sb3_contrib import MaskablePPO

    torch.manual_seed(0)
    env = _env(2, 2)
    model = MaskablePPO(make_set_policy_class(), env, n_steps=64, batch_size=32, n_epochs=1, seed=0,
                        policy_kwargs={"num_prefill": 2, "num_decode": 2, "hidden": 16}, device="cpu")
    before = [p.detach().clone() for p in model.policy.set_net.parameters()]
    model.learn(64)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.set_net.parameters(), strict=True))
    export_set(model.policy.set_net, tmp_path, ClusterConfig(), trained_on={"shapes": ["2P2D"]})
    pol = OnnxPolicy(tmp_path, backend="onnx")
    obs, _ = env.reset(seed=5)
    for _ in range(60):
        mask = env.action_masks()
        a, _ = model.predict(obs, deterministic=True, action_masks=mask)
        assert pol.act(obs, mask) == int(a)
        obs, _, done, _, _ = env.step(int(a))
        if done:
            obs, _ = env.reset()


@pytest.mark.parametrize("shape", [(2, 2), (4, 4)])
def test_router_loads_the_shape_generic_export_for_any_shape(exported, shape):
    pytest.importorskip("aiohttp")
    from deflectlab.serving.router import Router
    from deflectlab.serving.router_config import RouterConfig

    _, d = exported
    P, D = shape
    hosts = [("127.0.0.1", 9000 + i) for i in range(P + D)]
    r = Router(RouterConfig(prefill=hosts[:P], decode=hosts[P:], policy=str(d)))
    assert r.policy.generic and r.policy._checked
    if shape != (2, 2):
        with pytest.raises(PolicyFileError, match="trained for 2P2D"):
            Router(RouterConfig(prefill=hosts[:P], decode=hosts[P:], policy="experiments/trained_v1"))


def test_a_batched_v2_export_still_runs_and_re_exports_to_the_same_actions(tmp_path):
    """Format version 2 (a batched graph traced by torch, the committed exports before version 3) still loads;
    ``reexport_set`` rewrites one as version 3 with the same weights and provenance, and both graphs, the numpy
    path and the torch network pick the same actions on three shapes."""
    from deflectlab.agents.set_export import compare_exports, load_set_net, reexport_set

    src = "experiments/trained_dagger"
    old = json.loads((Path(src) / "manifest.json").read_text())
    assert old["format_version"] == 2
    man = json.loads(reexport_set(src, tmp_path).read_text())
    assert man["format_version"] == 3 and man["network"]["inputs"]["prefill"] == ["P", 6]
    for key in ("trained_on", "cluster", "slo", "feature_schema", "chunk_rule"):
        assert man[key] == old[key]
    assert man["source"]["reexported_from"]["format_version"] == 2
    assert man["source"]["run"] == old["source"]["run"]
    assert (tmp_path / "policy_set.npz").read_bytes() == (Path(src) / "policy_set.npz").read_bytes()
    assert compare_exports(src, tmp_path, n=100) == (300, 300)
    net = load_set_net(src)
    v2, v3, v3np = OnnxPolicy(src), OnnxPolicy(tmp_path), OnnxPolicy(tmp_path, backend="numpy")
    rng = np.random.default_rng(8)
    acts = set()
    for P, D in SHAPES:
        for _ in range(40):
            obs = rng.random(v2._fb.schema.size(P, D), dtype=np.float32)
            mask = rng.random(P + D) < 0.8
            mask[0] = True
            with torch.no_grad():
                a = masked_argmax(net.flat_logits(torch.as_tensor(obs[None]), P, D)[0].numpy(), mask)
            assert v2.act(obs, mask) == v3.act(obs, mask) == v3np.act(obs, mask) == a
            acts.add((P, D, a))
    assert len(acts) >= 6  # not vacuous: the network picks different nodes


def test_a_graph_that_does_not_fit_its_manifest_version_is_refused(tmp_path):
    """A version 3 manifest over a batched (version 2) graph: refused at load, naming the mismatch."""
    src = Path("experiments/trained_dagger")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["format_version"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(PolicyFileError, match="prefill input has 3 dimensions, a manifest of format version 3 needs 2"):
        OnnxPolicy(tmp_path, backend="onnx")


def test_export_cli_re_exports_an_older_set_export(tmp_path, capsys):
    from deflectlab.scripts.cli import main

    assert main(["export", "--model", "experiments/trained_dagger", "--out", str(tmp_path), "--check", "20"]) == 0
    out = capsys.readouterr().out
    assert "check: 60/60 random observations give the same action on both exports" in out
    assert json.loads((tmp_path / "manifest.json").read_text())["format_version"] == 3


def test_export_cli_names_a_fixed_shape_export_it_cannot_re_export(tmp_path, capsys):
    from deflectlab.scripts.cli import main

    assert main(["export", "--model", "experiments/trained_v1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "a fixed-shape policy (manifest format version 1) has no other format" in err
    assert not (tmp_path / "manifest.json").exists()


def test_export_cli_refuses_a_negative_check(tmp_path, capsys):
    from deflectlab.scripts.cli import main

    assert main(["export", "--model", "experiments/trained_dagger", "--out", str(tmp_path), "--check", "-1"]) == 2
    assert "--check must be >= 0 decisions, got -1" in capsys.readouterr().err
    assert not (tmp_path / "manifest.json").exists()
