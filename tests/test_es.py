"""Evolution-strategies fine-tuning (agents/es.py): the estimator and optimizer against closed forms, the
in-memory policy against the exported one, and a tiny run end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from deflectlab.agents.es import (
    Adam,
    EsConfig,
    Flat,
    centred_ranks,
    draw_episodes,
    es_gradient,
    play,
    score,
    train_es,
)
from deflectlab.agents.set_export import load_set_net
from deflectlab.envs.simulator import ClusterSim
from deflectlab.policies.registry import make_policy

ROOT = Path(__file__).resolve().parents[1]
KEPT = ROOT / "experiments" / "trained_dagger"  # the network the shipped ES run started from


def test_centred_ranks_by_hand():
    assert np.allclose(centred_ranks(np.array([3.0, 1.0, 2.0])), [0.5, -0.5, 0.0])
    # ties share the mean of their ranks (0 and 1 -> 0.5 -> 0.5 / 2 - 0.5)
    assert np.allclose(centred_ranks(np.array([1.0, 1.0, 2.0])), [-0.25, -0.25, 0.5])
    assert np.allclose(centred_ranks(np.array([5.0])), [0.0])


def test_es_gradient_one_pair_by_hand():
    eps = np.array([[1.0, -2.0, 0.5]])
    # the + candidate scores higher: ranks +0.5 / -0.5, g = (0.5 - -0.5) * eps / (2 * 1 * sigma)
    g = es_gradient(np.array([2.0]), np.array([1.0]), eps, sigma=0.1)
    assert np.allclose(g, eps[0] / 0.2)
    assert np.allclose(es_gradient(np.array([1.0]), np.array([2.0]), eps, sigma=0.1), -eps[0] / 0.2)
    assert np.allclose(es_gradient(np.array([1.0]), np.array([1.0]), eps, sigma=0.1), 0.0)


def test_es_gradient_points_up_a_linear_score():
    rng = np.random.default_rng(0)
    a = np.array([3.0, -1.0, 0.5, 0.0, 2.0])
    eps = rng.standard_normal((2000, 5))
    g = es_gradient((eps * 0.1) @ a, (-eps * 0.1) @ a, eps, sigma=0.1)
    cos = g @ a / np.linalg.norm(g) / np.linalg.norm(a)
    assert cos > 0.98


def test_adam_first_step_and_es_climbs_a_quadratic():
    # Adam's first step is lr * g / |g| per coordinate (bias-corrected moments equal g and g^2)
    opt = Adam(3, lr=0.01)
    assert np.allclose(opt.step(np.array([4.0, -0.001, 2.0])), [0.01, -0.01, 0.01], atol=1e-6)
    # ES + Adam on f(x) = -|x - x*|^2 from the origin: the distance to x* shrinks by more than 10x
    rng = np.random.default_rng(1)
    target = rng.standard_normal(20)
    x, opt = np.zeros(20), Adam(20, lr=0.05)
    for _ in range(300):
        eps = rng.standard_normal((8, 20))
        f = lambda y: -np.sum((y - target) ** 2, axis=-1)  # noqa: E731
        x = x + opt.step(es_gradient(f(x + 0.05 * eps), f(x - 0.05 * eps), eps, 0.05))
    assert np.linalg.norm(x - target) < 0.1 * np.linalg.norm(target)


def test_flat_round_trip_and_prefixes():
    arrays = {"a.weight": np.arange(6.0).reshape(2, 3), "a.bias": np.ones(2), "b.weight": np.zeros((1, 2))}
    f = Flat(arrays)
    v = f.vector()
    assert v.shape == (10,)
    back = f.arrays(v)
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    g = Flat(arrays, ("b.",))
    assert g.vector().shape == (2,)
    moved = g.arrays(np.array([7.0, 8.0]))
    assert np.array_equal(moved["b.weight"], [[7.0, 8.0]]) and np.array_equal(moved["a.weight"], arrays["a.weight"])
    with pytest.raises(ValueError, match="no weight's name starts with"):
        Flat(arrays, ("zzz",))


def test_score_averages_settings_then_episodes_or_requests():
    eps = [((2, 2), "t", 1.0, "trace", 1.0, 1), ((2, 2), "t", 1.0, "trace", 1.0, 2),
           ((2, 2), "t", 3.0, "trace", 1.0, 3)]
    rows = [(9, 10, 0.5), (1, 20, 1.5), (1, 2, 1.0)]
    # by requests: setting 1x 10 / 30 met, setting 3x 1 / 2; mean P95 1.0 in each
    obj, att = score(rows, eps, tie_weight=0.1, weigh="requests")
    assert att == pytest.approx((10 / 30 + 0.5) / 2) and obj == pytest.approx(att - 0.1 * 1.0)
    # by episodes: setting 1x (0.9 + 0.05) / 2, setting 3x 0.5
    obj, att = score(rows, eps, tie_weight=0.0)
    assert att == pytest.approx((0.475 + 0.5) / 2) and obj == pytest.approx(att)


def test_config_refuses_windows_that_reach_the_held_out_span():
    with pytest.raises(ValueError, match=r"training windows .* reach into the held-out block \[1200, end\) s of the "
                                         "time split"):
        EsConfig(window_s=120.0, window_start_s=(0.0, 1100.0))
    with pytest.raises(ValueError, match="validation windows .* reach into the held-out block"):
        EsConfig(window_s=120.0, window_start_s=(0.0, 600.0), validation_start_s=(700.0, 1100.0))
    assert EsConfig(window_s=120.0).window_start_s == ((0.0, 1080.0),)
    # the blocked split: training windows from its training blocks only, each inside one block
    assert EsConfig(window_s=120.0, split="blocked").window_start_s == ((0.0, 180.0), (600.0, 780.0),
                                                                       (1200.0, 1380.0))
    with pytest.raises(ValueError, match=r"held-out block \[300, 600\) s of the blocked split"):
        EsConfig(window_s=120.0, split="blocked", window_start_s=(0.0, 200.0))
    with pytest.raises(ValueError, match="unknown split 'random'"):
        EsConfig(split="random")
    with pytest.raises(ValueError, match="weigh"):
        EsConfig(weigh="bursts")
    with pytest.raises(ValueError, match="nope: unknown bundled trace name"):
        EsConfig(settings=[((2, 2), "nope", 1.0)])
    with pytest.raises(ValueError, match="unknown arrival 'bursty'"):
        EsConfig(settings=[((2, 2), "azure_code", 1.0, "bursty", 1.0)])
    with pytest.raises(ValueError, match="P, D >= 1"):
        EsConfig(settings=[((0, 2), "azure_code", 1.0)])
    with pytest.raises(ValueError, match="sigma and lr"):
        EsConfig(sigma=0.0)


@pytest.mark.parametrize("shape", [(2, 2), (3, 3)])
def test_in_memory_weights_route_as_the_exported_policy(shape):
    """``play`` with the kept policy's arrays gives the same run as the exported policy on its numpy path."""
    net = load_set_net(KEPT)
    ep = (shape, "azure_code", 3.0, "trace", 1.0, 11)
    mine = play(net.arrays(), "", net.feature_schema, [ep], 60.0, (0.0, 1080.0), "vllm-nixl")
    theirs = play(None, f"learned:path={KEPT},backend=numpy", 1, [ep], 60.0, (0.0, 1080.0), "vllm-nixl")
    assert mine == theirs and mine[0][1] > 0


def test_tiny_run_keeps_the_best_validated_weights(tmp_path):
    net = load_set_net(KEPT)
    cfg = EsConfig(settings=[((2, 2), "azure_code", 3.0)], episodes=1, window_s=30.0, window_start_s=(0.0, 500.0),
                   validation_start_s=(600.0, 1000.0), iterations=2,
                   pairs=2, sigma=0.05, lr=0.01, validate_every=1, validation_episodes=2, seed=3)
    w, log = train_es(cfg, net.arrays(), net.feature_schema, out=tmp_path, reference="round_robin")
    assert (tmp_path / "es_log.json").exists()
    assert [v["iteration"] for v in log["validations"]] == [0, 1, 2]
    assert len(log["iterations"]) == 2 and all(r["episodes_played"] == 4 for r in log["iterations"])
    best = max(log["validations"], key=lambda v: v["objective"])
    assert log["best_iteration"] == best["iteration"]
    # replaying the returned weights on the validation episodes gives the best validation score again
    val = draw_episodes(cfg, np.random.default_rng([cfg.seed, 2]), cfg.validation_episodes)
    assert [list(e) for e in val] == log["validation_episodes"]
    rows = play(w, "", net.feature_schema, val, cfg.window_s, (600.0, 1000.0), cfg.handoff)
    assert score(rows, val, cfg.tie_weight)[0] == pytest.approx(best["objective"])
    # the reference is the named policy on the same episodes
    wl_rows = play(None, "round_robin", 1, val, cfg.window_s, (600.0, 1000.0), cfg.handoff)
    assert log["reference"]["slo_attainment"] == pytest.approx(score(wl_rows, val, cfg.tie_weight)[1])
    moved = any(not np.array_equal(w[k], v) for k, v in net.arrays().items())
    assert moved == (log["best_iteration"] > 0)


def test_cli_settings_grammar():
    from deflectlab.scripts.cmd_es import parse_settings

    assert parse_settings("2x2:azure_code:3,4x4:azure_conv:1.5:gamma:2") == [
        ((2, 2), "azure_code", 3.0), ((4, 4), "azure_conv", 1.5, "gamma", 2.0)]
    for bad, msg in (("2x2:azure_code", "PxD:trace:load"), ("2x2:azure_code:x", "not a number"),
                     ("2x2:azure_code:1:gamma", "PxD:trace:load"), ("2x2:azure_code:1:gamma:x", "not a number"),
                     ("0x2:azure_code:1", "P, D >= 1")):
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            parse_settings(bad)


def test_replayed_workloads_give_fresh_runs():
    """A workload drawn once and replayed (the workers keep them) gives the run a freshly drawn one gives."""
    from deflectlab.envs.gym_env import DeflectionEnv

    ep = ((2, 2), "azure_code", 2.0, "trace", 1.0, 5)
    first = play(None, "proactive", 1, [ep], 30.0, (0.0, 1000.0), "vllm-nixl")
    again = play(None, "proactive", 1, [ep], 30.0, (0.0, 1000.0), "vllm-nixl")
    env = DeflectionEnv(trace="azure_code", load=[2.0, 2.0], window_s=30.0, window_start_s=[0.0, 1000.0],
                        cluster={"handoff": "vllm-nixl", "num_prefill": 2, "num_decode": 2})
    wl, _ = env.episode_workload(seed=5)
    s = ClusterSim(env.config, wl).run(make_policy("proactive")).summary
    fresh = (round(s["slo_attainment"] * s["requests"]), s["requests"], s["ttft_s"]["p95"] / env.config.ttft_slo_s)
    assert first == again == [fresh]


def test_es_eval_labels_training_span_and_held_out_windows(tmp_path):
    """The ES evaluation's two groups of windows are where they say: training span in [0, 1080] s, held out from
    1,200 s; the report names each row's group."""
    from deflectlab.experiments import es_eval
    from deflectlab.experiments.learned_eval import evaluate_learned

    settings = [((2, 2), "azure_code", 2.0), ((2, 2), "azure_code", 2.0, es_eval.TRAIN_SPAN)]
    res = evaluate_learned({"DAgger (ES start)": es_eval.KEPT}, settings, episodes=2, window_s=60.0)
    held = [r["start_s"] for r in res["rows"] if not r["variant"]]
    train = [r["start_s"] for r in res["rows"] if r["variant"] == "training span"]
    assert len(held) == len(train) == 2 * 4  # 2 episodes x (3 heuristics + the start network)
    assert min(held) >= 1200.0 and max(train) <= 1080.0
    md = es_eval.markdown(res, "cmd", "DAgger (ES start)")
    rows = [line for line in md.splitlines() if line.startswith("| 2P2D")]
    assert [r.split("|")[4].strip() for r in rows] == ["held out", "training span"]
    # the main job's lines on the training span: the subject's paired differences, recomputed here by hand
    import json

    from deflectlab.experiments.trained_eval import training_span_summary

    (tmp_path / "evaluation.json").write_text(json.dumps(res, default=float))
    lines = training_span_summary(tmp_path, subject="DAgger (ES start)")
    mine = sorted((r for r in res["rows"] if r["variant"] and r["policy"] == es_eval.KEPT), key=lambda r: r["seed"])
    pro = sorted((r for r in res["rows"] if r["variant"] and r["policy"] == "proactive"), key=lambda r: r["seed"])
    d = np.mean([a["slo_attainment"] - b["slo_attainment"] for a, b in zip(mine, pro, strict=True)])
    assert len(lines) == 4 and lines[-1].startswith("* 2P2D azure_code 2x: vs proactive " + f"{100 * d:+.2f} ± ")
    assert "held" not in lines[-1] and training_span_summary(tmp_path, subject="nobody") == []
    assert es_eval.parse_named("a=learned:path=x") == ("a", "learned:path=x")
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=SPEC"):
        es_eval.parse_named("learned:path")


def test_cli_from_scratch_end_to_end(tmp_path, capsys):
    """``deflectlab es --scratch``: a fresh network, one iteration, exported and loadable as a policy; the
    manifest says it had no imitation; ``--init`` and ``--scratch`` together are refused."""
    import json

    from deflectlab.scripts.cli import main

    out = tmp_path / "run"
    assert main(["es", "--scratch", "--hidden", "8", "--out", str(out), "--settings", "2x2:azure_code:3",
                 "--iterations", "1", "--pairs", "1", "--episodes", "1", "--window", "30", "--validate-every", "1",
                 "--validation-episodes", "1", "--seed", "4"]) == 0
    man = json.loads((out / "policy" / "manifest.json").read_text())
    assert man["trained_on"]["init"] == "a fresh network (no imitation)" and man["network"]["hidden"] == 8
    log = json.loads((out / "es_log.json").read_text())
    assert len(log["iterations"]) == 1 and [v["iteration"] for v in log["validations"]] == [0, 1]
    rows = play(None, f"learned:path={out / 'policy'},backend=numpy", 1, [((2, 2), "azure_code", 3.0, "trace", 1.0, 9)],
                30.0, (0.0, 1170.0), "vllm-nixl")
    assert rows[0][1] > 0
    with pytest.raises(SystemExit):
        main(["es", "--scratch", "--init", str(KEPT), "--out", str(tmp_path / "x")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_ray_runs_the_same_candidates():
    """Candidates played as Ray tasks give the run played here: same validations, same weights."""
    pytest.importorskip("ray")
    net = load_set_net(KEPT)
    cfg = EsConfig(settings=[((2, 2), "azure_code", 3.0), ((2, 2), "azure_code", 1.0)], episodes=1, window_s=30.0,
                   window_start_s=(0.0, 1000.0), iterations=1, pairs=1, validate_every=1, validation_episodes=1,
                   seed=5)
    w_seq, log_seq = train_es(cfg, net.arrays(), net.feature_schema)
    w_ray, log_ray = train_es(cfg, net.arrays(), net.feature_schema, use_ray=True, jobs=2)
    assert [v["objective"] for v in log_ray["validations"]] == [v["objective"] for v in log_seq["validations"]]
    assert all(np.array_equal(w_ray[k], w_seq[k]) for k in w_seq)


def test_progress_prints_the_chosen_metrics_and_forwards_every_step():
    import io

    from deflectlab.agents.tracking import Progress

    class Inner:
        def __init__(self):
            self.got, self.done = [], False

        def log(self, data, step=None):
            self.got.append((data, step))

        def finish(self):
            self.done = True

    out, inner = io.StringIO(), Inner()
    p = Progress("es iteration", ("es/validation_slo", "es/wall_s"), inner, out)
    p.log({"es/validation_slo": 0.91234567, "es/grad_norm": 3.0}, step=5)
    p.log({"es/grad_norm": 2.0}, step=6)  # nothing to print: forwarded only
    p.finish()
    assert out.getvalue() == "[es iteration 5] validation_slo=0.9123\n"
    assert inner.got == [({"es/validation_slo": 0.91234567, "es/grad_norm": 3.0}, 5), ({"es/grad_norm": 2.0}, 6)]
    assert inner.done
    Progress("dagger", ("x",), None, out).log({"x": 1})  # without W&B: prints only
    assert out.getvalue().endswith("[dagger] x=1\n")
