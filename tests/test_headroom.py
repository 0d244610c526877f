"""The headroom experiment's plumbing: episodes, paired intervals, report."""

from __future__ import annotations

import json
import math

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

    res = evaluate_learned({"v1": "learned:path=experiments/trained"},
                           [((2, 2), "azure_code", 2.0), ((3, 3), "azure_code", 2.0)], episodes=2, window_s=15.0)
    v1 = [r for r in res["rows"] if r["policy"] == "learned:path=experiments/trained"]
    assert {r["shape"] for r in v1} == {"2P2D"}  # the fixed-shape v1 export refuses 3P3D
    assert len([r for r in res["rows"] if r["shape"] == "3P3D"]) == 2 * 3  # the three baselines ran there
    text = write_learned(res, tmp_path, "test").read_text()
    assert "| 3P3D | azure_code | 2x |" in text and "n/a" in text
