"""The folder of a resumable training run, shared by the trainers (Decision Transformer, video model).

Layout (the trainer decides what goes into a checkpoint besides ``trainer_state.json``)::

    train_log.jsonl                one JSON object per line, appended as training goes (:func:`append_log`)
    checkpoints/step-NNNNNNN/      one resumable state (:func:`write_checkpoint`): the trainer's tensor files
                                   and trainer_state.json (step, config, scheduler, RNG states, ...)

A checkpoint folder is written under a temporary name and renamed when complete, so a folder named
``step-NNNNNNN`` holding ``trainer_state.json`` is always whole; only the newest ``keep`` are kept.
:func:`resume_run` restores the newest one through the trainer's loader and drops the log lines written
after its step, so no step is logged twice.

Also shared by the trainers: :class:`RunConfig` (a config dataclass as a dict and back), :class:`TrainState`
(what a checkpoint restores), :class:`TrainClock` (training seconds, evaluations left out), the provenance
they record (timestamps, package versions, sha256) and the number and table format of their cards.

Imports neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np

from .results import atomic_write_text

__all__ = [
    "CHECKPOINTS",
    "LOG_FILE",
    "STATE_FILE",
    "RunConfig",
    "TrainClock",
    "TrainState",
    "append_log",
    "checkpoint_dirs",
    "clean_json",
    "fmt_number",
    "latest_checkpoint",
    "log_start",
    "markdown_table",
    "package_versions",
    "read_checkpoint",
    "read_log",
    "resume_run",
    "sha256_file",
    "truncate_log",
    "utc_now",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_CKPT_RE = re.compile(r"^step-(\d+)$")
_C = TypeVar("_C", bound="RunConfig")


# ----------------------------------------------------------------------------------------------------------------
# what a run carries from checkpoint to checkpoint
class RunConfig:
    """Base of the trainers' config dataclasses: the settings as a dict and back (as a checkpoint stores them)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
        """The config of ``data``; keys it does not know are ignored, settings ``data`` lacks take their defaults."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known})


class TrainState(NamedTuple):
    """What a checkpoint saves and a resumed run restores, besides the config: the model, its optimizer and
    learning-rate scheduler, and the numpy RNG that draws the batches."""

    model: Any
    optimizer: Any
    scheduler: Any
    rng: np.random.Generator


class TrainClock:
    """Seconds of training, carried over checkpoints: the time between :meth:`tick` calls, less what
    :meth:`skip` leaves out (evaluations, checkpoints)."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = float(seconds)
        self._last = time.perf_counter()

    def tick(self) -> float:
        """Add the time since the last tick (or skip); returns the total."""
        now = time.perf_counter()
        self.seconds += now - self._last
        self._last = now
        return self.seconds

    def skip(self) -> None:
        """Leave the time since the last tick out."""
        self._last = time.perf_counter()


# ----------------------------------------------------------------------------------------------------------------
# JSON and provenance
def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (Path, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def clean_json(obj: Any) -> Any:
    """``obj`` as plain JSON values: numpy scalars and arrays, paths, sets and bytes converted; non-finite
    floats become None."""
    text = json.dumps(obj, default=_json_default)
    return json.loads(text, parse_constant=lambda _: None)


def utc_now() -> str:
    """The current UTC time to the second, ISO 8601 (``2026-01-31T12:00:00+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions(*dists: str) -> dict[str, str | None]:
    """Installed versions of the distributions ``dists`` (None where one is not installed), from package metadata."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fmt_number(value: Any, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals for a card; ``n/a`` for None, ``str(value)`` for what is not a number."""
    if value is None:
        return "n/a"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of a card's table, numbers right-aligned: a blank line, the header, the alignment row, one line a row."""
    lines = ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---:"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----- optimizer state without pickles ---------------------------------------------------------------------
def optimizer_to_flat(opt: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A torch optimizer's state as flat tensors ``state.{param}.{name}`` (for safetensors) plus JSON-able
    hyperparameters and scalar state: a checkpoint without pickles."""
    import torch

    sd = opt.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def optimizer_from_flat(opt: Any, tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Restore what :func:`optimizer_to_flat` wrote (the tensors read from safetensors, the rest from JSON)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("state."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in (meta.get("scalar_state") or {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def checkpoint_dirs(output: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete checkpoints under ``output/checkpoints``, oldest first."""
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder under ``output/checkpoints`` (None if there is none)."""
    dirs = checkpoint_dirs(output)
    return dirs[-1][1] if dirs else None


def write_checkpoint(
    output: str | os.PathLike[str], step: int, keep: int, write: Callable[[Path], Mapping[str, Any]]
) -> Path:
    """Write ``output/checkpoints/step-NNNNNNN/`` whole or not at all; keep only the newest ``keep`` checkpoints.

    Args:
        output: the run folder.
        step: the step the state belongs to (names the folder, seven digits).
        keep: how many checkpoint folders to keep, this one included.
        write: ``write(folder)`` writes the trainer's files into a temporary folder and returns the content of
            ``trainer_state.json`` (made JSON-clean with :func:`clean_json`, written with ``indent=1``).

    Returns:
        The checkpoint folder (one of the same step is replaced).
    """
    root = Path(output) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=root))
    try:
        state = write(tmp)
        atomic_write_text(tmp / STATE_FILE, json.dumps(clean_json(dict(state)), indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in checkpoint_dirs(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint at step %d -> %s", step, final)
    return final


def read_checkpoint(path: Path, config: RunConfig, identity: Iterable[str], restart: str) -> dict[str, Any]:
    """The ``trainer_state.json`` of the checkpoint folder ``path``, once its run is known to be ``config``'s.

    Args:
        path: a checkpoint folder.
        config: the current run's settings; the checkpoint's ``config`` is read back as the same type.
        identity: the settings that must agree for the checkpoint to be resumed.
        restart: how the user starts afresh instead (for the error message), e.g. ``"--restart"``.

    Raises:
        ValueError: the checkpoint belongs to another run (the differing settings are named).
    """
    state: dict[str, Any] = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    saved = type(config).from_dict(state.get("config") or {})
    diffs = [
        f"{k}: checkpoint {getattr(saved, k)!r} != now {getattr(config, k)!r}"
        for k in identity
        if getattr(saved, k) != getattr(config, k)
    ]
    if diffs:
        raise ValueError(
            f"checkpoint {path} belongs to another training run ({'; '.join(diffs)}); use another --output or "
            f"{restart} to start afresh"
        )
    return state


def resume_run(
    output: str | os.PathLike[str],
    load: Callable[[Path], Mapping[str, Any]],
    resume: bool = True,
    keep: Callable[[Mapping[str, Any]], bool] | None = None,
) -> tuple[int, float]:
    """Resume the run in ``output`` from its newest checkpoint, or prepare a fresh start.

    With a checkpoint (and ``resume``), ``load(folder)`` restores the trainer from it and returns its
    ``trainer_state.json``; the log then loses what was written after that step (and the entries ``keep``
    rejects, see :func:`truncate_log`). Without one the log is removed (a log without a checkpoint belongs to
    an interrupted start); ``resume=False`` removes the checkpoints first.

    Returns:
        ``(step, train_seconds)`` of the checkpoint; ``(0, 0.0)`` for a fresh start.
    """
    out = Path(output)
    log_path = out / LOG_FILE
    if not resume:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        if log_path.exists():
            log_path.unlink()
        return 0, 0.0
    state = load(ckpt)
    step = int(state["step"])
    truncate_log(log_path, step, keep)
    logger.info("resuming from %s (step %d)", ckpt, step)
    return step, float(state.get("train_seconds", 0.0))


# ----------------------------------------------------------------------------------------------------------------
# log
def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Entries of a ``train_log.jsonl`` (a truncated line is skipped with a warning; no file: none)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("ignoring a truncated line in %s", p)
    return out


def append_log(path: str | os.PathLike[str], entry: Mapping[str, Any]) -> None:
    """Append ``entry`` (made JSON-clean with :func:`clean_json`) as one line and flush it."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(clean_json(dict(entry))) + "\n")
        fh.flush()


def log_start(path: str | os.PathLike[str], entry: Mapping[str, Any]) -> None:
    """Begin a fresh run's log with ``{"step": 0, "event": "start", **entry}`` (the line the cards read)."""
    append_log(path, {"step": 0, "event": "start", **entry})


def truncate_log(
    path: str | os.PathLike[str], step: int, keep: Callable[[Mapping[str, Any]], bool] | None = None
) -> None:
    """Drop the entries after ``step`` (written after the checkpoint a resumed run starts from), and those
    for which ``keep(entry)`` is false; rewrites the file atomically."""
    entries = [e for e in read_log(path) if int(e.get("step", 0)) <= step and (keep is None or keep(e))]
    atomic_write_text(Path(path), "".join(json.dumps(e) + "\n" for e in entries))
