r"""``namm-transfer eval --target decision-transformer``: a frozen language NAMM on Decision Transformers.

For every task (hopper, halfcheetah, walker2d), episodes with seeds ``seed .. seed + n - 1`` (``--episodes``: one
count for every task, or per task, ``20,hopper=30``) run in batches in lockstep in the Gymnasium MuJoCo env, and
the D4RL normalized return of each is recorded. Every policy and protocol runs exactly the same seeds:

* ``canonical`` -- the DT paper's evaluation: the last K timesteps recomputed every step (no cache). With
  ``--canonical-model`` this row runs another DT than the cached rows (same seeds), e.g. the canonical K=20 DT
  ``shipped:hopper-po-medium`` beside the long-context ``--model shipped:hopper-po-medium-long``: its ``vs_full``
  is then how far the canonical window falls below the long history (every row gets a ``model`` field).
* ``full`` -- the whole history in the KV cache, nothing evicted.
* ``full-alt`` -- the noise floor: the full cache again with twice the update interval (96 instead of 48). The
  full cache evicts nothing, so only the split of the forward calls changes, i.e. float rounding, which moves a
  MuJoCo trajectory as much as any small change of the actions does; its ``vs_full`` interval is the difference
  that no setting of this kind can tell from none (``--no-noise-floor`` skips it).
* ``namm`` -- the whole history in the cache, managed by the frozen, language-trained NAMM (``--namm``).
* ``h2o``, ``l2``, ``streaming``, ``random`` (and any other registered budgeted policy) -- at matched budgets.

``canonical``, ``full`` and ``full-alt`` run once per episode (``protocol`` null); NAMM and the baselines run once
per matched-budget protocol (``--protocols``, :mod:`namm_transfer.protocols`; default
``ratio:0.5,ratio:0.25,threshold``), and every record carries its ``protocol`` label:

* ``ratio:R`` (label ``ratio-{100R}``) -- at every update, NAMM keeps its own top ``floor(R * seen)`` tokens by
  score and every baseline ``floor(R * seen)`` by its rule, per layer and head (``RatioBudget(R)``). A DT
  episode has no prompt end: the updates fall every ``--update-interval`` tokens.
* ``threshold`` -- the paper's: NAMM keeps the tokens it scores >= 0; its kept counts, recorded per episode, per
  update and per layer and head in NAMM's run of the same episodes (same seeds, same batch, same update
  interval), are replayed as each baseline's budget (see below).

Paired statistics: each row (``protocol``, ``policy``) has ``vs_full`` (minus the full cache) and, in a protocol,
``vs_namm`` (minus that protocol's NAMM): the mean per-episode score difference over the same (env, seed) units
with a 95% stratified paired bootstrap interval (:func:`namm_transfer.stats.compare_policies`, stratum = env); in
``rows`` the mean over envs of the per-env mean difference (the weighting of ``score``), in ``breakdown`` per env.

Replay when trajectories differ. Each policy acts differently, so an episode can end at a different step
under NAMM and under a baseline. Update ``s`` happens at the same clock in every run (one lockstep clock
per batch), so while both runs of an episode are still going the baseline gets exactly NAMM's counts of
that update. When the baseline's episode outlives NAMM's (NAMM's run made no count for it at that update),
the budget falls back, per (layer, head) (``--replay-fallback``):

* ``hold`` (default): NAMM's counts at its last update of that episode (the cache stops growing), clamped to
  the live tokens. If NAMM's episode ended before its first update there is nothing to hold and nothing is
  evicted.
* ``ratio``: NAMM's kept fraction at that last update times the tokens the baseline has seen now.

Each baseline record says how many of its updates used the fallback (``replay_extrapolated`` out of
``replay_updates``). Updates after the baseline's own episode ended concern padding only and are ignored.

Results: ``NAME.jsonl`` (one record per env x protocol x policy x episode, keys ``hopper/full/ep003`` and
``hopper/ratio-50/h2o/ep003``, appended after each batch; a killed run resumes without repeating a finished batch,
and baselines read NAMM's counts back from it), ``NAME.json`` (summary: ``rows`` per (protocol, policy) with
``score`` = the mean over envs of the mean normalized return, ``vs_full`` / ``vs_namm``, ``breakdown`` per env;
the protocols and ``noise_floor`` in ``settings``) and ``NAME.png`` (return and cache size over episode time). Each
record's ``trace`` keeps the return so far and the cache size at about :data:`TRACE_POINTS` steps, to
:data:`TRACE_DIGITS` significant digits (only the plot reads it; every score is exact); files of earlier runs are
rewritten under this rule by ``python -m namm_transfer.evals.offline_rl.compact_traces NAME.jsonl``.
``retained_cache`` of a cached policy is the mean over managed layers (all of them) and forward calls of live /
seen tokens; the canonical window holds no cache (its ``context_fraction`` is the window's share of the history).
Under ``RANK`` / ``WORLD_SIZE`` each process takes whole (env, batch) groups (round robin) and writes
``NAME.rank{r}-of{w}.jsonl``; ``namm-transfer report --merge`` joins them, and the same command run once more in
one process writes the summary from the merged file.

Defaults: 3 episodes (seeds 0, 1, 2) of at most 1000 steps (the D4RL length) per task, the three default
protocols and the noise floor (3 + 3 x 5 = 18 runs of every batch), update interval 48 tokens (16 timesteps), the
shipped DTs (``namm_transfer/weights/dt/{env}-medium``), one torch thread. Measured with
``/usr/bin/time namm-transfer eval --target decision-transformer --env halfcheetah`` (episodes that always last
1000 steps): 190 CPU seconds (20 min wall on 2 cores shared with other jobs, load 6 to 13). Hopper's episodes end
earlier (about 580 steps with a cache), so the three tasks take about 8.5 min of CPU: within 10 min on a free core.
More episodes per batch cost less than proportionally (a lockstep step's overhead is shared).

Full-seed evaluation (20 seeds per task, 30 for hopper), in two processes, then merged and summarized (the
merge refuses an older ``results/decision-transformer.jsonl`` of other settings: move it away first)::

    for r in 0 1; do RANK=$r WORLD_SIZE=2 OMP_NUM_THREADS=1 nohup namm-transfer eval --target decision-transformer \
        --episodes 20,hopper=30 --batch-episodes 10 --output results/decision-transformer.json --no-progress \
        > dt-rank$r.log 2>&1 & done; wait
    namm-transfer report --merge 'results/decision-transformer.rank*-of2.jsonl' \
        --output results/decision-transformer.json
    namm-transfer eval --target decision-transformer --episodes 20,hopper=30 --batch-episodes 10 \
        --output results/decision-transformer.json --no-progress

Positions-only tasks, the canonical 20-step DT against the long-context DT's cached history (same seeds)::

    namm-transfer eval --target decision-transformer --env hopper-po --model shipped:hopper-po-medium-long \
        --canonical-model shipped:hopper-po-medium --episodes 30 --output results/decision-transformer-po.json

The committed ``results/decision-transformer.json`` ran these commands with ``--episodes 20`` (20 seeds for hopper
too: 30 did not fit that session's time; see its ``command``): 42 min wall for the two processes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...protocols import DEFAULT_PROTOCOLS, Protocol, parse_protocols
from ..args import default_output
from .envs import ENVS, VERSIONS, get_env_info
from .pomdp import PO_ENVS

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EPISODES",
    "DEFAULT_MAX_EP_LEN",
    "DEFAULT_POLICIES",
    "EvalSettings",
    "add_arguments",
    "evaluate",
    "main",
    "parse_episodes",
    "plot_results",
    "summarize_results",
]

DEFAULT_POLICIES = "canonical,full,namm,h2o,tova,l2,streaming,random"
DEFAULT_EPISODES = 3
DEFAULT_MAX_EP_LEN = 1000
DEFAULT_UPDATE_INTERVAL = 48
TRACE_POINTS = 50
"""Per-episode traces (return so far, cache size) are stored at about this many time steps (every
``ceil(max_ep_len / TRACE_POINTS)`` steps and the last)."""
TRACE_DIGITS: int | None = 4
"""Significant digits of the trace values (None: unrounded). Scores, returns and every other field are exact."""
UNBUDGETED = ("canonical", "full", "namm")
NO_PROTOCOL = ("canonical", "full")
"""Run once per episode, shared by every protocol (``protocol`` null)."""
NOISE_FLOOR = "full-alt"
"""The full cache run again with twice the update interval (see :func:`_noise_floor`)."""
FALLBACKS = ("hold", "ratio")


def parse_episodes(text: str | int) -> tuple[int, dict[str, int]]:
    """``"20,hopper=30"`` -> ``(20, {"hopper": 30})``: episodes per env (a bare number for every env, ``ENV=N`` for
    one env). ``"5"`` or ``5`` -> ``(5, {})``.

    Raises:
        ValueError: not numbers, fewer than 1, an unknown env or one given twice.
    """
    default, per_env = DEFAULT_EPISODES, {}
    seen_default = False
    for part in (x.strip() for x in str(text).split(",")):
        if not part:
            continue
        name, _, value = part.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"--episodes: not a number in {part!r}; write e.g. 20 or 20,hopper=30") from None
        if n < 1:
            raise ValueError(f"--episodes: {part!r} must be >= 1")
        if not name:
            if seen_default:
                raise ValueError(f"--episodes: two counts for every env in {text!r}; write e.g. 20,hopper=30")
            default, seen_default = n, True
            continue
        env = get_env_info(name.strip()).name
        if env in per_env:
            raise ValueError(f"--episodes: {env} given twice in {text!r}")
        per_env[env] = n
    return default, per_env


# ----------------------------------------------------------------------------------------------------------------
# settings
@dataclass
class EvalSettings:
    """What one ``eval --target decision-transformer`` run does."""

    envs: list[str] = field(default_factory=lambda: list(ENVS))
    policies: list[str] = field(default_factory=lambda: DEFAULT_POLICIES.split(","))
    model: str | None = None
    """``--model``: None / "shipped", a path or hub id, ``ENV=PATH,...`` or a template with ``{env}``."""
    namm: str = "default"
    episodes: int = DEFAULT_EPISODES
    """Episodes per env (seeds ``seed .. seed + n - 1``, the same for every policy), unless in ``env_episodes``."""
    env_episodes: dict[str, int] = field(default_factory=dict)
    """Per-env episode counts that replace ``episodes`` (``--episodes 20,hopper=30``)."""
    batch_episodes: int | None = None
    """Episodes per lockstep batch (default: all of an env's in one)."""
    max_ep_len: int = DEFAULT_MAX_EP_LEN
    update_interval: int = DEFAULT_UPDATE_INTERVAL
    context: int | None = None
    """K of the canonical window (default: the model's, 20)."""
    protocols: str = DEFAULT_PROTOCOLS
    """Matched-budget protocols (:func:`namm_transfer.protocols.parse_protocols`)."""
    canonical_model: str | None = None
    """``--canonical-model``: the DT of the ``canonical`` row (same forms as ``model``); None: ``model``."""
    noise_floor: bool = True
    """Also run ``full-alt``: the full cache with twice the update interval (a setting that must not matter)."""
    replay_fallback: str = "hold"
    level: str = "medium"
    version: str = "v5"
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"
    target_return: float | None = None
    stats: str | None = None
    dataset: str | None = None
    output: str = default_output("decision-transformer")
    plot: bool = True
    progress: bool = True
    threads: int | None = 1
    """torch CPU threads on the CPU (the rollouts are small sequential forwards: more threads rarely help)."""

    def episodes_for(self, env: str) -> int:
        """Episodes of ``env`` (seeds ``seed .. seed + n - 1``)."""
        return int(self.env_episodes.get(env, self.episodes))

    def protocol_list(self) -> tuple[Protocol, ...]:
        return parse_protocols(self.protocols)

    def noise_floor_setting(self) -> dict[str, Any] | None:
        """What ``full-alt`` changes (the summary's ``noise_floor``), or None when it is off."""
        if not self.noise_floor:
            return None
        return {
            "policy": NOISE_FLOOR,
            "reference": "full",
            "update_interval": 2 * self.update_interval,
            "description": f"the full cache run again with update interval {2 * self.update_interval} instead of "
            f"{self.update_interval}: the full cache evicts nothing, so only the split of the forward calls "
            "(float rounding) changes; its vs_full interval is the noise floor of every paired difference",
        }

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share (recorded in the results header)."""
        envs = [get_env_info(e).name for e in self.envs]
        protocols = self.protocol_list()
        threshold = any(p.kind == "threshold" for p in protocols)
        out: dict[str, Any] = {
            "episodes": {env: self.episodes_for(env) for env in envs},
            "seeds": {env: [self.seed + i for i in range(self.episodes_for(env))] for env in envs},
            "batch_episodes": self.batch_episodes,
            "max_ep_len": self.max_ep_len,
            "update_interval": self.update_interval,
            "context_length": self.context,
            "protocols": [p.spec for p in protocols],
            "protocol_labels": [p.label for p in protocols],
            "noise_floor": self.noise_floor_setting(),
            "replay_fallback": self.replay_fallback if threshold else None,
            "level": self.level,
            "gym_version": self.version,
            "dtype": self.dtype,
            "target_return": self.target_return,
            "stats": self.stats,
            "dataset": self.dataset,
            "trace_points": TRACE_POINTS,
            "trace_digits": TRACE_DIGITS,
            "managed_layers": "all",
            "retained_cache": "mean over managed layers and forward calls of live / seen tokens",
        }
        if self.canonical_model is not None:  # only when given: files of earlier runs keep their identity
            out["canonical_model"] = str(self.canonical_model)
        return out


# ----------------------------------------------------------------------------------------------------------------
# NAMM's kept counts: record and replay
def _recording_policy(inner: Any) -> Any:
    """Wrap a memory policy so that the counts the engine keeps at every update are recorded per sequence.

    ``wrapper.kept[step][layer]`` is the (B, H) list of kept tokens after the engine's rule that the newest
    token always stays; ``wrapper.alive[step]`` the (B,) list of whether each sequence was still running
    (fed only real tokens so far).
    """
    from ...policies.base import MemoryPolicy

    class KeptCountRecorder(MemoryPolicy):
        def __init__(self, policy: Any) -> None:
            self.inner = policy
            self.name = policy.name  # type: ignore[misc]
            self.needs_attention = policy.needs_attention  # type: ignore[misc]
            self.needs_keys = policy.needs_keys  # type: ignore[misc]
            self.budget = policy.budget
            self.host = None
            self.kept: dict[int, dict[int, list[list[int]]]] = {}
            self.alive: dict[int, list[bool]] = {}

        def bind(self, host: Any) -> None:
            self.host = host
            self.inner.bind(host)

        def init_layer(self, state: Any) -> None:
            self.inner.init_layer(state)

        def observe(self, state: Any, rows: Tensor) -> None:
            self.inner.observe(state, rows)

        def select(self, state: Any) -> Tensor:
            keep = self.inner.select(state)
            k = keep & state.valid
            k[..., -1] |= state.valid[..., -1]
            self.kept.setdefault(state.step, {})[state.layer] = k.sum(-1).tolist()
            self.alive[state.step] = (state.n_seen == state.clock).tolist()
            return keep

        def describe(self) -> dict[str, Any]:
            return self.inner.describe()

    return KeptCountRecorder(inner)


def _episode_replay(recorder: Any, layers: Sequence[int], n: int) -> list[dict[str, Any]]:
    """Per sequence (``n`` of them): NAMM's kept counts at the updates while it was running (a prefix of the
    updates; empty when the episode ended before the first update)."""
    steps = sorted(recorder.kept)
    out = []
    for b in range(n):
        counts = []
        for s in steps:
            if not recorder.alive[s][b]:
                break
            counts.append([recorder.kept[s][layer][b] for layer in layers])
        out.append({"layers": list(layers), "kept_counts": counts})
    return out


def _replay_budget(per_episode: Sequence[Mapping[str, Any]], fallback: str = "hold", source: str = "namm") -> Any:
    """A budget that replays NAMM's per-episode kept counts (see the module docstring for the fallback)."""
    from ...policies.base import Budget

    if fallback not in FALLBACKS:
        raise ValueError(f"replay fallback must be one of {FALLBACKS}, got {fallback!r}")

    class NAMMReplayBudget(Budget):
        def __init__(self) -> None:
            self.counts = [list(ep["kept_counts"]) for ep in per_episode]
            self.layers = [list(ep["layers"]) for ep in per_episode]
            self.fallback = fallback
            self.source = source
            self.updates: list[set[int]] = [set() for _ in per_episode]
            self.extrapolated: list[set[int]] = [set() for _ in per_episode]

        def target(self, state: Any) -> Tensor:
            import torch

            b, h = state.shape[:2]
            if b != len(self.counts):
                raise ValueError(f"replayed NAMM counts cover {len(self.counts)} episodes, this batch has {b}")
            step = int(state.step)
            interval = max(1, int(state.clock) // (step + 1))
            n_valid = state.n_valid()
            rows = []
            for i in range(b):
                alive = bool(state.n_seen[i] == state.clock)
                if alive:
                    self.updates[i].add(step)
                ep = self.counts[i]
                li = self.layers[i].index(state.layer) if state.layer in self.layers[i] else None
                if li is None and ep:
                    raise ValueError(f"NAMM's replayed counts have no layer {state.layer} (have {self.layers[i]})")
                if step < len(ep):
                    rows.append(torch.as_tensor(ep[step][li], dtype=torch.int64))
                    continue
                if alive:
                    self.extrapolated[i].add(step)
                if not ep:  # NAMM's episode ended before its first update: nothing to replay, evict nothing
                    rows.append(n_valid[i].cpu().to(torch.int64))
                elif self.fallback == "hold":
                    rows.append(torch.as_tensor(ep[-1][li], dtype=torch.int64))
                else:
                    seen_then = len(ep) * interval  # NAMM's sequence was running: seen == clock at its last update
                    frac = torch.as_tensor(ep[-1][li], dtype=torch.float64) / seen_then
                    rows.append(torch.ceil(frac * float(state.n_seen[i])).to(torch.int64))
            t = torch.stack(rows).to(state.valid.device)
            if t.shape != (b, h):
                raise ValueError(f"replayed counts have shape {tuple(t.shape)}, this batch needs {(b, h)}")
            return t.clamp(min=1)

        def describe(self) -> str:
            return f"replay:{self.source} (fallback {self.fallback})"

    return NAMMReplayBudget()


# ----------------------------------------------------------------------------------------------------------------
# one batch of episodes
class _Progress:
    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="decision-transformer", unit="batch", dynamic_ncols=True)
        self.steps = 0

    def unit(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def step(self) -> None:
        self.steps += 1
        if self.bar is not None and self.steps % 100 == 0:
            self.bar.set_postfix(env_steps=self.steps)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _reward_env_factory(env_name: str, version: str, max_ep_len: int, rewards: list[list[float]], progress: _Progress):
    import gymnasium as gym

    from .envs import make_env

    class RewardRecorder(gym.Wrapper):
        def __init__(self, env: Any, index: int) -> None:
            super().__init__(env)
            self.index = index

        def step(self, action: Any) -> Any:
            out = self.env.step(action)
            rewards[self.index].append(float(out[1]))
            progress.step()
            return out

    def env_fn(i: int) -> Any:
        return RewardRecorder(make_env(env_name, version=version, max_episode_steps=max_ep_len), i)

    return env_fn


def _trace_index(length: int, max_ep_len: int, points: int | None = None) -> list[int]:
    """The steps a trace keeps: every ``ceil(max_ep_len / points)``-th of ``0 .. length - 1`` and the last."""
    stride = max(1, math.ceil(max_ep_len / (points or TRACE_POINTS)))
    idx = list(range(0, length, stride))
    if length and idx[-1] != length - 1:
        idx.append(length - 1)
    return idx


def _round(value: float | None, digits: int | None) -> float | int | None:
    """``value`` to ``digits`` significant digits (an int when whole: shorter JSON); unchanged when digits is None."""
    if value is None or digits is None:
        return value
    out = float(f"{float(value):.{digits}g}")
    return int(out) if out.is_integer() and abs(out) < 2**53 else out


def make_trace(
    steps: Sequence[int],
    returns: Sequence[float],
    cache_tokens: Sequence[float | None],
    digits: int | None,
) -> dict[str, list[Any]]:
    """A record's ``trace``: ``{"t": steps, "return": return so far after step t, "cache_tokens": cached tokens at
    step t}``, the values rounded to ``digits`` significant digits (None: unrounded). A full cache holds ``3 t + 2``
    tokens at step ``t`` (every real token so far), so it is not stored.
    """
    return {
        "t": [int(t) for t in steps],
        "return": [_round(float(v), digits) for v in returns],
        "cache_tokens": [_round(v, digits) for v in cache_tokens],
    }


def _unit_key(env: str, protocol: Protocol | None, policy: str, episode: int) -> str:
    """A record's key: ``hopper/full/ep003``, ``hopper/ratio-50/h2o/ep003`` (unique per protocol)."""
    return f"{env}/{policy}/ep{episode:03d}" if protocol is None else f"{env}/{protocol.label}/{policy}/ep{episode:03d}"


def _run_batch(
    s: EvalSettings,
    env_name: str,
    policy_name: str,
    protocol: Protocol | None,
    episodes: list[int],
    model: Any,
    info: Mapping[str, Any],
    namm: Any,
    replay: list[dict[str, Any]] | None,
    device: str,
    progress: _Progress,
) -> list[dict[str, Any]]:
    import torch

    from ...registry import create_policy
    from .rollout import run_episodes

    n = len(episodes)
    seed0 = s.seed + episodes[0]
    rewards: list[list[float]] = [[] for _ in range(n)]
    env_fn = _reward_env_factory(env_name, s.version, s.max_ep_len, rewards, progress)
    context = int(s.context or info.get("context_length") or 20)
    mode = "canonical" if policy_name == "canonical" else "cached"
    update_interval = 2 * s.update_interval if policy_name == NOISE_FLOOR else s.update_interval
    policy: Any = "full"
    recorder = None
    budget: Any = None
    budget_text: str | None = None
    if (protocol is None) != (policy_name in (*NO_PROTOCOL, NOISE_FLOOR)):
        raise ValueError(f"policy {policy_name} with protocol {protocol}: canonical and full run without one")
    if policy_name == "namm":
        from ...policies.base import RatioBudget
        from ...policies.namm_policy import NAMMPolicy

        assert protocol is not None
        if protocol.kind == "ratio":  # its own top share of scores
            assert protocol.ratio is not None
            policy = NAMMPolicy(namm, budget=RatioBudget(protocol.ratio))
            budget_text = policy.budget.describe()
        else:  # thresholds; its kept counts are recorded for the baselines to replay
            recorder = _recording_policy(NAMMPolicy(namm))
            policy = recorder
    elif policy_name not in (*UNBUDGETED, NOISE_FLOOR):
        from ...policies.base import RatioBudget

        assert protocol is not None
        if protocol.kind == "threshold":
            assert replay is not None
            budget = _replay_budget(replay, s.replay_fallback)
        else:
            assert protocol.ratio is not None
            budget = RatioBudget(protocol.ratio)
        kwargs: dict[str, Any] = {"budget": budget}
        if policy_name == "random":
            kwargs["seed"] = seed0
        policy = create_policy(policy_name, **kwargs)
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    target_return = s.target_return if s.target_return is not None else info.get("target_return")
    res = run_episodes(
        model,
        env_name,
        n,
        mode=mode,
        policy=policy,
        target_return=target_return,
        state_mean=info["state_mean"],
        state_std=info["state_std"],
        return_scale=float(info.get("return_scale") or 1000.0),
        max_ep_len=s.max_ep_len,
        seed=seed0,
        update_interval=update_interval,
        device=device,
        context_length=context,
        version=s.version,
        env_fn=env_fn,
    )
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if str(device).startswith("cuda") else None
    cfg = model.config
    bytes_per_token = (
        2 * int(cfg.n_layer) * int(cfg.hidden_size) * torch.finfo(next(model.parameters()).dtype).bits // 8
    )
    replays = None
    if recorder is not None:
        replays = _episode_replay(recorder, list(res["managed_layers"]), n)
    records = []
    for j, ep in enumerate(episodes):
        length = int(res["lengths"][j])
        idx = _trace_index(length, s.max_ep_len)
        cum = np.cumsum(rewards[j]) if rewards[j] else np.zeros(0)
        cache = [res["trace"]["cache_tokens"][t][j] for t in idx]
        peak_tokens = max((c for c in (row[j] for row in res["trace"]["cache_tokens"]) if c is not None), default=0.0)
        ret = float(res["returns"][j])
        rec: dict[str, Any] = {
            "key": _unit_key(env_name, protocol, policy_name, ep),
            "policy": policy_name,
            "protocol": None if protocol is None else protocol.label,
            "env": env_name,
            "episode": ep,
            "seed": seed0 + j,
            "batch_start": episodes[0],
            "return": ret,
            "score": float(res["normalized_scores"][j]),
            "length": length,
            "mode": mode,
            "retained_cache": None if res["retained_per_episode"] is None else float(res["retained_per_episode"][j]),
            "context_fraction": res.get("context_fraction"),
            "peak_cache_tokens": float(peak_tokens),
            "kv_cache_mb": float(peak_tokens) * bytes_per_token / 2**20,
            "throughput": float(res["steps_per_second"]),
            "batch_wall_s": float(res["wall_s"]),
            "peak_memory_mb": peak_mb,
            "policy_settings": res["policy"],
            "update_interval": update_interval if mode == "cached" else None,
            "context_length": context if mode == "canonical" else None,
            "target_return": float(res["target_return"]),
            "return_scale": float(res["return_scale"]),
            "model": info.get("source"),
            "model_sha256": info.get("content_hash"),
            "trace": make_trace(idx, [float(cum[t]) for t in idx], cache, TRACE_DIGITS),
        }
        if replays is not None:
            rec["replay"] = replays[j]
        if budget is not None or budget_text is not None:
            rec["budget"] = budget_text or budget.describe()
        if budget is not None and hasattr(budget, "extrapolated"):  # replayed NAMM counts
            rec["replay_updates"] = len(budget.updates[j])
            rec["replay_extrapolated"] = len(budget.extrapolated[j])
        if j == 0 and res.get("kept_tokens"):
            rec["batch_kept_tokens"] = res["kept_tokens"]
        records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------------------------
# summary
def _mean(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return math.fsum(vals) / len(vals) if vals else None


def _std(values: Sequence[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    m = math.fsum(vals) / len(vals)
    return math.sqrt(math.fsum((v - m) ** 2 for v in vals) / len(vals))


Row = tuple[str | None, str]
"""A summary row: ``(protocol label or None, policy)``."""


def _row_of(rec: Mapping[str, Any]) -> Row:
    return (rec.get("protocol"), str(rec["policy"]))


def _policy_row(row: Row, recs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "policy": row[1],
        "protocol": row[0],
        "score": _mean([r["score"] for r in recs]),
        "score_std": _std([r["score"] for r in recs]),
        "n": len(recs),
        "return_mean": _mean([r["return"] for r in recs]),
        "return_std": _std([r["return"] for r in recs]),
        "length_mean": _mean([r["length"] for r in recs]),
        "retained_cache": _mean([r.get("retained_cache") for r in recs]),
        "context_fraction": _mean([r.get("context_fraction") for r in recs]),
        "peak_cache_tokens": _mean([r.get("peak_cache_tokens") for r in recs]),
        "kv_cache_mb": _mean([r.get("kv_cache_mb") for r in recs]),
        "throughput": _mean([r.get("throughput") for r in recs]),
        "peak_memory_mb": _mean([r.get("peak_memory_mb") for r in recs]),
        "seeds": sorted({int(r["seed"]) for r in recs}),
    }
    extrap = [r for r in recs if "replay_updates" in r]
    if extrap:
        out["replay_extrapolated_fraction"] = _mean(
            [r["replay_extrapolated"] / r["replay_updates"] if r["replay_updates"] else 0.0 for r in extrap]
        )
    return out


def _paired(records: Sequence[Mapping[str, Any]]) -> dict[Any, dict[str, dict[str, Any]]]:
    """``{(protocol, policy): {"vs_full": ..., "vs_namm": ...}}``: paired bootstrap intervals of the per-episode
    score difference, unit = (env, seed), stratified by env (:func:`namm_transfer.stats.compare_policies`)."""
    from ...stats import compare_policies

    return compare_policies(
        records,
        unit=lambda r: (r["env"], int(r["seed"])),
        stratum=lambda r: r["env"],
        group=_row_of,
        references=("full", "namm"),
    )


def summarize_results(
    records: Sequence[Mapping[str, Any]], rows: Sequence[Row] | None = None
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """``(rows, breakdown)`` of the summary, one row per ``(protocol, policy)`` (``rows`` gives the order; rows of
    the records that it lacks follow in record order).

    ``breakdown[env]`` has one row per (protocol, policy) over that env's episodes: ``score`` = mean D4RL
    normalized return, ``score_std`` = its standard deviation over episodes, ``n`` episodes, mean ``return``,
    ``retained_cache``, ``throughput`` (env steps/s of the batch), ``seeds``, ... ``rows`` has one row per
    (protocol, policy): ``score`` = mean over envs of the per-env scores, ``score_std`` = mean over envs of the
    per-env stds, ``n`` = episodes in all, ``envs`` = the envs averaged, other fields averaged over envs.

    Every row has ``vs_full`` (against the full cache) and, in a protocol, ``vs_namm`` (against that protocol's
    NAMM): the mean paired difference of the score over the same (env, seed) episodes with its 95% stratified
    bootstrap interval (:class:`namm_transfer.stats.PairedInterval`); in ``rows`` pooled over envs (the mean over
    envs of the per-env mean difference, like ``score``), in ``breakdown`` within the env. Absent where the
    reference is (the row itself, or no such row).
    """
    envs = sorted({r["env"] for r in records})
    order: list[Row] = list(rows or [])
    for r in records:
        if _row_of(r) not in order:
            order.append(_row_of(r))
    breakdown: dict[str, list[dict[str, Any]]] = {}
    for env in envs:
        env_recs = [r for r in records if r["env"] == env]
        paired = _paired(env_recs)
        env_rows = []
        for key in order:
            recs = [r for r in env_recs if _row_of(r) == key]
            if recs:
                env_rows.append({**_policy_row(key, recs), **paired.get(key, {})})
        breakdown[env] = env_rows
    paired = _paired(records)
    overall = []
    for key in order:
        per_env = [row for env in envs for row in breakdown[env] if (row["protocol"], row["policy"]) == key]
        if not per_env:
            continue
        row: dict[str, Any] = {"policy": key[1], "protocol": key[0]}
        for field_name in (
            "score",
            "score_std",
            "retained_cache",
            "context_fraction",
            "peak_cache_tokens",
            "kv_cache_mb",
            "throughput",
            "peak_memory_mb",
            "replay_extrapolated_fraction",
        ):
            row[field_name] = _mean([e.get(field_name) for e in per_env])
        row["n"] = sum(e["n"] for e in per_env)
        row["envs"] = [e for e in envs if any((x["protocol"], x["policy"]) == key for x in breakdown[e])]
        row.update(paired.get(key, {}))
        overall.append(row)
    return overall, breakdown


def _label_models(
    records: Sequence[Mapping[str, Any]], rows: list[dict[str, Any]], breakdown: Mapping[str, list[dict[str, Any]]]
) -> None:
    """Add ``model`` (the DT sources of the row's records, comma-separated) to every row, in place: with
    ``--canonical-model`` the canonical row and the cached rows come from different DTs."""

    def sources(recs: Sequence[Mapping[str, Any]]) -> str:
        return ",".join(dict.fromkeys(str(r.get("model")) for r in recs))

    for row in rows:
        row["model"] = sources([r for r in records if _row_of(r) == (row["protocol"], row["policy"])])
    for env, env_rows in breakdown.items():
        for row in env_rows:
            key = (row["protocol"], row["policy"])
            row["model"] = sources([r for r in records if r["env"] == env and _row_of(r) == key])


def _label(row: Row) -> str:
    return row[1] if row[0] is None else f"{row[1]} [{row[0]}]"


def plot_results(
    records: Sequence[Mapping[str, Any]], path: str | Path, rows: Sequence[Row] | None = None
) -> Path | None:
    """Plot mean return so far and mean cache size (tokens) over episode time, one column per env and one line per
    (protocol, policy) row.

    Returns the PNG path, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    envs = sorted({r["env"] for r in records})
    order: list[Row] = list(rows or [])
    for r in records:
        if _row_of(r) not in order:
            order.append(_row_of(r))
    if not envs:
        return None
    fig, axes = plt.subplots(2, len(envs), figsize=(4.5 * len(envs), 7.5), squeeze=False, sharex="col")
    colors = plt.get_cmap("tab20")
    styles = ["-", "--", ":", "-."]
    protocols = list(dict.fromkeys(row[0] for row in order))
    for c, env in enumerate(envs):
        ax_r, ax_c = axes[0][c], axes[1][c]
        for k, key in enumerate(order):
            recs = [r for r in records if r["env"] == env and _row_of(r) == key and r.get("trace")]
            if not recs:
                continue
            grid = sorted({t for r in recs for t in r["trace"]["t"]})
            ret_rows, cache_rows = [], []
            for r in recs:
                tr = r["trace"]
                ts = np.asarray(tr["t"], dtype=float)
                ret_rows.append(np.interp(grid, ts, tr["return"], right=tr["return"][-1]) if len(ts) else None)
                cache = np.array([np.nan if v is None else v for v in tr["cache_tokens"]], dtype=float)
                cache_rows.append(np.interp(grid, ts, cache, right=np.nan) if len(ts) else None)
            rr = np.array([x for x in ret_rows if x is not None])
            cc = np.array([x for x in cache_rows if x is not None])
            style = {"color": colors(k % 20), "linestyle": styles[protocols.index(key[0]) % len(styles)]}
            if rr.size:
                ax_r.plot(grid, rr.mean(0), label=_label(key), **style)
            if cc.size:
                with np.errstate(all="ignore"):
                    ax_c.plot(grid, np.nanmean(cc, 0), label=_label(key), **style)
        ax_r.set_title(env)
        ax_r.set_ylabel("return so far (mean over episodes)")
        ax_c.set_ylabel("cache tokens (mean over running episodes)")
        ax_c.set_xlabel("episode step")
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# the run
Arm = tuple[Protocol | None, str]
"""One run of every episode batch: ``(protocol or None, policy)``."""


def _arms(names: Sequence[str], protocols: Sequence[Protocol], noise_floor: bool) -> list[Arm]:
    """The runs of every episode batch, in order: ``canonical``, ``full``, ``full-alt`` (protocol None), then per
    protocol NAMM followed by the budgeted baselines (the threshold protocol's replay NAMM's counts)."""
    from ...registry import list_policies

    known = ["canonical", *list_policies()]
    unknown = [p for p in names if p not in known]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {', '.join(known)} (full-alt: see --no-noise-floor)")
    out = list(dict.fromkeys(names))
    budgeted = [p for p in out if p not in UNBUDGETED]
    if budgeted and "namm" not in out:
        logger.info("adding the namm policy: the baselines are compared with it (and replay its cache sizes)")
        out.append("namm")
    if noise_floor and "full" not in out:
        logger.info("adding the full policy: the noise floor (full-alt) is compared with it")
        out.append("full")
    arms: list[Arm] = [(None, p) for p in NO_PROTOCOL if p in out]
    if noise_floor:
        arms.append((None, NOISE_FLOOR))
    for proto in protocols:  # NAMM runs before the baselines that replay it
        arms += [(proto, p) for p in ("namm", *budgeted) if p in out]
    return arms


def evaluate(
    s: EvalSettings, command: Sequence[str] | str = "namm-transfer eval --target decision-transformer"
) -> Path:
    """Run the evaluation described by ``s``; returns the summary path (``NAME.json``).

    Raises:
        FileNotFoundError: missing model / NAMM. ValueError: bad settings, mismatched model sizes, results file
            of another command.
    """
    import torch

    from ...results import ResultsWriter
    from .train import load_dt, resolve_dt

    envs = [get_env_info(e).name for e in s.envs]
    if min(s.episodes_for(env) for env in envs) < 1 or s.max_ep_len < 1:
        raise ValueError("episodes and max_ep_len must be >= 1")
    if s.update_interval < 3 or s.update_interval % 3:
        raise ValueError(
            f"--update-interval must be a positive multiple of 3 (whole return/state/action timesteps), got "
            f"{s.update_interval}; e.g. {max(3, 3 * round(s.update_interval / 3))}"
        )
    if s.replay_fallback not in FALLBACKS:
        raise ValueError(f"--replay-fallback must be one of {FALLBACKS}")
    arms = _arms(s.policies, s.protocol_list(), s.noise_floor)
    policies = list(dict.fromkeys(p for _, p in arms))
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if s.threads and str(device) == "cpu":
        torch.set_num_threads(int(s.threads))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[s.dtype]

    # models first: fail before anything runs
    def load(spec: str | None, env: str, what: str) -> tuple[Any, dict[str, Any]]:
        model, info = load_dt(
            resolve_dt(spec, env, s.level),
            env=env,
            level=s.level,
            stats=s.stats,
            dataset=s.dataset,
            device=device,
            dtype=dtype,
        )
        if s.max_ep_len > info["max_ep_len"]:
            raise ValueError(
                f"--max-ep-len {s.max_ep_len} exceeds the {env} {what}'s max_ep_len {info['max_ep_len']} "
                "(the size of its timestep embedding)"
            )
        return model, info

    models: dict[str, tuple[Any, dict[str, Any]]] = {env: load(s.model, env, "model") for env in envs}
    # the canonical row's DT (--canonical-model), e.g. the canonical K=20 DT beside a long-context one
    canonical_models: dict[str, tuple[Any, dict[str, Any]]] = dict(models)
    if s.canonical_model is not None and "canonical" in policies:
        for env in envs:
            if resolve_dt(s.canonical_model, env, s.level) != resolve_dt(s.model, env, s.level):
                canonical_models[env] = load(s.canonical_model, env, "canonical model")

    def model_of(env: str, policy: str) -> tuple[Any, dict[str, Any]]:
        return canonical_models[env] if policy == "canonical" else models[env]

    namm = None
    namm_record = None
    if "namm" in policies:
        from ...checkpoint import load_namm
        from ...checkpoint import namm_record as record_of

        namm = load_namm(s.namm, device=device)
        namm_record = record_of(namm, str(s.namm))  # no path: another install of the same NAMM may resume the file

    writer = ResultsWriter(
        s.output,
        command,
        "decision-transformer",
        s.identity(),
        str(s.model or "shipped"),
        namm_record,
        extendable=("episodes", "seeds"),  # more seeds per env (e.g. 20 -> hopper=30) keep the episodes already run
    )
    done = writer.done_keys()
    # the file must not mix checkpoints: a done episode of an env was produced by the same weights
    for rec in writer.records():
        env = rec.get("env")
        if env in models and rec.get("model_sha256") not in (
            None,
            model_of(env, str(rec.get("policy")))[1]["content_hash"],
        ):
            raise ValueError(
                f"{writer.jsonl_path} holds {env} episodes of another model (sha256 {str(rec['model_sha256'])[:12]}, "
                f"now {models[env][1]['content_hash'][:12]}); use a new --output"
            )

    def keys(env: str, arm: Arm, batch: list[int]) -> list[str]:
        return [_unit_key(env, arm[0], arm[1], i) for i in batch]

    # under torchrun / accelerate (RANK, WORLD_SIZE) each rank takes whole (env, batch) groups, so that NAMM and the
    # baselines replaying it run on the same rank; merge the shards with `namm-transfer report --merge`
    groups = []
    for env in envs:
        n = s.episodes_for(env)
        size = s.batch_episodes or n
        groups += [(env, list(range(i, min(i + size, n)))) for i in range(0, n, size)]
    mine = [g for i, g in enumerate(groups) if i % writer.world_size == writer.rank]
    todo = [(env, arm, b) for env, b in mine for arm in arms if not all(k in done for k in keys(env, arm, b))]
    progress = _Progress(s.progress, len(todo))
    t0 = time.perf_counter()
    try:
        for env, (proto, p), batch in todo:
            model, info = model_of(env, p)
            replay = None
            if proto is not None and proto.kind == "threshold" and p != "namm":
                by_key = {r["key"]: r for r in writer.records()}
                replay = []
                for k in keys(env, (proto, "namm"), batch):
                    rec = by_key.get(k)
                    if rec is None or "replay" not in rec:
                        raise RuntimeError(f"NAMM's record {k} (with its kept counts) is missing; cannot replay")
                    replay.append(rec["replay"])
            progress.unit(f"{env} {_label((None if proto is None else proto.label, p))} ep{batch[0]}-{batch[-1]}")
            # a partly recorded batch (killed while appending) is run again; only its missing records are added
            for rec in _run_batch(s, env, p, proto, batch, model, info, namm, replay, device, progress):
                if rec["key"] not in writer.done_keys():
                    writer.add(rec)
            progress.done()
    finally:
        progress.close()

    records = writer.records()
    order: list[Row] = [(None if proto is None else proto.label, p) for proto, p in arms]
    rows, breakdown = summarize_results(records, order)
    if s.canonical_model is not None:  # which DT made each row (the report shows it as a column)
        _label_models(records, rows, breakdown)
    png = Path(writer.summary_path).with_suffix(".png")
    plotted = plot_results(records, png, order) if s.plot else None
    threshold = any(proto.kind == "threshold" for proto in s.protocol_list())
    extra = {
        "breakdown_by": "env",
        "envs": sorted({r["env"] for r in records}),
        "policies": [row["policy"] for row in rows],
        "score_definition": "D4RL normalized return 100 * (return - REF_MIN) / (REF_MAX - REF_MIN); per env the mean "
        "over episodes, in rows the mean over envs",
        "paired_statistics": "vs_full / vs_namm: mean paired score difference over the same (env, seed) episodes "
        "(the protocol's NAMM for vs_namm) with a 95% stratified bootstrap interval (namm_transfer.stats, 2000 "
        "resamples, fixed seed); rows pool envs (mean over envs of the per-env mean difference), breakdown per env",
        "protocol_rules": {
            proto.label: (
                f"NAMM keeps its top {proto.ratio:g} share of scores and every budgeted baseline floor({proto.ratio:g}"
                " * seen tokens), per layer and head at every update"
                if proto.kind == "ratio"
                else "NAMM thresholds its scores; baselines replay its kept counts per episode, update, layer and "
                f"head; after NAMM's episode ended: {s.replay_fallback}"
            )
            for proto in s.protocol_list()
        },
        "replay_rule": None
        if not threshold
        else f"baselines replay NAMM's kept counts per episode, update, layer and head; after NAMM's episode ended: "
        f"{s.replay_fallback}",
        "models": {
            env: {k: info[k] for k in ("source", "content_hash", "stats_source")} for env, (_, info) in models.items()
        },
        **(
            {
                "canonical_models": {
                    env: {k: info.get(k) for k in ("source", "content_hash", "stats_source", "context_length")}
                    for env, (_, info) in canonical_models.items()
                }
            }
            if s.canonical_model is not None
            else {}
        ),
        "plot": plotted.name if plotted else None,
        "device": device,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    return writer.finalize(rows, breakdown, extra=extra)


# ----------------------------------------------------------------------------------------------------------------
# command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``eval --target decision-transformer`` (the common ones are already on ``parser``)."""
    parser.set_defaults(policies=DEFAULT_POLICIES, namm="default", dtype="float32")
    parser.add_argument(
        "--env",
        default="all",
        choices=[*ENVS, *PO_ENVS, "all"],
        help="task, or all three (default all); -po: positions only (needs --model); see also --model",
    )
    parser.add_argument(
        "--episodes",
        default=str(DEFAULT_EPISODES),
        help="episodes per task, the same seeds SEED..SEED+N-1 for every policy: N for every task, or e.g. "
        f"20,hopper=30 (default {DEFAULT_EPISODES})",
    )
    parser.add_argument(
        "--max-ep-len",
        type=int,
        default=DEFAULT_MAX_EP_LEN,
        help=f"steps per episode at most (default {DEFAULT_MAX_EP_LEN}, the D4RL length)",
    )
    parser.add_argument(
        "--update-interval",
        type=int,
        default=DEFAULT_UPDATE_INTERVAL,
        help=f"tokens between policy updates, a multiple of 3 (default {DEFAULT_UPDATE_INTERVAL})",
    )
    parser.add_argument(
        "--canonical-model",
        default=None,
        metavar="MODEL",
        help="the DT of the canonical row (same forms as --model, e.g. shipped:hopper-po-medium beside --model "
        "shipped:hopper-po-medium-long), run on the same seeds; its vs_full is how far its window falls below the "
        "cached long history (default: --model)",
    )
    parser.add_argument(
        "--context", type=int, default=None, help="K of the canonical window (default: the canonical model's)"
    )
    parser.add_argument(
        "--batch-episodes", type=int, default=None, help="episodes per lockstep batch (default: all of a task's in one)"
    )
    parser.add_argument(
        "--protocols",
        default=DEFAULT_PROTOCOLS,
        help="matched-budget protocols, comma-separated: ratio:R (NAMM keeps its top R share, baselines R of the "
        "seen tokens) and threshold (NAMM thresholds, baselines replay its kept counts); canonical and full run "
        f"once for all (default {DEFAULT_PROTOCOLS})",
    )
    parser.add_argument(
        "--no-noise-floor",
        action="store_true",
        help="do not run full-alt (the full cache with twice the update interval, whose vs_full is the noise floor)",
    )
    parser.add_argument(
        "--replay-fallback",
        default="hold",
        choices=list(FALLBACKS),
        help="threshold protocol: budget of a baseline episode that outlives NAMM's: hold NAMM's last counts or keep "
        "its ratio",
    )
    parser.add_argument("--level", default="medium", help="dataset level of the shipped models (default medium)")
    parser.add_argument("--version", default="v5", choices=list(VERSIONS), help="Gymnasium MuJoCo version")
    parser.add_argument("--target-return", type=float, default=None, help="return-to-go (default: the DT paper's)")
    parser.add_argument(
        "--stats", default=None, help="JSON with state_mean / state_std for models without namm_transfer_dt.json"
    )
    parser.add_argument("--dataset", default=None, help="D4RL-format file to compute the state normalization from")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-plot", action="store_true", help="do not write NAME.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run ``eval --target decision-transformer``; returns the exit code."""
    from .datasets import DatasetFormatError

    try:
        episodes, env_episodes = parse_episodes(args.episodes)
        parse_protocols(args.protocols)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.limit is not None:
        episodes = min(episodes, args.limit)
        env_episodes = {env: min(n, args.limit) for env, n in env_episodes.items()}
    settings = EvalSettings(
        envs=list(ENVS) if args.env == "all" else [args.env],
        policies=list(args.policies),
        model=args.model,
        canonical_model=getattr(args, "canonical_model", None),
        namm=args.namm or "default",
        episodes=episodes,
        env_episodes=env_episodes,
        batch_episodes=args.batch_episodes,
        max_ep_len=args.max_ep_len,
        update_interval=args.update_interval,
        context=args.context,
        protocols=args.protocols,
        noise_floor=not args.no_noise_floor,
        replay_fallback=args.replay_fallback,
        level=args.level,
        version=args.version,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype or "float32",
        target_return=args.target_return,
        stats=args.stats,
        dataset=args.dataset,
        output=args.output or default_output("decision-transformer"),
        plot=not args.no_plot,
        progress=not args.no_progress,
        threads=args.threads,
    )
    try:
        path = evaluate(settings, getattr(args, "command", None) or "namm-transfer eval --target decision-transformer")
    except (FileNotFoundError, ValueError, DatasetFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    import json

    summary = json.loads(Path(path).read_text(encoding="utf-8"))
    _print_table(summary)
    print(f"results: {path}")
    return 0


def _fmt(v: Any, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _interval(ci: Mapping[str, Any] | None) -> str:
    if not ci:
        return "-"
    return f"{ci['mean']:+.1f} [{ci['lo']:+.1f}, {ci['hi']:+.1f}]"


def _print_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    models = any("model" in row for row in rows)  # --canonical-model: which DT made each row
    print(
        f"{'protocol':<10} {'policy':<10} {'score':>14} {'retained':>9} {'vs full (95%)':>22} {'vs namm (95%)':>22}"
        + ("  model" if models else "")
    )
    for row in rows:
        score = f"{_fmt(row['score'])} +- {_fmt(row['score_std'])}"
        print(
            f"{row.get('protocol') or '-':<10} {row['policy']:<10} {score:>14} {_fmt(row.get('retained_cache'), 3):>9} "
            f"{_interval(row.get('vs_full')):>22} {_interval(row.get('vs_namm')):>22}"
            + (f"  {row.get('model', '-')}" if models else "")
        )


def _print_table(summary: Mapping[str, Any]) -> None:
    print("D4RL normalized return (mean over envs of the mean over episodes); paired differences over the same seeds")
    _print_rows(summary["rows"])
    for env, rows in summary["breakdown"].items():
        print(f"\n{env}")
        _print_rows(rows)
