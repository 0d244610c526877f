"""Fine-tuning the shape-generic network on the episode objective itself, by evolution strategies.

PPO fine-tuning of the imitation network lost to its start (``experiments/finetune/``): the objective is a
window's SLO attainment, a request's outcome is known tens of decisions after its decision, and one deflection
changes the outcome of requests routed long after it, so per-step credit assignment is noisy and biased.
Evolution strategies (Salimans et al., "Evolution Strategies as a Scalable Alternative to Reinforcement
Learning", arXiv 1703.03864) need no credit assignment: they estimate the gradient of the *episode* score with
respect to the weights from scores of perturbed weights,

    g = 1 / (n sigma) * sum_i  (u(theta + sigma eps_i) - u(theta - sigma eps_i)) / 2 * eps_i

with antithetic pairs ``+-eps_i`` (Gaussian), ``u`` the centred rank of each candidate's score among the
``2 n`` candidates (rank shaping: robust to the score's scale and to outliers), and Adam on ``g``.

Two things make the score comparable between candidates on a small budget:

* **common random numbers**: every candidate of an iteration plays the *same* training episodes (windows,
  loads, shapes), so the differences between candidates are the weights' and not the episodes';
* **a mix of settings**: each iteration draws ``episodes`` windows for each setting ``(shape, trace, load[,
  arrival, cv])``, and a candidate's score is the mean over settings of its SLO attainment there, so no setting
  dominates by its request count. Within a setting, episodes weigh equally (``weigh="episodes"``, the statistic
  the paired held-out evaluations average) or by their requests (``weigh="requests"``, pooled). Ties
  (frequent: SLO counts are integers) are broken by the P95 TTFT, weighed by ``tie_weight``
  (P95 TTFT in units of the TTFT SLO), as the headroom study's objective.

Every ``validate_every`` iterations the current weights play a fixed set of *validation* episodes, and the
best-scoring weights on those are kept: model selection without touching the evaluation windows. Which windows
those are is the run's ``split`` (``envs.splits``): ``time`` holds out [1200, end) s, so training and validation
windows end by 1,200 s; ``blocked`` holds out alternating 300-s blocks. No training or validation window may reach
into a held-out block (checked). ``validation_start_s`` puts the validation windows in ranges of their own
(default: the training ranges), so that selection rewards what carries over to another part of the trace.

Candidates run in parallel in a process pool (``jobs``) or as Ray tasks; each worker keeps the episode
workloads it has built (a window is drawn once, then replayed by every candidate).
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deflectlab.envs.splits import get_split, start_ranges

#: ((P, D), trace, load, arrival, cv): arrival "trace" replays the window's recorded times, "gamma"/"poisson"
#: draw them at the window's rate x load (envs.gym_env.EnvConfig)
Setting = tuple[tuple[int, int], str, float, str, float]

@dataclass
class EsConfig:
    """What :func:`train_es` runs. ``settings``: ``((P, D), trace, load[, arrival, cv])``, load a multiple of the
    window's recorded rate (arrival ``trace`` and cv 1 when left out)."""

    settings: list[Setting] = field(default_factory=lambda: [
        ((2, 2), "azure_code", 1.0), ((2, 2), "azure_code", 2.0), ((2, 2), "azure_code", 3.0),
        ((4, 4), "azure_code", 3.0), ((2, 2), "azure_conv", 3.0)])
    #: training episodes per setting per iteration (every candidate plays all of them)
    episodes: int = 4
    window_s: float = 120.0
    #: which blocks of trace time are held out for evaluation (envs.splits): no window may reach into them
    split: str = "time"
    #: window start ranges, trace seconds: [low, high] or a list of them (None: the split's training blocks)
    window_start_s: Any = None
    #: where the validation windows start (None: the training ranges)
    validation_start_s: Any = None
    #: within a setting: "episodes" (mean of per-episode attainment) or "requests" (pooled over requests)
    weigh: str = "episodes"
    iterations: int = 30
    #: antithetic pairs per iteration (2 x pairs candidates)
    pairs: int = 8
    sigma: float = 0.02
    lr: float = 0.003
    #: parameter-name prefixes to perturb (empty: every weight)
    params: tuple[str, ...] = ()
    #: weight of the P95 TTFT (in TTFT SLOs) in a candidate's score, against SLO attainment (a tie-break)
    tie_weight: float = 0.001
    validate_every: int = 5
    #: validation episodes per setting (fixed for the run, drawn from the training windows)
    validation_episodes: int = 8
    seed: int = 0
    handoff: str = "vllm-nixl"

    def __post_init__(self) -> None:
        if not self.settings:
            raise ValueError("es: at least one setting ((P, D), trace, load) is needed")
        self.settings = [_setting(s) for s in self.settings]
        if self.weigh not in ("episodes", "requests"):
            raise ValueError(f"es: weigh must be 'episodes' or 'requests', got {self.weigh!r}")
        if min(self.episodes, self.pairs, self.validate_every, self.validation_episodes) < 1 or self.iterations < 0:
            raise ValueError("es: episodes, pairs, validate_every and validation_episodes must be >= 1, "
                             "iterations >= 0")
        if not (self.sigma > 0 and self.lr > 0 and self.tie_weight >= 0):
            raise ValueError("es: sigma and lr must be > 0 and tie_weight >= 0")
        split = get_split(self.split)
        if self.window_start_s is None:
            self.window_start_s = split.starts("train", self.window_s)
        for what in ("window_start_s", "validation_start_s"):
            ranges = getattr(self, what)
            if ranges is None:
                continue
            ranges = tuple(start_ranges(ranges, f"es: {what}"))
            split.check_training(ranges, self.window_s, f"es: {'validation' if 'valid' in what else 'training'}")
            setattr(self, what, ranges)
        self.params = tuple(self.params)


def _setting(s: Any) -> Setting:
    if len(s) not in (3, 5):
        raise ValueError(f"es: setting {s!r}: expected ((P, D), trace, load[, arrival, cv])")
    (p, d), tr, ld = s[:3]
    arrival, cv = (str(s[3]), float(s[4])) if len(s) == 5 else ("trace", 1.0)
    if int(p) < 1 or int(d) < 1 or float(ld) <= 0 or cv <= 0:
        raise ValueError(f"es: setting ({p}x{d}, {tr}, {float(ld):g}): shapes need P, D >= 1, loads and cv > 0")
    from deflectlab.envs.workloads import ARRIVALS, WorkloadError, load_trace

    if arrival not in ARRIVALS:
        raise ValueError(f"es: setting ({p}x{d}, {tr}, {float(ld):g}): unknown arrival {arrival!r}; known: "
                         f"{', '.join(ARRIVALS)}")
    try:
        load_trace(str(tr))  # parsed once and cached: a bad name fails here, not in the first worker
    except WorkloadError as e:
        raise ValueError(f"es: setting ({p}x{d}, {tr}, {float(ld):g}): {e}") from None
    return (int(p), int(d)), str(tr), float(ld), arrival, cv


# -- episodes and scores (these run in the workers) ---------------------------------------------------------

Episode = tuple[tuple[int, int], str, float, str, float, int]  # a setting, then the environment seed
Ranges = tuple[tuple[float, float], ...]  # window start ranges (envs.splits)

_WORKLOADS: dict[tuple, tuple[Any, Any]] = {}


def _episode(ep: Episode, window_s: float, start: Ranges, handoff: str):
    key = (ep, window_s, start, handoff)
    got = _WORKLOADS.get(key)
    if got is None:
        from deflectlab.envs.gym_env import DeflectionEnv

        (p, d), trace, load, arrival, cv, seed = ep
        env = DeflectionEnv(trace=trace, load=[load, load], window_s=window_s, window_start_s=list(start),
                            arrival=arrival, cv=cv, cluster={"handoff": handoff, "num_prefill": p, "num_decode": d})
        wl, _ = env.episode_workload(seed=seed)
        if len(_WORKLOADS) > 4096:
            _WORKLOADS.clear()
        got = _WORKLOADS[key] = (env.config, wl)
    return got


def play(weights: dict[str, np.ndarray] | None, spec: str, feature_schema: int, episodes: list[Episode],
         window_s: float, start: Ranges, handoff: str) -> list[tuple[int, int, float]]:
    """Play ``episodes`` under the network ``weights`` (or, with ``weights`` None, the registered policy
    ``spec``); per episode ``(requests meeting the SLO, requests, P95 TTFT / TTFT SLO)``."""
    from deflectlab.envs.simulator import ClusterSim

    if weights is not None:
        from deflectlab.policies.runtime import SetArraysPolicy

        policy = SetArraysPolicy(weights, feature_schema)
    else:
        from deflectlab.policies.registry import make_policy

        policy = make_policy(spec)
    out = []
    for ep in episodes:
        cfg, wl = _episode(ep, window_s, start, handoff)
        s = ClusterSim(cfg, wl).run(policy).summary
        n = int(s["requests"])
        p95 = float(s["ttft_s"]["p95"])
        # an episode with no first token at all has no P95: count it as far worse than any finite tail
        out.append((round(s["slo_attainment"] * n), n, p95 / cfg.ttft_slo_s if math.isfinite(p95) else 1e3))
    return out


def score(rows: list[tuple[int, int, float]], episodes: list[Episode], tie_weight: float,
          weigh: str = "episodes") -> tuple[float, float]:
    """``(objective, SLO attainment)`` of one candidate: per setting the attainment (mean over episodes, or
    pooled over requests with ``weigh="requests"``) minus ``tie_weight`` x the mean P95 TTFT (in TTFT SLOs),
    averaged over settings; attainment the same without the tie-break."""
    by: dict[tuple, list[tuple[int, int, float]]] = {}
    for ep, r in zip(episodes, rows):
        by.setdefault(ep[:-1], []).append(r)
    if weigh == "requests":
        att = [sum(r[0] for r in v) / max(sum(r[1] for r in v), 1) for v in by.values()]
    else:
        att = [float(np.mean([r[0] / max(r[1], 1) for r in v])) for v in by.values()]
    ttft = [float(np.mean([r[2] for r in v])) for v in by.values()]
    return float(np.mean(att) - tie_weight * np.mean(ttft)), float(np.mean(att))


def centred_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` mapped linearly onto [-0.5, 0.5] (ties share their mean rank)."""
    n = len(x)
    if n < 2:
        return np.zeros(n)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n, dtype=float)
    for v in np.unique(x):  # ties: the mean of their ranks, so equal scores get equal weight
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks / (n - 1) - 0.5


# -- the weight vector -------------------------------------------------------------------------------------

class Flat:
    """A network's weights (name -> array) as one vector, and back; only the names under ``prefixes`` (all when
    empty) are in the vector, the rest stay as they are."""

    def __init__(self, arrays: dict[str, np.ndarray], prefixes: tuple[str, ...] = ()) -> None:
        self.base = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
        self.names = [k for k in self.base if not prefixes or k.startswith(tuple(prefixes))]
        if not self.names:
            raise ValueError(f"es: no weight's name starts with {list(prefixes)}; names: {sorted(self.base)}")
        self.sizes = [self.base[k].size for k in self.names]

    def vector(self) -> np.ndarray:
        return np.concatenate([self.base[k].ravel() for k in self.names]).astype(np.float64)

    def arrays(self, vec: np.ndarray) -> dict[str, np.ndarray]:
        out = dict(self.base)
        i = 0
        for k, n in zip(self.names, self.sizes):
            out[k] = vec[i:i + n].reshape(self.base[k].shape).astype(np.float32)
            i += n
        return out


class Adam:
    """Adam (Kingma & Ba) for gradient *ascent* on a flat vector."""

    def __init__(self, n: int, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m, self.v, self.t = np.zeros(n), np.zeros(n), 0

    def step(self, grad: np.ndarray) -> np.ndarray:
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad * grad
        mh, vh = self.m / (1 - self.b1 ** self.t), self.v / (1 - self.b2 ** self.t)
        return self.lr * mh / (np.sqrt(vh) + self.eps)


def es_gradient(scores_plus: np.ndarray, scores_minus: np.ndarray, noise: np.ndarray, sigma: float) -> np.ndarray:
    """The antithetic rank-shaped ES gradient estimate from the ``n`` pairs' scores and their noise ``[n, dim]``."""
    u = centred_ranks(np.concatenate([scores_plus, scores_minus]))
    n = len(scores_plus)
    return (u[:n] - u[n:]) @ noise / (2 * n * sigma)


# -- running candidates ------------------------------------------------------------------------------------

class _Runner:
    """Plays candidates' episodes here (``jobs`` 1), in a process pool, or as Ray tasks."""

    def __init__(self, jobs: int = 1, ray_address: str | None = None, use_ray: bool = False) -> None:
        self.pool = self.ray = None
        if use_ray or ray_address:
            import ray  # ModuleNotFoundError names the 'rl' extra at the command line

            self.started = not ray.is_initialized()
            if self.started:
                ray.init(address=ray_address, num_cpus=None if ray_address else jobs, include_dashboard=False,
                         log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            self.ray = ray
            self.task = ray.remote(num_cpus=1)(play)
        elif jobs > 1:
            import multiprocessing as mp

            self.pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"))

    def map(self, cfg: EsConfig, schema: int, cands: list[dict[str, np.ndarray] | None], specs: list[str],
            episodes: list[Episode], start: Ranges) -> list[list[tuple[int, int, float]]]:
        # one task per candidate and setting, so that a few candidates still spread over the workers
        k = len(cfg.settings)
        n = len(episodes) // k
        parts = [episodes[i * n:(i + 1) * n] for i in range(k - 1)] + [episodes[(k - 1) * n:]]
        args = [(w, s, schema, part, cfg.window_s, tuple(start), cfg.handoff)
                for w, s in zip(cands, specs) for part in parts]
        if self.ray is not None:
            done = self.ray.get([self.task.remote(*a) for a in args])
        elif self.pool is not None:
            done = list(self.pool.map(play, *zip(*args)))
        else:
            done = [play(*a) for a in args]
        return [sum(done[c * k:(c + 1) * k], []) for c in range(len(cands))]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        if self.ray is not None and self.started:  # a Ray the caller started stays up
            self.ray.shutdown()


def draw_episodes(cfg: EsConfig, rng: np.random.Generator, per_setting: int) -> list[Episode]:
    return [(*s, int(rng.integers(0, 2**31 - 1))) for s in cfg.settings for _ in range(per_setting)]


def train_es(cfg: EsConfig, init_arrays: dict[str, np.ndarray], feature_schema: int = 1, out: Path | None = None,
             *, jobs: int = 1, use_ray: bool = False, ray_address: str | None = None, reference: str = "",
             tracker: Any = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run ES from ``init_arrays``; returns the weights that scored best on the validation episodes (the
    initial ones if none beat them) and a log. ``reference``: a registered policy also played on the validation
    episodes, for the log (e.g. the tuned heuristic the network should beat)."""
    flat = Flat(init_arrays, cfg.params)
    theta0 = flat.vector()
    theta = theta0.copy()
    opt = Adam(len(theta), cfg.lr)
    rng = np.random.default_rng([cfg.seed, 1])
    val_eps = draw_episodes(cfg, np.random.default_rng([cfg.seed, 2]), cfg.validation_episodes)
    val_start = cfg.validation_start_s or cfg.window_start_s
    runner = _Runner(jobs, ray_address, use_ray)
    log: dict[str, Any] = {"config": asdict(cfg), "feature_schema": feature_schema, "dim": len(theta),
                           "validation_episodes": [list(e) for e in val_eps], "iterations": [], "validations": []}
    t0 = time.perf_counter()
    try:
        if reference:
            ref = runner.map(cfg, feature_schema, [None], [reference], val_eps, val_start)[0]
            obj, att = score(ref, val_eps, cfg.tie_weight, cfg.weigh)
            log["reference"] = {"policy": reference, "objective": obj, "slo_attainment": att}
        best = (-np.inf, theta.copy(), -1)
        for it in range(cfg.iterations + 1):
            if it % cfg.validate_every == 0 or it == cfg.iterations:
                rows = runner.map(cfg, feature_schema, [flat.arrays(theta)], [""], val_eps, val_start)[0]
                obj, att = score(rows, val_eps, cfg.tie_weight, cfg.weigh)
                log["validations"].append({"iteration": it, "objective": obj, "slo_attainment": att,
                                           "wall_s": time.perf_counter() - t0})
                if obj > best[0]:
                    best = (obj, theta.copy(), it)
                if tracker is not None:
                    tracker.log({"es/validation_objective": obj, "es/validation_slo": att}, step=it)
            if it == cfg.iterations:
                break
            t_it = time.perf_counter()
            eps = draw_episodes(cfg, rng, cfg.episodes)
            noise = rng.standard_normal((cfg.pairs, len(theta)))
            cands = [flat.arrays(theta + s * cfg.sigma * e) for s in (1.0, -1.0) for e in noise]
            results = runner.map(cfg, feature_schema, cands, [""] * len(cands), eps, cfg.window_start_s)
            objs, atts = np.array([score(r, eps, cfg.tie_weight, cfg.weigh) for r in results]).T
            grad = es_gradient(objs[:cfg.pairs], objs[cfg.pairs:], noise, cfg.sigma)
            theta = theta + opt.step(grad)
            row = {"iteration": it, "candidates_mean_slo": float(atts.mean()), "candidates_best_slo": float(atts.max()),
                   "candidates_worst_slo": float(atts.min()), "spread_objective": float(objs.max() - objs.min()),
                   "grad_norm": float(np.linalg.norm(grad)), "step_norm": float(np.linalg.norm(theta - theta0)),
                   "episodes_played": len(eps) * len(cands), "wall_s": time.perf_counter() - t_it}
            log["iterations"].append(row)
            if tracker is not None:
                tracker.log({f"es/{k}": v for k, v in row.items() if k != "iteration"}, step=it)
    finally:
        runner.close()
    log["best_iteration"], log["best_validation_objective"] = best[2], best[0]
    log["wall_s"] = time.perf_counter() - t0
    log["episodes_per_s"] = sum(r["episodes_played"] for r in log["iterations"]) / max(
        sum(r["wall_s"] for r in log["iterations"]), 1e-9)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "es_log.json").write_text(json.dumps(log, indent=1, default=str))
    return flat.arrays(best[1]), log
