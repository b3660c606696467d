"""``namm-transfer report``: protocol and interval columns, row grouping, the README headline and docs/results.md."""

from __future__ import annotations

import json
from pathlib import Path

from namm_transfer.cli import main
from namm_transfer.report import (
    load_summaries,
    order_rows,
    render_breakdown,
    render_headline,
    render_interval,
    render_results_page,
    render_rows,
    render_summary,
)

REPO = Path(__file__).resolve().parents[1]


def _iv(mean, lo, hi, excludes_zero, n=20):
    return {"mean": mean, "lo": lo, "hi": hi, "n": n, "level": 0.95, "resamples": 2000, "excludes_zero": excludes_zero}


# a summary in the agreed schema, written by hand: two protocols, a noise floor, intervals
ROWS = [
    {"policy": "namm", "protocol": "ratio-50", "score": 40.0, "score_std": 5.0, "n": 20, "retained_cache": 0.5,
     "vs_full": _iv(-10.0, -18.25, -2.5, True)},
    {"policy": "h2o", "protocol": "ratio-50", "score": 41.25, "score_std": 4.0, "n": 20, "retained_cache": 0.5,
     "vs_full": _iv(-8.75, -15.0, 0.0, False), "vs_namm": _iv(1.25, -0.3, 2.74, False)},
    {"policy": "full", "protocol": None, "score": 50.0, "score_std": 3.0, "n": 20, "retained_cache": 1.0},
    {"policy": "namm", "protocol": "threshold", "score": 49.0, "score_std": 3.0, "n": 20, "retained_cache": 0.8,
     "vs_full": _iv(-1.0, -3.0, 1.0, False)},
    {"policy": "l2", "protocol": "threshold", "score": 30.0, "score_std": 3.0, "n": 20, "retained_cache": 0.8,
     "vs_full": _iv(-20.0, -25.0, -15.0, True), "vs_namm": _iv(-19.0, -24.0, -14.0, True)},
    {"policy": "full-alt", "protocol": None, "score": 50.0, "score_std": 3.0, "n": 20, "retained_cache": 1.0,
     "vs_full": _iv(0.0, -0.04, 0.0, False)},
]  # fmt: skip

SUMMARY = {
    "command": "namm-transfer eval --target language --output results/language.json",
    "target": "language",
    "model": "smollm2-135m",
    "settings": {"protocols": "ratio:0.5,threshold", "noise_floor": "update interval 256 instead of 512"},
    "rows": ROWS,
    "breakdown_by": "task",
    "breakdown": {
        "passkey": [
            {"policy": "namm", "protocol": "ratio-50", "score": 50.0, "score_std": 1.0, "n": 4},
            {"policy": "full", "protocol": None, "score": 100.0, "score_std": 0.0, "n": 4},
            {"policy": "namm", "protocol": "threshold", "score": 75.0, "score_std": 2.0, "n": 4},
        ]
    },
}


def test_render_interval_formats_mean_bounds_and_the_mark():
    assert render_interval(_iv(1.25, -0.3, 2.74, False)) == "+1.2 [-0.3, +2.7]"
    assert render_interval(_iv(-10.0, -18.25, -2.5, True)) == "-10.0 [-18.2, -2.5]*"
    assert render_interval(_iv(0.0, -0.0, 0.0, False)) == "+0.0 [+0.0, +0.0]"
    assert render_interval(None) == "–"
    assert render_interval({"mean": 1.0}) == "–"  # no bounds: not an interval
    assert render_interval(_iv(float("nan"), 0.0, 1.0, False)) == "–"


def test_rows_grouped_by_protocol_with_references_first():
    order = [(r["policy"], r["protocol"]) for r in order_rows(ROWS)]
    assert order == [
        ("full", None),
        ("full-alt", None),
        ("namm", "ratio-50"),
        ("h2o", "ratio-50"),
        ("namm", "threshold"),
        ("l2", "threshold"),
    ]
    dt = [{"policy": p} for p in ("namm", "canonical", "h2o", "full")]  # an older summary: no protocol field
    assert [r["policy"] for r in order_rows(dt)] == ["full", "canonical", "namm", "h2o"]


def test_rows_table_renders_protocol_interval_columns_and_legend():
    table = render_rows(ROWS)
    lines = table.splitlines()
    assert lines[0] == "| policy | protocol | score | ± std | n | retained cache | Δ vs full | Δ vs NAMM |"
    assert lines[1] == "|:--|:--|--:|--:|--:|--:|--:|--:|"
    assert lines[2] == "| full | – | 50.00 | 3.00 | 20 | 100.0% | – | – |"
    assert lines[3] == "| full-alt | – | 50.00 | 3.00 | 20 | 100.0% | +0.0 [-0.0, +0.0] | – |"
    assert lines[4] == "| namm | ratio-50 | 40.00 | 5.00 | 20 | 50.0% | -10.0 [-18.2, -2.5]* | – |"
    assert lines[5] == "| h2o | ratio-50 | 41.25 | 4.00 | 20 | 50.0% | -8.8 [-15.0, +0.0] | +1.2 [-0.3, +2.7] |"
    assert lines[6] == "| namm | threshold | 49.00 | 3.00 | 20 | 80.0% | -1.0 [-3.0, +1.0] | – |"
    assert lines[7] == "| l2 | threshold | 30.00 | 3.00 | 20 | 80.0% | -20.0 [-25.0, -15.0]* | -19.0 [-24.0, -14.0]* |"
    assert lines[8] == ""
    legend = lines[9]
    assert len(lines) == 10 and "95% paired bootstrap interval, 2,000 resamples" in legend
    assert "`*`: the interval excludes 0" in legend and "no difference detected" in legend


def test_summary_headline_and_breakdown_per_protocol():
    full = render_summary(SUMMARY, "language")
    assert "Noise floor (`full-alt`): the full cache run again with update interval 256 instead of 512." in full
    assert "**By task, ratio-50** (score ± std)\n\n| task | full | namm |" in full
    assert "| passkey | 100.00 ± 0.00 | 50.00 ± 1.00 |" in full
    assert "**By task, threshold** (score ± std)" in full and "| passkey | 100.00 ± 0.00 | 75.00 ± 2.00 |" in full
    head = render_headline(SUMMARY, "language", link="docs/results.md#language")
    # the headline: the intervals stand in for ± std and n
    assert "| policy | protocol | score | retained cache | Δ vs full | Δ vs NAMM |\n" in head
    assert "| namm | ratio-50 | 40.00 | 50.0% | -10.0 [-18.2, -2.5]* | – |" in head and "**By task" not in head
    assert "95% paired bootstrap interval" in head
    assert head.endswith("All columns and breakdowns: [docs/results.md](docs/results.md#language).")
    # a breakdown without protocols pivots over policies as before
    old = render_breakdown({"qa": [{"policy": "full", "score": 60.0, "score_std": 1.0}]}, label="task")
    assert old == "**By task** (score ± std)\n\n| task | full |\n|:--|--:|\n| qa | 60.00 ± 1.00 |"


def test_older_summaries_render_without_the_new_columns():
    rows = [
        {"policy": "namm", "score": 16.0, "score_std": 35.55, "n": 20, "retained_cache": 0.783, "throughput": 47.5},
        {"policy": "full", "score": 31.0, "score_std": 45.38, "n": 20, "retained_cache": 1.0, "throughput": 77.6},
    ]
    table = render_rows(rows)
    assert table.splitlines() == [
        "| policy | score | ± std | n | retained cache | throughput |",
        "|:--|--:|--:|--:|--:|--:|",
        "| full | 31.00 | 45.38 | 20 | 100.0% | 77.6 |",
        "| namm | 16.00 | 35.55 | 20 | 78.3% | 47.5 |",
    ]
    # without intervals the headline keeps ± std and n
    assert render_rows(rows, columns=("retained_cache",), compact=True).splitlines()[0] == (
        "| policy | score | ± std | n | retained cache |"
    )
    # every committed summary renders, in full and as a headline
    summaries = load_summaries(REPO / "results")
    assert {"language", "decision-transformer", "video-llava-synthetic"} <= set(summaries)
    for name, summary in summaries.items():
        assert "| policy |" in render_summary(summary, name), name
        assert "| policy |" in render_headline(summary, name), name


def test_report_writes_readme_headlines_and_the_results_page(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "language.json").write_text(json.dumps(SUMMARY))
    other = dict(SUMMARY, command="namm-transfer eval --target language --n 2 --output results/language-small.json")
    (results / "language-small.json").write_text(json.dumps(other))
    readme = tmp_path / "README.md"
    readme.write_text("# P\n\n<!-- results:language:start -->\nold\n<!-- results:language:end -->\n\nTail.\n")
    argv = ["report", "--results-dir", str(results), "--readme", str(readme)]
    assert main([*argv, "--check"]) == 1  # stale README, no page yet
    assert not (tmp_path / "docs").exists()
    assert main(argv) == 0
    text = readme.read_text()
    assert "(docs/results.md#language)" in text and "| l2 | threshold |" in text and "**By task" not in text
    assert "language-small" not in text  # no section for it in the README: only in the results page
    page = (tmp_path / "docs" / "results.md").read_text()
    assert page == render_results_page(load_summaries(results), results)
    assert page.startswith("<!-- generated by `namm-transfer report`")
    assert "Generated by `namm-transfer report`" in page
    assert page.index("\n## language\n") < page.index("\n## language-small\n")
    assert "**By task, threshold**" in page and "--n 2 --output results/language-small.json" in page
    out = capsys.readouterr().out
    assert "language: updated" in out and "results.md: updated (2 results files)" in out
    assert main([*argv, "--check"]) == 0
    # a hand edit of the page is out of date for --check, and the next report restores it
    (tmp_path / "docs" / "results.md").write_text(page + "edited\n")
    assert main([*argv, "--check"]) == 1
    assert main(argv) == 0 and (tmp_path / "docs" / "results.md").read_text() == page
