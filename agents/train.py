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
    :param timesteps: environment steps that ran (``requested_timesteps`` rounded up, see
        :func:`planned_timesteps`).
    :param wall_s: seconds from the start of behaviour cloning to the end of the final evaluation.
    :param steps_per_s: ``timesteps / learn_s``: the RL steps' own rate, without cloning and evaluations.
    :param pretrain_s: seconds of behaviour cloning (0 without it), its evaluation included.
    :param learn_s: seconds of RL rollouts and updates (periodic evaluations excluded).
    :param eval_s: seconds of every evaluation of the learned policy (periodic and final).
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
    requested_timesteps: int = 0
    pretrain_s: float = 0.0
    learn_s: float = 0.0
    eval_s: float = 0.0
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
    from stable_baselines3.common.monitor import Monitor

    from deflectlab.agents.masking import ValidActionWrapper
    from deflectlab.envs.gym_env import DeflectionEnv

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


def planned_timesteps(cfg: TrainConfig) -> int:
    """The steps ``model.learn(cfg.total_timesteps)`` will take: SB3 finishes every rollout it starts.

    PPO and MaskablePPO collect rollouts of ``n_steps x n_envs`` steps, so the count rounds up to a multiple of
    that; DQN steps every environment at once, so it rounds up to a multiple of ``n_envs``.
    """
    if cfg.algo in ("ppo", "maskable_ppo"):
        chunk = int(cfg.algo_params.get("n_steps", 2048)) * cfg.n_envs
    else:
        chunk = cfg.n_envs
    return -(-cfg.total_timesteps // chunk) * chunk


def rounding_note(cfg: TrainConfig) -> str | None:
    """Why more steps than ``total_timesteps`` will run, or None when exactly that many will."""
    planned = planned_timesteps(cfg)
    if planned == cfg.total_timesteps:
        return None
    if cfg.algo == "dqn":
        why = f"DQN steps all {cfg.n_envs} environments together"
    else:
        why = (f"{cfg.algo} collects whole rollouts of n_steps {cfg.algo_params.get('n_steps', 2048)} x "
               f"{cfg.n_envs} envs")
    return f"total_timesteps {cfg.total_timesteps} rounds up to {planned} steps: {why}"


def _callbacks(cfg: TrainConfig, run_dir: Path, progress: bool) -> list[Any]:
    from stable_baselines3.common.callbacks import CheckpointCallback

    from deflectlab.agents.callbacks import EpisodeMetrics, PeriodicEval, Progress

    cbs: list[Any] = [EpisodeMetrics(), PeriodicEval(cfg, run_dir)]
    if cfg.checkpoint_every > 0:
        cbs.append(CheckpointCallback(save_freq=max(cfg.checkpoint_every // cfg.n_envs, 1),
                                      save_path=str(run_dir / "checkpoints"), name_prefix="model"))
    if progress:
        cbs.append(Progress(planned_timesteps(cfg), f"train {cfg.algo}"))
    return cbs


def _pretrain(cfg: TrainConfig, model: Any, venv: Any, periodic: Any, progress: bool) -> float:
    """Behaviour-clone ``cfg.pretrain.expert`` into ``model.policy``, log how well it took; returns the
    seconds it took (collecting, fitting and the evaluation of the cloned policy)."""
    from deflectlab.agents.pretrain import behaviour_clone, collect_demos

    pc = cfg.pretrain
    t0 = time.perf_counter()
    demos = collect_demos(venv, pc.expert, pc.steps, progress=progress)  # type: ignore[arg-type]
    stats = behaviour_clone(model.policy, demos, epochs=pc.epochs, batch_size=pc.batch_size,
                            learning_rate=pc.learning_rate, gamma=float(cfg.algo_params.get("gamma", 0.99)),
                            fit_value=pc.fit_value, seed=cfg.seed, progress=progress)
    for k, v in stats.items():
        model.logger.record(f"pretrain/{k}", v)
    model.logger.record("pretrain/wall_s", time.perf_counter() - t0)
    model.save(periodic.run_dir / "pretrained_model.zip")  # the cloned policy, before any RL
    periodic.init_callback(model)
    rep = periodic.run_eval()  # the cloned policy on the evaluation seeds, logged at step 0
    slo = rep["policies"]["learned"]["pooled"]["slo_attainment"]
    model.logger.record("pretrain/eval_slo_attainment", slo)
    if progress:
        print(f"behaviour cloning of {pc.expert}: {int(stats['samples'])} decisions, agreement "
              f"{stats['agreement']:.1%}, cloned policy's evaluation SLO attainment {slo:.3f} "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return time.perf_counter() - t0


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
    from stable_baselines3.common.logger import CSVOutputFormat, HumanOutputFormat, Logger
    from stable_baselines3.common.utils import set_random_seed
    from stable_baselines3.common.vec_env import VecNormalize

    from deflectlab.agents.evaluation import available_baselines, evaluate, table
    from deflectlab.agents.tracking import Namespaced, WandbWriter, init_run

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
        periodic = cbs[1]
        note = rounding_note(cfg)
        if note:
            print(f"deflectlab train: note: {note}", file=sys.stderr)
        t0 = time.perf_counter()
        pretrain_s = _pretrain(cfg, model, venv, periodic, progress) if cfg.pretrain.expert is not None else 0.0
        eval_before = periodic.eval_s
        t1 = time.perf_counter()
        model.learn(total_timesteps=cfg.total_timesteps, callback=cbs, progress_bar=False)
        learn_s = time.perf_counter() - t1 - (periodic.eval_s - eval_before)  # rollouts and updates only
        model.save(rdir / "model.zip")
        final = periodic.run_eval()  # also updates best_model.zip
        wall = time.perf_counter() - t0
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
            wall_s=wall, steps_per_s=model.num_timesteps / learn_s if learn_s > 0 else 0.0, objective=slo,
            requested_timesteps=cfg.total_timesteps, pretrain_s=pretrain_s, learn_s=learn_s,
            eval_s=periodic.eval_s,
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
