"""``namm-transfer report``: README tables from results summaries, and merging of sharded runs.

The README holds one section per results file, between markers::

    <!-- results:language:start -->
    (generated: replaced by the table made from results/language.json)
    <!-- results:language:end -->

:func:`update_readme` rewrites only the text between each pair of markers, from
``results/NAME.json``; everything else in the README is left byte for byte. ``report --check``
exits 1 when the README is out of date (for CI).

Imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MECHANICS_NOTE",
    "load_summaries",
    "render_rows",
    "render_breakdown",
    "render_by_length",
    "render_summary",
    "update_readme",
    "add_arguments",
    "main",
]

logger = logging.getLogger(__name__)

MECHANICS_NOTE = "tiny random model: measures mechanics and cache, not accuracy"

_SHARD_RE = re.compile(r"\.rank\d+-of\d+$")
_START_RE = re.compile(r"<!--\s*results:([A-Za-z0-9_.\-]+):start\s*-->")
_END = "<!-- results:{name}:end -->"
_END_RE = r"<!--\s*results:{name}:end\s*-->"

# columns shown after policy | score | ± std | n, in this order when present
_KNOWN_COLUMNS = {
    "retained_cache": "retained cache",
    "retained_video": "retained video",
    "peak_memory_mb": "peak memory (MB)",
    "throughput": "throughput",
}
_HIDDEN = {"policy", "score", "score_std", "n", "mechanics_only"}


# ----------------------------------------------------------------------------------------------
# loading


def load_summaries(results_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{NAME: summary}`` for every ``results_dir/NAME.json`` summary (shard summaries left out)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        if _SHARD_RE.search(path.stem):
            continue
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            logger.warning("skipping %s: not valid JSON (%s)", path, err)
            continue
        if not isinstance(summary, dict) or not isinstance(summary.get("rows"), list):
            logger.warning("skipping %s: not a results summary (no 'rows' list)", path)
            continue
        out[path.stem] = summary
    return out


# ----------------------------------------------------------------------------------------------
# formatting


def _cell(value: Any, column: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if column in ("retained_cache", "retained_video"):
            return f"{100 * value:.1f}%"
        if column in ("score", "score_std"):
            return f"{value:.2f}"
        if column == "peak_memory_mb":
            return f"{value:.0f}"
        if column == "throughput":
            return f"{value:.1f}"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], body: Sequence[Sequence[str]], align: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def render_rows(rows: Sequence[Mapping[str, Any]], first: str = "policy") -> str:
    """A markdown table: ``policy | score | ± std | n | retained cache | <other columns present>``.

    Other columns are the scalar fields present in any row (known ones first, then in order of
    appearance); a row lacking one shows ``–``.
    """
    extra: list[str] = [c for c in _KNOWN_COLUMNS if any(c in r for r in rows)]
    for row in rows:
        for key, value in row.items():
            if key in _HIDDEN or key == first or key in extra or isinstance(value, (dict, list)):
                continue
            extra.append(key)
    header = [first, "score", "± std", "n", *(_KNOWN_COLUMNS.get(c, c.replace("_", " ")) for c in extra)]
    body = [
        [_cell(r.get(first)), _cell(r.get("score"), "score"), _cell(r.get("score_std"), "score_std"), _cell(r.get("n"))]
        + [_cell(r.get(c), c) for c in extra]
        for r in rows
    ]
    return _table(header, body, [":--", *["--:"] * (len(header) - 1)])


def render_breakdown(breakdown: Mapping[str, Any], label: str = "group") -> str:
    """Pivot tables ``value | <policy score ± std> ...`` from ``{value: rows}``.

    ``{field: {value: rows}}`` (several breakdown fields) gives one table per field.
    """
    if not breakdown:
        return ""
    if all(isinstance(v, Mapping) for v in breakdown.values()):
        parts = [render_breakdown(v, label=str(k)) for k, v in breakdown.items()]
        return "\n\n".join(p for p in parts if p)
    policies: list[str] = []
    for rows in breakdown.values():
        for r in rows if isinstance(rows, list) else []:
            if str(r.get("policy")) not in policies:
                policies.append(str(r.get("policy")))
    body = []
    for value, rows in breakdown.items():
        by_policy = {str(r.get("policy")): r for r in rows} if isinstance(rows, list) else {}
        cells = [_cell(value)]
        for p in policies:
            r = by_policy.get(p)
            if r is None or r.get("score") is None:
                cells.append("–")
            elif r.get("score_std") is None:
                cells.append(_cell(r["score"], "score"))
            else:
                cells.append(f"{_cell(r['score'], 'score')} ± {_cell(r['score_std'], 'score_std')}")
        body.append(cells)
    title = f"**By {label}** (score ± std)"
    return title + "\n\n" + _table([label, *policies], body, [":--", *["--:"] * len(policies)])


def render_by_length(by_length: Mapping[str, Any]) -> str:
    """``length | policy | score | ± std | n | loglik score | retained cache`` from ``{length: rows}``.

    Empty when the run has fewer than two prompt lengths (the rows table already says it all).
    """
    if len(by_length) < 2:
        return ""
    body = []
    for length, rows in by_length.items():
        for r in rows if isinstance(rows, list) else []:
            body.append(
                [
                    _cell(length),
                    _cell(r.get("policy")),
                    _cell(r.get("score"), "score"),
                    _cell(r.get("score_std"), "score_std"),
                    _cell(r.get("n")),
                    _cell(r.get("loglik_score"), "score"),
                    _cell(r.get("retained_cache"), "retained_cache"),
                ]
            )
    header = ["prompt tokens", "policy", "score", "± std", "n", "loglik score", "retained cache"]
    return "**By prompt length**\n\n" + _table(header, body, [":--", ":--", *["--:"] * 5])


def _is_mechanics_only(summary: Mapping[str, Any]) -> bool:
    settings = summary.get("settings") or {}
    if isinstance(settings, Mapping) and settings.get("mechanics_only"):
        return True
    return any(isinstance(r, Mapping) and r.get("mechanics_only") for r in summary.get("rows", []))


def _provenance(summary: Mapping[str, Any]) -> str:
    bits = []
    if summary.get("model"):
        bits.append(f"model `{summary['model']}`")
    ckpt = summary.get("namm_checkpoint")
    if isinstance(ckpt, Mapping) and ckpt.get("name"):
        digest = ckpt.get("sha256") or ckpt.get("hash")
        bits.append(f"NAMM `{ckpt['name']}`" + (f" (sha256 {str(digest)[:12]})" if digest else ""))
    versions = summary.get("versions") or {}
    if isinstance(versions, Mapping):
        v = [f"{k} {versions[k]}" for k in ("namm_transfer", "torch", "transformers") if versions.get(k)]
        if v:
            bits.append(", ".join(v))
    hardware = summary.get("hardware") or {}
    if isinstance(hardware, Mapping):
        devices = hardware.get("cuda_devices") or []
        settings = summary.get("settings") or {}
        device = settings.get("device") if isinstance(settings, Mapping) else None
        if devices and device != "cpu":
            bits.append(str(devices[0]))
        elif hardware.get("cpu_count"):
            bits.append(f"CPU ({hardware['cpu_count']} cores)")
    if summary.get("finished"):
        bits.append(f"finished {str(summary['finished'])[:10]}")
    return " · ".join(bits)


def render_summary(summary: Mapping[str, Any], name: str | None = None) -> str:
    """The markdown for one results summary: provenance, optional note, rows table, breakdown."""
    parts = []
    if summary.get("command"):
        parts.append(f"`{summary['command']}`")
    prov = _provenance(summary)
    if prov:
        parts.append(prov)
    if _is_mechanics_only(summary):
        parts.append(f"> **Note:** {MECHANICS_NOTE}.")
    parts.append(render_rows(summary.get("rows") or []))
    label = str(summary.get("breakdown_by") or "group")
    bd = render_breakdown(summary.get("breakdown") or {}, label=label)
    if bd:
        parts.append(bd)
    by_length = summary.get("by_length")
    if isinstance(by_length, Mapping):
        bl = render_by_length(by_length)
        if bl:
            parts.append(bl)
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------
# README


def _replace_sections(text: str, tables: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    status: dict[str, str] = {}
    out: list[str] = []
    pos = 0
    for m in _START_RE.finditer(text):
        if m.start() < pos:  # a start marker inside a section we already replaced
            continue
        name = m.group(1)
        end = re.compile(_END_RE.format(name=re.escape(name))).search(text, m.end())
        if end is None:
            raise ValueError(f"README marker <!-- results:{name}:start --> has no matching {_END.format(name=name)}")
        out.append(text[pos : m.end()])
        if name in tables:
            new = "\n" + tables[name] + "\n"
            status[name] = "unchanged" if text[m.end() : end.start()] == new else "updated"
            out.append(new)
        else:
            status[name] = "missing"
            out.append(text[m.end() : end.start()])
        pos = end.start()
    out.append(text[pos:])
    return "".join(out), status


def update_readme(readme_path: str | Path, results_dir: str | Path, *, write: bool = True) -> dict[str, str]:
    """Regenerate every ``<!-- results:NAME:start/end -->`` section of the README from ``results_dir/NAME.json``.

    Returns ``{NAME: "updated" | "unchanged" | "missing"}`` for each section found ("missing": no
    such results file; the section is left as it was). With ``write=False`` nothing is written
    (used by ``report --check``).
    """
    readme_path = Path(readme_path)
    text = readme_path.read_text(encoding="utf-8")
    tables = {name: render_summary(s, name) for name, s in load_summaries(results_dir).items()}
    new_text, status = _replace_sections(text, tables)
    for name, state in status.items():
        if state == "missing":
            logger.warning("README section %r has no %s/%s.json; left as it was", name, results_dir, name)
    if write and new_text != text:
        readme_path.write_text(new_text, encoding="utf-8")
    return status


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``namm-transfer report``."""
    parser.add_argument("--results-dir", default="results", help="folder of NAME.json summaries (default: results)")
    parser.add_argument("--readme", default="README.md", help="README whose results sections to rebuild")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the README is out of date")
    parser.add_argument(
        "--print",
        dest="print_tables",
        action="store_true",
        help="print every table to stdout (the README is left as it is)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="SHARD",
        help="merge shard files (NAME.rank*-of*.jsonl, globs allowed) into --output's NAME.jsonl",
    )
    parser.add_argument("--output", help="with --merge: the run's results path, results/NAME.json")


def main(args: argparse.Namespace) -> int:
    """Run ``namm-transfer report`` with parsed ``args``; returns the exit code."""
    if args.merge:
        if not args.output:
            print("error: --merge needs --output results/NAME.json", file=sys.stderr)
            return 2
        from .results import merge_shards, read_results

        try:
            path = merge_shards(args.merge, args.output)
        except FileNotFoundError as err:  # a pattern that matches no shard
            print(f"error: {err}", file=sys.stderr)
            return 2
        _, records, _ = read_results(path)
        print(f"merged {len(args.merge)} shard pattern(s) into {path} ({len(records)} records)")
        print("rerun the same eval command in one process to write the summary from the merged file")
        return 0
    if args.output:
        print("error: --output is only used with --merge", file=sys.stderr)
        return 2

    summaries = load_summaries(args.results_dir)
    if not summaries:
        print(f"error: no results summaries (NAME.json) in {args.results_dir}/; run an eval first", file=sys.stderr)
        return 1
    if args.print_tables:  # print only: the README is left as it is
        for name, summary in summaries.items():
            print(f"## {name}\n\n{render_summary(summary, name)}\n")
        return 0
    readme = Path(args.readme)
    if not readme.exists():
        print(f"{readme} not found; printing the tables instead\n")
        for name, summary in summaries.items():
            print(f"## {name}\n\n{render_summary(summary, name)}\n")
        return 1 if args.check else 0
    status = update_readme(readme, args.results_dir, write=not args.check)
    for name in summaries:
        if name not in status:
            print(f"{name}: no section in {readme}; add <!-- results:{name}:start --> <!-- results:{name}:end -->")
    for name, state in status.items():
        print(f"{name}: {state}" + (" (no results file)" if state == "missing" else ""))
    if args.check and any(s == "updated" for s in status.values()):
        print(f"{readme} is out of date; run `namm-transfer report`")
        return 1
    return 0
