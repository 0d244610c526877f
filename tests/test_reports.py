"""Generated reports are valid GitHub-flavoured markdown (checked with a real parser, markdown-it-py with its
GFM table rule), plots name policies without machine paths and merge policies with identical results, and the
printed shell scripts give up instead of waiting forever."""

from __future__ import annotations

import subprocess
from pathlib import Path

import markdown_it  # the dev extra: a real GFM parser checks the tables
import pytest

from deflectlab.experiments.compare import REPORT_COLUMNS, ComparisonConfig, run_comparison
from deflectlab.experiments.compare_plots import _series, merge_identical, spans_decades
from deflectlab.experiments.labels import policy_label
from deflectlab.experiments.markdown import table as md_table

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "experiments" / "trained"


def gfm_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every table a GFM parser finds in ``text``: (header cells, body rows of cells), as inline text."""
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(text)
    tables: list[tuple[list[str], list[list[str]]]] = []
    row: list[str] | None = None
    in_head = False
    for tok in tokens:
        if tok.type == "table_open":
            tables.append(([], []))
        elif tok.type in ("thead_open", "thead_close"):
            in_head = tok.type == "thead_open"
        elif tok.type == "tr_open":
            row = []
        elif tok.type == "inline" and row is not None:
            row.append(tok.content)
        elif tok.type == "tr_close" and row is not None:
            (tables[-1][0].extend(row) if in_head else tables[-1][1].append(row))
            row = None
    return tables


def test_the_parser_drops_a_table_whose_separator_is_wider_than_its_header():
    # the bug of issue 14: 15 header cells over a 16-cell separator is no table at all
    bad = "| a | b |\n|---|---:|---:|\n| 1 | 2 |\n"
    good = "| a | b |\n|---|---:|\n| 1 | 2 |\n"
    assert gfm_tables(bad) == []
    assert gfm_tables(good) == [(["a", "b"], [["1", "2"]])]


def test_md_table_builds_the_separator_from_the_header_and_escapes_pipes():
    lines = md_table(("policy", "value"), [("a|b", 1), ("`c`", 2.5)])
    assert lines[1] == "|---|---:|"
    assert gfm_tables("\n".join(lines)) == [(["policy", "value"], [["a|b", "1"], ["`c`", "2.5"]])]
    html = markdown_it.MarkdownIt("commonmark").enable("table").render("\n".join(lines))
    assert "<td>a|b</td>" in html  # the escaped pipe is a character of the cell, not a column break
    with pytest.raises(ValueError, match="row 0 has 3 cells, the header 2"):
        md_table(("a", "b"), [(1, 2, 3)])
    with pytest.raises(ValueError, match="alignment"):
        md_table(("a", "b"), [], align="lx")


@pytest.fixture(scope="module")
def result():
    """round_robin and never_deflect are one policy under two names: identical results by construction."""
    cfg = ComparisonConfig(trace="azure_code", rates=(4.0, 8.0), seeds=(0, 1), window_s=90.0, workers=1,
                           span=(1200.0, 1788.0),
                           policies=("round_robin", "never_deflect", "proactive", f"learned:path={TRAINED}"))
    return run_comparison(cfg, progress=False)


def test_comparison_report_tables_render(result, tmp_path):
    text = result.write_report(tmp_path).read_text()
    tables = gfm_tables(text)
    assert len(tables) == 2  # one per load
    for header, body in tables:
        assert header == list(REPORT_COLUMNS) and len(header) == 15
        assert len(body) == 4 and all(len(r) == 15 for r in body)
        assert [r[0] for r in body] == ["`round_robin`", "`never_deflect`", "`proactive`",
                                        "`learned:path=experiments/trained`"]
    assert str(ROOT) not in text  # no machine path in the report
    assert "`round_robin` = `never_deflect`" in text  # the identical pair is named once, together
    assert result.identical_groups() == [["round_robin", "never_deflect"]]


def test_plot_legends_merge_identical_policies_and_show_no_paths(result):
    labels = list(merge_identical(_series(result, "ttft_p95_s", 1.0)))
    assert labels[0] == "round_robin = never_deflect"
    assert "learned:path=experiments/trained" in labels
    assert len(labels) == 3 and not any(str(ROOT) in lb for lb in labels)


def test_main_job_tables_render(result):
    from deflectlab.experiments.main_job import comparison_summary, motivation_markdown

    tables = gfm_tables(comparison_summary(result))
    assert len(tables) == 1 and len(tables[0][0]) == 8 and len(tables[0][1]) == 2 * 4
    bd = {c: 0.1 for c in ("p_queue", "prefill_exec", "handoff_wait", "transfer", "decode_wait", "first_step",
                           "d_queue", "chunked_prefill")}
    row = {"rate": 3.21, "requests": 100, "ttft_p50_s": 0.1, "ttft_p95_s": 1.0, "ttft_p99_s": 2.0,
           "tbt_p95_s": 0.02, "slo_attainment": 0.9, "prefill_util": 0.3, "decode_util": 0.2,
           "prefill_share_of_p95_ttft": 0.05, "p95_set_mean_ttft_s": 0.8, "breakdown_p95": bd}
    m = {"rows": [row, {**row, "rate": 5.0}], "cluster": result.config.cluster.to_dict(), "trace": "azure_code",
         "policy": "round_robin"}
    tables = gfm_tables(motivation_markdown(m))
    assert [len(h) for h, _ in tables] == [10, 7]
    assert [len(b) for _, b in tables] == [2, 2]
    assert tables[1][1][0][1] == "0.100 (12%)"  # 0.1 s of the 0.8 s tail mean


def test_evaluation_table_renders():
    from deflectlab.agents.evaluation import evaluate, table

    rep = evaluate({"a": "round_robin", "b": "always_deflect"}, {"window_s": 60.0}, [0, 1])
    [(header, body)] = gfm_tables(table(rep))
    assert len(header) == 9 and len(body) == 2 and all(len(row) == 9 for row in body)
    assert {row[0] for row in body} == {"a", "b"}


def test_policy_label_shortens_paths_only():
    assert policy_label(f"learned:path={TRAINED}") == "learned:path=experiments/trained"
    assert policy_label("learned:path=/nowhere/else/my_policy") == "learned:path=my_policy"
    assert policy_label("proactive:margin=0.1,veto=0.9") == "proactive:margin=0.1,veto=0.9"
    assert policy_label("round_robin") == "round_robin"


def test_log_axis_only_where_values_span_a_decade():
    assert spans_decades([0.2, 0.5, 3.0])
    assert not spans_decades([0.2, 0.5, 1.9])
    assert not spans_decades([0.0, 5.0])  # zero has no place on a log axis; one positive value spans nothing


def test_vllm_commands_health_wait_gives_up(tmp_path):
    from deflectlab.scripts.cli import build_parser
    from deflectlab.scripts.cmd_vllm_commands import vllm_commands

    a = build_parser("vllm-commands").parse_args(
        ["vllm-commands", "--shape", "1p1d", "--base-port", "1", "--health-timeout", "0"])
    text = vllm_commands(a)
    func = text[text.index("wait_healthy() {"):text.index("\n}\n") + 3]
    script = tmp_path / "wait.sh"
    script.write_text(func + "wait_healthy\necho rc=$?\n")
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert "rc=1" in out.stdout  # nothing answers on port 1: it returns 1 at the deadline instead of looping
    assert "no /health answer on port 1 after 0 s" in out.stderr
    assert "wait_healthy && deflectlab route" in text
    with pytest.raises(ValueError, match="--health-timeout"):
        vllm_commands(build_parser("vllm-commands").parse_args(["vllm-commands", "--health-timeout", "-1"]))


def test_simulate_summary_says_what_the_breakdown_averages_over():
    from deflectlab.envs.config import ClusterConfig
    from deflectlab.experiments.runner import SimulationSpec, WorkloadSpec, run_simulation
    from deflectlab.scripts.cmd_simulate import format_summary

    res = run_simulation(SimulationSpec(workload=WorkloadSpec(trace="azure_code", rate=6.0, duration_s=60.0),
                                        cluster=ClusterConfig(), policy="round_robin"))
    s = res.summary
    ttft = res.records["ttft_s"]
    tail = ttft[ttft >= s["ttft_s"]["p95"]]
    assert s["p95_set_mean_ttft_s"] == pytest.approx(tail.mean())  # what the line's number is: recomputed
    text = format_summary(s)
    assert (f"the slowest 5 % of requests (TTFT at or above the P95) wait {s['p95_set_mean_ttft_s']:.3f} s on "
            "average") in text
    assert "tail set" not in text
