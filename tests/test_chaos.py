"""The chaos test in its short form (scripts/chaos.py): 2P2D emulators, the router and an open-loop replay; one
prefill and one decode instance are killed with SIGKILL mid-run and restarted. Nothing may be lost, the
router's outcome counters must add up to the requests sent, and both instances must come back."""

from __future__ import annotations

import json
import math

from deflectlab.scripts.chaos import main


def test_chaos_short_form_loses_nothing_and_counters_balance(tmp_path, capsys):
    rc = main(["--duration", "16", "--rate", "6", "--time-scale", "0.25", "--down", "1", "--busy-wait", "1",
               "--out", str(tmp_path)])
    t = json.loads((tmp_path / "chaos.json").read_text())
    assert rc == 0, capsys.readouterr().out
    assert t["sent"] == 96 and t["lost"] == 0
    assert t["answered"] + t["failed_clearly"] == t["sent"] == t["router_outcomes_total"]
    assert t["router_in_flight_at_end"] == 0
    assert t["requests_during_fault"] > 0  # the fault overlapped traffic
    for ev in t["events"]["instances"].values():
        assert math.isfinite(ev["back_after_restart_s"]) and 0 <= ev["back_after_health_s"] < 5
    out = capsys.readouterr().out
    assert "lost" in out and "back in rotation" in out and "TTFT p99 during the fault" in out
