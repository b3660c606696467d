"""Collect D4RL-style datasets (medium, medium-replay, expert) with a PPO behaviour policy.

Levels (D4RL normalized scores of the behaviour policy, stochastic actions):

- ``medium``: train in rounds until the evaluated score lies in the band (hopper and walker2d 40-60,
  halfcheetah 35-45), then roll that policy out. If training overshoots the band in one round, or the budget
  ends below it, the round whose score was closest to the band is used (with a warning); the metadata records
  the actual score either way.
- ``medium-replay``: every transition the training run saw, from its start up to the round chosen for
  ``medium`` (the D4RL medium-replay analogue, with PPO's on-policy rollouts as the "replay buffer").
- ``expert``: keep training (same run) until the score reaches the expert threshold (hopper and walker2d 100,
  halfcheetah 90) or the budget ends; the best round is used.

All levels of one task share one resumable training run (:class:`.behaviour.BehaviourRun`): re-running
resumes from its last round, and a level whose round is already known is not trained again.

The rollouts use the stochastic policy (``deterministic=False``) so that the data has diversity, store raw
observations, and go to ``cache_dir()/d4rl/{env}-{level}.hdf5`` in the D4RL layout (:mod:`.datasets`) with
metadata: task, level, behaviour policy and its score, training steps, seed, hyperparameters, versions.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .envs import DEFAULT_VERSION, get_env_info

logger = logging.getLogger(__name__)

LEVEL_DEFAULT = "level"
"""Sentinel for ``target_band``: use the level's band."""

DEFAULT_DATASET_STEPS = 1_000_000
"""Transitions per dataset when neither steps nor episodes is given (as in D4RL's medium / expert)."""


@dataclass(frozen=True)
class LevelSpec:
    """How a dataset level is produced.

    Attributes:
        name: ``medium``, ``medium-replay`` or ``expert``.
        milestone: which training milestone it needs (``medium`` or ``expert``).
        bands: per task, the (low, high) D4RL normalized score that ends training.
        max_steps: default training budget (environment steps) of the run.
        select: ``closest`` (round closest to the band) or ``best`` (highest score) when no round is in band.
        replay: the data are the training transitions, not rollouts.
    """

    name: str
    milestone: str
    bands: dict[str, tuple[float, float]]
    max_steps: int
    select: str = "closest"
    replay: bool = False


_MEDIUM_BANDS = {"hopper": (40.0, 60.0), "walker2d": (40.0, 60.0), "halfcheetah": (35.0, 45.0)}
_EXPERT_BANDS = {
    "hopper": (100.0, float("inf")),
    "walker2d": (100.0, float("inf")),
    "halfcheetah": (90.0, float("inf")),
}

LEVELS: dict[str, LevelSpec] = {
    "medium": LevelSpec("medium", "medium", _MEDIUM_BANDS, max_steps=1_500_000),
    "medium-replay": LevelSpec("medium-replay", "medium", _MEDIUM_BANDS, max_steps=1_500_000, replay=True),
    "expert": LevelSpec("expert", "expert", _EXPERT_BANDS, max_steps=3_000_000, select="best"),
}

DEFAULT_ROUND_STEPS = 20_480
"""Training steps between evaluations (40 PPO rollouts of 512 steps)."""


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("namm-transfer", "gymnasium", "mujoco", "stable-baselines3", "torch", "numpy", "h5py"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def _band_distance(score: float, band: tuple[float, float]) -> float:
    lo, hi = band
    return max(lo - score, 0.0, score - hi)


def _in_band(score: float, band: tuple[float, float]) -> bool:
    return band[0] <= score <= band[1]


def train_to_level(
    run: Any,
    spec: LevelSpec,
    target_band: tuple[float, float] | None,
    max_steps: int,
    round_steps: int = DEFAULT_ROUND_STEPS,
    eval_episodes: int = 10,
) -> dict[str, Any]:
    """Train ``run`` in rounds until a round's score lies in ``target_band`` or ``max_steps`` is spent.

    Args:
        run: a :class:`.behaviour.BehaviourRun`.
        spec: the level (its ``select`` rule picks the round when no round is in band).
        target_band: (low, high) D4RL normalized score; None trains exactly to ``max_steps`` and uses the last
            round.
        max_steps: training budget of the whole run, in environment steps.
        round_steps: steps per round.
        eval_episodes: evaluation episodes per round.

    Returns:
        The chosen history entry plus ``in_band`` (bool) and ``target_band``.
    """
    if target_band is None:
        while run.timesteps < max_steps or not run.history:
            run.train_round(max(1, min(round_steps, max_steps - run.timesteps)), eval_episodes)
        return {**run.history[-1], "in_band": None, "target_band": None}

    band = (float(target_band[0]), float(target_band[1]))
    known = run.milestones.get(spec.milestone)
    if (
        known is not None
        and known.get("target_band") == list(band)
        and (known.get("in_band") or known.get("max_steps", 0) >= max_steps)
    ):
        logger.info("%s: using the %s milestone found earlier (round %d)", run.env_name, spec.milestone, known["round"])
        return known

    def choose() -> dict[str, Any] | None:
        hits = [e for e in run.history if _in_band(e["score_mean"], band)]
        if hits:
            return {
                **(hits[0] if spec.select == "closest" else max(hits, key=lambda e: e["score_mean"])),
                "in_band": True,
            }
        return None

    def overshot() -> bool:  # above the band: more training only moves away from it
        return bool(run.history) and spec.select == "closest" and run.history[-1]["score_mean"] > band[1]

    chosen = choose()
    while chosen is None and run.timesteps < max_steps and not overshot():
        entry = run.train_round(min(round_steps, max_steps - run.timesteps), eval_episodes)
        if _in_band(entry["score_mean"], band):
            chosen = {**entry, "in_band": True}
    if chosen is None:
        if not run.history:
            run.train_round(min(round_steps, max(max_steps, 1)), eval_episodes)
        if spec.select == "best":
            best = max(run.history, key=lambda e: e["score_mean"])
        else:
            best = min(run.history, key=lambda e: _band_distance(e["score_mean"], band))
        chosen = {**best, "in_band": _in_band(best["score_mean"], band)}
        logger.warning(
            "%s: no round reached the %s band %s within %d steps; using round %d (score %.1f)",
            run.env_name,
            spec.milestone,
            band,
            run.timesteps,
            best["round"],
            best["score_mean"],
        )
    chosen = {**chosen, "target_band": list(band), "max_steps": int(max_steps)}
    run.set_milestone(spec.milestone, chosen)
    return chosen


def collect(
    env_name: str,
    level: str = "medium",
    steps: int | None = None,
    episodes: int | None = None,
    seed: int = 0,
    version: str = DEFAULT_VERSION,
    out: str | os.PathLike | None = None,
    algo: str = "ppo",
    *,
    max_steps: int | None = None,
    target_band: Any = LEVEL_DEFAULT,
    round_steps: int = DEFAULT_ROUND_STEPS,
    eval_episodes: int = 10,
    max_episode_steps: int | None = None,
    run_dir: str | os.PathLike | None = None,
    n_envs: int = 8,
    torch_threads: int | None = None,
    ppo_config: Any = None,
) -> Path:
    """Train (or resume) a behaviour policy to ``level`` and write its dataset in the D4RL HDF5 layout.

    Args:
        env_name: ``hopper``, ``halfcheetah`` or ``walker2d``.
        level: ``medium`` (default), ``medium-replay`` or ``expert`` (see the module docstring).
        steps: transitions to collect (rollout levels); default 1,000,000 unless ``episodes`` is given.
        episodes: episodes to collect (rollout levels); with ``steps`` too, whichever comes first.
        seed: training and rollout seed.
        version: Gymnasium version (``v5`` or ``v4``).
        out: output file (default :func:`.datasets.dataset_path`).
        algo: behaviour-policy algorithm; only ``ppo``.
        max_steps: training budget of the run in env steps (default: the level's, 1.5M medium, 3M expert).
        target_band: (low, high) normalized-score band that ends training; default the level's; None trains
            exactly ``max_steps`` and uses the final policy (for smoke tests).
        round_steps: training steps between evaluations.
        eval_episodes: evaluation episodes per round.
        max_episode_steps: cap on the length of collected episodes (default 1000).
        run_dir: training run folder (default ``cache_dir()/behaviour/...``).
        n_envs: environments stepped together during rollouts.
        torch_threads: if given, ``torch.set_num_threads`` for the call, restored afterwards (the CLI uses 1 to
            leave cores free).
        ppo_config: a :class:`.behaviour.PPOConfig` for a new run (default ``PPO_CONFIGS[env]``).

    Returns:
        The path of the written dataset.
    """
    from .behaviour import BehaviourRun, run_episodes
    from .datasets import dataset_path, split_trajectories, write_d4rl_hdf5

    info = get_env_info(env_name)
    if level not in LEVELS:
        raise ValueError(f"unknown dataset level {level!r}; known levels: {sorted(LEVELS)}")
    if algo != "ppo":
        raise ValueError(
            f"unknown behaviour algorithm {algo!r}; only 'ppo' is implemented (SAC runs at ~96 steps/s here)"
        )
    spec = LEVELS[level]
    band = spec.bands[info.name] if isinstance(target_band, str) and target_band == LEVEL_DEFAULT else target_band
    budget = int(max_steps if max_steps is not None else spec.max_steps)
    if torch_threads is not None:
        import torch

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(torch_threads)
        try:
            return collect(
                env_name,
                level,
                steps,
                episodes,
                seed,
                version,
                out,
                algo,
                max_steps=max_steps,
                target_band=target_band,
                round_steps=round_steps,
                eval_episodes=eval_episodes,
                max_episode_steps=max_episode_steps,
                run_dir=run_dir,
                n_envs=n_envs,
                torch_threads=None,
                ppo_config=ppo_config,
            )
        finally:
            torch.set_num_threads(previous_threads)
    t0 = time.time()
    run = BehaviourRun(info.name, version, seed, run_dir=run_dir, config=ppo_config)
    chosen = train_to_level(run, spec, band, budget, round_steps=round_steps, eval_episodes=eval_episodes)
    path = Path(out) if out is not None else dataset_path(info.name, level, version)
    behaviour_path = run.snapshot_path(chosen["snapshot"])

    if spec.replay:
        data = run.replay_transitions(chosen["round"])
        source = "training transitions (PPO rollouts) from the start of training up to the medium policy"
        n_rollout_episodes = None
    else:
        if steps is None and episodes is None:
            steps = DEFAULT_DATASET_STEPS
        policy = run.load_snapshot(chosen["snapshot"])
        logger.info(
            "%s-%s: rolling out %s (score %.1f) for %s",
            info.name,
            level,
            chosen["snapshot"],
            chosen["score_mean"],
            f"{steps} steps" if episodes is None else f"{episodes} episodes",
        )
        res = run_episodes(
            policy,
            info.name,
            version,
            episodes=episodes,
            steps=steps,
            seed=seed + 100_000,
            deterministic=False,
            n_envs=n_envs,
            max_episode_steps=max_episode_steps,
            record=True,
        )
        data = {k: np.concatenate([ep[k] for ep in res.episodes], axis=0) for k in res.episodes[0]}
        if steps is not None and len(data["rewards"]) > steps:
            data = {k: v[:steps] for k, v in data.items()}  # trailing partial episode, as in D4RL
        source = "rollouts of the stochastic behaviour policy"
        n_rollout_episodes = len(res.episodes)

    trajs = split_trajectories(data)
    returns = np.array([float(t["rewards"].sum(dtype=np.float64)) for t in trajs])
    scores = info.normalized_score(returns)
    metadata = {
        "env_name": info.name,
        "level": level,
        "dataset_name": f"{info.name}-{level}",
        "gym_id": info.gym_id(version),
        "gym_version": version,
        "format": "d4rl-hdf5",
        "data_source": source,
        "behaviour_policy": f"stable-baselines3 {algo.upper()} (MlpPolicy, VecNormalize observations)",
        "behaviour_policy_path": str(behaviour_path),
        "behaviour_deterministic": False,
        "behaviour_round": int(chosen["round"]),
        "behaviour_return_mean": float(chosen["return_mean"]),
        "behaviour_score_mean": float(chosen["score_mean"]),
        "behaviour_score_std": float(chosen["score_std"]),
        "behaviour_eval_episodes": int(chosen.get("eval_episodes", eval_episodes)),
        "behaviour_in_target_band": chosen.get("in_band"),
        "target_band": None if band is None else [float(band[0]), float(band[1])],
        "training_timesteps": int(chosen["timesteps"]),
        "training_budget": budget,
        "training_run_dir": str(run.dir),
        "ppo_hyperparameters": run.config.to_dict(),
        "seed": int(seed),
        "rollout_seed": None if spec.replay else int(seed + 100_000),
        "rollout_episodes": n_rollout_episodes,
        "max_episode_steps": int(max_episode_steps or info.max_ep_len),
        "num_transitions": int(len(data["rewards"])),
        "num_trajectories": len(trajs),
        "dataset_return_mean": float(returns.mean()),
        "dataset_score_mean": float(scores.mean()),
        "dataset_score_std": float(scores.std()),
        "ref_min_score": info.ref_min,
        "ref_max_score": info.ref_max,
        "package_versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "collect_seconds": round(time.time() - t0, 1),
    }
    write_d4rl_hdf5(path, data, metadata)
    logger.info(
        "%s-%s: %d transitions, %d trajectories, dataset score %.1f +- %.1f -> %s",
        info.name,
        level,
        metadata["num_transitions"],
        len(trajs),
        metadata["dataset_score_mean"],
        metadata["dataset_score_std"],
        path,
    )
    return path
