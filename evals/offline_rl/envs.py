"""The three D4RL locomotion tasks: Gymnasium ids, sizes, D4RL reference returns, DT target returns.

Importing this module is cheap: gymnasium (and MuJoCo) load only inside :func:`make_env`.

The D4RL normalized score is ``100 * (return - REF_MIN) / (REF_MAX - REF_MIN)`` with D4RL's reference
returns of a random (``REF_MIN``) and an expert (``REF_MAX``) policy; they are the same for the v0, v1 and
v2 datasets.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import gymnasium as gym

logger = logging.getLogger(__name__)

VERSIONS: tuple[str, ...] = ("v5", "v4")
"""Gymnasium MuJoCo versions supported (``v5`` is the default)."""

DEFAULT_VERSION = "v5"


@dataclass(frozen=True)
class EnvInfo:
    """Static facts about one locomotion task.

    Attributes:
        name: short name (``"hopper"``).
        gym_name: Gymnasium id without the version (``"Hopper"``).
        state_dim: observation size (D4RL / Gymnasium default observation, x position excluded).
        act_dim: action size; actions lie in ``[-1, 1]``.
        ref_min: D4RL REF_MIN return (random policy).
        ref_max: D4RL REF_MAX return (expert policy).
        target_return: return-to-go the Decision Transformer paper conditions on at evaluation.
        max_ep_len: episode length limit (steps).
    """

    name: str
    gym_name: str
    state_dim: int
    act_dim: int
    ref_min: float
    ref_max: float
    target_return: float
    max_ep_len: int = 1000

    def gym_id(self, version: str = DEFAULT_VERSION) -> str:
        """Gymnasium id for ``version`` (``"Hopper-v5"``); raises ValueError for an unknown version."""
        return f"{self.gym_name}-{_check_version(version)}"

    def normalized_score(self, episode_return: Any) -> Any:
        """D4RL normalized score ``100 * (ret - ref_min) / (ref_max - ref_min)`` (float or array)."""
        return 100.0 * (episode_return - self.ref_min) / (self.ref_max - self.ref_min)


ENVS: dict[str, EnvInfo] = {
    "hopper": EnvInfo("hopper", "Hopper", 11, 3, ref_min=-20.272305, ref_max=3234.3, target_return=3600.0),
    "halfcheetah": EnvInfo(
        "halfcheetah", "HalfCheetah", 17, 6, ref_min=-280.178953, ref_max=12135.0, target_return=12000.0
    ),
    "walker2d": EnvInfo("walker2d", "Walker2d", 17, 6, ref_min=1.629008, ref_max=4592.3, target_return=5000.0),
}
"""Known tasks by short name."""

MAX_EPISODE_LENGTH = 1000


def _check_version(version: str) -> str:
    if version not in VERSIONS:
        raise ValueError(f"unknown Gymnasium MuJoCo version {version!r}; known versions: {list(VERSIONS)}")
    return version


def get_env_info(name: str) -> EnvInfo:
    """Look up a task by short name.

    Accepts ``"hopper"``, any capitalisation, and names with a suffix such as ``"hopper-medium-v2"`` or
    ``"Hopper-v5"`` (the part before the first ``-``).

    Partially observable tasks (``"hopper-po"``, ``"hopper-po-medium"``) give their entry of
    :data:`.pomdp.PO_ENVS`.

    Raises:
        ValueError: for an unknown task, listing the known ones.
    """
    from .pomdp import lookup

    partial = lookup(name)
    if partial is not None:
        return partial
    key = str(name).strip().lower()
    if key not in ENVS:
        key = key.split("-", 1)[0]
    if key not in ENVS:
        raise ValueError(f"unknown offline-RL environment {name!r}; known environments: {sorted(ENVS)}")
    return ENVS[key]


def normalized_score(env_name: str, episode_return: Any) -> Any:
    """D4RL normalized score of ``episode_return`` for ``env_name``.

    Args:
        env_name: task name (see :func:`get_env_info`).
        episode_return: a float or a numpy array of undiscounted episode returns (any shape).

    Returns:
        ``100 * (ret - REF_MIN) / (REF_MAX - REF_MIN)``: a float for a scalar input, else an array of the
        same shape.
    """
    info = get_env_info(env_name)
    if isinstance(episode_return, (list, tuple)):
        episode_return = np.asarray(episode_return, dtype=np.float64)
    score = info.normalized_score(episode_return)
    if isinstance(score, np.generic):
        return float(score)
    return score


SETTOTALMASS_WARNING = "compiler attribute 'settotalmass' is deprecated"
"""Start of the warning MuJoCo 4 gives when it compiles HalfCheetah's XML, which sets ``settotalmass``."""


@contextmanager
def quiet_settotalmass() -> Iterator[None]:
    """Within the block, drop MuJoCo's "compiler attribute 'settotalmass' is deprecated" warning, and only it.

    MuJoCo reports it through its C warning handler, which prints it on stderr and appends it to
    ``MUJOCO_LOG.TXT`` in the current folder; the model Gymnasium builds is the same either way. Within the block
    a handler that drops this one message is installed; any other MuJoCo warning goes to the handler that was
    installed before (a Python callable), or, in place of MuJoCo's default one, becomes a ``RuntimeWarning``
    ``"MuJoCo: <message>"``. The previous handler is restored on leaving.
    """
    import mujoco

    if not hasattr(mujoco, "set_mju_user_warning"):  # bindings without user handlers: MuJoCo's own handling
        yield
        return
    previous = mujoco.get_mju_user_warning()

    def handler(message: str) -> None:
        if message.startswith(SETTOTALMASS_WARNING):
            return
        if previous is not None:
            previous(message)
        else:
            warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)

    mujoco.set_mju_user_warning(handler)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def make_env(
    name: str,
    version: str = DEFAULT_VERSION,
    seed: int | None = None,
    **kwargs: Any,
) -> gym.Env:
    """Create the Gymnasium MuJoCo environment for a task.

    Args:
        name: task name (``"hopper"``, ``"halfcheetah"``, ``"walker2d"``; ``"hopper-po"`` etc.: positions only).
        version: ``"v5"`` (default) or ``"v4"``.
        seed: if given, the environment is reset once with this seed and its action space is seeded, so
            that later ``reset()`` calls without a seed continue a reproducible stream.
        **kwargs: passed to ``gymnasium.make`` (e.g. ``max_episode_steps=50``).

    Returns:
        A ``gymnasium.Env`` with observations of shape ``(state_dim,)`` (float64) and actions of shape
        ``(act_dim,)`` in ``[-1, 1]``; episodes are truncated at 1000 steps unless ``max_episode_steps`` says
        otherwise.

    Raises:
        ValueError: for an unknown task or version.
    """
    from .pomdp import is_partial, make_po_env

    if is_partial(name):  # "hopper-po": positions only
        return make_po_env(name, version, seed, **kwargs)
    info = get_env_info(name)
    env_id = info.gym_id(version)
    import gymnasium as gym

    with quiet_settotalmass():
        env = gym.make(env_id, **kwargs)
    obs_shape = env.observation_space.shape
    if obs_shape != (info.state_dim,):
        logger.warning("%s observation shape %s differs from D4RL's (%d,)", env_id, obs_shape, info.state_dim)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def check_observation(obs: Any, step: int | None = None, env_name: str | None = None) -> np.ndarray:
    """Fail loudly on a non-finite observation.

    Args:
        obs: observation array, shape ``(state_dim,)`` or ``(batch, state_dim)``.
        step: time step within the episode, used in the message.
        env_name: task name, used in the message.

    Returns:
        ``obs`` as a numpy array (unchanged).

    Raises:
        ValueError: ``"non-finite observation at step t ..."`` when ``obs`` holds NaN or inf.
    """
    arr = np.asarray(obs)
    if not np.all(np.isfinite(arr)):
        where = np.argwhere(~np.isfinite(arr)).tolist()
        env_part = f" of {env_name}" if env_name else ""
        step_part = f"{step}" if step is not None else "?"
        raise ValueError(
            f"non-finite observation at step {step_part}{env_part}: entries {where[:8]} are NaN/inf "
            f"(observation {arr.tolist() if arr.size <= 32 else arr.shape}); the simulation has diverged"
        )
    return arr
