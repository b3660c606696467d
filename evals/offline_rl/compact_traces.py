"""Rewrite the records of a finished ``eval --target decision-transformer`` under the compact trace rule.

Results files written before the rule (100 trace points, unrounded values and a ``full_tokens`` list per record)
are several MB. This rewrites each record's ``trace`` exactly as the eval now writes it
(:func:`namm_transfer.evals.offline_rl.run.make_trace`: the steps of ``_trace_index`` with
:data:`~namm_transfer.evals.offline_rl.run.TRACE_POINTS` points, values to
:data:`~namm_transfer.evals.offline_rl.run.TRACE_DIGITS` significant digits, no ``full_tokens``, which is
``3 t + 2``) and the two trace settings of the header and of the summary ``NAME.json`` beside it. Nothing else
changes: no score, return, cache statistic or interval depends on the trace, so running the same eval command
again afterwards (it finds every episode done) rewrites the summary byte for byte the same, and the plot from the
coarser traces.

::

    python -m namm_transfer.evals.offline_rl.compact_traces results/decision-transformer.jsonl

Refuses a file whose traces lack a step the new rule keeps (e.g. written with fewer trace points).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..args import StrictParser
from . import run

__all__ = ["compact_record", "compact_settings", "compact_file", "main"]

TRACE_SETTINGS = ("trace_points", "trace_digits")


def compact_record(record: Mapping[str, Any], max_ep_len: int) -> dict[str, Any]:
    """``record`` with its ``trace`` under the current rule (a copy; a record without a trace is returned as is).

    Raises:
        ValueError: the trace lacks a step that the current rule keeps.
    """
    out = dict(record)
    trace = record.get("trace")
    if not trace:
        return out
    steps = [int(t) for t in trace["t"]]
    where = {t: i for i, t in enumerate(steps)}
    keep = run._trace_index(int(record["length"]), max_ep_len)
    missing = [t for t in keep if t not in where]
    if missing:
        raise ValueError(
            f"record {record.get('key')}: its trace has no step {missing[0]}, which the current rule keeps "
            f"(every {max(1, -(-max_ep_len // run.TRACE_POINTS))} steps); run the evaluation again instead"
        )
    idx = [where[t] for t in keep]
    out["trace"] = run.make_trace(
        keep,
        [trace["return"][i] for i in idx],
        [trace["cache_tokens"][i] for i in idx],
        run.TRACE_DIGITS,
    )
    return out


def compact_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings with the current trace settings (``trace_digits`` right after ``trace_points``, as the eval
    writes them)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key == "trace_digits":
            continue
        out[key] = value
        if key == "trace_points":
            out["trace_points"] = run.TRACE_POINTS
            out["trace_digits"] = run.TRACE_DIGITS
    return out


def compact_file(jsonl: str | Path, summary: str | Path | None = None) -> tuple[int, int]:
    """Rewrite ``jsonl`` (and the summary ``summary``, default ``jsonl`` with ``.json`` when it exists) in place.

    Returns:
        ``(bytes before, bytes after)`` of the JSONL file.
    Raises:
        ValueError: not a decision-transformer results file, or traces the rule cannot be applied to.
    """
    from ...results import _dumps, atomic_write_text, read_results

    path = Path(jsonl)
    header, records, truncated = read_results(path)
    if header is None or header.get("target") != "decision-transformer":
        raise ValueError(f"{path} is not a results file of eval --target decision-transformer")
    if truncated:
        raise ValueError(f"{path} ends in a truncated line (a killed run?): resume the eval first")
    settings = header.get("settings") or {}
    if "trace_points" not in settings or "max_ep_len" not in settings:
        raise ValueError(f"{path}: its header has no trace_points / max_ep_len setting")
    max_ep_len = int(settings["max_ep_len"])
    new_records = [compact_record(r, max_ep_len) for r in records]
    new_header = {**header, "settings": compact_settings(settings)}
    before = path.stat().st_size
    lines = [_dumps({"_header": new_header})] + [_dumps(r) for r in new_records]
    atomic_write_text(path, "\n".join(lines) + "\n")
    summary_path = Path(summary) if summary is not None else path.with_suffix(".json")
    if summary_path.is_file():
        data = json.loads(summary_path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("settings"), Mapping):
            data["settings"] = compact_settings(data["settings"])
            atomic_write_text(summary_path, json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
    return before, path.stat().st_size


def main(argv: Sequence[str] | None = None) -> int:
    parser = StrictParser(
        prog="python -m namm_transfer.evals.offline_rl.compact_traces",
        description="Rewrite decision-transformer results (NAME.jsonl and NAME.json) under the compact trace rule.",
    )
    parser.add_argument("jsonl", nargs="+", help="results files NAME.jsonl (the summary NAME.json beside each)")
    args = parser.parse_args(argv)
    for name in args.jsonl:
        try:
            before, after = compact_file(name)
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"{name}: {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
