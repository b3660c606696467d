"""Partially observable locomotion tasks: positions only, velocities removed (``hopper-po``, ...).

The usual POMDP protocol for the D4RL locomotion tasks: the agent sees the joint positions and not the
velocities, so a policy has to infer them from its history (a Decision Transformer from its context, which is
what makes its memory matter). The Gymnasium MuJoCo observation is ``qpos`` without the x position, then
``qvel`` (hopper: 5 + 6 = 11, halfcheetah and walker2d: 8 + 9 = 17); the partially observable observation is its
first ``nq - 1`` entries:

============  ==========  ============  ===========================================
task          full dims   kept dims     kept entries
============  ==========  ============  ===========================================
hopper-po     11          5             ``qpos[1:6]``: z, torso / thigh / leg / foot angles
halfcheetah-po 17         8             ``qpos[1:9]``: z, torso angle, 6 joint angles
walker2d-po   17          8             ``qpos[1:9]``: z, torso angle, 6 joint angles
============  ==========  ============  ===========================================

Two ways to get the same observations, which agree step by step (``tests/test_dt_memory.py``):

* online, :func:`make_po_env` (``make_env("hopper-po")``): the task's env wrapped in
  :class:`PositionOnlyObservation`, a ``gymnasium.ObservationWrapper``;
* offline, :func:`derive_dataset` / :func:`derive_po_file` (``namm-transfer rl derive-po``): a collected
  D4RL-format dataset with ``observations`` and ``next_observations`` cut the same way, every other array
  (actions, rewards, flags, ``infos/*``) unchanged, written to ``dataset_path("hopper-po", level)``
  (``{cache}/d4rl/hopper-po-medium.hdf5``).

The ``-po`` tasks share their base task's Gymnasium id, action space, D4RL reference returns (normalized
scores) and target return; only ``state_dim`` differs. Importing this module is cheap (numpy only); gymnasium
loads inside :func:`make_po_env` and when :class:`PositionOnlyObservation` is first used (the class is built then,
so ``from .pomdp import PositionOnlyObservation`` works but the name is not in ``__all__``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .envs import DEFAULT_VERSION, ENVS, EnvInfo

if TYPE_CHECKING:  # pragma: no cover
    import gymnasium as gym

__all__ = [
    "PO_SUFFIX",
    "POSITION_DIMS",
    "PO_ENVS",
    "po_name",
    "is_partial",
    "base_name",
    "lookup",
    "mask_observations",
    "derive_dataset",
    "derive_po_file",
    "make_po_env",
    "add_arguments",
    "main",
]

logger = logging.getLogger(__name__)

PO_SUFFIX = "po"
"""A partially observable task is named ``{task}-po``."""

POSITION_DIMS: dict[str, int] = {"hopper": 5, "halfcheetah": 8, "walker2d": 8}
"""Kept observation entries per task: ``nq - 1``, the joint positions without the x position."""


def po_name(name: str) -> str:
    """``"hopper"`` -> ``"hopper-po"`` (the base task must be known)."""
    base = ENVS.get(str(name).strip().lower())
    if base is None:
        raise ValueError(f"unknown offline-RL environment {name!r}; known environments: {sorted(ENVS)}")
    return f"{base.name}-{PO_SUFFIX}"


PO_ENVS: dict[str, EnvInfo] = {
    po_name(n): dataclasses.replace(info, name=po_name(n), state_dim=POSITION_DIMS[n]) for n, info in ENVS.items()
}
"""The partially observable tasks by name (``hopper-po``, ``halfcheetah-po``, ``walker2d-po``)."""


def lookup(name: str) -> EnvInfo | None:
    """The partially observable task ``name`` names, or None.

    Accepts ``"hopper-po"``, any capitalisation, and names with a suffix (``"hopper-po-medium"``, ``"Hopper-po-v5"``):
    the first two ``-``-separated parts. ``"hopper"`` and ``"hopper-medium-v2"`` give None.
    """
    key = str(name).strip().lower()
    if key in PO_ENVS:
        return PO_ENVS[key]
    parts = key.split("-")
    return PO_ENVS.get("-".join(parts[:2])) if len(parts) >= 2 else None


def is_partial(name: str) -> bool:
    """Whether ``name`` is a partially observable task (see :func:`lookup`)."""
    return lookup(name) is not None


def base_name(name: str) -> str:
    """The fully observed task of ``name``: ``"hopper-po"`` -> ``"hopper"``; ``"hopper"`` -> ``"hopper"``."""
    from .envs import get_env_info

    info = lookup(name)
    return info.name[: -len(PO_SUFFIX) - 1] if info is not None else get_env_info(name).name


# --------------------------------------------------------------------------------------------------------------
# offline: datasets


def mask_observations(obs: Any, env_name: str) -> np.ndarray:
    """Keep the position entries of full observations of a task.

    Args:
        obs: (..., full_dim) observations of the fully observed task (hopper: 11, others: 17).
        env_name: the task, ``"hopper"`` or ``"hopper-po"`` alike.

    Returns:
        (..., kept_dim) array, ``obs[..., :kept_dim]`` (a copy, same dtype).

    Raises:
        ValueError: when the last dimension is not the full task's observation size (e.g. already masked).
    """
    base = ENVS[base_name(env_name)]
    arr = np.asarray(obs)
    if arr.ndim < 1 or arr.shape[-1] != base.state_dim:
        raise ValueError(
            f"{base.name} observations have {base.state_dim} entries (positions then velocities), got shape "
            f"{arr.shape}; positions-only data is derived from the fully observed dataset"
        )
    return np.array(arr[..., : POSITION_DIMS[base.name]])


def derive_dataset(data: Mapping[str, Any], env_name: str) -> dict[str, Any]:
    """The partially observable version of a D4RL-format dataset (in memory).

    Args:
        data: flat dict in the D4RL layout (:func:`~.datasets.read_d4rl_hdf5`): ``observations`` (N, full_dim),
            optional ``next_observations`` (N, full_dim), other per-step arrays, optional ``metadata`` dict.
        env_name: its task (``"hopper"``).

    Returns:
        A new flat dict: ``observations`` / ``next_observations`` (N, kept_dim) cut by :func:`mask_observations`,
        every other array the same object as in ``data``; ``metadata`` copied with ``env_name`` /
        ``dataset_name`` renamed to the ``-po`` task and ``observation`` / ``observed_dims`` /
        ``derived_from_env`` added.
    """
    from .datasets import METADATA_GROUP, validate_dataset

    validate_dataset(data)
    base = base_name(env_name)
    name = po_name(base)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("observations", "next_observations"):
            out[key] = mask_observations(value, base)
        elif key != METADATA_GROUP:
            out[key] = value
    meta = dict(data.get(METADATA_GROUP) or {})
    level = meta.get("level")
    meta.update(
        env_name=name,
        observation="positions only (qpos without the x position; velocities removed)",
        observed_dims=list(range(POSITION_DIMS[base])),
        derived_from_env=base,
    )
    if level:
        meta["dataset_name"] = f"{name}-{level}"
    out[METADATA_GROUP] = meta
    return out


def derive_po_file(
    source: str | os.PathLike[str] | None = None,
    env_name: str = "hopper",
    level: str = "medium",
    output: str | os.PathLike[str] | None = None,
    version: str = DEFAULT_VERSION,
) -> Path:
    """Derive the positions-only dataset file from a collected D4RL-format file.

    Args:
        source: the fully observed file (default ``dataset_path(env_name, level, version)``, as written by
            ``namm-transfer rl collect``).
        env_name: its task (``"hopper"`` or ``"hopper-po"``).
        level: its level (names the default files).
        output: where to write (default ``dataset_path("{env}-po", level, version)``); written atomically.
        version: Gymnasium version of the default file names.

    Returns:
        The path written. Its metadata also records the source file and its sha256.

    Raises:
        FileNotFoundError: no source file (the message names the command that collects it).
        DatasetFormatError / ValueError: a malformed source, or one of another task.
    """
    from namm_transfer.run_folder import sha256_file

    from .datasets import dataset_path, read_d4rl_hdf5, write_d4rl_hdf5

    base = base_name(env_name)
    src = Path(source).expanduser() if source is not None else dataset_path(base, level, version)
    if not src.is_file():
        raise FileNotFoundError(
            f"dataset {src} does not exist; collect it with `namm-transfer rl collect --env {base} --level {level}` "
            "or pass --input PATH (a D4RL-format HDF5 file of the fully observed task)"
        )
    data = read_d4rl_hdf5(src)
    meta_env = (data.get("metadata") or {}).get("env_name")
    if meta_env and str(meta_env).strip().lower() != base:
        raise ValueError(f"dataset {src} was collected on {meta_env!r}, not {base!r}")
    derived = derive_dataset(data, base)
    derived["metadata"].update(derived_from=str(src), derived_from_sha256=sha256_file(src))
    dst = Path(output).expanduser() if output is not None else dataset_path(po_name(base), level, version)
    if dst.resolve() == src.resolve():
        raise ValueError(f"the output {dst} is the source file; give another --output")
    path = write_d4rl_hdf5(dst, derived)
    logger.info("derived %s (%d positions of %d) -> %s", src, POSITION_DIMS[base], ENVS[base].state_dim, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# online: the env wrapper


@functools.cache
def _wrapper_class() -> type:
    import gymnasium as gym

    class PositionOnlyObservation(gym.ObservationWrapper):
        """Keeps the first ``kept_dim`` entries (the joint positions) of a locomotion task's observation.

        Args:
            env: the fully observed task's env (``make_env("hopper")``), observation shape ``(full_dim,)``.
            env_name: its task (``"hopper"``).

        Raises:
            ValueError: when the env's observation is not the task's default (e.g. made with
                ``exclude_current_positions_from_observation=False``).
        """

        def __init__(self, env: gym.Env, env_name: str) -> None:
            super().__init__(env)
            base = ENVS[base_name(env_name)]
            space = env.observation_space
            if not isinstance(space, gym.spaces.Box) or space.shape != (base.state_dim,):
                raise ValueError(
                    f"{base.name}'s positions-only wrapper needs its default observation of shape "
                    f"({base.state_dim},) (qpos without x, then qvel), got {space}; make the env without "
                    "observation options"
                )
            self.kept_dim = POSITION_DIMS[base.name]
            self.observation_space = gym.spaces.Box(
                low=space.low[: self.kept_dim], high=space.high[: self.kept_dim], dtype=space.dtype
            )

        def observation(self, observation: Any) -> np.ndarray:
            """(full_dim,) -> (kept_dim,): the positions."""
            return np.array(np.asarray(observation)[: self.kept_dim])

    return PositionOnlyObservation


def __getattr__(name: str) -> Any:
    if name == "PositionOnlyObservation":  # built on first use so that importing this module skips gymnasium
        return _wrapper_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_po_env(name: str, version: str = DEFAULT_VERSION, seed: int | None = None, **kwargs: Any) -> gym.Env:
    """The partially observable env of ``name`` (``"hopper-po"`` or ``"hopper"``).

    The base task's :func:`~.envs.make_env` (``kwargs`` go to ``gymnasium.make``), wrapped in
    :class:`PositionOnlyObservation`; with ``seed`` it is reset once with it and its action space seeded, as
    :func:`~.envs.make_env` does. Observations have shape ``(kept_dim,)`` (float64).
    """
    from .envs import make_env

    base = base_name(name)
    env = _wrapper_class()(make_env(base, version=version, **kwargs), base)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


# --------------------------------------------------------------------------------------------------------------
# command line: namm-transfer rl derive-po


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``namm-transfer rl derive-po``."""
    from .envs import VERSIONS

    parser.add_argument(
        "--env", default="hopper", choices=[*ENVS, *PO_ENVS, "all"], help="task, or all three (default hopper)"
    )
    parser.add_argument("--level", default="medium", help="dataset level (default medium)")
    parser.add_argument(
        "--input",
        type=Path,
        default=None,
        help="fully observed D4RL-format .hdf5 file; default $NAMM_TRANSFER_CACHE/d4rl/{env}-{level}.hdf5 "
        "(written by `namm-transfer rl collect`)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output .hdf5 file; default $NAMM_TRANSFER_CACHE/d4rl/{env}-po-{level}.hdf5, where "
        "`namm-transfer rl train --env {env}-po` finds it",
    )
    parser.add_argument("--version", default="v5", choices=list(VERSIONS), help="Gymnasium MuJoCo version (default v5)")
    parser.add_argument("--overwrite", action="store_true", help="derive again even if the output exists")


def main(args: argparse.Namespace) -> int:
    """Derive the positions-only datasets of ``args``; returns the exit code."""
    import sys

    from .datasets import DatasetFormatError, dataset_path

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = list(ENVS) if args.env == "all" else [base_name(args.env)]
    if len(names) > 1 and (args.input is not None or args.output is not None):
        print("error: --input / --output name one file; give --env hopper, halfcheetah or walker2d", file=sys.stderr)
        return 2
    failures = 0
    for name in names:
        target = args.output if args.output is not None else dataset_path(po_name(name), args.level, args.version)
        if Path(target).is_file() and not args.overwrite:
            print(f"{po_name(name)}-{args.level}: {target} exists; kept (pass --overwrite to derive again)")
            continue
        try:
            path = derive_po_file(args.input, name, args.level, args.output, args.version)
        except (ValueError, FileNotFoundError, DatasetFormatError) as exc:
            print(f"error: {po_name(name)}-{args.level}: {exc}", file=sys.stderr)
            failures += 1
            continue
        print(f"{po_name(name)}-{args.level}: {path}")
    return 1 if failures else 0
