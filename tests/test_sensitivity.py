"""``deflectlab sensitivity``: the command end to end on a tiny budget, and the "what holds" logic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from deflectlab.experiments.sensitivity import conclusions, conditions

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deflectlab.scripts.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_conditions_cover_presets_and_the_dispatch_sweep():
    specs = dict(conditions())
    assert specs["vllm-nixl"] == "vllm-nixl" and specs["rdma"] == "rdma" and specs["tcp"] == "tcp"
    assert specs["dispatch 0 ms"] == "vllm-nixl:dispatch_s=0"
    assert specs["dispatch 400 ms"] == "vllm-nixl:dispatch_s=0.4"


def _row(rate, pro, thr, prefill=0.1, handoff=0.2):
    return {"rate": rate, "proactive_gain": pro, "threshold_gain": thr, "prefill_share": prefill,
            "handoff_share": handoff}


def test_conclusions_name_the_conditions_where_a_statement_fails():
    doc = {"rates": [1.0, 3.0], "conditions": [
        {"label": "a", "rows": [_row(1.0, 0.3, 0.1), _row(3.0, 0.5, 0.2)]},
        {"label": "b", "rows": [_row(1.0, -0.1, 0.2, handoff=0.05), _row(3.0, 0.4, 0.1)]},
    ]}
    text = "\n".join(conclusions(doc))
    assert ("Does NOT hold under every condition: the proactive deflector lowers P95 TTFT below never-deflect at "
            "every load (fails under: b)") in text
    assert "Holds under every condition: the best tuned threshold lowers P95 TTFT" in text
    # b at 1 req/s: proactive -10 % vs threshold +20 %
    assert "the proactive deflector beats the best tuned threshold at every load (fails under: b)" in text
    assert "Holds under every condition: prefill execution is under a quarter" in text
    assert "at the lowest load (1 req/s) (fails under: b)" in text


def test_sensitivity_command_writes_report_json_and_plots(tmp_path):
    r = _cli("sensitivity", "--out", str(tmp_path), "--rates", "3.21", "--train-seeds", "100", "--eval-seeds", "0",
             "--window", "150", "--workers", "1", "--no-progress")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "sensitivity.json").read_text())
    assert [c["label"] for c in doc["conditions"]] == [lab for lab, _ in conditions()]
    sweep = [c for c in doc["conditions"] if c["label"].startswith("dispatch")]
    medians = [c["rows"][0]["handoff_p50_s"] for c in sweep]
    assert medians == sorted(medians) and medians[-1] - medians[0] > 0.35  # the sweep moves the hand-off
    report = (tmp_path / "report.md").read_text()
    assert "### What holds" in report and "| rdma | 3.21 |" in report
    for name in ("sensitivity_presets.png", "sensitivity_dispatch.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bad_handoff_flag_is_one_clear_line():
    r = _cli("simulate", "--handoff", "infiniband")
    assert r.returncode == 2 and "unknown hand-off preset 'infiniband'" in r.stderr
    assert "Traceback" not in r.stderr
