"""Imitation of the clairvoyant lookahead planner, DAgger-style, for the shape-generic network.

Each iteration plays episodes on a mix of cluster shapes, traces and loads. At every decision the planner
(:class:`~deflectlab.policies.lookahead.Lookahead`, attached to the environment's simulation) labels the state
with its action; the action actually taken is the planner's with probability ``beta`` (``beta0 * decay**i``)
and the learner's otherwise, so later iterations visit the states the learner itself reaches (Ross et al.,
"A Reduction of Imitation Learning and Structured Prediction to No-Regret Online Learning", AISTATS 2011).
All labelled states are kept (the aggregated data set) and the network is retrained on them each iteration
by masked cross-entropy. Training windows come from ``window_start_s`` (default: the training blocks of the
run's ``split``, envs.splits; [0, 1200) s of each trace for the default ``time`` split), and none may reach into
a held-out block (the evaluation windows: [1200, 1800) s for the ``time`` split).

The planner's decision maps onto the environment's actions by its node: prefill on ``p`` is action ``p``,
deflection to ``d`` is action ``P + d`` (with the environment's chunk cap).

The teacher need not be the planner: ``DaggerConfig.teacher`` names any registered policy (``"name:key=value"``,
e.g. the tuned ``length_threshold:max_len=3072``), which then labels every visited state with its own decision.
A heuristic teacher is not clairvoyant, so the network sees everything the teacher decides on (up to
tie-breaks between nodes the features do not tell apart), and labelling costs one ``decide`` per state
instead of one rollout per candidate action.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deflectlab.agents.setnet import MASKED_LOGIT, SetPolicyNet, masked_argmax, split_obs
from deflectlab.envs.features import SCHEMAS
from deflectlab.envs.splits import get_split, start_ranges


@dataclass
class DaggerConfig:
    """What :func:`train_dagger` runs. Shapes are ``(P, D)``; loads are multiples of the recorded rate."""

    shapes: list[tuple[int, int]] = field(default_factory=lambda: [(2, 2), (4, 4)])
    traces: list[str] = field(default_factory=lambda: ["azure_code", "azure_conv"])
    loads: tuple[float, float] = (1.0, 3.0)
    window_s: float = 60.0
    #: which blocks of trace time are held out (envs.splits); no training window may reach into them
    split: str = "time"
    #: window start ranges, trace seconds: [low, high] or a list of them (None: the split's training blocks)
    window_start_s: Any = None
    iterations: int = 4
    episodes_per_iteration: int = 4
    max_decisions: int = 400
    beta0: float = 1.0
    beta_decay: float = 0.5
    horizon_s: float = 2.0
    base: str = "length_threshold"
    base_max_len: int = 3072
    hidden: int = 64
    epochs: int = 30
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0
    handoff: str = "vllm-nixl"
    #: cost-aware imitation: a state's loss weighs 1 + regret_weight x (requests the worst valid action loses
    #: against the best, by the planner's rollouts), and its target spreads over the actions tied on SLO count
    #: (0: plain cross-entropy on the planner's pick)
    regret_weight: float = 0.0
    #: the observation's feature schema version (envs.features.SCHEMAS; 2 adds the prefix-cache hits)
    feature_schema: int = 1
    #: the labelling teacher: empty for the clairvoyant planner, else any registered policy spec (a planner spec,
    #: ``lookahead:...``, gives per-action regrets; a heuristic teacher gives none, so ``regret_weight`` must then
    #: be 0)
    teacher: str = ""

    def __post_init__(self) -> None:
        if self.teacher:
            from deflectlab.policies.registry import make_policy

            try:
                teacher = make_policy(self.teacher)
            except (ValueError, TypeError) as e:
                raise ValueError(f"dagger: teacher {self.teacher!r}: {e}") from None
            if self.regret_weight > 0 and not hasattr(teacher, "last_scores"):
                raise ValueError("dagger: regret_weight needs the planner's rollouts; a policy teacher "
                                 f"({self.teacher!r}) gives none (use regret_weight 0)")
        if self.iterations < 0 or self.episodes_per_iteration < 1:
            raise ValueError("dagger: iterations must be >= 0 (0 only from an initial network) and "
                             "episodes_per_iteration >= 1")
        if not self.shapes or any(int(p) < 1 or int(d) < 1 for p, d in self.shapes):
            raise ValueError(f"dagger: shapes must be (P, D) pairs with P, D >= 1, got {self.shapes}")
        if not 0.0 <= self.beta0 <= 1.0 or not 0.0 <= self.beta_decay <= 1.0:
            raise ValueError("dagger: beta0 and beta_decay must be in [0, 1]")
        self.shapes = [(int(p), int(d)) for p, d in self.shapes]
        split = get_split(self.split)
        self.window_start_s = tuple(start_ranges(self.window_start_s, "dagger: window_start_s")
                                    if self.window_start_s is not None else split.starts("train", self.window_s))
        split.check_training(self.window_start_s, self.window_s, "dagger: training")
        if isinstance(self.feature_schema, bool) or self.feature_schema not in SCHEMAS:
            raise ValueError(f"dagger: unknown feature_schema {self.feature_schema!r}; known versions: "
                             f"{', '.join(map(str, SCHEMAS))}")


@dataclass
class Dataset:
    """Aggregated labelled states, grouped by cluster shape (tensors of one shape stack)."""

    obs: dict[tuple[int, int], list[np.ndarray]] = field(default_factory=dict)
    mask: dict[tuple[int, int], list[np.ndarray]] = field(default_factory=dict)
    label: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    #: per action, SLO-meeting requests it loses against the planner's best (0 for ties); NaN where invalid
    regret: dict[tuple[int, int], list[np.ndarray]] = field(default_factory=dict)

    def add(self, shape: tuple[int, int], obs: np.ndarray, mask: np.ndarray, label: int,
            regret: np.ndarray | None = None) -> None:
        self.obs.setdefault(shape, []).append(np.array(obs, np.float32))
        self.mask.setdefault(shape, []).append(np.array(mask, bool))
        self.label.setdefault(shape, []).append(int(label))
        if regret is None:
            regret = np.where(np.arange(len(mask)) == label, 0.0, np.nan)
        self.regret.setdefault(shape, []).append(np.asarray(regret, np.float32))

    def __len__(self) -> int:
        return sum(len(v) for v in self.label.values())

    def extend(self, other: Dataset) -> None:
        """Append ``other``'s states after this one's (per shape, in their order)."""
        for shape in other.label:
            self.obs.setdefault(shape, []).extend(other.obs[shape])
            self.mask.setdefault(shape, []).extend(other.mask[shape])
            self.label.setdefault(shape, []).extend(other.label[shape])
            self.regret.setdefault(shape, []).extend(other.regret[shape])


def planner_action(decision: Any, num_prefill: int) -> int:
    """The environment's action of a planner decision (by node)."""
    return num_prefill + int(decision.decode_node) if decision.deflected else int(decision.prefill_node)


def action_regret(scores: list, num_prefill: int, num_actions: int) -> np.ndarray:
    """Per environment action, how many SLO-meeting requests it loses against the planner's best candidate
    (its best candidate on the same node); NaN for actions the planner did not score (masked)."""
    met = np.full(num_actions, -np.inf)
    for dec, (m, _) in scores:
        a = planner_action(dec, num_prefill)
        if a < num_actions:
            met[a] = max(met[a], m)
    best = met.max()
    return np.where(np.isfinite(met), best - met, np.nan).astype(np.float32)


def _env(cfg: DaggerConfig, shape: tuple[int, int], trace: str):
    from deflectlab.envs.gym_env import DeflectionEnv

    return DeflectionEnv(trace=trace, load=list(cfg.loads), window_s=cfg.window_s,
                         window_start_s=list(cfg.window_start_s), cluster={"num_prefill": shape[0],
                                                                           "num_decode": shape[1],
                                                                           "handoff": cfg.handoff},
                         feature_schema=cfg.feature_schema)


def collect_episode(cfg: DaggerConfig, net: SetPolicyNet | None, beta: float, shape: tuple[int, int], trace: str,
                    seed: int, data: Dataset, rng: np.random.Generator) -> dict[str, Any]:
    """Play one episode, the teacher (the planner, or ``cfg.teacher``) labelling every state; returns counts
    (decisions, agreement)."""
    env = _env(cfg, shape, trace)
    obs, meta = env.reset(seed=seed)
    if cfg.teacher:
        from deflectlab.policies.registry import make_policy

        teacher = make_policy(cfg.teacher)
        if hasattr(teacher, "attach"):  # a planner given as a spec (e.g. lookahead with a tuned base) plays this sim
            teacher.attach(env.sim)
    else:
        from deflectlab.policies.lookahead import Lookahead

        teacher = Lookahead(horizon_s=cfg.horizon_s, base=cfg.base, base_max_len=cfg.base_max_len)
        teacher.attach(env.sim)
    P, D = shape
    n = agree = 0
    done = False
    while not done and n < cfg.max_decisions:
        mask = env.action_masks()
        view, req = env.current_view(), env.current_request
        told = teacher.decide(view, req)
        label = planner_action(told, P)
        if not mask[label]:  # the teacher's deflection to a node the env masks: fall back to its best valid
            label = int(np.flatnonzero(mask)[0])
        scores = getattr(teacher, "last_scores", None)  # a planner's per-candidate rollouts
        regret = None if scores is None else action_regret(scores, P, len(mask))
        data.add(shape, obs, mask, label, regret)
        if net is not None:
            with torch.no_grad():
                mine = masked_argmax(net.flat_logits(torch.as_tensor(obs[None]), P, D)[0].numpy(), mask)
        else:
            mine = label
        agree += int(mine == label)
        act = label if rng.random() < beta else mine
        obs, _, done, _, _ = env.step(act)
        if env.last_decision != told:  # a teacher tracking its own decisions (proactive's lanes) learns the real one
            teacher.taken(view, req, env.last_decision)
        n += 1
    return {"shape": f"{P}P{D}D", "trace": trace, "load": meta.get("load"), "decisions": n, "agree": agree}


def fit(net: SetPolicyNet, data: Dataset, cfg: DaggerConfig, gen: torch.Generator) -> float:
    """Retrain on the whole aggregated set (masked cross-entropy); returns the final training accuracy."""
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    tensors = {s: (torch.as_tensor(np.stack(data.obs[s])), torch.as_tensor(np.stack(data.mask[s])),
                   torch.as_tensor(data.label[s]), *_targets(data, s, cfg.regret_weight)) for s in data.label}
    net.train()
    for _ in range(cfg.epochs):
        for shape, (x, m, _, target, w) in tensors.items():
            perm = torch.randperm(len(w), generator=gen)
            for i in range(0, len(w), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                logits = net.flat_logits(x[idx], *shape).masked_fill(~m[idx], MASKED_LOGIT)
                nll = -(target[idx] * torch.log_softmax(logits, dim=1)).sum(1)
                loss = (w[idx] * nll).sum() / w[idx].sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
    net.eval()
    hit = total = 0
    with torch.no_grad():
        for shape, (x, m, y, _, _) in tensors.items():
            pred = net.flat_logits(x, *shape).masked_fill(~m, MASKED_LOGIT).argmax(1)
            hit += int((pred == y).sum())
            total += len(y)
    return hit / total if total else float("nan")


def _targets(data: Dataset, shape: tuple[int, int], regret_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per state: the target distribution and the loss weight. Plain (``regret_weight`` 0): one-hot on the
    planner's pick, weight 1. Cost-aware: uniform over the actions tied with the best on SLO count, weight
    ``1 + regret_weight * max regret``."""
    y = np.asarray(data.label[shape])
    n, a = len(y), len(data.mask[shape][0])
    if regret_weight <= 0:
        return torch.as_tensor(np.eye(a, dtype=np.float32)[y]), torch.ones(n)
    r = np.stack(data.regret[shape])
    tie = np.nan_to_num(r, nan=np.inf) <= 0.0
    tie[np.arange(n), y] |= ~tie.any(1)  # never an empty target
    target = tie / tie.sum(1, keepdims=True)
    worst = np.nan_to_num(r, nan=0.0).max(1)
    return torch.as_tensor(target.astype(np.float32)), torch.as_tensor(1.0 + regret_weight * worst, dtype=torch.float32)


def episode_plan(cfg: DaggerConfig, it: int) -> list[tuple[int, tuple[int, int], str, int]]:
    """Iteration ``it``'s episodes: ``(index k, shape, trace, environment seed)``, in the order their labelled
    states join the data set (shapes cycle fastest, then traces)."""
    out = []
    for e in range(cfg.episodes_per_iteration):
        k = it * cfg.episodes_per_iteration + e
        out.append((k, cfg.shapes[k % len(cfg.shapes)], cfg.traces[(k // len(cfg.shapes)) % len(cfg.traces)],
                    cfg.seed * 100_000 + k))
    return out


def net_from_arrays(arrays: dict[str, np.ndarray], hidden: int, feature_schema: int) -> SetPolicyNet:
    """A :class:`SetPolicyNet` with these weights (by state-dict name, as :meth:`SetPolicyNet.arrays` gives);
    a missing, extra or mis-shaped array is a ``ValueError`` naming it."""
    net = SetPolicyNet(hidden, feature_schema)
    want = net.state_dict()
    missing, extra = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
    if missing or extra:
        raise ValueError(f"weights do not fit a {hidden}-wide set network (feature schema v{feature_schema}): "
                         f"missing {missing or 'none'}, unexpected {extra or 'none'}")
    for k, v in want.items():
        if tuple(np.shape(arrays[k])) != tuple(v.shape):
            raise ValueError(f"weights: {k} has shape {tuple(np.shape(arrays[k]))}, a {hidden}-wide set network "
                             f"(feature schema v{feature_schema}) needs {tuple(v.shape)}")
    net.load_state_dict({k: torch.as_tensor(np.asarray(arrays[k], np.float32)) for k in want})
    return net.eval()


def label_episode(cfg: DaggerConfig, weights: dict[str, np.ndarray] | None, beta: float, shape: tuple[int, int],
                  trace: str, seed: int, k: int) -> tuple[Dataset, dict[str, Any]]:
    """One episode's labelled states on their own (:func:`collect_episode` with the learner rebuilt from numpy
    ``weights``, None for the teacher alone, and the teacher/learner coin seeded by ``(cfg.seed, k)``), so
    that episodes can run anywhere, in any order, and still give the same data set. Runs in a Ray task."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-row forward passes: more threads only contend
    try:
        net = None if weights is None else net_from_arrays(weights, cfg.hidden, cfg.feature_schema)
        data = Dataset()
        counts = collect_episode(cfg, net, beta, shape, trace, seed, data, np.random.default_rng([cfg.seed, k]))
    finally:
        torch.set_num_threads(threads)
    return data, counts


class RayLabeller:
    """Runs :func:`label_episode` as Ray tasks: a local Ray (``num_cpus`` CPUs, default all) or the cluster at
    ``address``; the learner's weights go to the object store once per iteration as numpy arrays."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        import os

        import ray  # ModuleNotFoundError names the 'rl' extra at the command line

        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            env = {"env_vars": {"OMP_NUM_THREADS": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}}
            if address is None:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=env)
            else:
                ray.init(address=address, log_to_driver=False, runtime_env=env)
            self.started = True
        self.task = ray.remote(num_cpus=1)(label_episode)
        # start the workers and import the simulator and torch in each now, not in the first iteration's time
        n = int(num_cpus or ray.available_resources().get("CPU", 1))
        ray.get([ray.remote(num_cpus=1)(_warm).remote() for _ in range(max(n, 1))])

    def __call__(self, cfg: DaggerConfig, weights: dict[str, np.ndarray] | None, beta: float,
                 plan: list[tuple[int, tuple[int, int], str, int]]) -> list[tuple[Dataset, dict[str, Any]]]:
        w = self.ray.put(weights)
        refs = [self.task.remote(cfg, w, beta, shape, trace, seed, k) for k, shape, trace, seed in plan]
        return self.ray.get(refs)  # in the plan's order, whichever task finished first

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False


def _warm() -> int:
    import deflectlab.envs.gym_env  # noqa: F401
    import deflectlab.policies.lookahead  # noqa: F401

    return torch.get_num_threads()


def _sequential(cfg: DaggerConfig, weights: dict[str, np.ndarray] | None, beta: float,
                plan: list[tuple[int, tuple[int, int], str, int]]) -> list[tuple[Dataset, dict[str, Any]]]:
    return [label_episode(cfg, weights, beta, shape, trace, seed, k) for k, shape, trace, seed in plan]


def train_dagger(cfg: DaggerConfig, out: Path | None = None, *, labeller: Any = None,
                 init: SetPolicyNet | None = None, tracker: Any = None) -> tuple[SetPolicyNet, dict[str, Any]]:
    """Run DAgger; returns the network and a log (per iteration: episodes, learner-planner agreement on the
    visited states before retraining, training accuracy, labelling and fitting wall time, labelled states/s).

    :param labeller: how an iteration's episodes run: None plays them one after another here, a
        :class:`RayLabeller` runs them as Ray tasks (the same data set either way).
    :param init: start from this network (a copy; its width and feature schema must match ``cfg``): the learner
        then acts from the first iteration on, and with ``cfg.iterations == 0`` it is returned unchanged.
    :param tracker: a W&B run (or anything with ``log(dict, step=)``) that gets each iteration's metrics.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if init is not None:
        if (init.hidden, init.feature_schema) != (cfg.hidden, cfg.feature_schema):
            raise ValueError(f"dagger: the initial network is {init.hidden} wide with feature schema "
                             f"v{init.feature_schema}; the config asks {cfg.hidden} and v{cfg.feature_schema}")
        net = net_from_arrays(init.arrays(), cfg.hidden, cfg.feature_schema)
    else:
        net = SetPolicyNet(cfg.hidden, cfg.feature_schema).eval()
    run = labeller or _sequential
    data = Dataset()
    log: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for it in range(cfg.iterations):
        beta = cfg.beta0 * cfg.beta_decay ** it
        t_lab, c_lab = time.perf_counter(), time.process_time()
        done = run(cfg, net.arrays() if (it or init is not None) else None, beta, episode_plan(cfg, it))
        lab_s, lab_cpu = time.perf_counter() - t_lab, time.process_time() - c_lab
        eps = []
        for part, counts in done:
            data.extend(part)
            eps.append(counts)
        t_fit = time.perf_counter()
        acc = fit(net, data, cfg, gen)
        dec = sum(e["decisions"] for e in eps)
        row = {"iteration": it, "beta": beta, "episodes": eps, "states": len(data), "labelled": dec,
               "majority_label_share": majority_share(data),
               "learner_agreement_before_fit": (sum(e["agree"] for e in eps) / max(dec, 1)
                                                if it or init is not None else None),
               "train_accuracy": acc, "label_wall_s": lab_s, "label_driver_cpu_s": lab_cpu,
               "labelled_per_s": dec / lab_s if lab_s > 0 else float("nan"),
               "fit_wall_s": time.perf_counter() - t_fit, "wall_s": time.perf_counter() - t0}
        log.append(row)
        if tracker is not None:
            tracker.log({f"dagger/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and v is not None
                         and k != "iteration"}, step=it)
    result = {"config": asdict(cfg), "iterations": log, "wall_s": time.perf_counter() - t0, "states": len(data),
              "labeller": "ray" if isinstance(labeller, RayLabeller) else "sequential"}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "dagger_log.json").write_text(json.dumps(result, indent=1, default=str))
    return net, result


def majority_share(data: Dataset) -> float:
    """Accuracy of always answering each shape's most common label (what a network must beat)."""
    total = len(data)
    return sum(int(np.bincount(v).max()) for v in data.label.values()) / total if total else float("nan")


def action_agreement(net: SetPolicyNet, data: Dataset) -> float:
    """Share of the data set's labels the network's greedy masked action reproduces."""
    hit = total = 0
    for shape, obs in data.obs.items():
        x = torch.as_tensor(np.stack(obs))
        m = np.stack(data.mask[shape])
        with torch.no_grad():
            logits = net(*split_obs(x, *shape, net.feature_schema))[0].numpy()
        for i, y in enumerate(data.label[shape]):
            hit += int(masked_argmax(logits[i], m[i]) == y)
            total += 1
    return hit / total if total else float("nan")


def finetune_ppo(net: SetPolicyNet, shape: tuple[int, int], cfg: DaggerConfig, steps: int,
                 reward: str = "attainment", lr: float = 3e-5, value_warmup: int = 0,
                 vf_coef: float = 0.5) -> tuple[SetPolicyNet, dict[str, Any]]:
    """MaskablePPO fine-tuning of the imitation network on one shape (training windows of ``cfg``), started
    from its weights; returns the fine-tuned network (a copy) and steps/s and wall time.

    The imitation network's value head was never trained, and the value loss reaches the encoders the policy
    shares with it. ``value_warmup`` steps (of ``steps``) first train the value head alone (every other weight
    frozen, so the policy does not move); ``vf_coef`` weighs the value loss against the policy's afterwards.
    """
    import copy

    from sb3_contrib import MaskablePPO

    from deflectlab.agents.setnet import make_set_policy_class
    from deflectlab.envs.gym_env import DeflectionEnv

    if not 0 <= value_warmup <= steps:
        raise ValueError(f"finetune_ppo: value_warmup {value_warmup} must be in [0, steps={steps}]")
    env = DeflectionEnv(trace=cfg.traces[0], load=list(cfg.loads), window_s=cfg.window_s,
                        window_start_s=list(cfg.window_start_s), reward=reward, feature_schema=net.feature_schema,
                        cluster={"num_prefill": shape[0], "num_decode": shape[1], "handoff": cfg.handoff})
    model = MaskablePPO(make_set_policy_class(), env, learning_rate=lr, n_steps=512, batch_size=128, n_epochs=4,
                        clip_range=0.1, vf_coef=vf_coef, seed=cfg.seed, device="cpu",
                        policy_kwargs={"num_prefill": shape[0], "num_decode": shape[1], "hidden": net.hidden,
                                       "feature_schema": net.feature_schema})
    set_net = model.policy.set_net
    set_net.load_state_dict(net.state_dict())
    t0 = time.perf_counter()
    if value_warmup > 0:
        for name, p in set_net.named_parameters():
            p.requires_grad_(name.startswith("value."))
        model.learn(value_warmup)
        for p in set_net.parameters():
            p.requires_grad_(True)
    if steps - value_warmup > 0:
        model.learn(steps - value_warmup, reset_num_timesteps=value_warmup == 0)
    wall = time.perf_counter() - t0
    out = copy.deepcopy(set_net).eval()
    ran = int(model.num_timesteps)  # whole rollouts of 512 steps: a little over ``steps``
    return out, {"steps": steps, "timesteps": ran, "value_warmup": value_warmup,
                 "vf_coef": vf_coef, "lr": lr, "reward": reward,
                 "wall_s": wall, "steps_per_s": ran / wall if wall > 0 else float("nan")}
