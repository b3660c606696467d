"""Command-line helpers shared by the eval targets and the other commands (installed as ``namm_transfer.evals.args``).

- argparse types: :func:`positive_int`, :func:`nonnegative_int`;
- :class:`StrictParser`: the parser class of every ``namm-transfer`` command: no abbreviated options (``--dt`` is
  not taken for ``--dtype``), and an unknown option's error names the nearest valid one
  (``unknown option --dt; did you mean --dtype?``);
- where an eval writes by default: :func:`default_output` (``runs/<target>/<name>.json``, relative to the current
  folder, which ``.gitignore`` ignores) and the committed reference result of the same name
  (:func:`reference_summary`, ``results/<name>.json`` in the repository the package runs from).

Imports only the standard library: ``namm-transfer --help`` imports this module and must stay torch-free.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "positive_int",
    "nonnegative_int",
    "StrictParser",
    "RUNS_DIR",
    "output_name",
    "default_output",
    "repository_root",
    "reference_summary",
]

RUNS_DIR = "runs"
"""Folder (relative to the current one) that an eval writes to when ``--output`` is not given."""

_OUTPUT_NAMES: dict[str, str] = {"video-llava": "video-llava-{bench}"}
"""Results name of a target whose name is not the target itself; ``{option}`` is filled from the parsed options."""


# ----------------------------------------------------------------------------------------------
# argument types


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from err
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected a {what} integer, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type for a positive integer (``--limit``, and the targets' own counts)."""
    return _int_at_least(text, 1, "positive")


def nonnegative_int(text: str) -> int:
    """argparse type for an integer >= 0."""
    return _int_at_least(text, 0, "non-negative")


# ----------------------------------------------------------------------------------------------
# parser


class StrictParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that refuses abbreviated options and names the nearest valid option of an unknown one.

    ``allow_abbrev`` is False (it may not be turned on): ``--dt /x`` is an unknown option, not ``--dtype /x``.
    :meth:`parse_args` reports the first unknown option of the command that was selected (the deepest subparser)
    with that command's usage, naming the options it abbreviates (``unknown option --dt; did you mean --dtype?``,
    ``... did you mean one of --dataset, --device, --dtype?``), else the nearest spelling by :mod:`difflib`
    (``unknown option --dtpye; did you mean --dtype?``). Subparsers made by
    ``add_subparsers().add_parser`` are StrictParsers too. ``parse_known_args`` is argparse's own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("allow_abbrev", False):
            raise ValueError("StrictParser takes no abbreviated options (allow_abbrev must be False)")
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            leaf = self._selected(ns)
            leaf.error(leaf._unknown_message(extras))
        return ns

    def _selected(self, ns: argparse.Namespace) -> StrictParser:
        """The subparser (of a subparser ...) that ``ns``'s command words selected; ``self`` without subcommands."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                choices: Mapping[str, Any] = action.choices or {}
                chosen = choices.get(str(getattr(ns, action.dest, None)))
                if isinstance(chosen, StrictParser):
                    return chosen._selected(ns)
        return self

    def options(self) -> list[str]:
        """This parser's option strings (``--dtype``, ``-h``, ...), in the order they were added."""
        return list(self._option_string_actions)

    def _unknown_message(self, extras: Sequence[str]) -> str:
        unknown = next((a for a in extras if a.startswith("-") and len(a) > 1 and not _is_number(a)), None)
        if unknown is None:
            return f"unrecognized arguments: {' '.join(extras)}"
        name = unknown.split("=", 1)[0]
        known = [o for o in self.options() if o.startswith("--")] if name.startswith("--") else self.options()
        # what the abbreviation would have meant; else the nearest spelling (a typo)
        matches = sorted(o for o in known if o.startswith(name)) or difflib.get_close_matches(name, known, n=1)
        if not matches:
            return f"unknown option {name} (`{self.prog} --help` lists the options)"
        if len(matches) == 1:
            return f"unknown option {name}; did you mean {matches[0]}?"
        return f"unknown option {name}; did you mean one of {', '.join(matches)}?"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# output paths


def output_name(target: str, options: Mapping[str, Any] | None = None) -> str:
    """The results name of ``target``: the target itself, or ``video-llava-<bench>`` for video-llava.

    Args:
        target: ``language``, ``decision-transformer``, ``video-llava``.
        options: the parsed options (``vars(args)``) that the name may use (video-llava: ``bench``, default
            ``synthetic``).
    """
    template = _OUTPUT_NAMES.get(target, target)
    values = {"bench": "synthetic", **dict(options or {})}
    return template.format(**values)


def default_output(target: str, options: Mapping[str, Any] | None = None) -> str:
    """Where ``eval --target TARGET`` writes without ``--output``: ``runs/<target>/<name>.json`` (and ``.jsonl``
    beside it), relative to the current folder.

    ``runs/`` is ignored by git, so a run in a checkout never touches the committed ``results/`` files (they are
    written only when ``--output results/NAME.json`` is given); the same command run again resumes from there.
    """
    return f"{RUNS_DIR}/{target}/{output_name(target, options)}.json"


def repository_root() -> Path | None:
    """The checkout the package runs from (the folder holding ``pyproject.toml`` above ``namm_transfer/``), or None
    for an installed wheel."""
    import namm_transfer

    root = Path(namm_transfer.__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def reference_summary(names: Sequence[str]) -> Path | None:
    """The first committed ``results/<name>.json`` of ``names`` in the repository the package runs from, or None
    (no such file, or the package is not run from a checkout)."""
    root = repository_root()
    if root is None:
        return None
    for name in names:
        path = root / "results" / f"{name}.json"
        if path.is_file():
            return path
    return None
