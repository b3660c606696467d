"""Offline-RL datasets in the D4RL HDF5 layout: write, read, check, split into trajectories, statistics.

The D4RL layout (one HDF5 file, N transitions):

===========================  =================  =======================================================
``observations``             (N, obs_dim) f32   state s_t (raw, unnormalized)
``actions``                  (N, act_dim) f32   action a_t taken in s_t
``rewards``                  (N,) f32           reward r_t
``terminals``                (N,) bool          s_{t+1} is terminal (the MDP ended: fall, ...)
``timeouts``                 (N,) bool          the episode was cut after this step (time limit)
``next_observations``        (N, obs_dim) f32   optional, s_{t+1}
``infos/<name>``             (N, ...)           optional per-step extras (e.g. ``infos/qpos``)
``metadata`` (group)         attrs              env name, level, behaviour policy, seed, score, versions
===========================  =================  =======================================================

An episode ends at a step where ``terminals`` or ``timeouts`` is set; trailing steps with neither flag form
a partial episode (D4RL files cut at exactly N samples have one).

In memory a dataset is a flat ``dict``: the keys above (``"infos/qpos"`` for nested datasets) mapped to numpy
arrays, plus ``"metadata"`` mapped to a plain ``dict`` when read from a file.

Importing this module is cheap: h5py loads inside the readers and writers, minari inside :func:`read_minari`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

REQUIRED_KEYS: tuple[str, ...] = ("observations", "actions", "rewards", "terminals", "timeouts")
"""Datasets every D4RL-format file must hold."""

FLOAT_KEYS: tuple[str, ...] = ("observations", "actions", "rewards", "next_observations")
"""Keys stored as float32 and checked to be finite."""

BOOL_KEYS: tuple[str, ...] = ("terminals", "timeouts")

METADATA_GROUP = "metadata"
_JSON_KEYS_ATTR = "__json_keys__"

STATE_STD_EPS = 1e-6
"""Added to the per-dimension state standard deviation (as in the Decision Transformer code)."""


class DatasetFormatError(ValueError):
    """A dataset does not follow the D4RL layout (missing keys, inconsistent shapes, non-finite values)."""


# --------------------------------------------------------------------------------------------------------------
# Cache folder


def cache_dir() -> Path:
    """Root of the project's data cache: ``$NAMM_TRANSFER_CACHE`` or ``~/.cache/namm-transfer``."""
    root = os.environ.get("NAMM_TRANSFER_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "namm-transfer"


def dataset_path(env_name: str, level: str, version: str = "v5") -> Path:
    """Default location of a collected dataset: ``cache_dir()/d4rl/{env}-{level}.hdf5``.

    Datasets collected on the non-default Gymnasium version get a suffix: ``{env}-{level}-v4.hdf5``.
    """
    from .envs import DEFAULT_VERSION, get_env_info

    name = get_env_info(env_name).name
    suffix = "" if version == DEFAULT_VERSION else f"-{version}"
    return cache_dir() / "d4rl" / f"{name}-{level}{suffix}.hdf5"


# --------------------------------------------------------------------------------------------------------------
# Checks


def validate_dataset(data: Mapping[str, Any], source: str = "dataset") -> int:
    """Check that ``data`` follows the D4RL layout.

    Args:
        data: flat dict of arrays (a ``"metadata"`` entry is ignored).
        source: what to call the data in error messages (a file name).

    Returns:
        N, the number of transitions.

    Raises:
        DatasetFormatError: missing keys, wrong ranks, unequal lengths or non-finite values.
    """
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise DatasetFormatError(
            f"{source} lacks required keys {missing}; a D4RL-format file needs {', '.join(REQUIRED_KEYS)}"
        )
    arrays = {k: np.asarray(v) for k, v in data.items() if k != METADATA_GROUP}
    for key, ndim in (("observations", 2), ("actions", 2), ("rewards", 1), ("terminals", 1), ("timeouts", 1)):
        if arrays[key].ndim != ndim:
            raise DatasetFormatError(f"{source}: {key!r} must have {ndim} dimension(s), got shape {arrays[key].shape}")
    n = arrays["observations"].shape[0]
    bad = {k: v.shape[0] for k, v in arrays.items() if v.ndim and v.shape[0] != n}
    if bad:
        raise DatasetFormatError(
            f"{source}: every array must have N={n} rows (the length of 'observations'); mismatched: {bad}"
        )
    if "next_observations" in arrays and arrays["next_observations"].shape != arrays["observations"].shape:
        raise DatasetFormatError(
            f"{source}: 'next_observations' shape {arrays['next_observations'].shape} differs from "
            f"'observations' shape {arrays['observations'].shape}"
        )
    for key in FLOAT_KEYS:
        if key in arrays:
            finite = np.isfinite(arrays[key])
            if not finite.all():
                row = int(np.argwhere(~finite)[0][0])
                raise DatasetFormatError(
                    f"{source}: {key!r} holds {int((~finite).sum())} non-finite values (first at row {row})"
                )
    return n


# --------------------------------------------------------------------------------------------------------------
# HDF5 write / read


def _encode_metadata(group: Any, metadata: Mapping[str, Any]) -> None:
    json_keys = []
    for key, value in metadata.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (str, bool, int, float)):
            group.attrs[key] = value
        else:
            group.attrs[key] = json.dumps(value, default=_json_default, sort_keys=True)
            json_keys.append(key)
    group.attrs[_JSON_KEYS_ATTR] = json.dumps(json_keys)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON serializable")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "SO":
            return [_plain(v) for v in value.tolist()]
        return value
    return value


def _decode_metadata(group: Any) -> dict[str, Any]:
    import h5py

    json_keys = set(json.loads(group.attrs.get(_JSON_KEYS_ATTR, "[]")))
    out: dict[str, Any] = {}
    for key, value in group.attrs.items():
        if key == _JSON_KEYS_ATTR:
            continue
        value = _plain(value)
        out[key] = json.loads(value) if key in json_keys else value

    # Original D4RL files keep metadata as datasets (metadata/algorithm, metadata/policy/...): read those too.
    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            out[name] = _plain(obj[()])

    group.visititems(visit)
    return out


def write_d4rl_hdf5(
    path: str | os.PathLike, data: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a dataset in the D4RL HDF5 layout, atomically (temp file in the same folder + ``os.replace``).

    Args:
        path: destination ``.hdf5`` file; parent folders are created.
        data: flat dict of arrays with N rows each: ``observations`` (N, obs_dim), ``actions`` (N, act_dim),
            ``rewards`` (N,), ``terminals`` (N,), ``timeouts`` (N,), optional ``next_observations`` and any
            per-step extras (``"infos/qpos"`` creates group ``infos``). Float keys are stored as float32,
            flags as bool. A ``"metadata"`` dict entry is merged under ``metadata``.
        metadata: JSON-able dict stored as attributes of the ``metadata`` group (str/int/float/bool natively,
            other values as JSON strings).

    Returns:
        The path written.

    Raises:
        DatasetFormatError: if ``data`` does not follow the layout (nothing is written then).
    """
    import h5py

    path = Path(path)
    validate_dataset(data, source=f"data for {path.name}")
    meta: dict[str, Any] = dict(data.get(METADATA_GROUP) or {})
    meta.update(metadata or {})

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in data.items():
                if key == METADATA_GROUP:
                    continue
                arr = np.asarray(value)
                if key in FLOAT_KEYS:
                    arr = arr.astype(np.float32, copy=False)
                elif key in BOOL_KEYS:
                    arr = arr.astype(bool, copy=False)
                compression = "gzip" if arr.ndim and arr.shape[0] > 1000 else None
                f.create_dataset(key, data=arr, compression=compression)
            _encode_metadata(f.require_group(METADATA_GROUP), meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("wrote %d transitions to %s", len(data["observations"]), path)
    return path


def read_d4rl_hdf5(path: str | os.PathLike, check: bool = True) -> dict[str, Any]:
    """Read a D4RL-format HDF5 file (ours or an original D4RL one).

    Args:
        path: the ``.hdf5`` file.
        check: run :func:`validate_dataset` (shapes, equal lengths, finite values).

    Returns:
        Flat dict: every dataset outside ``metadata`` as a numpy array keyed by its path (``"observations"``,
        ``"infos/qpos"``, ...), plus ``"metadata"``: a dict of the ``metadata`` group's attributes (and
        datasets, as in original D4RL files).

    Raises:
        FileNotFoundError: no such file.
        DatasetFormatError: ``"dataset file X lacks required keys [...]; ..."`` or failed checks.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and not name.startswith(METADATA_GROUP + "/"):
                out[name] = obj[()]

        f.visititems(visit)
        metadata: dict[str, Any] = {k: _plain(v) for k, v in f.attrs.items()}
        if METADATA_GROUP in f:
            metadata.update(_decode_metadata(f[METADATA_GROUP]))
    missing = [k for k in REQUIRED_KEYS if k not in out]
    if missing:
        raise DatasetFormatError(
            f"dataset file {path} lacks required keys {missing}; a D4RL-format file needs {', '.join(REQUIRED_KEYS)}"
        )
    if check:
        validate_dataset(out, source=f"dataset file {path}")
    out[METADATA_GROUP] = metadata
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read only the ``metadata`` group of a D4RL-format file (cheap: no arrays are loaded)."""
    import h5py

    with h5py.File(Path(path), "r") as f:
        return _decode_metadata(f[METADATA_GROUP]) if METADATA_GROUP in f else {}


# --------------------------------------------------------------------------------------------------------------
# Trajectories and statistics


def _per_step_keys(data: Mapping[str, Any], n: int) -> list[str]:
    return [k for k, v in data.items() if k != METADATA_GROUP and np.ndim(v) >= 1 and np.shape(v)[0] == n]


def split_trajectories(data: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    """Split a flat dataset into episodes.

    An episode ends at a step whose ``terminals`` or ``timeouts`` flag is set; steps after the last flag form
    a trailing partial episode, which is kept.

    Args:
        data: flat dict (D4RL layout) with N rows per array.

    Returns:
        One dict per episode with the same per-step keys, each array of shape ``(T_i, ...)`` (views into
        ``data``'s arrays); ``sum(T_i) == N``.
    """
    n = len(data["observations"])
    done = np.logical_or(np.asarray(data["terminals"], dtype=bool), np.asarray(data["timeouts"], dtype=bool))
    ends = np.flatnonzero(done) + 1
    if not len(ends) or ends[-1] != n:
        ends = np.append(ends, n)
    keys = _per_step_keys(data, n)
    arrays = {k: np.asarray(data[k]) for k in keys}
    trajs = []
    start = 0
    for end in ends.tolist():
        if end > start:
            trajs.append({k: a[start:end] for k, a in arrays.items()})
        start = end
    return trajs


def dataset_stats(trajs: Sequence[Mapping[str, np.ndarray]], env_name: str | None = None) -> dict[str, Any]:
    """Summary statistics of a list of trajectories (as from :func:`split_trajectories`).

    Args:
        trajs: episodes with ``observations`` (T_i, obs_dim) and ``rewards`` (T_i,).
        env_name: if given, also report D4RL normalized returns.

    Returns:
        dict with ``state_mean`` and ``state_std`` (obs_dim,) float32 (std + 1e-6, over all N states),
        ``returns`` and ``lengths`` (num_trajectories,), ``num_trajectories``, ``num_steps``,
        ``return_mean``, ``return_std``, ``return_min``, ``return_max`` and, with ``env_name``,
        ``normalized_return_mean`` and ``normalized_return_std``.
    """
    if not trajs:
        raise ValueError("dataset_stats needs at least one trajectory")
    states = np.concatenate([np.asarray(t["observations"], dtype=np.float64) for t in trajs], axis=0)
    returns = np.array([float(np.sum(t["rewards"], dtype=np.float64)) for t in trajs])
    lengths = np.array([len(t["rewards"]) for t in trajs], dtype=np.int64)
    stats: dict[str, Any] = {
        "state_mean": states.mean(axis=0).astype(np.float32),
        "state_std": (states.std(axis=0) + STATE_STD_EPS).astype(np.float32),
        "returns": returns,
        "lengths": lengths,
        "num_trajectories": len(trajs),
        "num_steps": int(lengths.sum()),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "return_min": float(returns.min()),
        "return_max": float(returns.max()),
    }
    if env_name is not None:
        from .envs import normalized_score

        scores = normalized_score(env_name, returns)
        stats["normalized_return_mean"] = float(scores.mean())
        stats["normalized_return_std"] = float(scores.std())
    return stats


def read_minari(dataset_id_or_path: str | os.PathLike, use_minari: bool | None = None) -> dict[str, Any]:
    """Read a local Minari dataset into the D4RL layout; see :func:`.minari_io.read_minari`."""
    from .minari_io import read_minari as _read

    return _read(dataset_id_or_path, use_minari=use_minari)
