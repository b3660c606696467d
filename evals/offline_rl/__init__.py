"""Offline RL data: D4RL locomotion tasks, D4RL-format datasets, Minari reading, PPO data collection.

Importing this package is cheap: names resolve lazily, and gymnasium, torch, h5py, minari and
stable-baselines3 load only when a function that needs them runs.

Modules: :mod:`.envs` (task constants, ``make_env``, ``normalized_score``), :mod:`.datasets` (D4RL HDF5 layout),
:mod:`.minari_io` (local Minari datasets), :mod:`.behaviour` (resumable PPO behaviour policies),
:mod:`.collect` (dataset collection), :mod:`.cli_collect` (``namm-transfer rl collect``), :mod:`.rollout` (online
evaluation, canonical or cached), :mod:`.train` (Decision Transformer training, resumable checkpoints, ``load_dt``),
:mod:`.cli_train` (``namm-transfer rl train``), :mod:`.run` (``namm-transfer eval --target decision-transformer``).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "ENVS": "envs",
    "EnvInfo": "envs",
    "get_env_info": "envs",
    "make_env": "envs",
    "normalized_score": "envs",
    "check_observation": "envs",
    "DatasetFormatError": "datasets",
    "cache_dir": "datasets",
    "dataset_path": "datasets",
    "write_d4rl_hdf5": "datasets",
    "read_d4rl_hdf5": "datasets",
    "read_metadata": "datasets",
    "validate_dataset": "datasets",
    "split_trajectories": "datasets",
    "dataset_stats": "datasets",
    "read_minari": "datasets",
    "write_minari_fixture": "minari_io",
    "LEVELS": "collect",
    "collect_dataset": "collect",
    "PPO_CONFIGS": "behaviour",
    "BehaviourPolicy": "behaviour",
    "BehaviourRun": "behaviour",
    "CanonicalDT": "rollout",
    "CachedDT": "rollout",
    "run_episodes": "rollout",
    "TrainConfig": "train",
    "TrainResult": "train",
    "TrajectorySampler": "train",
    "build_dt": "train",
    "train_dt": "train",
    "load_dt": "train",
    "resolve_dt": "train",
    "ship_dt": "train",
    "shipped_dt_dir": "train",
    "write_card": "train",
    "latest_checkpoint": "train",
    "EvalSettings": "run",
    "evaluate": "run",
    "summarize_results": "run",
    "plot_results": "run",
}

_ALIASES = {"collect_dataset": "collect"}
"""``collect`` is also the name of the submodule, so the function is exported as ``collect_dataset``."""

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, _ALIASES.get(name, name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
