"""Tests for envs.workloads: trace readers, workload construction, purity, and the errors bad input gets."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deflectlab.envs.workloads import (
    BUNDLED,
    Trace,
    Workload,
    WorkloadError,
    load_trace,
    make_workload,
    trace_stats,
)

# envs/data/README.md, "Statistics" (computed when the files were bundled, independently of trace_stats).
# Percentiles there are numpy's linear percentiles, truncated.
README_STATS = {
    "azure_code": {
        "requests": 5740, "duration_s": 1788, "mean_rate": 3.21, "cv": 13.5,
        "peak_rate_1s": 67, "peak_rate_10s": 32.7,
        "input": (2027, 1459, 7315, 7436, 7437), "output": (27, 13, 85, 247, 1899),
    },
    "azure_conv": {
        "requests": 10108, "duration_s": 1800, "mean_rate": 5.62, "cv": 1.07,
        "peak_rate_1s": 15, "peak_rate_10s": 8.8,
        "input": (1243, 1033, 4086, 4123, 14050), "output": (217, 134, 459, 609, 1000),
    },
    "mooncake_synthetic": {
        "requests": 3993, "duration_s": 1022, "mean_rate": 3.91, "cv": 1.01,
        "peak_rate_1s": 13, "peak_rate_10s": 5.5,
        "input": (15325, 11587, 48904, 66456, 191378), "output": (149, 69, 519, 768, 893),
    },
}  # fmt: skip
FORMAT = {"azure_code": "azure", "azure_conv": "azure", "mooncake_synthetic": "mooncake"}


def _check_readme_stats(s: dict, want: dict) -> None:
    assert s["requests"] == want["requests"]
    assert round(s["duration_s"]) == want["duration_s"]
    assert round(s["mean_rate"], 2) == want["mean_rate"]
    assert s["cv"] == pytest.approx(want["cv"], abs=0.05)
    assert s["peak_rate_1s"] == want["peak_rate_1s"]
    assert s["peak_rate_10s"] == pytest.approx(want["peak_rate_10s"])
    for side in ("input", "output"):
        mean, p50, p95, p99, mx = want[side]
        assert int(s[f"{side}_mean"]) == mean
        assert (int(s[f"{side}_p50"]), int(s[f"{side}_p95"]), int(s[f"{side}_p99"])) == (p50, p95, p99)
        assert s[f"{side}_max"] == mx


def _gap_cv(arrival_s: np.ndarray) -> float:
    g = np.diff(arrival_s)
    return float(g.std() / g.mean())


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _assert_error(path: Path, line: int, problem: str, **kwargs) -> None:
    with pytest.raises(WorkloadError) as ei:
        load_trace(path, **kwargs)
    msg = str(ei.value)
    assert str(path) in msg, msg
    assert f":{line}:" in msg, msg
    assert problem in msg, msg


AZ_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


# ------------------------------------------------------------------------------------------ bundled data


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_trace_matches_readme(name: str) -> None:
    tr = load_trace(name)
    assert tr.name == name and tr.source == name and tr.fmt == FORMAT[name]
    assert (tr.hash_ids is None) == (tr.fmt == "azure")
    assert tr.arrival_s.dtype == np.float64 and tr.input_tokens.dtype == np.int64
    assert tr.arrival_s[0] == 0.0 and np.all(np.diff(tr.arrival_s) >= 0)
    assert tr.input_tokens.min() > 0 and tr.output_tokens.min() > 0
    _check_readme_stats(trace_stats(tr), README_STATS[name])


def test_bundled_values_and_precision() -> None:
    tr = load_trace("azure_code")
    # First rows of the file: 18:17:03.9799600,4808,10 then 18:17:04.0319600,3180,8.
    assert tr.input_tokens[:2].tolist() == [4808, 3180] and tr.output_tokens[:2].tolist() == [10, 8]
    assert tr.arrival_s[1] == pytest.approx(0.052, abs=1e-9)


def test_bundled_traces_are_cached_and_read_only() -> None:
    a, b = load_trace("azure_conv"), load_trace("azure_conv")
    assert a is b
    with pytest.raises(ValueError):
        a.arrival_s[0] = 1.0
    w = make_workload("azure_conv")
    w.arrival_s[0] = 0.0  # a workload owns its arrays
    assert w.arrival_s is not a.arrival_s


def test_bundled_mooncake_trace() -> None:
    tr = load_trace("mooncake_synthetic")
    # First lines of the file: {"timestamp": 0, "input_length": 40160, "output_length": 6, "hash_ids": [0..78]},
    # {"timestamp": 0, 36640, 4, [79..150]}, {"timestamp": 40, 23769, 3, [151..197]}.
    assert tr.input_tokens[:3].tolist() == [40160, 36640, 23769] and tr.output_tokens[:3].tolist() == [6, 4, 3]
    assert tr.arrival_s[:3].tolist() == [0.0, 0.0, 0.040]
    assert tr.hash_ids[0] == list(range(79)) and tr.hash_ids[2] == list(range(151, 198))
    # 512-token blocks: one hash per started block.
    assert [len(h) for h in tr.hash_ids] == [math.ceil(n / 512) for n in tr.input_tokens]


# --------------------------------------------------------------------------------------- make_workload


def test_trace_arrival_default_replays_the_trace() -> None:
    tr = load_trace("azure_code")
    w = make_workload(tr)
    np.testing.assert_array_equal(w.arrival_s, tr.arrival_s)
    np.testing.assert_array_equal(w.input_tokens, tr.input_tokens)
    np.testing.assert_array_equal(w.output_tokens, tr.output_tokens)
    assert len(w) == len(tr) and w.duration_s == pytest.approx(1788.41, abs=0.01)
    assert w.meta["arrival"] == "trace" and w.meta["format"] == "azure" and w.meta["source"] == "azure_code"
    json.dumps(w.meta)


@pytest.mark.parametrize("name", sorted(BUNDLED))
@pytest.mark.parametrize("rate", [1.0, 12.5])
def test_rate_scaling_hits_target_and_keeps_cv(name: str, rate: float) -> None:
    base = make_workload(name, start_s=100.0, duration_s=900.0)
    w = make_workload(name, start_s=100.0, duration_s=900.0, rate=rate)
    assert w.mean_rate == pytest.approx(rate, rel=1e-9)
    assert trace_stats(w)["mean_rate"] == pytest.approx(rate, rel=1e-9)
    assert _gap_cv(w.arrival_s) == pytest.approx(_gap_cv(base.arrival_s), rel=1e-9)
    np.testing.assert_allclose(w.arrival_s, base.arrival_s * (base.mean_rate / rate), rtol=1e-12)
    np.testing.assert_array_equal(w.input_tokens, base.input_tokens)
    assert w.meta["time_scale"] == pytest.approx(base.mean_rate / rate)


def test_window_selection() -> None:
    tr = load_trace("azure_conv")
    w = make_workload(tr, start_s=600.0, duration_s=300.0)
    mask = (tr.arrival_s >= 600.0) & (tr.arrival_s < 900.0)
    assert len(w) == mask.sum() > 0
    np.testing.assert_allclose(w.arrival_s, tr.arrival_s[mask] - tr.arrival_s[mask][0])
    np.testing.assert_array_equal(w.input_tokens, tr.input_tokens[mask])
    assert w.arrival_s[0] == 0.0 and w.duration_s < 300.0
    assert w.meta["window"]["requests"] == mask.sum()

    head = make_workload(tr, start_s=600.0, duration_s=300.0, num_requests=50)
    assert len(head) == 50
    np.testing.assert_array_equal(head.arrival_s, w.arrival_s[:50])
    assert len(make_workload(tr, start_s=1700.0)) == (tr.arrival_s >= 1700.0).sum()
    assert len(make_workload(tr, num_requests=10**9)) == len(tr)


def test_empty_window_is_an_error() -> None:
    with pytest.raises(WorkloadError, match=r"azure_conv: window \[5000, end\) s holds no requests"):
        make_workload("azure_conv", start_s=5000.0)
    # azure_code is idle for minutes: find a one-second window with nothing in it.
    tr = load_trace("azure_code")
    gap = int(np.argmax(np.diff(tr.arrival_s)))
    start = float(tr.arrival_s[gap]) + 1.0
    with pytest.raises(WorkloadError, match="holds no requests"):
        make_workload(tr, start_s=start, duration_s=1.0)


@pytest.mark.parametrize("arrival", ["poisson", "gamma", "onoff"])
def test_synthetic_long_run_mean_rate(arrival: str) -> None:
    # Over seeds, the sample mean rate of 50k requests has a relative spread of 0.4% (Poisson) to 0.9%
    # (gamma, CV 2): 4% is over 4 sigma.
    w = make_workload("azure_conv", arrival=arrival, rate=4.0, cv=2.0, num_requests=50000, seed=3)
    assert len(w) == 50000 and w.arrival_s[0] == 0.0
    assert np.all(np.diff(w.arrival_s) >= 0)
    assert w.mean_rate == pytest.approx(4.0, rel=0.04)
    assert w.meta["arrival"] == arrival and w.meta["seed"] == 3 and w.meta["rate"] == 4.0
    json.dumps(w.meta)


def test_poisson_and_gamma_cv() -> None:
    # Over seeds, the sample CV of 20k gaps spreads by 0.7% (Poisson) and 1.4% (gamma, CV 3) relative.
    p = make_workload("azure_conv", arrival="poisson", rate=5.0, num_requests=20000, seed=1)
    assert _gap_cv(p.arrival_s) == pytest.approx(1.0, rel=0.03)
    for cv in (0.5, 3.0):
        g = make_workload("azure_conv", arrival="gamma", rate=5.0, cv=cv, num_requests=20000, seed=1)
        assert _gap_cv(g.arrival_s) == pytest.approx(cv, rel=0.07)


def test_onoff_has_no_arrivals_in_off_periods() -> None:
    w = make_workload(
        "azure_code", arrival="onoff", rate=2.0, on_s=5.0, off_s=15.0, num_requests=5000, seed=0
    )
    phase = np.mod(w.arrival_s, 20.0)
    assert phase.max() < 5.0
    # during on periods the rate is rate * (on + off) / on = 8 req/s
    assert w.meta["on_rate"] == pytest.approx(8.0)
    assert _gap_cv(w.arrival_s) > 1.5  # idle gaps make it burstier than Poisson


def test_synthetic_lengths_are_joint_samples_from_the_window() -> None:
    tr = load_trace("azure_conv")
    lo, hi = np.searchsorted(tr.arrival_s, [300.0, 600.0])
    pairs = set(zip(tr.input_tokens[lo:hi].tolist(), tr.output_tokens[lo:hi].tolist(), strict=True))
    w = make_workload(tr, start_s=300.0, duration_s=300.0, arrival="poisson", rate=20.0, seed=5)
    assert len(w) == hi - lo  # as many as the window had
    got = set(zip(w.input_tokens.tolist(), w.output_tokens.tolist(), strict=True))
    assert got <= pairs and len(got) > 0.5 * len(pairs)


def test_determinism_by_seed_and_no_global_rng() -> None:
    kw: dict[str, Any] = {"arrival": "gamma", "rate": 3.0, "cv": 2.5, "num_requests": 2000}
    np.random.seed(123)
    a = make_workload("azure_code", seed=7, **kw)
    after = np.random.random()
    np.random.seed(123)
    assert np.random.random() == after  # the global numpy state was neither used nor changed
    np.random.seed(999)
    b = make_workload("azure_code", seed=7, **kw)
    c = make_workload("azure_code", seed=8, **kw)
    for f in ("arrival_s", "input_tokens", "output_tokens"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.arrival_s, c.arrival_s)
    assert not np.array_equal(a.input_tokens, c.input_tokens)
    assert a.meta == b.meta


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"rate": 0.0}, "rate must be"),
        ({"rate": -1.0}, "rate must be"),
        ({"arrival": "gamma", "rate": 1.0, "cv": 0.0}, "cv must be"),
        ({"arrival": "gamma", "rate": 1.0, "cv": -2.0}, "cv must be"),
        ({"arrival": "weibull", "rate": 1.0}, "unknown arrival 'weibull'"),
        ({"arrival": "poisson"}, "needs rate"),
        ({"arrival": "onoff", "rate": 1.0, "on_s": 0.0}, "on_s must be"),
        ({"num_requests": 0}, "num_requests must be"),
        ({"duration_s": 0.0}, "duration_s must be"),
        ({"start_s": -1.0}, "start_s must be"),
        ({"arrival": "poisson", "rate": 1.0, "seed": -1}, "seed must be"),
    ],
)
def test_bad_arguments(kwargs: dict, problem: str) -> None:
    with pytest.raises(WorkloadError, match=problem):
        make_workload("azure_conv", **kwargs)


def test_unknown_bundled_name_lists_known_ones() -> None:
    with pytest.raises(WorkloadError) as ei:
        load_trace("azure_cod")
    msg = str(ei.value)
    assert "azure_cod" in msg and "unknown bundled trace name" in msg
    assert all(name in msg for name in BUNDLED)
    with pytest.raises(WorkloadError, match="no such file"):
        load_trace("/nonexistent/trace.csv")
    with pytest.raises(WorkloadError, match="unknown format"):
        load_trace("azure_code", fmt="parquet")


def test_workload_checks_its_own_arrays() -> None:
    w = Workload(np.array([0.0, 1.0, 3.0]), np.array([5, 6, 7]), np.array([1, 1, 1]))
    assert len(w) == 3 and w.duration_s == 3.0 and w.mean_rate == pytest.approx(2 / 3)
    with pytest.raises(WorkloadError, match="decreases"):
        Workload(np.array([0.0, 2.0, 1.0]), np.array([5, 6, 7]), np.array([1, 1, 1]))
    with pytest.raises(WorkloadError, match="output_tokens must be > 0"):
        Workload(np.array([0.0, 1.0]), np.array([5, 6]), np.array([1, 0]))
    with pytest.raises(WorkloadError, match="equal length"):
        Trace("t", np.array([0.0, 1.0]), np.array([5]), np.array([1, 1]), None, "t")


# --------------------------------------------------------------------------------------- small readers


def test_azure_reader_small_file(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "az.csv",
        AZ_HEADER + "2023-11-16 23:59:59.9999999,10,2\n2023-11-17 00:00:00.0000000,20,3\n"
        "2023-11-17 00:00:00.0000000,30,4\n\n",
    )
    tr = load_trace(p)
    assert tr.fmt == "azure" and tr.name == "az" and tr.source == str(p)
    np.testing.assert_allclose(
        tr.arrival_s, [0.0, 1e-7, 1e-7], atol=1e-12
    )  # 7th digit kept, midnight crossed
    assert tr.input_tokens.tolist() == [10, 20, 30] and tr.output_tokens.tolist() == [2, 3, 4]


def test_azure_2024_timezone_aware_timestamps(tmp_path: Path) -> None:
    p = _write(
        tmp_path / "az24.csv",
        AZ_HEADER + "2024-05-10 00:00:00.009930+00:00,100,5\n2024-05-10 02:00:01.5+02:00,200,6\n"
        "2024-05-10 00:00:03Z,300,7\n",
    )
    tr = load_trace(p)
    np.testing.assert_allclose(tr.arrival_s, [0.0, 1.49007, 2.99007], atol=1e-9)
    mixed = _write(
        tmp_path / "mixed.csv", AZ_HEADER + "2024-05-10 00:00:00+00:00,1,1\n2024-05-10 00:00:01,1,1\n"
    )
    _assert_error(mixed, 3, "mixes timezone-aware and naive")


def test_mooncake_reader_small_file(tmp_path: Path) -> None:
    lines = [
        {"timestamp": 1000, "input_length": 600, "output_length": 3, "hash_ids": [0, 1]},
        {"timestamp": 1000, "input_length": 100, "output_length": 9, "hash_ids": [0]},
        {"timestamp": 3500, "input_length": 1100, "output_length": 1, "hash_ids": [0, 1, 2]},
    ]
    p = _write(tmp_path / "mc.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    tr = load_trace(p)
    assert tr.fmt == "mooncake"
    np.testing.assert_allclose(tr.arrival_s, [0.0, 0.0, 2.5])
    assert tr.input_tokens.tolist() == [600, 100, 1100] and tr.output_tokens.tolist() == [3, 9, 1]
    assert tr.hash_ids == [[0, 1], [0], [0, 1, 2]]
    w = make_workload(tr, arrival="poisson", rate=1.0, num_requests=50, seed=2)
    assert w.hash_ids is not None and len(w.hash_ids) == 50
    by_input = {n: h for n, h in zip(tr.input_tokens.tolist(), tr.hash_ids, strict=True)}
    assert all(by_input[n] == h for n, h in zip(w.input_tokens.tolist(), w.hash_ids, strict=True))
    # without hash_ids anywhere the trace has none
    q = _write(tmp_path / "nohash.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n')
    assert load_trace(q).hash_ids is None


def test_burstgpt_reader_small_file(tmp_path: Path) -> None:
    header = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    body = (
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,ChatGPT,1087,0,1087,Conversation log\n"
        "118,GPT-4,417,276,693,API log\n"
    )
    p = _write(tmp_path / "burst.csv", header + body)
    _assert_error(p, 3, "Response tokens is 0", fmt="burstgpt")
    tr = load_trace(p, drop_failed=True)
    assert tr.fmt == "burstgpt"
    np.testing.assert_allclose(tr.arrival_s, [0.0, 113.0])
    assert tr.input_tokens.tolist() == [472, 417] and tr.output_tokens.tolist() == [18, 276]
    with pytest.raises(WorkloadError, match="drop_failed applies only to the burstgpt format"):
        load_trace("azure_code", drop_failed=True)


# ------------------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("name", "text", "line", "problem"),
    [
        ("missing_col.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.9799600,4808\n", 1,
         "missing column(s) GeneratedTokens"),
        ("bad_ts.csv", AZ_HEADER + "2023-11-16 18:17:03.9799600,1,1\n2023-11-16 18:17:0x.0,1,1\n", 3,
         "unparsable TIMESTAMP"),
        ("bad_date.csv", AZ_HEADER + "2023-02-30 18:17:03.9799600,1,1\n", 2, "unparsable TIMESTAMP"),
        ("zero.csv", AZ_HEADER + "2023-11-16 18:17:03.9799600,0,10\n", 2, "ContextTokens must be > 0"),
        ("neg.csv", AZ_HEADER + "2023-11-16 18:17:03.9799600,5,-3\n", 2, "GeneratedTokens must be > 0"),
        ("nan.csv", AZ_HEADER + "2023-11-16 18:17:03.9799600,abc,3\n", 2, "'abc' is not an integer"),
        ("short.csv", AZ_HEADER + "2023-11-16 18:17:03.9799600,5\n", 2, "expected 3 fields, got 2"),
        ("unsorted.csv", AZ_HEADER + "2023-11-16 18:17:03.0,1,1\n2023-11-16 18:17:05.0,1,1\n"
         "2023-11-16 18:17:04.0,1,1\n", 4, "timestamps not sorted"),
        ("empty.csv", "", 1, "empty file"),
        ("header_only.csv", AZ_HEADER, 2, "no requests"),
        ("unknown.csv", "a,b,c\n1,2,3\n", 1, "cannot tell the format"),
        ("bad.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": 1,\n', 2,
         "invalid JSON"),
        ("nokey.jsonl", '{"timestamp": 0, "output_length": 1}\n', 1, "missing key(s) input_length"),
        ("zero.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 0}\n', 1,
         "output_length must be > 0"),
        ("unsorted.jsonl", ('{"timestamp": 9, "input_length": 5, "output_length": 1}\n\n'
         '{"timestamp": 3, "input_length": 5, "output_length": 1}\n'), 3, "timestamps not sorted"),
        ("hash.jsonl", ('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n'
         '{"timestamp": 1, "input_length": 5, "output_length": 1}\n'), 2, "hash_ids present on some lines"),
        ("empty.jsonl", "\n\n", 2, "empty file"),
    ],
)  # fmt: skip
def test_malformed_files_name_file_line_and_problem(
    tmp_path: Path, name: str, text: str, line: int, problem: str
) -> None:
    _assert_error(_write(tmp_path / name, text), line, problem)


def test_block_hashes_that_do_not_chain_are_refused(tmp_path):
    """Prefix-cache hashes chain (one id, one prefix: an id always follows the same id). A trace or workload where
    an id follows two different ids, or is first in one prompt and not in another, is refused, naming both
    requests; chained lists that share and fork prefixes are accepted."""
    from deflectlab.envs.workloads import Workload, WorkloadError, load_trace

    kw = dict(arrival_s=[0.0, 1.0, 2.0], input_tokens=[1024] * 3, output_tokens=[1] * 3)
    Workload(**kw, hash_ids=[[1, 2, 3], [1, 2, 4], [5]])  # shared prefix [1, 2], a fork, a new prompt: fine
    with pytest.raises(WorkloadError, match=r"block 2 comes after block 4 in request 2 but after block 1 in "
                                            r"request 0"):
        Workload(**kw, hash_ids=[[1, 2], [1, 3], [4, 2]])
    with pytest.raises(WorkloadError, match=r"block 2 comes first in its prompt in request 1 but after block 1"):
        Workload(**kw, hash_ids=[[1, 2], [2, 5], [6]])
    with pytest.raises(WorkloadError, match=r"block 7 comes after block 7 in request 0 but first in its prompt"):
        Workload(**kw, hash_ids=[[7, 7], [8], [9]])  # a repeated id inside one prompt cannot chain either
    f = tmp_path / "bad.jsonl"
    f.write_text('{"timestamp": 0, "input_length": 1024, "output_length": 5, "hash_ids": [1, 2]}\n'
                 '{"timestamp": 5, "input_length": 1024, "output_length": 5, "hash_ids": [3, 2]}\n')
    with pytest.raises(WorkloadError, match=r"bad\.jsonl: hash_ids do not chain: block 2 comes after block 3 in "
                                            r"line 2 but after block 1 in line 1"):
        load_trace(f)
