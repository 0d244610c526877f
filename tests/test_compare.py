"""The comparison harness and the tuning of baselines: identical streams for every policy, the files and the
``--json`` document, seeds and windows, tuned parameters, and the errors bad input gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from deflectlab.experiments.compare import ComparisonConfig, build_workload, resolve_spec, run_comparison, window_for
from deflectlab.experiments.tuning import check_disjoint, grid_specs, load_tuned, save_tuned, training_config, tune
from deflectlab.scripts.options import parse_rates, parse_seeds, parse_span, parse_window

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(trace="azure_code", rates=(6.0,), seeds=(0, 1), window_s=120.0, workers=1)


@pytest.fixture(scope="module")
def small_result():
    cfg = ComparisonConfig(policies=("round_robin", "length_threshold:max_len=1000", "proactive"), **SMALL)
    return run_comparison(cfg, progress=False)


def test_every_policy_replays_the_same_requests(small_result):
    res = small_result
    assert len(res.runs) == 3 * 2
    assert res.same_streams()
    by_seed: dict[int, list] = {}
    for r in res.runs:
        by_seed.setdefault(r.seed, []).append(r)
    for runs in by_seed.values():
        first = runs[0]
        for other in runs[1:]:
            np.testing.assert_array_equal(first.arrival_s, other.arrival_s)
            np.testing.assert_array_equal(first.input_tokens, other.input_tokens)
            assert other.digest == first.digest
    # different seeds are different windows of the trace
    a, b = by_seed[0][0], by_seed[1][0]
    assert a.workload["window"]["start_s"] != b.workload["window"]["start_s"]
    assert a.digest != b.digest


def test_workloads_are_a_pure_function_of_rate_and_seed():
    cfg = ComparisonConfig(**SMALL)
    w1, w2 = build_workload(cfg, 6.0, 1), build_workload(cfg, 6.0, 1)
    np.testing.assert_array_equal(w1.arrival_s, w2.arrival_s)
    np.testing.assert_array_equal(w1.input_tokens, w2.input_tokens)
    assert w1.mean_rate == pytest.approx(6.0)
    start, dur = window_for(replace(cfg, span=(100.0, 400.0)), 5, 1788.0)
    assert 100.0 <= start <= 400.0 - 120.0 and dur == 120.0
    assert window_for(replace(cfg, window_start_s=50.0), 5, 1788.0) == (50.0, 120.0)
    # synthetic arrivals: the seed is the arrival seed, the window fixed
    syn = replace(cfg, arrival="poisson")
    assert window_for(syn, 0, 1788.0) == window_for(syn, 9, 1788.0)
    assert not np.array_equal(build_workload(syn, 6.0, 0).arrival_s, build_workload(syn, 6.0, 9).arrival_s)


def test_process_pool_gives_the_same_results_as_one_process(small_result):
    cfg = replace(small_result.config, workers=2)
    pooled = run_comparison(cfg, progress=False)
    key = lambda r: (r.policy, r.seed)  # noqa: E731
    for a, b in zip(sorted(small_result.runs, key=key), sorted(pooled.runs, key=key)):
        assert a.digest == b.digest
        np.testing.assert_array_equal(a.ttft_s, b.ttft_s)


def test_report_files(small_result, tmp_path):
    report = small_result.write_report(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"results.csv", "results.json", "report.md", "ttft_p95_vs_load.png", "slo_attainment_vs_load.png",
            "ttft_cdf.png", "ttft_breakdown_p95.png"} <= names
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["same_streams"] is True and len(doc["runs"]) == 6
    assert {a["policy"] for a in doc["table"]} == {"round_robin", "length_threshold:max_len=1000", "proactive"}
    text = report.read_text()
    assert "Command:" in text and "P95 vs baseline" in text and "![" in text
    base = [a for a in doc["table"] if a["policy"] == "round_robin"][0]
    assert base["ttft_p95_change"] == 0.0
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 6 and lines[0].startswith("policy,spec,rate,seed")


def test_json_document_shape(small_result):
    doc = small_result.to_json()
    assert set(doc) == {"results"} and len(doc["results"]) == 6
    for e in doc["results"]:
        assert set(e) == {"policy", "rate", "seed", "ttft_s", "tbt_s", "slo_attainment", "deflection_rate"}
        assert set(e["ttft_s"]) == {"p50", "p95", "p99"} and set(e["tbt_s"]) == {"p95"}
        assert 0.0 <= e["slo_attainment"] <= 1.0


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "deflectlab.scripts.cli", *args],
                          capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)


def test_cli_json_output():
    p = _cli("compare", "azure_code", "--rates", "5", "--seeds", "0", "--window", "60", "--workers", "1",
             "--policies", "round_robin", "proactive:margin=0.1", "--tuned", "none", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # stdout holds the JSON only; progress went to stderr
    assert [e["policy"] for e in doc["results"]] == ["round_robin", "proactive:margin=0.1"]
    assert doc["results"][0]["rate"] == 5.0 and doc["results"][0]["seed"] == 0
    assert "compare" in p.stderr


@pytest.mark.parametrize("args, words", [
    (["--policies", "round_robin", "nonsense"], ["unknown policy", "nonsense"]),
    (["--policies", "proactive:margin=7"], ["margin"]),
    (["--rates", "fast"], ["--rates", "fast"]),
    (["--seeds", "a-b"], ["--seeds"]),
    (["--window", "-3"], ["--window"]),
    (["--tuned", "/no/such/file.yaml"], ["not found", "/no/such/file.yaml"]),
])
def test_cli_errors_are_one_clear_line(args, words):
    p = _cli("compare", "azure_code", "--seeds", "0", "--window", "30", "--workers", "1", "--json", *args)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


def test_run_comparison_checks_policies_before_running():
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        run_comparison(ComparisonConfig(policies=("round_robin", "nope"), **SMALL), progress=False)
    with pytest.raises(ValueError, match="named twice"):
        ComparisonConfig(policies=("proactive", "proactive"), **SMALL)
    with pytest.raises(ValueError, match="rates"):
        ComparisonConfig(**{**SMALL, "rates": (0.0,)})
    # the never-deflect baseline is always run
    assert ComparisonConfig(policies=("proactive",), **SMALL).policies == ("round_robin", "proactive")


def test_argument_parsers():
    assert parse_rates("3.21, 5,trace") == (3.21, 5.0, None)
    assert parse_seeds("0-2,7,1") == (0, 1, 2, 7)
    assert parse_window("600") == {"window_s": 600.0}
    assert parse_window("100:300") == {"window_start_s": 100.0, "window_s": 300.0}
    assert parse_window("2000req") == {"num_requests": 2000}
    assert parse_window("all")["window_s"] is None
    assert parse_span("0:900") == (0.0, 900.0)
    for bad in ("", "0"):
        with pytest.raises(ValueError):
            parse_rates(bad)
    with pytest.raises(ValueError):
        parse_span("9:3")


# -- tuning -----------------------------------------------------------------------------------------------
def test_tuned_parameters_apply_to_bare_names_only():
    tuned = {"length_threshold": {"max_len": 900}}
    assert resolve_spec("length_threshold", tuned) == "length_threshold:max_len=900"
    assert resolve_spec("length_threshold:max_len=5", tuned) == "length_threshold:max_len=5"
    assert resolve_spec("proactive", tuned) == "proactive"


def test_tune_picks_the_best_grid_point_and_round_trips(tmp_path):
    cfg = training_config(ComparisonConfig(trace="azure_code", rates=(6.0,), window_s=120.0, workers=1),
                          seeds=(100, 101))
    assert cfg.span is not None and cfg.span[1] < 1000 and cfg.seeds == (100, 101)
    res = tune(cfg, ("length_threshold",), progress=False)["length_threshold"]
    assert len(res.trials) == len(grid_specs("length_threshold"))
    assert res.trials[0]["params"] == res.best
    assert all(res.slo_attainment >= t["slo_attainment"] for t in res.trials)
    path = save_tuned({"length_threshold": res}, tmp_path / "tuned.yaml", cfg, command="test")
    tuned, meta = load_tuned(path)
    assert tuned == {"length_threshold": res.best} and meta["seeds"] == [100, 101]
    check_disjoint(ComparisonConfig(seeds=(0, 1), **{k: v for k, v in SMALL.items() if k != "seeds"}), meta)
    with pytest.raises(ValueError, match="were used to tune"):
        check_disjoint(ComparisonConfig(seeds=(101,), **{k: v for k, v in SMALL.items() if k != "seeds"}), meta)


def test_bad_tuned_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policies: {length_threshold: {max_len: -3}}\n")
    with pytest.raises(ValueError, match="max_len"):
        load_tuned(bad)
    bad.write_text("policies: {no_such: {x: 1}}\n")
    with pytest.raises(ValueError, match="unknown policy"):
        load_tuned(bad)
    bad.write_text(": : :\n")
    with pytest.raises(ValueError):
        load_tuned(bad)
    with pytest.raises(ValueError, match="no parameter grid"):
        grid_specs("proactive")


def test_shipped_tuned_file_loads():
    path = ROOT / "experiments" / "policies" / "tuned_azure_code_2p2d.yaml"
    tuned, meta = load_tuned(path)
    assert set(tuned) >= {"length_threshold", "queue_threshold", "dynamo_isl", "dynamo_load"}
    assert meta["trace"] == "azure_code" and not set(meta["seeds"]) & {0, 1, 2}
    assert yaml.safe_load(path.read_text())["trials"]


def test_large_heterogeneous_shapes_and_the_saturation_note():
    """16P16D with H100 prefill and A100 decode nodes runs; 2P2D on the Mooncake trace at its recorded rate is
    saturated under every policy (TTFT grows with arrival time) and the report says so, 16P16D is not."""
    from deflectlab.envs.config import ClusterConfig
    from deflectlab.experiments.compare import ComparisonConfig, run_comparison

    res = {}
    for shape in ("2p2d", "16p16d"):
        cl = ClusterConfig.from_shape(shape, prefill_profile="h100-80gb_llama-3-8b",
                                      decode_profile="a100-80gb_llama-3-8b")
        cfg = ComparisonConfig(trace="mooncake_synthetic", rates=(None,), seeds=(0,), window_s=120.0, cluster=cl,
                               policies=("round_robin", "proactive"), workers=1)
        res[shape] = run_comparison(cfg, progress=False)
    assert res["2p2d"].saturated_rates() == [None]
    assert all(a["ttft_growth"] > 0.1 for a in res["2p2d"].table())
    assert "saturates the 2p2d cluster under every policy" in res["2p2d"].markdown()
    assert res["16p16d"].saturated_rates() == []
    assert "saturates" not in res["16p16d"].markdown()
    assert {r.summary["cluster"] for r in res["16p16d"].runs} == {"16p16d"}
