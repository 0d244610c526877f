"""The command line as a user runs it: subprocesses with tiny budgets."""

from __future__ import annotations

import argparse
import dataclasses
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


# -- one flag grammar across commands (in-process: parsers only) ---------------------------------------------------
GRAMMAR_COMMANDS = ("simulate", "compare", "tune", "main", "evaluate", "replay", "train")
CLUSTER_COMMANDS = ("simulate", "compare", "tune", "main", "evaluate")


def _actions(command: str) -> dict[str, argparse.Action]:
    """flag -> argparse action of ``command``'s own parser."""
    from deflectlab.scripts.cli import build_parser, command_parser

    parser = command_parser(build_parser(command), command)
    return {s: a for a in parser._actions for s in a.option_strings}


def _parse(command: str, *argv: str) -> argparse.Namespace:
    from deflectlab.scripts.cli import build_parser, parse

    return parse(build_parser(command), command, [command, *argv])


def test_cluster_flags_are_one_set_built_from_the_config_fields():
    from deflectlab.envs.config import ClusterConfig
    from deflectlab.scripts.options import flag_name

    expected = {flag_name(f) for f in dataclasses.fields(ClusterConfig)} - {None}
    assert "--ttft-slo-s" in expected and "--prefill-max-batched-tokens" in expected  # units in the names
    helps = {}
    for command in CLUSTER_COMMANDS:
        acts = _actions(command)
        assert expected | {"--shape", "--profile"} <= set(acts), command
        helps[command] = {f: acts[f].help for f in expected}
    assert all(h == helps["simulate"] for h in helps.values())  # same name, same meaning, same words


def test_same_flag_same_meaning_across_commands():
    acts = {c: _actions(c) for c in GRAMMAR_COMMANDS}
    for c, a in acts.items():
        if "--rates" in a:
            assert "requests/s" in a["--rates"].help and "not multiples" in a["--rates"].help, c
            assert a["--rates"].nargs == "+", c
        if "--loads" in a:
            assert "recorded rate" in a["--loads"].help and "not requests/s" in a["--loads"].help, c
            assert a["--loads"].nargs == "+", c
        if "--duration" in a:  # only ever the deprecated spelling of --window
            assert a["--duration"].dest == "window" and a["--duration"].help.startswith("deprecated"), c
        for lst in ("--policies", "--seeds", "--ray-seeds"):
            if lst in a:
                assert a[lst].nargs == "+", (c, lst)
        if "--seed" in a:
            assert a["--seed"].nargs is None, c
    for c in ("simulate", "compare", "tune", "replay"):
        assert "--window" in acts[c], c
    assert {c for c, a in acts.items() if "--rates" in a} == {"compare", "tune", "main"}
    assert {c for c, a in acts.items() if "--loads" in a} == {"evaluate"}


def test_lists_window_and_aliases_parse_the_same_way():
    from deflectlab.envs.config import ClusterConfig
    from deflectlab.scripts.options import cluster_from_flags, parse_policies, parse_rates, workload_from_flags

    assert parse_rates(_parse("compare", "--rates", "2", "5").rates) == (2.0, 5.0)
    assert parse_rates(_parse("compare", "--rates", "2,5").rates) == (2.0, 5.0)
    assert parse_rates(_parse("compare").rates) == (3.21, 5.0, 8.0)  # the default, through the same parser
    a = _parse("simulate", "--ttft-slo", "2", "--prefill-budget", "4096", "--shape", "3p1d", "--profile",
               "a100-80gb_llama-3-8b", "--decode-profile", "h100-80gb_llama-3-8b")
    c = cluster_from_flags(a)
    assert (c.ttft_slo_s, c.prefill_max_batched_tokens, c.num_prefill, c.num_decode) == (2.0, 4096, 3, 1)
    assert (c.prefill_profile, c.decode_profile) == ("a100-80gb_llama-3-8b", "h100-80gb_llama-3-8b")
    assert cluster_from_flags(_parse("simulate")) == ClusterConfig()
    w = workload_from_flags(_parse("simulate", "--window", "300:600"))
    assert (w.start_s, w.duration_s, w.num_requests) == (300.0, 600.0, None)
    assert workload_from_flags(_parse("simulate", "--duration", "60")) == \
        workload_from_flags(_parse("simulate", "--window", "60"))
    assert workload_from_flags(_parse("simulate", "--window", "50req")).num_requests == 50
    with pytest.raises(ValueError, match="both set the start"):
        workload_from_flags(_parse("simulate", "--start-s", "5", "--window", "10:20"))
    assert parse_policies(["proactive:margin=0.1,min_chunk=64", "round_robin"]) == \
        ("proactive:margin=0.1,min_chunk=64", "round_robin")
    for old in (["round_robin,proactive"], ["learned:path=experiments/trained,round_robin"]):
        with pytest.raises(ValueError, match="separate policies with spaces"):
            parse_policies(old)
    assert parse_policies(["learned:path=x;which=best"]) == ("learned:path=x,which=best",)  # evaluate's old ';'



def test_generated_flags_pick_up_a_new_field():
    """A field added to a config dataclass (as the hand-off model adds one) gets its flag with no command edited."""
    from deflectlab.envs.config import cli_field
    from deflectlab.scripts.options import add_dataclass_flags, given

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        handoff: str = cli_field("pull", "how KV moves", choices=("pull", "push"))
        gap_s: float | None = cli_field(None, "a gap", unit="seconds", aliases=("--gap",))
        hidden: int = cli_field(3, "no flag", flag=None)

    p = argparse.ArgumentParser()
    add_dataclass_flags(p, Cfg)
    acts = {s: a for a in p._actions for s in a.option_strings}
    assert set(acts) == {"-h", "--help", "--handoff", "--gap-s", "--gap"}
    assert acts["--handoff"].choices == ("pull", "push") and "default: pull" in acts["--handoff"].help
    assert acts["--gap-s"].type is float and "[seconds]" in acts["--gap-s"].help
    assert given(p.parse_args(["--gap", "2.5"]), Cfg) == {"gap_s": 2.5}
    assert given(p.parse_args([]), Cfg) == {}


@pytest.mark.parametrize("argv, command", [
    (["simulate", "--no-such-flag", "1"], "simulate"),
    (["compare", "--rates", "x"], "compare"),
    (["simulate", "--rate", "-3", "--num-requests", "5"], "simulate"),
    (["evaluate", "--policies", "round_robin,proactive", "--config", "experiments/train_code_ppo.yaml"], "evaluate"),
    (["main", "--rates", "trace"], "main"),
])
def test_every_error_prints_the_subcommands_own_usage(argv, command, capsys):
    from deflectlab.scripts.cli import main

    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"usage: deflectlab {command} ")
    assert f"deflectlab {command}: error:" in err and "Traceback" not in err


def test_labelled_options_parse_and_name_a_bad_item():
    from deflectlab.scripts.options import labelled

    assert labelled(["a=learned:path=x", " b = y "]) == {"a": "learned:path=x", "b": "y"}
    for bad in ("noequals", "=x", "a="):
        with pytest.raises(argparse.ArgumentTypeError, match=f"{bad!r} is not LABEL=SPEC"):
            labelled([bad], "LABEL=SPEC")
