"""Imitation of the lookahead planner end to end on a tiny case."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deflectlab.agents.dagger import DaggerConfig, Dataset, action_agreement, collect_episode, fit, train_dagger
from deflectlab.agents.set_export import export_set
from deflectlab.agents.setnet import SetPolicyNet
from deflectlab.envs.config import ClusterConfig
from deflectlab.envs.simulator import ClusterSim
from deflectlab.envs.workloads import make_workload
from deflectlab.policies.registry import make_policy

TINY = DaggerConfig(shapes=[(1, 1), (2, 2)], traces=["azure_code"], loads=(2.0, 2.0), window_s=20.0,
                    window_start_s=(300.0, 600.0), iterations=2, episodes_per_iteration=2, max_decisions=60,
                    horizon_s=1.0, hidden=16, epochs=40, lr=1e-2)


def test_planner_labels_are_the_planners_decisions():
    data = Dataset()
    out = collect_episode(TINY, None, 1.0, (2, 2), "azure_code", 7, data, np.random.default_rng(0))
    assert out["decisions"] == len(data) > 0 and out["agree"] == out["decisions"]  # beta = 1: the planner acts
    # replaying the labels as actions reproduces the planner's own run: labels are its decisions
    assert all(m[y] for m, y in zip(data.mask[(2, 2)], data.label[(2, 2)], strict=True))


def test_dagger_end_to_end_tiny(tmp_path):
    net, log = train_dagger(TINY, out=tmp_path)
    assert (tmp_path / "dagger_log.json").exists()
    its = log["iterations"]
    assert len(its) == 2 and its[0]["beta"] == 1.0 and its[1]["beta"] == 0.5
    assert its[1]["states"] > its[0]["states"]  # aggregated, not replaced
    assert its[1]["learner_agreement_before_fit"] is not None
    # the network fits the planner's labels better than always answering the most common label
    assert its[-1]["train_accuracy"] > its[-1]["majority_label_share"] + 0.05
    # the result exports and runs as a shape-generic policy on a shape it never saw
    export_set(net, tmp_path / "pol", ClusterConfig(), trained_on={"shapes": ["1P1D", "2P2D"]})
    wl = make_workload("azure_code", num_requests=80, arrival="poisson", rate=4.0, seed=1)
    res = ClusterSim(ClusterConfig(num_prefill=3, num_decode=3), wl).run(make_policy(f"learned:path={tmp_path/'pol'}"))
    assert res.summary["requests"] == 80


def test_fit_learns_a_rule_it_can_be_checked_against():
    # label: deflect to the decode node when the prompt feature (first request feature) is small, else prefill
    rng = np.random.default_rng(0)
    data = Dataset()
    for _ in range(400):
        obs = rng.random(3 + 6 + 11).astype(np.float32)
        data.add((1, 1), obs, np.ones(2, bool), 1 if obs[0] < 0.5 else 0)
    for weight in (0.0, 1.0):  # plain and cost-aware losses (here the regret is known only for the label)
        torch.manual_seed(0)
        net = SetPolicyNet(16)
        cfg = DaggerConfig(epochs=60, lr=1e-2, hidden=16, regret_weight=weight)
        assert fit(net, data, cfg, torch.Generator().manual_seed(0)) >= 0.95
        assert action_agreement(net, data) >= 0.95


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="shapes"):
        DaggerConfig(shapes=[(0, 2)])


def test_ppo_finetune_starts_from_the_imitation_weights():
    from deflectlab.agents.dagger import finetune_ppo

    net = SetPolicyNet(16)
    tuned, info = finetune_ppo(net, (2, 2), TINY, steps=512)
    assert info["steps"] == 512 and info["steps_per_s"] > 0
    a, b = net.state_dict(), tuned.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    # small learning rate, one update round: the policy moved, but stayed near its start
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 0.1


def test_action_regret_and_cost_aware_targets_by_hand():
    from deflectlab.agents.dagger import _targets, action_regret
    from deflectlab.envs.view import Decision

    # 1P2D: prefill(0) meets 10, deflect(0) 7, deflect(1) 10 (tie), the base's deflect(1, None) 9
    scores = [(Decision.prefill(0), (10, -3.0)), (Decision.deflect(0, 64), (7, -2.0)),
              (Decision.deflect(1, 64), (10, -2.5)), (Decision.deflect(1), (9, -1.0))]
    r = action_regret(scores, 1, 3)
    assert r.tolist() == [0.0, 3.0, 0.0]
    data = Dataset()
    data.add((1, 2), np.zeros(3 + 6 + 22, np.float32), np.ones(3, bool), 2, r)
    data.add((1, 2), np.zeros(3 + 6 + 22, np.float32), np.array([True, False, True]), 0,
             np.array([0.0, np.nan, 2.0], np.float32))
    target, w = _targets(data, (1, 2), 0.5)
    assert target.tolist() == [[0.5, 0.0, 0.5], [1.0, 0.0, 0.0]]
    assert w.tolist() == [1.0 + 0.5 * 3.0, 1.0 + 0.5 * 2.0]
    plain, w0 = _targets(data, (1, 2), 0.0)
    assert plain.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]] and w0.tolist() == [1.0, 1.0]


def test_a_heuristic_teacher_labels_by_its_own_rule():
    # the tuned length threshold as teacher: every prompt under 3,072 tokens is labelled a deflection, every
    # other one a prefill (the rule, recomputed here from the prompt length the observation encodes)
    import math

    cfg = DaggerConfig(shapes=[(2, 2)], traces=["azure_code"], loads=(1.0, 1.0), window_s=60.0,
                       window_start_s=(300.0, 600.0), iterations=1, episodes_per_iteration=1, max_decisions=150,
                       hidden=16, teacher="length_threshold:max_len=3072")
    data = Dataset()
    out = collect_episode(cfg, None, 1.0, (2, 2), "azure_code", 3, data, np.random.default_rng(0))
    assert out["decisions"] == len(data) > 50
    lengths = [round(math.expm1(float(o[0]) * math.log1p(131072))) for o in data.obs[(2, 2)]]
    deflected = [y >= 2 for y in data.label[(2, 2)]]
    assert deflected == [L < 3072 for L in lengths]
    assert 0 < sum(deflected) < len(deflected)  # both kinds occur: the check is not vacuous
    # a heuristic teacher gives no per-action regrets: only the label's own entry is known
    r = np.stack(data.regret[(2, 2)])
    assert all(r[i, y] == 0 and np.isnan(np.delete(r[i], y)).all() for i, y in enumerate(data.label[(2, 2)]))


def test_a_planner_spec_teacher_plays_the_episode_it_labels():
    """``--teacher lookahead:...`` (the planner with another base) is attached to the episode's simulation, so
    its labels are the planner's decisions there, as with the built-in planner: same base, same labels, and the
    same per-action regrets from its rollouts (for the cost-aware loss)."""
    spec = DaggerConfig(**{**TINY.__dict__, "teacher": f"lookahead:horizon_s={TINY.horizon_s},base=length_threshold,"
                                                       f"base_max_len={TINY.base_max_len}"})
    a, b = Dataset(), Dataset()
    collect_episode(spec, None, 1.0, (2, 2), "azure_code", 7, a, np.random.default_rng(0))
    collect_episode(TINY, None, 1.0, (2, 2), "azure_code", 7, b, np.random.default_rng(0))
    assert len(a) == len(b) > 0 and a.label[(2, 2)] == b.label[(2, 2)]
    ra, rb = np.stack(a.regret[(2, 2)]), np.stack(b.regret[(2, 2)])
    assert np.array_equal(ra, rb, equal_nan=True)
    assert (np.isfinite(ra).sum(axis=1) >= 2).all()  # every candidate scored, not only the label
    DaggerConfig(**{**spec.__dict__, "regret_weight": 1.0})  # so the cost-aware loss is open to a planner spec


def test_a_teacher_is_told_each_decision_that_was_not_its_own(monkeypatch):
    """With the learner acting, DAgger tells the teacher every decision that differs from the one it labelled
    (``Policy.taken``), and only those: a spy around the proactive deflector records both."""
    from deflectlab.policies import registry
    from deflectlab.policies.proactive import ProactiveDeflector

    calls, told = [], []

    class Spy(ProactiveDeflector):
        def decide(self, view, request):
            d = super().decide(view, request)
            told.append(d)
            return d

        def taken(self, view, request, decision):
            calls.append((len(told) - 1, decision))
            super().taken(view, request, decision)

    monkeypatch.setattr(registry, "make_policy", lambda spec: Spy())
    cfg = DaggerConfig(shapes=[(2, 2)], traces=["azure_code"], loads=(3.0, 3.0), window_s=60.0,
                       window_start_s=(300.0, 600.0), iterations=1, episodes_per_iteration=1, max_decisions=200,
                       hidden=8, teacher="proactive", feature_schema=3)
    torch.manual_seed(0)
    data = Dataset()
    out = collect_episode(cfg, SetPolicyNet(8, 3), 0.0, (2, 2), "azure_code", 5, data, np.random.default_rng(0))
    assert out["decisions"] == len(told) > 50
    differs = out["decisions"] - out["agree"]  # the untrained learner's actions that are not the label
    assert differs > 0 and len(calls) >= differs  # told at least of every other action (and of other caps)
    assert all(d != told[i] for i, d in calls)  # never of its own decision


def test_bad_teacher_is_named():
    with pytest.raises(ValueError, match="teacher 'no_such_policy'"):
        DaggerConfig(teacher="no_such_policy")
    with pytest.raises(ValueError, match="regret_weight needs the planner"):
        DaggerConfig(teacher="length_threshold", regret_weight=0.5)


# -- Ray labelling and starting from an exported policy (issue 12) -----------------------------------------------
def _same_data(a, b) -> None:
    assert list(a.label) == list(b.label) and len(a) == len(b) > 0
    for s in a.label:
        assert a.label[s] == b.label[s]
        np.testing.assert_array_equal(np.stack(a.obs[s]), np.stack(b.obs[s]))
        np.testing.assert_array_equal(np.stack(a.mask[s]), np.stack(b.mask[s]))


def test_an_episode_labels_the_same_states_wherever_it_runs():
    # label_episode seeds its own teacher/learner coin by (seed, episode): run alone, in any order, an episode
    # gives exactly the same labelled states (here with a learner acting half the time, so the coin matters)
    from deflectlab.agents.dagger import episode_plan, label_episode

    torch.manual_seed(3)
    w = SetPolicyNet(TINY.hidden).arrays()
    plan = episode_plan(TINY, 1)
    first = [label_episode(TINY, w, 0.5, shape, trace, seed, k) for k, shape, trace, seed in plan]
    again = [label_episode(TINY, w, 0.5, shape, trace, seed, k) for k, shape, trace, seed in reversed(plan)][::-1]
    for (d1, c1), (d2, c2) in zip(first, again, strict=True):
        _same_data(d1, d2)
        assert c1 == c2
    # with beta 1 the teacher always acts: the learner's weights change nothing (same states as no learner)
    k, shape, trace, seed = plan[0]
    _same_data(label_episode(TINY, None, 1.0, shape, trace, seed, k)[0],
               label_episode(TINY, w, 1.0, shape, trace, seed, k)[0])


def _recording(inner):
    got: list = []

    def run(cfg, weights, beta, plan):
        out = inner(cfg, weights, beta, plan)
        got.extend(out)
        return out
    return run, got


def _concat(parts) -> Dataset:
    out = Dataset()
    for d, _ in parts:
        out.extend(d)
    return out


def test_ray_labelling_gives_the_sequential_data_set():
    # one local Ray (2 CPUs) for the whole test: the same DAgger run with episodes as Ray tasks gives the same
    # labels and observations in the same order, and so the same network
    pytest.importorskip("ray")
    from deflectlab.agents import dagger as dg

    cfg = DaggerConfig(**{**TINY.__dict__, "iterations": 2, "episodes_per_iteration": 3, "epochs": 5})
    seq, seq_parts = _recording(dg._sequential)
    net_a, log_a = dg.train_dagger(cfg, labeller=seq)
    lab = dg.RayLabeller(num_cpus=2)
    try:
        ray_run, ray_parts = _recording(lab)
        net_b, log_b = dg.train_dagger(cfg, labeller=ray_run)
    finally:
        lab.close()
    assert len(seq_parts) == len(ray_parts) == 6
    _same_data(_concat(seq_parts), _concat(ray_parts))
    assert log_a["states"] == log_b["states"] == len(_concat(seq_parts))
    assert [e["episodes"] for e in log_a["iterations"]] == [e["episodes"] for e in log_b["iterations"]]
    for k, v in net_a.state_dict().items():
        assert torch.equal(v, net_b.state_dict()[k])
    it = log_b["iterations"][1]
    assert it["labelled"] == sum(e["decisions"] for e in it["episodes"]) > 0
    assert it["labelled_per_s"] == pytest.approx(it["labelled"] / it["label_wall_s"])


def test_init_starts_from_an_exported_policy_and_refuses_a_bad_folder(tmp_path):
    from deflectlab.agents.set_export import load_set_net
    from deflectlab.policies.runtime import PolicyFileError

    torch.manual_seed(5)
    net = SetPolicyNet(16)
    export_set(net, tmp_path / "pol", ClusterConfig(), trained_on={"shapes": ["2P2D"]})
    back = load_set_net(tmp_path / "pol")
    assert back.hidden == 16 and back.feature_schema == 1
    for k, v in net.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    # iterations 0: the initial network comes back unchanged; from it the learner acts from iteration 0 on
    cfg = DaggerConfig(**{**TINY.__dict__, "iterations": 0})
    same, log = train_dagger(cfg, init=back)
    assert log["iterations"] == [] and all(torch.equal(v, same.state_dict()[k]) for k, v in net.state_dict().items())
    # with iterations, the initial network acts (and is scored against the teacher) from the first iteration
    _, log = train_dagger(DaggerConfig(**{**TINY.__dict__, "iterations": 1, "episodes_per_iteration": 1}), init=back)
    assert log["iterations"][0]["learner_agreement_before_fit"] is not None
    with pytest.raises(ValueError, match="16 wide"):
        train_dagger(DaggerConfig(**{**TINY.__dict__, "hidden": 32}), init=back)
    # the shipped policy loads (64 wide, schema v1)
    kept = load_set_net("experiments/trained")
    assert (kept.hidden, kept.feature_schema) == (64, 1)
    # bad folders: missing, fixed-shape v1 export, a changed weight file
    with pytest.raises(PolicyFileError, match="not found"):
        load_set_net(tmp_path / "nope")
    with pytest.raises(PolicyFileError, match="fixed-shape"):
        load_set_net("experiments/trained_v1")
    npz = tmp_path / "pol" / "policy_set.npz"
    np.savez(npz, **{k: v[..., :1] if v.ndim else v for k, v in net.arrays().items()})
    with pytest.raises(PolicyFileError, match="SHA-256"):
        load_set_net(tmp_path / "pol")


def test_dagger_cli_init_and_ray_errors(tmp_path, monkeypatch, capsys):
    import sys

    from deflectlab.scripts.cli import main

    with pytest.raises(SystemExit, match="needs --init"):
        main(["dagger", "--out", str(tmp_path / "x"), "--iterations", "0"])
    assert main(["dagger", "--out", str(tmp_path / "x"), "--init", str(tmp_path / "none")]) == 2
    assert "exported policy not found" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    rc = main(["dagger", "--out", str(tmp_path / "y"), "--ray", "--shapes", "1x1", "--iterations", "1",
               "--episodes", "1", "--max-decisions", "5", "--window", "20"])
    assert rc == 2 and "'rl' extra" in capsys.readouterr().err


def test_ppo_value_warmup_moves_only_the_value_head():
    from deflectlab.agents.dagger import finetune_ppo

    torch.manual_seed(1)
    net = SetPolicyNet(16)
    tuned, info = finetune_ppo(net, (2, 2), TINY, steps=512, value_warmup=512, lr=1e-3)
    assert info["value_warmup"] == 512 and info["timesteps"] == 512
    a, b = net.state_dict(), tuned.state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved == {"value.weight", "value.bias"}  # the policy (every other weight) did not move
    with pytest.raises(ValueError, match="value_warmup"):
        finetune_ppo(net, (2, 2), TINY, steps=512, value_warmup=1024)
