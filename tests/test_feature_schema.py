"""Feature schema 2 (prefix-cache hits) through the environment, training and export; schema 1 kept loadable.

The references: observations against the feature builder of the same version on the same view, cached shares
and TTFT estimates computed by hand, the in-process networks' actions against the exported policy's (ONNX and
numpy), and the shipped schema-1 policy's routes against its own SB3 network on schema-1 features.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from deflectlab.agents.config import load_config  # noqa: E402
from deflectlab.agents.policy_io import MaskedPolicyModule  # noqa: E402
from deflectlab.agents.set_export import export_set  # noqa: E402
from deflectlab.agents.setnet import SetPolicyNet, make_set_policy_class, masked_argmax  # noqa: E402
from deflectlab.envs.config import ClusterConfig, ConfigError  # noqa: E402
from deflectlab.envs.features import (  # noqa: E402
    FEATURE_SCHEMA,
    FEATURE_SCHEMA_V2,
    FEATURE_SCHEMA_V3,
    ChunkSolver,
    FeatureBuilder,
    schema,
)
from deflectlab.envs.gym_env import DeflectionEnv, EnvConfig  # noqa: E402
from deflectlab.envs.handoff import handoff_estimate_s, parse_handoff  # noqa: E402
from deflectlab.envs.profile import load_profile  # noqa: E402
from deflectlab.envs.simulator import ClusterSim  # noqa: E402
from deflectlab.envs.view import ClusterView, Decision, DecodeNodeView, Policy, PrefillNodeView  # noqa: E402
from deflectlab.envs.workloads import Workload, load_trace, make_workload  # noqa: E402
from deflectlab.policies.registry import make_policy  # noqa: E402
from deflectlab.policies.runtime import OnnxPolicy, PolicyFileError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BT = 512  # tokens one Mooncake hash stands for
PROFILE = "a100-80gb_deepseek-v2-lite"


# -- a small Mooncake-format trace with many prefix hits -------------------------------------------------------
def _family_trace(path: Path, n: int = 300, seed: int = 0) -> Path:
    """Prompts from 5 prefix families (1-6 shared 512-token blocks, then a partial block of their own), Poisson
    arrivals at about 3 requests/s, written in the Mooncake JSONL format (timestamps in ms)."""
    rng = np.random.default_rng(seed)
    families = [[1000 * f + j for j in range(8)] for f in range(5)]
    t, uid, lines = 0.0, 100_000, []
    for _ in range(n):
        k, tail = int(rng.integers(1, 7)), int(rng.integers(1, BT))
        fam = families[int(rng.integers(len(families)))]
        lines.append(json.dumps({"timestamp": int(t), "input_length": k * BT + tail,
                                 "output_length": int(rng.integers(5, 60)), "hash_ids": fam[:k] + [uid]}))
        uid += 1
        t += float(rng.exponential(330.0))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> str:
    return str(_family_trace(tmp_path_factory.mktemp("trace") / "families.jsonl"))


def _env(trace: str, version: int, P: int = 2, D: int = 2, **kw) -> DeflectionEnv:
    return DeflectionEnv(trace=trace, load=[2.5, 2.5], window_s=40.0, cluster={"num_prefill": P, "num_decode": D},
                         feature_schema=version, **kw)


def _cols(version: int, P: int, D: int, suffix: str) -> list[int]:
    return [i for i, n in enumerate(schema(version).names(P, D)) if n.endswith(suffix)]


# -- the option ----------------------------------------------------------------------------------------------
def test_feature_schema_option_sets_the_spaces_and_names(trace):
    assert EnvConfig().feature_schema == 1  # the default: the shipped policy's schema
    for version, (fr, fp, fd) in ((1, (3, 6, 11)), (2, (3, 7, 12)), (3, (3, 10, 16)), (4, (6, 10, 16))):
        env = _env(trace, version, 2, 3)
        assert env.observation_space.shape == (fr + 2 * fp + 3 * fd,)
        lo, hi = schema(version).bounds(2, 3)
        assert np.array_equal(env.observation_space.low, lo) and np.array_equal(env.observation_space.high, hi)
        assert env.feature_names == schema(version).names(2, 3)
    assert _env(trace, 2).feature_names[3 + 6] == "prefill[0].cached"
    for bad in (5, 0, True, "2"):
        with pytest.raises(ConfigError, match="feature_schema"):
            EnvConfig(feature_schema=bad)
    with pytest.raises(ValueError, match="eval.env.feature_schema"):
        load_config({"name": "x", "env": {"feature_schema": 2}, "eval": {"env": {"feature_schema": 1}}})


def test_env_observation_is_the_builder_of_its_version_and_v2_extends_v1(trace):
    """Lock-step episodes of a schema-1 and a schema-2 env: each observation equals FeatureBuilder(version) on
    the env's own view; v2 without its cached shares and TTFT estimates is v1 without its TTFT estimates."""
    e1, e2 = _env(trace, 1), _env(trace, 2)
    o1, _ = e1.reset(seed=5)
    o2, _ = e2.reset(seed=5)
    keep1 = [i for i in range(len(o1)) if i not in _cols(1, 2, 2, ".est_ttft")]
    keep2 = [i for i in range(len(o2)) if i not in _cols(2, 2, 2, ".est_ttft") + _cols(2, 2, 2, ".cached")]
    cached = _cols(2, 2, 2, ".cached")
    hits = steps = 0
    done = False
    while not done:
        for env, obs, version in ((e1, o1, 1), (e2, o2, 2)):
            fb = FeatureBuilder(version)
            assert np.array_equal(obs, fb.build(env.current_view(), env.current_request))
            assert np.array_equal(env.action_masks(), fb.mask)
        assert np.array_equal(o1[keep1], o2[keep2])
        L = e2.current_request.input_tokens
        view = e2.current_view()
        assert o2[cached].tolist() == pytest.approx(
            [n.cached_tokens / L for n in view.prefill + view.decode], abs=1e-7)
        hits += int(o2[cached].max() > 0)
        a = steps % 4 if e2.action_masks()[steps % 4] else 0
        o1, _, d1, _, _ = e1.step(a)
        o2, _, done, _, _ = e2.step(a)
        assert d1 == done
        steps += 1
    assert steps >= 60 and hits >= steps // 4  # the trace hits often: the cached features are not all zero


def _seq(reqs: list[tuple[int, list[int]]]) -> Workload:
    """Requests 100 s apart (each finishes before the next arrives), two output tokens each."""
    return Workload(np.arange(len(reqs)) * 100.0, np.array([r[0] for r in reqs]), np.full(len(reqs), 2),
                    hash_ids=[list(r[1]) for r in reqs])


def test_v2_cached_share_is_the_hand_computed_hit():
    """Mooncake-style chained hashes, 2P2D, cache on. r0 [1,2,3,4] is prefilled on p0 and decoded on d0 (the
    least-loaded idle node): both then hold its full blocks 1, 2, 3. r1 [1,2,8,9] hits 2 blocks on p0 and d0,
    and is deflected to d1, which then holds 1, 2, 8. r2 [1,2,3,5,6] (4 full blocks; at most 4 hit) finds 3
    blocks on p0 and d0, 2 on d1, none on p1."""
    L0 = L1 = 3 * BT + 100
    L2 = 4 * BT + 10
    w = _seq([(L0, [1, 2, 3, 4]), (L1, [1, 2, 8, 9]), (L2, [1, 2, 3, 5, 6])])
    names = FEATURE_SCHEMA_V2.names(2, 2)
    want = {1: [2 * BT / L1, 0.0, 2 * BT / L1, 0.0], 2: [3 * BT / L2, 0.0, 3 * BT / L2, 2 * BT / L2]}
    env = DeflectionEnv(cluster="2p2d", feature_schema=2)
    obs, _ = env.reset(options={"workload": w})
    cached = [names.index(f"{k}.cached") for k in ("prefill[0]", "prefill[1]", "decode[0]", "decode[1]")]
    assert obs[cached].tolist() == [0.0] * 4
    obs, *_ = env.step(0)  # r0: prefill on p0
    assert obs[cached].tolist() == pytest.approx(want[1], abs=1e-7)
    obs, *_ = env.step(3)  # r1: deflect to d1
    assert obs[cached].tolist() == pytest.approx(want[2], abs=1e-7)
    # with the cache off the same episode reads no hits
    off = DeflectionEnv(cluster={"shape": "2p2d", "prefix_cache": False}, feature_schema=2)
    obs, _ = off.reset(options={"workload": w})
    for a in (0, 3):
        obs, *_ = off.step(a)
        assert obs[cached].tolist() == [0.0] * 4


def test_v2_estimates_by_hand_on_a_hand_built_view(monkeypatch):
    """The env's observation of a hand-built view is FeatureBuilder(2)'s, and its v2 features are the documented
    formulas: cached shares, T_P with L - cached_p prefilled and the preset's hand-off of the tokens the
    least-loaded decode node lacks, T_D with L - cached_d to compute."""
    prof = load_profile(PROFILE)
    L, hp, hd0, hd1 = 6000, 4096, 1024, 3072
    hand = ClusterView(
        50.0, 1.0, 0.1, 2.0, handoff=parse_handoff("vllm-nixl"),
        prefill=[PrefillNodeView(i, prof, 8192, busy_until_s=50.0, kv_free_tokens=prof.kv_capacity_tokens,
                                 cached_tokens=c) for i, c in enumerate((0, hp))],
        decode=[DecodeNodeView(j, prof, 2048, 256, batch_size=b, context_tokens=800 * b,
                               kv_free_tokens=prof.kv_capacity_tokens // 2, deflected_waiting_tokens=q,
                               step_s=s, cached_tokens=c)
                for j, (b, q, s, c) in enumerate(((4, 0, 0.03, hd0), (12, 500, 0.04, hd1)))])

    class _Req:
        rid, arrival_s, input_tokens = 7, 50.0, L

    env = DeflectionEnv(cluster="2p2d", feature_schema=2)
    env.reset(options={"workload": make_workload("azure_code", num_requests=3)})
    monkeypatch.setattr(env.sim, "view", lambda: hand)
    obs, *_ = env.step(0)
    assert np.array_equal(obs, FeatureBuilder(2).build(hand, env.current_request))
    obs = FeatureBuilder(2).build(hand, _Req())  # the same view, the hand-made prompt
    f = dict(zip(FEATURE_SCHEMA_V2.names(2, 2), obs.tolist(), strict=True))
    assert [f["prefill[0].cached"], f["prefill[1].cached"], f["decode[0].cached"], f["decode[1].cached"]] == \
        pytest.approx([0.0, hp / L, hd0 / L, hd1 / L], abs=1e-7)
    first_step = min(0.03, 0.04)  # the fastest decode node's current step
    for i, h in enumerate((0, hp)):  # idle prefill nodes: no wait; d0 is the least loaded (4 < 12 + 1)
        y = prof.prefill_s(L - h) + handoff_estimate_s(hand.handoff, prof, L - hd0, 0.0) + first_step
        assert f[f"prefill[{i}].est_ttft"] == pytest.approx(y / (y + 1.0), rel=1e-6)
    for j, (b, q, h) in enumerate(((4, 0, hd0), (12, 500, hd1))):
        chunk, step = ChunkSolver(prof, 0.1, 2048).solve(b, 800 * b, L)
        t = math.ceil((q + L - h) / chunk) * step
        assert f[f"decode[{j}].est_ttft"] == pytest.approx(t / (t + 1.0), rel=1e-6)
    assert f["prefill[1].est_ttft"] < f["prefill[0].est_ttft"]  # the hit shortens the estimate


# -- the shape-generic network: train, export, run ---------------------------------------------------------------
TIE = 1e-4  # logits closer than this are a tie: float rounding differs between torch, ONNX and numpy


def _agrees(action: int, logits: np.ndarray, mask: np.ndarray) -> tuple[bool, bool]:
    """``(ok, clear)``: ``action`` is valid and its logit is the best valid one up to :data:`TIE`; and no other
    valid action is within :data:`TIE` of the best (the decision is not a tie)."""
    valid = np.where(mask, logits, -np.inf)
    best = valid.max()
    return bool(mask[action] and valid[action] >= best - TIE), int((valid >= best - TIE).sum()) == 1


class _Watch(Policy):
    """Runs ``policy`` in a simulation and checks each decision against ``logits(obs, P, D)`` on the features
    an independent ``FeatureBuilder(version)`` builds from the same view: the chosen node's logit is the best
    valid one (ties allowed), and a deflection's chunk cap is the builder's."""

    name = "watch"

    def __init__(self, policy: Policy, logits, version: int) -> None:
        self.policy, self.logits, self.fb = policy, logits, FeatureBuilder(version)
        self.decisions = self.clear = 0

    def decide(self, view, request) -> Decision:
        obs = self.fb.build(view, request)
        d = self.policy.decide(view, request)
        a = view.num_prefill + d.decode_node if d.deflected else d.prefill_node
        ok, clear = _agrees(a, self.logits(obs, view.num_prefill, view.num_decode), self.fb.mask)
        assert ok, f"decision {d} is not the network's best on v{self.fb.version} features"
        if d.deflected:
            assert d.chunk_cap == self.fb.decision(a).chunk_cap
        self.decisions += 1
        self.clear += clear
        return d


def _set_logits(net: SetPolicyNet):
    def f(obs, P, D):
        with torch.no_grad():
            return net.flat_logits(torch.as_tensor(obs[None]), P, D)[0].numpy()
    return f


def _mlp_logits(net):
    mod = MaskedPolicyModule(net).eval()

    def f(obs, P, D):
        with torch.no_grad():
            return mod(torch.as_tensor(obs[None]), torch.ones(1, P + D, dtype=torch.bool))[1][0].numpy()
    return f


@pytest.fixture(scope="module")
def set_v2(trace, tmp_path_factory):
    """A schema-2 set network trained a few MaskablePPO steps on the hit-rich trace, exported."""
    from sb3_contrib import MaskablePPO

    torch.manual_seed(0)
    env = _env(trace, 2)
    model = MaskablePPO(make_set_policy_class(), env, n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu",
                        policy_kwargs={"num_prefill": 2, "num_decode": 2, "hidden": 16, "feature_schema": 2})
    before = [p.detach().clone() for p in model.policy.set_net.parameters()]
    model.learn(64)
    net = model.policy.set_net.eval()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    with torch.no_grad():  # larger weights than a few steps give, so the scores differ clearly between nodes
        for p in net.parameters():
            p.mul_(3.0)
    d = tmp_path_factory.mktemp("set_v2")
    export_set(net, d, ClusterConfig(), trained_on={"shapes": ["2P2D"], "traces": ["families"]})
    return net, d


def test_set_v2_export_records_the_schema(set_v2):
    net, d = set_v2
    man = json.loads((d / "manifest.json").read_text())
    assert net.feature_schema == 2 and man["format_version"] == 3
    assert man["feature_schema"]["version"] == 2
    assert [s["name"] for s in man["feature_schema"]["prefill"]] == [s.name for s in FEATURE_SCHEMA_V2.prefill]
    assert man["network"]["inputs"]["prefill"] == ["P", 7]
    assert man["network"]["inputs"]["decode"] == ["D", 12]
    pol = OnnxPolicy(d)
    assert pol.generic and pol._fb.version == 2


@pytest.mark.parametrize("shape", [(2, 2), (3, 3)])
def test_set_v2_same_actions_in_process_onnx_and_numpy(set_v2, trace, shape):
    net, d = set_v2
    onnx_pol, np_pol = OnnxPolicy(d, backend="onnx"), OnnxPolicy(d, backend="numpy")
    env = _env(trace, 2, *shape)
    obs, _ = env.reset(seed=11)
    acts, hits = [], 0
    cached = _cols(2, *shape, ".cached")
    clear = 0
    logits = _set_logits(net)
    for _ in range(120):
        mask = env.action_masks()
        lg = logits(obs, *shape)
        a = masked_argmax(lg, mask)
        for b in (onnx_pol.act(obs, mask), np_pol.act(obs, mask)):
            ok, c = _agrees(b, lg, mask)
            assert ok and (b == a or not c)
        clear += c
        acts.append(a)
        hits += int(obs[cached].max() > 0)
        obs, _, done, _, _ = env.step(a)
        if done:
            obs, _ = env.reset()
    # not vacuous: different nodes picked, most decisions not ties, cache hits seen
    assert len(set(acts)) >= 2 and clear >= 50 and hits >= 50
    # through the runtime's own features (decide), on a simulation with the cache on
    wl = make_workload(load_trace(trace), num_requests=150, rate=8.0)
    for backend in ("onnx", "numpy"):
        sim = ClusterSim(ClusterConfig(num_prefill=shape[0], num_decode=shape[1]), wl)
        w = _Watch(make_policy(f"learned:path={d},backend={backend}"), logits, 2)
        sim.run(w)
        assert w.decisions == 150 and w.clear >= 60
        assert sum(r.p_cached + r.d_cached > 0 for r in sim.requests) >= 60


def test_set_policy_refuses_a_schema_other_than_the_envs(trace):
    from sb3_contrib import MaskablePPO

    with pytest.raises(ValueError, match="feature schema 1"):
        MaskablePPO(make_set_policy_class(), _env(trace, 2), n_steps=64, device="cpu",
                    policy_kwargs={"num_prefill": 2, "num_decode": 2, "hidden": 8})


# -- schema 3: the proactive deflector's own estimates ----------------------------------------------------------
class _RuleOnV3(Policy):
    """The proactive rule read off schema-3 observations alone (argmin ``path_ttft`` per side, deflect when the best
    decode path beats ``(1 - margin)`` x the best prefill path), acting through the builder's ``decision``."""

    name = "rule_on_v3"

    def __init__(self, margin: float) -> None:
        self.fb, self.margin, self.infeasible = FeatureBuilder(3), margin, 0

    def reset(self, seed=None) -> None:
        self.fb.reset()

    def decide(self, view, request):
        obs = self.fb.build(view, request).astype(np.float64)
        f = dict(zip(FEATURE_SCHEMA_V3.names(view.num_prefill, view.num_decode), obs, strict=True))
        P, D = view.num_prefill, view.num_decode
        unsq = [f[f"prefill[{i}].path_ttft"] for i in range(P)]
        t_p = [y / (1.0 - y) for y in unsq]  # squash x / (x + 1) inverted: seconds over the 1-s SLO
        dec = [(f[f"decode[{j}].path_ttft"], f[f"decode[{j}].path_chunk"]) for j in range(D)]
        for y, c in dec:  # infeasible: 1.0 and no chunk, together
            assert (y == 1.0) == (c == 0.0)
            self.infeasible += c == 0.0
        t_d = [y / (1.0 - y) if c > 0 else math.inf for y, c in dec]
        bp = min(range(P), key=lambda i: (t_p[i], i))
        bd = min(range(D), key=lambda j: (t_d[j], j))
        # the side's best is flagged; the ratio to the other side's best is the estimates' (up to float32)
        assert [f[f"prefill[{i}].path_best"] for i in range(P)] == [float(i == bp) for i in range(P)]
        assert [f[f"decode[{j}].path_best"] for j in range(D)] == [float(j == bd and t_d[j] < math.inf)
                                                                   for j in range(D)]
        if t_d[bd] < math.inf:
            r = t_d[bd] / t_p[bp]
            assert f[f"decode[{bd}].path_vs_other"] == pytest.approx(r / (r + 1.0), abs=1e-5)
            r = t_p[bp] / t_d[bd]
            assert f[f"prefill[{bp}].path_vs_other"] == pytest.approx(r / (r + 1.0), abs=1e-5)
        if t_d[bd] < math.inf and t_d[bd] < (1.0 - self.margin) * t_p[bp]:
            return self.fb.decision(P + bd)
        return self.fb.decision(bp)


@pytest.mark.parametrize("margin", [0.0, 0.2])
def test_v3_features_carry_the_proactive_deflector_so_its_rule_replays_it_exactly(margin):
    """The proactive rule applied to schema-3 features alone, deflecting with the builder's chunk caps, runs the
    same simulation as ProactiveDeflector(min_chunk=1024) itself (schema 3's estimator settings): same TTFTs and
    TBTs per request. That takes the estimates, the first decode step, the chunk caps and the tracked deflections
    (lanes) all to be the policy's."""
    wl = make_workload("azure_code", rate=8.0, num_requests=600)
    rule = _RuleOnV3(margin)
    a = ClusterSim(ClusterConfig(), wl).run(rule)
    b = ClusterSim(ClusterConfig(), wl).run(make_policy(f"proactive:margin={margin},min_chunk=1024"))
    assert 0.2 < a.summary["deflection_rate"] < 0.95  # both paths taken
    assert rule.infeasible > 0  # some deflect paths were infeasible and read so
    for k in ("ttft_s", "tbt_s", "deflection_rate", "slo_attainment"):
        assert a.summary[k] == b.summary[k], k
    # a second run of the same policy object starts afresh (reset forgets the tracked deflections)
    assert ClusterSim(ClusterConfig(), wl).run(rule).summary["ttft_s"] == a.summary["ttft_s"]


def test_dagger_trains_and_exports_schema_3(trace, tmp_path):
    from deflectlab.agents.dagger import DaggerConfig, train_dagger

    cfg = DaggerConfig(shapes=[(2, 2)], traces=[trace], loads=(1.0, 1.0), window_s=20.0, window_start_s=(0.0, 40.0),
                       iterations=1, episodes_per_iteration=1, max_decisions=30, hidden=8, epochs=2,
                       feature_schema=3, teacher="proactive:margin=0.2")
    net, log = train_dagger(cfg)
    assert net.feature_schema == 3 and log["states"] > 0
    export_set(net, tmp_path, ClusterConfig(), trained_on={"shapes": ["2P2D"]})
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["feature_schema"]["version"] == 3
    assert [s["name"] for s in man["feature_schema"]["decode"]][-4:] == ["path_ttft", "path_chunk", "path_best",
                                                                          "path_vs_other"]
    pol = OnnxPolicy(tmp_path, backend="numpy")
    res = ClusterSim(ClusterConfig.from_shape("3p3d"), make_workload("azure_code", rate=6.0, num_requests=200)
                     ).run(pol)
    assert res.summary["completed"] == 200


def test_dagger_trains_and_exports_schema_2(trace, tmp_path):
    from deflectlab.agents.dagger import DaggerConfig, train_dagger

    cfg = DaggerConfig(shapes=[(2, 2)], traces=[trace], loads=(1.0, 1.0), window_s=20.0, window_start_s=(0.0, 40.0),
                       iterations=1, episodes_per_iteration=1, max_decisions=30, horizon_s=0.5, hidden=8, epochs=2,
                       feature_schema=2)
    net, log = train_dagger(cfg)
    assert net.feature_schema == 2 and log["states"] > 0
    export_set(net, tmp_path, ClusterConfig(), trained_on={"shapes": ["2P2D"]})
    assert json.loads((tmp_path / "manifest.json").read_text())["feature_schema"]["version"] == 2
    with pytest.raises(ValueError, match="feature_schema"):
        DaggerConfig(feature_schema=5)


# -- the fixed-shape network: train, export, run -----------------------------------------------------------------
def test_fixed_shape_v2_train_export_same_actions(trace, tmp_path):
    from deflectlab.agents.export import export
    from deflectlab.agents.policy_io import load_policy_net, masked_action
    from deflectlab.agents.train import train

    res = train({"name": "v2", "algo": "maskable_ppo", "seed": 1, "total_timesteps": 128, "n_envs": 1,
                 "algo_params": {"n_steps": 128, "batch_size": 64, "n_epochs": 1},
                 "policy": {"net_arch": [16, 16]}, "env": {"trace": trace, "window_s": 40, "load": [1, 1],
                                                           "feature_schema": 2},
                 "eval": {"every_steps": 0, "episodes": 1, "baselines": []}, "wandb": {"enabled": False},
                 "out_dir": str(tmp_path / "runs")})
    d = export(res.run_dir, tmp_path / "exported").parent
    man = json.loads((d / "manifest.json").read_text())
    assert man["feature_schema"]["version"] == 2 and man["feature_schema"]["names"] == FEATURE_SCHEMA_V2.names(2, 2)
    net, cfg, _ = load_policy_net(res.run_dir)
    assert cfg.env.feature_schema == 2
    onnx_pol, np_pol = OnnxPolicy(d, backend="onnx"), OnnxPolicy(d, backend="numpy")
    assert onnx_pol._fb.version == np_pol._fb.version == 2 and onnx_pol.num_obs == 3 + 7 * 2 + 12 * 2
    mod = MaskedPolicyModule(net).eval()
    env = _env(trace, 2)
    obs, _ = env.reset(seed=2)
    for _ in range(100):
        mask = env.action_masks()
        a = masked_action(net, obs, mask)
        with torch.no_grad():
            want = mod(torch.as_tensor(obs[None]), torch.as_tensor(mask[None]))[1].numpy()
        for b in (onnx_pol.act(obs, mask), np_pol.act(obs, mask)):
            ok, clear = _agrees(b, want[0], mask)
            assert ok and (b == a or not clear)
        got = onnx_pol._sess.run(None, {"obs": obs[None], "action_mask": mask[None]})[1]
        assert np.allclose(got, want, atol=1e-5)  # the logits themselves, not only their argmax
        obs, _, done, _, _ = env.step(a)
        if done:
            obs, _ = env.reset()
    wl = make_workload(load_trace(trace), num_requests=150, rate=8.0)
    w = _Watch(make_policy(f"learned:path={d}"), _mlp_logits(net), 2)
    ClusterSim(ClusterConfig(), wl).run(w)
    assert w.decisions == 150 and w.clear >= 100


# -- schema 1 kept; unknown versions refused ---------------------------------------------------------------------
def test_the_v1_policy_still_routes_as_its_network_on_v1_features(trace):
    """On a trace with prefix hits (where v2 features differ from v1), the fixed-shape v1 policy
    (experiments/trained_v1), through the runtime,
    routes every request as its own SB3 network does on schema-1 features."""
    from deflectlab.agents.policy_io import load_policy_net

    kept = REPO / "experiments" / "trained_v1"
    man = json.loads((kept / "manifest.json").read_text())
    assert man["format_version"] == 1 and man["feature_schema"]["version"] == 1
    net, cfg, _ = load_policy_net(kept / "sb3_model.zip")
    assert cfg.env.feature_schema == 1  # its config predates the option: the default
    wl = make_workload(load_trace(trace), num_requests=200, rate=6.0, arrival="poisson", seed=3)
    for backend in ("onnx", "numpy"):
        pol = make_policy(f"learned:path={kept},backend={backend}")
        assert pol._fb.version == 1
        sim = ClusterSim(ClusterConfig(), wl)
        w = _Watch(pol, _mlp_logits(net), 1)
        sim.run(w)
        assert w.decisions == 200 and w.clear == 200
        assert sum(r.p_cached + r.d_cached > 0 for r in sim.requests) >= 20  # hits: v2 would read differently
        assert len({r.deflected for r in sim.requests}) == 2  # it both prefills and deflects here


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _set_manifest(d: Path, **changes) -> None:
    man = json.loads((d / "manifest.json").read_text())
    man["feature_schema"].update(changes)
    (d / "manifest.json").write_text(json.dumps(man))


def test_unknown_or_mismatched_schema_versions_are_refused(set_v2, tmp_path):
    _, d2 = set_v2
    msg = r"trained on features deflectlab.features v7, this code builds deflectlab.features v1, v2"
    fixed = _copy(REPO / "experiments" / "trained_v1", tmp_path / "fixed")
    _set_manifest(fixed, version=7)
    with pytest.raises(PolicyFileError, match=msg):
        OnnxPolicy(fixed)
    generic = _copy(d2, tmp_path / "generic")
    _set_manifest(generic, version=7)
    with pytest.raises(PolicyFileError, match=msg):
        OnnxPolicy(generic)
    for odd in ([2], "2", True, None):  # not a version number at all: the same clear refusal
        _set_manifest(generic, version=odd)
        with pytest.raises(PolicyFileError, match="this code builds deflectlab.features v1, v2"):
            OnnxPolicy(generic)
    # a v2 network whose manifest claims v1: v1's block list is not the manifest's
    claims_v1 = _copy(d2, tmp_path / "claims_v1")
    _set_manifest(claims_v1, version=1)
    with pytest.raises(PolicyFileError, match="prefill block's features differ from deflectlab.features v1"):
        OnnxPolicy(claims_v1)
    # a v1 network relabelled as v2 throughout the manifest: its weights' input sizes give it away
    torch.manual_seed(0)
    v1dir = tmp_path / "v1net"
    export_set(SetPolicyNet(8), v1dir, ClusterConfig(), trained_on={})
    man = json.loads((v1dir / "manifest.json").read_text())
    man["feature_schema"] = FEATURE_SCHEMA_V2.to_dict()
    (v1dir / "manifest.json").write_text(json.dumps(man))
    for backend in ("onnx", "numpy"):
        with pytest.raises(PolicyFileError, match=r"blocks of \[3, 6, 11\] features, the manifest's feature schema "
                                                  r"v2 has \[3, 7, 12\]"):
            OnnxPolicy(v1dir, backend=backend)
    assert dataclasses.replace(FEATURE_SCHEMA, version=1) == FEATURE_SCHEMA  # v1 itself is unchanged


def test_train_and_dagger_take_feature_schema_flags(tmp_path):
    from deflectlab.scripts.cli import build_parser, parse
    from deflectlab.scripts.cmd_train import _overrides

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("name: x\n")
    a = parse(build_parser("train"), "train", ["train", "--config", str(cfg_path), "--feature-schema", "2"])
    assert load_config(str(cfg_path), _overrides(a)).env.feature_schema == 2
    a = parse(build_parser("train"), "train", ["train", "--config", str(cfg_path)])
    assert load_config(str(cfg_path), _overrides(a)).env.feature_schema == 1
    a = parse(build_parser("dagger"), "dagger", ["dagger", "--feature-schema", "2"])
    assert a.feature_schema == 2
    for cmd in ("train", "dagger"):
        with pytest.raises(SystemExit):
            parse(build_parser(cmd), cmd, [cmd, "--config", "x", "--feature-schema", "5"])


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_two_way_actions_read_est_ttft_in_either_schema(version):
    """The two-way action space finds each node's TTFT estimate column in the schema the env builds."""
    from deflectlab.envs.actions import TwoWay, est_ttft_columns

    names = schema(version).names(2, 3)
    p_cols, d_cols = est_ttft_columns(2, 3, version)
    key = "path_ttft" if version >= 3 else "est_ttft"  # schema 3 on: the proactive deflector's own estimate
    assert [names[c] for c in p_cols] == [f"prefill[0].{key}", f"prefill[1].{key}"]
    assert [names[c] for c in d_cols] == [f"decode[{j}].{key}" for j in range(3)]
    obs = np.zeros(len(names), np.float32)
    obs[d_cols] = [0.9, 0.2, 0.4]
    obs[p_cols] = [0.7, 0.3]
    tw = TwoWay(2, 3, version)
    mask = np.ones(5, bool)
    assert tw.node_action(1, obs, mask) == 2 + 1 and tw.node_action(0, obs, mask) == 1
    mask[3] = False  # decode node 1 has no room: the next lowest valid one
    assert tw.node_action(1, obs, mask) == 2 + 2


def test_schema_4_reads_the_recent_arrivals_the_simulator_and_the_router_both_count():
    """Schema 4's request block: requests and prompt tokens of the last second and prompt tokens per second over
    the last 10 s, counted here by hand from the workload's arrivals; the router's history, fed the same arrivals,
    gives the same counts; schema 4 is schema 3 with these three columns inserted after the request block."""
    from deflectlab.envs.config import ClusterConfig
    from deflectlab.envs.simulator import ClusterSim
    from deflectlab.envs.workloads import make_workload
    from deflectlab.serving.load_view import RecentArrivals

    wl = make_workload("azure_code", start_s=300, num_requests=400, arrival="trace", rate=8.0)
    sim = ClusterSim(ClusterConfig(), wl)
    b3, b4, hist = FeatureBuilder(3), FeatureBuilder(4), RecentArrivals()
    t_all, l_all = [float(x) for x in wl.arrival_s], [int(x) for x in wl.input_tokens]
    pol = make_policy("proactive")
    checked = 0
    while (r := sim.advance()) is not None:
        view = sim.view()
        hist.arrival(view.now_s, r.input_tokens)
        k = len(sim.requests)  # arrivals so far, this one included
        for w in (1.0, 10.0):
            mine = [j for j in range(k) if t_all[j] > view.now_s - w]
            assert view.recent_arrivals(w) == hist(w) == (len(mine), sum(l_all[j] for j in mine))
        o3, o4 = b3.build(view, r), b4.build(view, r)
        n1, k1 = view.recent_arrivals(1.0)
        k10 = view.recent_arrivals(10.0)[1] / 10.0
        assert o4[3:6] == pytest.approx([n1 / (n1 + 4.0), k1 / (k1 + 16384.0), k10 / (k10 + 16384.0)])
        assert np.array_equal(np.delete(o4, [3, 4, 5]), o3)
        checked += n1 > 1
        sim.route(r, pol.decide(view, r))
    assert checked > 20  # bursts: several arrivals within a second, so the counts are not all one
    with pytest.raises(ValueError, match="window_s must be in"):
        sim.view().recent_arrivals(11.0)


def test_a_learned_policy_told_the_decision_taken_tracks_it_like_a_builder_that_took_it():
    """A schema-3 learned policy (random set network) in a run where another policy often decides: after
    ``taken`` its estimator tracks exactly the deflections a builder fed the actual decisions tracks, so its
    features follow the episode as it ran (DAgger with a learned teacher)."""
    import torch

    from deflectlab.agents.setnet import SetPolicyNet
    from deflectlab.envs.config import ClusterConfig
    from deflectlab.envs.simulator import ClusterSim
    from deflectlab.envs.workloads import make_workload
    from deflectlab.policies.runtime import SetArraysPolicy

    torch.manual_seed(3)
    pol = SetArraysPolicy(SetPolicyNet(16, 3).arrays(), 3)
    pol.reset()
    ref = FeatureBuilder(3)
    sim = ClusterSim(ClusterConfig(), make_workload("azure_code", start_s=300, num_requests=250, rate=6.0))
    lanes = lambda b: [[(ln.cap, ln.L, ln.rem) for ln in n.lanes] for n in b._est._nodes]  # noqa: E731
    told = k = 0
    while (r := sim.advance()) is not None:
        view = sim.view()
        mine = pol.decide(view, r)
        ref.build(view, r)
        mask = ref.mask
        # every third request the policy's own choice, otherwise the first valid deflection (or prefill on 0)
        action = next((2 + j for j in range(2) if mask[2 + j]), 0) if k % 3 else None
        actual = ref.decision(action) if action is not None else None
        if actual is None:  # the policy's own: the reference records the same action
            a = (mine.decode_node + 2) if mine.deflected else mine.prefill_node
            actual = ref.decision(a)
            assert actual == mine
        elif actual != mine:
            pol.taken(view, r, actual)
            pol.taken(view, r, actual)  # a second call replaces the first (no double count)
            told += 1
        sim.route(r, actual)
        assert lanes(pol._fb) == lanes(ref)
        k += 1
    assert told > 50 and any(lanes(ref))  # the check is not vacuous: decisions differed and lanes were kept
