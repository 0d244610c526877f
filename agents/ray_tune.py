"""Scale-out: the same :func:`agents.train.train` as Ray Tune trials, locally or on an existing Ray cluster.

``run_ray(config, seeds=[0, 1])`` runs one trial per seed (a grid), optionally times ``num_samples`` draws from a
W&B sweep file's search space (translated to ``tune.choice`` / ``tune.uniform`` / ``tune.loguniform``). Without
``address`` Ray starts a local instance with no cluster (``ray.init(num_cpus=...)``); with ``address`` (e.g.
``ray://head:10001`` or ``auto``) it joins that cluster, and every trial runs ``train`` on whichever node Ray
places it. Each trial writes its run directory as usual under ``out_dir`` (absolute, so it is the same path on
every node of a cluster with a shared file system) and reports the run's objective (``slo_attainment``) to Tune.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from deflectlab.agents.config import load_config


class RayUnavailable(RuntimeError):
    """Ray (Tune) is not usable in this Python environment; the message says why."""


def _tune_space(sweep: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for k, spec in sweep.get("parameters", {}).items():
        if "value" in spec:
            space[k] = spec["value"]
        elif "values" in spec:
            space[k] = tune.choice(list(spec["values"]))
        else:
            dist = spec.get("distribution", "uniform")
            lo, hi = spec["min"], spec["max"]
            if dist == "int_uniform":
                space[k] = tune.randint(int(lo), int(hi) + 1)
            elif dist == "log_uniform_values":
                space[k] = tune.loguniform(float(lo), float(hi))
            elif dist == "log_uniform":
                space[k] = tune.loguniform(math.exp(lo), math.exp(hi))
            elif dist in ("uniform", "q_uniform"):
                space[k] = tune.uniform(float(lo), float(hi))
            else:
                raise ValueError(f"sweep parameter {k!r}: distribution {dist!r} has no Ray Tune translation")
    return space


def _trial(params: dict[str, Any], base: dict[str, Any], out_dir: str) -> None:
    """One Ray Tune trial: ``train`` with the trial's parameters as dotted overrides."""
    from ray import tune

    from deflectlab.agents.train import train

    os.environ["WANDB_MODE"] = os.environ.get("WANDB_MODE") or "offline"
    overrides = {**params, "out_dir": out_dir}
    res = train(base, overrides=overrides)
    tune.report({"slo_attainment": res.objective, "best_slo_attainment": res.best_eval_slo_attainment,
                 "timesteps": res.timesteps, "wall_s": res.wall_s, "run_dir": res.run_dir, "seed": res.seed,
                 "deflection_rate": res.final_eval.get("deflection_rate"),
                 "ttft_p95_s": res.final_eval.get("ttft_p95_s")})


#: what each trial row carries from the trial's report (the seed is the one ``train`` ran with)
REPORTED = ("seed", "slo_attainment", "best_slo_attainment", "ttft_p95_s", "deflection_rate", "timesteps", "wall_s",
            "run_dir")


def _progress_callback(total: int) -> Any:
    """A Ray Tune callback that prints one stderr line when a trial starts and when it ends."""
    import sys
    import time

    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self) -> None:
            self.t0: dict[str, float] = {}
            self.done = 0

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.t0[trial.trial_id] = time.perf_counter()
            print(f"ray: trial {trial.trial_id} started, config {trial.config}", file=sys.stderr, flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            r = trial.last_result or {}
            took = time.perf_counter() - self.t0.get(trial.trial_id, time.perf_counter())
            print(f"ray: trial {trial.trial_id} done ({self.done}/{total}) in {took:.0f} s: seed {r.get('seed')}, "
                  f"SLO attainment {r.get('slo_attainment')}, {r.get('timesteps')} steps", file=sys.stderr,
                  flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"ray: trial {trial.trial_id} FAILED", file=sys.stderr, flush=True)

    return TrialLines()


def run_ray(config: str | Path | dict[str, Any], *, seeds: list[int] | None = None, sweep: str | Path | None = None,
            num_samples: int = 1, address: str | None = None, out_dir: str | Path | None = None,
            cpus_per_trial: float = 1.0, num_cpus: int | None = None,
            overrides: dict[str, Any] | list[str] | None = None) -> list[dict[str, Any]]:
    """Run training trials with Ray Tune; returns one row per trial (its parameters and reported metrics).

    :param config: base training config (YAML path or mapping).
    :param seeds: one trial per seed (grid); default the config's seed.
    :param sweep: optional W&B sweep file whose search space Tune samples ``num_samples`` times per seed.
    :param num_samples: samples of the search space.
    :param address: an existing Ray cluster (``auto``, ``ray://host:10001``); None starts Ray locally.
    :param out_dir: where runs go (default: the config's ``out_dir``), made absolute.
    :param cpus_per_trial: CPUs Ray reserves per trial.
    :param num_cpus: CPUs of a local Ray instance (default: all).
    :param overrides: dotted overrides applied to every trial.
    """
    try:
        import ray
        from ray import tune
    except ImportError as e:  # e.g. pyarrow built for NumPy 2 next to NumPy 1.x: Ray cannot serialise anything
        raise RayUnavailable(f"Ray Tune cannot be imported here: {e}" + (f" ({e.__cause__})" if e.__cause__ else "")
                             ) from None

    cfg = load_config(config, overrides)
    base = cfg.to_dict()
    out = str(Path(out_dir or cfg.out_dir).resolve())
    space: dict[str, Any] = {"seed": tune.grid_search(list(seeds) if seeds else [cfg.seed])}
    if sweep is not None:
        from deflectlab.agents.sweep import load_sweep

        space.update(_tune_space(load_sweep(sweep)))
    env_vars = {"WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "RAY_CHDIR_TO_TRIAL_DIR": "0"}
    started = False
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env_vars})
        else:
            ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env_vars})
        started = True
    try:
        trainable = tune.with_resources(tune.with_parameters(_trial, base=base, out_dir=out), {"cpu": cpus_per_trial})
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric="slo_attainment", mode="max", num_samples=num_samples),
            run_config=tune.RunConfig(name=f"{cfg.name}-ray", storage_path=str(Path(out) / "ray"), verbose=0,
                                      callbacks=[_progress_callback(len(seeds or [cfg.seed]) * num_samples)]))
        grid = tuner.fit()
        rows = []
        for i in range(len(grid)):
            r = grid[i]
            if r.error:
                raise RuntimeError(f"a Ray trial failed: {r.error}")
            rows.append({"config": r.config, **{k: (r.metrics or {}).get(k) for k in REPORTED}})
        return rows
    finally:
        if started:
            ray.shutdown()
