"""Calibration of the held-out suite: which (task, length) cells a host model can answer with its full cache.

A comparison of eviction policies means something only where the full cache answers: a cell whose
full-cache exact match is near zero cannot show what eviction loses. ``namm-transfer eval --target language
--calibrate`` therefore measures, per model, the full cache's exact match on every (task, length) cell on
the ``calibration`` split (seeds disjoint from ``train``, which evolution uses, and ``heldout``, which the
eval uses: the split's name is part of every seed, :func:`.tasks.derive_seed`):

1. For each cell, the task's difficulty ladder (:data:`.tasks.DIFFICULTY`, default settings first) is
   walked down: ``n`` calibration prompts are run at one setting; the cell passes at the first setting
   whose mean exact match is at least the threshold (70% by default). A setting is abandoned as soon as
   the prompts still to run could not lift the mean to the threshold (``stopped_early``).
2. A cell that fails at every setting is marked failed; the eval refuses it unless asked to keep it
   (``--keep-uncalibrated``) or to leave it out (``--drop-uncalibrated``).

Files: ``results/language-calibration-<model>.json`` (summary: ``cells``, one entry per cell with the
setting it passed at, its exact match and every setting tried) and its ``.jsonl`` (one record per prompt
and setting; rerun the command to resume; the summary is rewritten after every cell, and a later call for
other tasks or lengths adds its cells to it). Cells run by length, then task; ``--limit N`` runs the first N
cells. The eval reads the summary (``--calibration PATH``).

Imports nothing heavy at import time.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_N",
    "CALIBRATION_SPLIT",
    "CALIBRATION_THRESHOLD",
    "CalibrationError",
    "calibration_path",
    "cell_key",
    "load_calibration",
    "plan_cells",
    "summarize_cells",
    "walk_cell",
]

CALIBRATION_SPLIT = "calibration"
CALIBRATION_THRESHOLD = 70.0
CALIBRATION_N = 10


class CalibrationError(ValueError):
    """A requested cell is not calibrated (or failed its calibration); the message says what to do."""


def calibration_path(model: str) -> Path:
    """``results/language-calibration-<model>.json`` (a path's last part; characters outside [A-Za-z0-9._-] -> _)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(model).rstrip("/")).name) or "model"
    return Path("results") / f"language-calibration-{name}.json"


def cell_key(task: str, length: int) -> str:
    return f"{task}/{int(length)}"


def walk_cell(
    task: str,
    length: int,
    ladder: Sequence[Mapping[str, Any]],
    measure: Callable[[int, Mapping[str, Any], int], float],
    n: int,
    threshold: float,
) -> dict[str, Any]:
    """Walk one cell down its difficulty ladder.

    Args:
        ladder: difficulty settings, hardest (the default) first.
        measure: ``(level, options, i) -> exact match (0-100)`` of the cell's i-th calibration prompt at that
            setting (it may return a stored result).
        n: prompts per setting; threshold: the pass mark (percent).

    Returns:
        ``{task, length, passed, level, options, exact_match, tried: [{level, options, exact_match, n,
        stopped_early}]}``; ``level`` / ``options`` / ``exact_match`` are those of the passing setting (None
        when the cell failed).
    """
    tried: list[dict[str, Any]] = []
    for level, options in enumerate(ladder):
        scores: list[float] = []
        stopped = False
        for i in range(n):
            scores.append(float(measure(level, options, i)))
            if (math.fsum(scores) + 100.0 * (n - len(scores))) / n < threshold and len(scores) < n:
                stopped = True  # even perfect answers on the rest could not reach the threshold
                break
        em = math.fsum(scores) / len(scores)
        tried.append(
            {"level": level, "options": dict(options), "exact_match": em, "n": len(scores), "stopped_early": stopped}
        )
        if not stopped and em >= threshold:
            return {
                "task": task,
                "length": int(length),
                "passed": True,
                "level": level,
                "options": dict(options),
                "exact_match": em,
                "tried": tried,
            }
    return {
        "task": task,
        "length": int(length),
        "passed": False,
        "level": None,
        "options": None,
        "exact_match": None,
        "tried": tried,
    }


def summarize_cells(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows (one per cell, the results schema's ``policy`` = ``full``): score = the exact match of the
    setting the cell passed at, else of the easiest setting tried."""
    rows = []
    for c in cells:
        last = c["tried"][-1] if c["tried"] else {}
        rows.append(
            {
                "policy": "full",
                "protocol": None,
                "task": c["task"],
                "length": c["length"],
                "score": c["exact_match"] if c["passed"] else last.get("exact_match"),
                "n": sum(t["n"] for t in c["tried"]),
                "passed": c["passed"],
                "level": c["level"],
                "options": c["options"],
            }
        )
    return rows


def load_calibration(path: str | Path, model: str) -> tuple[dict[str, dict[str, Any]], float]:
    """``({cell_key: cell}, threshold)`` of a calibration summary written for ``model``.

    Raises:
        CalibrationError: the file is missing, unreadable, or was written for another model.
    """
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(
            f"no calibration file {p}: measure the full cache's exact match per (task, length) first with "
            f"`namm-transfer eval --target language --calibrate --model {model}` (or pass --calibration PATH), "
            "or evaluate uncalibrated cells with --keep-uncalibrated"
        )
    try:
        data = json.loads(p.read_text())
        cells = data["cells"]
        written_for = data["model"]
        threshold = float(data["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CalibrationError(f"{p} is not a language calibration summary ({err}); rerun --calibrate") from err
    if written_for != model:
        raise CalibrationError(
            f"{p} calibrates model {written_for!r}, not {model!r}: pass this model's file with --calibration PATH "
            f"or run --calibrate --model {model}"
        )
    return {str(k): dict(v) for k, v in cells.items()}, threshold


def plan_cells(
    tasks: Sequence[str],
    lengths: Sequence[int],
    cells: Mapping[str, Mapping[str, Any]] | None,
    *,
    keep_uncalibrated: bool,
    drop_uncalibrated: bool,
    threshold: float,
    source: str,
) -> tuple[dict[str, dict[int, dict[str, Any]]], list[str], list[str]]:
    """Which (task, length) cells the eval runs, and at which difficulty.

    Args:
        cells: :func:`load_calibration`'s result, or None when there is no calibration file.

    Returns:
        ``(plan, kept, dropped)``: ``plan[task][length]`` = the difficulty options (``{}`` = the task's
        default), ``kept`` / ``dropped`` the cell keys that are not calibrated (or failed) and were kept /
        left out.

    Raises:
        CalibrationError: uncalibrated cells without ``keep_uncalibrated`` / ``drop_uncalibrated``, or no cell left.
    """
    plan: dict[str, dict[int, dict[str, Any]]] = {}
    bad: list[str] = []
    why: list[str] = []
    for task in tasks:
        for length in lengths:
            key = cell_key(task, length)
            cell = (cells or {}).get(key)
            if cell is not None and cell.get("passed"):
                plan.setdefault(task, {})[int(length)] = dict(cell.get("options") or {})
                continue
            bad.append(key)
            if cell is None:
                why.append(f"{key} (not calibrated)")
            else:
                ems = ", ".join(f"{t['exact_match']:.0f}%" for t in cell.get("tried", []))
                why.append(f"{key} (full-cache exact match {ems or '-'} < {threshold:g}%)")
            if keep_uncalibrated:
                plan.setdefault(task, {})[int(length)] = {}
    if bad and not (keep_uncalibrated or drop_uncalibrated):
        raise CalibrationError(
            f"{len(bad)} (task, length) cell(s) failed or lack the full-cache calibration in {source}: "
            + "; ".join(why)
            + ". Leave them out with --drop-uncalibrated (or --tasks / --lengths), evaluate them anyway with "
            "--keep-uncalibrated, or calibrate them with --calibrate"
        )
    if not plan:
        raise CalibrationError(f"no (task, length) cell passed the calibration in {source}: nothing to evaluate")
    return plan, (bad if keep_uncalibrated else []), ([] if keep_uncalibrated else bad)
