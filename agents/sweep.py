"""Hyperparameter sweeps defined as W&B sweep YAML, run with ``wandb agent`` or locally.

A sweep file (``experiments/sweeps/*.yaml``) is a valid W&B sweep configuration: ``method`` (grid, random,
bayes), ``metric`` (``eval/slo_attainment``, maximised), ``parameters`` keyed by dotted training-config paths
(``algo_params.learning_rate``), and a ``command`` that runs ``deflectlab train --config <base config>
${args_no_hyphens}`` (W&B passes each parameter as ``key=value``, which ``deflectlab train`` applies as
overrides). It is checked with W&B's own ``sweeps`` package before anything runs.

Backends (:func:`run_sweep`):

``wandb``
    ``wandb.sweep`` + ``wandb.agent`` against the W&B server; chosen by ``auto`` when ``WANDB_API_KEY`` is set and
    ``WANDB_MODE`` is not ``offline``.
``optuna``
    local, no server: the search space is translated to Optuna distributions (grid -> GridSampler, random ->
    RandomSampler, bayes -> TPE), trials are stored in SQLite in the sweep directory, and ``workers`` processes
    pull trials from it in parallel. The default when no W&B credentials exist.
``sweeps``
    local and sequential, proposals from the W&B ``sweeps`` package itself (``sweeps.next_run``, the same
    algorithms the W&B server runs).

The objective of a trial is its :class:`agents.train.TrainResult` ``objective``: the pooled SLO attainment of
the final policy on the evaluation seeds (``eval/best_slo_attainment`` picks the best periodic evaluation).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from deflectlab.agents.config import load_config
from deflectlab.envs.config import read_yaml

METRICS = {"eval/slo_attainment": "objective", "eval/best_slo_attainment": "best_eval_slo_attainment"}


def _sweeps_pkg() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sweeps package warns about pydantic v1 config keys on import
        import sweeps
    return sweeps


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read a sweep YAML and check it with W&B's ``sweeps`` schema; errors name the problem."""
    p = Path(path)
    sweep = read_yaml(p, "sweep file")
    if not isinstance(sweep, dict):
        raise ValueError(f"{p}: a sweep is a mapping")
    violations = _sweeps_pkg().schema_violations_from_proposed_config(sweep)
    if violations:
        raise ValueError(f"{p}: not a valid W&B sweep: {'; '.join(violations)}")
    metric = sweep.get("metric") or {}
    if metric.get("name") not in METRICS:
        raise ValueError(f"{p}: metric.name must be one of {sorted(METRICS)}, got {metric.get('name')!r}")
    if metric.get("goal", "minimize") != "maximize":
        raise ValueError(f"{p}: metric.goal must be maximize for {metric['name']}")
    return sweep


def base_config_of(sweep: dict[str, Any]) -> str | None:
    """The ``--config`` path in the sweep's ``command``, if any."""
    cmd = [str(c) for c in sweep.get("command") or []]
    for i, c in enumerate(cmd):
        if c == "--config" and i + 1 < len(cmd):
            return cmd[i + 1]
        if c.startswith("--config="):
            return c.split("=", 1)[1]
    return None


def suggest(trial: Any, name: str, spec: dict[str, Any]) -> Any:
    """One W&B parameter spec as an Optuna suggestion."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        values = list(spec["values"])
        enc = [json.dumps(v) for v in values]  # Optuna categoricals must be plain scalars
        return json.loads(trial.suggest_categorical(name, enc))
    dist = spec.get("distribution")
    if "min" not in spec or "max" not in spec:
        raise ValueError(f"sweep parameter {name!r}: needs value, values, or min and max")
    lo, hi = spec["min"], spec["max"]
    if dist is None:
        dist = "int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform"
    if dist == "int_uniform":
        return trial.suggest_int(name, int(lo), int(hi))
    if dist == "uniform":
        return trial.suggest_float(name, float(lo), float(hi))
    if dist == "q_uniform":
        return trial.suggest_float(name, float(lo), float(hi), step=float(spec.get("q", 1.0)))
    if dist == "log_uniform_values":
        return trial.suggest_float(name, float(lo), float(hi), log=True)
    if dist == "log_uniform":  # W&B's min/max are natural logs here
        return trial.suggest_float(name, math.exp(lo), math.exp(hi), log=True)
    if dist == "categorical":
        return suggest(trial, name, {"values": spec["values"]})
    raise ValueError(f"sweep parameter {name!r}: distribution {dist!r} has no local translation")


def _objective_value(result: Any, metric: str) -> float:
    return float(getattr(result, METRICS[metric]))


def _trial_overrides(sweep_name: str, sweep_dir: Path, n: int, params: dict[str, Any],
                     fixed: dict[str, Any]) -> dict[str, Any]:
    return {**params, **fixed, "out_dir": str(sweep_dir / "trials"), "wandb.group": sweep_name,
            "name": f"{sweep_name}-t{n}"}


def effective_params(params: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    """The sweep parameters as the trial ran them: a ``--set`` override wins over the sweep's value."""
    return {k: fixed.get(k, v) for k, v in params.items()}


def _say(msg: str) -> None:
    """One progress line on stderr (trials run in worker processes: flush at once)."""
    print(f"sweep: {msg}", file=sys.stderr, flush=True)


def _trial_row(n: int, params: dict[str, Any], fixed: dict[str, Any], res: Any, value: float,
               wall_s: float) -> dict[str, Any]:
    """What one trial ran and scored; prints its progress line."""
    ran = effective_params(params, fixed)
    overridden = {k: {"sweep": v, "ran": ran[k]} for k, v in params.items() if ran[k] != v}
    _say(f"trial {n} done in {wall_s:.1f} s: objective {value:.4f}, {res.timesteps} steps, params {ran}"
         + (f" (overridden by --set: {sorted(overridden)})" if overridden else ""))
    return {"number": n, "value": value, "params": ran, "overridden": overridden, "timesteps": res.timesteps,
            "wall_s": wall_s, "run_dir": res.run_dir}


def _run_trial(base: str, sweep_dir: Path, n: int, params: dict[str, Any], fixed: dict[str, Any],
               metric: str, total: int, wandb_run: Any = None) -> dict[str, Any]:
    """Train one trial with the sweep's ``params`` (``--set`` overrides winning); returns :func:`_trial_row`."""
    from deflectlab.agents.train import train

    _say(f"trial {n} of {total} started: {effective_params(params, fixed)}")
    t0 = time.perf_counter()
    res = train(base, overrides=_trial_overrides(sweep_dir.name, sweep_dir, n, params, fixed), wandb_run=wandb_run)
    return _trial_row(n, params, fixed, res, _objective_value(res, metric), time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- optuna

def _optuna_worker(storage: str, study_name: str, sweep: dict[str, Any], base: str, fixed: dict[str, Any],
                   n_trials: int, sweep_dir: str, seed: int, total: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=_sampler(sweep, seed))
    metric = sweep["metric"]["name"]

    def objective(trial: Any) -> float:
        params = {k: suggest(trial, k, v) for k, v in sweep["parameters"].items()}
        row = _run_trial(base, Path(sweep_dir), trial.number, params, fixed, metric, total)
        for k in ("run_dir", "params", "overridden", "timesteps", "wall_s"):
            trial.set_user_attr(k, row[k])
        return row["value"]

    study.optimize(objective, n_trials=n_trials)


def _sampler(sweep: dict[str, Any], seed: int) -> Any:
    import optuna

    method = sweep.get("method", "random")
    if method == "grid":
        space: dict[str, list[Any]] = {}
        for k, v in sweep["parameters"].items():
            if "values" in v:
                space[k] = [json.dumps(x) for x in v["values"]]
            elif "value" not in v:
                raise ValueError(f"grid sweep parameter {k!r} needs 'values'")
        return optuna.samplers.GridSampler(space, seed=seed)
    if method == "bayes":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def run_optuna(sweep: dict[str, Any], base: str, trials: int, workers: int, sweep_dir: Path,
               fixed: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    import optuna

    storage = f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"
    name = sweep_dir.name
    optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    workers = max(1, min(workers, trials))
    shares = [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]
    _say(f"{trials} trial(s) on {workers} worker process(es), Optuna storage {storage}")
    if workers == 1:
        _optuna_worker(storage, name, sweep, base, fixed, shares[0], str(sweep_dir), seed, trials)
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_optuna_worker,
                             args=(storage, name, sweep, base, fixed, shares[i], str(sweep_dir), seed + i, trials))
                 for i in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} sweep worker(s) failed (exit codes {bad}); see their output above")
    study = optuna.load_study(study_name=name, storage=storage)
    rows: list[dict[str, Any]] = [
        {"number": t.number, "value": t.value, "state": t.state.name,
         **{k: t.user_attrs.get(k) for k in ("params", "overridden", "timesteps", "wall_s", "run_dir")}}
        for t in study.trials]
    done = [r for r in rows if r["value"] is not None]
    best = max(done, key=lambda r: float(r["value"])) if done else None
    return {"backend": "optuna", "storage": storage, "trials": rows, "best": best}


# ---------------------------------------------------------------------------------------------------- sweeps

def run_sweeps_local(sweep: dict[str, Any], base: str, trials: int, sweep_dir: Path,
                     fixed: dict[str, Any]) -> dict[str, Any]:
    sw = _sweeps_pkg()
    metric = sweep["metric"]["name"]
    runs: list[Any] = []
    rows: list[dict[str, Any]] = []
    for n in range(trials):
        proposal = sw.next_run(sweep, runs)
        if proposal is None:  # a grid is exhausted
            _say(f"the grid is exhausted after {n} trial(s)")
            break
        params = {k: v["value"] for k, v in proposal.config.items()}
        row = _run_trial(base, sweep_dir, n, params, fixed, metric, trials)
        runs.append(sw.SweepRun(name=f"t{n}", config=proposal.config, state=sw.RunState.finished,
                                summary_metrics={metric: row["value"]}))
        rows.append(row)
    best = max(rows, key=lambda r: float(r["value"])) if rows else None
    return {"backend": "sweeps", "trials": rows, "best": best}


# ---------------------------------------------------------------------------------------------------- wandb

def run_wandb(sweep: dict[str, Any], base: str, trials: int, sweep_dir: Path, fixed: dict[str, Any],
              project: str) -> dict[str, Any]:
    """Create the sweep on the W&B server and run ``trials`` trials here as a ``wandb agent``."""
    import wandb

    sweep_id = wandb.sweep(sweep, project=project)
    n = [0]
    metric = sweep["metric"]["name"]

    def trial() -> None:
        run = wandb.init(dir=str(sweep_dir))
        params = {k: v for k, v in dict(run.config).items()}
        _run_trial(base, sweep_dir, n[0], params, fixed, metric, trials, wandb_run=run)
        n[0] += 1

    print(f"W&B sweep {sweep_id}: more agents can join with `wandb agent {project}/{sweep_id}`")
    wandb.agent(sweep_id, function=trial, count=trials, project=project)
    return {"backend": "wandb", "sweep_id": sweep_id, "trials": n[0]}


def choose_backend(backend: str) -> str:
    if backend != "auto":
        return backend
    online = os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE", "").lower() not in (
        "offline", "dryrun", "disabled")
    return "wandb" if online else "optuna"


def run_sweep(path: str | Path, *, backend: str = "auto", trials: int = 8, workers: int = 2,
              out_dir: str | Path = "runs/sweeps", config: str | None = None,
              overrides: dict[str, Any] | None = None, project: str = "deflectlab", seed: int = 0) -> dict[str, Any]:
    """Run a sweep file; returns (and writes to ``<sweep dir>/sweep_result.json``) the trials and the best.

    :param path: the W&B sweep YAML.
    :param backend: ``auto``, ``wandb``, ``optuna`` or ``sweeps`` (see the module docstring).
    :param trials: trials to run (in total, over all workers).
    :param workers: parallel worker processes (Optuna backend).
    :param out_dir: sweeps are written under this directory.
    :param config: base training config (default: the one in the sweep's ``command``).
    :param overrides: dotted overrides applied to every trial, over the sweep's values (e.g. a smaller
        ``total_timesteps``).
    :param project: W&B project (W&B backend).
    :param seed: seed of the local samplers.
    """
    sweep = load_sweep(path)
    base = config or base_config_of(sweep)
    if not base:
        raise ValueError(f"{path}: no base training config: give --config or put `--config <yaml>` in `command`")
    # fail early on a bad base config or a parameter that is not a config key: try each one's first value
    sample = {k: v.get("value", (v.get("values") or [v.get("min")])[0]) for k, v in sweep["parameters"].items()}
    from deflectlab.agents.train import check_algo_params, planned_timesteps

    resolved = load_config(base, {**sample, **(overrides or {})})
    check_algo_params(resolved)
    if backend not in ("auto", "wandb", "optuna", "sweeps"):
        raise ValueError(f"backend must be auto, wandb, optuna or sweeps, got {backend!r}")
    chosen = choose_backend(backend)
    if chosen != "wandb":
        os.environ["WANDB_MODE"] = "offline"
    name = f"{Path(path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = Path(out_dir) / name
    sweep_dir.mkdir(parents=True, exist_ok=False)
    fixed = dict(overrides or {})
    _say(f"base config {base}; each trial runs about {planned_timesteps(resolved)} steps"
         + (f" after behaviour cloning of {resolved.pretrain.expert}" if resolved.pretrain.expert else "")
         + (f"; --set over the sweep: {fixed}" if fixed else ""))
    if chosen == "optuna":
        out = run_optuna(sweep, base, trials, workers, sweep_dir, fixed, seed)
    elif chosen == "sweeps":
        out = run_sweeps_local(sweep, base, trials, sweep_dir, fixed)
    else:
        out = run_wandb(sweep, base, trials, sweep_dir, fixed, project)
    out.update({"sweep": str(path), "dir": str(sweep_dir), "metric": sweep["metric"], "base_config": base,
                "cloned_expert": resolved.pretrain.expert, "planned_timesteps_per_trial": planned_timesteps(resolved),
                "overrides": fixed})
    (sweep_dir / "sweep_result.json").write_text(json.dumps(out, indent=2, default=str))
    return out
