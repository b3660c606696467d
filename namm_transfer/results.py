"""Results files shared by every evaluation target (one schema for language, video and RL).

Every ``namm-transfer eval`` writes two files side by side:

- ``NAME.jsonl``: a header line ``{"_header": {...}}`` (target, model, settings, NAMM checkpoint and
  the command that started the file), then one JSON record per finished unit (a sample, an episode
  or a prompt, for one policy), appended and fsync'ed as each unit finishes. A killed run resumes
  from it without losing or repeating work.
- ``NAME.json``: the summary, written atomically by :meth:`ResultsWriter.finalize`: command, target,
  model, namm_checkpoint, settings, versions, hardware, started/finished timestamps, ``rows`` (one
  per policy) and ``breakdown`` (per task / env / category).

How a target uses it::

    writer = ResultsWriter(args.output, args.command, target="language", model=model_id,
                           settings=settings, namm_checkpoint={"name": ..., "sha256": ...})
    done = writer.done_keys()
    for policy in args.policies:
        for sample in select_shard(samples, writer.rank, writer.world_size):
            key = f"{policy}/{sample.id}"
            if key in done:
                continue
            writer.add({"key": key, "policy": policy, "task": sample.task, "score": ..., "retained_cache": ...})
    records = writer.records()
    writer.finalize(summarize(records), breakdown_by(records, "task"), extra={"breakdown_by": "task"})

``settings`` is the run's identity: put in it what changes a unit's result (budget rule, frames,
update_interval, dtype, seeds, prompt template), not what only changes how many units run (--limit).
A file written with other settings is never silently mixed with this run: the writer refuses it.

Sharded runs: under torchrun / accelerate (RANK and WORLD_SIZE set) each rank writes
``NAME.rank{r}-of{w}.jsonl`` and evaluates ``select_shard(items, rank, world)``. Afterwards
``namm-transfer report --merge 'DIR/NAME.rank*-of*.jsonl' --output DIR/NAME.json`` merges them into
``NAME.jsonl`` (without ``--output``, an eval's DIR/NAME is ``runs/<target>/<name>``, see
:func:`namm_transfer.evals.args.default_output`); running the same eval command once more in a single
process then resumes from the merged file, finds every unit done, and writes the summary ``NAME.json``.

This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "ResultsWriter",
    "ResultsFileError",
    "summarize",
    "breakdown_by",
    "shard_info",
    "shard_path",
    "select_shard",
    "merge_shards",
    "results_paths",
    "read_results",
    "signature_differences",
    "collect_versions",
    "collect_hardware",
    "MEAN_FIELDS",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the results-file layout, stored in every header and summary."""

MEAN_FIELDS = ("retained_cache", "retained_video", "peak_memory_mb", "throughput")
"""Per-record fields that :func:`summarize` averages when present."""

_RUN_DESCRIPTION = ("command", "versions", "hardware", "started", "finished", "wall_s", "device")
"""Summary fields that describe the run which produced the records rather than the records themselves (``wall_s``
and ``device`` come from a target's ``extra``): a rerun that records nothing keeps them (see
:meth:`ResultsWriter.finalize`)."""
_SIGNATURE_FIELDS = ("target", "model", "settings", "namm_checkpoint")


class ResultsFileError(ValueError):
    """A results file that cannot be used: written by another command, or corrupt."""


# ----------------------------------------------------------------------------------------------
# paths and sharding


def _stem(output: str | os.PathLike[str]) -> Path:
    """``results/NAME.json`` / ``results/NAME.jsonl`` / ``results/NAME`` -> ``results/NAME``."""
    path = Path(output)
    if path.suffix in (".json", ".jsonl"):
        path = path.with_suffix("")
    if not path.name:
        raise ValueError(f"results path {str(output)!r} has no file name")
    return path


def results_paths(output: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The ``(NAME.jsonl, NAME.json)`` pair for an ``--output`` given as NAME.json, NAME.jsonl or NAME."""
    stem = _stem(output)
    return stem.with_name(stem.name + ".jsonl"), stem.with_name(stem.name + ".json")


def shard_info() -> tuple[int, int]:
    """``(rank, world_size)`` from the environment that torchrun / accelerate set; ``(0, 1)`` alone.

    Reads ``RANK`` and ``WORLD_SIZE``; without ``RANK`` falls back to ``LOCAL_RANK`` (and
    ``LOCAL_WORLD_SIZE`` when ``WORLD_SIZE`` is unset).
    """
    rank_text = os.environ.get("RANK") or os.environ.get("LOCAL_RANK")
    world_text = os.environ.get("WORLD_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
    try:
        rank = int(rank_text) if rank_text else 0
        world = int(world_text) if world_text else 1
    except ValueError as err:
        raise ValueError(f"RANK/WORLD_SIZE must be integers, got RANK={rank_text!r} WORLD_SIZE={world_text!r}") from err
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid shard: RANK={rank} WORLD_SIZE={world} (need 0 <= RANK < WORLD_SIZE)")
    return rank, world


def shard_path(output: str | os.PathLike[str], rank: int, world: int) -> Path:
    """The JSONL file rank ``rank`` of ``world`` writes: ``NAME.rank{r}-of{w}.jsonl`` (``NAME.jsonl`` alone)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid shard rank={rank} world={world}")
    stem = _stem(output)
    if world == 1:
        return stem.with_name(stem.name + ".jsonl")
    return stem.with_name(f"{stem.name}.rank{rank}-of{world}.jsonl")


def select_shard(items: Iterable[Any], rank: int, world: int) -> list[Any]:
    """The items rank ``rank`` of ``world`` evaluates: ``items[rank::world]`` (every item when world is 1)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid shard rank={rank} world={world}")
    return list(items)[rank::world]


# ----------------------------------------------------------------------------------------------
# JSON hygiene


def _jsonable(value: Any, where: str) -> Any:
    """A JSON-safe copy of ``value``: non-finite floats become null (with a warning), numpy/torch
    scalars become Python numbers, arrays become lists, paths become strings."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            logger.warning("results field %s is %r; stored as null", where, value)
            return None
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    # numpy / torch scalars and arrays, without importing either
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return _jsonable(value.item(), where)
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist(), where)
    raise TypeError(f"results field {where} has type {type(value).__name__}, which a results file cannot store")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False, ensure_ascii=False)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace`` (a reader
    never sees a partial file); the file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _command_string(command: Sequence[str] | str) -> str:
    return command if isinstance(command, str) else shlex.join(str(c) for c in command)


# ----------------------------------------------------------------------------------------------
# reading


def read_results(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, list[dict[str, Any]], bool]:
    """Read a results JSONL file: ``(header or None, records, last_line_was_truncated)``.

    A last line that is not valid JSON (a run killed mid-write) is dropped with a warning; an
    invalid line anywhere else is corruption and raises ``ValueError``. Records repeating a key
    keep the first occurrence.
    """
    path = Path(path)
    raw = path.read_text(encoding="utf-8")
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    truncated = bool(raw) and not raw.endswith("\n")
    header: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if last:
                logger.warning("%s: ignoring a truncated last line (a killed run?): %.80s", path, line)
                truncated = True
                break
            raise ResultsFileError(f"{path}:{i + 1} is not valid JSON ({err}); the results file is corrupt") from err
        if not isinstance(obj, dict):
            raise ResultsFileError(f"{path}:{i + 1} is not a JSON object")
        if "_header" in obj:
            if i != 0:
                raise ResultsFileError(f"{path}:{i + 1} has a second header; the results file is corrupt")
            header = obj["_header"]
            continue
        if i == 0:
            raise ResultsFileError(f"{path} has no header line; it is not a namm-transfer results file")
        key = obj.get("key")
        if not isinstance(key, str):
            raise ResultsFileError(f"{path}:{i + 1} has no string 'key' field")
        if key in seen:
            logger.warning("%s: key %r appears twice; keeping the first record", path, key)
            continue
        seen.add(key)
        records.append(obj)
    return header, records, truncated


def _signature(header: Mapping[str, Any]) -> dict[str, Any]:
    sig = {k: json.loads(_dumps(_jsonable(header.get(k), k))) for k in _SIGNATURE_FIELDS}
    ckpt = sig["namm_checkpoint"]
    if isinstance(ckpt, dict):  # a NAMM is its name and content: where it was installed does not matter
        sig["namm_checkpoint"] = {k: v for k, v in ckpt.items() if k != "path"}
    return sig


def _grows(old: Any, new: Any) -> bool:
    """``new`` equals ``old`` or extends it: a larger integer, a list that starts with ``old``, a dict with every key
    of ``old`` whose values grow (JSON values, as in a results header)."""
    if isinstance(old, bool) or isinstance(new, bool):
        return old == new
    if isinstance(old, int) and isinstance(new, int):
        return new >= old
    if isinstance(old, list) and isinstance(new, list):
        return len(new) >= len(old) and new[: len(old)] == old
    if isinstance(old, dict) and isinstance(new, dict):
        return all(k in new and _grows(v, new[k]) for k, v in old.items())
    return bool(old == new)


def signature_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Names of the fields (``target``, ``model``, ``namm_checkpoint``, ``settings.KEY`` for each setting) where two
    results headers or summaries disagree on what a unit's result depends on; empty when the runs are comparable
    unit for unit. Where a NAMM was installed (its ``path``) does not count."""
    sa, sb = _signature(a), _signature(b)
    ca, cb = sa["namm_checkpoint"], sb["namm_checkpoint"]
    if isinstance(ca, dict) and isinstance(cb, dict) and ("config" in ca) != ("config" in cb):
        # a file written before the NAMM's hyperparameters were recorded: its name and content decide
        ca.pop("config", None)
        cb.pop("config", None)
    diffs: list[str] = []
    for field in _SIGNATURE_FIELDS:
        if sa[field] == sb[field]:
            continue
        if field == "settings" and isinstance(sa[field], dict) and isinstance(sb[field], dict):
            keys = sorted(set(sa[field]) | set(sb[field]))
            diffs.extend(f"settings.{k}" for k in keys if sa[field].get(k, ...) != sb[field].get(k, ...))
        else:
            diffs.append(field)
    return diffs


# ----------------------------------------------------------------------------------------------
# writer


class ResultsWriter:
    """Appends per-unit records to ``NAME.jsonl`` and writes the ``NAME.json`` summary.

    Args:
        output: ``results/NAME.json`` (``.jsonl`` or no suffix also accepted).
        command: the exact command line, as a list of arguments or one string.
        target: ``language``, ``decision-transformer``, ``video-llava``, ...
        settings: the run's identity (budget rule, frames, seeds, update_interval, ...); JSON-able.
        model: the host model id or path.
        namm_checkpoint: ``{"name": ..., "sha256": ..., "config": ...}`` of the NAMM used
            (:func:`namm_transfer.checkpoint.namm_record`), or None.
        rank, world_size: this process's shard; read from RANK / WORLD_SIZE when None. With
            ``world_size > 1`` the writer uses ``NAME.rank{r}-of{w}.jsonl`` / ``.json``.

    Raises:
        ResultsFileError: (a ValueError) the JSONL file exists but was written by another command (other target, model,
            settings or NAMM checkpoint), or is corrupt.
    """

    def __init__(
        self,
        output: str | os.PathLike[str],
        command: Sequence[str] | str,
        target: str,
        settings: Mapping[str, Any],
        model: str,
        namm_checkpoint: Mapping[str, Any] | None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        extendable: Collection[str] = (),
    ) -> None:
        self.extendable = frozenset(extendable)
        if rank is None or world_size is None:
            env_rank, env_world = shard_info()
            rank = env_rank if rank is None else rank
            world_size = env_world if world_size is None else world_size
        self.rank, self.world_size = rank, world_size
        self.command = _command_string(command)
        self.target = target
        self.model = model
        self.settings: dict[str, Any] = _jsonable(dict(settings), "settings")
        self.namm_checkpoint: dict[str, Any] | None = (
            None if namm_checkpoint is None else _jsonable(dict(namm_checkpoint), "namm_checkpoint")
        )
        self.started = _now()
        self.jsonl_path = shard_path(output, rank, world_size)
        _, summary = results_paths(output)
        self.summary_path = (
            summary if world_size == 1 else summary.with_name(f"{_stem(output).name}.rank{rank}-of{world_size}.json")
        )
        self._header: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "target": target,
            "model": model,
            "settings": self.settings,
            "namm_checkpoint": self.namm_checkpoint,
            "command": self.command,
            "created": self.started,
        }
        self._records: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self.resumed = 0
        """How many records were already in the file when this writer opened it."""
        self._changed = False  # records added or dropped by this writer
        self._open()

    # -- construction helpers -----------------------------------------------------------------

    def _check_summary_path(self) -> None:
        """Refuse to overwrite, at the end of the run, a file at the summary's path that is not a results summary
        (an ``--output`` that names someone's own JSON file)."""
        path = self.summary_path
        if not path.exists():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            ours = isinstance(data, dict) and "format" in data and "target" in data and "rows" in data
        except (OSError, UnicodeDecodeError, ValueError):
            ours = False
        if not ours:
            raise ResultsFileError(
                f"{path} exists and is not a results summary; the run would overwrite it. Pass another --output "
                "(the run writes NAME.jsonl and NAME.json)"
            )

    def _open(self) -> None:
        self._check_summary_path()
        path = self.jsonl_path
        if path.exists() and path.stat().st_size > 0:
            header, records, truncated = read_results(path)
            if header is None:  # only a truncated header line: nothing was recorded
                logger.warning("%s holds no complete header; starting it afresh", path)
                self._write_all()
                return
            diffs = signature_differences(header, self._header)
            grown = [d for d in diffs if self._extends(header, d)]
            if diffs and grown == diffs:  # a larger run of the same units: keep the records, adopt its settings
                logger.info(
                    "%s: extending %s; the %d units already recorded are kept",
                    path,
                    ", ".join(grown),
                    len(records),
                )
                self._header = {**header, "settings": self.settings, "command": self.command}
                self._records = records
                self._keys = {r["key"] for r in records}
                self.resumed = len(records)
                self._changed = True
                self._write_all()
                return
            if diffs:
                raise ResultsFileError(
                    f"results file {path} was written by another command (differs in: {', '.join(diffs)}; "
                    f"it was written by: {header.get('command', '?')}); use a new --output or delete it"
                )
            self._header = dict(header)
            self._records = records
            self._keys = {r["key"] for r in records}
            self.resumed = len(records)
            if truncated:
                self._write_all()
            if records:
                logger.info("%s: resuming, %d units already done", path, len(records))
        else:
            self._write_all()

    def _extends(self, header: Mapping[str, Any], diff: str) -> bool:
        """Whether the difference ``diff`` (a :func:`signature_differences` name) from the file's ``header`` is one
        of :attr:`extendable`'s settings grown by this run: a count raised, a list continued, a dict of those with
        the same keys or more (e.g. ``--episodes 20`` to ``20,hopper=30``, whose seeds 0..19 stay a prefix)."""
        key = diff.removeprefix("settings.")
        if key == diff or key not in self.extendable:
            return False
        old = (header.get("settings") or {}).get(key, ...)
        if old is ... or key not in self.settings:
            return False
        return _grows(json.loads(_dumps(old)), json.loads(_dumps(self.settings[key])))

    def _write_all(self) -> None:
        lines = [_dumps({"_header": self._header})] + [_dumps(r) for r in self._records]
        atomic_write_text(self.jsonl_path, "\n".join(lines) + "\n")

    # -- public API ---------------------------------------------------------------------------

    @property
    def header(self) -> dict[str, Any]:
        """The header record of the JSONL file (a copy)."""
        return json.loads(_dumps(self._header))

    def done_keys(self) -> set[str]:
        """Keys of the units already recorded (from earlier runs and this one); skip these."""
        return set(self._keys)

    def drop(self, keys: Iterable[str]) -> int:
        """Remove the records of ``keys`` (to run those units again, e.g. ones that failed) and rewrite the file
        atomically; returns how many were removed."""
        gone = set(keys) & self._keys
        if gone:
            self._records = [r for r in self._records if r["key"] not in gone]
            self._keys -= gone
            self._changed = True
            self._write_all()
        return len(gone)

    def refuse_samples_outside(self, sample_ids: Iterable[str]) -> None:
        """Refuse a run that would not evaluate every sample the file already holds (keys ``policy/sample_id``): a
        smaller ``--limit`` than the run that wrote the file, whose summary it would rewrite from part of it (a
        smoke test in a checkout with committed results). A larger run resumes and extends the file.

        Raises:
            ResultsFileError: naming the file, how many samples are outside and what to do.
        """
        allowed = set(sample_ids)
        outside = sorted({key.split("/", 1)[1] for key in self._keys if "/" in key} - allowed)
        if outside:
            raise ResultsFileError(
                f"results file {self.jsonl_path} holds {len(outside)} sample(s) this run does not evaluate (e.g. "
                f"{outside[0]!r}): a run with a larger --limit (or none) wrote it. Pass another --output for this run, "
                "or the larger run's arguments to resume that one"
            )

    def records(self) -> list[dict[str, Any]]:
        """All records, in the order they were written (copies)."""
        return [dict(r) for r in self._records]

    def add(self, record: Mapping[str, Any]) -> None:
        """Append one finished unit and fsync it.

        ``record`` needs a unique string ``key`` (e.g. ``f"{policy}/{sample_id}"``) and a string
        ``policy``. Non-finite floats are stored as null with a warning; numpy / torch scalars are
        converted to Python numbers.

        Raises:
            ValueError: missing ``key`` / ``policy``, or the key is already recorded.
        """
        for field in ("key", "policy"):
            if not isinstance(record.get(field), str) or not record[field]:
                raise ValueError(
                    f"a results record needs a non-empty string {field!r} field; got {record.get(field)!r}"
                )
        key = record["key"]
        if key in self._keys:
            raise ValueError(f"unit {key!r} is already recorded in {self.jsonl_path}; skip the keys in done_keys()")
        clean = _jsonable(dict(record), key)
        line = _dumps(clean) + "\n"
        with open(self.jsonl_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self._records.append(clean)
        self._keys.add(key)
        self._changed = True

    def finalize(
        self,
        rows: list[dict[str, Any]],
        breakdown: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the summary ``NAME.json`` atomically and return its path.

        Args:
            rows: one row per policy, usually :func:`summarize` of :meth:`records` (a target may
                average over tasks / envs instead): ``{policy, score, score_std, n, retained_cache, ...}``.
            breakdown: ``{task/env/category value: rows}``, usually :func:`breakdown_by`; name the
                field with ``extra={"breakdown_by": "task"}``. ``{field: {value: rows}}`` also works.
            extra: more top-level keys (e.g. ``{"breakdown_by": "task", "notes": ...}``); they may
                not replace the standard ones.

        A run that recorded nothing new (every unit was already done) describes the run that produced the records:
        when the summary already at the path summarizes the same records (same records file, number of records,
        target, model, settings and NAMM checkpoint), it keeps that summary's ``command``, ``versions``,
        ``hardware``, ``started``, ``finished``, ``wall_s`` and ``device`` (the last two passed in ``extra`` by a
        target), each present exactly when it was present there. Running a finished command again, under any
        command line that resolves to the same file, rewrites only what the code computes from the records: with
        the same code the summary stays byte for byte the same.
        """
        summary: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "command": self.command,
            "target": self.target,
            "model": self.model,
            "namm_checkpoint": self.namm_checkpoint,
            "settings": self.settings,
            "versions": collect_versions(),
            "hardware": collect_hardware(),
            "started": self.started,
            "first_started": self._header.get("created", self.started),
            "finished": _now(),
            "records_file": self.jsonl_path.name,
            "n_records": len(self._records),
            "rows": _jsonable(list(rows), "rows"),
            "breakdown": _jsonable(dict(breakdown), "breakdown"),
        }
        if self.world_size > 1:
            summary["shard"] = {"rank": self.rank, "world_size": self.world_size}
        for k, v in (extra or {}).items():
            if k in summary:
                raise ValueError(f"extra key {k!r} would replace a standard summary field")
            summary[k] = _jsonable(v, k)
        if not self._changed:
            previous = self._previous_run()
            if previous is not None:
                for k in _RUN_DESCRIPTION:
                    if k in previous:
                        summary[k] = previous[k]
                    else:
                        summary.pop(k, None)
        atomic_write_text(self.summary_path, json.dumps(summary, indent=2, allow_nan=False, ensure_ascii=False) + "\n")
        logger.info("wrote %s (%d records)", self.summary_path, len(self._records))
        return self.summary_path

    def _previous_run(self) -> dict[str, Any] | None:
        """The run description (:data:`_RUN_DESCRIPTION`) of the summary already at ``summary_path``, if it
        summarizes the same records (same records file and count, same target, model, settings and NAMM
        checkpoint); else None."""
        try:
            old = json.loads(self.summary_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        same = (
            isinstance(old, dict)
            and old.get("records_file") == self.jsonl_path.name
            and old.get("n_records") == len(self._records)
            and not signature_differences(old, self._header)
        )
        if not same:
            return None
        return {k: old[k] for k in _RUN_DESCRIPTION if k in old}

    def __repr__(self) -> str:
        return f"ResultsWriter({str(self.jsonl_path)!r}, records={len(self._records)})"


# ----------------------------------------------------------------------------------------------
# summaries


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / len(values)
    return mean, math.sqrt(var)


def summarize(
    records: Iterable[Mapping[str, Any]],
    group_by: Sequence[str] = ("policy",),
    score_field: str = "score",
) -> list[dict[str, Any]]:
    """One row per group (per policy by default), in order of first appearance.

    Each row holds the ``group_by`` fields, ``score`` (mean of ``score_field``), ``score_std``
    (population standard deviation), ``n`` (records with a finite score) and the mean of each of
    :data:`MEAN_FIELDS` present in the group. Records whose score is null or missing are left out
    of the score and counted in ``n_missing`` (present only when non-zero).
    """
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for rec in records:
        groups.setdefault(tuple(rec.get(g) for g in group_by), []).append(rec)
    rows: list[dict[str, Any]] = []
    for values, recs in groups.items():
        row: dict[str, Any] = dict(zip(group_by, values, strict=True))
        scores = [s for s in (_number(r.get(score_field)) for r in recs) if s is not None]
        row["score"], row["score_std"] = _mean_std(scores)
        row["n"] = len(scores)
        if len(scores) < len(recs):
            row["n_missing"] = len(recs) - len(scores)
        for field in MEAN_FIELDS:
            present = [v for v in (_number(r.get(field)) for r in recs) if v is not None]
            if present:
                row[field] = math.fsum(present) / len(present)
        rows.append(row)
    return rows


def breakdown_by(
    records: Iterable[Mapping[str, Any]],
    field: str,
    group_by: Sequence[str] = ("policy",),
    score_field: str = "score",
) -> dict[str, list[dict[str, Any]]]:
    """``{str(value of field): summarize(records with that value)}``, sorted by value.

    Records without ``field`` are left out.
    """
    parts: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records:
        if rec.get(field) is not None:
            parts.setdefault(str(rec[field]), []).append(rec)
    return {k: summarize(parts[k], group_by=group_by, score_field=score_field) for k in sorted(parts)}


# ----------------------------------------------------------------------------------------------
# merging shards


def merge_shards(
    pattern_or_paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], output: str | os.PathLike[str]
) -> Path:
    """Merge shard JSONL files into ``NAME.jsonl`` (NAME from ``output``) and return its path.

    ``pattern_or_paths`` is a glob pattern (``"results/lang.rank*-of*.jsonl"``) or a list of files
    (globs inside the list are expanded too). Records already in ``NAME.jsonl`` are kept. Every file
    must carry the same command signature (target, model, settings, NAMM checkpoint); records are
    deduplicated by key (the first wins). The merged file is written atomically.
    """
    items = [pattern_or_paths] if isinstance(pattern_or_paths, (str, os.PathLike)) else list(pattern_or_paths)
    paths: list[Path] = []
    for item in items:
        text = os.fspath(item)
        matched = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not matched:
            raise FileNotFoundError(f"no shard files match {text!r}")
        paths.extend(Path(p) for p in matched)
    out_path, _ = results_paths(output)
    shards = [p for p in dict.fromkeys(paths) if p.resolve() != out_path.resolve()]
    if not shards:
        raise ValueError("merge_shards needs at least one shard file other than the output")
    sources = ([out_path] if out_path.exists() and out_path.stat().st_size > 0 else []) + shards
    header: dict[str, Any] | None = None
    header_src: Path | None = None
    merged: dict[str, dict[str, Any]] = {}
    origin: dict[str, Path] = {}
    for src in sources:
        h, records, _ = read_results(src)
        if h is None:
            raise ResultsFileError(f"{src} has no header line; cannot check it belongs with the others")
        if header is None:
            header, header_src = h, src
        else:
            diffs = signature_differences(header, h)
            if diffs:
                raise ResultsFileError(
                    f"cannot merge {src} with {header_src}: written by another command (differs in: {', '.join(diffs)})"
                )
        for rec in records:
            key = rec["key"]
            if key in merged:
                if merged[key] != rec:
                    logger.warning("key %r differs between %s and %s; keeping the first", key, origin[key], src)
                continue
            merged[key] = rec
            origin[key] = src
    assert header is not None
    lines = [_dumps({"_header": header})] + [_dumps(r) for r in merged.values()]
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    logger.info("merged %d shard files into %s (%d records)", len(shards), out_path, len(merged))
    return out_path


# ----------------------------------------------------------------------------------------------
# provenance


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def collect_versions() -> dict[str, str | None]:
    """Versions of python, torch, transformers and namm_transfer (None where not installed).

    Read from package metadata, so this does not import torch or transformers.
    """
    from namm_transfer import __version__

    return {
        "python": platform.python_version(),
        "torch": _dist_version("torch"),
        "transformers": _dist_version("transformers"),
        "namm_transfer": __version__,
    }


def collect_hardware() -> dict[str, Any]:
    """Platform, CPU count and, when torch is installed and sees one, the CUDA devices."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python_implementation": sys.implementation.name,
        "cpu_count": os.cpu_count(),
        "cuda_available": False,
        "cuda_devices": [],
    }
    try:
        import torch
    except ImportError:
        return info
    try:
        if torch.cuda.is_available():
            info["cuda_available"] = True
            info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda_version"] = torch.version.cuda
    except Exception as err:  # a broken driver must not lose a finished run's summary
        logger.warning("could not query CUDA devices: %s", err)
    return info
