"""Training, configs, masking, sweeps and the Ray entry point: small budgets, real behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from deflectlab.agents.config import ConfigError, load_config  # noqa: E402
from deflectlab.agents.masking import ValidActionWrapper, valid_action  # noqa: E402
from deflectlab.agents.train import train  # noqa: E402
from deflectlab.envs.gym_env import DeflectionEnv  # noqa: E402
from deflectlab.envs.profile import PROFILE_DIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp: Path, **kw) -> dict:
    """A training config that runs in a few seconds."""
    cfg = {
        "name": "tiny", "algo": "maskable_ppo", "seed": 1, "total_timesteps": 512, "n_envs": 2,
        "algo_params": {"n_steps": 128, "batch_size": 64, "n_epochs": 2},
        "policy": {"net_arch": [16, 16]},
        "env": {"window_s": 40, "load": [2.0, 3.0], "window_start_s": [0, 900]},
        "eval": {"every_steps": 256, "episodes": 1, "env": {"window_start_s": [1200, None]},
                 "baselines": ["round_robin", "no_such_policy"]},
        "wandb": {"mode": "offline"},
        "out_dir": str(tmp / "runs"),
    }
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def write_yaml(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d))
    return path


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"env\.lod: unknown key"):
        load_config({"name": "x", "env": {"lod": [1, 2]}})
    with pytest.raises(ConfigError, match="algo must be one of"):
        load_config({"name": "x", "algo": "a2c"})
    with pytest.raises(ConfigError, match="name: required"):
        load_config({})
    with pytest.raises(ConfigError, match="evaluation"):
        load_config({"name": "x", "seed": 10_000})  # training seeds would reach the evaluation seeds
    cfg = load_config({"name": "x"}, ["algo_params.learning_rate=3e-4", "env.load=[1, 2]"])
    assert cfg.algo_params == {"learning_rate": 3e-4} and cfg.env.load == [1.0, 2.0]
    with pytest.raises(ValueError, match="lerning_rate"):
        train(tiny_config(tmp_path, algo_params={"lerning_rate": 1e-3}))
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_training_run_layout_and_same_seed_same_result(tmp_path):
    r1 = train(tiny_config(tmp_path))
    r2 = train(tiny_config(tmp_path))
    assert r1.run_dir != r2.run_dir and Path(r1.run_dir).name.startswith("tiny-maskable_ppo-s1-")
    assert r1.final_eval == r2.final_eval and r1.objective == r2.objective
    import torch

    from deflectlab.agents.policy_io import load_policy_net

    n1, _, _ = load_policy_net(r1.run_dir, "final")
    n2, _, _ = load_policy_net(r2.run_dir, "final")
    for (k, a), (_, b) in zip(n1.state_dict().items(), n2.state_dict().items()):
        assert torch.equal(a, b), k
    run = Path(r1.run_dir)
    for f in ("config.yaml", "config.json", "model.zip", "best_model.zip", "progress.csv", "evaluation.json",
              "evaluation.md", "evaluations.json", "result.json"):
        assert (run / f).is_file(), f
    assert load_config(run / "config.yaml").to_dict() == load_config(tiny_config(tmp_path)).to_dict()
    header = (run / "progress.csv").read_text().splitlines()[0]
    for ns in ("losses/", "charts/", "eval/", "slo/"):
        assert ns in header, ns
    rep = json.loads((run / "evaluation.json").read_text())
    assert set(rep["policies"]) == {"learned", "round_robin"} and rep["missing_baselines"] == ["no_such_policy"]
    assert list((run / "wandb").glob("offline-run-*")), "W&B should have logged offline"


def _slow_nic_profile(tmp: Path) -> str:
    """The A100 profile with a 10 MB/s NIC: a 2,000-token KV hand-off takes 6 s, so deflecting always wins."""
    doc = yaml.safe_load((PROFILE_DIR / "a100-80gb_deepseek-v2-lite.yaml").read_text())
    doc["name"] = "slow-nic"
    doc["terms"]["nic_bandwidth_Bps"] = {"value": 1.0e7, "source": "test: a very slow NIC"}
    p = tmp / "slow-nic.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def test_ppo_learns_the_known_optimal_policy(tmp_path):
    """With a 6 s KV hand-off and light load, deflecting every request is optimal; PPO finds it."""
    prof = _slow_nic_profile(tmp_path)
    env = {"cluster": {"num_prefill": 1, "num_decode": 1, "prefill_profile": prof, "decode_profile": prof,
                       "handoff": "rdma"},  # rdma: the transfer rate is the profile's (slow) NIC
           "trace": "azure_conv", "load": [0.2, 0.2], "window_s": 120, "window_start_s": [0, 1000],
           "reward": "latency"}
    cfg = tiny_config(tmp_path, algo="ppo", total_timesteps=3072, env=env,
                      algo_params={"n_steps": 256, "batch_size": 128, "n_epochs": 4, "learning_rate": 3e-3},
                      eval={"every_steps": 0, "episodes": 2, "baselines": ["round_robin", "always_deflect"]})
    res = train(cfg)
    rep = json.loads((Path(res.run_dir) / "evaluation.json").read_text())
    learned = rep["policies"]["learned"]
    assert learned["mean"]["deflection_rate"] > 0.95
    assert learned["pooled"]["ttft_p95_s"] < 0.5 * rep["policies"]["round_robin"]["pooled"]["ttft_p95_s"]
    assert res.objective >= rep["policies"]["always_deflect"]["pooled"]["slo_attainment"] - 0.02


def test_maskable_ppo_predict_honours_masks():
    from sb3_contrib import MaskablePPO

    env = DeflectionEnv(window_s=40)
    model = MaskablePPO("MlpPolicy", env, seed=0, n_steps=64, batch_size=32, policy_kwargs={"net_arch": [8]})
    rng = np.random.default_rng(0)
    for _ in range(200):
        obs = env.observation_space.sample()
        mask = rng.random(4) < 0.5
        mask[rng.integers(4)] = True
        a, _ = model.predict(obs, action_masks=mask, deterministic=bool(rng.integers(2)))
        assert mask[int(a)]


def test_dqn_invalid_actions_become_valid_ones():
    mask = np.array([True, True, False, True])
    assert valid_action(2, mask, 2) == 0 and valid_action(3, mask, 2) == 3 and valid_action(1, mask, 2) == 1
    assert valid_action(0, np.array([False, True]), 0) == 1
    env = ValidActionWrapper(DeflectionEnv(window_s=40))
    env.reset(seed=0)
    _, _, _, _, info = env.step(0)
    assert "action_replaced" not in info


def test_dqn_and_bc_pretraining_run(tmp_path):
    res = train(tiny_config(tmp_path, algo="dqn", algo_params={"learning_starts": 64, "buffer_size": 2048,
                                                               "train_freq": 4}))
    assert res.timesteps >= 512 and 0.0 <= res.objective <= 1.0
    res = train(tiny_config(tmp_path, pretrain={"expert": "always_deflect", "steps": 512, "epochs": 20}))
    csv = (Path(res.run_dir) / "progress.csv").read_text()
    assert "pretrain/agreement" in csv
    with pytest.raises(ConfigError, match="dqn"):
        load_config(tiny_config(tmp_path, algo="dqn", pretrain={"expert": "proactive"}))


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "deflectlab.scripts.cli", *args],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_train_cli_subprocess(tmp_path):
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    p = _cli("train", "--config", str(cfg), "--no-progress", "total_timesteps=256", "algo_params.n_steps=128")
    assert p.returncode == 0, p.stderr
    assert "evaluation SLO attainment" in p.stdout
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and load_config(runs[0] / "config.yaml").total_timesteps == 256
    bad = _cli("train", "--config", str(cfg), "env.lod=3")
    assert bad.returncode == 2 and "env.lod: unknown key" in bad.stderr


def test_sweep_cli_local_optuna_two_workers(tmp_path):
    base = write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path, eval={"every_steps": 0, "episodes": 1,
                                                                          "baselines": []}))
    sweep = write_yaml(tmp_path / "sweep.yaml", {
        "method": "random", "metric": {"name": "eval/slo_attainment", "goal": "maximize"},
        "parameters": {"algo_params.learning_rate": {"distribution": "log_uniform_values", "min": 1e-4,
                                                     "max": 1e-3},
                       "policy.net_arch": {"values": [[8], [16, 16]]}},
        "command": ["${env}", "deflectlab", "train", "--config", str(base), "${args_no_hyphens}"]})
    p = _cli("sweep", str(sweep), "--trials", "2", "--workers", "2", "--out-dir", str(tmp_path / "sweeps"),
             "--set", "total_timesteps=128", "--set", "algo_params.n_steps=64")
    assert p.returncode == 0, p.stderr
    (sdir,) = list((tmp_path / "sweeps").iterdir())
    res = json.loads((sdir / "sweep_result.json").read_text())
    assert res["backend"] == "optuna" and (sdir / "optuna.db").is_file()
    assert len([t for t in res["trials"] if t["state"] == "COMPLETE"]) == 2
    assert 0.0 <= res["best"]["value"] <= 1.0
    bad = write_yaml(tmp_path / "bad.yaml", {"method": "random", "metric": {"name": "eval/slo_attainment",
                                                                            "goal": "maximize"},
                                             "parameters": {"algo_params.learning_rate": {"mini": 1}}})
    p = _cli("sweep", str(bad), "--config", str(base))
    assert p.returncode == 2 and "not a valid W&B sweep" in p.stderr


def test_sweeps_package_backend(tmp_path):
    from deflectlab.agents.sweep import run_sweep

    base = write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path, eval={"every_steps": 0, "episodes": 1,
                                                                          "baselines": []}))
    sweep = write_yaml(tmp_path / "grid.yaml", {
        "method": "grid", "metric": {"name": "eval/slo_attainment", "goal": "maximize"},
        "parameters": {"policy.net_arch": {"values": [[8]]}}})
    out = run_sweep(sweep, backend="sweeps", trials=3, config=str(base), out_dir=tmp_path / "sw",
                    overrides={"total_timesteps": 128, "algo_params.n_steps": 64})
    assert out["backend"] == "sweeps" and len(out["trials"]) == 1  # the grid has one point


def _ray_tune_problem() -> str | None:
    try:
        import ray.tune  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e} (cause: {e.__cause__})"
    return None


def test_ray_two_trials_locally(tmp_path):
    # pyproject pins pyarrow < 26 so that Ray Tune imports next to sweeps' numpy < 2: it must work here
    assert _ray_tune_problem() is None, _ray_tune_problem()
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path, eval={"every_steps": 0, "episodes": 1,
                                                                         "baselines": []}))
    p = _cli("train", "--config", str(cfg), "--ray", "--ray-seeds", "0,1", "--ray-cpus", "2",
             "total_timesteps=128", "algo_params.n_steps=64", timeout=400)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["config"]["seed"] for r in rows) == [0, 1]
    assert all(0.0 <= r["slo_attainment"] <= 1.0 for r in rows)
    for r in rows:  # the seed each trial reports is the one train() ran with, and its run is named after it
        assert r["seed"] == r["config"]["seed"] and f"-s{r['seed']}-" in Path(r["run_dir"]).name
    assert p.stderr.count("ray: trial") >= 4  # a start and an end line per trial


def test_shipped_configs_and_sweeps_are_valid():
    from deflectlab.agents.sweep import base_config_of, load_sweep
    from deflectlab.agents.train import check_algo_params

    configs = sorted((REPO / "experiments").glob("train_*.yaml"))
    assert {c.name for c in configs} >= {"train_code_maskppo.yaml", "train_code_ppo.yaml", "train_code_dqn.yaml"}
    for c in configs:
        check_algo_params(load_config(c))
    for s in sorted((REPO / "experiments" / "sweeps").glob("*.yaml")):
        sweep = load_sweep(s)
        base = base_config_of(sweep)
        assert base and (REPO / base).is_file()
        sample = {k: v.get("value", (v.get("values") or [v.get("min")])[0]) for k, v in sweep["parameters"].items()}
        check_algo_params(load_config(REPO / base, sample))


def test_ray_unavailable_is_a_clear_error(tmp_path):
    if _ray_tune_problem() is None:
        pytest.skip("Ray Tune imports here; the two-trial test covers it")
    cfg = write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path))
    p = _cli("train", "--config", str(cfg), "--ray", "--ray-seeds", "0,1")
    assert p.returncode == 3 and "Ray Tune cannot be imported here" in p.stderr


# -- what long work says while it runs, and summaries that report what ran (issue 14) ----------------------------
def test_planned_timesteps_round_up_to_whole_rollouts():
    from deflectlab.agents.train import planned_timesteps, rounding_note

    cfg = load_config(tiny_config(Path("/tmp")), ["total_timesteps=300"])  # rollouts of 128 steps x 2 envs
    assert planned_timesteps(cfg) == 512
    assert rounding_note(cfg) == ("total_timesteps 300 rounds up to 512 steps: maskable_ppo collects whole "
                                  "rollouts of n_steps 128 x 2 envs")
    assert rounding_note(load_config(tiny_config(Path("/tmp")))) is None  # 512 is whole rollouts
    dqn = load_config(tiny_config(Path("/tmp"), algo="dqn", algo_params={}), ["total_timesteps=301"])
    assert planned_timesteps(dqn) == 302


def test_train_reports_the_steps_it_ran_and_shows_cloning_progress(tmp_path, capfd):
    cfg = tiny_config(tmp_path, total_timesteps=200, algo_params={"n_steps": 64, "batch_size": 64, "n_epochs": 1},
                      pretrain={"expert": "always_deflect", "steps": 256, "epochs": 3},
                      eval={"every_steps": 0, "episodes": 1, "baselines": []})
    res = train(cfg, progress=True)
    err = capfd.readouterr().err
    assert "total_timesteps 200 rounds up to 256 steps" in err
    assert res.requested_timesteps == 200 and res.timesteps == 256  # what SB3 ran: 2 rollouts of 64 x 2 envs
    assert "cloning always_deflect: demonstrations" in err and "cloning: fitting 256 decisions" in err
    assert "behaviour cloning of always_deflect: 256 decisions" in err
    assert res.pretrain_s > 0 and res.eval_s > 0 and res.learn_s > 0
    assert res.learn_s + res.pretrain_s <= res.wall_s
    assert res.steps_per_s == pytest.approx(res.timesteps / res.learn_s)  # RL steps over RL time only


def test_sweep_reports_the_values_its_trials_ran(tmp_path, capfd):
    from deflectlab.agents.sweep import run_sweep

    base = write_yaml(tmp_path / "tiny.yaml", tiny_config(
        tmp_path, eval={"every_steps": 0, "episodes": 1, "baselines": []},
        pretrain={"expert": "always_deflect", "steps": 64, "epochs": 1}))
    sweep = write_yaml(tmp_path / "grid.yaml", {
        "method": "grid", "metric": {"name": "eval/slo_attainment", "goal": "maximize"},
        "parameters": {"policy.net_arch": {"values": [[8]]}, "total_timesteps": {"value": 300000}}})
    out = run_sweep(sweep, backend="sweeps", trials=1, config=str(base), out_dir=tmp_path / "sw",
                    overrides={"total_timesteps": 128, "algo_params.n_steps": 64})
    best = out["best"]
    assert best["params"] == {"policy.net_arch": [8], "total_timesteps": 128}  # what ran, not the sweep's 300000
    assert best["overridden"] == {"total_timesteps": {"sweep": 300000, "ran": 128}} and best["timesteps"] == 128
    assert out["cloned_expert"] == "always_deflect" and out["planned_timesteps_per_trial"] == 128
    err = capfd.readouterr().err
    assert "sweep: trial 0 of 1 started" in err and "sweep: trial 0 done in" in err
    assert "after behaviour cloning of always_deflect" in err


def test_identical_seed_scores_come_from_interchangeable_prefill_nodes():
    """Why `train --ray --ray-seeds 0,1` can print one score twice: two briefly trained seeds that send every
    request to a different prefill node make different decisions, yet the nodes are interchangeable."""
    from deflectlab.agents.evaluation import evaluate
    from deflectlab.envs.view import Decision, Policy
    from deflectlab.scripts.cmd_train import tie_note

    class OneNode(Policy):
        def __init__(self, node: int) -> None:
            self.node = node

        def decide(self, view, request):
            return Decision.prefill(self.node)

    cfg = load_config(tiny_config(Path("/tmp")))
    rep = evaluate({"p0": OneNode(0), "p1": OneNode(1), "rr": "round_robin"}, cfg.eval_env_kwargs(),
                   cfg.eval_seeds()).to_json()
    p0, p1, rr = (rep["policies"][k]["pooled"] for k in ("p0", "p1", "rr"))
    assert p0 == p1  # every metric equal, though no decision is
    assert rr["ttft_p95_s"] < p0["ttft_p95_s"]  # not because the metrics ignore the policy
    note = tie_note([{"seed": 0, "slo_attainment": 0.25}, {"seed": 1, "slo_attainment": 0.25},
                     {"seed": 2, "slo_attainment": 0.5}])
    assert note and note.startswith("note: seeds 0, 1 scored exactly the same")
    assert tie_note([{"seed": 0, "slo_attainment": 0.25}, {"seed": 1, "slo_attainment": 0.5}]) is None
