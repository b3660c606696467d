"""``namm-transfer report``: results tables from results summaries, and merging of sharded runs.

Two outputs, both generated from the committed ``results/NAME.json`` summaries:

* the README's headline tables, one section per results file it names, between markers::

      <!-- results:language:start -->
      (generated: replaced by the headline table made from results/language.json)
      <!-- results:language:end -->

  :func:`update_readme` rewrites only the text between each pair of markers; everything else in the
  README is left byte for byte. A headline table has the columns that compare policies (policy,
  protocol, score, ± std, n, retained cache, the paired intervals against the full cache and the NAMM).
* ``docs/results.md`` (next to the README), generated entirely by :func:`render_results_page`: every
  results file with all its columns and breakdowns.

``report --check`` exits 1 when either is out of date (for CI).

Rows follow the results schema: ``policy``, ``protocol`` (``"ratio-50"``, ``"threshold"``...; null for
the full cache, the Decision Transformer's canonical window and the ``full-alt`` noise floor), ``score``,
``score_std``, ``n``, ``retained_cache``, other scalar fields, and ``vs_full`` / ``vs_namm``: a
:class:`~namm_transfer.stats.PairedInterval` dict (``mean lo hi n level resamples excludes_zero``) of the
row's per-unit score minus the reference's. Summaries written before protocols and intervals existed
(no such fields) render as before, without those columns.

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
    "RESULTS_PAGE_COMMAND",
    "load_summaries",
    "order_rows",
    "render_interval",
    "render_rows",
    "render_breakdown",
    "render_by_length",
    "render_summary",
    "render_headline",
    "render_results_page",
    "update_readme",
    "update_results_page",
    "add_arguments",
    "main",
]

logger = logging.getLogger(__name__)

MECHANICS_NOTE = "tiny random model: measures mechanics and cache, not accuracy"
RESULTS_PAGE_COMMAND = "namm-transfer report"
INTERVAL_MARK = "*"

_SHARD_RE = re.compile(r"\.rank\d+-of\d+$")
_START_RE = re.compile(r"<!--\s*results:([A-Za-z0-9_.\-]+):start\s*-->")
_END = "<!-- results:{name}:end -->"
_END_RE = r"<!--\s*results:{name}:end\s*-->"

# columns shown after policy | protocol | score | ± std | n, in this order when present
_KNOWN_COLUMNS = {
    "retained_cache": "retained cache",
    "retained_video": "retained video",
    "peak_memory_mb": "peak memory (MB)",
    "throughput": "throughput",
}
# the headline tables (README) show only these of the scalar columns
_HEADLINE_COLUMNS = ("retained_cache", "retained_video")
# paired intervals, shown after the scalar columns
_INTERVALS = {"vs_full": "Δ vs full", "vs_namm": "Δ vs NAMM"}
_HIDDEN = {"policy", "protocol", "score", "score_std", "n", "mechanics_only", *_INTERVALS}
# rows of no protocol come first, in this order (then any other such row, in the order given)
_REFERENCE_ORDER = ("full", "canonical", "full-alt")
# targets in the order the results page lists them
_TARGET_ORDER = ("language", "decision-transformer", "video-llava")


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
        if column in ("score", "score_std", "loglik_score"):
            return f"{value:.2f}"
        if column == "peak_memory_mb":
            return f"{value:.0f}"
        if column == "throughput":
            return f"{value:.1f}"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _signed(value: float) -> str:
    text = f"{value:+.1f}"
    return "+0.0" if text == "-0.0" and value == 0 else text


def render_interval(interval: Any) -> str:
    """``+1.2 [-0.3, +2.7]`` from a PairedInterval dict; ``*`` appended when the interval excludes 0.

    ``–`` when there is no interval (no reference for this row) or it is not a complete one.
    """
    if not isinstance(interval, Mapping):
        return "–"
    try:
        mean, lo, hi = (float(interval[k]) for k in ("mean", "lo", "hi"))
    except (KeyError, TypeError, ValueError):
        return "–"
    if not all(math.isfinite(v) for v in (mean, lo, hi)):
        return "–"
    mark = INTERVAL_MARK if interval.get("excludes_zero") else ""
    return f"{_signed(mean)} [{_signed(lo)}, {_signed(hi)}]{mark}"


def interval_legend(rows: Sequence[Mapping[str, Any]]) -> str:
    """The one line under a table with interval columns (empty when it has none)."""
    first = next((r[k] for r in rows for k in _INTERVALS if isinstance(r.get(k), Mapping)), None)
    if first is None:
        return ""
    level = float(first.get("level") or 0.95)
    resamples = first.get("resamples")
    how = f"{level * 100:g}% paired bootstrap interval" + (f", {int(resamples):,} resamples" if resamples else "")
    return (
        f"Δ: the row's score minus the reference's on the same units, mean [{how}]; "
        f"`{INTERVAL_MARK}`: the interval excludes 0. An interval that spans 0: no difference detected."
    )


def _table(header: Sequence[str], body: Sequence[Sequence[str]], align: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _has_protocol(rows: Sequence[Mapping[str, Any]]) -> bool:
    return any(isinstance(r, Mapping) and r.get("protocol") is not None for r in rows)


def order_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows grouped by protocol: those of no protocol first (``full``, ``canonical``, ``full-alt``, then any
    other), then each protocol in the order it first appears; within a group, the order given."""
    refs = [r for r in rows if r.get("protocol") is None]
    refs.sort(key=lambda r: _REFERENCE_ORDER.index(r["policy"]) if r.get("policy") in _REFERENCE_ORDER else 99)
    protocols: list[Any] = []
    for r in rows:
        if r.get("protocol") is not None and r["protocol"] not in protocols:
            protocols.append(r["protocol"])
    return refs + [r for p in protocols for r in rows if r.get("protocol") == p]


def render_rows(
    rows: Sequence[Mapping[str, Any]],
    first: str = "policy",
    *,
    columns: Sequence[str] | None = None,
    compact: bool = False,
) -> str:
    """A markdown table: ``policy | [protocol] | score | ± std | n | retained cache | ... | Δ vs full | Δ vs NAMM``.

    Rows are grouped by protocol (:func:`order_rows`). ``columns``: the scalar columns to show, when
    present in any row (default: every scalar field present, known ones first, then in order of
    appearance); a row lacking one shows ``–``. The interval columns appear when any row has
    ``vs_full`` / ``vs_namm``, with a one-line legend under the table. ``compact``: leave out ``± std`` and
    ``n`` when the intervals are shown (the README's headline tables; a table without intervals keeps them).
    """
    rows = order_rows(rows)
    intervals = [k for k in _INTERVALS if any(isinstance(r.get(k), Mapping) for r in rows)]
    spread = [] if compact and intervals else ["score_std", "n"]
    if columns is None:
        extra: list[str] = [c for c in _KNOWN_COLUMNS if any(c in r for r in rows)]
        for row in rows:
            for key, value in row.items():
                if key in _HIDDEN or key == first or key in extra or isinstance(value, (dict, list)):
                    continue
                extra.append(key)
    else:
        extra = [c for c in columns if any(c in r for r in rows)]
    protocol = ["protocol"] if _has_protocol(rows) else []
    header = [
        first,
        *protocol,
        "score",
        *({"score_std": "± std", "n": "n"}[c] for c in spread),
        *(_KNOWN_COLUMNS.get(c, c.replace("_", " ")) for c in extra),
        *(_INTERVALS[k] for k in intervals),
    ]
    body = [
        [_cell(r.get(first)), *(_cell(r.get("protocol")) for _ in protocol), _cell(r.get("score"), "score")]
        + [_cell(r.get(c), c) for c in spread]
        + [_cell(r.get(c), c) for c in extra]
        + [render_interval(r.get(k)) for k in intervals]
        for r in rows
    ]
    align = [":--", *[":--"] * len(protocol), *["--:"] * (len(header) - 1 - len(protocol))]
    table = _table(header, body, align)
    legend = interval_legend(rows)
    return table + ("\n\n" + legend if legend else "")


def _score_cell(row: Mapping[str, Any] | None) -> str:
    if row is None or row.get("score") is None:
        return "–"
    if row.get("score_std") is None:
        return _cell(row["score"], "score")
    return f"{_cell(row['score'], 'score')} ± {_cell(row['score_std'], 'score_std')}"


def _pivot(breakdown: Mapping[str, Any], label: str, title: str, keep: Any) -> str:
    """``value | <policy score ± std> ...`` for the rows ``keep(row)`` accepts."""
    policies: list[str] = []
    for rows in breakdown.values():
        for r in order_rows([r for r in rows if keep(r)]) if isinstance(rows, list) else []:
            if str(r.get("policy")) not in policies:
                policies.append(str(r.get("policy")))
    if not policies:
        return ""
    body = []
    for value, rows in breakdown.items():
        by_policy = {str(r.get("policy")): r for r in rows if keep(r)} if isinstance(rows, list) else {}
        body.append([_cell(value), *(_score_cell(by_policy.get(p)) for p in policies)])
    return title + "\n\n" + _table([label, *policies], body, [":--", *["--:"] * len(policies)])


def render_breakdown(breakdown: Mapping[str, Any], label: str = "group") -> str:
    """Pivot tables ``value | <policy score ± std> ...`` from ``{value: rows}``.

    ``{field: {value: rows}}`` (several breakdown fields) gives one table per field. Rows that carry
    protocols give one table per protocol, each with the rows of no protocol (the full cache) as well.
    """
    if not breakdown:
        return ""
    if all(isinstance(v, Mapping) for v in breakdown.values()):
        parts = [render_breakdown(v, label=str(k)) for k, v in breakdown.items()]
        return "\n\n".join(p for p in parts if p)
    all_rows = [r for rows in breakdown.values() if isinstance(rows, list) for r in rows]
    if not _has_protocol(all_rows):
        return _pivot(breakdown, label, f"**By {label}** (score ± std)", lambda r: True)
    protocols = list(dict.fromkeys(r["protocol"] for r in order_rows(all_rows) if r.get("protocol") is not None))
    parts = [
        _pivot(
            breakdown,
            label,
            f"**By {label}, {p}** (score ± std)",
            lambda r, p=p: r.get("protocol") is None or r.get("protocol") == p,
        )
        for p in protocols
    ]
    return "\n\n".join(part for part in parts if part)


def render_by_length(by_length: Mapping[str, Any]) -> str:
    """``length | policy | [protocol] | score | ± std | n | loglik score | retained cache`` from ``{length: rows}``.

    Empty when the run has fewer than two prompt lengths (the rows table already says it all).
    """
    if len(by_length) < 2:
        return ""
    all_rows = [r for rows in by_length.values() if isinstance(rows, list) for r in rows]
    protocol = ["protocol"] if _has_protocol(all_rows) else []
    body = []
    for length, rows in by_length.items():
        for r in order_rows(rows) if isinstance(rows, list) else []:
            body.append(
                [_cell(length), _cell(r.get("policy")), *(_cell(r.get("protocol")) for _ in protocol)]
                + [
                    _cell(r.get("score"), "score"),
                    _cell(r.get("score_std"), "score_std"),
                    _cell(r.get("n")),
                    _cell(r.get("loglik_score"), "score"),
                    _cell(r.get("retained_cache"), "retained_cache"),
                ]
            )
    header = ["prompt tokens", "policy", *protocol, "score", "± std", "n", "loglik score", "retained cache"]
    return "**By prompt length**\n\n" + _table(header, body, [":--", ":--", *[":--"] * len(protocol), *["--:"] * 5])


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


def _noise_floor(summary: Mapping[str, Any]) -> str:
    settings = summary.get("settings") or {}
    floor = settings.get("noise_floor") if isinstance(settings, Mapping) else None
    if not floor:
        return ""
    text = floor if isinstance(floor, str) else json.dumps(floor, sort_keys=True)
    return f"Noise floor (`full-alt`): the full cache run again with {_cell(text)}."


def _head(summary: Mapping[str, Any]) -> list[str]:
    parts = []
    if summary.get("command"):
        parts.append(f"`{summary['command']}`")
    prov = _provenance(summary)
    if prov:
        parts.append(prov)
    if _is_mechanics_only(summary):
        parts.append(f"> **Note:** {MECHANICS_NOTE}.")
    return parts


def render_summary(summary: Mapping[str, Any], name: str | None = None) -> str:
    """The markdown for one results summary: provenance, optional note, rows table (all columns), breakdowns."""
    parts = _head(summary)
    parts.append(render_rows(summary.get("rows") or []))
    floor = _noise_floor(summary)
    if floor:
        parts.append(floor)
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


def render_headline(summary: Mapping[str, Any], name: str | None = None, link: str | None = None) -> str:
    """The README's table for one results summary: provenance, optional note, the comparing columns only
    (policy, protocol, score, retained cache / video, the intervals; ``± std`` and ``n`` only without intervals).

    ``link``: where the full table is (a link line is added under the table).
    """
    parts = _head(summary)
    parts.append(render_rows(summary.get("rows") or [], columns=_HEADLINE_COLUMNS, compact=True))
    if link:
        parts.append(f"All columns and breakdowns: [{link.split('#')[0]}]({link}).")
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------
# README and the results page


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


def _anchor(name: str) -> str:
    """GitHub's anchor of a ``## name`` heading (names are ``[A-Za-z0-9_.-]``)."""
    return re.sub(r"[^a-z0-9_\-]", "", name.lower())


def _relative(target: Path, start: Path) -> str:
    try:
        return target.resolve().relative_to(start.resolve()).as_posix()
    except ValueError:
        return target.as_posix()


def update_readme(
    readme_path: str | Path,
    results_dir: str | Path,
    *,
    write: bool = True,
    results_page: str | Path | None = None,
) -> dict[str, str]:
    """Regenerate every ``<!-- results:NAME:start/end -->`` section of the README from ``results_dir/NAME.json``.

    Each section gets the headline table (:func:`render_headline`), with a link to ``results_page`` (the
    full tables) when given. Returns ``{NAME: "updated" | "unchanged" | "missing"}`` for each section
    found ("missing": no such results file; the section is left as it was). With ``write=False``
    nothing is written (used by ``report --check``).
    """
    readme_path = Path(readme_path)
    text = readme_path.read_text(encoding="utf-8")
    page = _relative(Path(results_page), readme_path.parent) if results_page is not None else None
    tables = {
        name: render_headline(s, name, link=f"{page}#{_anchor(name)}" if page else None)
        for name, s in load_summaries(results_dir).items()
    }
    new_text, status = _replace_sections(text, tables)
    for name, state in status.items():
        if state == "missing":
            logger.warning("README section %r has no %s/%s.json; left as it was", name, results_dir, name)
    if write and new_text != text:
        readme_path.write_text(new_text, encoding="utf-8")
    return status


RESULTS_PAGE_INTRO = """\
Every committed results file, with all its columns and breakdowns; the README shows one headline table per
target. Numbers come only from the project's commands: each section names the command that wrote its file.

`score` is the target's headline metric (task score % for language, accuracy % for video, D4RL-normalized
return for the Decision Transformer), averaged over tasks / envs / question types. `± std` is a population
standard deviation (divided by n, not n - 1) of the per-unit scores behind a cell: samples for language and
video, episodes for the Decision Transformer; where a summary averages per-env rows, its `± std` is the mean of
the per-env deviations. `protocol` is the matched-budget protocol a row ran under (`ratio-50`: every policy
keeps 50% of the tokens seen in every layer and head; `threshold`: the NAMM thresholds and the baselines replay
its cache sizes); the full cache belongs to none. `Δ vs full` / `Δ vs NAMM`: the paired difference of the
row's score from the full cache's / the same protocol's NAMM's on the same units, mean [95% bootstrap interval]
(`namm_transfer/stats.py`: 2,000 resamples, fixed seed, stratified by task / env / category), marked `*` when
the interval excludes 0; an interval that spans 0 means no difference detected. Files written before
protocols and intervals existed have neither column."""


def _page_order(summaries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    def key(name: str) -> tuple[int, int, str]:
        target = str(summaries[name].get("target") or "")
        rank = _TARGET_ORDER.index(target) if target in _TARGET_ORDER else len(_TARGET_ORDER)
        return rank, 0 if name == target else 1, name

    return sorted(summaries, key=key)


def render_results_page(summaries: Mapping[str, Mapping[str, Any]], results_dir: str | Path = "results") -> str:
    """``docs/results.md``: a generated-file notice, the reading notes, then every summary under ``## NAME``."""
    results = Path(results_dir).as_posix().rstrip("/")
    lines = [
        "<!-- generated by `namm-transfer report` from results/*.json: do not edit, rerun the command -->",
        "",
        "# Results",
        "",
        f"Generated by `{RESULTS_PAGE_COMMAND}` from `{results}/*.json`; do not edit by hand.",
        "",
        RESULTS_PAGE_INTRO,
        "",
        "Files: " + ", ".join(f"[{name}](#{_anchor(name)})" for name in _page_order(summaries)) + ".",
    ]
    for name in _page_order(summaries):
        lines += ["", f"## {name}", "", f"`{results}/{name}.json`", "", render_summary(summaries[name], name)]
    return "\n".join(lines) + "\n"


def update_results_page(page_path: str | Path, results_dir: str | Path, *, write: bool = True) -> str:
    """Write ``page_path`` (``docs/results.md``) from ``results_dir``: ``"updated"`` or ``"unchanged"``.

    With ``write=False`` nothing is written (``report --check``).
    """
    page_path = Path(page_path)
    new = render_results_page(load_summaries(results_dir), results_dir)
    old = page_path.read_text(encoding="utf-8") if page_path.exists() else None
    if old == new:
        return "unchanged"
    if write:
        page_path.parent.mkdir(parents=True, exist_ok=True)
        page_path.write_text(new, encoding="utf-8")
    return "updated"


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``namm-transfer report``."""
    parser.add_argument("--results-dir", default="results", help="folder of NAME.json summaries (default: results)")
    parser.add_argument("--readme", default="README.md", help="README whose headline sections to rebuild")
    parser.add_argument(
        "--results-page",
        help="the generated page of full tables (default: docs/results.md next to --readme)",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the README or the results page is out of date"
    )
    parser.add_argument(
        "--print",
        dest="print_tables",
        action="store_true",
        help="print every full table to stdout (nothing is written)",
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
    if args.print_tables:  # print only: nothing is written
        for name, summary in summaries.items():
            print(f"## {name}\n\n{render_summary(summary, name)}\n")
        return 0
    readme = Path(args.readme)
    if not readme.exists():
        print(f"{readme} not found; printing the tables instead\n")
        for name, summary in summaries.items():
            print(f"## {name}\n\n{render_summary(summary, name)}\n")
        return 1 if args.check else 0
    page = Path(args.results_page) if getattr(args, "results_page", None) else readme.parent / "docs" / "results.md"
    status = update_readme(readme, args.results_dir, write=not args.check, results_page=page)
    page_state = update_results_page(page, args.results_dir, write=not args.check)
    for name, state in status.items():
        print(f"{name}: {state}" + (" (no results file)" if state == "missing" else ""))
    print(f"{page}: {page_state} ({len(summaries)} results files)")
    if args.check and (page_state == "updated" or any(s == "updated" for s in status.values())):
        print(f"{readme} or {page} is out of date; run `namm-transfer report`")
        return 1
    return 0
