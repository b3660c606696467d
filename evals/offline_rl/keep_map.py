"""What a memory policy keeps in a Decision Transformer's cache: by token type, timestep and layer.

A Decision Transformer's history is the token stream ``R_0, s_0, a_0, R_1, s_1, a_1, ...`` (return-to-go, state,
action; :data:`~namm_transfer.adapters.decision_transformer.TOKEN_TYPES`), so token ``i`` of an episode (its
position: the index among the episode's real tokens, which a rollout never pads before the episode ends) has type
``i % 3`` and timestep ``i // 3``. :func:`keep_map` reads, for one sequence of a :class:`~.rollout.CachedDT`, which
tokens each managed layer and KV head holds, either in the live cache now (``step=None``: after the last update
plus the tokens fed since, which no update has judged yet) or right after update ``step`` (with the actor's
``record_kept``, the default). The :class:`KeepMap` aggregates it:

* :meth:`KeepMap.share_by_layer_type` -- (L, 3) kept share of each token type in each layer;
* :meth:`KeepMap.share_by_timestep` -- (L, 3, T) share of heads keeping each token (the full picture);
* :meth:`KeepMap.share_by_bucket` -- kept share by timestep bucket x token type (over layers and heads).

Shares are kept tokens / tokens of the sequence so far, averaged over KV heads (and layers where pooled); the
counts behind them add up to the cache lengths the engine reports (``KeepMap.kept_counts()``).
:func:`keep_map_episode` runs one episode in a Gymnasium MuJoCo task with a policy and returns its map;
:func:`namm_policy` builds the NAMM under a matched-budget protocol (``ratio:0.5``: its own top half,
``threshold``: the paper's); :func:`plot_keep_maps` draws one row per map into a PNG (matplotlib, no pyplot state).

The DT notebook (``notebooks/decision_transformer.ipynb``) shows it for the NAMM under ``ratio:0.5`` and
``threshold``; the same picture (PNG) and its numbers (JSON) for any DT, from the command line::

    python -m namm_transfer.evals.offline_rl.keep_map --env hopper-po --model shipped:hopper-po-medium-long \
        --output runs/keep-map/hopper-po-long.png
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...adapters.decision_transformer import TOKEN_TYPES
from ..args import StrictParser

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ...namm import NAMM
    from ...policies.base import MemoryPolicy
    from ...protocols import Protocol
    from .rollout import CachedDT

logger = logging.getLogger(__name__)

__all__ = ["KeepMap", "keep_map", "keep_map_episode", "main", "namm_policy", "plot_keep_maps"]


@dataclass
class KeepMap:
    """Which tokens of one sequence every managed layer and KV head holds at one moment.

    Attributes:
        layers: the managed layers' host indices, (L,).
        mask: (L, H, T) bool, token ``i`` (position ``i``, type ``i % 3``, timestep ``i // 3``) is held by layer
            ``layers[l]``, KV head ``h``; T = the sequence's real tokens so far.
        step: the update the map is taken right after, or None for the live cache at the time of the call.
        policy: the policy's ``describe()``.
        info: anything else the maker adds (an episode's return, length, the engine's cache sizes, ...).
    """

    layers: list[int]
    mask: np.ndarray
    step: int | None = None
    policy: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.ndim != 3 or self.mask.shape[0] != len(self.layers):
            raise ValueError(f"mask must be (layers={len(self.layers)}, heads, tokens), got {self.mask.shape}")

    @property
    def n_tokens(self) -> int:
        """T: the sequence's real tokens so far (what a full cache holds)."""
        return int(self.mask.shape[2])

    @property
    def token_types(self) -> np.ndarray:
        """(T,) type of every token: 0 return-to-go, 1 state, 2 action (:data:`TOKEN_TYPES`)."""
        return np.arange(self.n_tokens) % 3

    @property
    def timesteps(self) -> np.ndarray:
        """(T,) timestep of every token."""
        return np.arange(self.n_tokens) // 3

    def kept_counts(self) -> np.ndarray:
        """(L, H) tokens held per layer and KV head (the engine's cache lengths)."""
        return self.mask.sum(-1)

    def seen_by_type(self) -> np.ndarray:
        """(3,) tokens of each type so far."""
        return np.bincount(self.token_types, minlength=3)

    def kept_by_layer_type(self) -> np.ndarray:
        """(L, 3) kept tokens of each type per layer, summed over KV heads."""
        return np.stack([self.mask[:, :, self.token_types == k].sum((1, 2)) for k in range(3)], axis=1)

    def share_by_layer_type(self) -> np.ndarray:
        """(L, 3) kept share of each token type per layer: kept / (tokens of that type x KV heads); NaN for a type
        with no token yet."""
        heads = self.mask.shape[1]
        seen = self.seen_by_type() * heads
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(seen > 0, self.kept_by_layer_type() / np.maximum(seen, 1), np.nan)

    def share_by_timestep(self) -> np.ndarray:
        """(L, 3, n_timesteps) share of KV heads that hold the token of each type and timestep; NaN where the token
        does not exist yet (the newest timestep's action)."""
        n_t = (self.n_tokens + 2) // 3
        out = np.full((len(self.layers), 3, n_t), np.nan)
        share = self.mask.mean(1)  # (L, T)
        for k in range(3):
            idx = np.arange(k, self.n_tokens, 3)
            out[:, k, : idx.size] = share[:, idx]
        return out

    def share_by_bucket(self, bucket: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Kept share by timestep bucket x token type, over layers and KV heads.

        Args:
            bucket: timesteps per bucket (default: about 10 buckets over the history).
        Returns:
            ``(starts, share)``: (n_buckets,) first timestep of each bucket and (n_buckets, 3) kept / present tokens
            of each type in it (NaN where a bucket has no token of a type).
        """
        n_t = max(1, (self.n_tokens + 2) // 3)
        width = int(bucket or max(1, math.ceil(n_t / 10)))
        if width < 1:
            raise ValueError(f"bucket must be >= 1 timestep, got {bucket}")
        starts = np.arange(0, n_t, width)
        which = self.timesteps // width
        kept = self.mask.sum((0, 1))  # (T,): layers x heads holding each token
        slots = len(self.layers) * self.mask.shape[1]
        share = np.full((starts.size, 3), np.nan)
        for k in range(3):
            sel = self.token_types == k
            num = np.bincount(which[sel], weights=kept[sel], minlength=starts.size)
            den = np.bincount(which[sel], minlength=starts.size) * slots
            share[:, k] = np.where(den > 0, num / np.maximum(den, 1), np.nan)
        return starts, share

    def summary(self, bucket: int | None = None) -> dict[str, Any]:
        """A JSON-ready digest: tokens, kept counts, shares by layer x type and by bucket x type."""
        starts, share = self.share_by_bucket(bucket)

        def clean(x: np.ndarray) -> list[Any]:
            return [None if isinstance(v, float) and math.isnan(v) else v for v in x.tolist()]

        return {
            "step": self.step,
            "n_tokens": self.n_tokens,
            "layers": list(self.layers),
            "kept_counts": self.kept_counts().tolist(),
            "share_by_layer_type": {
                str(layer): dict(zip(TOKEN_TYPES, clean(row), strict=True))
                for layer, row in zip(self.layers, self.share_by_layer_type(), strict=True)
            },
            "bucket_starts": starts.tolist(),
            "share_by_bucket_type": {name: clean(share[:, k]) for k, name in enumerate(TOKEN_TYPES)},
        }


def keep_map(actor: CachedDT, sequence: int = 0, step: int | None = None) -> KeepMap:
    """The :class:`KeepMap` of sequence ``sequence`` of ``actor`` (still attached).

    Args:
        actor: a :class:`~.rollout.CachedDT` that has acted (before :meth:`~.rollout.CachedDT.detach`).
        sequence: index in the batch.
        step: None: the live cache now; an update index (negative counts from the last): the tokens held right
            after that update (needs ``record_kept=True``, the actor's default).
    Raises:
        ValueError: a bad index, no such update, or no recorded positions.
    """
    engine = actor.engine
    if not 0 <= sequence < actor.batch_size:
        raise ValueError(f"sequence {sequence} is outside the batch of {actor.batch_size}")
    stats = engine.stats
    layers = list(stats.managed_layers)
    if step is None:
        n = int(engine.n_seen[sequence])
        mask = np.zeros((len(layers), int(engine.host.n_kv_heads), n), dtype=bool)
        for li, layer in enumerate(layers):
            st = engine.states[layer]
            valid = st.valid[sequence].cpu().numpy()
            pos = st.position[sequence].cpu().numpy()
            for h in range(valid.shape[0]):
                mask[li, h] = _mask(pos[h][valid[h]], n, layer)
        return KeepMap(layers, mask, None, actor.policy.describe())
    steps = sorted(stats.kept_positions)
    if not steps:
        if stats.kept_counts:
            raise ValueError("no kept positions were recorded: create the CachedDT with record_kept=True")
        raise ValueError("no update has happened yet (the history is shorter than update_interval tokens)")
    index = step if step >= 0 else len(steps) + step
    if index not in stats.kept_positions:
        raise ValueError(f"no update {step}: there were {len(steps)} (0 .. {len(steps) - 1})")
    n = int(stats.update_n_seen[index][sequence])
    per_layer = stats.kept_positions[index]
    mask = np.zeros((len(layers), int(engine.host.n_kv_heads), n), dtype=bool)
    for li, layer in enumerate(layers):
        for h, positions in enumerate(per_layer[layer][sequence]):
            mask[li, h] = _mask(np.asarray(positions), n, layer)
    return KeepMap(layers, mask, index, actor.policy.describe())


def _mask(positions: np.ndarray, n: int, layer: int) -> np.ndarray:
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= n or np.unique(positions).size != positions.size):
        raise ValueError(f"layer {layer}: held positions are not distinct tokens of 0 .. {n - 1}")
    out = np.zeros(n, dtype=bool)
    out[positions] = True
    return out


def namm_policy(namm: NAMM, protocol: Protocol | str) -> MemoryPolicy:
    """The NAMM under a matched-budget protocol: ``ratio:R`` keeps its own top ``R`` share of scores per layer and
    head at every update, ``threshold`` the tokens it scores >= 0 (the paper's)."""
    from ...policies.base import RatioBudget
    from ...policies.namm_policy import NAMMPolicy
    from ...protocols import parse_protocols

    (proto,) = parse_protocols(protocol) if isinstance(protocol, str) else (protocol,)
    if proto.kind == "ratio":
        assert proto.ratio is not None
        return NAMMPolicy(namm, budget=RatioBudget(proto.ratio))
    return NAMMPolicy(namm)


def keep_map_episode(
    model: nn.Module,
    env_name: str,
    policy: MemoryPolicy | str,
    *,
    max_steps: int = 200,
    seed: int = 0,
    update_interval: int = 48,
    state_mean: Any = None,
    state_std: Any = None,
    return_scale: float = 1000.0,
    target_return: float | None = None,
    step: int | None = None,
    version: str = "v5",
) -> KeepMap:
    """Run one episode (reset with ``seed``, at most ``max_steps`` steps) with ``policy`` attached and return the
    :class:`KeepMap` at its end (``step`` as in :func:`keep_map`).

    ``info`` of the map holds ``return``, ``score`` (D4RL normalized), ``length``, ``cache_tokens`` (live tokens at
    the end, mean over layers and KV heads, as the engine reports them), ``kept_counts`` ((L, H) at update
    ``step``, the engine's; None for ``step=None``) and ``retained_cache`` (mean over the episode's forward calls).
    """
    import torch

    from .envs import get_env_info, make_env
    from .rollout import CachedDT, check_model_matches_env

    info_env = get_env_info(env_name)
    cfg: Any = model.config
    state_dim = int(cfg.state_dim)
    mean = np.zeros(state_dim) if state_mean is None else np.asarray(state_mean, dtype=np.float64)
    std = np.ones(state_dim) if state_std is None else np.asarray(state_std, dtype=np.float64)
    rtg = float(info_env.target_return if target_return is None else target_return) / return_scale
    steps = min(int(max_steps), int(cfg.max_ep_len))
    env = make_env(env_name, version=version, max_episode_steps=steps)
    total, length = 0.0, 0
    try:
        check_model_matches_env(model, env, env_name)
        obs, _ = env.reset(seed=seed)
        with torch.no_grad(), CachedDT(model, policy, update_interval=update_interval) as actor:
            actor.reset(1)
            for _ in range(steps):
                state = (np.asarray(obs, dtype=np.float64) - mean) / std
                action = actor.act([rtg], state[None])[0].float().cpu().numpy().astype(np.float64)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(reward)
                length += 1
                rtg -= float(reward) / return_scale
                if terminated or truncated:
                    break
            out = keep_map(actor, 0, step)
            counts = None
            if out.step is not None:
                kept = actor.stats.kept_counts[out.step]
                counts = [kept[layer][0] for layer in out.layers]
            out.info.update(
                cache_tokens=float(actor.cache_tokens()[0]),
                kept_counts=counts,
                retained_cache=float(actor.retained_per_episode()[0]),
            )
    finally:
        env.close()
    out.info.update(
        env=info_env.name,
        seed=seed,
        update_interval=update_interval,
        length=length,
        score=float(info_env.normalized_score(total)),
        **{"return": total},
    )
    return out


_TYPE_SHORT = {"return": "R", "state": "s", "action": "a"}


def plot_keep_maps(
    maps: Mapping[str, KeepMap], path: str | Path, bucket: int | None = None, dpi: int = 80
) -> Path | None:
    """One row per map (``{label: map}``, e.g. per protocol): the share of KV heads holding each token by layer x
    type (rows) and timestep (columns); the kept share per layer and type; and the kept share by timestep bucket,
    one line per type. Written to ``path`` (PNG, 12 inches wide at ``dpi``) without touching pyplot's state.

    Returns:
        the path, or None when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: no keep-map plot (pip install matplotlib)")
        return None
    if not maps:
        raise ValueError("plot_keep_maps needs at least one map")
    fig = Figure(figsize=(12, 3.2 * len(maps)), layout="constrained")
    axes = fig.subplots(len(maps), 3, squeeze=False, width_ratios=[3.2, 1.1, 1.8])
    for row, (label, m) in enumerate(maps.items()):
        ax_map, ax_layer, ax_bucket = axes[row]
        grid = m.share_by_timestep()  # (L, 3, n_t)
        image = grid.reshape(-1, grid.shape[-1])
        shown = ax_map.imshow(
            np.ma.masked_invalid(image), aspect="auto", interpolation="nearest", vmin=0.0, vmax=1.0, cmap="viridis"
        )
        names = [f"L{layer} {_TYPE_SHORT[t]}" for layer in m.layers for t in TOKEN_TYPES]
        ax_map.set_yticks(range(len(names)), names, fontsize=7)
        for b in range(1, len(m.layers)):
            ax_map.axhline(3 * b - 0.5, color="white", linewidth=1.0)
        when = "live cache at the end" if m.step is None else f"after update {m.step}"
        ax_map.set_title(f"{label}: kept share of heads ({when}, {m.n_tokens} tokens)", fontsize=9)
        ax_map.set_xlabel("timestep")
        fig.colorbar(shown, ax=ax_map, fraction=0.03, pad=0.01)

        share = m.share_by_layer_type()
        ax_layer.imshow(np.ma.masked_invalid(share), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, k), v in np.ndenumerate(share):
            if not math.isnan(v):
                ax_layer.text(k, i, f"{v:.0%}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax_layer.set_xticks(range(3), list(TOKEN_TYPES), fontsize=7)
        ax_layer.set_yticks(range(len(m.layers)), [f"L{layer}" for layer in m.layers], fontsize=7)
        ax_layer.set_title("kept share: layer x type", fontsize=9)

        starts, by_bucket = m.share_by_bucket(bucket)
        for k, name in enumerate(TOKEN_TYPES):
            ax_bucket.plot(starts, by_bucket[:, k], marker="o", markersize=3, label=name)
        ax_bucket.set_ylim(-0.03, 1.03)
        ax_bucket.set_xlabel("timestep (bucket start)")
        ax_bucket.set_ylabel("kept share")
        ax_bucket.set_title("by timestep bucket x type", fontsize=9)
        ax_bucket.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


# ----------------------------------------------------------------------------------------------------------------
# command line
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m namm_transfer.evals.offline_rl.keep_map``: one episode per protocol, the picture (``--output``
    PNG) and its numbers (the same name with ``.json``: :meth:`KeepMap.summary` and the episode of every protocol)."""
    from ...checkpoint import load_namm
    from ...protocols import parse_protocols
    from .envs import ENVS
    from .pomdp import PO_ENVS
    from .train import load_dt, resolve_dt

    parser = StrictParser(
        prog="python -m namm_transfer.evals.offline_rl.keep_map",
        description="What the NAMM keeps in a Decision Transformer's cache: token type by timestep and layer.",
    )
    parser.add_argument("--env", default="hopper", choices=[*ENVS, *PO_ENVS], help="task (default hopper)")
    parser.add_argument("--model", default=None, help="DT: shipped:NAME, a folder or hub id (default: the shipped DT)")
    parser.add_argument("--level", default="medium", help="dataset level of the default shipped DT (default medium)")
    parser.add_argument("--namm", default="default", help="NAMM name or checkpoint folder (default: default)")
    parser.add_argument("--protocols", default="ratio:0.5,threshold", help="protocols, one map each")
    parser.add_argument("--max-steps", type=int, default=200, help="episode length at most (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--update-interval", type=int, default=48, help="a multiple of 3 (default 48)")
    parser.add_argument("--step", type=int, default=None, help="map after this update (-1: the last; default: end)")
    parser.add_argument("--bucket", type=int, default=None, help="timesteps per bucket (default: about 10 buckets)")
    parser.add_argument("--output", required=True, help="PNG to write (the numbers go to the same name .json)")
    args = parser.parse_args(argv)
    try:
        model, info = load_dt(resolve_dt(args.model, args.env, args.level), env=args.env, level=args.level)
        namm = load_namm(args.namm)
        maps = {
            proto.label: keep_map_episode(
                model,
                args.env,
                namm_policy(namm, proto),
                max_steps=args.max_steps,
                seed=args.seed,
                update_interval=args.update_interval,
                state_mean=info["state_mean"],
                state_std=info["state_std"],
                return_scale=float(info["return_scale"]),
                target_return=info.get("target_return"),
                step=args.step,
            )
            for proto in parse_protocols(args.protocols)
        }
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    png = Path(args.output)
    plot_keep_maps(maps, png, args.bucket)
    digest = {
        "model": info["source"],
        "model_sha256": info["content_hash"],
        "namm": str(args.namm),
        "env": args.env,
        "seed": args.seed,
        "update_interval": args.update_interval,
        "token_types": list(TOKEN_TYPES),
        "maps": {label: {**m.summary(args.bucket), "policy": m.policy, "episode": m.info} for label, m in maps.items()},
    }
    png.with_suffix(".json").write_text(json.dumps(digest, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    for label, m in maps.items():
        share = m.share_by_layer_type()
        kept = ", ".join(f"{name} {np.nanmean(share[:, k]):.1%}" for k, name in enumerate(TOKEN_TYPES))
        print(f"{label}: {m.info['length']} steps, score {m.info['score']:.1f}, {m.n_tokens} tokens; kept: {kept}")
    print(f"wrote {png} and {png.with_suffix('.json')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
