"""``namm-transfer eval --target decision-transformer``: a frozen language NAMM on Decision Transformers.

For every task (hopper, halfcheetah, walker2d) and every policy, a batch of episodes (seeds ``seed + i``)
runs in lockstep in the Gymnasium MuJoCo env and the D4RL normalized return of each is recorded:

* ``canonical`` -- the DT paper's evaluation: the last K timesteps recomputed every step (no cache).
* ``full`` -- the whole history in the KV cache, nothing evicted.
* ``namm`` -- the whole history in the cache, managed by the frozen, language-trained NAMM (``--namm``).
* ``h2o``, ``l2``, ``streaming``, ``random`` (and any other registered budgeted policy) -- at NAMM's cache
  sizes: NAMM's kept counts, recorded per episode, per update and per layer and head in NAMM's run of the
  same episodes (same seeds, same batch, same update interval), are replayed as the baseline's budget
  (``--budget namm``, the default; ``--budget 0.5`` / ``256t`` gives a fixed budget instead).

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

Results: ``NAME.jsonl`` (one record per env x policy x episode, appended after each batch; a killed run
resumes without repeating a finished batch, and baselines read NAMM's counts back from it), ``NAME.json``
(summary: ``rows`` per policy with ``score`` = the mean over envs of the mean normalized return,
``breakdown`` per env) and ``NAME.png`` (return and cache size over episode time). ``retained_cache`` of a
cached policy is the mean over managed layers (all of them) and forward calls of live / seen tokens;
the canonical window holds no cache (its ``context_fraction`` is the window's share of the history).

Defaults: 3 episodes of at most 1000 steps (the D4RL length) per task, update interval 48 tokens (16 timesteps),
the shipped DTs (``namm_transfer/weights/dt/{env}-medium``), one torch thread. Measured with a canonical-size DT
(3 layers, hidden 128) on halfcheetah, whose episodes always last 1000 steps: 7 policies x 3 episodes took 94 CPU
seconds (4.6 min wall on 2 cores shared with two other jobs, load ~5); so the three tasks take about 5 min of CPU,
less when hopper / walker2d episodes end early. Lockstep steps per second (3 episodes, loaded machine): canonical
~36, full cache ~18, NAMM ~21, H2O ~26, L2 / streaming ~29.
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

from ..args import default_output
from .envs import ENVS, VERSIONS, get_env_info

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
    "plot_results",
    "summarize_results",
]

DEFAULT_POLICIES = "canonical,full,namm,h2o,l2,streaming,random"
DEFAULT_EPISODES = 3
DEFAULT_MAX_EP_LEN = 1000
DEFAULT_UPDATE_INTERVAL = 48
TRACE_POINTS = 100
"""Per-episode traces (return, cache size) are stored at about this many time steps."""
UNBUDGETED = ("canonical", "full", "namm")
FALLBACKS = ("hold", "ratio")


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
    batch_episodes: int | None = None
    """Episodes per lockstep batch (default: all in one)."""
    max_ep_len: int = DEFAULT_MAX_EP_LEN
    update_interval: int = DEFAULT_UPDATE_INTERVAL
    context: int | None = None
    """K of the canonical window (default: the model's, 20)."""
    budget: str = "namm"
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

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share (recorded in the results header)."""
        return {
            "episodes": self.episodes,
            "seeds": [self.seed + i for i in range(self.episodes)],
            "batch_episodes": self.batch_episodes or self.episodes,
            "max_ep_len": self.max_ep_len,
            "update_interval": self.update_interval,
            "context_length": self.context,
            "budget": "replay:namm" if self.budget == "namm" else str(self.budget),
            "replay_fallback": self.replay_fallback if self.budget == "namm" else None,
            "level": self.level,
            "gym_version": self.version,
            "dtype": self.dtype,
            "target_return": self.target_return,
            "stats": self.stats,
            "dataset": self.dataset,
            "trace_points": TRACE_POINTS,
            "managed_layers": "all",
            "retained_cache": "mean over managed layers and forward calls of live / seen tokens",
        }


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


def _trace_index(length: int, max_ep_len: int) -> list[int]:
    stride = max(1, math.ceil(max_ep_len / TRACE_POINTS))
    idx = list(range(0, length, stride))
    if length and idx[-1] != length - 1:
        idx.append(length - 1)
    return idx


def _run_batch(
    s: EvalSettings,
    env_name: str,
    policy_name: str,
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
    policy: Any = "full"
    recorder = None
    budget = None
    if policy_name == "namm":
        from ...policies.namm_policy import NAMMPolicy

        recorder = _recording_policy(NAMMPolicy(namm))
        policy = recorder
    elif policy_name not in UNBUDGETED:
        if s.budget == "namm":
            assert replay is not None
            budget = _replay_budget(replay, s.replay_fallback)
        else:
            budget = s.budget
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
        update_interval=s.update_interval,
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
        full = [res["trace"]["full_tokens"][t][j] for t in idx]
        peak_tokens = max((c for c in (row[j] for row in res["trace"]["cache_tokens"]) if c is not None), default=0.0)
        ret = float(res["returns"][j])
        rec: dict[str, Any] = {
            "key": f"{env_name}/{policy_name}/ep{ep:03d}",
            "policy": policy_name,
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
            "update_interval": s.update_interval if mode == "cached" else None,
            "context_length": context if mode == "canonical" else None,
            "target_return": float(res["target_return"]),
            "return_scale": float(res["return_scale"]),
            "model": info.get("source"),
            "model_sha256": info.get("content_hash"),
            "trace": {
                "t": idx,
                "return": [float(cum[t]) for t in idx],
                "cache_tokens": cache,
                "full_tokens": full,
            },
        }
        if replays is not None:
            rec["replay"] = replays[j]
        if budget is not None and not isinstance(budget, str):
            rec["budget"] = budget.describe()
            rec["replay_updates"] = len(budget.updates[j])
            rec["replay_extrapolated"] = len(budget.extrapolated[j])
        elif budget is not None:
            rec["budget"] = str(budget)
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


def _policy_row(policy: str, recs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "policy": policy,
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
        row["replay_extrapolated_fraction"] = _mean(
            [r["replay_extrapolated"] / r["replay_updates"] if r["replay_updates"] else 0.0 for r in extrap]
        )
    return row


def summarize_results(
    records: Sequence[Mapping[str, Any]], policies: Sequence[str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """``(rows, breakdown)`` of the summary.

    ``breakdown[env]`` has one row per policy over that env's episodes: ``score`` = mean D4RL normalized
    return, ``score_std`` = its standard deviation over episodes, ``n`` episodes, mean ``return``,
    ``retained_cache``, ``throughput`` (env steps/s of the batch), ... ``rows`` has one row per policy:
    ``score`` = mean over envs of the per-env scores, ``score_std`` = mean over envs of the per-env stds,
    ``n`` = episodes in all, ``envs`` = the envs averaged, other fields averaged over envs.
    """
    envs = sorted({r["env"] for r in records})
    order = list(policies or [])
    for r in records:
        if r["policy"] not in order:
            order.append(r["policy"])
    breakdown: dict[str, list[dict[str, Any]]] = {}
    for env in envs:
        rows = []
        for p in order:
            recs = [r for r in records if r["env"] == env and r["policy"] == p]
            if recs:
                rows.append(_policy_row(p, recs))
        breakdown[env] = rows
    overall = []
    for p in order:
        per_env = [row for env in envs for row in breakdown[env] if row["policy"] == p]
        if not per_env:
            continue
        row: dict[str, Any] = {"policy": p}
        for key in (
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
            row[key] = _mean([e.get(key) for e in per_env])
        row["n"] = sum(e["n"] for e in per_env)
        row["envs"] = [env for env in envs if any(e["policy"] == p for e in breakdown[env])]
        overall.append(row)
    return overall, breakdown


def plot_results(
    records: Sequence[Mapping[str, Any]], path: str | Path, policies: Sequence[str] | None = None
) -> Path | None:
    """Plot mean return so far and mean cache size (tokens) over episode time, one column per env.

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
    order = list(policies or [])
    for r in records:
        if r["policy"] not in order:
            order.append(r["policy"])
    if not envs:
        return None
    fig, axes = plt.subplots(2, len(envs), figsize=(4.5 * len(envs), 6.5), squeeze=False, sharex="col")
    colors = plt.get_cmap("tab10")
    for c, env in enumerate(envs):
        ax_r, ax_c = axes[0][c], axes[1][c]
        for k, p in enumerate(order):
            recs = [r for r in records if r["env"] == env and r["policy"] == p and r.get("trace")]
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
            if rr.size:
                ax_r.plot(grid, rr.mean(0), color=colors(k % 10), label=p)
            if cc.size:
                with np.errstate(all="ignore"):
                    ax_c.plot(grid, np.nanmean(cc, 0), color=colors(k % 10), label=p)
        ax_r.set_title(env)
        ax_r.set_ylabel("return so far (mean over episodes)")
        ax_c.set_ylabel("cache tokens (mean over running episodes)")
        ax_c.set_xlabel("episode step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------------
# the run
def _ordered_policies(names: Sequence[str], budget: str) -> list[str]:
    from ...registry import list_policies

    known = ["canonical", *list_policies()]
    unknown = [p for p in names if p not in known]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; known: {', '.join(known)}")
    out = list(dict.fromkeys(names))
    needs_namm = budget == "namm" and any(p not in UNBUDGETED for p in out)
    if needs_namm and "namm" not in out:
        logger.info("adding the namm policy: the baselines replay its cache sizes (--budget namm)")
        out.append("namm")
    # NAMM runs before the baselines that replay it
    head = [p for p in out if p in UNBUDGETED]
    return sorted(head, key=UNBUDGETED.index) + [p for p in out if p not in UNBUDGETED]


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

    if s.episodes < 1 or s.max_ep_len < 1:
        raise ValueError("episodes and max_ep_len must be >= 1")
    if s.update_interval < 3 or s.update_interval % 3:
        raise ValueError(f"--update-interval must be a positive multiple of 3, got {s.update_interval}")
    if s.replay_fallback not in FALLBACKS:
        raise ValueError(f"--replay-fallback must be one of {FALLBACKS}")
    if s.budget != "namm":
        from ...policies.base import parse_budget

        parse_budget(s.budget)  # fail early on a bad spec
    policies = _ordered_policies(s.policies, s.budget)
    envs = [get_env_info(e).name for e in s.envs]
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if s.threads and str(device) == "cpu":
        torch.set_num_threads(int(s.threads))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[s.dtype]

    # models first: fail before anything runs
    models: dict[str, tuple[Any, dict[str, Any]]] = {}
    for env in envs:
        source = resolve_dt(s.model, env, s.level)
        model, info = load_dt(
            source, env=env, level=s.level, stats=s.stats, dataset=s.dataset, device=device, dtype=dtype
        )
        if s.max_ep_len > info["max_ep_len"]:
            raise ValueError(
                f"--max-ep-len {s.max_ep_len} exceeds the {env} model's max_ep_len {info['max_ep_len']} "
                "(the size of its timestep embedding)"
            )
        models[env] = (model, info)

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
    )
    done = writer.done_keys()
    # the file must not mix checkpoints: a done episode of an env was produced by the same weights
    for rec in writer.records():
        env = rec.get("env")
        if env in models and rec.get("model_sha256") not in (None, models[env][1]["content_hash"]):
            raise ValueError(
                f"{writer.jsonl_path} holds {env} episodes of another model (sha256 {str(rec['model_sha256'])[:12]}, "
                f"now {models[env][1]['content_hash'][:12]}); use a new --output"
            )

    size = s.batch_episodes or s.episodes
    batches = [list(range(i, min(i + size, s.episodes))) for i in range(0, s.episodes, size)]

    def keys(env: str, policy: str, batch: list[int]) -> list[str]:
        return [f"{env}/{policy}/ep{i:03d}" for i in batch]

    # under torchrun / accelerate (RANK, WORLD_SIZE) each rank takes whole (env, batch) groups, so that NAMM and the
    # baselines replaying it run on the same rank; merge the shards with `namm-transfer report --merge`
    groups = [(env, batch) for env in envs for batch in batches]
    mine = [g for i, g in enumerate(groups) if i % writer.world_size == writer.rank]
    todo = [(env, p, batch) for env, batch in mine for p in policies if not all(k in done for k in keys(env, p, batch))]
    progress = _Progress(s.progress, len(todo))
    t0 = time.perf_counter()
    try:
        for env, p, batch in todo:
            model, info = models[env]
            replay = None
            if p not in UNBUDGETED and s.budget == "namm":
                by_key = {r["key"]: r for r in writer.records()}
                replay = []
                for k in keys(env, "namm", batch):
                    rec = by_key.get(k)
                    if rec is None or "replay" not in rec:
                        raise RuntimeError(f"NAMM's record {k} (with its kept counts) is missing; cannot replay")
                    replay.append(rec["replay"])
            progress.unit(f"{env} {p} ep{batch[0]}-{batch[-1]}")
            # a partly recorded batch (killed while appending) is run again; only its missing records are added
            for rec in _run_batch(s, env, p, batch, model, info, namm, replay, device, progress):
                if rec["key"] not in writer.done_keys():
                    writer.add(rec)
            progress.done()
    finally:
        progress.close()

    records = writer.records()
    rows, breakdown = summarize_results(records, policies)
    png = Path(writer.summary_path).with_suffix(".png")
    plotted = plot_results(records, png, policies) if s.plot else None
    extra = {
        "breakdown_by": "env",
        "envs": sorted({r["env"] for r in records}),
        "policies": [row["policy"] for row in rows],
        "score_definition": "D4RL normalized return 100 * (return - REF_MIN) / (REF_MAX - REF_MIN); per env the mean "
        "over episodes, in rows the mean over envs",
        "replay_rule": None
        if s.budget != "namm"
        else f"baselines replay NAMM's kept counts per episode, update, layer and head; after NAMM's episode ended: "
        f"{s.replay_fallback}",
        "models": {
            env: {k: info[k] for k in ("source", "content_hash", "stats_source")} for env, (_, info) in models.items()
        },
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
        "--env", default="all", choices=[*ENVS, "all"], help="task, or all three (default all); see also --model"
    )
    parser.add_argument(
        "--episodes",
        type=int,
        default=DEFAULT_EPISODES,
        help=f"episodes per task and policy, seeds SEED..SEED+N-1 (default {DEFAULT_EPISODES})",
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
    parser.add_argument("--context", type=int, default=None, help="K of the canonical window (default: the model's)")
    parser.add_argument(
        "--batch-episodes", type=int, default=None, help="episodes per lockstep batch (default: all in one)"
    )
    parser.add_argument(
        "--budget",
        default="namm",
        help="baselines' cache budget: namm (replay NAMM's cache sizes, default), a ratio (0.5, 50%%) or tokens (256t)",
    )
    parser.add_argument(
        "--replay-fallback",
        default="hold",
        choices=list(FALLBACKS),
        help="budget of a baseline episode that outlives NAMM's: hold NAMM's last counts or keep its ratio",
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

    episodes = args.episodes if args.limit is None else min(args.episodes, args.limit)
    settings = EvalSettings(
        envs=list(ENVS) if args.env == "all" else [args.env],
        policies=list(args.policies),
        model=args.model,
        namm=args.namm or "default",
        episodes=episodes,
        batch_episodes=args.batch_episodes,
        max_ep_len=args.max_ep_len,
        update_interval=args.update_interval,
        context=args.context,
        budget=args.budget,
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


def _print_table(summary: Mapping[str, Any]) -> None:
    head = f"{'policy':<11} {'score':>14} {'retained':>9} {'steps/s':>8}"
    print("D4RL normalized return (mean over envs of the mean over episodes)")
    print(head)
    for row in summary["rows"]:
        score = f"{_fmt(row['score'])} +- {_fmt(row['score_std'])}"
        print(
            f"{row['policy']:<11} {score:>14} {_fmt(row.get('retained_cache'), 3):>9} {_fmt(row.get('throughput')):>8}"
        )
    for env, rows in summary["breakdown"].items():
        print(f"\n{env}")
        for row in rows:
            score = f"{_fmt(row['score'])} +- {_fmt(row['score_std'])}"
            print(
                f"{row['policy']:<11} {score:>14} {_fmt(row.get('retained_cache'), 3):>9} "
                f"{_fmt(row.get('throughput')):>8}"
            )
