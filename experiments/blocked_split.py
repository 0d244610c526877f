"""The blocked split: heuristics tuned and policies trained on alternating 300-s blocks of the trace, everything
compared on the blocks in between.

The main evaluation holds out the last third of each Azure trace ([1200, end) s, the ``time`` split of
``envs.splits``). That is one stretch of one day: if it differs from the first two thirds, a learned policy
is judged on a regime it never saw and the heuristics on one they were not tuned for. The ``blocked`` split
alternates 300-s blocks instead, training on [0, 300), [600, 900), [1200, 1500) s and holding out [300, 600),
[900, 1200), [1500, end) s, so both sides sample the whole trace (blocked cross-validation of a time series; a
120-s window never straddles two blocks). Nothing here reads a held-out block before the evaluation:

1. ``tune``: every heuristic with a tuning grid (``experiments.tuning.GRIDS``, except the prefix-cache one: the
   Azure traces carry no block hashes), and the proactive deflector over :data:`PROACTIVE_GRID`, is
   grid-searched on training-block episodes of the code trace on 2P2D at 1x, 2x and 3x load, drawn as the
   environment draws them (``experiments.headroom.episode``), with seeds of their own. The objective is the
   mean SLO attainment over those episodes, ties broken by the lower mean P95 TTFT, as ``deflectlab tune``'s.
   Never-deflect and the proactive deflector as shipped are scored on the same episodes, and the best of all
   is the *tuning winner*, the rule one would deploy having seen the training blocks only. Writes
   ``tuned_blocked.yaml`` (the format ``experiments.tuning`` reads).
2. Training: ``deflectlab dagger --split blocked --teacher <the tuned winner>`` and ``deflectlab es --split
   blocked --init ...`` (the split keeps every training and validation window inside a training block).
3. ``evaluate``: never-deflect, the proactive deflector, every tuned heuristic, the learned policies and
   (``--planner``) the clairvoyant lookahead planner replay the same held-out-block episodes; each learned
   policy's paired per-episode differences are reported against the tuning winner (chosen before the
   evaluation) and against the best heuristic of each setting chosen *after* seeing the held-out results (a
   baseline no deployable rule can beat).

``evaluate --causal-planners`` (or ``--planners NAME,...``) also runs planners that split the clairvoyant
planner's headroom into what needs the future and what does not (:data:`PLANNERS`). ``predictability`` measures
how much the last seconds of arrivals tell of the next ones at each decision point of the held-out blocks, and
how well that relation, fitted on the training blocks, carries over (:func:`predictability`).

``select`` picks one of several trained candidates (seeds of one recipe, say) without reading a held-out block:
each candidate and the tuning winner replay fresh training-block episodes of the tuning settings (seeds of their
own, neither the tuning's nor the evaluation's), and the candidate with the highest mean per-episode SLO
attainment over those loads is the pick. The rule is fixed here, before any candidate is scored.

    python -m deflectlab.experiments.blocked_split tune --out experiments/blocked --jobs 2
    python -m deflectlab.experiments.blocked_split evaluate --out experiments/blocked --episodes 20 --jobs 2 \\
        --learned es=learned:path=experiments/blocked/es/policy --planner
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from deflectlab.envs.splits import describe, get_split
from deflectlab.experiments.headroom import WINNER_PREFIX, paired_ci, planner_spec, pooled, run_all, winner_label
from deflectlab.experiments.labels import labelled
from deflectlab.experiments.markdown import table

SPLIT = get_split("blocked")
WINDOW_S = 120.0
#: tuning on 2P2D code-trace episodes at these loads (x the window's recorded rate), seeds of their own
TUNE_TRACE, TUNE_LOADS, TUNE_SEED0, TUNE_EPISODES = "azure_code", (1.0, 2.0, 3.0), 5_000_000, 10
#: heuristics tuned (prefix_affinity is left out: with no block hashes it is a load balancer)
TUNED = ("length_threshold", "queue_threshold", "dynamo_isl", "dynamo_load", "dynamo_isl_or_load")
#: the proactive deflector's own grid (not in experiments.tuning.GRIDS, whose shipped tuning leaves it at its
#: defaults): the margin against the other path and the smallest chunk worth deflecting (its default 512 was
#: chosen on the time split's training windows; see policies/proactive.py)
PROACTIVE_GRID = {"margin": (0.0, 0.1, 0.2), "min_chunk": (128, 512, 1024, 2048)}
#: heuristics scored as they ship, on the same episodes (the winner is the best of all)
UNTUNED = ("round_robin", "proactive")
EVAL_SEED0 = 6_000_000
#: the select step's episodes: training blocks, the tuning's trace, shape and loads, seeds of their own
SELECT_SEED0, SELECT_EPISODES = 7_000_000, 40
TRAIN = {"label": "training blocks", "start_s": [list(r) for r in SPLIT.starts("train", WINDOW_S)]}
HELD = {"label": "held-out blocks", "start_s": [list(r) for r in SPLIT.starts("held_out", WINDOW_S)]}
GAMMA4 = {**HELD, "label": "held-out blocks, gamma CV 4", "arrival": "gamma", "cv": 4.0}
SETTINGS: list[tuple] = (
    [((2, 2), tr, ld, HELD) for tr in ("azure_code", "azure_conv") for ld in (1.0, 2.0, 3.0)]
    + [((3, 3), "azure_code", 3.0, HELD), ((4, 4), "azure_code", 3.0, HELD), ((2, 2), "azure_code", 2.0, GAMMA4)]
)


# -- 1. tuning on the training blocks --------------------------------------------------------------------------
def tune(jobs: int = 1, episodes: int = TUNE_EPISODES, policies: tuple[str, ...] = (*TUNED, "proactive")
         ) -> dict[str, Any]:
    """Grid-search each of ``policies`` on training-block episodes; returns the tuned-file document."""
    from deflectlab.experiments.tuning import grid_specs

    specs = {spec: (p, params) for p in policies
             for params, spec in grid_specs(p, PROACTIVE_GRID if p == "proactive" else None)}
    specs.update({name: (name, None) for name in UNTUNED})
    tasks = [(TUNE_TRACE, ld, TUNE_SEED0 + i, WINDOW_S, "vllm-nixl", spec, (2, 2), TRAIN)
             for ld in TUNE_LOADS for i in range(episodes) for spec in specs]
    t0 = time.perf_counter()
    rows = run_all(tasks, jobs)
    by_spec: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_spec.setdefault(r["policy"], []).append(r)
    trials: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
    untuned: dict[str, dict[str, float]] = {}
    for spec, (p, params) in specs.items():
        rs = by_spec[spec]
        p95 = [r["ttft_p95_s"] for r in rs if math.isfinite(r["ttft_p95_s"])]
        score = {"slo_attainment": round(float(np.mean([r["slo_attainment"] for r in rs])), 6),
                 "ttft_p95_s": round(float(np.mean(p95)), 6) if p95 else math.inf}
        if params is None:
            untuned[p] = score
        else:
            trials[p].append({"params": params, **score})
    for t in trials.values():
        t.sort(key=lambda x: (-x["slo_attainment"], x["ttft_p95_s"]))
    return {
        "meta": {"objective": "mean SLO attainment over the training-block episodes; ties: lower mean P95 TTFT",
                 "split": SPLIT.name, "trace": TUNE_TRACE, "shape": "2P2D", "loads": list(TUNE_LOADS),
                 "seeds": [TUNE_SEED0, TUNE_SEED0 + episodes - 1], "window_s": WINDOW_S,
                 "window_starts": describe(SPLIT.starts("train", WINDOW_S)),
                 "wall_s": round(time.perf_counter() - t0, 1)},
        "policies": {p: dict(t[0]["params"]) for p, t in trials.items()},
        "scores": {p: {k: t[0][k] for k in ("slo_attainment", "ttft_p95_s")} for p, t in trials.items()},
        # the heuristics with nothing to tune, on the same episodes: they compete for the winner too
        "untuned_scores": untuned,
        "trials": trials,
    }


def heuristics(tuned_file: Path) -> dict[str, str]:
    """never-deflect and proactive as they ship, and every tuned heuristic; the best of them all on the training
    blocks (the winner, fixed before any held-out episode is played) is labelled ``best tuned (...)``."""
    from deflectlab.experiments.tuning import load_tuned

    tuned, _ = load_tuned(tuned_file)
    doc = yaml.safe_load(tuned_file.read_text())
    untuned = doc.get("untuned_scores") or {}
    cands = [(label, name, untuned.get(name)) for name, label in (("round_robin", "never_deflect"),
                                                                   ("proactive", "proactive"))]
    cands += [(f"{name} (tuned)", name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else ""),
               doc["scores"][name]) for name, params in tuned.items()]
    scored = [c for c in cands if c[2] is not None]
    win = max(scored, key=lambda c: (c[2]["slo_attainment"], -c[2]["ttft_p95_s"]))[0]
    return {(f"{WINNER_PREFIX} ({label.removesuffix(' (tuned)')})" if label == win else label): spec
            for label, spec, _ in cands}


# -- 3. evaluation on the held-out blocks ------------------------------------------------------------------------
#: where the planner runs with --planner (it is slow): the 2P2D code-trace settings of the headroom table
PLANNER_SETTINGS = [s for s in SETTINGS if s[0] == (2, 2) and s[1] == "azure_code" and s[3] is HELD]


#: the planners ``evaluate`` can run (label: horizon in seconds, extra parameters), the clairvoyant one first; the
#: others split its headroom: the myopic planner plays each decision against the present state alone (no future
#: arrival), also with the output lengths of requests not yet decoding replaced by a recent mean (what a router
#: can know); the replay one plays against a causal persistence forecast of the arrivals, and the analog one against
#: four futures drawn from the training blocks, after moments as busy as the present (policies.forecasts)
PLANNERS = {"lookahead (clairvoyant)": (2.0, ""), "lookahead (myopic)": (0.0, ""),
            "lookahead (myopic, mean outputs)": (0.0, ",outputs=mean"),
            "lookahead (replay forecast)": (2.0, ",forecast=replay"),
            "lookahead (analog forecast)": (2.0, ",forecast=analog,samples=4,pool_split=blocked,pool_part=train")}
CLAIRVOYANT = next(iter(PLANNERS))
#: what each planner of :data:`PLANNERS` knows, as the planners' section says it
PLANNER_DOCS = {
    "lookahead (clairvoyant)": "the clairvoyant planner reads the window's future arrivals",
    "lookahead (myopic)": "the myopic one plays each decision against the present state alone",
    "lookahead (myopic, mean outputs)": "the myopic one with mean outputs also takes a recent mean for the output "
                                        "length of every request not yet decoding",
    "lookahead (replay forecast)": "the replay one plays against a persistence forecast (the last 2 s of arrivals "
                                   "again)",
    "lookahead (analog forecast)": "the analog one plays against four futures drawn from the training blocks, after "
                                   "moments with as many arrivals in the last 2 s as the present (or nearly)",
}
#: ``--planners`` names: the label's words in brackets, joined by "-" (clairvoyant, myopic, myopic-mean-outputs,
#: replay-forecast, analog-forecast)
PLANNER_NAMES = {"-".join(k[k.index("(") + 1:-1].replace(",", "").split()): k for k in PLANNERS}


def evaluate(tuned_file: Path, learned: dict[str, str], episodes: int, jobs: int, planner: bool,
             settings: list[tuple] | None = None, causal: bool = False, planners: tuple[str, ...] = ()
             ) -> dict[str, Any]:
    """Every heuristic of ``tuned_file`` and the ``learned`` policies on ``episodes`` held-out-block episodes of
    each setting; with ``planner``, also the clairvoyant planner on :data:`PLANNER_SETTINGS` (among ``settings``),
    with ``causal`` the other :data:`PLANNERS` there too, and those labelled in ``planners`` as well."""
    from deflectlab.experiments.learned_eval import evaluate_learned, parse_setting

    heur = heuristics(tuned_file)
    best = winner_label(heur)
    for label, spec in learned.items():
        if spec in heur.values():
            raise ValueError(f"blocked_split: {label!r} runs {spec!r}, which the heuristics run already")
    settings = settings or SETTINGS
    res = evaluate_learned(learned, settings, episodes, window_s=WINDOW_S, seed0=EVAL_SEED0, jobs=jobs,
                           heuristics=heur)
    kinds = [k for k in PLANNERS if (k == CLAIRVOYANT and planner) or (k != CLAIRVOYANT and causal) or k in planners]
    if kinds:
        specs = {k: planner_spec(PLANNERS[k][0], heur[best]) + PLANNERS[k][1] for k in kinds}
        where = [parse_setting(p) for p in PLANNER_SETTINGS]
        tasks = [(tr, ld, EVAL_SEED0 + i, WINDOW_S, "vllm-nixl", spec, shape, var)
                 for shape, tr, ld, var in map(parse_setting, settings) if (shape, tr, ld, var) in where
                 for spec in specs.values() for i in range(episodes)]
        t0 = time.perf_counter()
        res["rows"] += run_all(tasks, jobs)
        res["policies"].update(specs)
        res["wall_s"] += time.perf_counter() - t0
    res["heuristics"] = list(heur)
    res["learned"] = list(learned)
    return res


def _setting_rows(res: dict[str, Any], setting: list) -> dict[str, list[dict[str, Any]]]:
    from deflectlab.experiments.learned_eval import parse_setting, select_rows

    (p, d), tr, ld, var = parse_setting(setting)
    return {k: select_rows(res["rows"], f"{p}P{d}D", tr, ld, spec, var.get("label", ""))
            for k, spec in res["policies"].items()}


def _diff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[float, float]:
    if [r["seed"] for r in a] != [r["seed"] for r in b]:
        raise ValueError("paired policies ran on different episodes")
    return paired_ci([r["slo_attainment"] for r in a], [r["slo_attainment"] for r in b])


def _fmt(d: tuple[float, float] | None) -> str:
    return "n/a" if d is None else f"{100 * d[0]:+.2f} ± {100 * d[1]:.2f}"


def _best_ex_post(heur: list[str], rows: dict[str, list[dict[str, Any]]]) -> str:
    """The best heuristic of one setting, chosen after seeing its held-out results (mean per-episode attainment)."""
    return max(heur, key=lambda k: np.mean([r["slo_attainment"] for r in rows[k]]))


def diff_table(res: dict[str, Any], only: str | None = None) -> tuple[list[str], list[list[Any]], list[str]]:
    """Per setting and learned policy: paired differences against the tuning winner, the best heuristic ex post
    and proactive (and the planner's headroom with the share of it closed, when the planner ran); with the lines
    where a learned policy's interval lies entirely below zero. ``only``: that learned policy alone."""
    pols, heur = res["policies"], res["heuristics"]
    learned = [only] if only else res["learned"]
    winner = winner_label(heur)
    pro = next(k for k in heur if pols[k] == "proactive")
    planner = CLAIRVOYANT if CLAIRVOYANT in pols else None
    out, losses = [], []
    for s in res["settings"]:
        rows = _setting_rows(res, s)
        (p, d), tr, ld, var = s[0], s[1], s[2], s[3]
        name = [f"{p}P{d}D", f"{tr} ({var['label']})", f"{ld:g}x"]
        post = _best_ex_post(heur, rows)
        for k in learned:
            if not rows[k]:
                continue
            vs_post, vs_win, vs_pro = (_diff(rows[k], rows[o]) for o in (post, winner, pro))
            cells = [*name, k, _fmt(vs_win), f"{_fmt(vs_post)} ({post})", _fmt(vs_pro)]
            if planner and rows[planner]:
                head = _diff(rows[planner], rows[post])
                share = vs_post[0] / head[0] if head[0] > 1e-9 else math.nan
                closed = "n/a" if math.isnan(share) else "none (below it)" if share < 0 else f"{share:.0%}"
                cells += [_fmt(head), closed]
            elif planner:
                cells += ["not run", "n/a"]
            out.append(cells)
            for label, dd in (("the tuning winner", vs_win), (f"the best heuristic ex post ({post})", vs_post)):
                if dd[0] + dd[1] < 0:
                    losses.append(f"{' '.join(name)}: {k} vs {label}: {_fmt(dd)}")
    head = ["shape", "trace", "load", "policy", f"- tuning winner {winner.removeprefix(WINNER_PREFIX + ' ')}",
            "- best heuristic ex post", "- proactive"]
    if planner:
        head += ["planner - best heuristic ex post (headroom)", "share of the headroom closed"]
    return head, out, losses


def markdown(res: dict[str, Any], command: str, tuned_doc: dict[str, Any]) -> str:
    pols, heur, learned = res["policies"], res["heuristics"], res["learned"]
    planner = CLAIRVOYANT if CLAIRVOYANT in pols else None
    slo_rows = []
    for s in res["settings"]:
        rows = _setting_rows(res, s)
        (p, d), tr, ld, var = s[0], s[1], s[2], s[3]
        slo_rows.append([f"{p}P{d}D", f"{tr} ({var['label']})", f"{ld:g}x",
                         *(f"{pooled(rows[k]):.4f}" if rows[k] else "n/a" for k in pols)])
    diff_head, diff_rows, losses = diff_table(res)
    learned_lines = [
        "## Paired differences (points of SLO attainment, mean ± 95 % Student-t half-width over episodes)", "",
        "The tuning winner was chosen on the training blocks before this evaluation; the best heuristic ex post is "
        "the one with the highest mean attainment on these held-out episodes, a bar no rule fixed in advance "
        "clears.", "", *table(diff_head, diff_rows), "",
        "## Where a learned policy loses (interval entirely below zero)", "",
        *([f"* {x}" for x in losses] or ["* nowhere"]), ""] if learned else []
    meta = tuned_doc["meta"]
    lines = [
        "# The blocked split: trained and tuned on alternating 300-s blocks, evaluated on the blocks between", "",
        f"Command: `{command}` ({res['wall_s']:.0f} s wall on 2 shared cores).", "",
        f"Training blocks: window starts in {describe(SPLIT.starts('train', WINDOW_S))}; held-out blocks: "
        f"{describe(SPLIT.starts('held_out', WINDOW_S))} ({WINDOW_S:g}-s windows, each inside one block). "
        f"{res['episodes']} held-out episodes per setting (seeds {res['seed0']}..), the same episodes for every "
        "policy; loads are multiples of the window's recorded rate.", "",
        f"Heuristics tuned on training-block episodes only ({meta['trace']}, {meta['shape']}, loads "
        f"{', '.join(f'{x:g}x' for x in meta['loads'])}, seeds {meta['seeds'][0]}-{meta['seeds'][1]}; "
        f"`tuned_blocked.yaml`): " + "; ".join(f"{k} = `{v}`" for k, v in pols.items() if k in heur) + ".", "",
        "Learned policies: " + ("; ".join(f"{k} = `{pols[k]}`" for k in learned) or "none") + "."
        + (f" Planner: `{pols[planner]}` (clairvoyant: it knows the window's future arrivals)." if planner else ""),
        "", "## SLO attainment (pooled over the episodes' requests)", "",
        *table(["shape", "trace", "load", *pols], slo_rows), "",
        *learned_lines,
        *hindsight_lines(res),
        *planner_lines(res),
    ]
    return "\n".join(lines)


#: policy kinds (a spec's name) that are not rules, learned or planners: :func:`hindsight_table` leaves them out
NOT_RULES = ("learned", "ensemble", "lookahead")


def hindsight_table(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per setting, the best rule chosen per episode with hindsight against the best heuristic ex post (paired,
    points): the most any policy that only switches between these rules could gain, episode by episode. The rules
    are the study's heuristics and, in a second row where any ran, the other rules evaluated beside them (every
    evaluated policy that is neither learned nor a planner). The clairvoyant planner's headroom beside it where
    it ran."""
    pols, heur = res["policies"], res["heuristics"]
    others = [k for k in res["learned"] if pols[k].split(":")[0] not in NOT_RULES]
    groups = [("the heuristics", heur)] + ([("the heuristics and the other rules", heur + others)] if others else [])
    out = []
    for s in res["settings"]:
        rows = _setting_rows(res, s)
        (p, d), tr, ld, var = s[0], s[1], s[2], s[3]
        post = _best_ex_post(heur, rows)
        seeds = [r["seed"] for r in rows[post]]
        for label, group in groups:
            if group is not heur and not all(rows[k] for k in others):
                continue  # (the other rules did not run on this setting; a heuristic missing raises below)
            if any([r["seed"] for r in rows[k]] != seeds for k in group):
                raise ValueError("paired policies ran on different episodes")
            best = [max(rows[k][i]["slo_attainment"] for k in group) for i in range(len(seeds))]
            head = _fmt(_diff(rows[CLAIRVOYANT], rows[post])) if rows.get(CLAIRVOYANT) else "not run"
            out.append([f"{p}P{d}D", f"{tr} ({var['label']})", f"{ld:g}x", label, post,
                        _fmt(paired_ci(best, [r["slo_attainment"] for r in rows[post]])), head])
    return ["shape", "trace", "load", "best per episode among", "best heuristic ex post",
            "- best heuristic ex post", "clairvoyant planner - best heuristic ex post"], out


def hindsight_lines(res: dict[str, Any]) -> list[str]:
    """The markdown section of :func:`hindsight_table`."""
    head, rows = hindsight_table(res)
    return ["## Choosing the rule per episode, with hindsight", "",
            "For each episode the rule that did best on it, against the one heuristic that did best over all the "
            "episodes: the ceiling of any policy that switches between these rules once per episode (and a "
            "hindsight bound, not a policy).", "", *table(head, rows), ""]


def planner_table(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per planner setting, each planner that ran against the tuning winner and the best heuristic ex post
    (paired, points), with its decisions per second: the headroom and how much of it needs the future."""
    pols, heur = res["policies"], res["heuristics"]
    winner = winner_label(heur)
    kinds = [k for k in PLANNERS if k in pols]
    out = []
    for s in res["settings"]:
        rows = _setting_rows(res, s)
        if not kinds or not rows[kinds[0]]:
            continue
        (p, d), tr, ld, var = s[0], s[1], s[2], s[3]
        post = _best_ex_post(heur, rows)
        for k in kinds:
            rate = np.mean([r["decisions_per_s"] for r in rows[k]])
            out.append([f"{p}P{d}D", f"{tr} ({var['label']})", f"{ld:g}x", k, _fmt(_diff(rows[k], rows[winner])),
                        f"{_fmt(_diff(rows[k], rows[post]))} ({post})", f"{rate:.0f}"])
    head = ["shape", "trace", "load", "planner", f"- tuning winner {winner.removeprefix(WINNER_PREFIX + ' ')}",
            "- best heuristic ex post", "decisions/s"]
    return head, out


def planner_lines(res: dict[str, Any]) -> list[str]:
    """The markdown section on the planners (none when only the clairvoyant one, or none, ran)."""
    pols = res["policies"]
    if not any(k in pols for k in PLANNERS if k != CLAIRVOYANT):
        return []
    head, rows = planner_table(res)
    said = "; ".join(PLANNER_DOCS[k] for k in PLANNERS if k in pols)
    return ["## The headroom, split: what knowing the future is worth", "",
            said[0].upper() + said[1:] + ". All read the model's state exactly (the remaining output of the requests "
            "already decoding included), so none is deployable: "
            + "; ".join(f"{k} = `{pols[k]}`" for k in PLANNERS if k in pols) + ".", "", *table(head, rows), ""]


# -- how much of the next seconds' arrivals the last seconds tell ---------------------------------------------------
#: simulated seconds of past arrivals the predictability step tries as predictors, and the horizon it predicts
PREDICT_PAST_S, PREDICT_HORIZON_S = (1.0, 2.0, 10.0), 2.0


def _counts_at_arrivals(t: np.ndarray, blocks: list[tuple[float, float]], past_tr: float, fut_tr: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """At every arrival of ``t`` with ``past_tr`` trace seconds of its block before it and ``fut_tr`` after it:
    the arrivals in ``(t_j - past_tr, t_j]`` (itself and those at the same instant included) and in
    ``(t_j, t_j + fut_tr]``."""
    past, nxt = [], []
    for a, b in blocks:
        lo, hi = np.searchsorted(t, (a + past_tr, b - fut_tr), side="left")
        tj = t[lo:hi]
        now = np.searchsorted(t, tj, side="right")
        past.append(now - np.searchsorted(t, tj - past_tr, side="right"))
        nxt.append(np.searchsorted(t, tj + fut_tr, side="right") - now)
    return np.concatenate(past), np.concatenate(nxt)


def _conditional_mean(x_fit: np.ndarray, y_fit: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``E[y | x]`` estimated on ``(x_fit, y_fit)`` (the mean of ``y_fit`` at each value of ``x_fit``), read at
    ``x``; a value never seen takes the nearest seen one's mean."""
    vals, inv = np.unique(x_fit, return_inverse=True)
    means = np.bincount(inv, weights=y_fit) / np.bincount(inv)
    if len(vals) == 1:
        return np.full(len(x), means[0])
    k = np.clip(np.searchsorted(vals, x), 1, len(vals) - 1)  # vals[k - 1] < x <= vals[k] inside the range
    return means[np.where(np.abs(vals[k - 1] - x) <= np.abs(vals[k] - x), k - 1, k)]


def predictability(trace: Any, split: Any = SPLIT, loads: tuple[float, ...] = TUNE_LOADS,
                   past_s: tuple[float, ...] = PREDICT_PAST_S, horizon_s: float = PREDICT_HORIZON_S
                   ) -> list[dict[str, Any]]:
    """How well the arrivals of the last ``past_s`` simulated seconds predict those of the next ``horizon_s``, at
    every arrival of the held-out blocks (a decision point) of a trace replayed at each load (the episodes' time
    scale: ``load`` trace seconds per simulated second). Per load and past window: the mean next count and the
    correlation of the two counts on the held-out blocks and on the training blocks, and the share of the next
    count's variance on the held-out blocks (R², negative when worse than the held-out mean, which a predictor
    fitted elsewhere does not know) that two predictors fitted on the *training* blocks explain: a least-squares
    line, and the conditional mean ``E[next | past]``. A split block that runs past the trace's end ends with it."""
    t = np.asarray(trace.arrival_s, dtype=float)
    end = float(t[-1])
    train = [(a, end if b is None else min(b, end)) for a, b in split.train]  # a block ends with the trace at most
    held = [(a, end if b is None else min(b, end)) for a, b in split.held_out]
    rows = []
    for load in loads:
        for p in past_s:
            xf, yf = _counts_at_arrivals(t, train, p * load, horizon_s * load)
            x, y = _counts_at_arrivals(t, held, p * load, horizon_s * load)
            for part, n in (("training", len(yf)), ("held-out", len(y))):
                if n < 2:
                    raise ValueError(f"{getattr(trace, 'name', 'the trace')} ({end:g} s) has {n} arrivals "
                                     f"with {p:g} + {horizon_s:g} simulated s of a {part} block of the {split.name} "
                                     f"split around them at {load:g}x load: too few to compare")
            sst = float(((y - y.mean()) ** 2).sum())
            slope, icpt = np.polyfit(xf, yf, 1) if xf.std() > 0 else (0.0, float(yf.mean()))  # constant: the mean
            r2 = {k: 1.0 - float(((y - pred) ** 2).sum()) / sst if sst > 0 else math.nan
                  for k, pred in (("r2_train_fit", _conditional_mean(xf, yf, x)), ("r2_train_line", icpt + slope * x))}
            rows.append({"load": load, "past_s": p, "points": len(y), "mean_next": float(y.mean()),
                         "mean_next_train": float(yf.mean()), "corr": _corr(x, y), "corr_train": _corr(xf, yf), **r2})
    return rows


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else math.nan


def predictability_markdown(rows: list[dict[str, Any]], trace: str, command: str, heading: str = "#") -> str:
    head = ["load", "past (simulated s)", "decision points", f"mean arrivals in the next {PREDICT_HORIZON_S:g} s",
            "(training blocks)", "correlation", "(training blocks)", "R², training-block line",
            "R², training-block mean per count"]
    body = [[f"{r['load']:g}x", f"{r['past_s']:g}", r["points"], f"{r['mean_next']:.1f}", f"{r['mean_next_train']:.1f}",
             f"{r['corr']:+.2f}", f"{r['corr_train']:+.2f}", f"{r['r2_train_line']:+.2f}", f"{r['r2_train_fit']:+.2f}"]
            for r in rows]
    return "\n".join([f"{heading} How much the last seconds of arrivals tell of the next {PREDICT_HORIZON_S:g} s "
                      f"({trace})", "",
                      f"`{command}`", "",
                      "At every arrival of the held-out blocks of the blocked split (a decision point), the count of "
                      "arrivals in the last seconds against the count in the next ones, at each load's time scale; "
                      "the same on the training blocks in brackets. R²: the share of the next count's variance on "
                      "the held-out blocks that a predictor from the past count, fitted on the training blocks, "
                      "explains (a least-squares line; the mean next count at each past count). Negative: worse "
                      "than the held-out blocks' own mean, which no predictor fitted on the training blocks knows.",
                      "",
                      *table(head, body), ""])


def blocked_summary(folder: Path = Path(__file__).parent / "blocked", title: str | None = None,
                    also: tuple[str, ...] = ()) -> str:
    """The main job's section on the blocked split, read from a committed evaluation (empty without it): the kept
    (first) learned policy's differences, or with ``title`` every learned policy's under that heading. ``also``:
    further evaluation files in ``folder`` (some or all of the same settings, the same episodes) whose learned
    policies and planners join the tables."""
    path = folder / "evaluation.json"
    if not path.is_file():
        return ""
    res = json.loads(path.read_text())
    for name in also:
        more = json.loads((folder / name).read_text())
        if (any(st not in res["settings"] for st in more["settings"])
                or (more["episodes"], more["seed0"]) != (res["episodes"], res["seed0"])):
            raise ValueError(f"blocked_summary: {folder / name} ran other settings or episodes than {path}")
        joining = [k for k in (*more["learned"], *PLANNERS) if k in more["policies"] and k not in res["policies"]]
        res["rows"] += [r for r in more["rows"] if r["policy"] in {more["policies"][k] for k in joining}]
        res["policies"].update({k: more["policies"][k] for k in joining})
        res["learned"] += [k for k in more["learned"] if k in joining]
        res["command"] = f"{res.get('command', 'n/a')}` and `{more.get('command', 'n/a')}"
    kept = res["learned"][0]
    head, rows, losses = diff_table(res, None if title else kept)
    root = Path(__file__).resolve().parents[1]  # the repository (the folder of experiments/)
    where = folder.resolve().relative_to(root) if folder.resolve().is_relative_to(root) else folder
    lines = [title or f"## The blocked split: the learned policy `{kept}` on held-out 300-s blocks", "",
             f"Not rerun by the main job: `{where}/evaluation.md` "
             f"(`{res.get('command', 'n/a')}`). Heuristics tuned and policies trained on alternating 300-s blocks "
             f"of the trace ({describe(SPLIT.starts('train', WINDOW_S))} window starts), evaluated on the blocks "
             f"between ({res['episodes']} episodes per setting); paired differences in points of SLO attainment.",
             "", *table(head, rows), "", "Where a learned policy loses: " + ("; ".join(losses) or "nowhere") + ".", "",
             *([] if title else hindsight_lines(res)), *planner_lines(res)]
    return "\n".join(lines)


# -- 4. choosing among candidates on the training blocks ---------------------------------------------------------
def select(tuned_file: Path, candidates: dict[str, str], episodes: int = SELECT_EPISODES, jobs: int = 1
           ) -> dict[str, Any]:
    """The ``candidates`` (label -> spec) and the tuning winner on ``episodes`` fresh training-block episodes of
    each tuning load; ``pick`` is the candidate with the highest mean over the loads of its mean per-episode SLO
    attainment (the first listed on a tie)."""
    from deflectlab.experiments.learned_eval import evaluate_learned

    heur = heuristics(tuned_file)
    winner = winner_label(heur)
    if heur[winner] in candidates.values():
        raise ValueError(f"blocked_split select: a candidate runs {heur[winner]!r}, the tuning winner")
    settings = [((2, 2), TUNE_TRACE, ld, TRAIN) for ld in TUNE_LOADS]
    res = evaluate_learned(candidates, settings, episodes, window_s=WINDOW_S, seed0=SELECT_SEED0, jobs=jobs,
                           heuristics={winner: heur[winner]})
    res["heuristics"], res["learned"] = [winner], list(candidates)
    by_setting = [_setting_rows(res, st) for st in res["settings"]]
    res["scores"] = {}
    for k in res["policies"]:
        per = [float(np.mean([r["slo_attainment"] for r in rows[k]])) for rows in by_setting]
        res["scores"][k] = {"per_load": per, "mean": float(np.mean(per))}
    res["pick"] = max(candidates, key=lambda k: res["scores"][k]["mean"])
    return res


def selection_markdown(res: dict[str, Any], command: str) -> str:
    """The select step's report: every candidate's score and its paired differences against the tuning winner."""
    winner = res["heuristics"][0]
    loads = [f"{st[2]:g}x" for st in res["settings"]]
    by_setting = [_setting_rows(res, st) for st in res["settings"]]
    rows = []
    for k in [winner, *res["learned"]]:
        sc = res["scores"][k]
        diffs = [_fmt(_diff(r[k], r[winner])) for r in by_setting] if k != winner else ["-"] * len(loads)
        rows.append([k + (" (the pick)" if k == res["pick"] else ""), *(f"{x:.4f}" for x in sc["per_load"]),
                     f"{sc['mean']:.4f}", *diffs])
    head = ["policy", *(f"SLO {x}" for x in loads), "score (mean)", *(f"- {winner}, {x}" for x in loads)]
    return "\n".join([
        "# Choosing among candidates on the training blocks", "",
        f"Command: `{command}` ({res['wall_s']:.0f} s wall).", "",
        f"{res['episodes']} episodes per load (seeds {res['seed0']}..), 2P2D, {TUNE_TRACE}, {WINDOW_S:g}-s windows "
        f"starting in the training blocks ({describe(SPLIT.starts('train', WINDOW_S))}); no held-out block is "
        "read. Score: the mean over the loads of the mean per-episode SLO attainment; the pick is the candidate "
        "with the highest score. Paired differences in points (mean ± 95 % Student-t half-width).", "",
        *table(head, rows), "", "Candidates: " + "; ".join(f"{k} = `{res['policies'][k]}`" for k in res["learned"])
        + ".", ""])


def _planner_labels(p: argparse.ArgumentParser, names: str) -> tuple[str, ...]:
    """The labels of ``--planners`` names (an unknown one is a usage error naming it)."""
    out = []
    for x in filter(None, (n.strip() for n in names.split(","))):
        if x not in PLANNER_NAMES:
            p.error(f"--planners {x!r}: known planners are {', '.join(PLANNER_NAMES)}")
        out.append(PLANNER_NAMES[x])
    return tuple(out)


def _tune_step(a: argparse.Namespace, command: str, tuned_file: Path) -> int:
    doc = tune(a.jobs, a.episodes or TUNE_EPISODES)
    doc["meta"]["command"] = command
    tuned_file.write_text(yaml.safe_dump(doc, sort_keys=False, width=110))
    for name, sc in doc["scores"].items():
        print(f"{name:<20} {doc['policies'][name]}  SLO {sc['slo_attainment']:.4f}  "
              f"P95 TTFT {sc['ttft_p95_s']:.3f} s")
    print(f"wrote {tuned_file} ({doc['meta']['wall_s']:.0f} s)")
    return 0


def _predictability_step(p: argparse.ArgumentParser, a: argparse.Namespace, command: str) -> int:
    from deflectlab.envs.workloads import load_trace

    try:
        rows = predictability(load_trace(a.trace))
    except ValueError as e:  # a trace too short for the split's blocks, or an unknown trace
        p.error(f"predictability: {e}")
    text = predictability_markdown(rows, a.trace, command)
    (a.out / "predictability.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deflectlab.experiments.blocked_split",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("tune", "evaluate", "select", "predictability"))
    p.add_argument("--out", type=Path, default=Path("runs/blocked"))
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--episodes", type=int, default=None,
                   help=f"per setting (tune: per load, default {TUNE_EPISODES}; evaluate: default 20; select: per "
                        f"load, default {SELECT_EPISODES})")
    p.add_argument("--learned", action="append", default=[], metavar="LABEL=SPEC",
                   help="a learned policy to evaluate (repeatable), e.g. es=learned:path=runs/es/policy; with "
                        "select, a candidate")
    p.add_argument("--planner", action="store_true", help="also run the clairvoyant lookahead planner (slow)")
    p.add_argument("--causal-planners", action="store_true",
                   help="also run the myopic (known and mean outputs), replay-forecast and analog-forecast planners "
                        "(slow), to split the headroom")
    p.add_argument("--planners", default="", metavar="NAME,...",
                   help=f"also run these planners: {', '.join(PLANNER_NAMES)}")
    p.add_argument("--trace", default=TUNE_TRACE, metavar="NAME|FILE",
                   help=f"predictability: the trace (a bundled name or a file; default {TUNE_TRACE})")
    p.add_argument("--shapes", default=None, metavar="PxD,...",
                   help="evaluate only the settings of these cluster shapes (e.g. 2x2 for fixed-shape policies)")
    p.add_argument("--loads", type=float, nargs="+", default=None, metavar="X",
                   help="evaluate: the 2P2D code-trace held-out blocks at these loads instead of the default settings "
                        "(e.g. 4 5: held-out episodes as hard as the training blocks' at 3x)")
    p.add_argument("--tuned", type=Path, default=None, metavar="FILE",
                   help="evaluate and select: the tune step's file (default: OUT/tuned_blocked.yaml)")
    a = p.parse_args(argv)
    command = "python -m deflectlab.experiments.blocked_split " + shlex.join(argv if argv is not None else sys.argv[1:])
    a.out.mkdir(parents=True, exist_ok=True)
    tuned_file = a.tuned or a.out / "tuned_blocked.yaml"
    if a.step == "tune":
        return _tune_step(a, command, tuned_file)
    if a.step == "predictability":
        return _predictability_step(p, a, command)
    if not tuned_file.exists():
        p.error(f"{tuned_file} is missing: run the tune step first (with the same --out), or give --tuned FILE")
    try:
        learned = labelled(a.learned, "LABEL=SPEC")
    except argparse.ArgumentTypeError as e:
        p.error(f"--learned {e}")
    if a.step == "select":
        if not learned:
            p.error("select: give the candidates as --learned LABEL=SPEC (repeatable)")
        res = select(tuned_file, learned, a.episodes or SELECT_EPISODES, a.jobs)
        (a.out / "selection.json").write_text(json.dumps({**res, "command": command}, separators=(",", ":"),
                                                         default=float))
        text = selection_markdown(res, command)
        (a.out / "selection.md").write_text(text)
        print(text)
        return 0
    planners = _planner_labels(p, a.planners)
    if not learned and not a.planner and not a.causal_planners and not planners:
        p.error("nothing to evaluate: give --learned LABEL=SPEC, --planner, --causal-planners and/or --planners")
    settings = None
    if a.loads and a.shapes:
        p.error("--loads and --shapes: give one (--loads runs 2P2D only)")
    if a.loads:
        bad = [x for x in a.loads if not math.isfinite(x) or x <= 0]
        if bad:
            p.error(f"--loads {bad[0]!r}: a load is a positive multiple of the window's recorded rate")
        settings = [((2, 2), TUNE_TRACE, float(x), HELD) for x in a.loads]
    if a.shapes:
        try:
            want = {tuple(int(x) for x in item.lower().split("x")) for item in a.shapes.split(",")}
        except ValueError:
            p.error(f"--shapes {a.shapes!r}: expected PxD[,PxD...], e.g. 2x2,4x4")
        settings = [st for st in SETTINGS if st[0] in want]
        if not settings:
            p.error(f"--shapes {a.shapes!r}: no setting has these shapes; the settings have "
                    f"{', '.join(sorted({f'{q}x{r}' for (q, r), *_ in SETTINGS}))}")
    res = evaluate(tuned_file, learned, a.episodes or 20, a.jobs, a.planner, settings, a.causal_planners, planners)
    text = markdown(res, command, yaml.safe_load(tuned_file.read_text()))
    (a.out / "evaluation.json").write_text(json.dumps({**res, "command": command}, separators=(",", ":"),
                                                      default=float))
    (a.out / "evaluation.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
