"""The namm-transfer command line: cheap help, dispatch contract, info, report."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from namm_transfer.evals.args import StrictParser, default_output, nonnegative_int, positive_int, repository_root

from namm_transfer import cli
from namm_transfer.cli import Plugin, main
from namm_transfer.report import MECHANICS_NOTE, render_rows
from namm_transfer.results import ResultsWriter, read_results, signature_differences

HELP_COMMANDS = [
    ["--help"],
    ["eval", "--help"],
    *(["eval", "--target", t, "--help"] for t in cli.EVAL_TARGETS),
    ["evolve", "--help"],
    ["rl", "--help"],
    ["rl", "collect", "--help"],
    ["rl", "train", "--help"],
    ["video", "train", "--help"],
    ["models", "--help"],
    ["models", "fetch", "--help"],
    ["report", "--help"],
    ["info", "--help"],
]


def test_help_works_without_importing_torch():
    code = textwrap.dedent(
        f"""
        import contextlib, io, sys
        from namm_transfer.cli import main
        for argv in {HELP_COMMANDS!r}:
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = main(argv)
            assert rc == 0, (argv, rc)
            assert "usage: namm-transfer" in buf.getvalue(), argv
        heavy = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_info_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "namm_transfer.cli", "info"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("namm_transfer", "torch", "policies", "adapters", "NAMMs", "cuda"):
        assert word in proc.stdout
    assert "full" in proc.stdout and "h2o" in proc.stdout
    assert "shipped:hopper-medium" in proc.stdout and "video models   smollm2-135m-video" in proc.stdout


def test_unknown_target_exits_2(capsys):
    assert main(["eval", "--target", "nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_missing_target_module_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(cli.EVAL_TARGETS, "language", Plugin("namm_transfer.evals.no_such_module", "target language"))
    assert main(["eval", "--target", "language", "--some-target-option", "1"]) == 2
    err = capsys.readouterr().err
    assert "target language is not available in this build" in err and "no_such_module" in err
    # its --help still works and says why
    assert main(["eval", "--target", "language", "--help"]) == 0
    assert "not available in this build" in capsys.readouterr().out


def test_missing_dependency_names_the_extra(tmp_path, monkeypatch, capsys):
    (tmp_path / "needs_missing_dep.py").write_text("import surely_not_installed_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, ("rl", "collect"), Plugin("needs_missing_dep", "command rl collect", "rl"))
    assert main(["rl", "collect"]) == 2
    err = capsys.readouterr().err
    assert "command rl collect is not available" in err
    assert "surely_not_installed_pkg" in err and "namm-transfer[rl]" in err


LAZY_DEP_TARGET = """
def add_arguments(parser):
    pass


def main(args):
    import surely_not_installed_pkg.sub  # an optional dependency imported only when the command runs
"""


def test_a_dependency_imported_when_the_command_runs_names_the_extra(tmp_path, monkeypatch, capsys):
    """A target whose module imports fine but whose run needs a missing package (gymnasium for the DT eval in a
    core-only install) exits 2 with the extra to install, not a traceback."""
    (tmp_path / "lazy_dep_target.py").write_text(LAZY_DEP_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EVAL_TARGETS, "decision-transformer", Plugin("lazy_dep_target", "target dt", "rl"))
    assert main(["eval", "--target", "decision-transformer", "--output", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "target dt needs the package 'surely_not_installed_pkg'" in err and "namm-transfer[rl]" in err


FAKE_TARGET = '''
"""A stand-in eval target that records what the CLI hands it."""
SEEN = {}


def add_arguments(parser):
    parser.add_argument("--budget", type=float, default=0.5)
    parser.set_defaults(model="tiny-default")


def main(args):
    SEEN["args"] = args
    return 3
'''


def test_eval_dispatch_contract(tmp_path, monkeypatch):
    (tmp_path / "fake_eval_target.py").write_text(FAKE_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EVAL_TARGETS, "language", Plugin("fake_eval_target", "target language"))
    argv = ["eval", "--target", "language", "--policies", "full,namm,full", "--budget", "0.25", "--limit", "4"]
    assert main(argv) == 3
    import fake_eval_target

    args = fake_eval_target.SEEN["args"]
    assert args.target == "language" and args.subcommand == "eval"
    assert args.policies == ["full", "namm"]
    assert args.budget == 0.25 and args.limit == 4 and args.seed == 0
    assert args.model == "tiny-default"  # a target may set the common options' defaults
    assert args.namm is None and args.device is None and args.dtype is None
    assert args.output == "runs/language/language.json"  # an ignored folder: a run never touches results/
    assert args.command == "namm-transfer eval --target language --policies full,namm,full --budget 0.25 --limit 4"
    assert args.argv == argv and args.log_level == "INFO"
    # default policies come as a list too
    assert main(["eval", "--target", "language", "--log-level", "debug"]) == 3
    args = fake_eval_target.SEEN["args"]
    assert args.policies == ["full", "namm", "h2o", "tova", "l2", "streaming", "random"] and args.log_level == "DEBUG"


def test_bad_common_options_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_eval_target3.py").write_text(FAKE_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EVAL_TARGETS, "language", Plugin("fake_eval_target3", "target language"))
    assert main(["eval", "--target", "language", "--device", "tpu"]) == 2
    assert "device must be" in capsys.readouterr().err
    assert main(["eval", "--target", "language", "--limit", "0"]) == 2
    assert "positive" in capsys.readouterr().err


def test_unusable_cuda_device_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import torch

    (tmp_path / "fake_eval_target4.py").write_text(FAKE_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EVAL_TARGETS, "language", Plugin("fake_eval_target4", "target language"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["eval", "--target", "language", "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["eval", "--target", "language", "--device", "cuda:1"]) == 2
    assert "1 CUDA device(s); use --device cpu" in capsys.readouterr().err


def test_unknown_model_and_unsupported_model_are_clear_errors(tmp_path, monkeypatch, capsys):
    from namm_transfer.models import ModelNotAvailableError
    from namm_transfer.registry import UnsupportedModelError, find_adapter

    assert main(["models", "fetch", "nope"]) == 2
    assert "error: unknown model 'nope'" in capsys.readouterr().err

    class NotADecoder(__import__("torch").nn.Module):
        pass

    with pytest.raises(UnsupportedModelError, match="no adapter supports NotADecoder"):
        find_adapter(NotADecoder())
    assert issubclass(UnsupportedModelError, TypeError) and issubclass(ModelNotAvailableError, RuntimeError)


def write_summary(path, rows, breakdown=None, settings=None):
    summary = {
        "command": "namm-transfer eval --target language",
        "target": "language",
        "model": "tiny-llama",
        "namm_checkpoint": {"name": "bam.smollm2-135m", "sha256": "0123456789abcdef" * 4},
        "settings": settings or {"budget": 0.25},
        "versions": {"python": "3.11", "torch": "2.11", "transformers": "5.17", "namm_transfer": "0.1.0"},
        "hardware": {"platform": "linux", "cpu_count": 4, "cuda_devices": []},
        "started": "2025-01-01T00:00:00+00:00",
        "finished": "2025-01-01T01:00:00+00:00",
        "rows": rows,
        "breakdown": breakdown or {},
        "breakdown_by": "task",
    }
    path.write_text(json.dumps(summary))


README = """# Project

Intro text that must not change.

<!-- results:language:start -->
old table
<!-- results:language:end -->

Middle text.

<!-- results:nothing-here:start -->
keep me
<!-- results:nothing-here:end -->

Tail.
"""


def test_report_rebuilds_readme_section(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    rows = [
        {"policy": "full", "score": 50.0, "score_std": 2.5, "n": 10, "retained_cache": 1.0, "peak_memory_mb": 123.4},
        {"policy": "namm", "score": 48.125, "score_std": 3.0, "n": 10, "retained_cache": 0.4},
    ]
    breakdown = {"qa": [{"policy": "full", "score": 60.0, "score_std": 1.0, "n": 5}]}
    write_summary(results / "language.json", rows, breakdown)
    readme = tmp_path / "README.md"
    readme.write_text(README)

    assert main(["report", "--results-dir", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    before, rest = text.split("<!-- results:language:start -->\n")
    section, after = rest.split("<!-- results:language:end -->")
    assert before == README.split("<!-- results:language:start -->\n")[0]
    assert after == README.split("<!-- results:language:end -->")[1]
    assert "old table" not in section
    # the README gets the headline columns; docs/results.md (generated next to it) every column and breakdown
    assert "| policy | score | ± std | n | retained cache |\n" in section
    assert "| namm | 48.12 | 3.00 | 10 | 40.0% |" in section
    assert "| full | 50.00 | 2.50 | 10 | 100.0% |" in section
    page = (tmp_path / "docs" / "results.md").read_text()
    assert "| policy | score | ± std | n | retained cache | peak memory (MB) |" in page
    assert "| namm | 48.12 | 3.00 | 10 | 40.0% | – |" in page
    assert "| full | 50.00 | 2.50 | 10 | 100.0% | 123 |" in page
    assert "**By task**" in page and "| qa | 60.00 ± 1.00 |" in page
    assert "**By task**" not in section
    assert "`bam.smollm2-135m` (sha256 0123456789ab)" in section
    assert MECHANICS_NOTE not in section
    out = capsys.readouterr().out
    assert "language: updated" in out and "nothing-here: missing" in out

    # --print prints and leaves the README alone
    capsys.readouterr()
    readme.write_text(README)
    assert main(["report", "--results-dir", str(results), "--readme", str(readme), "--print"]) == 0
    assert "## language" in capsys.readouterr().out and readme.read_text() == README
    assert main(["report", "--results-dir", str(results), "--readme", str(readme)]) == 0
    assert readme.read_text() == text
    assert main(["report", "--results-dir", str(tmp_path / "empty"), "--readme", str(readme)]) == 1
    assert "no results summaries" in capsys.readouterr().err

    # idempotent, and --check agrees
    assert main(["report", "--results-dir", str(results), "--readme", str(readme), "--check"]) == 0
    assert readme.read_text() == text

    # a mechanics-only run says so; --check notices the stale README and writes nothing
    write_summary(results / "language.json", rows, settings={"budget": 0.25, "mechanics_only": True})
    assert main(["report", "--results-dir", str(results), "--readme", str(readme), "--check"]) == 1
    assert readme.read_text() == text
    assert main(["report", "--results-dir", str(results), "--readme", str(readme)]) == 0
    assert MECHANICS_NOTE in readme.read_text()


def test_report_renders_the_by_length_table_when_a_run_has_two_lengths():
    from namm_transfer.report import render_by_length, render_summary

    row = {"policy": "namm", "score": 12.0, "score_std": 4.0, "n": 10, "loglik_score": 14.875, "retained_cache": 0.6871}
    full = {"policy": "full", "score": 42.0, "score_std": 5.0, "n": 10, "loglik_score": 53.7, "retained_cache": 1.0}
    two = {"2048": [dict(row, score=20.0)], "4096": [row, full]}
    table = render_by_length(two)
    assert table.startswith("**By prompt length**")
    assert "| prompt tokens | policy | score | ± std | n | loglik score | retained cache |" in table
    assert "| 2048 | namm | 20.00 | 4.00 | 10 | 14.88 | 68.7% |" in table
    assert "| 4096 | namm | 12.00 | 4.00 | 10 | 14.88 | 68.7% |" in table
    assert "| 4096 | full | 42.00 | 5.00 | 10 | 53.70 | 100.0% |" in table
    assert render_by_length({"2048": [row]}) == ""  # one length: the rows table already is the breakdown
    summary = {"rows": [row], "breakdown": {}, "by_length": two}
    assert "**By prompt length**" in render_summary(summary)
    assert "**By prompt length**" not in render_summary({"rows": [row], "by_length": {"2048": [row]}})


def test_report_merge(tmp_path, capsys):
    out = tmp_path / "lang.json"
    for rank in range(2):
        w = ResultsWriter(out, "cmd", "language", {"b": 1}, "tiny", None, rank=rank, world_size=2)
        w.add({"key": f"full/{rank}", "policy": "full", "score": 1.0})
    assert main(["report", "--merge", str(tmp_path / "lang.rank*-of2.jsonl")]) == 2
    assert main(["report", "--merge", str(tmp_path / "none.rank*-of2.jsonl"), "--output", str(out)]) == 2
    assert "error: no shard files match" in capsys.readouterr().err
    assert main(["report", "--merge", str(tmp_path / "lang.rank*-of2.jsonl"), "--output", str(out)]) == 0
    _, records, _ = read_results(tmp_path / "lang.jsonl")
    assert sorted(r["key"] for r in records) == ["full/0", "full/1"]


WRITER_TARGET = """
from namm_transfer.results import ResultsWriter


def add_arguments(parser):
    pass


def main(args):
    ResultsWriter(args.output, args.command, args.target, {"seed": args.seed}, "m", None, rank=0, world_size=1)
    return 0
"""


def test_eval_refuses_results_file_of_another_command(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_writer_target.py").write_text(WRITER_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EVAL_TARGETS, "language", Plugin("fake_writer_target", "target language"))
    output = str(tmp_path / "r.json")
    assert main(["eval", "--target", "language", "--output", output]) == 0
    assert main(["eval", "--target", "language", "--output", output, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "another command" in err and "settings.seed" in err


@pytest.mark.parametrize("argv", [["report", "--output", "x.json"]])
def test_report_output_needs_merge(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2


def test_every_top_level_name_resolves():
    """``namm_transfer.__all__`` (lazy attributes: torch loads on first use) names only importable objects, among
    them what the README's Python quickstart imports."""
    import namm_transfer

    assert {"attach", "load_namm", "NAMMPolicy", "ReplayBudget", "import_reference_checkpoint"} <= set(
        namm_transfer.__all__
    )
    for name in namm_transfer.__all__:
        assert getattr(namm_transfer, name) is not None, name


# ----- strict options: no abbreviations, the nearest option named -------------------------------------------------
ABBREVIATED = [
    (["eval", "--target", "decision-transformer", "--dt", "/x"], "unknown option --dt; did you mean --dtype?"),
    (["eval", "--target", "language", "--polic", "full"], "unknown option --polic; did you mean --policies?"),
    (["eval", "--target", "video-llava", "--ben", "mlvu"], "unknown option --ben; did you mean --bench?"),
    (["evolve", "--popul", "4"], "unknown option --popul; did you mean --population?"),
    (["rl", "collect", "--max-st", "9"], "unknown option --max-st; did you mean --max-steps?"),
    (["rl", "derive-po", "--overw"], "unknown option --overw; did you mean --overwrite?"),
    (["rl", "train", "--batch", "8"], "unknown option --batch; did you mean --batch-size?"),
    (["video", "train", "--resta"], "unknown option --resta; did you mean --restart?"),
    (["models", "list", "--log-lev", "DEBUG"], "unknown option --log-lev; did you mean --log-level?"),
    (["models", "fetch", "x", "--log-lev", "DEBUG"], "unknown option --log-lev; did you mean --log-level?"),
    (["models", "info", "x", "--log-lev", "DEBUG"], "unknown option --log-lev; did you mean --log-level?"),
    (["report", "--chec"], "unknown option --chec; did you mean --check?"),
    (["info", "--log-le=DEBUG"], "unknown option --log-le; did you mean --log-level?"),
]


@pytest.mark.parametrize(("argv", "message"), ABBREVIATED, ids=[" ".join(a[:2]) for a, _ in ABBREVIATED])
def test_abbreviated_options_are_refused_with_the_nearest_option(argv, message, capsys):
    """``--dt /x`` was taken as ``--dtype /x`` (argparse's allow_abbrev): every command refuses it and names the
    option meant, under the command's own usage."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {message}\n" in err
    command = " ".join(a for a in argv[:2] if not a.startswith("-") and a not in ("x",))
    assert f"usage: namm-transfer {command}" in err


def _all_parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


@pytest.mark.parametrize("argv", [a for a, _ in ABBREVIATED])
def test_every_parser_and_subparser_takes_no_abbreviations(argv):
    parser, module, problem = cli.build_parser(argv)
    assert problem is None and (module is not None) == (argv[0] in ("eval", "evolve", "rl", "video"))
    parsers = list(_all_parsers(parser))
    progs = ["namm-transfer", *(f"namm-transfer {c}" for c in ("eval", "evolve", "rl", "rl collect", "rl derive-po"))]
    progs += [f"namm-transfer {c}" for c in ("rl train", "video", "video train", "models", "models list")]
    progs += [f"namm-transfer {c}" for c in ("models fetch", "models info")]
    assert [p.prog for p in parsers] == [*progs, "namm-transfer report", "namm-transfer info"]
    for p in parsers:
        assert isinstance(p, StrictParser) and p.allow_abbrev is False, p.prog


def test_unknown_option_messages(capsys):
    assert main(["report", "--d"]) == 2  # no option starts with --d or is near it
    assert "error: unknown option --d (`namm-transfer report --help` lists the options)" in capsys.readouterr().err
    assert main(["eval", "--target", "decision-transformer", "--d", "x"]) == 2  # several options start with --d
    assert "error: unknown option --d; did you mean one of --dataset, --device, --dtype?" in capsys.readouterr().err
    assert main(["info", "stray"]) == 2  # not an option: argparse's own message
    assert "error: unrecognized arguments: stray" in capsys.readouterr().err
    assert main(["eval", "--target", "decision-transformer", "--dtype", "float32", "--help"]) == 0  # full names work
    with pytest.raises(ValueError, match="no abbreviated options"):
        StrictParser(allow_abbrev=True)


def test_argument_types_live_beside_the_evals():
    """The CLI only dispatches: the argument types the evals share come from namm_transfer.evals.args."""
    from namm_transfer.evals.language import run as language_run
    from namm_transfer.evals.video_qa import run as video_run

    assert language_run.positive_int is positive_int
    assert video_run._pos_int is positive_int and video_run._nonneg_int is nonnegative_int
    assert positive_int("3") == 3 and nonnegative_int("0") == 0
    for bad, type_, message in [
        ("0", positive_int, "expected a positive integer, got 0"),
        ("x", positive_int, "expected an integer, got 'x'"),
        ("-1", nonnegative_int, "expected a non-negative integer, got -1"),
        ("1.5", nonnegative_int, "expected an integer, got '1.5'"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            type_(bad)


# ----- where an eval writes, and the committed reference it is printed next to ------------------------------------
SUMMARY_TARGET = """
from namm_transfer.results import ResultsWriter, summarize

SEEN = {}


def add_arguments(parser):
    parser.add_argument("--bench", default="synthetic")


def main(args):
    SEEN["output"] = args.output
    w = ResultsWriter(args.output, args.command, "language", {"n": 1}, "tiny", None, rank=0, world_size=1)
    if "full/a" not in w.done_keys():
        w.add({"key": "full/a", "policy": "full", "score": 12.5, "retained_cache": 1.0})
    w.finalize(summarize(w.records()), {})
    return 0
"""


@pytest.fixture
def summary_target(tmp_path, monkeypatch):
    (tmp_path / "summary_eval_target.py").write_text(SUMMARY_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in ("language", "video-llava"):
        monkeypatch.setitem(cli.EVAL_TARGETS, target, Plugin("summary_eval_target", f"target {target}"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    import summary_eval_target

    return work, summary_eval_target.SEEN


def test_eval_writes_under_runs_by_default_and_prints_the_committed_reference(summary_target, capsys):
    work, seen = summary_target
    root = repository_root()
    if root is None or not (root / "results" / "language.json").is_file():
        pytest.skip("not run from a checkout with results/language.json")
    assert main(["eval", "--target", "language"]) == 0
    assert seen["output"] == "runs/language/language.json"
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == [
        "runs",
        "runs/language",
        "runs/language/language.json",
        "runs/language/language.jsonl",
    ]
    out = capsys.readouterr().out
    reference = json.loads((root / "results" / "language.json").read_text())
    this = "this run: runs/language/language.json\n" + render_rows(
        json.loads((work / "runs/language/language.json").read_text())["rows"]
    )
    assert this in out and "| full | 12.50 | 0.00 | 1 | 100.0% |" in out
    head = f"committed reference: {root / 'results' / 'language.json'} (`{reference['command']}`, finished "
    assert head + f"{reference['finished'][:10]})\n" + render_rows(reference["rows"]) in out
    diffs = signature_differences(reference, json.loads((work / "runs/language/language.json").read_text()))
    assert "model" in diffs and "settings.n" in diffs
    assert f"note: the reference ran with other settings ({', '.join(diffs)}); its numbers are not this run's\n" in out
    assert out.index("this run:") < out.index("committed reference:")

    # video-llava's name carries the benchmark
    assert main(["eval", "--target", "video-llava", "--bench", "mlvu"]) == 0
    assert seen["output"] == "runs/video-llava/video-llava-mlvu.json"
    assert (work / "runs/video-llava/video-llava-mlvu.json").is_file()
    # an explicit --output is used as given; the reference is looked up by its name, then by the target's
    capsys.readouterr()
    assert main(["eval", "--target", "language", "--output", "mine/x.json"]) == 0
    assert seen["output"] == "mine/x.json" and (work / "mine/x.json").is_file()
    assert f"committed reference: {root / 'results' / 'language.json'}" in capsys.readouterr().out


def test_eval_says_plainly_when_no_reference_is_found(summary_target, tmp_path, monkeypatch, capsys):
    from namm_transfer.evals import args as args_mod

    work, seen = summary_target
    for module in (cli, args_mod):
        monkeypatch.setattr(module, "repository_root", lambda: None)
    assert main(["eval", "--target", "language"]) == 0
    out = capsys.readouterr().out
    assert "this run: runs/language/language.json" in out
    assert "no committed reference result to compare with: no language.json in an installed package (not a " in out

    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    (repo / "pyproject.toml").write_text("")
    for module in (cli, args_mod):
        monkeypatch.setattr(module, "repository_root", lambda: repo)
    assert main(["eval", "--target", "language", "--output", "runs/other.json"]) == 0
    assert f"no committed reference result to compare with: no other.json or language.json in results/ of {repo}\n" in (
        capsys.readouterr().out
    )
    # a run that writes the reference itself (an explicit --output results/NAME.json in the checkout) says so
    monkeypatch.chdir(repo)
    assert main(["eval", "--target", "language", "--output", "results/language.json"]) == 0
    out = capsys.readouterr().out
    assert f"this run wrote the committed reference result {repo / 'results' / 'language.json'} itself" in out
    assert "committed reference:" not in out


def test_default_output_paths():
    from namm_transfer.evals.video_qa import run as video_run

    assert default_output("language") == "runs/language/language.json"
    assert default_output("decision-transformer") == "runs/decision-transformer/decision-transformer.json"
    assert default_output("video-llava", {"bench": "mlvu"}) == "runs/video-llava/video-llava-mlvu.json"
    assert default_output("video-llava") == "runs/video-llava/video-llava-synthetic.json"
    assert video_run._default_output(argparse.Namespace(output=None, bench="egoschema")) == (
        "runs/video-llava/video-llava-egoschema.json"
    )
    assert video_run._default_output(argparse.Namespace(output="a/b.json", bench="egoschema")) == "a/b.json"
    from namm_transfer.evals.offline_rl.run import EvalSettings

    assert EvalSettings(envs=["hopper"], policies=["full"]).output == default_output("decision-transformer")


INTERRUPTED_TARGET = """
def add_arguments(parser):
    pass


def main(args):
    raise KeyboardInterrupt
"""


def test_an_interrupted_eval_names_the_file_it_resumes_from(tmp_path, monkeypatch, capsys):
    (tmp_path / "interrupted_target.py").write_text(INTERRUPTED_TARGET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.EVAL_TARGETS, "language", Plugin("interrupted_target", "target language"))
    assert main(["eval", "--target", "language"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun the same command to resume from the results file (runs/language/language.jsonl)" in err


def test_every_command_line_in_the_repo_uses_the_strict_parser():
    """Library modules, benchmarks and training scripts build their parsers with StrictParser (no abbreviated
    options); only evals/args.py, which defines it, names argparse.ArgumentParser."""
    root = Path(__file__).resolve().parents[1]
    loose = [
        str(p.relative_to(root))
        for folder in ("namm_transfer", "adapters", "evals", "benchmarks", "training")
        for p in sorted((root / folder).rglob("*.py"))
        if "argparse.ArgumentParser(" in p.read_text(encoding="utf-8") and p != root / "evals" / "args.py"
    ]
    assert loose == []
