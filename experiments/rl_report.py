"""The RL report (``deflectlab rl-report``): learning curves over seeds and a paired held-out evaluation.

Inputs are training run directories (``agents.train``): each holds ``config.json``, ``evaluations.json`` (the
periodic evaluation on the config's evaluation seeds: the learning curve), ``evaluation.json`` (the baselines
on the same episodes) and ``result.json`` (steps/s, wall time). Runs are grouped by their config's ``name``.

The final evaluation replays fresh held-out episodes (windows starting in ``HELD_OUT_START_S`` of the trace,
seeds ``seed0 + i``, drawn as the environment draws them) at each load, with every policy on the same episodes:
never-deflect, the proactive deflector, the best tuned heuristic and each run's final network. Differences are
paired per episode against the best tuned heuristic, with 95 % Student-t intervals.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

#: held-out evaluation windows start here (trace seconds); training windows start in [0, 900] s
HELD_OUT_START_S = (1200.0, 1488.0)


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """One training run's curve, baselines, speed and config summary."""
    d = Path(run_dir)
    for f in ("config.json", "evaluations.json", "result.json", "evaluation.json"):
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d}: no {f}; is this a finished training run directory?")
    cfg = json.loads((d / "config.json").read_text())
    curve = json.loads((d / "evaluations.json").read_text())
    res = json.loads((d / "result.json").read_text())
    ev = json.loads((d / "evaluation.json").read_text())
    base = {k: v["pooled"]["slo_attainment"] for k, v in ev["policies"].items() if k != "learned"}
    return {"run_dir": str(d), "name": cfg["name"], "seed": cfg["seed"], "reward": cfg["env"]["reward"],
            "actions": cfg["env"].get("actions", "nodes"), "gamma": cfg["algo_params"].get("gamma", 0.99),
            "pretrain": (cfg.get("pretrain") or {}).get("expert"),
            "n_epochs": cfg["algo_params"].get("n_epochs", 10),
            "learning_rate": cfg["algo_params"].get("learning_rate"),
            "best": max((float(r["slo_attainment"]) for r in curve), default=math.nan),
            "curve": [[int(r["timesteps"]), float(r["slo_attainment"])] for r in curve],
            "baselines": base, "timesteps": res["timesteps"], "wall_s": res["wall_s"],
            "steps_per_s": res["steps_per_s"], "final": res["objective"]}


def group_curves(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per run name: the seeds' curves on their common steps, their mean and min/max, and the baselines."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        rs = sorted((r for r in runs if r["name"] == name), key=lambda r: r["seed"])
        steps = sorted(set.intersection(*(set(s for s, _ in r["curve"]) for r in rs)))
        ys = np.array([[dict(map(tuple, r["curve"]))[s] for s in steps] for r in rs], float)
        out[name] = {"seeds": [r["seed"] for r in rs], "steps": steps,
                     "mean": ys.mean(axis=0).tolist() if len(rs) else [],
                     "min": ys.min(axis=0).tolist() if len(rs) else [],
                     "max": ys.max(axis=0).tolist() if len(rs) else [],
                     "final": [r["final"] for r in rs], "baselines": rs[0]["baselines"],
                     "wall_s": [r["wall_s"] for r in rs], "steps_per_s": [r["steps_per_s"] for r in rs],
                     "timesteps": [r["timesteps"] for r in rs]}
    return out


def plot_curves(runs: list[dict[str, Any]], groups: dict[str, dict[str, Any]], path: Path) -> Path:
    """One panel per run name: each seed's curve, the mean, the baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    names = list(groups)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        g = groups[name]
        for r in (r for r in runs if r["name"] == name):
            x, y = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
            ax.plot(x, y, lw=0.8, alpha=0.6, label=f"seed {r['seed']}")
        ax.plot(g["steps"], g["mean"], color="k", lw=2, label="mean")
        for (b, v), ls in zip(g["baselines"].items(), ("--", ":", "-.", "--"), strict=False):
            ax.axhline(v, color="grey", ls=ls, lw=1, label=b)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k"))
        ax.set_xlabel("environment steps (decisions)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("periodic evaluation SLO attainment (pooled)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def held_out_episode(load: float, seed: int, window_s: float, trace: str = "azure_code") -> tuple[Any, Any]:
    """The cluster config and workload of one held-out episode (2P2D defaults, windows in HELD_OUT_START_S)."""
    from deflectlab.envs.gym_env import DeflectionEnv

    env = DeflectionEnv(trace=trace, load=[load, load], window_s=window_s, window_start_s=list(HELD_OUT_START_S))
    return env.config, env.episode_workload(seed=seed)[0]


def learned_policy(run_dir: str | Path, which: str = "final") -> Any:
    """A run's network as an in-process policy (its action space from its config)."""
    from deflectlab.agents.evaluation import NetPolicy
    from deflectlab.agents.policy_io import load_policy_net

    net, cfg, _ = load_policy_net(run_dir, which)
    return NetPolicy(net, actions=cfg.env.actions)


def final_eval(learned: dict[str, str], loads: tuple[float, ...] = (1.0, 2.0, 3.0), episodes: int = 20,
               window_s: float = 300.0, seed0: int = 2_000_000, which: str = "final") -> dict[str, Any]:
    """Heuristics and ``learned`` (label -> run directory) on the same held-out episodes of each load."""
    from deflectlab.envs.simulator import ClusterSim
    from deflectlab.experiments.headroom import baseline_policies, winner_label
    from deflectlab.policies.registry import make_policy

    heur = baseline_policies()
    rows = []
    t0 = time.perf_counter()
    for load in loads:
        for i in range(episodes):
            cfg, wl = held_out_episode(load, seed0 + i, window_s)
            pols = {**{k: make_policy(v) for k, v in heur.items()},
                    **{k: learned_policy(v, which) for k, v in learned.items()}}
            for label, pol in pols.items():
                sim = ClusterSim(cfg, wl)
                s = sim.run(pol).summary
                n = s["requests"]
                rows.append({"policy": label, "load": load, "seed": seed0 + i, "requests": n,
                             "slo_met": round(s["slo_attainment"] * n), "slo_attainment": s["slo_attainment"],
                             "ttft_p95_s": s["ttft_s"]["p95"], "deflected": sim.deflections / n if n else math.nan})
    best = winner_label(heur)
    return {"heuristics": heur, "learned": learned, "best": best, "loads": list(loads), "episodes": episodes,
            "window_s": window_s, "seed0": seed0, "which": which, "rows": rows,
            "wall_s": time.perf_counter() - t0}


def paired_table(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (load, policy): pooled SLO attainment, mean P95 TTFT, deflected share, and the paired per-episode
    difference against the best tuned heuristic (mean, 95 % half-width, episodes better / worse); also against
    the heuristic with the highest pooled SLO attainment at that load on these episodes (``top_heuristic``),
    which need not be the tuned one."""
    from deflectlab.experiments.headroom import paired_ci, pooled

    def sel(load: float, lab: str) -> list[dict[str, Any]]:
        return sorted((r for r in ev["rows"] if r["load"] == load and r["policy"] == lab), key=lambda r: r["seed"])

    out = []
    labels = list(ev["heuristics"]) + list(ev["learned"])
    for load in ev["loads"]:
        ref = [r["slo_attainment"] for r in sel(load, ev["best"])]
        top = max(ev["heuristics"], key=lambda h: pooled(sel(load, h)))
        ref_top = [r["slo_attainment"] for r in sel(load, top)]
        for lab in labels:
            rs = sel(load, lab)
            a = [r["slo_attainment"] for r in rs]
            mean, half = paired_ci(a, ref)
            top_mean, top_half = paired_ci(a, ref_top)
            diff = np.asarray(a) - np.asarray(ref)
            out.append({"load": load, "policy": lab, "episodes": len(rs), "slo_attainment": pooled(rs),
                        "ttft_p95_s": float(np.mean([r["ttft_p95_s"] for r in rs])),
                        "deflected": float(np.mean([r["deflected"] for r in rs])),
                        "diff_vs_best": mean, "ci95": half, "better": int((diff > 1e-12).sum()),
                        "worse": int((diff < -1e-12).sum()), "top_heuristic": top, "diff_vs_top": top_mean,
                        "ci95_top": top_half})
    return out


def _fmt_pm(mean: float, half: float) -> str:
    if math.isnan(half):
        return f"{100 * mean:+.2f}"
    return f"{100 * mean:+.2f} ± {100 * half:.2f}"


def ablation_markdown(runs: list[dict[str, Any]]) -> list[str]:
    """One row per ablation run: what it changed and where it got."""
    from deflectlab.experiments.markdown import table

    head = ["run", "reward", "actions", "gamma", "epochs", "lr", "steps", "final SLO att.", "best periodic",
            "baselines", "wall s"]
    body = [[r["name"], json.dumps(r["reward"]) if not isinstance(r["reward"], str) else r["reward"], r["actions"],
             r["gamma"], r["n_epochs"], r["learning_rate"], r["timesteps"], f"{r['final']:.3f}", f"{r['best']:.3f}",
             "; ".join(f"{k} {v:.3f}" for k, v in r["baselines"].items()), f"{r['wall_s']:.0f}"] for r in runs]
    return table(head, body)


def report_markdown(groups: dict[str, dict[str, Any]], table_rows: list[dict[str, Any]], ev: dict[str, Any],
                    diagnosis_md: str | None, command: str, ablation: list[dict[str, Any]] | None = None) -> str:
    """report.md: diagnosis, learning curves, speed, the paired held-out table."""
    from deflectlab.experiments.markdown import table

    lines = ["# RL on the deflection environment: from scratch and fine-tuned", "",
             f"Generated by `{command}`.", ""]
    if diagnosis_md:
        lines += ["## Diagnosis: what RL from scratch faces (no training)", "", diagnosis_md, ""]
    if ablation:
        lines += ["## Ablation (one seed each, seed 0; same held-out periodic evaluation as the curves)", "",
                  *ablation_markdown(ablation), ""]
    lines += ["## Learning curves (periodic evaluation on each run's `eval.env` windows, held out in the configs of "
              "experiments/rl; same episodes for every policy)", "",
              "![curves](curves.png)", ""]
    head = ["run", "seeds", "final SLO att. per seed", "curve mean at the end", "baselines on the same episodes",
            "steps per seed", "steps/s (RL only)", "wall s per seed"]
    body = []
    for name, g in groups.items():
        body.append([name, ",".join(map(str, g["seeds"])), ", ".join(f"{v:.3f}" for v in g["final"]),
                     f"{g['mean'][-1]:.3f}" if g["mean"] else "-",
                     "; ".join(f"{k} {v:.3f}" for k, v in g["baselines"].items()),
                     ", ".join(str(t) for t in g["timesteps"]), ", ".join(f"{v:.0f}" for v in g["steps_per_s"]),
                     ", ".join(f"{v:.0f}" for v in g["wall_s"])])
    lines += [*table(head, body), ""]
    lines += [f"## Final held-out evaluation ({ev['episodes']} episodes per load, {ev['window_s']:g}-s windows "
              f"starting in [{HELD_OUT_START_S[0]:g}, {HELD_OUT_START_S[1]:g}] s, seeds {ev['seed0']}.., "
              f"{ev['which']} networks; {ev['wall_s']:.0f} s)", "",
              f"Paired difference = policy minus the best tuned heuristic ({ev['best']}), SLO attainment points "
              "per episode, mean ± 95 % interval; better/worse = episodes. The top heuristic is the one with the "
              "highest pooled SLO attainment at that load on these episodes.", ""]
    head = ["load", "policy", "SLO att. (pooled)", "mean P95 TTFT s", "deflected", "diff vs best tuned (points)",
            "better / worse", "diff vs top heuristic here"]
    body = [[f"{r['load']:g}x", r["policy"], f"{r['slo_attainment']:.3f}", f"{r['ttft_p95_s']:.2f}",
             f"{r['deflected']:.2f}", "-" if r["policy"] == ev["best"] else _fmt_pm(r["diff_vs_best"], r["ci95"]),
             "-" if r["policy"] == ev["best"] else f"{r['better']} / {r['worse']}",
             "-" if r["policy"] == r["top_heuristic"] else
             f"{_fmt_pm(r['diff_vs_top'], r['ci95_top'])} ({r['top_heuristic']})"] for r in table_rows]
    lines += [*table(head, body), ""]
    return "\n".join(lines)


def log_wandb(res: dict[str, Any], out: Path, wandb_dir: Path, mode: str = "offline") -> str | None:
    """The final evaluation (a table of the paired rows, pooled SLO attainment per policy and load) and the curves
    image as one W&B run (offline unless ``mode`` says otherwise); returns the run's directory."""
    if mode == "disabled":
        return None
    from deflectlab.agents.tracking import quiet_wandb_env

    quiet_wandb_env(mode)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    import wandb

    run = wandb.init(project="deflectlab", group="rl-report", name="rl-report", dir=str(wandb_dir), mode=mode,
                     config={"command": res["command"], "episodes": res["final_eval"]["episodes"],
                             "loads": res["final_eval"]["loads"]}, reinit="finish_previous")
    cols = ["load", "policy", "slo_attainment", "ttft_p95_s", "deflected", "diff_vs_best", "ci95", "better", "worse"]
    run.log({"final/paired": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in res["paired"]]),
             "final/curves": wandb.Image(str(out / "curves.png")),
             **{f"final/{r['policy']}/{r['load']:g}x/slo_attainment": r["slo_attainment"] for r in res["paired"]}})
    d = str(run.dir)
    run.finish()
    return d


def write_report(run_dirs: list[str | Path], out: Path, learned: dict[str, str], command: str,
                 episodes: int = 20, loads: tuple[float, ...] = (1.0, 2.0, 3.0), window_s: float = 300.0,
                 diagnosis: bool = True, which: str = "final", wandb_dir: Path | None = None,
                 wandb_mode: str = "offline", ablation_dirs: list[str | Path] | None = None) -> dict[str, Any]:
    """Curves, final evaluation and report into ``out`` (``report.md``, ``curves.png``, ``results.json``), and
    the final evaluation to W&B under ``wandb_dir`` (default ``out/wandb``; offline by default)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [read_run(d) for d in run_dirs]
    ablation = [read_run(d) for d in ablation_dirs or []]
    groups = group_curves(runs)
    plot_curves(runs, groups, out / "curves.png")
    diag = diag_md = None
    if diagnosis:
        from deflectlab.experiments.rl_diagnosis import diagnose, diagnosis_markdown

        diag = diagnose()
        diag_md = diagnosis_markdown(diag)
    ev = final_eval(learned, loads, episodes, window_s, which=which)
    rows = paired_table(ev)
    res = {"command": command, "runs": runs, "groups": groups, "final_eval": ev, "paired": rows,
           "diagnosis": diag, "ablation": ablation}
    (out / "results.json").write_text(json.dumps(res, separators=(",", ":"), default=float))
    (out / "report.md").write_text(report_markdown(groups, rows, ev, diag_md, command, ablation))
    res["wandb_run_dir"] = log_wandb(res, out, wandb_dir or out / "wandb", wandb_mode)
    return res
