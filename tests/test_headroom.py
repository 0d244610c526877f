"""The headroom experiment's plumbing: episodes, paired intervals, report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deflectlab.experiments.headroom import (
    HeadroomSpec,
    headroom_summary,
    paired_ci,
    planner_spec,
    run_headroom,
    write_report,
)


def test_paired_ci_by_hand():
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(0.975, 2) = 4.303 -> half-width 4.303 * 0.1 / sqrt(3)
    m, h = paired_ci([0.6, 0.7, 0.8], [0.5, 0.5, 0.5])
    assert m == pytest.approx(0.2)
    assert h == pytest.approx(4.303 * 0.1 / math.sqrt(3))


def test_planner_spec_passes_the_base_parameters():
    assert planner_spec(2.5, "length_threshold:max_len=3072") == \
        "lookahead:horizon_s=2.5,base=length_threshold,base_max_len=3072"


def test_bad_spec_is_named():
    with pytest.raises(ValueError, match="episodes must be >= 2"):
        HeadroomSpec(episodes=1)
    with pytest.raises(ValueError, match="loads"):
        HeadroomSpec(loads=(0.0,))


def test_tiny_headroom_run_and_report(tmp_path):
    spec = HeadroomSpec(traces=("azure_code",), loads=(2.0,), episodes=2, window_s=15.0, horizon_s=1.0,
                        sweep_horizons=(0.5, 1.0), sweep_load=2.0)
    res = run_headroom(spec)
    pols = list(res["policies"].values())
    assert res["best"] == "best tuned (length_threshold)"
    # every policy and every sweep horizon ran on the same two episodes (same windows, same request counts)
    for p in pols + list(res["sweep_specs"].values()):
        rows = [r for r in res["rows"] if r["policy"] == p]
        assert sorted(r["seed"] for r in rows) == [3_000_000, 3_000_001]
    by_seed = {}
    for r in res["rows"]:
        by_seed.setdefault(r["seed"], set()).add((r["requests"], r["start_s"]))
    assert all(len(v) == 1 for v in by_seed.values())
    path = write_report(res, tmp_path, "deflectlab headroom (test)")
    text = path.read_text()
    assert "clairvoyant" in text and "| azure_code | 2x |" in text and "## Horizon sweep" in text
    assert json.loads((tmp_path / "headroom.json").read_text())["best"] == res["best"]
    summary = headroom_summary(tmp_path)
    assert "deflectlab headroom (test)" in summary and "| azure_code | 2x |" in summary
    assert headroom_summary(tmp_path / "none") == ""


def test_learned_evaluation_pairs_episodes_and_marks_refused_shapes(tmp_path):
    from deflectlab.experiments.learned_eval import evaluate_learned, write_learned

    res = evaluate_learned({"v1": "learned:path=experiments/trained_v1"},
                           [((2, 2), "azure_code", 2.0), ((3, 3), "azure_code", 2.0)], episodes=2, window_s=15.0)
    v1 = [r for r in res["rows"] if r["policy"] == "learned:path=experiments/trained_v1"]
    assert {r["shape"] for r in v1} == {"2P2D"}  # the fixed-shape v1 export refuses 3P3D
    assert len([r for r in res["rows"] if r["shape"] == "3P3D"]) == 2 * 3  # the three baselines ran there
    text = write_learned(res, tmp_path, "test").read_text()
    assert "| 3P3D | azure_code | 2x |" in text and "n/a" in text


def test_episode_variants_change_the_arrivals_and_the_span():
    from deflectlab.experiments.headroom import episode

    _, trace_wl, meta = episode("azure_code", 2.0, 11, 60.0, "vllm-nixl")
    _, gamma_wl, gmeta = episode("azure_code", 2.0, 11, 60.0, "vllm-nixl", variant={"arrival": "gamma", "cv": 4.0})
    assert gmeta["start_s"] == meta["start_s"] >= 1200.0  # the same held-out window, drawn arrivals instead
    gaps = np.diff(gamma_wl.arrival_s)
    assert not np.allclose(gaps, np.diff(trace_wl.arrival_s)[:len(gaps)])
    assert gaps.std() / gaps.mean() > 2.0  # far burstier than Poisson (CV 1), as a CV-4 process is
    # a trace shorter than the held-out span: the variant's own span of starts
    _, _, mmeta = episode("mooncake_synthetic", 1.0, 11, 60.0, "vllm-nixl", (8, 8), {"start_s": [511.0, None]})
    assert 511.0 <= mmeta["start_s"] <= 1022.1 - 60.0


def test_paired_difference_of_a_setting_by_hand():
    from deflectlab.experiments.learned_eval import paired

    def row(pol, seed, att):
        return {"shape": "2P2D", "trace": "azure_code", "load": 1.0, "policy": pol, "seed": seed,
                "variant": "v", "slo_attainment": att}

    res = {"policies": {"a": "A", "b": "B"},
           "rows": [row("A", 1, 0.9), row("A", 2, 0.8), row("A", 3, 0.7),
                    row("B", 3, 0.4), row("B", 1, 0.8), row("B", 2, 0.6)]}  # out of order on purpose
    m, h, n = paired(res, ((2, 2), "azure_code", 1.0, {"label": "v"}), "a", "b")
    # differences by seed: 0.1, 0.2, 0.3 -> mean 0.2, sd 0.1, t(0.975, 2) = 4.303
    assert n == 3 and m == pytest.approx(0.2) and h == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert paired(res, ((2, 2), "azure_code", 1.0), "a", "b") is None  # no rows without the variant


def test_trained_evaluation_report_and_main_job_section(tmp_path):
    from deflectlab.experiments.trained_eval import (
        evaluate,
        evaluation_markdown,
        headroom_and_learned_summary,
        novelty,
    )

    assert novelty(((2, 2), "azure_code", 1.0)) == ""
    assert novelty(((8, 8), "mooncake_synthetic", 1.0, {"label": "x"})) == "shape, trace"
    assert novelty(((4, 4), "azure_code", 1.0, {"label": "g", "arrival": "gamma", "cv": 4.0})) == "arrivals"
    # the fixed-shape policy stands in for the kept one here (fast); "v1" is the same network on the numpy
    # backend, which takes the same actions, so their paired difference is exactly zero
    v1 = "learned:path=experiments/trained_v1"
    res = evaluate(2, 1, kept=v1, v1=v1 + ",backend=numpy", window_s=15.0, settings=[((2, 2), "azure_code", 2.0)])
    text = evaluation_markdown(res, "test")
    assert "| 2P2D | azure_code | 2x | - |" in text and "+0.00 ± 0.00" in text
    (tmp_path / "evaluation.json").write_text(json.dumps(res, default=float))
    summary = headroom_and_learned_summary(tmp_path, tmp_path / "no_headroom")
    rows = [ln for ln in summary.splitlines() if ln.startswith("| azure_code | 2x |")]
    best = sorted((r for r in res["rows"] if r["policy"] == res["policies"][res["best"]]), key=lambda r: r["seed"])
    kept = sorted((r for r in res["rows"] if r["policy"] == v1), key=lambda r: r["seed"])
    diff = np.mean([a["slo_attainment"] - b["slo_attainment"] for a, b in zip(kept, best, strict=True)])
    assert len(rows) == 1 and f"{100 * diff:+.2f} ± " in rows[0] and "n/a" in rows[0]  # no planner run there
    assert str(tmp_path) not in summary
    assert headroom_and_learned_summary(tmp_path / "none", tmp_path / "none") == ""
