"""Behaviour policies for data collection: Stable-Baselines3 PPO trained in resumable rounds.

A *run* is one PPO training run per (task, Gymnasium version, algorithm, seed), kept in a folder under
``cache_dir()/behaviour/{env}-{version}-ppo-seed{seed}/``:

==================================  ===========================================================================
``latest.safetensors``              policy weights and Adam state of the PPO model: training resumes from it
``latest.json``                     timestep and update counts, VecNormalize statistics, optimizer settings
``snapshots/round_KKKK.safetensors`` policy-only weights after round K
``snapshots/round_KKKK.json``       what rebuilds that policy (PPO settings, spaces) and its normalization
``transitions/round_KKKK.npz``      every environment transition of round K (raw observations), for medium-replay
``history.json``                    one entry per round: timesteps, evaluation return / normalized score, snapshot
``milestones.json``                 which snapshot serves which level (``medium``, ``expert``)
==================================  ===========================================================================

Nothing is pickled: stable-baselines3's own ``save`` / ``load`` (and ``VecNormalize``'s) pickle Python objects,
and unpickling a file can run code, so the run keeps tensors in safetensors and everything else in JSON, and
rebuilds the PPO model, its policy and its normalization from them. Run folders written by earlier versions in
SB3's format (``latest.zip``, ``*.pkl``) are refused with a message rather than unpickled.

Observations fed to the policy are normalized with SB3's ``VecNormalize`` (running mean/variance, clipped at
10); everything stored in datasets is the RAW observation, and every snapshot carries its normalization
statistics so that :class:`BehaviourPolicy` maps raw observations to actions.

PPO hyperparameters (:data:`PPO_CONFIGS`) are the tuned MuJoCo values published in rl-baselines3-zoo
(``hyperparams/ppo.yml``, Hopper / HalfCheetah / Walker2d v3-v4 entries; ``normalize: true``, one env,
constant learning rate); they reach roughly 2,400 (Hopper), 5,800 (HalfCheetah) and 3,500 (Walker2d)
returns within 1M steps there.

Importing this module is cheap; torch, gymnasium and stable-baselines3 load inside the functions.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .envs import DEFAULT_VERSION, check_observation, get_env_info, make_env

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyperparameters (Stable-Baselines3 names) plus the VecNormalize settings."""

    n_steps: int = 2048
    """environment steps per rollout (one env), before each update"""
    batch_size: int = 64
    """minibatch size"""
    n_epochs: int = 10
    """passes over each rollout"""
    learning_rate: float = 3e-4
    """Adam learning rate (constant)"""
    gamma: float = 0.99
    """discount (also used by VecNormalize's reward normalization)"""
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    net_arch: tuple[int, ...] = (64, 64)
    """hidden sizes of the separate policy and value MLPs"""
    activation: str = "tanh"
    """``tanh`` or ``relu``"""
    log_std_init: float = 0.0
    ortho_init: bool = True
    normalize_obs: bool = True
    normalize_reward: bool = True
    clip_obs: float = 10.0
    n_envs: int = 1
    """parallel environments (a ``DummyVecEnv``); each rollout is ``n_steps * n_envs`` steps"""

    def sb3_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``stable_baselines3.PPO`` (imports torch for the activation class)."""
        import torch

        activation = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[self.activation]
        return {
            "n_steps": self.n_steps,
            "batch_size": self.batch_size,
            "n_epochs": self.n_epochs,
            "learning_rate": self.learning_rate,
            "gamma": self.gamma,
            "gae_lambda": self.gae_lambda,
            "clip_range": self.clip_range,
            "ent_coef": self.ent_coef,
            "vf_coef": self.vf_coef,
            "max_grad_norm": self.max_grad_norm,
            "policy_kwargs": {
                "net_arch": {"pi": list(self.net_arch), "vf": list(self.net_arch)},
                "activation_fn": activation,
                "log_std_init": self.log_std_init,
                "ortho_init": self.ortho_init,
            },
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of all fields."""
        d = asdict(self)
        d["net_arch"] = list(self.net_arch)
        return d


def _zoo_large(**kwargs: Any) -> PPOConfig:
    """rl-zoo's larger-policy variant: separate 256x256 ReLU MLPs, initial log std -2, no orthogonal init."""
    return PPOConfig(net_arch=(256, 256), activation="relu", log_std_init=-2.0, ortho_init=False, **kwargs)


ZOO_PPO_CONFIGS: dict[str, PPOConfig] = {
    "hopper": _zoo_large(
        n_steps=512, batch_size=32, n_epochs=5, learning_rate=9.80828e-05, gamma=0.999, gae_lambda=0.99,
        clip_range=0.2, ent_coef=0.00229519, vf_coef=0.835671, max_grad_norm=0.7,
    ),
    "halfcheetah": _zoo_large(
        n_steps=512, batch_size=64, n_epochs=20, learning_rate=2.0633e-05, gamma=0.98, gae_lambda=0.92,
        clip_range=0.1, ent_coef=0.000401762, vf_coef=0.58096, max_grad_norm=0.8,
    ),
    "walker2d": PPOConfig(
        n_steps=512, batch_size=32, n_epochs=20, learning_rate=5.05041e-05, gamma=0.99, gae_lambda=0.95,
        clip_range=0.1, ent_coef=0.000585045, vf_coef=0.871923, max_grad_norm=1.0,
    ),
}  # fmt: skip
"""rl-baselines3-zoo's tuned PPO settings per task (see the module docstring): one env, small minibatches."""


def _fast(**kwargs: Any) -> PPOConfig:
    """SB3's default MuJoCo PPO (64x64 tanh, lr 3e-4, 10 epochs) on 8 envs with 256-step minibatches."""
    return PPOConfig(n_envs=8, n_steps=256, batch_size=256, **kwargs)


FAST_PPO_CONFIGS: dict[str, PPOConfig] = {
    "hopper": _fast(),
    "halfcheetah": _fast(gamma=0.98, gae_lambda=0.92),
    "walker2d": _fast(),
}
"""The default: about 1,500 steps/s on one CPU core (the zoo settings run 70-300 steps/s here)."""

PPO_PRESETS: dict[str, dict[str, PPOConfig]] = {"fast": FAST_PPO_CONFIGS, "zoo": ZOO_PPO_CONFIGS}
"""Named PPO setting families (``namm-transfer rl collect --ppo``)."""

PPO_CONFIGS = FAST_PPO_CONFIGS
"""The default PPO settings per task."""


def _config_from_dict(d: dict[str, Any]) -> PPOConfig:
    """A :class:`PPOConfig` from :meth:`PPOConfig.to_dict` output (unknown keys are an error)."""
    return PPOConfig(**{**d, "net_arch": tuple(d["net_arch"])})


def default_run_dir(env_name: str, version: str = DEFAULT_VERSION, seed: int = 0, algo: str = "ppo") -> Path:
    """``cache_dir()/behaviour/{env}-{version}-{algo}-seed{seed}``."""
    from .datasets import cache_dir

    return cache_dir() / "behaviour" / f"{get_env_info(env_name).name}-{version}-{algo}-seed{seed}"


# --------------------------------------------------------------------------------------------------------------
# Recording every transition seen in training


def _recorder(env: Any) -> Any:
    """Wrap a Gymnasium env so that every transition is recorded (raw observations, clipped actions)."""
    import gymnasium as gym

    class TransitionRecorder(gym.Wrapper):
        def __init__(self, inner: gym.Env) -> None:
            super().__init__(inner)
            self._obs: np.ndarray | None = None
            self.buffer: dict[str, list[Any]] = self._empty()

        @staticmethod
        def _empty() -> dict[str, list[Any]]:
            keys = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
            return {k: [] for k in keys}

        def reset(self, **kwargs: Any) -> Any:
            obs, info = self.env.reset(**kwargs)
            self._obs = np.array(obs, dtype=np.float32)
            return obs, info

        def step(self, action: Any) -> Any:
            obs, reward, terminated, truncated, info = self.env.step(action)
            nxt = np.array(obs, dtype=np.float32)
            b = self.buffer
            b["observations"].append(self._obs)
            b["actions"].append(np.array(action, dtype=np.float32))
            b["rewards"].append(float(reward))
            b["terminals"].append(bool(terminated))
            b["timeouts"].append(bool(truncated))
            b["next_observations"].append(nxt)
            self._obs = nxt
            return obs, reward, terminated, truncated, info

        def drain(self) -> dict[str, np.ndarray]:
            b, self.buffer = self.buffer, self._empty()
            if not b["rewards"]:
                return {}
            return {
                "observations": np.stack(b["observations"]),
                "actions": np.stack(b["actions"]),
                "rewards": np.asarray(b["rewards"], dtype=np.float32),
                "terminals": np.asarray(b["terminals"], dtype=bool),
                "timeouts": np.asarray(b["timeouts"], dtype=bool),
                "next_observations": np.stack(b["next_observations"]),
            }

    return TransitionRecorder(env)


# --------------------------------------------------------------------------------------------------------------
# A trained policy, mapping raw observations to actions


@dataclass
class BehaviourPolicy:
    """An SB3 actor-critic policy with its observation-normalization statistics.

    Attributes:
        policy: ``stable_baselines3`` ``ActorCriticPolicy``.
        obs_mean, obs_var: (obs_dim,) running statistics from VecNormalize (None: no normalization).
        clip_obs: clip of the normalized observation.
        epsilon: VecNormalize's variance epsilon.
        source: where it was loaded from.
    """

    policy: Any
    obs_mean: np.ndarray | None
    obs_var: np.ndarray | None
    clip_obs: float = 10.0
    epsilon: float = 1e-8
    source: str = ""

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        """Normalize raw observations (batch, obs_dim) as VecNormalize did during training."""
        obs = np.asarray(obs, dtype=np.float32)
        if self.obs_mean is None or self.obs_var is None:
            return obs
        out = (obs - self.obs_mean) / np.sqrt(self.obs_var + self.epsilon)
        return np.clip(out, -self.clip_obs, self.clip_obs).astype(np.float32)

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Actions for raw observations.

        Args:
            obs: (batch, obs_dim) raw observations.
            deterministic: the Gaussian mean instead of a sample.

        Returns:
            (batch, act_dim) float32 actions, clipped to the action bounds.
        """
        actions, _ = self.policy.predict(self.normalize(obs), deterministic=deterministic)
        return np.asarray(actions, dtype=np.float32)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BehaviourPolicy:
        """Load a policy snapshot: ``{name}.safetensors`` (weights) and ``{name}.json`` (PPO settings, spaces and
        normalization, as ``BehaviourRun._save_snapshot`` writes them); ``path`` names either file or their stem.

        Raises:
            FileNotFoundError: no snapshot there.
            ValueError: a snapshot in stable-baselines3's pickle format (earlier versions), which is not loaded.
        """
        from safetensors.torch import load_file

        stem = Path(path)
        if stem.suffix in (".safetensors", ".json", ".zip", ".pkl"):
            stem = stem.with_suffix("")
        weights, meta_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        if not (weights.is_file() and meta_path.is_file()):
            _refuse_pickled(stem.with_suffix(".zip"))
            raise FileNotFoundError(f"no behaviour-policy snapshot at {stem} (.safetensors + .json)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{meta_path} is not a behaviour-policy snapshot of format {SNAPSHOT_FORMAT}")
        policy = _build_policy(meta)
        policy.load_state_dict(load_file(str(weights)), strict=True)
        policy.set_training_mode(False)
        mean = None if meta["obs_mean"] is None else np.asarray(meta["obs_mean"], dtype=np.float32)
        var = None if meta["obs_var"] is None else np.asarray(meta["obs_var"], dtype=np.float32)
        return cls(policy, mean, var, float(meta["clip_obs"]), float(meta["epsilon"]), source=str(weights))


SNAPSHOT_FORMAT = 1
"""Version of the snapshot / resume-state JSON written by :class:`BehaviourRun`."""


def _refuse_pickled(path: Path) -> None:
    """Raise if ``path`` is a file of stable-baselines3's own (pickled) format."""
    if path.is_file():
        raise ValueError(
            f"{path} was saved by an earlier version in stable-baselines3's own format, a pickle, which is not "
            "loaded (unpickling a file can run code). Train the behaviour run again: delete its folder "
            f"({path.parent if path.parent.name != 'snapshots' else path.parent.parent}) or pass another run folder"
        )


def _spaces(observation_space: Any, action_space: Any) -> dict[str, Any]:
    """What rebuilds a policy's spaces: the flat observation size and the action bounds."""
    return {
        "obs_dim": int(np.prod(observation_space.shape)),
        "act_low": np.asarray(action_space.low, dtype=np.float64).tolist(),
        "act_high": np.asarray(action_space.high, dtype=np.float64).tolist(),
    }


def _build_policy(meta: dict[str, Any]) -> Any:
    """A fresh ``ActorCriticPolicy`` of the architecture ``meta`` describes (PPO settings and spaces), CPU."""
    import gymnasium as gym
    from stable_baselines3.common.policies import ActorCriticPolicy

    cfg = _config_from_dict(meta["config"])
    obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(int(meta["obs_dim"]),), dtype=np.float32)
    act_space = gym.spaces.Box(
        np.asarray(meta["act_low"], dtype=np.float32), np.asarray(meta["act_high"], dtype=np.float32), dtype=np.float32
    )
    return ActorCriticPolicy(
        obs_space, act_space, lr_schedule=lambda _: cfg.learning_rate, **cfg.sb3_kwargs()["policy_kwargs"]
    ).to("cpu")


# --------------------------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Episodes:
    """Completed episodes from :func:`run_episodes`.

    Attributes:
        episodes: per episode, a dict of arrays with T_i rows: ``observations`` (T_i, obs_dim),
            ``actions`` (T_i, act_dim), ``rewards``, ``terminals``, ``timeouts``, ``next_observations``,
            ``infos/qpos``, ``infos/qvel`` (only when recorded).
        returns: (num_episodes,) undiscounted returns.
        lengths: (num_episodes,) episode lengths.
    """

    episodes: list[dict[str, np.ndarray]] = field(default_factory=list)
    returns: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def run_episodes(
    policy: BehaviourPolicy,
    env_name: str,
    version: str = DEFAULT_VERSION,
    *,
    episodes: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    deterministic: bool = False,
    n_envs: int = 8,
    max_episode_steps: int | None = None,
    record: bool = True,
) -> Episodes:
    """Roll a policy out in ``n_envs`` environments stepped in lockstep (one batched forward per step).

    Stops after ``episodes`` completed episodes, or once the completed episodes hold at least ``steps``
    transitions (episodes still running then are dropped), whichever comes first.

    Args:
        policy: the behaviour policy.
        env_name, version: the task.
        episodes: number of episodes to complete.
        steps: number of transitions to reach.
        seed: environment i is first reset with ``seed + i``; torch sampling is seeded with ``seed``.
        deterministic: act with the Gaussian mean (False: sample, as a behaviour policy should).
        n_envs: environments stepped together.
        max_episode_steps: episode cap (default: the task's 1000).
        record: keep per-step arrays (False: only returns and lengths, for evaluation).

    Returns:
        :class:`Episodes`, in order of completion.
    """
    import torch

    if episodes is None and steps is None:
        raise ValueError("run_episodes needs episodes or steps")
    n_envs = max(1, min(n_envs, episodes if episodes is not None else n_envs))
    torch.manual_seed(seed)
    kwargs = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}
    envs: list[Any] = [make_env(env_name, version, **kwargs) for _ in range(n_envs)]
    obs = [np.asarray(env.reset(seed=seed + i)[0]) for i, env in enumerate(envs)]
    for i, env in enumerate(envs):
        env.action_space.seed(seed + i)
    started = n_envs
    bufs: list[dict[str, list[Any]]] = [_new_buf() for _ in range(n_envs)]
    ep_return = np.zeros(n_envs)
    ep_len = np.zeros(n_envs, dtype=np.int64)
    active = list(range(n_envs))
    out = Episodes()
    returns: list[float] = []
    lengths: list[int] = []
    done_steps = 0

    def finished() -> bool:
        return (episodes is not None and len(returns) >= episodes) or (steps is not None and done_steps >= steps)

    try:
        while active and not finished():
            batch = np.stack([obs[i] for i in active]).astype(np.float32)
            actions = policy.act(batch, deterministic=deterministic)
            still: list[int] = []
            for j, i in enumerate(active):
                env = envs[i]
                if record:
                    data = env.unwrapped.data  # MuJoCo MjData: the state before the action
                    bufs[i]["infos/qpos"].append(np.array(data.qpos, dtype=np.float32))
                    bufs[i]["infos/qvel"].append(np.array(data.qvel, dtype=np.float32))
                nxt, reward, terminated, truncated, _ = env.step(actions[j])
                nxt = check_observation(nxt, step=int(ep_len[i]), env_name=env_name)
                ep_return[i] += float(reward)
                ep_len[i] += 1
                if record:
                    b = bufs[i]
                    b["observations"].append(np.asarray(obs[i], dtype=np.float32))
                    b["actions"].append(actions[j])
                    b["rewards"].append(float(reward))
                    b["terminals"].append(bool(terminated))
                    b["timeouts"].append(bool(truncated))
                    b["next_observations"].append(np.asarray(nxt, dtype=np.float32))
                obs[i] = nxt
                if terminated or truncated:
                    returns.append(float(ep_return[i]))
                    lengths.append(int(ep_len[i]))
                    done_steps += int(ep_len[i])
                    if record:
                        out.episodes.append(_stack_buf(bufs[i]))
                        bufs[i] = _new_buf()
                    ep_return[i], ep_len[i] = 0.0, 0
                    if finished() or (episodes is not None and started >= episodes):
                        continue  # this env retires
                    obs[i] = np.asarray(env.reset()[0])
                    started += 1
                still.append(i)
            active = still
    finally:
        for env in envs:
            env.close()
    out.returns = np.asarray(returns)
    out.lengths = np.asarray(lengths, dtype=np.int64)
    return out


def _new_buf() -> dict[str, list[Any]]:
    keys = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    return {k: [] for k in (*keys, "infos/qpos", "infos/qvel")}


def _stack_buf(b: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in b.items():
        if k == "rewards":
            out[k] = np.asarray(v, dtype=np.float32)
        elif k in ("terminals", "timeouts"):
            out[k] = np.asarray(v, dtype=bool)
        else:
            out[k] = np.stack(v).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------------------------
# A resumable training run


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


class BehaviourRun:
    """One resumable PPO training run (see the module docstring for its folder layout).

    Args:
        env_name: task.
        version: Gymnasium version.
        seed: training seed.
        run_dir: folder of the run (default :func:`default_run_dir`).
        config: PPO settings (default ``PPO_CONFIGS[env]``); a resumed run keeps the saved model's settings.
        record: record every training transition (for medium-replay datasets).
    """

    def __init__(
        self,
        env_name: str,
        version: str = DEFAULT_VERSION,
        seed: int = 0,
        run_dir: str | os.PathLike | None = None,
        config: PPOConfig | None = None,
        record: bool = True,
    ) -> None:
        self.info = get_env_info(env_name)
        self.env_name = self.info.name
        self.version = version
        self.info.gym_id(version)  # validates the version
        self.seed = seed
        self.dir = Path(run_dir) if run_dir is not None else default_run_dir(env_name, version, seed)
        saved = self._load_json("config.json", None) if config is None else None
        self.config = config or (_config_from_dict(saved) if saved else PPO_CONFIGS[self.env_name])
        self.record = record
        self.model: Any = None
        self.venv: Any = None
        self._recorders: list[Any] = []
        self.history: list[dict[str, Any]] = self._load_json("history.json", [])
        self.milestones: dict[str, Any] = self._load_json("milestones.json", {})

    # paths -------------------------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        """The PPO model's weights and optimizer state (its counts and normalization: :attr:`state_path`)."""
        return self.dir / "latest.safetensors"

    @property
    def state_path(self) -> Path:
        return self.dir / "latest.json"

    def snapshot_path(self, tag: str) -> Path:
        """Policy-only snapshot ``snapshots/{tag}.safetensors`` (what rebuilds it: the same name with ``.json``)."""
        return self.dir / "snapshots" / f"{tag}.safetensors"

    def transitions_path(self, round_index: int) -> Path:
        return self.dir / "transitions" / f"round_{round_index:04d}.npz"

    def _load_json(self, name: str, default: Any) -> Any:
        path = self.dir / name
        if path.is_file():
            return json.loads(path.read_text())
        return default

    @property
    def timesteps(self) -> int:
        """Environment steps trained so far."""
        if self.model is not None:
            return int(self.model.num_timesteps)
        return int(self.history[-1]["timesteps"]) if self.history else 0

    # model -------------------------------------------------------------------------------------------------
    def _make_venv(self) -> Any:
        from stable_baselines3.common.vec_env import DummyVecEnv

        self._recorders = []

        def factory() -> Any:
            env = make_env(self.env_name, self.version)
            if self.record:
                env = _recorder(env)
                self._recorders.append(env)
            return env

        return DummyVecEnv([factory] * max(1, self.config.n_envs))

    def load_or_create(self) -> None:
        """Rebuild the PPO model from ``latest.safetensors`` + ``latest.json`` to resume, or create a fresh one."""
        from stable_baselines3 import PPO
        from stable_baselines3.common.logger import Logger
        from stable_baselines3.common.vec_env import VecNormalize

        if self.model is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        resume = self.model_path.is_file() and self.state_path.is_file()
        state: dict[str, Any] = {}
        if resume:
            state = self._read_state()
            saved = _config_from_dict(state["config"])
            if saved != self.config:  # the saved model's architecture and settings win, as SB3's load did
                logger.warning("%s: the saved run used other PPO settings; continuing with the saved model", self.dir)
                self.config = saved
        else:
            _refuse_pickled(self.dir / "latest.zip")
        cfg = self.config
        self.venv = VecNormalize(
            self._make_venv(),
            norm_obs=cfg.normalize_obs,
            norm_reward=cfg.normalize_reward,
            clip_obs=cfg.clip_obs,
            gamma=cfg.gamma,
        )
        # seeded as a new model (seed) or as a resumed one (seed + rounds done), as before; a resumed model's weights
        # are then replaced by the saved ones
        self.model = PPO(
            "MlpPolicy",
            self.venv,
            seed=self.seed + (len(self.history) if resume else 0),
            device="cpu",
            verbose=0,
            **cfg.sb3_kwargs(),
        )
        if resume:
            self._restore(state)
            logger.info(
                "%s: resumed PPO run %s at %d steps (%d rounds)",
                self.env_name,
                self.dir,
                self.model.num_timesteps,
                len(self.history),
            )
        else:
            _write_json(self.dir / "config.json", cfg.to_dict())
            if self.history:
                logger.warning("%s: history without a model; starting the run over", self.dir)
                self.history = []
            logger.info("%s: new PPO run in %s", self.env_name, self.dir)
        # A logger with no outputs: without one, every learn() call makes an empty /tmp/SB3-<time> folder.
        self.model.set_logger(Logger(folder=None, output_formats=[]))

    def current_policy(self) -> BehaviourPolicy:
        """The model's current policy with the current normalization statistics."""
        self.load_or_create()
        rms = self.venv.obs_rms if self.config.normalize_obs else None
        return BehaviourPolicy(
            self.model.policy,
            None if rms is None else np.asarray(rms.mean, dtype=np.float32),
            None if rms is None else np.asarray(rms.var, dtype=np.float32),
            float(self.venv.clip_obs),
            float(self.venv.epsilon),
            source=str(self.model_path),
        )

    def _policy_meta(self) -> dict[str, Any]:
        return {
            "format": SNAPSHOT_FORMAT,
            "env": self.env_name,
            "version": self.version,
            "config": self.config.to_dict(),
            **_spaces(self.model.policy.observation_space, self.model.policy.action_space),
        }

    def _save_snapshot(self, tag: str) -> Path:
        from safetensors.torch import save_file

        path = self.snapshot_path(tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        rms = self.venv.obs_rms if self.config.normalize_obs else None
        save_file({k: v.detach().cpu().contiguous() for k, v in self.model.policy.state_dict().items()}, str(path))
        meta = {
            **self._policy_meta(),
            "obs_mean": None if rms is None else np.asarray(rms.mean, dtype=np.float64).tolist(),
            "obs_var": None if rms is None else np.asarray(rms.var, dtype=np.float64).tolist(),
            "clip_obs": float(self.venv.clip_obs),
            "epsilon": float(self.venv.epsilon),
            "timesteps": self.timesteps,
        }
        _write_json(path.with_suffix(".json"), meta)
        return path

    def _save_state(self) -> None:
        """The PPO model's state for resuming: weights and Adam state (safetensors), the rest in JSON."""
        from safetensors.torch import save_file

        from namm_transfer.run_folder import optimizer_to_flat, sha256_file

        opt_tensors, opt_meta = optimizer_to_flat(self.model.policy.optimizer)
        tensors = {f"policy.{k}": v.detach().cpu().contiguous() for k, v in self.model.policy.state_dict().items()}
        tensors.update({f"optimizer.{k}": v for k, v in opt_tensors.items()})
        tmp = self.model_path.with_suffix(".safetensors.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.model_path)

        def rms(r: Any) -> dict[str, Any]:
            return {"mean": np.asarray(r.mean, np.float64).tolist(), "var": np.asarray(r.var, np.float64).tolist(),
                    "count": float(r.count)}  # fmt: skip

        _write_json(
            self.state_path,
            {
                **self._policy_meta(),
                "num_timesteps": int(self.model.num_timesteps),
                "n_updates": int(self.model._n_updates),
                "optimizer": opt_meta,
                "obs_rms": rms(self.venv.obs_rms),
                "ret_rms": rms(self.venv.ret_rms),
                "weights_sha256": sha256_file(self.model_path),
            },
        )

    def _read_state(self) -> dict[str, Any]:
        """``latest.json``, checked against the weights file it describes."""
        from namm_transfer.run_folder import sha256_file

        state: dict[str, Any] = json.loads(self.state_path.read_text())
        if state.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{self.state_path} is not a behaviour-run state of format {SNAPSHOT_FORMAT}")
        if state.get("weights_sha256") != sha256_file(self.model_path):
            raise ValueError(
                f"{self.model_path} does not belong to {self.state_path} (interrupted while saving?); delete the run "
                f"folder {self.dir} to train it again"
            )
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        """Load :meth:`_save_state`'s files (``state``: the checked ``latest.json``) into the freshly built model and
        VecNormalize."""
        from safetensors.torch import load_file

        from namm_transfer.run_folder import optimizer_from_flat

        tensors = load_file(str(self.model_path))
        self.model.policy.load_state_dict(
            {k[len("policy.") :]: v for k, v in tensors.items() if k.startswith("policy.")}, strict=True
        )
        optimizer_from_flat(
            self.model.policy.optimizer,
            {k[len("optimizer.") :]: v for k, v in tensors.items() if k.startswith("optimizer.")},
            state["optimizer"],
        )
        self.model.num_timesteps = int(state["num_timesteps"])
        self.model._n_updates = int(state["n_updates"])
        for name in ("obs_rms", "ret_rms"):
            r, saved = getattr(self.venv, name), state[name]
            r.mean = np.asarray(saved["mean"], dtype=np.float64).reshape(np.shape(r.mean))
            r.var = np.asarray(saved["var"], dtype=np.float64).reshape(np.shape(r.var))
            r.count = float(saved["count"])

    def load_snapshot(self, tag: str) -> BehaviourPolicy:
        """Load a saved snapshot (e.g. ``round_0012``) as a :class:`BehaviourPolicy`."""
        return BehaviourPolicy.load(self.snapshot_path(tag))

    # training ----------------------------------------------------------------------------------------------
    def train_round(self, steps: int, eval_episodes: int = 10) -> dict[str, Any]:
        """Train for about ``steps`` more environment steps (whole PPO rollouts), then evaluate and save.

        Saves the recorded transitions, a policy snapshot ``round_KKKK``, the full model and the history.

        Returns:
            The history entry: ``round``, ``timesteps``, ``return_mean``/``return_std``, ``score_mean``/
            ``score_std`` (D4RL normalized, stochastic policy), ``eval_length_mean``, ``steps_per_s``,
            ``snapshot``.
        """
        self.load_or_create()
        k = len(self.history)
        t0 = time.time()
        start = self.model.num_timesteps
        self.model.learn(total_timesteps=steps, reset_num_timesteps=False, progress_bar=False)
        train_s = time.time() - t0
        chunks = [c for c in (r.drain() for r in self._recorders) if c]
        if chunks:  # env after env: replay_transitions marks the seams as timeouts
            chunk = {key: np.concatenate([c[key] for c in chunks], axis=0) for key in chunks[0]}
            if chunk:
                path = self.transitions_path(k)
                path.parent.mkdir(parents=True, exist_ok=True)
                arrays: Any = chunk  # numpy's stub binds ** to its allow_pickle flag (added in numpy 2.x)
                np.savez_compressed(path, **arrays)
        ev = self.evaluate(eval_episodes, seed=self.seed * 1_000_003 + 7_919 * (k + 1))
        tag = f"round_{k:04d}"
        self._save_snapshot(tag)
        self._save_state()
        entry = {
            "round": k,
            "timesteps": int(self.model.num_timesteps),
            **ev,
            "steps_per_s": (self.model.num_timesteps - start) / max(train_s, 1e-9),
            "snapshot": tag,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self.history.append(entry)
        _write_json(self.dir / "history.json", self.history)
        logger.info(
            "%s round %d: %d steps, return %.1f +- %.1f, D4RL score %.1f +- %.1f (len %.0f), %.0f steps/s",
            self.env_name,
            k,
            entry["timesteps"],
            ev["return_mean"],
            ev["return_std"],
            ev["score_mean"],
            ev["score_std"],
            ev["eval_length_mean"],
            entry["steps_per_s"],
        )
        return entry

    def evaluate(self, episodes: int = 10, seed: int = 0, policy: BehaviourPolicy | None = None) -> dict[str, float]:
        """Evaluate the (stochastic) behaviour policy on full-length episodes.

        Returns:
            ``return_mean``, ``return_std``, ``score_mean``, ``score_std`` (D4RL normalized),
            ``eval_length_mean``, ``eval_episodes``.
        """
        pol = policy or self.current_policy()
        res = run_episodes(
            pol,
            self.env_name,
            self.version,
            episodes=episodes,
            seed=seed,
            deterministic=False,
            n_envs=episodes,
            record=False,
        )
        scores = self.info.normalized_score(res.returns)
        return {
            "return_mean": float(res.returns.mean()),
            "return_std": float(res.returns.std()),
            "score_mean": float(scores.mean()),
            "score_std": float(scores.std()),
            "eval_length_mean": float(res.lengths.mean()),
            "eval_episodes": int(episodes),
        }

    def set_milestone(self, level: str, entry: dict[str, Any], **extra: Any) -> None:
        """Record that history entry ``entry`` serves ``level``."""
        self.milestones[level] = {**entry, **extra}
        _write_json(self.dir / "milestones.json", self.milestones)

    def replay_transitions(self, up_to_round: int) -> dict[str, np.ndarray]:
        """All recorded training transitions of rounds ``0..up_to_round``, concatenated (D4RL layout).

        Where the stream breaks without an episode end (training resumed in a new process, which resets the
        environment), the last step before the break is marked as a timeout so that episodes stay separate.

        Raises:
            FileNotFoundError: a round's transitions are missing (the run was trained without recording).
        """
        parts = []
        for k in range(up_to_round + 1):
            path = self.transitions_path(k)
            if not path.is_file():
                raise FileNotFoundError(
                    f"training transitions of round {k} are missing ({path}); medium-replay needs a run recorded "
                    "from the start: delete the run folder and collect again"
                )
            with np.load(path) as z:
                parts.append({key: z[key] for key in z.files})
        data = {key: np.concatenate([p[key] for p in parts], axis=0) for key in parts[0]}
        done = data["terminals"] | data["timeouts"]
        breaks = np.flatnonzero(~done[:-1] & np.any(data["next_observations"][:-1] != data["observations"][1:], axis=1))
        if len(breaks):
            data["timeouts"][breaks] = True
            logger.info("replay data: %d episode(s) cut at a resume marked as timeouts", len(breaks))
        return data
