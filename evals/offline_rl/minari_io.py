"""Local Minari datasets, read into the D4RL layout (see :mod:`.datasets`).

Minari 0.5 keeps a dataset ``ns/name-v0`` under ``$MINARI_DATASETS_PATH`` (default ``~/.minari/datasets``)
in this on-disk layout (HDF5 storage)::

    <root>/ns/name-v0/data/metadata.json     total_episodes, total_steps, data_format ("hdf5"),
                                             observation_space / action_space (JSON strings),
                                             dataset_id, minari_version, ...
    <root>/ns/name-v0/data/main_data.hdf5    one group per episode, episode_0, episode_1, ...:
        observations   (T+1, obs_dim)   every state including the final one
        actions        (T, act_dim)
        rewards        (T,)
        terminations   (T,) bool
        truncations    (T,) bool
        infos/         optional group (T+1 entries per key)
        attrs: id, total_steps, seed (optional)

Reading uses ``minari`` when it is importable (``minari.load_dataset`` for an id, ``minari.MinariDataset``
for a folder). The fallback reader (``use_minari=False``, or minari missing) opens ``metadata.json`` and
``main_data.hdf5`` directly with h5py; it supports the ``hdf5`` data format with flat (Box) observation and
action spaces, which is what the MuJoCo locomotion datasets use.

Conversion to the D4RL layout, per episode of T steps: ``observations = obs[:-1]``,
``next_observations = obs[1:]``, ``terminals = terminations``, ``timeouts = truncations``. An episode whose
last step has neither flag (recording stopped mid-episode) gets ``timeouts[-1] = True`` so that the episode
boundary survives concatenation. Minari ``infos`` are not converted.

Writing (:func:`write_minari_fixture`) makes small local datasets for tests: with minari's own
``create_dataset_from_buffers`` (works without the ``minari[create]`` extra) or, with ``use_minari=False``,
by writing the layout above directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MAIN_FILE = "main_data.hdf5"
METADATA_FILE = "metadata.json"
FALLBACK_MINARI_VERSION = "0.5.4"
"""``minari_version`` written by the direct layout writer (a version minari 0.5 accepts)."""


def minari_root() -> Path:
    """Minari's local dataset root: ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``."""
    root = os.environ.get("MINARI_DATASETS_PATH")
    return Path(root).expanduser() if root else Path.home() / ".minari" / "datasets"


def _minari_available() -> bool:
    try:
        import minari  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_minari_data_dir(dataset_id_or_path: str | os.PathLike) -> tuple[Path, str | None]:
    """Find the ``data`` folder (holding ``metadata.json``) of a local Minari dataset.

    Args:
        dataset_id_or_path: a dataset id (``"mujoco/hopper/medium-v0"``, looked up under :func:`minari_root`),
            a dataset folder (containing ``data/``) or the ``data`` folder itself.

    Returns:
        ``(data_dir, dataset_id)``; ``dataset_id`` is None when a path was given.

    Raises:
        FileNotFoundError: nothing found, with where it looked.
    """
    path = Path(dataset_id_or_path).expanduser()
    if path.is_dir():
        for candidate in (path / "data", path):
            if (candidate / METADATA_FILE).is_file():
                return candidate, None
        raise FileNotFoundError(f"{path} is not a Minari dataset folder: no {METADATA_FILE} in it or in data/")
    dataset_id = str(dataset_id_or_path)
    data_dir = minari_root() / dataset_id / "data"
    if not (data_dir / METADATA_FILE).is_file():
        raise FileNotFoundError(
            f"Minari dataset {dataset_id!r} not found locally at {data_dir.parent}; set MINARI_DATASETS_PATH to "
            f"the folder that holds it, pass the dataset folder itself, or download it where a network is "
            f"available with `minari download {dataset_id}`"
        )
    return data_dir, dataset_id


def _iter_episodes_minari(data_dir: Path, dataset_id: str | None) -> Iterator[Mapping[str, Any]]:
    import minari

    if dataset_id is not None and data_dir == minari_root() / dataset_id / "data":
        ds = minari.load_dataset(dataset_id, download=False)
    else:
        ds = minari.MinariDataset(data_dir)
    for ep in ds.iterate_episodes():
        obs = ep.observations
        if isinstance(obs, (dict, tuple)):
            raise ValueError(
                f"Minari dataset at {data_dir} has a structured observation space; the D4RL layout needs flat "
                "(Box) observations"
            )
        yield {
            "id": ep.id,
            "observations": obs,
            "actions": ep.actions,
            "rewards": ep.rewards,
            "terminations": ep.terminations,
            "truncations": ep.truncations,
        }


def _iter_episodes_fallback(data_dir: Path, metadata: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    import h5py

    fmt = metadata.get("data_format", "hdf5")
    if fmt != "hdf5":
        raise ValueError(
            f"Minari dataset at {data_dir} uses the {fmt!r} data format; the fallback reader handles only 'hdf5' "
            "(install minari to read it)"
        )
    main = data_dir / MAIN_FILE
    if not main.is_file():
        raise FileNotFoundError(f"Minari dataset at {data_dir} lacks {MAIN_FILE}")
    with h5py.File(main, "r") as f:
        names = [k for k in f.keys() if k.startswith("episode_")]
        for name in sorted(names, key=lambda k: int(k.split("_", 1)[1])):
            group = f[name]
            for key in ("observations", "actions"):
                if not isinstance(group[key], h5py.Dataset):
                    raise ValueError(
                        f"{main}: {name}/{key} is a group (structured space); the D4RL layout needs flat (Box) "
                        "observations and actions"
                    )
            yield {
                "id": int(name.split("_", 1)[1]),
                "observations": group["observations"][()],
                "actions": group["actions"][()],
                "rewards": group["rewards"][()],
                "terminations": group["terminations"][()],
                "truncations": group["truncations"][()],
            }


def _episodes_to_d4rl(episodes: Iterator[Mapping[str, Any]], source: str) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    }
    n_forced = 0
    for ep in episodes:
        obs = np.asarray(ep["observations"])
        actions = np.asarray(ep["actions"])
        t = len(actions)
        if obs.shape[0] != t + 1:
            raise ValueError(
                f"{source}: episode {ep['id']} has {obs.shape[0]} observations for {t} actions (expected T+1)"
            )
        if t == 0:
            continue
        terminals = np.asarray(ep["terminations"], dtype=bool).reshape(t)
        timeouts = np.asarray(ep["truncations"], dtype=bool).reshape(t).copy()
        if not (terminals[-1] or timeouts[-1]):
            timeouts[-1] = True
            n_forced += 1
        obs2 = obs.reshape(t + 1, -1)
        parts["observations"].append(obs2[:-1].astype(np.float32))
        parts["next_observations"].append(obs2[1:].astype(np.float32))
        parts["actions"].append(actions.reshape(t, -1).astype(np.float32))
        parts["rewards"].append(np.asarray(ep["rewards"], dtype=np.float32).reshape(t))
        parts["terminals"].append(terminals)
        parts["timeouts"].append(timeouts)
    if not parts["observations"]:
        raise ValueError(f"{source} holds no episodes with steps")
    if n_forced:
        logger.info("%s: %d episode(s) ended without a flag; marked as timeouts", source, n_forced)
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def read_minari(dataset_id_or_path: str | os.PathLike, use_minari: bool | None = None) -> dict[str, Any]:
    """Read a local Minari dataset into the D4RL layout.

    Args:
        dataset_id_or_path: a dataset id (under ``$MINARI_DATASETS_PATH``), a dataset folder or its ``data``
            folder.
        use_minari: True to require the ``minari`` package, False to use the fallback h5py reader, None
            (default) to use minari when importable.

    Returns:
        Flat dict (see :mod:`.datasets`): ``observations`` (N, obs_dim) f32, ``actions`` (N, act_dim) f32,
        ``rewards`` (N,) f32, ``terminals`` (N,) bool, ``timeouts`` (N,) bool, ``next_observations``
        (N, obs_dim) f32 and ``metadata`` (dict: ``source="minari"``, ``reader``, and the JSON-able entries of
        Minari's ``metadata.json``).

    Raises:
        FileNotFoundError: dataset not found locally.
        ImportError: ``use_minari=True`` without minari installed.
    """
    from .datasets import validate_dataset

    data_dir, dataset_id = resolve_minari_data_dir(dataset_id_or_path)
    with open(data_dir / METADATA_FILE) as fh:
        raw_meta = json.load(fh)
    if use_minari is None:
        use_minari = _minari_available()
    if use_minari:
        episodes = _iter_episodes_minari(data_dir, dataset_id)
    else:
        episodes = _iter_episodes_fallback(data_dir, raw_meta)
    source = f"Minari dataset {dataset_id or data_dir}"
    data: dict[str, Any] = _episodes_to_d4rl(episodes, source)
    validate_dataset(data, source=source)
    meta = {k: v for k, v in raw_meta.items() if isinstance(v, (str, int, float, bool)) or v is None}
    meta.update({"source": "minari", "reader": "minari" if use_minari else "h5py-fallback", "path": str(data_dir)})
    data["metadata"] = meta
    return data


# --------------------------------------------------------------------------------------------------------------
# Writing small local datasets (tests, fixtures)


def _box_json(arr: np.ndarray, low: float, high: float) -> str:
    shape = list(arr.shape[1:])
    dtype = str(arr.dtype)
    return json.dumps(
        {
            "type": "Box",
            "dtype": dtype,
            "shape": shape,
            "low": np.full(shape, low, dtype=np.float64).tolist(),
            "high": np.full(shape, high, dtype=np.float64).tolist(),
        }
    )


@contextlib.contextmanager
def _minari_root_env(root: Path) -> Iterator[None]:
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def write_minari_fixture(
    root: str | os.PathLike,
    dataset_id: str,
    episodes: Sequence[Mapping[str, Any]],
    use_minari: bool | None = None,
    algorithm_name: str = "fixture",
) -> Path:
    """Create a small local Minari dataset (HDF5 storage).

    Args:
        root: Minari dataset root (what ``MINARI_DATASETS_PATH`` would point to).
        dataset_id: e.g. ``"test/hopper/tiny-v0"``.
        episodes: dicts with ``observations`` (T+1, obs_dim), ``actions`` (T, act_dim), ``rewards`` (T,),
            ``terminations`` (T,), ``truncations`` (T,).
        use_minari: True: ``minari.create_dataset_from_buffers``; False: write the on-disk layout directly;
            None: minari when importable.
        algorithm_name: stored in ``metadata.json``.

    Returns:
        The dataset folder ``root/dataset_id`` (its ``data`` folder holds the files).
    """
    root = Path(root)
    if use_minari is None:
        use_minari = _minari_available()
    eps = [{k: np.asarray(v) for k, v in ep.items()} for ep in episodes]
    if not eps:
        raise ValueError("write_minari_fixture needs at least one episode")
    obs0, act0 = eps[0]["observations"], eps[0]["actions"]
    if use_minari:
        import warnings

        import gymnasium as gym
        import minari
        from minari.data_collector.episode_buffer import EpisodeBuffer

        obs_space = gym.spaces.Box(-np.inf, np.inf, obs0.shape[1:], obs0.dtype)
        act_space = gym.spaces.Box(-1.0, 1.0, act0.shape[1:], act0.dtype)
        buffers = [
            EpisodeBuffer(
                observations=ep["observations"],
                actions=ep["actions"],
                rewards=ep["rewards"],
                terminations=ep["terminations"],
                truncations=ep["truncations"],
                infos={},
            )
            for ep in eps
        ]
        with _minari_root_env(root), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            minari.create_dataset_from_buffers(
                dataset_id,
                buffers,
                observation_space=obs_space,
                action_space=act_space,
                algorithm_name=algorithm_name,
                author="namm-transfer tests",
                author_email="none",
                code_permalink="none",
                description="test fixture",
                data_format="hdf5",
            )
        return root / dataset_id
    return _write_layout(root / dataset_id / "data", dataset_id, eps, obs0, act0, algorithm_name)


def _write_layout(
    data_dir: Path,
    dataset_id: str,
    eps: list[dict[str, np.ndarray]],
    obs0: np.ndarray,
    act0: np.ndarray,
    algorithm_name: str,
) -> Path:
    import h5py

    data_dir.mkdir(parents=True, exist_ok=True)
    total_steps = 0
    with h5py.File(data_dir / MAIN_FILE, "w", track_order=True) as f:
        for i, ep in enumerate(eps):
            group = f.create_group(f"episode_{i}")
            t = len(ep["actions"])
            group.attrs["id"] = i
            group.attrs["total_steps"] = t
            total_steps += t
            for key in ("observations", "actions", "rewards", "terminations", "truncations"):
                arr = ep[key]
                group.create_dataset(key, data=arr, chunks=True, maxshape=(None, *arr.shape[1:]))
            group.create_group("infos")
    metadata = {
        "total_episodes": len(eps),
        "total_steps": total_steps,
        "data_format": "hdf5",
        "jpeg_encoding": True,
        "observation_space": _box_json(obs0, -np.inf, np.inf),
        "action_space": _box_json(act0, -1.0, 1.0),
        "dataset_id": dataset_id,
        "algorithm_name": algorithm_name,
        "minari_version": FALLBACK_MINARI_VERSION,
    }
    with open(data_dir / METADATA_FILE, "w") as fh:
        json.dump(metadata, fh)
    return data_dir.parent
