"""``train(config)``: the one entry point for training, used by the CLI, sweeps and Ray Tune trials.

A run trains PPO, MaskablePPO (sb3-contrib) or DQN on vectorised :class:`envs.gym_env.DeflectionEnv` s, evaluates
the policy periodically on fixed evaluation seeds (disjoint from the training seeds; held-out trace windows when
``eval.env`` says so) against the heuristics, checkpoints, and logs to W&B and ``progress.csv``. Everything goes
in ``<out_dir>/<name>-<algo>-s<seed>-<YYYYmmdd-HHMMSS>/``:

``config.yaml``/``config.json`` (resolved config), ``progress.csv``, ``checkpoints/``, ``model.zip`` (final),
``best_model.zip`` (best periodic evaluation), ``pretrained_model.zip`` (after behaviour cloning, if any),
``evaluations.json`` (history), ``evaluation.json`` and
``evaluation.md`` (final comparison with the baselines), ``result.json`` (:class:`TrainResult`), ``wandb/``.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from deflectlab.agents.config import TrainConfig, dump_config, load_config, train_seed

ALGO_FIXED = {"self", "policy", "env", "policy_kwargs", "seed", "device", "verbose", "tensorboard_log",
              "_init_setup_model"}


@dataclass
class TrainResult:
    """What a training run produced.

    :param objective: pooled SLO attainment of the final policy on the evaluation seeds (the sweep objective).
    """

    run_dir: str
    run_name: str
    algo: str
    seed: int
    timesteps: int
    wall_s: float
    steps_per_s: float
    objective: float
    best_eval_slo_attainment: float
    final_eval: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, Any] = field(default_factory=dict)


def run_name_for(cfg: TrainConfig) -> str:
    return f"{cfg.name}-{cfg.algo}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def _make_run_dir(cfg: TrainConfig, run_dir: str | Path | None) -> tuple[str, Path]:
    if run_dir is not None:
        p = Path(run_dir)
        p.mkdir(parents=True, exist_ok=True)
        return p.name, p
    base = Path(cfg.out_dir)
    base.mkdir(parents=True, exist_ok=True)
    name = run_name_for(cfg)
    for k in range(1, 1000):
        cand = name if k == 1 else f"{name}-{k}"
        try:
            (base / cand).mkdir()
            return cand, base / cand
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory under {base}")


def make_env(env_kwargs: dict[str, Any], algo: str) -> Any:
    """One training environment (Monitor-wrapped; DQN gets :class:`agents.masking.ValidActionWrapper`)."""
    from deflectlab.agents.masking import ValidActionWrapper
    from deflectlab.envs.gym_env import DeflectionEnv
    from stable_baselines3.common.monitor import Monitor

    env: Any = DeflectionEnv(**env_kwargs)
    if algo == "dqn":
        env = ValidActionWrapper(env)
    return Monitor(env)


def make_vec_env(cfg: TrainConfig) -> Any:
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    fns: list[Any] = [partial(make_env, cfg.env.kwargs(), cfg.algo) for _ in range(cfg.n_envs)]
    if cfg.vec_env == "subproc" and cfg.n_envs > 1:
        return SubprocVecEnv(fns, start_method="forkserver")
    return DummyVecEnv(fns)


def algo_class(algo: str) -> Any:
    if algo == "maskable_ppo":
        from sb3_contrib import MaskablePPO

        return MaskablePPO
    if algo == "dqn":
        from stable_baselines3 import DQN

        return DQN
    from stable_baselines3 import PPO

    return PPO


def check_algo_params(cfg: TrainConfig) -> None:
    cls = algo_class(cfg.algo)
    known = set(inspect.signature(cls.__init__).parameters) - ALGO_FIXED
    bad = set(cfg.algo_params) - known
    if bad:
        raise ValueError(f"algo_params: unknown key(s) {sorted(bad)} for {cfg.algo}; known: {sorted(known)}")


def make_model(cfg: TrainConfig, venv: Any) -> Any:
    from deflectlab.agents.policy_io import policy_kwargs

    check_algo_params(cfg)
    return algo_class(cfg.algo)("MlpPolicy", venv, policy_kwargs=policy_kwargs(cfg), seed=cfg.seed, device="cpu",
                                verbose=0, **cfg.algo_params)


def _callbacks(cfg: TrainConfig, run_dir: Path, progress: bool) -> list[Any]:
    from deflectlab.agents.evaluation import NetPolicy, evaluate
    from deflectlab.agents.policy_io import make_policy_net
    from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback

    class EpisodeMetrics(BaseCallback):
        """``slo/`` metrics of finished training episodes, from ``info["metrics"]``."""

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", ()):
                m = info.get("metrics")
                if m:
                    rec = self.logger.record_mean
                    rec("slo/attainment", m["slo_attainment"])
                    rec("slo/ttft_attainment", m["ttft_slo_attainment"])
                    rec("slo/tbt_attainment", m["tbt_slo_attainment"])
                    rec("slo/ttft_p95_s", m["ttft_s"]["p95"])
                    rec("slo/deflection_rate", m["deflection_rate"])
                    ep = info.get("episode")
                    if ep:
                        rec("charts/episode_return", ep["r"])
                        rec("charts/episode_length", ep["l"])
            return True

    class PeriodicEval(BaseCallback):
        """Evaluate the current policy on the evaluation seeds every ``eval.every_steps`` steps."""

        def __init__(self) -> None:
            super().__init__()
            self.run_dir = run_dir
            self.history: list[dict[str, Any]] = []
            self.best = -1.0
            self.next_at = cfg.eval.every_steps if cfg.eval.every_steps > 0 else None

        def _on_step(self) -> bool:
            if self.next_at is not None and self.num_timesteps >= self.next_at:
                self.next_at += cfg.eval.every_steps
                self.run_eval()
            return True

        def run_eval(self) -> dict[str, Any]:
            net = make_policy_net(cfg)  # a snapshot of the current weights, apart from the training copy
            net.load_state_dict(self.model.policy.state_dict())
            rep = evaluate({"learned": NetPolicy(net)}, cfg.eval_env_kwargs(), cfg.eval_seeds()).to_json()
            r = rep["policies"]["learned"]
            slo = r["pooled"]["slo_attainment"]
            if slo > self.best:
                self.best = slo
                self.model.save(run_dir / "best_model.zip")
            row = {"timesteps": self.num_timesteps, **{k: v for k, v in r["pooled"].items()},
                   **{f"mean_{k}": v for k, v in r["mean"].items()}}
            self.history.append(row)
            (run_dir / "evaluations.json").write_text(json.dumps(self.history, indent=2))
            lg = self.logger
            lg.record("eval/slo_attainment", slo)
            lg.record("eval/ttft_p95_s", r["pooled"]["ttft_p95_s"])
            lg.record("eval/ttft_p50_s", r["pooled"]["ttft_p50_s"])
            lg.record("eval/ttft_slo_attainment", r["mean"]["ttft_slo_attainment"])
            lg.record("eval/tbt_slo_attainment", r["mean"]["tbt_slo_attainment"])
            lg.record("eval/deflection_rate", r["mean"]["deflection_rate"])
            lg.record("eval/best_slo_attainment", self.best)
            lg.dump(self.num_timesteps)
            return rep

    cbs: list[Any] = [EpisodeMetrics(), PeriodicEval()]
    if cfg.checkpoint_every > 0:
        cbs.append(CheckpointCallback(save_freq=max(cfg.checkpoint_every // cfg.n_envs, 1),
                                      save_path=str(run_dir / "checkpoints"), name_prefix="model"))
    if progress:
        from tqdm import tqdm

        class Progress(BaseCallback):
            def _on_training_start(self) -> None:
                self.bar = tqdm(total=cfg.total_timesteps, unit="step", desc=f"train {cfg.algo}")

            def _on_step(self) -> bool:
                self.bar.update(self.num_timesteps - self.bar.n)
                return True

            def _on_training_end(self) -> None:
                self.bar.close()

        cbs.append(Progress())
    return cbs


def _pretrain(cfg: TrainConfig, model: Any, venv: Any, periodic: Any) -> None:
    """Behaviour-clone ``cfg.pretrain.expert`` into ``model.policy`` and log how well it took."""
    from deflectlab.agents.pretrain import behaviour_clone, collect_demos

    pc = cfg.pretrain
    t0 = time.perf_counter()
    demos = collect_demos(venv, pc.expert, pc.steps)  # type: ignore[arg-type]
    stats = behaviour_clone(model.policy, demos, epochs=pc.epochs, batch_size=pc.batch_size,
                            learning_rate=pc.learning_rate, gamma=float(cfg.algo_params.get("gamma", 0.99)),
                            fit_value=pc.fit_value, seed=cfg.seed)
    for k, v in stats.items():
        model.logger.record(f"pretrain/{k}", v)
    model.logger.record("pretrain/wall_s", time.perf_counter() - t0)
    model.save(periodic.run_dir / "pretrained_model.zip")  # the cloned policy, before any RL
    periodic.init_callback(model)
    rep = periodic.run_eval()  # the cloned policy on the evaluation seeds, logged at step 0
    model.logger.record("pretrain/eval_slo_attainment", rep["policies"]["learned"]["pooled"]["slo_attainment"])


def train(config: TrainConfig | dict[str, Any] | str | Path, *, run_dir: str | Path | None = None,
          overrides: dict[str, Any] | list[str] | None = None, progress: bool = False,
          verbose: bool = False, wandb_run: Any = None) -> TrainResult:
    """Train one agent as ``config`` says and evaluate it against the baselines.

    :param config: a :class:`TrainConfig`, its mapping, or a YAML path.
    :param run_dir: write the run here instead of ``<out_dir>/<run name>``.
    :param overrides: dotted overrides applied to ``config``.
    :param progress: show a progress bar.
    :param verbose: also print SB3's log table to stdout.
    :param wandb_run: an already started W&B run to log to (a sweep agent's); by default one is started.
    """
    cfg = load_config(config, overrides)
    import torch
    from deflectlab.agents.evaluation import available_baselines, evaluate, table
    from deflectlab.agents.tracking import Namespaced, WandbWriter, init_run
    from stable_baselines3.common.logger import CSVOutputFormat, HumanOutputFormat, Logger
    from stable_baselines3.common.utils import set_random_seed
    from stable_baselines3.common.vec_env import VecNormalize

    run_name, rdir = _make_run_dir(cfg, run_dir)
    dump_config(cfg, rdir / "config.yaml")
    check_algo_params(cfg)
    eval_kwargs = cfg.eval_env_kwargs()
    baselines, missing = available_baselines(list(cfg.eval.baselines))

    # ---- seeding: torch/numpy/random from cfg.seed; training env i from train_seed(cfg.seed, i) ----
    torch.set_num_threads(cfg.torch_threads)
    set_random_seed(cfg.seed)
    venv = make_vec_env(cfg)
    if cfg.normalize_reward:
        venv = VecNormalize(venv, norm_obs=False, norm_reward=True,
                            gamma=float(cfg.algo_params.get("gamma", 0.99)))
    model = make_model(cfg, venv)
    venv.seed(train_seed(cfg.seed, 0))  # after the model, whose constructor re-seeds the envs with cfg.seed

    if wandb_run is not None:
        wb = wandb_run
        wb.config.update(cfg.to_dict(), allow_val_change=True)
    else:
        wb = init_run(cfg, run_name, rdir)
    outputs: list[Any] = [Namespaced(CSVOutputFormat(str(rdir / "progress.csv")))]
    if verbose:
        outputs.append(Namespaced(HumanOutputFormat(sys.stdout, max_length=60)))
    if wb is not None:
        outputs.append(WandbWriter(wb))
    model.set_logger(Logger(str(rdir), outputs))

    try:
        base_rep = evaluate({b: b for b in baselines}, eval_kwargs, cfg.eval_seeds()).to_json() if baselines \
            else {"policies": {}}
        for name, r in base_rep["policies"].items():
            key = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
            model.logger.record(f"eval/baseline/{key}/slo_attainment", r["pooled"]["slo_attainment"])
            model.logger.record(f"eval/baseline/{key}/ttft_p95_s", r["pooled"]["ttft_p95_s"])
        cbs = _callbacks(cfg, rdir, progress)
        t0 = time.perf_counter()
        if cfg.pretrain.expert is not None:
            _pretrain(cfg, model, venv, cbs[1])
        model.learn(total_timesteps=cfg.total_timesteps, callback=cbs, progress_bar=False)
        wall = time.perf_counter() - t0
        model.save(rdir / "model.zip")
        periodic = cbs[1]
        final = periodic.run_eval()  # also updates best_model.zip
        rep = copy.deepcopy(final)
        rep["policies"].update(base_rep["policies"])
        rep["missing_baselines"] = missing
        rep["run"] = {"name": run_name, "algo": cfg.algo, "timesteps": int(model.num_timesteps), "wall_s": wall}
        (rdir / "evaluation.json").write_text(json.dumps(rep, indent=2, default=float))
        (rdir / "evaluation.md").write_text(
            f"# Evaluation of {run_name}\n\nseeds {rep['seeds']}\n\n{table(rep)}\n")
        slo = final["policies"]["learned"]["pooled"]["slo_attainment"]
        result = TrainResult(
            run_dir=str(rdir), run_name=run_name, algo=cfg.algo, seed=cfg.seed, timesteps=int(model.num_timesteps),
            wall_s=wall, steps_per_s=model.num_timesteps / wall if wall > 0 else 0.0, objective=slo,
            best_eval_slo_attainment=periodic.best,
            final_eval=final["policies"]["learned"]["pooled"],
            baselines={k: v["pooled"] for k, v in base_rep["policies"].items()})
        (rdir / "result.json").write_text(json.dumps(asdict(result), indent=2, default=float))
        if wb is not None:
            wb.summary.update({"eval/slo_attainment": slo, "eval/best_slo_attainment": periodic.best,
                               "charts/wall_s": wall})
        return result
    finally:
        venv.close()
        if wb is not None:
            wb.finish()
