"""Saving, loading and shipping NAMM checkpoints.

A checkpoint is a folder with two files::

    <folder>/model.safetensors   tensors: flat (D,), feature_mean (n_bins,), feature_std (n_bins,)
    <folder>/config.json         format, name, namm_config, n_params, normalization, provenance,
                                 content_hash (sha256 of model.safetensors), created, weights

``D`` is the flat parameter count (4,172 with the default config) and ``n_bins`` the number of
spectral bins (17). ``normalization`` is ``"estimated"`` when the frozen feature statistics were
estimated (they are then restored on load) and ``"unset"`` otherwise. The ``content_hash`` lets a
results file record exactly which weights produced it (see :func:`load_namm`, which attaches
``namm.checkpoint_info``).

Checkpoints shipped with the package live in ``namm_transfer/weights/<name>/`` with timm-style
``arch.tag`` names such as ``bam.smollm2-135m``; :func:`list_namms` lists them and
``load_namm("bam.smollm2-135m")`` loads one. ``load_namm("default")`` follows the one-line file
``namm_transfer/weights/DEFAULT``.

:func:`import_reference_checkpoint` converts a checkpoint of the paper's reference trainer (a torch
pickle) without ever unpickling arbitrary objects (``torch.load(..., weights_only=True)`` only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .namm import NAMM, NAMMConfig
from .results import atomic_write_bytes
from .run_folder import sha256_file

__all__ = [
    "FORMAT",
    "WEIGHTS_DIR",
    "content_hash",
    "default_namm_name",
    "import_reference_checkpoint",
    "list_namms",
    "load_namm",
    "resolve_checkpoint",
    "save_namm",
]

logger = logging.getLogger(__name__)

FORMAT = "namm-transfer/1"
"""Value of the ``format`` key of every config.json this module writes and accepts."""

WEIGHTS_DIR: Path = Path(__file__).resolve().parent / "weights"
"""Folder of the checkpoints shipped inside the package (one subfolder per name)."""

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_FILE = "DEFAULT"

_NORMALIZATION_SET = ("estimated", "calibrated")
"""``normalization`` values for which the saved statistics are restored. ``calibrated`` (statistics
re-estimated on a target model, an ablation) is accepted on load for checkpoints labelled so by hand."""
_NORMALIZATION_VALUES = (*_NORMALIZATION_SET, "unset")

_REF_MEAN_SUFFIX = "token_embedding_0_output_mean"
_REF_VAR_SUFFIX = "token_embedding_0_output_var"

_TRAIN_HINT = "train one with `namm-transfer evolve`"


# ----- hashing --------------------------------------------------------------------------------------
def content_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of the bytes of ``path``."""
    return sha256_file(path)


# ----- registry -------------------------------------------------------------------------------------
def list_namms() -> list[str]:
    """Names of the checkpoints shipped with the package (subfolders of :data:`WEIGHTS_DIR` with a config.json)."""
    root = Path(WEIGHTS_DIR)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())


def default_namm_name() -> str | None:
    """The name written in ``weights/DEFAULT``, or ``None`` when no default checkpoint ships."""
    default = Path(WEIGHTS_DIR) / DEFAULT_FILE
    if not default.is_file():
        return None
    name = default.read_text(encoding="utf-8").strip()
    return name or None


def _shipped_summary() -> str:
    names = list_namms()
    if names:
        return f"shipped NAMMs: {', '.join(names)}"
    return f"no NAMM checkpoint ships with this installation yet ({_TRAIN_HINT})"


def resolve_checkpoint(name_or_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Find the (config.json, weights .safetensors) pair for a shipped name or a path.

    Accepted: ``"default"``; a shipped name (see :func:`list_namms`); a checkpoint folder; a
    config.json (or other .json) path; a .safetensors path (its config is ``<stem>.json`` next to it,
    else ``config.json`` in the same folder). An existing path wins over a shipped name.

    Raises:
        FileNotFoundError: naming what was looked for and listing the shipped names.
    """
    if isinstance(name_or_path, str) and name_or_path == "default":
        name = default_namm_name()
        if name is None:
            raise FileNotFoundError(
                f"no default NAMM ships yet (no {Path(WEIGHTS_DIR) / DEFAULT_FILE}); {_TRAIN_HINT} and load it by "
                f"path, or pass a checkpoint folder or a shipped name (shipped: {', '.join(list_namms()) or 'none'})"
            )
        name_or_path = name

    path = Path(name_or_path).expanduser()
    if not path.exists() and isinstance(name_or_path, str) and (Path(WEIGHTS_DIR) / name_or_path).is_dir():
        path = Path(WEIGHTS_DIR) / name_or_path

    if path.is_dir():
        config = path / CONFIG_FILE
        if not config.is_file():
            raise FileNotFoundError(
                f"{path} is not a NAMM checkpoint folder: {config} is missing (a checkpoint folder holds "
                f"{CONFIG_FILE} and {WEIGHTS_FILE}). {_shipped_summary()}"
            )
        return config, _weights_for_config(config)
    if path.is_file():
        if path.suffix == ".safetensors":
            for candidate in (path.with_suffix(".json"), path.parent / CONFIG_FILE):
                if candidate.is_file():
                    return candidate, path
            raise FileNotFoundError(
                f"found weights {path} but no config next to them (looked for {path.with_suffix('.json')} and "
                f"{path.parent / CONFIG_FILE}); checkpoints are written by save_namm"
            )
        if path.suffix == ".json":
            return path, _weights_for_config(path)
        raise FileNotFoundError(
            f"{path} is neither a checkpoint folder, a config .json nor a .safetensors file; for a reference "
            f"trainer pickle use import_reference_checkpoint"
        )
    raise FileNotFoundError(
        f"no NAMM checkpoint {str(name_or_path)!r}: looked for a shipped name in {WEIGHTS_DIR} and for a "
        f"folder, config .json or .safetensors file at {path.resolve()}. {_shipped_summary()}"
    )


def _weights_for_config(config: Path) -> Path:
    """The weights file named by a config (key ``weights``, default model.safetensors), next to it."""
    name = WEIGHTS_FILE
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("weights"), str):
            name = data["weights"]
    except (OSError, ValueError):
        pass  # reported with context by load_namm
    weights = config.parent / Path(name).name
    if not weights.is_file():
        raise FileNotFoundError(f"NAMM config {config} found, but its weights file {weights} is missing")
    return weights


# ----- save -----------------------------------------------------------------------------------------
def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "tolist"):  # tensors, numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"provenance value of type {type(obj).__name__} is not JSON serializable: {obj!r}")


def save_namm(
    namm: NAMM,
    path: str | os.PathLike[str],
    *,
    provenance: dict[str, Any] | None = None,
    name: str | None = None,
    normalization: str | None = None,
) -> Path:
    """Write ``namm`` as a checkpoint; each file is written atomically (temp file + ``os.replace``).

    Args:
        namm: the network; saved are ``flat`` (D,), ``feature_mean`` (n_bins,), ``feature_std`` (n_bins,)
            as float32, plus its :class:`NAMMConfig`.
        path: a folder (created if needed) that receives ``model.safetensors`` and ``config.json``; or a
            path ending in ``.safetensors``, whose config is written next to it as ``config.json`` when
            the file is named model.safetensors and as ``<stem>.json`` otherwise.
        provenance: free JSON-serializable description (trainer, model, tasks, generations, seed, ...).
        name: checkpoint name recorded in the config; default: the folder name (or the file stem).
        normalization: how the statistics were obtained, ``"estimated"`` (on the training model, the spec) or
            ``"calibrated"`` (re-estimated on a target model: an ablation, labelled so); default: the label of the
            checkpoint ``namm`` was loaded from, else ``"estimated"``. ``"unset"`` when the NAMM has no statistics.
    Returns:
        The path of the written config.json (accepted by :func:`load_namm`).
    """
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        folder, weights = path.parent, path
        config = folder / CONFIG_FILE if path.name == WEIGHTS_FILE else path.with_suffix(".json")
        default_name = folder.name if path.name == WEIGHTS_FILE else path.stem
    else:
        folder, weights, config = path, path / WEIGHTS_FILE, path / CONFIG_FILE
        default_name = path.name
    ready = bool(namm.normalization_ready)
    if normalization is None:
        loaded = (getattr(namm, "checkpoint_info", None) or {}).get("normalization")
        normalization = loaded if ready and loaded in _NORMALIZATION_SET else ("estimated" if ready else "unset")
    elif normalization not in _NORMALIZATION_SET:
        raise ValueError(f"normalization must be one of {_NORMALIZATION_SET} (or None), got {normalization!r}")
    elif not ready:
        raise ValueError(f"normalization={normalization!r} given, but this NAMM has no normalization statistics")
    folder.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import save as st_save

    tensors: dict[str, Tensor] = {
        key: torch.as_tensor(getattr(namm, key)).detach().to("cpu", torch.float32).contiguous().reshape(-1)
        for key in ("flat", "feature_mean", "feature_std")
    }
    data = st_save(tensors, metadata={"format": FORMAT})
    atomic_write_bytes(weights, data)
    digest = content_hash(weights)

    record = {
        "format": FORMAT,
        "name": name if name is not None else default_name,
        "namm_config": namm.config.to_dict(),
        "n_params": namm.config.n_params,
        "normalization": normalization,
        "provenance": dict(provenance or {}),
        "content_hash": digest,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "weights": weights.name,
    }
    text = json.dumps(record, indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n"
    atomic_write_bytes(config, text.encode("utf-8"))
    logger.info("saved NAMM %r to %s (sha256 %s)", record["name"], config, digest[:12])
    return config


# ----- load -----------------------------------------------------------------------------------------
def _redo_hint() -> str:
    return f"re-download it (reinstall namm-transfer for a shipped checkpoint) or re-train it ({_TRAIN_HINT})"


def _check_expected(cfg: NAMMConfig, expect: NAMMConfig | Mapping[str, Any], source: Path) -> None:
    if isinstance(expect, NAMMConfig):
        wanted = expect.to_dict()
    else:
        wanted = dict(expect)
        known = set(cfg.to_dict())
        unknown = set(wanted) - known
        if unknown:
            raise ValueError(f"expect_config has unknown NAMM config fields {sorted(unknown)}; known: {sorted(known)}")
    have = cfg.to_dict()
    diffs = [f"{key}: checkpoint {have[key]!r} != expected {val!r}" for key, val in wanted.items() if have[key] != val]
    if diffs:
        raise ValueError(f"mismatched hyperparameters in NAMM checkpoint {source}: " + "; ".join(diffs))


def load_namm(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    expect_config: NAMMConfig | Mapping[str, Any] | None = None,
) -> NAMM:
    """Load a NAMM checkpoint and verify it.

    Args:
        name_or_path: ``"default"``, a shipped name (``list_namms()``), a checkpoint folder, its
            config.json, or its .safetensors file (see :func:`resolve_checkpoint`).
        device: where the returned module lives.
        expect_config: hyperparameters the caller relies on; a :class:`NAMMConfig` compares every
            field, a dict only the fields it names. Differences raise ``ValueError``.
    Returns:
        A :class:`NAMM` in eval mode with ``flat`` (D,) and, when the config says
        ``"estimated"``, the frozen normalization statistics (n_bins,) set. ``namm.checkpoint_info``
        is a dict with ``name``, ``content_hash``, ``path`` (of the weights) and ``provenance``.
    Raises:
        FileNotFoundError: nothing found under that name or path.
        ValueError: unknown format, corrupt or modified weights (sha256 mismatch), wrong sizes,
            non-finite values, mismatched hyperparameters.
    """
    config_path, weights_path = resolve_checkpoint(name_or_path)

    try:
        record = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"NAMM config {config_path} is not valid JSON ({err}); {_redo_hint()}") from err
    if not isinstance(record, dict):
        raise ValueError(f"NAMM config {config_path} must hold a JSON object, got {type(record).__name__}")
    fmt = record.get("format")
    if fmt != FORMAT:
        raise ValueError(
            f"NAMM config {config_path} has format {fmt!r}, this version of namm-transfer reads {FORMAT!r}"
            + ("" if fmt else "; for a reference trainer pickle use import_reference_checkpoint")
        )
    raw_cfg = record.get("namm_config")
    if not isinstance(raw_cfg, dict):
        raise ValueError(f"NAMM config {config_path} has no 'namm_config' object")
    try:
        cfg = NAMMConfig.from_dict(raw_cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid namm_config in {config_path}: {err}") from err
    if expect_config is not None:
        _check_expected(cfg, expect_config, config_path)
    n_params = cfg.n_params
    if "n_params" in record and record["n_params"] != n_params:
        raise ValueError(
            f"NAMM config {config_path} says n_params={record['n_params']}, but its namm_config needs {n_params}"
        )
    normalization = record.get("normalization", "unset")
    if normalization not in _NORMALIZATION_VALUES:
        raise ValueError(
            f"NAMM config {config_path} has normalization {normalization!r}; expected one of {_NORMALIZATION_VALUES}"
        )

    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    data = weights_path.read_bytes()
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as err:
        raise ValueError(
            f"NAMM weights file {weights_path} is corrupt or truncated and cannot be read ({err}); {_redo_hint()}"
        ) from err

    digest = hashlib.sha256(data).hexdigest()
    expected_hash = record.get("content_hash")
    if expected_hash is None:
        logger.warning("NAMM config %s has no content_hash; cannot verify %s", config_path, weights_path)
    elif digest != expected_hash:
        raise ValueError(
            f"NAMM weights file {weights_path} is corrupt or was modified: its sha256 is {digest}, but "
            f"{config_path} records {expected_hash}; {_redo_hint()}"
        )

    missing = [k for k in ("flat", "feature_mean", "feature_std") if k not in tensors]
    if missing:
        raise ValueError(f"NAMM weights file {weights_path} lacks tensors {missing} (found {sorted(tensors)})")
    extra = sorted(set(tensors) - {"flat", "feature_mean", "feature_std"})
    if extra:
        logger.warning("ignoring unknown tensors %s in %s", extra, weights_path)
    flat, mean, std = (tensors[k].to(torch.float32) for k in ("flat", "feature_mean", "feature_std"))
    if flat.ndim != 1 or flat.numel() != n_params:
        raise ValueError(
            f"NAMM weights file {weights_path} holds a flat parameter vector of shape {tuple(flat.shape)} "
            f"({flat.numel()} values), but the namm_config in {config_path} needs {n_params} values; the "
            f"weights and the config do not belong together"
        )
    n_bins = cfg.n_bins
    for key, t in (("feature_mean", mean), ("feature_std", std)):
        if tuple(t.shape) != (n_bins,):
            raise ValueError(f"{key} in {weights_path} has shape {tuple(t.shape)}, expected ({n_bins},)")
    for key, t in (("flat", flat), ("feature_mean", mean), ("feature_std", std)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{key} in NAMM weights file {weights_path} contains NaN or inf; {_redo_hint()}")
    if (std < 0).any():
        raise ValueError(f"feature_std in {weights_path} has negative values")

    namm = NAMM(cfg)
    namm.set_flat(flat)
    if normalization in _NORMALIZATION_SET:
        namm.set_normalization(mean, std)
    namm = namm.to(device).eval()
    namm.checkpoint_info = {  # type: ignore[assignment]  # plain attribute, not a buffer
        "name": record.get("name"),
        "content_hash": digest,
        "path": str(weights_path),
        "normalization": normalization,
        "provenance": record.get("provenance") or {},
    }
    logger.info("loaded NAMM %r from %s (sha256 %s)", record.get("name"), weights_path, digest[:12])
    return namm


def namm_record(namm: NAMM, name: str | None = None) -> dict[str, Any]:
    """How a results file names the NAMM it ran: the checkpoint's name, its weights' sha256 and the hyperparameters
    it ran with (threshold, cap, sink tokens, ...: a config.json edited by hand, or a setting overridden on the
    command line, is another NAMM, while the content hash covers the weights file only). ``name``: used when the
    NAMM was not loaded from a checkpoint (or its checkpoint has no name)."""
    info = getattr(namm, "checkpoint_info", None) or {}
    return {"name": info.get("name") or name, "sha256": info.get("content_hash"), "config": namm.config.to_dict()}


# ----- reference trainer importer -------------------------------------------------------------------
def _walk(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (dotted key, value) for every entry of nested mappings (and lists/tuples) in ``obj``."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            full = f"{prefix}.{key}" if prefix else str(key)
            yield full, value
            yield from _walk(value, full)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            if isinstance(value, (Mapping, list, tuple)):
                yield from _walk(value, f"{prefix}[{i}]")


def _find_suffix(obj: Any, suffix: str, path: Path) -> Tensor:
    hits = [(k, v) for k, v in _walk(obj) if k.endswith(suffix) and isinstance(v, Tensor)]
    if not hits:
        raise ValueError(f"reference checkpoint {path} has no tensor whose key ends in {suffix!r}")
    first = hits[0][1]
    for _key, value in hits[1:]:
        if value.shape != first.shape or not torch.equal(value, first):
            raise ValueError(
                f"reference checkpoint {path} has several different tensors ending in {suffix!r}: "
                f"{[k for k, _ in hits]}"
            )
    return first


def import_reference_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> NAMM:
    """Import a checkpoint of the paper's reference trainer (a torch pickle), safely.

    The file must hold a dict with ``evolution_state['mean']`` (the CMA-ES mean, D = 4,172 floats,
    tensor or list) and normalization buffers, anywhere in nested dicts, whose keys end in
    ``token_embedding_0_output_mean`` and ``token_embedding_0_output_var`` (shape (1, 1, 1, 17)).
    The variance is turned into a standard deviation with a square root (namm-spec.md).

    Only ``torch.load(path, map_location="cpu", weights_only=True)`` is used: files holding arbitrary
    Python objects are refused, never unpickled.

    Returns:
        A :class:`NAMM` with the default :class:`NAMMConfig`, ``flat`` = the CMA-ES mean and the
        normalization set; ``checkpoint_info`` records the file's sha256.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" (it needs {found.group(1)})" if found else ""
        raise ValueError(
            f"reference checkpoint {path} holds Python objects that cannot be loaded safely{what}; namm-transfer "
            f"only reads tensors, lists, dicts and numbers (torch.load with weights_only=True) and never unpickles "
            f"arbitrary files. Re-save the file as a dict of tensors in an environment you trust."
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"reference checkpoint {path} is not a readable torch file ({err})") from err

    if not isinstance(obj, Mapping):
        raise ValueError(f"reference checkpoint {path} must hold a dict, got {type(obj).__name__}")
    state = obj.get("evolution_state")
    if state is None:
        state = next((v for k, v in _walk(obj) if k.rsplit(".", 1)[-1] == "evolution_state"), None)
    if not isinstance(state, Mapping) or "mean" not in state:
        raise ValueError(f"reference checkpoint {path} has no 'evolution_state' dict with a 'mean' entry")

    cfg = NAMMConfig()
    try:
        flat = torch.as_tensor(state["mean"], dtype=torch.float32).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"evolution_state['mean'] in {path} is not a vector of numbers ({err})") from err
    if flat.numel() != cfg.n_params:
        raise ValueError(
            f"evolution_state['mean'] in {path} has {flat.numel()} values, the default NAMM needs {cfg.n_params}"
        )
    mean = _find_suffix(obj, _REF_MEAN_SUFFIX, path).to(torch.float32).reshape(-1)
    var = _find_suffix(obj, _REF_VAR_SUFFIX, path).to(torch.float32).reshape(-1)
    for key, t in (("mean", mean), ("var", var)):
        if t.numel() != cfg.n_bins:
            raise ValueError(f"normalization {key} in {path} has {t.numel()} values, expected {cfg.n_bins}")
        if not torch.isfinite(t).all():
            raise ValueError(f"normalization {key} in {path} contains NaN or inf")
    if (var < 0).any():
        raise ValueError(f"normalization variance in {path} has negative values")
    if not torch.isfinite(flat).all():
        raise ValueError(f"evolution_state['mean'] in {path} contains NaN or inf")

    namm = NAMM(cfg)
    namm.set_flat(flat)
    namm.set_normalization(mean, var.sqrt())
    namm = namm.to(device).eval()
    namm.checkpoint_info = {  # type: ignore[assignment]  # plain attribute, not a buffer
        "name": None,
        "content_hash": content_hash(path),
        "path": str(path),
        "provenance": {"source": "reference trainer checkpoint", "file": path.name},
    }
    logger.info("imported reference NAMM checkpoint %s", path)
    return namm
