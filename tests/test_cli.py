"""The command line as a user runs it: subprocesses with tiny budgets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deflectlab.scripts.cli", *args],
                          cwd=ROOT, capture_output=True, text=True,
                          check=check, timeout=300)


def test_simulate_json_has_the_documented_keys():
    out = cli("simulate", "--trace", "azure_code", "--num-requests", "400", "--rate", "6", "--json").stdout
    s = json.loads(out)
    for key in ("requests", "completed", "rejected", "slo_attainment", "deflection_rate", "ttft_breakdown_p95",
                "prefill_share_of_p95_ttft", "wall_s", "events"):
        assert key in s
    for key in ("ttft_s", "tbt_s"):
        assert {"p50", "p95", "p99"} <= set(s[key])
    assert s["requests"] == 400 and s["completed"] + s["rejected"] == 400


def test_simulate_writes_records_summary_and_plots(tmp_path):
    r = cli("simulate", "--config", str(ROOT / "experiments" / "simulate_2p2d.yaml"), "--out", str(tmp_path))
    assert "TTFT" in r.stdout and "P95 TTFT breakdown" in r.stdout
    for f in ("requests.csv", "summary.json", "config.json", "ttft_cdf.png", "ttft_breakdown_p95.png"):
        assert (tmp_path / f).stat().st_size > 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["cluster"]["num_prefill"] == 2 and cfg["workload"]["trace"] == "azure_code"
    rows = (tmp_path / "requests.csv").read_text().splitlines()
    assert len(rows) == 1 + json.loads((tmp_path / "summary.json").read_text())["requests"]


def test_main_job_writes_its_report(tmp_path):
    cli("main", "--out", str(tmp_path), "--rates", "2", "6", "--no-compare", "--no-sensitivity")
    report = (tmp_path / "report.md").read_text()
    assert "prefill exec share of P95 TTFT" in report
    assert (tmp_path / "motivation" / "ttft_breakdown_p95.png").exists()


@pytest.mark.parametrize("args, message", [
    (["simulate", "--trace", "no_such_trace"], "unknown"),
    (["simulate", "--shape", "2x2"], "not of the form"),
    (["simulate", "--policy", "warp_drive"], "unknown policy"),
    (["simulate", "--rate", "-3"], "rate"),
])
def test_bad_input_is_one_clear_line(args, message):
    r = cli(*args, check=False)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_config_file_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster:\n  num_prefil: 2\n")
    r = cli("simulate", "--config", str(bad), check=False)
    assert r.returncode == 2 and "num_prefil" in r.stderr
