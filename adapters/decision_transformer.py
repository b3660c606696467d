"""Adapter for Hugging Face Decision Transformers (``transformers.DecisionTransformerModel``).

A Decision Transformer (Chen et al., 2021) reads a trajectory as the token stream
``R_0, s_0, a_0, R_1, s_1, a_1, ...`` (return-to-go, state, action), one embedding head per
modality, and predicts ``a_t`` from the hidden state of the state token ``s_t``. Its GPT-2
encoder gives every token position id 0 (time enters only through the timestep embedding added
to each token), so a cached rollout over the whole history is exactly the uncached forward over
that history; eviction only removes keys and values, and positions never need re-deriving.

Every encoder layer is managed by the policy. The retained-cache denominator is the number of
tokens of the whole history so far (three per completed timestep).

Feeding protocol (what :class:`DecisionTransformerAdapter.forward` expects):

* The engine is fed stacked token embeddings (see :meth:`DecisionTransformerAdapter.embed_steps`
  and :meth:`DecisionTransformerAdapter.embed_tokens`); ``input_ids`` are not used.
* The token type of each row is its arrival clock modulo 3 (0 return, 1 state, 2 action), so a
  stream must start with ``R_0`` at clock 0 and any padding must come in whole timesteps
  (3 rows). Online rollouts never pad before an episode ends, so a token's engine "position"
  (its arrival index among real tokens) equals its clock and :func:`token_type` applies to the
  positions recorded in :attr:`EvictionStats.kept_positions`.
* ``update_interval`` should be a multiple of 3 so that every eviction happens on a timestep
  boundary (right after an action token); :func:`feed_tokens` splits chunks at update steps so
  the clock hits every multiple of ``update_interval``.

Use it through :func:`namm_transfer.attach` (``attach(dt, "h2o", budget=0.5, update_interval=48)``)
and :func:`feed_tokens`; the rollout policies in ``namm_transfer.evals.offline_rl.rollout`` do both.
``AttachedMemory.prefill`` / ``generate`` are for language models and do not apply here.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from namm_transfer.policies.base import HostInfo

from .hf_attention import HFCacheRouting

__all__ = [
    "ADAPTER",
    "DEFAULT_AGE_EDGES",
    "DecisionTransformerAdapter",
    "TOKEN_TYPES",
    "feed_tokens",
    "kept_token_stats",
    "token_timestep",
    "token_type",
]

TOKEN_TYPES: tuple[str, str, str] = ("return", "state", "action")
"""Name of each token type; index = token index (clock or position) modulo 3."""

RETURN, STATE, ACTION = 0, 1, 2

DEFAULT_AGE_EDGES: tuple[int, ...] = (0, 5, 20, 100, 500)
"""Lower edges (in timesteps) of the age buckets of :func:`kept_token_stats`; the last is open."""


def token_type(index: Any) -> Any:
    """Token type (0 return, 1 state, 2 action) of a token index (arrival clock or position).

    Works on ints, numpy arrays and tensors. Valid for streams that start with ``R_0`` at index 0
    and pad only in whole timesteps.
    """
    return index % 3


def token_timestep(index: Any) -> Any:
    """Timestep of a token index (arrival clock or position): ``index // 3``."""
    return index // 3


class DecisionTransformerAdapter(HFCacheRouting):
    """Host questions answered for a ``DecisionTransformerModel``: layers, cache access, chunk feeding.

    Args:
        model: a ``transformers.DecisionTransformerModel`` (or subclass). Anything else raises
            ``TypeError`` (the registry then tries the next adapter).
    """

    name = "decision-transformer"

    def __init__(self, model: nn.Module) -> None:
        from transformers import DecisionTransformerModel

        if not isinstance(model, DecisionTransformerModel):
            raise TypeError(
                f"{type(model).__name__} is not a DecisionTransformerModel; supported: DecisionTransformerModel"
            )
        cfg = model.config
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("Decision Transformers with cross-attention (add_cross_attention=True) are not supported")
        self.model: Any = model
        self.config = cfg
        self.encoder: Any = model.encoder
        self.attn_modules: list[Any] = [block.attn for block in self.encoder.h]
        for i, m in enumerate(self.attn_modules):
            if getattr(m, "layer_idx", i) != i:
                raise RuntimeError(f"attention module {i} reports layer_idx {m.layer_idx}")
        self.managed = tuple(range(len(self.attn_modules)))
        self.state_dim = int(cfg.state_dim)
        self.act_dim = int(cfg.act_dim)
        self.max_ep_len = int(cfg.max_ep_len)
        # transformers 5.2x names the encoder's cache argument ``cache``, 5.17 ``past_key_values``. A wrong name
        # would not fail: the encoder's ``**kwargs`` would swallow it and every chunk would run on a fresh cache.
        params = inspect.signature(self.encoder.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        if self._cache_kw not in params:
            raise RuntimeError(f"{type(self.encoder).__name__}.forward takes neither `cache` nor `past_key_values`")
        self._saved: Any = None

    # ----- host description ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def host_info(self) -> HostInfo:
        c = self.config
        n_heads = int(c.num_attention_heads)
        return HostInfo(
            n_layers=len(self.attn_modules),
            managed_layers=self.managed,
            n_kv_heads=n_heads,
            n_q_heads=n_heads,
            head_dim=int(c.hidden_size) // n_heads,
            family="decision-transformer",
        )

    # ----- embeddings -------------------------------------------------------------------------------
    def _timestep_embedding(self, timesteps: Tensor) -> Tensor:
        timesteps = torch.as_tensor(timesteps, dtype=torch.long, device=self.device)
        if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= self.max_ep_len):
            raise ValueError(
                f"timesteps must lie in [0, {self.max_ep_len}) (the model's max_ep_len), got "
                f"[{int(timesteps.min())}, {int(timesteps.max())}]"
            )
        return self.model.embed_timestep(timesteps)

    def _as_input(self, x: Tensor, dim: int, what: str) -> Tensor:
        x = torch.as_tensor(x, device=self.device, dtype=self.dtype)
        if x.shape[-1] != dim:
            raise ValueError(f"{what} have size {x.shape[-1]} in the last dimension; the model expects {dim}")
        return x

    def _raw(self, kind: int, values: Tensor) -> Tensor:
        m = self.model
        if kind == RETURN:
            return m.embed_return(self._as_input(values, 1, "returns-to-go"))
        if kind == STATE:
            return m.embed_state(self._as_input(values, self.state_dim, "states"))
        if kind == ACTION:
            return m.embed_action(self._as_input(values, self.act_dim, "actions"))
        raise ValueError(f"token kind must be 0 (return), 1 (state) or 2 (action), got {kind}")

    def embed_tokens(self, kind: int, values: Tensor, timesteps: Tensor) -> Tensor:
        """Embed tokens of one type, as ``DecisionTransformerModel.forward`` does (incl. ``embed_ln``).

        Args:
            kind: 0 return-to-go, 1 state, 2 action.
            values: (B, n, 1 | state_dim | act_dim).
            timesteps: (B, n) int.
        Returns:
            (B, n, hidden): modality embedding + timestep embedding, then ``embed_ln`` (per token,
            so slicing :meth:`embed_steps` gives the same vectors).
        """
        return self.model.embed_ln(self._raw(kind, values) + self._timestep_embedding(timesteps))

    def embed_steps(self, returns_to_go: Tensor, states: Tensor, actions: Tensor, timesteps: Tensor) -> Tensor:
        """Stacked embeddings ``R_0, s_0, a_0, R_1, ...`` exactly as ``DecisionTransformerModel.forward``.

        Args:
            returns_to_go: (B, n, 1) scaled returns-to-go; states: (B, n, state_dim) (normalized as
                in training); actions: (B, n, act_dim); timesteps: (B, n) int.
        Returns:
            (B, 3n, hidden): token ``3i + k`` is type ``k`` of step ``i``; timestep embedding added
            to every token, then ``embed_ln``.
        """
        time = self._timestep_embedding(timesteps)
        r = self._raw(RETURN, returns_to_go) + time
        s = self._raw(STATE, states) + time
        a = self._raw(ACTION, actions) + time
        b, n, h = r.shape
        stacked = torch.stack((r, s, a), dim=2).reshape(b, 3 * n, h)
        return self.model.embed_ln(stacked)

    # ----- feeding ----------------------------------------------------------------------------------
    def forward(
        self,
        cache: Any,
        input_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        position_ids: Tensor,
        clock: Tensor,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> Tensor:
        """Run one chunk of stacked tokens through the encoder with the cache.

        Args:
            inputs_embeds: (B, Q, hidden) from :meth:`embed_steps` / :meth:`embed_tokens`.
            position_ids: ignored: a Decision Transformer gives every token position id 0.
            clock: (Q,) arrival clock of each row; rows with ``clock % 3 == 1`` are state tokens.
            logits_to_keep: 0 returns the predictions of every state token of the chunk; k > 0 the
                last k of them.
        Returns:
            (B, n_state_tokens, act_dim): ``predict_action`` of the encoder's output (after its final
            layer norm ``ln_f``) at the chunk's state tokens, as ``DecisionTransformerModel.forward``
            (including ``tanh`` when ``config.action_tanh``). n may be 0 (a chunk of one action token).
        """
        if input_ids is not None or inputs_embeds is None:
            raise ValueError("a Decision Transformer is fed inputs_embeds (see embed_steps), not input_ids")
        b, q = inputs_embeds.shape[:2]
        zeros = torch.zeros(b, q, dtype=torch.long, device=inputs_embeds.device)
        out = self.encoder(
            inputs_embeds=inputs_embeds,
            position_ids=zeros,
            use_cache=True,
            **{self._cache_kw: cache},
            **kwargs,
        )
        hidden = out.last_hidden_state
        idx = torch.nonzero(clock.to(hidden.device) % 3 == STATE).flatten()
        if logits_to_keep > 0:
            idx = idx[-logits_to_keep:]
        return self.model.predict_action(hidden[:, idx])


ADAPTER = DecisionTransformerAdapter


def feed_tokens(engine: Any, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Feed stacked tokens through an attached engine, splitting chunks at update steps.

    Chunks end at every multiple of ``engine.config.update_interval`` (so the engine's clock hits
    each update step exactly) and are at most ``engine.config.chunk_size`` long. Call
    ``engine.reset(batch)`` first; the stream must start with ``R_0`` at clock 0.

    Args:
        engine: the :class:`~namm_transfer.engine.EvictionEngine` of an attached Decision Transformer
            (``attach(...).engine``).
        inputs_embeds: (B, Q, hidden) stacked token embeddings.
        attention_mask: (B, Q), 0 for padding (pad whole timesteps only).
    Returns:
        (B, n, act_dim): action predictions at the state tokens among the Q rows, in order.
    """
    cfg = engine.config
    q = inputs_embeds.shape[1]
    pieces = []
    pos = 0
    while pos < q:
        to_update = cfg.update_interval - engine.clock % cfg.update_interval
        end = min(q, pos + cfg.chunk_size, pos + to_update)
        out = engine.forward_chunk(
            inputs_embeds=inputs_embeds[:, pos:end],
            attention_mask=None if attention_mask is None else attention_mask[:, pos:end],
            logits_to_keep=0,
        )
        pieces.append(out)
        pos = end
    return torch.cat(pieces, dim=1)


def _age_labels(edges: Sequence[int]) -> list[str]:
    labels = []
    for i, lo in enumerate(edges):
        labels.append(f"{lo}-{edges[i + 1] - 1}" if i + 1 < len(edges) else f"{lo}+")
    return labels


def kept_token_stats(
    stats: Any,
    include: np.ndarray | None = None,
    age_edges: Sequence[int] = DEFAULT_AGE_EDGES,
) -> dict[str, Any]:
    """Which tokens the policy kept: counts by token type and by age, summed over updates, layers, heads.

    Needs an engine run with ``record_kept=True``. A kept token's type is ``position % 3`` and its
    age, in timesteps, is ``newest_timestep - position // 3`` where ``newest_timestep`` is the
    timestep of the sequence's newest token at that update (``(n_seen - 1) // 3``).

    Args:
        stats: :class:`~namm_transfer.engine.EvictionStats` (``engine.stats`` / ``mem.stats``).
        include: optional (n_updates, B) bool: which (update, sequence) pairs to count, e.g. only
            updates while each episode was still running.
        age_edges: increasing lower edges of the age buckets, in timesteps, starting at 0.
    Returns:
        dict with ``by_type`` ({return, state, action}: kept-token count), ``type_fraction``,
        ``seen_by_type`` (what a full cache would have held at the same updates, counted over the
        same layers and heads), ``retention_by_type`` (kept / seen), ``by_age`` ({label: count}),
        ``age_edges``, ``by_layer`` ({layer: {type: count}}), ``total`` (= sum of ``by_type`` = sum of
        ``by_age`` = the matching ``kept_counts``), ``n_updates`` (counted (update, sequence) pairs).
    """
    edges = np.asarray(list(age_edges), dtype=np.int64)
    if edges.size == 0 or edges[0] != 0 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"age_edges must be increasing and start at 0, got {list(age_edges)}")
    if not stats.kept_positions and stats.kept_counts:
        raise ValueError("no kept positions were recorded: attach with record_kept=True")
    by_type = np.zeros(3, dtype=np.int64)
    seen = np.zeros(3, dtype=np.int64)
    by_age = np.zeros(len(edges), dtype=np.int64)
    by_layer: dict[int, np.ndarray] = {}
    pairs = 0
    for step in sorted(stats.kept_positions):
        n_seen = np.asarray(stats.update_n_seen[step], dtype=np.int64)
        for layer, per_seq in stats.kept_positions[step].items():
            layer_counts = by_layer.setdefault(int(layer), np.zeros(3, dtype=np.int64))
            for b, heads in enumerate(per_seq):
                if include is not None and not bool(include[step][b]):
                    continue
                if n_seen[b] == 0:
                    continue
                newest_t = (n_seen[b] - 1) // 3
                full = np.bincount(np.arange(n_seen[b]) % 3, minlength=3)
                for pos in heads:
                    pos = np.asarray(pos, dtype=np.int64)
                    counts = np.bincount(pos % 3, minlength=3)
                    by_type += counts
                    layer_counts += counts
                    seen += full
                    age = newest_t - pos // 3
                    by_age += np.bincount(np.searchsorted(edges, age, side="right") - 1, minlength=len(edges))
        if include is None:
            pairs += len(n_seen)
        else:
            pairs += int(np.asarray(include[step], dtype=bool).sum())
    total = int(by_type.sum())
    return {
        "by_type": {name: int(by_type[i]) for i, name in enumerate(TOKEN_TYPES)},
        "type_fraction": {name: (float(by_type[i]) / total if total else 0.0) for i, name in enumerate(TOKEN_TYPES)},
        "seen_by_type": {name: int(seen[i]) for i, name in enumerate(TOKEN_TYPES)},
        "retention_by_type": {
            name: (float(by_type[i]) / float(seen[i]) if seen[i] else 1.0) for i, name in enumerate(TOKEN_TYPES)
        },
        "by_age": dict(zip(_age_labels(edges.tolist()), (int(x) for x in by_age), strict=True)),
        "age_edges": edges.tolist(),
        "by_layer": {layer: {name: int(c[i]) for i, name in enumerate(TOKEN_TYPES)} for layer, c in by_layer.items()},
        "total": total,
        "n_updates": pairs,
    }
