"""Online evaluation of a Decision Transformer in a Gymnasium MuJoCo task, canonical or with a cached memory.

Two ways to act, both batched over episodes that run in lockstep (one env per episode):

* :class:`CanonicalDT` -- the DT paper's and the Hugging Face example's evaluation: keep the last
  ``K`` timesteps, left-pad them to ``K`` with zeros and attention mask 0, run
  ``DecisionTransformerModel.forward`` on the window and take the last action prediction. The window
  is recomputed from scratch at every step.
* :class:`CachedDT` -- the whole history so far in the key/value cache, through the Decision
  Transformer adapter with an attached memory policy (``"full"`` keeps everything). Each sequence of
  the batch evicts its own tokens.

The two agree only while ``t < K``: once the window slides, the canonical forward recomputes every
window token without the dropped history (through every layer), while the cached model keeps it.

Chunking of the cached mode (every token enters the cache exactly once): at step ``t`` the policy feeds
``[a_{t-1}, R_t, s_t]`` (``[R_0, s_0]`` at ``t = 0``) and reads ``a_t`` at ``s_t``; ``a_t`` itself is fed at
the start of the next step, once it has been taken. Token ``a_{t-1}`` arrives at clock ``3t - 1`` so the
clock after it is ``3t``; with ``update_interval`` a multiple of 3 an update step always falls right after
an action token, and :func:`~namm_transfer.adapters.decision_transformer.feed_tokens` splits that step's
chunk into ``[a_{t-1}]`` and ``[R_t, s_t]`` so the clock hits it exactly (one forward call per env step,
two at update steps). Evictions therefore always see whole timesteps.

Return-to-go: it starts at ``target_return / return_scale`` and, after reward ``r_t``, becomes
``R_{t+1} = R_t - r_t / return_scale`` (the DT paper's evaluation). The action fed back into the
history is the model's prediction (as in the DT paper); the env receives it as float64 (MuJoCo clamps
controls to the actuator range).

Episodes that end early stop feeding real tokens: the cached policy keeps feeding them as padding
(attention mask 0, never counted as seen tokens), the canonical one skips them; their outputs are
ignored and their statistics stop at the last real step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...adapters.decision_transformer import (
    DEFAULT_AGE_EDGES,
    DecisionTransformerAdapter,
    feed_tokens,
    kept_token_stats,
)
from ...policies.base import MemoryPolicy

__all__ = ["CanonicalDT", "CachedDT", "canonical_actions", "run_episodes", "check_model_matches_env"]

logger = logging.getLogger(__name__)


def _dims(model: Any) -> tuple[int, int, int]:
    c = model.config
    return int(c.state_dim), int(c.act_dim), int(c.max_ep_len)


def _param(model: nn.Module) -> Tensor:
    return next(model.parameters())


def _as_batch(x: Any, width: int, what: str, ref: Tensor) -> Tensor:
    t = torch.as_tensor(x, dtype=ref.dtype, device=ref.device)
    if t.ndim == 1 and width == 1:
        t = t[:, None]
    if t.ndim != 2 or t.shape[1] != width:
        raise ValueError(f"{what} must have shape (batch, {width}), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contain NaN or inf")
    return t


# ----- canonical (windowed) ------------------------------------------------------------------------
@torch.no_grad()
def canonical_actions(
    model: nn.Module,
    states: Tensor,
    actions: Tensor,
    returns_to_go: Tensor,
    timesteps: Tensor,
    context_length: int = 20,
) -> Tensor:
    """The last action of the DT paper's window evaluation for a batch of equally long histories.

    Args:
        states: (B, T, state_dim) normalized states ``s_0 .. s_{T-1}``.
        actions: (B, T, act_dim) actions; the last row is the placeholder for the action being
            predicted (zeros in the paper's evaluation; it is never attended to by ``s_{T-1}``).
        returns_to_go: (B, T, 1) scaled returns-to-go; timesteps: (B, T) int.
        context_length: K, the number of timesteps in the window.
    Returns:
        (B, act_dim): the action predicted at ``s_{T-1}`` from the last ``K`` timesteps, left-padded to
        ``K`` with zeros and attention mask 0, exactly as ``DecisionTransformerModel.forward`` sees it.
    """
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    k = context_length
    states, actions = states[:, -k:], actions[:, -k:]
    returns_to_go, timesteps = returns_to_go[:, -k:], timesteps[:, -k:]
    b, n = states.shape[:2]
    pad = k - n
    ref = _param(model)
    mask = torch.cat([torch.zeros(b, pad), torch.ones(b, n)], dim=1).to(device=ref.device, dtype=torch.long)

    def left(x: Tensor, dtype: torch.dtype) -> Tensor:
        x = x.to(device=ref.device, dtype=dtype)
        zeros = torch.zeros(b, pad, *x.shape[2:], dtype=dtype, device=ref.device)
        return torch.cat([zeros, x], dim=1)

    out = model(
        states=left(states, ref.dtype),
        actions=left(actions, ref.dtype),
        returns_to_go=left(returns_to_go, ref.dtype),
        timesteps=left(timesteps, torch.long),
        attention_mask=mask,
        return_dict=True,
    )
    return out.action_preds[:, -1]


class CanonicalDT:
    """The DT paper's windowed policy (K timesteps recomputed every step), batched over episodes.

    Call :meth:`reset` with the batch size, then :meth:`act` once per environment step; the predicted
    action is stored as the history's action for that step.

    Args:
        model: a ``DecisionTransformerModel`` (put it in eval mode).
        context_length: K (20 in the DT paper).
    """

    mode = "canonical"

    def __init__(self, model: nn.Module, context_length: int = 20) -> None:
        DecisionTransformerAdapter(model)  # type check (TypeError for anything else)
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.model = model
        self.context_length = context_length
        self.state_dim, self.act_dim, self.max_ep_len = _dims(model)
        self.t = 0
        self.batch_size = 0

    def reset(self, batch_size: int) -> None:
        ref = _param(self.model)
        self.batch_size = batch_size
        self.t = 0
        self.states = torch.zeros(batch_size, 0, self.state_dim, dtype=ref.dtype, device=ref.device)
        self.actions = torch.zeros(batch_size, 0, self.act_dim, dtype=ref.dtype, device=ref.device)
        self.rtg = torch.zeros(batch_size, 0, 1, dtype=ref.dtype, device=ref.device)

    def context_tokens(self) -> int:
        """Real tokens the current action query attends to (window R, s, a ... up to ``s_t``)."""
        return 3 * min(self.t, self.context_length) - 1 if self.t else 0

    @torch.no_grad()
    def act(self, returns_to_go: Any, states: Any, alive: Any = None) -> Tensor:
        """Predict ``a_t`` for every episode.

        Args:
            returns_to_go: (B,) or (B, 1) scaled returns-to-go ``R_t``; states: (B, state_dim) normalized.
            alive: optional (B,) bool; finished episodes are skipped (their rows return zeros).
        Returns:
            (B, act_dim) actions.
        """
        if self.t >= self.max_ep_len:
            raise ValueError(f"timestep {self.t} is beyond the model's max_ep_len {self.max_ep_len}")
        ref = _param(self.model)
        rtg = _as_batch(returns_to_go, 1, "returns_to_go", ref)
        st = _as_batch(states, self.state_dim, "states", ref)
        b = self.batch_size
        if rtg.shape[0] != b or st.shape[0] != b:
            raise ValueError(f"batch of {st.shape[0]} does not match reset({b})")
        self.states = torch.cat([self.states, st[:, None]], dim=1)
        self.rtg = torch.cat([self.rtg, rtg[:, None]], dim=1)
        self.actions = torch.cat([self.actions, torch.zeros(b, 1, self.act_dim, dtype=ref.dtype, device=ref.device)], 1)
        self.t += 1
        live = torch.ones(b, dtype=torch.bool) if alive is None else torch.as_tensor(alive, dtype=torch.bool).cpu()
        if live.shape != (b,):
            raise ValueError(f"alive must have shape ({b},), got {tuple(live.shape)}")
        idx = torch.nonzero(live).flatten().to(ref.device)
        out = torch.zeros(b, self.act_dim, dtype=ref.dtype, device=ref.device)
        if idx.numel():
            k = self.context_length
            ts = torch.arange(max(0, self.t - k), self.t, device=ref.device).expand(idx.numel(), -1)
            out[idx] = canonical_actions(
                self.model,
                self.states[idx, -k:],
                self.actions[idx, -k:],
                self.rtg[idx, -k:],
                ts,
                context_length=k,
            )
        self.actions[:, -1] = out
        return out


# ----- cached (long history + memory policy) -----------------------------------------------------
class CachedDT:
    """A Decision Transformer acting from its whole history in the KV cache, with a memory policy.

    Batched over episodes in lockstep; each sequence evicts its own tokens. See the module docstring for
    the chunking. Usable as a context manager; :meth:`detach` restores the model.

    Args:
        model: a ``DecisionTransformerModel`` (eval mode).
        policy: a :class:`MemoryPolicy` or a registered name (``"full"``, ``"h2o"``, ``"namm"``, ...);
            ``policy_kwargs`` go to the registered factory (e.g. ``budget=0.5``).
        update_interval: tokens between policy updates; must be a multiple of 3 (whole timesteps).
        chunk_size: longest forward call, in tokens.
        record_kept: record kept positions at each update (for :meth:`kept_token_stats`).
    """

    mode = "cached"

    def __init__(
        self,
        model: nn.Module,
        policy: MemoryPolicy | str = "full",
        *,
        update_interval: int = 48,
        chunk_size: int = 384,
        record_kept: bool = True,
        **policy_kwargs: Any,
    ) -> None:
        from ...session import attach

        if update_interval < 3 or update_interval % 3:
            raise ValueError(
                f"update_interval must be a positive multiple of 3 (whole return/state/action timesteps), "
                f"got {update_interval}"
            )
        DecisionTransformerAdapter(model)  # type check before attaching
        self.model = model
        self.update_interval = update_interval
        self.state_dim, self.act_dim, self.max_ep_len = _dims(model)
        self.mem = attach(
            model,
            policy,
            update_interval=update_interval,
            chunk_size=chunk_size,
            record_kept=record_kept,
            adapter=DecisionTransformerAdapter.name,
            **policy_kwargs,
        )
        self.engine = self.mem.engine
        self.adapter: DecisionTransformerAdapter = self.engine.adapter
        self.t = 0
        self.batch_size = 0
        self._prev_action: Tensor | None = None
        self._alive: Tensor | None = None

    # context manager / detach
    def __enter__(self) -> CachedDT:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def detach(self) -> None:
        self.mem.detach()

    @property
    def policy(self) -> MemoryPolicy:
        return self.mem.policy

    @property
    def stats(self) -> Any:
        return self.engine.stats

    def reset(self, batch_size: int) -> None:
        self.engine.reset(batch_size, self.adapter.device)
        self.batch_size = batch_size
        self.t = 0
        self._prev_action = None
        self._alive = torch.ones(batch_size, dtype=torch.bool, device=self.adapter.device)

    def cache_tokens(self) -> np.ndarray:
        """(B,) live tokens per sequence now, averaged over managed layers and heads."""
        per_layer = [st.valid.sum(-1).float().mean(-1) for st in self.engine.states.values()]
        return torch.stack(per_layer).mean(0).cpu().numpy()

    def seen_tokens(self) -> np.ndarray:
        """(B,) real tokens each sequence has fed (what a full cache holds)."""
        return self.engine.n_seen.cpu().numpy().copy()

    @torch.no_grad()
    def act(self, returns_to_go: Any, states: Any, alive: Any = None) -> Tensor:
        """Feed ``[a_{t-1}, R_t, s_t]`` and predict ``a_t`` for every episode.

        Args:
            returns_to_go: (B,) or (B, 1) scaled ``R_t``; states: (B, state_dim) normalized ``s_t``.
            alive: optional (B,) bool; a finished episode must stay finished (its tokens become padding).
        Returns:
            (B, act_dim) actions (rows of finished episodes are meaningless).
        """
        if self._alive is None:
            raise RuntimeError("call reset(batch_size) first")
        if not self.engine.attached:
            raise RuntimeError("this CachedDT was detached; create a new one to keep acting")
        if self.t >= self.max_ep_len:
            raise ValueError(f"timestep {self.t} is beyond the model's max_ep_len {self.max_ep_len}")
        ad = self.adapter
        ref = _param(self.model)
        rtg = _as_batch(returns_to_go, 1, "returns_to_go", ref)
        st = _as_batch(states, self.state_dim, "states", ref)
        b = self.batch_size
        if rtg.shape[0] != b or st.shape[0] != b:
            raise ValueError(f"batch of {st.shape[0]} does not match reset({b})")
        if alive is not None:
            live = torch.as_tensor(alive, dtype=torch.bool, device=ref.device)
            if live.shape != (b,):
                raise ValueError(f"alive must have shape ({b},), got {tuple(live.shape)}")
            if bool((live & ~self._alive).any()):
                raise ValueError("an episode marked finished cannot come back alive; call reset() for new episodes")
            self._alive = live
        t = self.t
        ts = torch.full((b, 1), t, dtype=torch.long, device=ref.device)
        pieces = []
        if t > 0:
            assert self._prev_action is not None
            pieces.append(ad.embed_tokens(2, self._prev_action[:, None], ts - 1))
        pieces.append(ad.embed_tokens(0, rtg[:, None], ts))
        pieces.append(ad.embed_tokens(1, st[:, None], ts))
        emb = torch.cat(pieces, dim=1)
        mask = self._alive[:, None].expand(b, emb.shape[1]).to(torch.long)
        mask_arg = None if bool(self._alive.all()) else mask
        preds = feed_tokens(self.engine, emb, mask_arg)
        action = preds[:, -1]
        self._prev_action = action
        self.t += 1
        return action

    def kept_token_stats(self, age_edges: Sequence[int] = DEFAULT_AGE_EDGES) -> dict[str, Any]:
        """Kept tokens by type / age over the updates at which each episode was still running."""
        s = self.stats
        include = np.array(
            [[n == c for n in seen] for seen, c in zip(s.update_n_seen, s.update_clock, strict=True)], dtype=bool
        ).reshape(len(s.update_clock), self.batch_size)
        return kept_token_stats(s, include=include, age_edges=age_edges)

    def retained_per_episode(self) -> np.ndarray:
        """(B,) retained cache of each episode: mean over managed layers and over the forward calls made
        while it was running of (live tokens / tokens a full cache would hold)."""
        s = self.stats
        r = s.retained_per_call()  # (calls, B)
        if r.size == 0:
            return np.ones(self.batch_size)
        alive = np.stack(s.n_seen) == np.asarray(s.clock)[:, None]  # no padding yet: still running
        num = (r * alive).sum(0)
        den = alive.sum(0)
        return np.where(den > 0, num / np.maximum(den, 1), 1.0)


# ----- episodes ----------------------------------------------------------------------------------------
def check_model_matches_env(model: nn.Module, env: Any, env_name: str = "env") -> None:
    """Raise ValueError naming both sizes when the model's state/action sizes differ from the env's."""
    state_dim, act_dim, _ = _dims(model)
    obs_shape = tuple(env.observation_space.shape or ())
    act_shape = tuple(env.action_space.shape or ())
    if obs_shape != (state_dim,) or act_shape != (act_dim,):
        raise ValueError(
            f"the Decision Transformer expects state_dim={state_dim} and act_dim={act_dim}, but {env_name} has "
            f"observations of shape {obs_shape} and actions of shape {act_shape}; use a model trained on this task"
        )


def _check_obs(obs: np.ndarray, env_name: str, episode: int, step: int) -> None:
    if not np.all(np.isfinite(obs)):
        raise ValueError(
            f"non-finite observation from {env_name} in episode {episode} at step {step}: {obs.tolist()}; "
            "the simulation diverged (check the actions and the environment)"
        )


def run_episodes(
    model: nn.Module,
    env_name: str,
    n_episodes: int,
    mode: str = "canonical",
    policy: MemoryPolicy | str = "full",
    target_return: float | None = None,
    state_mean: Any = None,
    state_std: Any = None,
    return_scale: float = 1000.0,
    max_ep_len: int = 1000,
    seed: int = 0,
    update_interval: int = 48,
    device: str | torch.device = "cpu",
    *,
    context_length: int = 20,
    policy_kwargs: dict[str, Any] | None = None,
    version: str = "v5",
    env_fn: Callable[[int], Any] | None = None,
    age_edges: Sequence[int] = DEFAULT_AGE_EDGES,
) -> dict[str, Any]:
    """Run ``n_episodes`` episodes of a Decision Transformer in a Gymnasium MuJoCo task, batched.

    Args:
        model: a ``DecisionTransformerModel``; moved to ``device`` and run in eval mode (its training
            mode is restored afterwards).
        env_name: task name for :mod:`namm_transfer.evals.offline_rl.envs` (``"hopper"``, ...).
        n_episodes: episodes, run in lockstep; episode ``i`` is reset with seed ``seed + i``.
        mode: ``"canonical"`` (K-step window, :class:`CanonicalDT`) or ``"cached"`` (whole history in the
            cache with ``policy``, :class:`CachedDT`).
        policy: memory policy for the cached mode (name or instance); ``policy_kwargs`` e.g. ``{"budget": 0.5}``.
        target_return: initial return-to-go (unscaled); default: the DT paper's target for the task.
        state_mean, state_std: (state_dim,) normalization of the training data (default 0 and 1).
        return_scale: returns-to-go are divided by this (1000 in the DT paper).
        max_ep_len: at most this many steps per episode (and the env's time limit); must not exceed the
            model's ``max_ep_len`` (the size of its timestep embedding).
        update_interval: cached mode: tokens between policy updates (a multiple of 3).
        context_length: canonical mode: K.
        version: Gymnasium MuJoCo version (``"v5"`` or ``"v4"``).
        env_fn: optional ``env_fn(episode_index) -> gymnasium.Env`` replacing ``make_env`` (custom envs, tests);
            the env is still reset with seed ``seed + i``.
        age_edges: age buckets (timesteps) of the kept-token statistics.
    Returns:
        dict with ``returns``, ``normalized_scores`` (D4RL), ``lengths`` (per episode), ``score`` /
        ``score_std`` (mean / std of normalized scores), ``return_mean``, ``retained_cache`` (cached mode:
        mean over episodes of :meth:`CachedDT.retained_per_episode`; None in canonical mode, which holds no
        cache), ``retained_per_episode``, ``context_fraction`` (canonical: mean over steps of window tokens /
        history tokens), ``kept_tokens`` (cached: :func:`kept_token_stats` over running episodes),
        ``steps_per_second`` (env steps of all episodes per wall-clock second, env time included),
        ``wall_s``, ``trace`` (per step: ``cache_tokens`` and ``full_tokens``, lists of n_episodes values,
        ``None`` once an episode has ended), and the settings used.
    """
    from . import envs as envs_mod

    if mode not in ("canonical", "cached"):
        raise ValueError(f"mode must be 'canonical' or 'cached', got {mode!r}")
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if return_scale <= 0:
        raise ValueError(f"return_scale must be > 0, got {return_scale}")
    state_dim, act_dim, model_max_len = _dims(model)
    if max_ep_len < 1 or max_ep_len > model_max_len:
        raise ValueError(
            f"max_ep_len={max_ep_len} must be in [1, {model_max_len}] (the model's timestep embedding covers "
            f"{model_max_len} steps)"
        )
    if target_return is None:
        key = env_name.split("-")[0].lower()
        if key not in envs_mod.ENVS:
            raise ValueError(f"unknown offline-RL environment {env_name!r}; known: {sorted(envs_mod.ENVS)}")
        target_return = envs_mod.ENVS[key].target_return
    mean = np.zeros(state_dim) if state_mean is None else np.asarray(state_mean, dtype=np.float64).reshape(-1)
    std = np.ones(state_dim) if state_std is None else np.asarray(state_std, dtype=np.float64).reshape(-1)
    if mean.shape != (state_dim,) or std.shape != (state_dim,):
        raise ValueError(f"state_mean / state_std must have shape ({state_dim},), got {mean.shape} and {std.shape}")
    if np.any(std <= 0) or not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise ValueError("state_std must be positive and state_mean / state_std finite")
    policy_kwargs = dict(policy_kwargs or {})

    envs = []
    for i in range(n_episodes):
        if env_fn is not None:
            env = env_fn(i)
        else:
            env = envs_mod.make_env(env_name, version=version, max_episode_steps=max_ep_len)
        envs.append(env)
    try:
        for env in envs:
            check_model_matches_env(model, env, env_name)
        was_training = model.training
        model.to(device)
        model.eval()
        try:
            return _run(
                model,
                env_name,
                envs,
                mode,
                policy,
                policy_kwargs,
                float(target_return),
                mean,
                std,
                float(return_scale),
                max_ep_len,
                seed,
                update_interval,
                context_length,
                age_edges,
            )
        finally:
            model.train(was_training)
    finally:
        for env in envs:
            env.close()


def _run(
    model: nn.Module,
    env_name: str,
    envs: list[Any],
    mode: str,
    policy: MemoryPolicy | str,
    policy_kwargs: dict[str, Any],
    target_return: float,
    mean: np.ndarray,
    std: np.ndarray,
    return_scale: float,
    max_ep_len: int,
    seed: int,
    update_interval: int,
    context_length: int,
    age_edges: Sequence[int],
) -> dict[str, Any]:
    from . import envs as envs_mod

    n = len(envs)
    obs = []
    for i, env in enumerate(envs):
        o, _ = env.reset(seed=seed + i)
        o = np.asarray(o, dtype=np.float64)
        _check_obs(o, env_name, i, 0)
        obs.append(o)
    obs_arr = np.stack(obs)
    actor: CanonicalDT | CachedDT
    if mode == "cached":
        actor = CachedDT(model, policy, update_interval=update_interval, record_kept=True, **policy_kwargs)
    else:
        actor = CanonicalDT(model, context_length=context_length)
    returns = np.zeros(n)
    lengths = np.zeros(n, dtype=np.int64)
    alive = np.ones(n, dtype=bool)
    rtg = np.full(n, target_return / return_scale)
    trace_cache: list[list[float | None]] = []
    trace_full: list[list[float | None]] = []
    context_fracs: list[float] = []
    t0 = time.perf_counter()
    try:
        actor.reset(n)
        for t in range(max_ep_len):
            states = (obs_arr - mean) / std
            actions = actor.act(rtg, states, alive).float().cpu().numpy().astype(np.float64)
            if isinstance(actor, CachedDT):
                cache, full = actor.cache_tokens(), actor.seen_tokens()
            else:
                cache = np.full(n, float(actor.context_tokens()))
                full = np.full(n, float(3 * t + 2))
                context_fracs.append(float(cache[0] / full[0]))
            trace_cache.append([float(cache[i]) if alive[i] else None for i in range(n)])
            trace_full.append([float(full[i]) if alive[i] else None for i in range(n)])
            for i in (int(j) for j in np.flatnonzero(alive)):
                o, r, terminated, truncated, _ = envs[i].step(actions[i])
                o = np.asarray(o, dtype=np.float64)
                _check_obs(o, env_name, i, t + 1)
                returns[i] += float(r)
                lengths[i] += 1
                rtg[i] -= float(r) / return_scale
                obs_arr[i] = o
                if terminated or truncated:
                    alive[i] = False
            if not alive.any():
                break
        wall = time.perf_counter() - t0
        result: dict[str, Any] = {
            "env": env_name,
            "mode": mode,
            "n_episodes": n,
            "seed": seed,
            "target_return": target_return,
            "return_scale": return_scale,
            "max_ep_len": max_ep_len,
        }
        if isinstance(actor, CachedDT):
            retained = actor.retained_per_episode()
            result.update(
                policy=actor.policy.describe(),
                update_interval=update_interval,
                managed_layers=list(actor.stats.managed_layers),
                retained_cache=float(retained.mean()),
                retained_per_episode=retained.tolist(),
                context_fraction=None,
                kept_tokens=actor.kept_token_stats(age_edges) if actor.stats.kept_positions else None,
            )
        else:
            result.update(
                policy={"policy": "window", "context_length": context_length},
                retained_cache=None,
                retained_per_episode=None,
                context_fraction=float(np.mean(context_fracs)) if context_fracs else 1.0,
                kept_tokens=None,
            )
    finally:
        if isinstance(actor, CachedDT):
            actor.detach()
    scores = np.asarray(envs_mod.normalized_score(env_name, returns), dtype=np.float64)
    result.update(
        returns=returns.tolist(),
        normalized_scores=scores.tolist(),
        lengths=lengths.tolist(),
        score=float(scores.mean()),
        score_std=float(scores.std()),
        return_mean=float(returns.mean()),
        steps_per_second=float(lengths.sum() / wall) if wall > 0 else float("inf"),
        wall_s=wall,
        trace={"cache_tokens": trace_cache, "full_tokens": trace_full},
    )
    return result
