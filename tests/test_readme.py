"""The README: its size, and every ``namm-transfer`` command in its code blocks parses with the real parser.

The commands are checked with the package's own argparse parser (``namm_transfer.cli.build_parser``, which loads
the selected command's options), with ``parse_args`` (never ``parse_known_args``): an option the command does not
have, a missing required option or a bad value fails the check. The check runs in a subprocess that must not
import torch or transformers, as ``namm-transfer ... --help`` does not.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_CHARS = 15_000

_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)?[ \t]*\n(.*?)^```", re.S | re.M)
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SHELL_WORDS = {"do", "then", "else", "time", "exec"}

# Parses each argv given as JSON in argv[1] with the real parser; prints, per argv, null (parsed) or the error.
# ``--protocols`` (with its value) is taken out and the rest parsed again only when the parser refuses that very
# option: it is added to the eval targets on another branch (protocols), merged with this one by the lead.
# Such an argv is reported as "protocols-unknown" when the rest parses; test_eval_targets_take_protocols then
# says whether the merged parser knows the option.
_CHECKER = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from namm_transfer.cli import build_parser

    def parse(argv):
        parser, _, problem = build_parser(argv)
        if problem is not None:
            return problem
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(argv)
        except SystemExit as exit_:
            return err.getvalue().strip() or f"exit {exit_.code}"
        return None

    def without_protocols(argv):
        out, skip = [], False
        for a in argv:
            if skip:
                skip = False
            elif a == "--protocols":
                skip = True
            elif not a.startswith("--protocols="):
                out.append(a)
        return out

    results = []
    for argv in json.loads(sys.argv[1]):
        error = parse(argv)
        if error and "--protocols" in error and "unrecognized arguments" in error:
            rest = parse(without_protocols(argv))
            error = rest if rest else "protocols-unknown"
        results.append(error)
    heavy = [m for m in ("torch", "transformers") if m in sys.modules]
    print(json.dumps({"results": results, "heavy": heavy}))
    """
)


def commands_in(markdown: str) -> list[list[str]]:
    """The argument lists of every ``namm-transfer`` call in the markdown's shell code blocks.

    A line is split as the shell would into simple commands (at ``&&``, ``||``, ``;``, ``&``, ``|``); a command
    counts when, after environment assignments and shell keywords, its program is ``namm-transfer`` (or a path to
    it, such as ``.venv/bin/namm-transfer``). Comments are dropped.
    """
    out: list[list[str]] = []
    for block in _BLOCK.findall(markdown):
        for line in block.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            segment: list[str] = []
            for token in [*lexer, ";"]:
                if token and set(token) <= set("&|;()<>"):
                    words = [w for w in segment if w not in _SHELL_WORDS]
                    while words and _ASSIGNMENT.match(words[0]):
                        words.pop(0)
                    if words and Path(words[0]).name == "namm-transfer":
                        out.append(words[1:])
                    segment = []
                else:
                    segment.append(token)
    return out


def check(commands: list[list[str]]) -> list[str | None]:
    """For each argument list: ``None`` (parsed), ``"protocols-unknown"``, or the parser's error."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHECKER, json.dumps(commands)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["heavy"] == [], f"parsing the README's commands imported {answer['heavy']}"
    return answer["results"]


def test_readme_is_at_most_15000_characters():
    size = len(README.read_text(encoding="utf-8"))
    assert size <= MAX_CHARS, f"README.md has {size:,} characters; move text to docs/ (at most {MAX_CHARS:,})"


def test_commands_are_found_as_the_shell_splits_them():
    text = (
        "```bash\n"
        "python3 -m venv .venv && .venv/bin/namm-transfer eval --target language  # a comment --nope\n"
        "for r in 0 1; do RANK=$r WORLD_SIZE=2 namm-transfer eval --target language & done; wait\n"
        "namm-transfer report --merge 'results/x.rank*-of2.jsonl' --output results/x.json\n"
        "echo namm-transfer info\n"
        "```\n\n```python\nnamm-transfer info\n```\n"
    )
    assert commands_in(text) == [
        ["eval", "--target", "language"],
        ["eval", "--target", "language"],
        ["report", "--merge", "results/x.rank*-of2.jsonl", "--output", "results/x.json"],
    ]


def test_every_readme_command_parses():
    commands = commands_in(README.read_text(encoding="utf-8"))
    subcommands = {argv[0] for argv in commands if argv}
    assert {"eval", "evolve", "report", "models", "info", "rl", "video"} <= subcommands, subcommands
    assert ["eval", "--target", "decision-transformer"] in commands  # the set-up command
    results = check(commands)
    # "protocols-unknown": only --protocols was refused (see _CHECKER); the rest of that command parsed
    failures = [
        (shlex.join(argv), r) for argv, r in zip(commands, results, strict=True) if r not in (None, "protocols-unknown")
    ]
    assert not failures, "README commands the parser refuses:\n" + "\n".join(f"{c}\n  {e}" for c, e in failures)


def test_a_made_up_option_fails_the_check():
    text = (
        "```bash\nnamm-transfer eval --target language --made-up-option 3\nnamm-transfer report --no-such-flag\n"
        "namm-transfer eval --target decision-transformer --env hopper\nnamm-transfer eval --policies full\n```\n"
    )
    made_up, flag, good, no_target = check(commands_in(text))
    assert made_up is not None and "--made-up-option" in made_up
    assert flag is not None and "--no-such-flag" in flag
    assert good is None
    assert no_target is not None and "--target" in no_target  # a required option left out


def test_eval_targets_take_protocols():
    """Every eval target takes ``--protocols`` (the README's default comparison)."""
    from namm_transfer.cli import EVAL_TARGETS

    argvs = [["eval", "--target", t, "--protocols", "ratio:0.5,ratio:0.25,threshold"] for t in EVAL_TARGETS]
    results = check(argvs)
    if all(r == "protocols-unknown" for r in results):
        # The option comes from another branch (the protocols work), merged by the lead: on this branch alone the
        # parser does not know it yet. Once merged, this test checks it for real.
        pytest.xfail("--protocols is not an option of the eval targets on this branch yet")
    assert results == [None] * len(argvs), dict(zip(EVAL_TARGETS, results, strict=True))
