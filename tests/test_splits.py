"""Train/held-out splits of trace time (envs.splits) and where the windows they allow really start."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from deflectlab.envs.gym_env import DeflectionEnv
from deflectlab.envs.splits import SPLITS, get_split, pick, resolve, start_ranges
from deflectlab.experiments.compare import ComparisonConfig, window_for


def test_start_ranges_are_read_from_every_form_and_bad_ones_are_named():
    assert start_ranges([0.0, 180.0]) == [(0.0, 180.0)]
    assert start_ranges([[0, 180], [600, None]]) == [(0.0, 180.0), (600.0, None)]
    assert start_ranges("0:180, 600:") == [(0.0, 180.0), (600.0, None)]
    for bad, word in (("0-180", "not LOW:HIGH"), ("a:b", "with numbers"), ([[5, 1]], "0 <= low <= high"),
                      ([], "must be"), ([[1, 2, 3]], "each range")):
        with pytest.raises(ValueError, match=word):
            start_ranges(bad)
    assert resolve([(0.0, None), (10.0, 20.0)], 1668.4) == [(0.0, 1668.4), (10.0, 20.0)]


def test_pick_is_uniform_over_the_union_by_hand_and_numpy_s_uniform_for_one_range():
    ranges = [(0.0, 10.0), (100.0, 130.0)]  # 40 s of starts: the first quarter of u maps into [0, 10]
    assert pick(0.2, ranges) == pytest.approx(8.0)
    assert pick(0.5, ranges) == pytest.approx(110.0)
    assert pick(0.999, ranges) == pytest.approx(100.0 + 0.999 * 40 - 10)
    u = np.random.default_rng(0).random(20_000)
    x = np.array([pick(v, ranges) for v in u])
    assert ((x <= 10) | ((x >= 100) & (x <= 130))).all()
    assert np.mean(x <= 10) == pytest.approx(0.25, abs=0.01)
    for seed in range(200):  # one range: the same double as Generator.uniform(low, high)
        lo, hi = sorted(np.random.default_rng(seed + 1).uniform(0, 2000, 2))
        assert pick(np.random.default_rng(seed).random(), [(lo, hi)]) == np.random.default_rng(seed).uniform(lo, hi)


def test_blocked_split_keeps_windows_inside_blocks_and_refuses_windows_that_reach_held_out_ones():
    blocked = get_split("blocked")
    assert blocked.starts("train", 120.0) == [(0.0, 180.0), (600.0, 780.0), (1200.0, 1380.0)]
    assert blocked.starts("held_out", 120.0) == [(300.0, 480.0), (900.0, 1080.0), (1500.0, None)]
    assert SPLITS["time"].starts("train", 120.0) == [(0.0, 1080.0)]
    assert SPLITS["time"].starts("held_out", 120.0) == [(1200.0, None)]
    blocked.check_training([(0.0, 180.0), (600.0, 780.0)], 120.0)  # ends exactly at the block's end: allowed
    with pytest.raises(ValueError, match=r"reach into the held-out block \[300, 600\) s of the blocked split"):
        blocked.check_training([(0.0, 181.0)], 120.0)
    with pytest.raises(ValueError, match=r"held-out block \[1500, end\)"):
        blocked.check_training([(1200.0, 1400.0)], 120.0)
    with pytest.raises(ValueError, match="give the range's end"):
        blocked.check_training([(0.0, None)], 120.0)
    with pytest.raises(ValueError, match="no train block holds a 400-s window"):
        blocked.starts("train", 400.0)


def test_the_environment_draws_windows_from_every_range_and_nowhere_else():
    held = SPLITS["blocked"].starts("held_out", 120.0)
    env = DeflectionEnv(trace="azure_code", load=[1.0, 1.0], window_s=120.0, window_start_s=[list(r) for r in held])
    end = float(env._trace.arrival_s[-1]) - 120.0
    starts = np.array([env.episode_workload(seed=s)[1]["start_s"] for s in range(300)])
    inside = [(starts >= lo) & (starts <= (end if hi is None else hi)) for lo, hi in held]
    assert np.logical_or.reduce(inside).all()
    assert all(m.sum() > 50 for m in inside)  # each block gets about a third
    # one range: the draw is the one before ranges could be several (a window start uniform in [lo, hi])
    one = DeflectionEnv(trace="azure_code", load=[1.0, 1.0], window_s=120.0, window_start_s=[100.0, 900.0])
    rng = np.random.default_rng(np.random.SeedSequence(7))
    from gymnasium.utils import seeding

    rng, _ = seeding.np_random(7)
    assert one.episode_workload(seed=7)[1]["start_s"] == rng.uniform(100.0, 900.0)


def test_a_comparison_over_several_spans_puts_each_window_in_one_of_them():
    blocks = [(0.0, 300.0), (600.0, 900.0)]
    cfg = ComparisonConfig(span=blocks, window_s=120.0, seeds=(0,), rates=(None,))
    for seed in range(200):
        start, dur = window_for(cfg, seed, 1788.0)
        assert dur == 120.0 and any(lo <= start and start + dur <= hi + 1e-9 for lo, hi in blocks)
    one = ComparisonConfig(span=(0.0, 894.0), window_s=300.0, seeds=(0,), rates=(None,))  # unchanged: by hand
    u = float(np.random.default_rng(3).random())
    assert window_for(one, 3, 1788.0) == (pytest.approx(u * 594.0), 300.0)
    with pytest.raises(ValueError, match="no longer than the shortest span"):
        ComparisonConfig(span=[(0.0, 100.0), (600.0, 900.0)], window_s=120.0)


def test_blocked_study_tunes_on_training_blocks_and_evaluates_on_held_out_ones(tmp_path):
    from deflectlab.experiments import blocked_split as bs

    doc = bs.tune(jobs=1, episodes=1, policies=("length_threshold",))
    assert len(doc["trials"]["length_threshold"]) == 8
    top = doc["trials"]["length_threshold"][0]
    assert doc["policies"]["length_threshold"] == top["params"]
    assert top["slo_attainment"] == max(t["slo_attainment"] for t in doc["trials"]["length_threshold"])
    f = tmp_path / "tuned_blocked.yaml"
    f.write_text(yaml.safe_dump(doc))
    heur = bs.heuristics(f)
    assert sorted(doc["untuned_scores"]) == ["proactive", "round_robin"]
    scores = {**doc["scores"], **doc["untuned_scores"]}
    winner = max(scores, key=lambda n: (scores[n]["slo_attainment"], -scores[n]["ttft_p95_s"]))
    assert f"best tuned ({winner})" in heur and len(heur) == 3
    assert sorted(heur.values()) == sorted(["round_robin", "proactive", "length_threshold:max_len="
                                            f"{top['params']['max_len']}"])
    setting = ((1, 1), "azure_code", 2.0, bs.HELD)
    with pytest.raises(ValueError, match="'copy' runs 'proactive', which the heuristics run already"):
        bs.evaluate(f, {"copy": "proactive"}, episodes=3, jobs=1, planner=False, settings=[setting])
    res = bs.evaluate(f, {"same as proactive": "proactive:margin=0.0"}, episodes=3, jobs=1, planner=False,
                      settings=[setting])
    held = bs.SPLIT.starts("held_out", bs.WINDOW_S)
    for r in res["rows"]:
        assert any(lo <= r["start_s"] <= (1788.5 - 120 if hi is None else hi) for lo, hi in held)
    text = bs.markdown(res, "cmd", doc)
    # a copy of proactive is level with proactive, episode by episode
    assert "| 1P1D | azure_code (held-out blocks) | 2x | same as proactive |" in text
    row = next(line for line in text.splitlines() if "2x | same as proactive |" in line)
    assert row.rstrip(" |").endswith("+0.00 ± 0.00")
    # the main job's section reads the same table from the folder's evaluation.json
    assert bs.blocked_summary(tmp_path) == ""
    (tmp_path / "evaluation.json").write_text(json.dumps({**res, "command": "cmd"}, default=float))
    summary = bs.blocked_summary(tmp_path)
    assert row in summary and summary.startswith("## The blocked split: the learned policy `same as proactive`")
    # planners alone (--planners): no learned policy, so no paired-differences section, and the planners' table
    only = bs.evaluate(f, {}, episodes=1, jobs=1, planner=False, settings=[((2, 2), "azure_code", 1.0, bs.HELD)],
                       planners=("lookahead (myopic)",))
    text = bs.markdown(only, "cmd", doc)
    assert "Learned policies: none." in text and "## Paired differences" not in text
    assert "| 2P2D | azure_code (held-out blocks) | 1x | lookahead (myopic) |" in text


def test_blocked_evaluate_shapes_option_names_bad_values(tmp_path, capsys):
    """``--shapes`` keeps only the settings of the given shapes; a malformed value or one that matches no
    setting is refused with a message that names it (before anything runs)."""
    import shutil

    from deflectlab.experiments import blocked_split

    shutil.copy(Path(__file__).resolve().parents[1] / "experiments" / "blocked" / "tuned_blocked.yaml", tmp_path)
    for bad, msg in (("9x9", "no setting has these shapes; the settings have 2x2, 3x3, 4x4"),
                     ("2y2", "expected PxD")):
        with pytest.raises(SystemExit):
            blocked_split.main(["evaluate", "--out", str(tmp_path), "--planner", "--shapes", bad])
        assert msg in capsys.readouterr().err
    for args, msg in ((["--loads", "0"], "--loads 0.0: a load is a positive multiple"),
                      (["--loads", "4", "--shapes", "2x2"], "--loads and --shapes: give one"),
                      (["--learned", "no-spec"], "--learned 'no-spec' is not LABEL=SPEC")):
        with pytest.raises(SystemExit):
            blocked_split.main(["evaluate", "--out", str(tmp_path), "--planner", *args])
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        blocked_split.main(["select", "--out", str(tmp_path)])
    assert "select: give the candidates as --learned LABEL=SPEC" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        blocked_split.main(["evaluate", "--out", str(tmp_path), "--planners", "myopic,oracle"])
    assert ("--planners 'oracle': known planners are clairvoyant, myopic, myopic-mean-outputs, replay-forecast, "
            "analog-forecast") in capsys.readouterr().err
    assert blocked_split.PLANNER_NAMES["analog-forecast"] == "lookahead (analog forecast)"


def test_planner_table_splits_the_headroom_by_hand():
    """The planners' section: each planner against the tuning winner and the best heuristic ex post, paired over
    the same episodes (mean and 95 % Student-t half-width, computed here by hand), with its decisions per second."""
    from deflectlab.experiments import blocked_split as bs

    slo = {"round_robin": [0.5, 0.4, 0.3], "proactive": [0.95, 0.85, 0.75],
           "proactive:margin=0.2": [0.9, 0.8, 0.7], "lookahead:a": [0.97, 0.9, 0.8], "lookahead:b": [0.92, 0.81, 0.72]}
    pols = {"never_deflect": "round_robin", "proactive": "proactive", "best tuned (proactive)": "proactive:margin=0.2",
            "lookahead (clairvoyant)": "lookahead:a", "lookahead (myopic)": "lookahead:b"}
    rows = [{"shape": "2P2D", "trace": "azure_code", "load": 3.0, "variant": bs.HELD["label"], "seed": i,
             "policy": spec, "slo_attainment": v[i], "decisions_per_s": 100.0 * (i + 1)}
            for spec, v in slo.items() for i in range(3)]
    res = {"policies": pols, "heuristics": list(pols)[:3], "learned": [], "rows": rows, "episodes": 3,
           "settings": [[[2, 2], "azure_code", 3.0, bs.HELD]]}
    head, table = bs.planner_table(res)
    assert head[3:5] == ["planner", "- tuning winner (proactive)"]
    clair, myopic = table
    # clairvoyant - winner: +0.07, +0.10, +0.10: mean 9.00 points, sd 1.732 points, t(0.975, 2) = 4.303
    assert clair[3:] == ["lookahead (clairvoyant)", "+9.00 ± 4.30", "+4.00 ± 4.30 (proactive)", "200"]
    # myopic - winner: +0.02, +0.01, +0.02: mean 1.67, sd 0.577, half-width 4.303 x 0.577 / sqrt(3) = 1.43
    assert myopic[3:] == ["lookahead (myopic)", "+1.67 ± 1.43", "-3.33 ± 1.43 (proactive)", "200"]
    lines = bs.planner_lines(res)
    assert lines[0].startswith("## The headroom, split")
    # it says what the planners that ran know, and nothing of those that did not run
    assert lines[2].startswith("The clairvoyant planner reads the window's future arrivals; the myopic one plays")
    assert "replay" not in lines[2] and "analog" not in lines[2]
    res["policies"].pop("lookahead (myopic)")
    assert bs.planner_lines(res) == []  # the clairvoyant planner alone: the main table has its headroom


def test_hindsight_table_takes_the_best_rule_of_each_episode_by_hand():
    """The hindsight section: per episode the best of the rules (the heuristics; then also the other rules evaluated,
    never a learned policy or a planner) against the best heuristic ex post, paired (computed here by hand)."""
    from deflectlab.experiments import blocked_split as bs

    slo = {"round_robin": [0.5, 0.9, 0.3], "proactive": [0.95, 0.85, 0.75], "proactive:margin=0.2": [0.9, 0.8, 0.8],
           "proactive:margin=0.5": [0.96, 0.7, 0.7], "learned:path=x": [1.0, 1.0, 1.0],
           "lookahead:a": [0.97, 0.92, 0.85]}
    pols = {"never_deflect": "round_robin", "proactive": "proactive", "best tuned (proactive)": "proactive:margin=0.2",
            "m0.5": "proactive:margin=0.5", "net": "learned:path=x", "lookahead (clairvoyant)": "lookahead:a"}
    rows = [{"shape": "2P2D", "trace": "azure_code", "load": 3.0, "variant": bs.HELD["label"], "seed": i,
             "policy": spec, "slo_attainment": v[i]} for spec, v in slo.items() for i in range(3)]
    res = {"policies": pols, "heuristics": list(pols)[:3], "learned": ["m0.5", "net"], "rows": rows,
           "settings": [[[2, 2], "azure_code", 3.0, bs.HELD]]}
    head, table = bs.hindsight_table(res)
    assert head[3:] == ["best per episode among", "best heuristic ex post", "- best heuristic ex post",
                        "clairvoyant planner - best heuristic ex post"]
    heur, more = table
    # best heuristic ex post: proactive (mean 0.85). Best heuristic per episode: 0.95, 0.9, 0.8; less proactive's:
    # 0, +0.05, +0.05: mean 3.33 points, sd 2.887, half-width t(0.975, 2) 4.303 x 2.887 / sqrt(3) = 7.17
    assert heur[3:6] == ["the heuristics", "proactive", "+3.33 ± 7.17"]
    # with margin 0.5 (a rule), not the learned policy: 0.96, 0.9, 0.8; +0.01, +0.05, +0.05: sd 2.309, hw 5.74
    assert more[3:6] == ["the heuristics and the other rules", "proactive", "+3.67 ± 5.74"]
    # the planner: +0.02, +0.07, +0.10: mean 6.33, sd 4.041, half-width 10.04
    assert heur[6] == more[6] == "+6.33 ± 10.04"
    res["learned"] = ["net"]  # no other rule: one row, the heuristics
    assert [r[3] for r in bs.hindsight_table(res)[1]] == ["the heuristics"]


def test_main_job_sections_read_the_committed_blocked_evaluations(tmp_path):
    """The main job's blocked sections: the kept policy of experiments/blocked, and every seed of the schema-4 RL
    run under its own heading, each naming the committed file it reads."""
    from deflectlab.experiments import blocked_split as bs

    root = Path(__file__).resolve().parents[1] / "experiments"
    kept = bs.blocked_summary()
    assert "`experiments/blocked/evaluation.md`" in kept and "## The headroom, split" in kept
    # the hindsight bound at 3x beside the clairvoyant headroom (experiments/blocked/README.md quotes both)
    assert "| 3x | the heuristics | best tuned (proactive) | +0.83 ± 0.73 | +1.88 ± 0.62 |" in kept
    # the analog planner's run (2P2D settings only, the same episodes) joins the planners' table, beside the others
    split = bs.blocked_summary(also=("analog/evaluation.json",))
    assert "| 3x | lookahead (analog forecast) | -1.45 ± 1.68 | -1.45 ± 1.68 (best tuned (proactive)) |" in split
    assert "| 3x | lookahead (myopic) |" in split and split.count("--planners analog-forecast") == 1
    other = json.loads((root / "blocked" / "analog" / "evaluation.json").read_text())
    (tmp_path / "evaluation.json").write_text((root / "blocked" / "evaluation.json").read_text())
    for key, value in (("episodes", 10), ("settings", [[[2, 2], "azure_code", 4.0, bs.HELD]])):
        (tmp_path / "more.json").write_text(json.dumps({**other, key: value}))
        with pytest.raises(ValueError, match="more.json ran other settings or episodes"):
            bs.blocked_summary(tmp_path, also=("more.json",))
    rl = bs.blocked_summary(root / "rl_v4_blocked" / "2to3x", title="## RL v4", also=("evaluation_s3-5.json",))
    assert "with hindsight" not in rl  # (once, in the main section)
    assert rl.startswith("## RL v4") and "`experiments/rl_v4_blocked/2to3x/evaluation.md`" in rl
    assert all(f"| 3x | rl v4 2-3x s{s} |" in rl for s in range(6))  # both evaluation files' seeds
    # seed 4 at 1x, from the second file, against the same heuristic rows: -0.34 ± 0.22 ex post
    assert "| 1x | rl v4 2-3x s4 | -0.21 ± 0.16 | -0.34 ± 0.22 (proactive) |" in rl
    vb = bs.blocked_summary(root / "rl_v4_blocked" / "valblock", title="## VB",
                            also=("evaluation_s3-5.json", "evaluation_s6-11.json"))
    assert all(f"| 3x | rl v4 valblock s{s} |" in vb for s in range(6))
    assert all(f"| 3x | rl_v4_valblock_s{s} |" in vb for s in range(6, 12))
    assert "| 3x | rl v4 valblock s0 | +0.58 ± 0.37 | +0.58 ± 0.37 (best tuned (proactive)) |" in vb  # the pick


def test_select_scores_candidates_on_fresh_training_block_episodes_and_picks_the_best(tmp_path):
    """``select``: candidates and the tuning winner replay fresh training-block episodes (seeds of their own); the
    score is the mean over loads of the mean per-episode attainment, recomputed here from the rows by hand."""
    from deflectlab.experiments import blocked_split as bs

    tuned = Path(__file__).resolve().parents[1] / "experiments" / "blocked" / "tuned_blocked.yaml"
    winner_spec = bs.heuristics(tuned)["best tuned (proactive)"]
    with pytest.raises(ValueError, match="a candidate runs 'proactive:margin=0.2,min_chunk=1024', the tuning winner"):
        bs.select(tuned, {"copy": winner_spec}, episodes=1)
    same = "proactive:min_chunk=1024,margin=0.2"  # the winner's rule, spelled otherwise
    res = bs.select(tuned, {"never": "round_robin", "same rule": same}, episodes=2, jobs=1)
    train = bs.SPLIT.starts("train", bs.WINDOW_S)
    assert len(res["rows"]) == 3 * 3 * 2  # 3 policies, 3 loads, 2 episodes
    for r in res["rows"]:
        assert r["seed"] in (bs.SELECT_SEED0, bs.SELECT_SEED0 + 1) and r["shape"] == "2P2D"
        assert any(lo <= r["start_s"] <= hi for lo, hi in train)
    for label, spec in (("never", "round_robin"), ("same rule", same)):
        per = [np.mean([r["slo_attainment"] for r in res["rows"] if r["policy"] == spec and r["load"] == ld])
               for ld in (1.0, 2.0, 3.0)]
        assert res["scores"][label]["per_load"] == pytest.approx(per)
        assert res["scores"][label]["mean"] == pytest.approx(sum(per) / 3)
    assert res["scores"]["same rule"] == res["scores"]["best tuned (proactive)"]  # the same decisions
    assert res["pick"] == "same rule" and res["scores"]["never"]["mean"] < res["scores"]["same rule"]["mean"]
    text = bs.selection_markdown(res, "cmd")
    row = next(line for line in text.splitlines() if line.startswith("| same rule (the pick) |"))
    assert row.endswith("| +0.00 ± 0.00 | +0.00 ± 0.00 | +0.00 ± 0.00 |")


def test_predictability_counts_the_arrivals_around_each_decision_point_by_hand():
    """At every arrival of the held-out blocks with the whole past and next window inside its block: the count
    of arrivals in the last ``past`` and the next ``horizon`` seconds (times the load: the episodes' time scale),
    their correlation, and the R² on the held-out points of the next count's mean per past count on the training
    blocks (nearest past count where one is missing); all by brute force here."""
    from deflectlab.envs.splits import Split
    from deflectlab.envs.workloads import Trace
    from deflectlab.experiments.blocked_split import predictability

    rng = np.random.default_rng(3)
    rate = np.where(np.arange(400) % 80 < 30, 0.1, 0.6)  # bursts and lulls: gaps of 0.1 s or 0.6 s on average
    t = np.concatenate([[0.0], np.cumsum(rng.exponential(rate[:-1]))])
    t = np.round(t, 1)  # ties: arrivals at the same instant count as past (the decision sees them)
    trace = Trace("toy", t, np.full(400, 10), np.full(400, 5), None, "test")
    end = float(t[-1])
    split = Split("toy", ((0.0, end / 2),), ((end / 2, None),))
    rows = predictability(trace, split, loads=(1.0, 2.0), past_s=(1.0, 3.0), horizon_s=2.0)
    assert [(r["load"], r["past_s"]) for r in rows] == [(1.0, 1.0), (1.0, 3.0), (2.0, 1.0), (2.0, 3.0)]

    def counts(a, b, past, fut):
        pts = [x for x in t if a + past <= x < b - fut]
        return ([sum(1 for y in t if x - past < y <= x) for x in pts],
                [sum(1 for y in t if x < y <= x + fut) for x in pts])

    for r in rows:
        past, fut = r["past_s"] * r["load"], 2.0 * r["load"]
        xf, yf = counts(0.0, end / 2, past, fut)
        x, y = counts(end / 2, end, past, fut)
        assert r["points"] == len(y) > 50 and r["mean_next"] == pytest.approx(np.mean(y))
        assert r["corr"] == pytest.approx(np.corrcoef(x, y)[0, 1])
        fit = {v: np.mean([b for a, b in zip(xf, yf, strict=True) if a == v]) for v in set(xf)}
        pred = [fit[min(fit, key=lambda v, q=q: (abs(v - q), v))] for q in x]
        r2 = 1 - sum((a - b) ** 2 for a, b in zip(y, pred, strict=True)) / sum((a - np.mean(y)) ** 2 for a in y)
        assert r["r2_train_fit"] == pytest.approx(r2)
        assert r["mean_next_train"] == pytest.approx(np.mean(yf)) and r["corr_train"] == pytest.approx(
            np.corrcoef(xf, yf)[0, 1])
        # the least-squares line on the training points, by the normal equations
        b = sum((a - np.mean(xf)) * (c - np.mean(yf)) for a, c in zip(xf, yf, strict=True)) / sum(
            (a - np.mean(xf)) ** 2 for a in xf)
        line = [np.mean(yf) + b * (q - np.mean(xf)) for q in x]
        r2_line = 1 - sum((a - c) ** 2 for a, c in zip(y, line, strict=True)) / sum((a - np.mean(y)) ** 2 for a in y)
        assert r["r2_train_line"] == pytest.approx(r2_line)


def test_predictability_names_a_trace_too_short_for_the_split_and_an_unknown_trace(capsys, tmp_path):
    from deflectlab.envs.workloads import Trace
    from deflectlab.experiments import blocked_split as bs

    short = Trace("short", np.arange(0.0, 250.0, 0.5), np.full(500, 10), np.full(500, 5), None, "test")
    with pytest.raises(ValueError, match=r"short \(249.5 s\) has 0 arrivals with 1 \+ 2 simulated s of a held-out "
                                         r"block of the blocked split around them at 1x load"):
        bs.predictability(short)  # the held-out blocks start at 300 s, after its end
    # a block that runs past the trace's end ends with it: no decision point near the end counts arrivals that
    # are not there (every count of a steady 2 per second is exact)
    rows = bs.predictability(Trace("steady", np.arange(0.0, 400.0, 0.5), np.full(800, 10), np.full(800, 5), None,
                                   "test"), loads=(1.0,), past_s=(1.0,))
    assert rows[0]["mean_next"] == 4.0 and rows[0]["mean_next_train"] == 4.0
    with pytest.raises(SystemExit):
        bs.main(["predictability", "--out", str(tmp_path), "--trace", "nope"])
    assert "predictability: nope: unknown bundled trace name" in capsys.readouterr().err
