"""The eviction engine: host-agnostic KV-cache management driven by a memory policy.

The engine never branches on the policy type or the model family. An adapter (see
``namm_transfer.adapters``) tells it where the attention layers are, how to run the host on a
chunk, and how to read and write one layer's cache. The adapter routes the host's attention
through :meth:`EvictionEngine.attention`, which

* builds the attention mask itself from the engine's bookkeeping (live slots of each cache row,
  left padding, causality inside the chunk, sliding windows of unmanaged layers),
* computes the attention probability rows of the chunk's queries against the current cache only
  when the policy asks for them (chunk x cache, never T x T), in query tiles of bounded size, and
  hands them to the policy tile by tile (or only their sums over the chunk's queries, or only the row of
  the chunk's last query, when that is all the policy asks for),
* and otherwise calls PyTorch's fused SDPA.

The cache of every managed layer appends in place (``adapters.hf_attention.make_growing_cache``):
new tokens go into spare capacity instead of a concatenation that copies the whole layer, and
compaction writes the kept slots back into the same buffer.

After each chunk, when the clock (rows fed, padding included) reaches a multiple of
``update_interval``, every managed layer asks the policy which slots to keep and the engine
compacts that layer's cache and every per-token tensor of the policy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .policies.base import HostInfo, LayerState, MemoryPolicy, stack_layers
from .scratch import Scratch

__all__ = ["EngineConfig", "EvictionEngine", "EvictionStats"]

logger = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Settings of the eviction loop."""

    update_interval: int = 512
    """Run the policy whenever the clock (tokens fed, padding included) reaches a multiple of this."""
    chunk_size: int = 512
    """Prompts are fed in chunks of at most this many tokens (boundaries also fall on update steps, so a chunk is
    never longer than ``update_interval``). 512: see :func:`namm_transfer.session.attach`."""
    final_update: bool | None = None
    """Also run the policy once at the end of every prompt (``AttachedMemory.prefill``), unless the prompt ended on an
    update step. None (the default): True for a policy with a budget that holds at the end of a prompt (ratio and
    token budgets, ``Budget.holds_at_prompt_end``; a replayed budget when the run it replays did), False otherwise
    (no budget, e.g. the NAMM's threshold). False is the paper's schedule: the policy runs at update steps only.
    The engine resolves None for its policy (``EvictionEngine.config.final_update`` is always a bool)."""
    record_kept: bool = False
    """Record the positions of the kept tokens of every (sequence, head) at every update."""

    def __post_init__(self) -> None:
        if self.update_interval < 1 or self.chunk_size < 1:
            raise ValueError(
                f"update_interval and chunk_size must be >= 1, got {self.update_interval}, {self.chunk_size}"
            )


@dataclass
class EvictionStats:
    """What happened to the cache during one session (one batch of sequences).

    Attributes:
        managed_layers: host layer indices the policy manages.
        clock: after each forward call, the rows fed so far.
        n_seen: after each forward call, (B,) real tokens seen per sequence.
        cache_tokens: after each forward call, (L, B) live tokens per managed layer and sequence,
            averaged over KV heads.
        kept_counts: ``kept_counts[step][layer]`` = (B, H) kept tokens at that update: what a
            :class:`~namm_transfer.policies.base.ReplayBudget` replays.
        kept_positions: with ``record_kept``: ``kept_positions[step][layer]`` = list (B) of lists (H)
            of position arrays.
        live_counts: ``live_counts[step][layer]`` = (B, H) live tokens just before that update.
        update_clock: the clock at each update; update_n_seen: (B,) real tokens seen at each update.
    """

    managed_layers: tuple[int, ...] = ()
    clock: list[int] = field(default_factory=list)
    n_seen: list[np.ndarray] = field(default_factory=list)
    cache_tokens: list[np.ndarray] = field(default_factory=list)
    kept_counts: dict[int, dict[int, list[list[int]]]] = field(default_factory=dict)
    live_counts: dict[int, dict[int, list[list[int]]]] = field(default_factory=dict)
    update_n_seen: list[list[int]] = field(default_factory=list)
    kept_positions: dict[int, dict[int, list[list[np.ndarray]]]] = field(default_factory=dict)
    update_clock: list[int] = field(default_factory=list)

    def retained_per_call(self) -> np.ndarray:
        """(calls, B) mean over managed layers of live tokens / tokens a full cache would hold."""
        if not self.cache_tokens:
            return np.zeros((0, 0))
        kept = np.stack(self.cache_tokens)  # (calls, L, B)
        seen = np.stack(self.n_seen).astype(np.float64)  # (calls, B)
        ratio = np.where(seen[:, None, :] > 0, kept / np.maximum(seen[:, None, :], 1.0), 1.0)  # nothing seen: full
        return ratio.mean(axis=1)

    def retained_cache(self) -> float:
        """Mean over managed layers, forward calls and sequences; 1.0 for a full cache."""
        r = self.retained_per_call()
        return float(r.mean()) if r.size else 1.0

    def kept_counts_json(self) -> dict[str, dict[str, list[list[int]]]]:
        return {str(s): {str(layer): c for layer, c in d.items()} for s, d in self.kept_counts.items()}


class EvictionEngine:
    """Owns the cache bookkeeping of one attached model. Create through :func:`namm_transfer.attach`."""

    tile_bytes: int | None = None
    """Bytes of float32 scores per query tile of the explicit attention; None: 8 MiB on the CPU (a quarter of the
    last-level cache of the machines measured in BENCHMARKS.md; the tile's scores live in one scratch buffer the
    engine keeps, so no tile faults in fresh pages), 256 MiB on accelerators (fewer, larger kernels)."""

    rows_bytes: int | None = None
    """Bytes of attention rows (float32, B x KV heads x queries x slots) handed to the policy's ``observe`` per call:
    the rows of consecutive query tiles are gathered until this many (at least one tile, at most the chunk). None:
    16 MiB on the CPU, 256 MiB on accelerators. A policy's fixed cost per call (the NAMM's: its buffered rows and
    per-token state, several copies of S x 16 floats) is then paid a few times per chunk rather than per tile; at
    long contexts a CPU tile holds only a few dozen queries. Measured on the CPU (2 layers of SmolLM2-135M's
    shape, 8k tokens, chunk 512, a NAMM keeping every token): prefill 7.5 s per tile, 5.2 s at 16 MiB and at 32
    MiB; extra peak memory over the full cache 6, 17 and 33-41 MiB."""

    def __init__(self, adapter: Any, policy: MemoryPolicy, config: EngineConfig | None = None) -> None:
        self.adapter = adapter
        self.policy = policy
        config = config or EngineConfig()
        if config.final_update is None:
            budget = getattr(policy, "budget", None)
            config = replace(config, final_update=bool(budget is not None and budget.holds_at_prompt_end))
        self.config = config
        self.host: HostInfo = adapter.host_info()
        self.managed = set(self.host.managed_layers)
        if policy.needs_attention and not getattr(adapter, "provides_attention_rows", True):
            raise ValueError(
                f"policy {policy.name!r} needs attention rows, but the {getattr(adapter, 'name', 'host')} adapter "
                "cannot provide attention rows; use a policy that does not need them (l2, streaming, random, full)"
            )
        policy.bind(self.host)
        self.cache: Any = None
        self.states: dict[int, LayerState] = {}
        self.stats = EvictionStats(managed_layers=self.host.managed_layers)
        self._attached = False
        self._chunk: dict[str, Any] | None = None
        self.batch_size = 0
        # host-side mirrors, so that the per-layer path needs no device synchronization (on a GPU, a read of a
        # device value stalls the host until the queue drains): live slots per (sequence, head) row of every
        # managed layer, whether all heads of a sequence hold the same slot pattern, real tokens seen
        self._live: dict[int, np.ndarray] = {}
        self._alike: dict[int, bool] = {}
        self._n_seen_host = np.zeros(0, dtype=np.int64)
        # CPU only: the explicit attention's scores and output tile are written into this buffer, reused by every
        # tile, layer and chunk (a fresh multi-MiB tensor per tile costs page faults and zeroing by the kernel)
        self.scratch = Scratch()

    # ----- session ---------------------------------------------------------------------------
    def reset(self, batch_size: int, device: torch.device | str | None = None) -> None:
        """Start new sequences: empty cache, empty bookkeeping, fresh statistics."""
        device = torch.device(device) if device is not None else self.adapter.device
        self.device = device
        self.batch_size = batch_size
        self.scratch.release()
        self.cache = self.adapter.make_cache()
        self.clock = 0
        self.n_seen = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.newest_position = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.pad_history = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self.update_step = 0
        h = self.host.n_kv_heads
        self.states = {}
        self._live = {layer: np.zeros((batch_size, h), dtype=np.int64) for layer in self.host.managed_layers}
        self._alike = dict.fromkeys(self.host.managed_layers, True)
        self._n_seen_host = np.zeros(batch_size, dtype=np.int64)
        for layer in self.host.managed_layers:
            empty_i = torch.zeros(batch_size, h, 0, dtype=torch.int64, device=device)
            st = LayerState(
                layer=layer,
                valid=torch.zeros(batch_size, h, 0, dtype=torch.bool, device=device),
                position=empty_i,
                arrival=empty_i.clone(),
            )
            self.policy.init_layer(st)
            self.states[layer] = st
        self.stats = EvictionStats(managed_layers=self.host.managed_layers)

    def fork(self, repeats: int) -> None:
        """Repeat every sequence ``repeats`` times (sequence b becomes b*repeats .. b*repeats+repeats-1).

        Used to share a prefix: feed it once, then fork one copy per population member before the
        first eviction. Cache, bookkeeping, policy state and statistics are all repeated.
        """
        if repeats < 1:
            raise ValueError("repeats must be >= 1")
        if repeats == 1:
            return

        def rep(t: Tensor) -> Tensor:
            return t.repeat_interleave(repeats, dim=0)

        for i in range(len(self.cache.layers)):
            lyr = self.cache.layers[i]
            if getattr(lyr, "keys", None) is not None and lyr.keys.numel():
                lyr.keys, lyr.values = rep(lyr.keys), rep(lyr.values)
        self.n_seen, self.next_position = rep(self.n_seen), rep(self.next_position)
        self.newest_position, self.pad_history = rep(self.newest_position), rep(self.pad_history)
        for st in self.states.values():
            st.valid, st.position, st.arrival = rep(st.valid), rep(st.position), rep(st.arrival)
            st.tokens = {k: rep(v) for k, v in st.tokens.items()}
        self._live = {layer: np.repeat(a, repeats, axis=0) for layer, a in self._live.items()}
        self._n_seen_host = np.repeat(self._n_seen_host, repeats)
        self.batch_size *= repeats
        s = self.stats
        s.n_seen = [np.repeat(a, repeats, axis=0) for a in s.n_seen]
        s.cache_tokens = [np.repeat(a, repeats, axis=-1) for a in s.cache_tokens]
        for d in (s.kept_counts, s.live_counts):
            for layers in d.values():
                for layer, c in layers.items():
                    layers[layer] = [row for row in c for _ in range(repeats)]
        s.update_n_seen = [[v for v in row for _ in range(repeats)] for row in s.update_n_seen]
        s.kept_positions = {
            step: {layer: [r for r in rows for _ in range(repeats)] for layer, rows in layers.items()}
            for step, layers in s.kept_positions.items()
        }

    # ----- feeding -----------------------------------------------------------------------------
    def forward_chunk(
        self,
        input_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        logits_to_keep: int = 1,
        allow_update: bool = True,
        **host_kwargs: Any,
    ) -> Any:
        """Feed one chunk of Q tokens to the host and evict if an update step is reached.

        Args:
            input_ids: (B, Q) or None; inputs_embeds: (B, Q, hidden) or None (exactly one given).
            attention_mask: (B, Q) 1 for real tokens, 0 for padding (default: all real).
            logits_to_keep: passed to the host (the adapter decides what "logits" are).
        Returns:
            whatever the adapter's forward returns for this chunk (logits for decoder LMs).
        """
        if self.cache is None:
            raise RuntimeError("call reset(batch_size) before feeding tokens")
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("give input_ids or inputs_embeds")
        b, q = ref.shape[0], ref.shape[1]
        if b != self.batch_size:
            raise ValueError(f"batch size {b} does not match the session's {self.batch_size}; call reset() first")
        if q == 0:
            raise ValueError("empty chunk")
        if attention_mask is None:
            chunk_valid = torch.ones(b, q, dtype=torch.bool, device=self.device)
            n_real_host = np.full(b, q, dtype=np.int64)
        else:
            if attention_mask.shape != (b, q):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, q)}")
            chunk_valid = attention_mask.to(device=self.device, dtype=torch.bool)
            n_real_host = chunk_valid.sum(1).cpu().numpy().astype(np.int64)  # the chunk's one synchronization
        offsets = torch.cumsum(chunk_valid.to(torch.int64), dim=1) - 1
        position = self.next_position[:, None] + offsets.clamp_min(0)
        self._chunk = {
            "valid": chunk_valid,
            "position": position,
            "clock0": self.clock,
            "q": q,
            "n_real": n_real_host,
            "all_real": bool((n_real_host == q).all()),
            "masks": {},  # tensors shared by the layers of this chunk (masks, arrival clock), by kind and length
        }
        self.pad_history = torch.cat([self.pad_history, chunk_valid], dim=1)
        try:
            out = self.adapter.forward(
                self.cache,
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                position_ids=position,
                clock=torch.arange(self.clock, self.clock + q, device=self.device),
                logits_to_keep=logits_to_keep,
                **host_kwargs,
            )
        finally:
            self._chunk = None
        self.clock += q
        n_real = chunk_valid.sum(1)
        self.n_seen += n_real
        self._n_seen_host = self._n_seen_host + n_real_host
        self.next_position += n_real
        has = n_real > 0
        self.newest_position = torch.where(has, self.next_position - 1, self.newest_position)
        if allow_update and self.clock % self.config.update_interval == 0:
            self.update()
        self._record_call()
        return out

    def update(self) -> None:
        """Ask the policy which tokens every managed layer keeps, then prune caches and state."""
        step = self.update_step
        self.stats.update_clock.append(self.clock)
        self.stats.update_n_seen.append(self._n_seen_host.tolist())
        layers: list[tuple[int, LayerState, Tensor, Tensor]] = []
        for layer, st in self.states.items():
            if st.valid.shape[-1] == 0:
                continue
            keys, values = self.adapter.get_kv(self.cache, layer)
            st.keys = keys
            st.n_seen = self.n_seen
            st.newest_position = self.newest_position
            st.step = step
            st.clock = self.clock
            layers.append((layer, st, keys, values))
        try:
            keeps = self.policy.select_layers([st for _, st, _, _ in layers])  # one call: the policy may batch
        finally:
            for _, st, _, _ in layers:
                st.keys = None
        if len(keeps) != len(layers):
            raise ValueError(f"policy {self.policy.name!r} returned {len(keeps)} keep masks for {len(layers)} layers")
        for (_, st, _, _), keep in zip(layers, keeps, strict=True):
            if keep.shape != st.valid.shape or keep.dtype != torch.bool:
                raise ValueError(
                    f"policy {self.policy.name!r} returned a keep mask of shape {tuple(keep.shape)} "
                    f"and dtype {keep.dtype}; expected bool {tuple(st.valid.shape)}"
                )
        if len({keep.shape for keep in keeps}) == 1:  # every layer in one go (a few operations, not a few per layer)
            valid = torch.stack([st.valid for _, st, _, _ in layers])
            kept = torch.stack(keeps) & valid
            kept[..., -1] |= valid[..., -1]  # the newest token is always kept
            keeps = list(kept.unbind(0))
            counts_dev = kept.sum(-1)
        else:
            keeps = [keep & st.valid for (_, st, _, _), keep in zip(layers, keeps, strict=True)]
            for (_, st, _, _), keep in zip(layers, keeps, strict=True):
                keep[..., -1] |= st.valid[..., -1]
            counts_dev = (
                torch.stack([keep.sum(-1) for keep in keeps])
                if keeps
                else torch.zeros(0, self.batch_size, self.host.n_kv_heads, dtype=torch.int64)
            )
        decided = [(lyr, st, keep, k, v) for (lyr, st, k, v), keep in zip(layers, keeps, strict=True)]
        # every layer's kept counts reach the host in one transfer (one synchronization per update)
        counts_host = counts_dev.cpu().numpy()
        counts_step: dict[int, list[list[int]]] = {}
        live_step: dict[int, list[list[int]]] = {}
        for i, (layer, st, keep, _, _) in enumerate(decided):
            counts_step[layer] = counts_host[i].tolist()
            live_step[layer] = self._live[layer].tolist()
            if self.config.record_kept:
                pos = st.position.cpu()
                km = keep.cpu()
                self.stats.kept_positions.setdefault(step, {})[layer] = [
                    [pos[bi, hi][km[bi, hi]].numpy() for hi in range(km.shape[1])] for bi in range(km.shape[0])
                ]
        self._compact(decided, counts_dev, counts_host)
        self.stats.kept_counts[step] = counts_step
        self.stats.live_counts[step] = live_step
        self.update_step += 1
        s = self.stats
        if s.clock and s.clock[-1] == self.clock:
            # called by hand after the forward call that recorded this clock (a prompt's final update; the fitness's
            # shared prefix, fed without updates, forked, then updated): that call's record shows the cache after
            # the update, as forward_chunk's own updates do
            s.clock.pop()
            s.n_seen.pop()
            s.cache_tokens.pop()
            self._record_call()

    def _compact(
        self, decided: list[tuple[int, LayerState, Tensor, Tensor, Tensor]], counts: Tensor, n_kept: np.ndarray
    ) -> None:
        """Keep the slots of each layer's ``keep`` (B, H, S) in ``decided`` (layer, state, keep, keys, values);
        ``counts`` (L, B, H) is the keep masks' sums, ``n_kept`` the same on the host.

        The kept slots become a right-aligned suffix of each row (rows of a sequence hold the same pattern exactly
        when they keep the same number of slots). Layers that keep the same number of slots out of the same number
        (with a budget: all of them) are compacted together, a few operations for all of them; only their keys and
        values are gathered layer by layer."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, (layer, st, keep, _, _) in enumerate(decided):
            new_len = int(n_kept[i].max()) if n_kept[i].size else 0
            s = keep.shape[-1]
            if new_len == s and bool((n_kept[i] == s).all()):
                continue
            self._live[layer] = n_kept[i].astype(np.int64)
            self._alike[layer] = bool((n_kept[i] == n_kept[i][:, :1]).all())
            layout = tuple((name, t.shape, t.dtype) for name, t in st.tokens.items())
            groups.setdefault((keep.shape, new_len, layout), []).append(i)
        for (shape, new_len, _), idx in groups.items():
            s = shape[-1]
            states = [decided[i][1] for i in idx]
            keep = stack_layers([decided[i][2] for i in idx])  # (L', B, H, S)
            # a stable sort puts dropped slots first and kept slots after them, both in arrival order
            order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices[..., s - new_len :]  # (L', B, H, N)
            kept = counts if len(idx) == counts.shape[0] else counts[idx]
            valid = torch.arange(new_len, device=keep.device) >= (new_len - kept).unsqueeze(-1)
            position = torch.gather(stack_layers([st.position for st in states]), 3, order)
            arrival = torch.gather(stack_layers([st.arrival for st in states]), 3, order)
            tokens = {
                name: _gather_tokens(stack_layers([st.tokens[name] for st in states]), order)
                for name in states[0].tokens
            }
            for j, i in enumerate(idx):
                layer, st, _, keys, values = decided[i]
                st.valid, st.position, st.arrival = valid[j], position[j], arrival[j]
                for name in st.tokens:
                    st.tokens[name] = tokens[name][j]
                self.adapter.set_kv(self.cache, layer, _gather_tokens(keys, order[j]), _gather_tokens(values, order[j]))

    def _record_call(self) -> None:
        if not self.states:
            return
        per_layer = np.stack([self._live[layer].mean(-1) for layer in self.states]).astype(np.float32)  # (L, B)
        self.stats.clock.append(self.clock)
        self.stats.n_seen.append(self._n_seen_host.copy())
        self.stats.cache_tokens.append(per_layer)

    # ----- attention (called by the adapter's attention hook) -----------------------------------
    def attention(
        self,
        layer: int,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        scaling: float,
        softcap: float | None = None,
        sliding_window: int | None = None,
    ) -> Tensor:
        """Attention of the chunk's queries against this layer's cache.

        Args:
            query: (B, Hq, Q, d); key, value: (B, H, S, d), the layer's cache *including* the chunk.
        Returns:
            (B, Q, Hq, d) attention output (the layout Hugging Face attention functions return).
        """
        chunk = self._chunk
        if chunk is None:
            raise RuntimeError(
                "the model was called directly while a NAMM engine is attached; feed it through the session "
                "(prefill / step / generate), or detach first"
            )
        b, hq, q, d = query.shape
        h, s = key.shape[1], key.shape[2]
        if hq % h:
            raise ValueError(f"{hq} query heads cannot be grouped over {h} KV heads")
        g = hq // h
        st = self.states.get(layer)
        all_live = False  # every slot of every row live (no mask beyond causality inside the chunk)
        if st is not None:
            self._append(st, q, s)
            all_live = bool((self._live[layer] == s).all())
        need_rows = st is not None and self.policy.needs_attention
        if need_rows and self.policy.observes_last_row:  # one row on the side; the output by the fused path below
            assert st is not None
            self._observe_last_row(st, query, key, scaling, softcap, all_live)
            need_rows = False
        if need_rows and softcap is None:
            assert st is not None
            fast = self._attend_with_rows(st, query, key, value, scaling, all_live)
            if fast is not None:
                return fast
        mask = self._mask(layer, st, q, s, sliding_window, all_live)  # (B or 1, H or 1, Q, S) or None
        qg = query.reshape(b, h, g * q, d)
        if need_rows or softcap is not None:
            # explicit float32 attention in one piece (a softcap, or a chunk where some query sees no slot, e.g. left
            # padding): the probabilities are shared by the output and the policy's rows; the mask is broadcast
            # over the query groups and applied in place (no g-fold copies)
            scores = torch.matmul(qg.float(), key.float().transpose(-1, -2)).mul_(scaling)
            if softcap is not None:
                scores.div_(softcap).tanh_().mul_(softcap)
            if mask is not None:
                scores.view(b, h, g, q, s).masked_fill_(~mask.unsqueeze(2), float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            del scores
            out = torch.matmul(probs.to(value.dtype), value)
            if need_rows:
                assert st is not None
                rows = probs.view(b, h, g, q, s).mean(2).mul_(chunk["valid"].view(b, 1, q, 1))
                if self.policy.observes_sums:
                    self.policy.observe_sums(st, rows.sum(-2))
                else:
                    self.policy.observe(st, rows)
        elif mask is None or mask.shape[1] == 1:
            # the same mask for every head (unmanaged layers' clock mask; managed layers whose heads hold the same
            # slots, always with the full cache): broadcast it over the query heads and let SDPA group them, no
            # g-fold copy of the mask (BENCHMARKS.md, 8k in 512-token chunks: full-cache prefill 108 -> 87 s)
            if mask is not None and (st is None or all_live):
                # a mask shared by the layers (held in this chunk's cache, so its id is unique while the chunk
                # lasts): convert it to SDPA's additive form once per chunk instead of once per layer
                bool_mask = mask
                mask = self._shared(
                    ("additive", id(bool_mask), query.dtype),
                    lambda: torch.zeros(bool_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                        ~bool_mask, float("-inf")
                    ),
                )
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=g > 1)
            return out.transpose(1, 2).contiguous()
        else:
            mg = mask.unsqueeze(2).expand(mask.shape[0], mask.shape[1], g, q, s).reshape(mask.shape[0], -1, g * q, s)
            out = F.scaled_dot_product_attention(qg, key, value, attn_mask=mg, scale=scaling)
        return out.view(b, h, g, q, d).reshape(b, hq, q, d).transpose(1, 2).contiguous()

    def _observe_last_row(
        self, st: LayerState, query: Tensor, key: Tensor, scaling: float, softcap: float | None, all_live: bool
    ) -> None:
        """Hand the policy the attention row of the chunk's last query (``observes_last_row``): (B, H, S) float32
        probabilities over the layer's slots, averaged over the query heads of each KV head; zeros for a sequence
        whose last query is padding. The last query sees every live slot (the chunk's own slots all precede it or
        are it), so the only mask is the live slots'. Costs one (g x S) product per KV head and chunk."""
        chunk = self._chunk
        assert chunk is not None
        b, hq, _, d = query.shape
        h = key.shape[1]
        g = hq // h
        with torch.no_grad():  # the policy's row carries no gradient
            last = query[:, :, -1].float().reshape(b, h, g, d)
            scores = torch.matmul(last, key.float().transpose(-1, -2)).mul_(scaling)  # (B, H, g, S)
            if softcap is not None:
                scores.div_(softcap).tanh_().mul_(softcap)
            if not all_live:
                scores.masked_fill_(~st.valid[:, :, None, :], float("-inf"))
            row = torch.softmax(scores, dim=-1).mean(2)  # (B, H, S)
            if not chunk["all_real"]:  # padding last queries (their rows may be NaN: no live slot yet) weigh 0
                real = chunk["valid"][:, -1].view(b, 1, 1)
                row = torch.where(real, row, torch.zeros((), dtype=row.dtype, device=row.device))
        self.policy.observe_last_row(st, row)

    def _attend_with_rows(
        self, st: LayerState, query: Tensor, key: Tensor, value: Tensor, scaling: float, all_live: bool
    ) -> Tensor | None:
        """Explicit float32 attention of a managed layer, in query tiles, handing each tile's rows to the policy.

        The scores of one tile (B x query heads x tile x the slots up to the tile's last query: later slots of
        the chunk are in the future of every query of the tile) are computed, masked, turned into probabilities
        in place, multiplied with the values and averaged over the query heads of each KV head; the policy gets
        those rows in calls of consecutive whole tiles, up to :attr:`rows_bytes` per call (queries in order; zeros
        for the slots left out), or, if it ``observes_sums``, their sum over the chunk's queries once at the end.
        The mask is never materialized as (B, H, Q, S): the cached part is one (B, H, S_old) row of live slots,
        applied only if some slot is dead, and the chunk's own part is (B, H, Q, Q). Returns None when some query
        sees no slot at all (left padding before the first real token), which the general path handles.
        ``all_live``: every slot of the layer is live (then no mask but causality inside the chunk).
        """
        chunk = self._chunk
        assert chunk is not None
        b, hq, q, d = query.shape
        h, s = key.shape[1], key.shape[2]
        g, old = hq // h, s - q
        valid_old, valid_new = st.valid[..., :old], st.valid[..., old:]  # (B, H, S_old), (B, H, Q)
        all_real = chunk["all_real"]
        if not all_real:  # with every query real, each sees at least itself
            sees = torch.cumsum(valid_new, -1) > 0
            if old:
                sees |= valid_old.any(-1, keepdim=True)
            if not bool(sees.all()):
                return None
        dead_old = None if all_live or not old else ~valid_old.view(b, h, 1, 1, old)
        if all_real:  # (1, 1, Q, Q), shared by the layers of this chunk
            dead_new = self._shared(("dead_causal", q), lambda: ~self._causal(q).view(1, 1, q, q))
        else:
            dead_new = ~(self._causal(q).view(1, 1, q, q) & valid_new.view(b, h, 1, q))  # (B, H, Q, Q)
        # (B, Q): 1 for real queries, 0 for padding; None when every query is real
        real = None if all_real else chunk["valid"].to(torch.float32)
        grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        if grad:
            qs = (query.float() * scaling).view(b, h, g, q, d)
        else:  # scaled and cast in one pass into a contiguous tensor (a tile's queries are then a view, not a copy)
            qs = torch.mul(query, scaling, out=query.new_empty(query.shape, dtype=torch.float32)).view(b, h, g, q, d)
        kt = key.float().transpose(-1, -2)
        tile = self.query_tile(b, hq, q, s, query.device)
        out = torch.empty(b, h, g, q, d, dtype=value.dtype, device=query.device)
        # CPU without autograd: scores, probabilities (softmax in place) and the output tile in the scratch buffer
        in_place = query.device.type == "cpu" and not grad
        n_scores, n_out = b * hq * tile * s, (b * hq * tile * d if value.dtype == torch.float32 else 0)
        scratch = self.scratch.get(n_scores + n_out, torch.float32, query.device) if in_place else None
        # a policy that needs only column sums (H2O) gets them once per chunk: no per-query rows are built
        want_sums, sums = self.policy.observes_sums, None
        # one tile for the whole chunk (decoding, short chunks, accelerators): its output is written where the caller
        # reads it (the tile copy is left out); not under autograd, which refuses products with `out=`
        direct = tile >= q and not grad
        # otherwise the rows of consecutive tiles go into one tensor (B, H, n, S) handed over when full: `per_call`
        # queries (whole tiles), starting at query `p0`
        rows_budget = self.rows_bytes or (16 if query.device.type == "cpu" else 256) * 1024 * 1024
        per_call = tile * max(1, rows_budget // max(1, 4 * b * h * s * tile))
        rows: Tensor | None = None
        p0 = 0
        for t0 in range(0, q, tile):
            t1 = min(q, t0 + tile)
            n = t1 - t0
            # the chunk's slots from old + t1 on are in every query's future: left out of the products (the rows
            # get zeros there); of the chunk's own slots only [t0, t1) need the causal mask when every query is
            # real, all of [0, t1) when padding slots must be hidden too
            w = old + t1
            q_tile = qs[:, :, :, t0:t1].reshape(b, h, g * n, d)
            if scratch is not None:
                scores = torch.matmul(q_tile, kt[..., :w], out=scratch[: b * hq * n * w].view(b, h, g * n, w))
            else:
                scores = torch.matmul(q_tile, kt[..., :w])  # (B, H, g*n, w)
            s5 = scores.view(b, h, g, n, w)
            if dead_old is not None:
                s5[..., :old].masked_fill_(dead_old, float("-inf"))
            if all_real:
                if n > 1:  # a single query sees itself: nothing of its chunk to hide
                    s5[..., old + t0 :].masked_fill_(dead_new[:, :, None, t0:t1, t0:t1], float("-inf"))
            else:
                s5[..., old:].masked_fill_(dead_new[:, :, None, t0:t1, :t1], float("-inf"))
            if scratch is not None:
                probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)
            else:
                probs = torch.softmax(scores, dim=-1)
            v_tile = value[:, :, :w]
            if direct:
                torch.matmul(probs.to(value.dtype), v_tile, out=out.view(b, h, g * q, d))
            elif scratch is not None and n_out:
                o = scratch[n_scores : n_scores + b * hq * n * d].view(b, h, g * n, d)
                out[:, :, :, t0:t1] = torch.matmul(probs, v_tile, out=o).view(b, h, g, n, d)
            else:
                out[:, :, :, t0:t1] = torch.matmul(probs.to(value.dtype), v_tile).view(b, h, g, n, d)
            if want_sums:  # sum over the tile's queries and the group's query heads (mean taken below)
                if real is None:
                    tile_sums = probs.view(b, h, g * n, w).sum(2)
                else:  # padding queries weigh 0
                    weight = real[:, t0:t1].repeat(1, g).view(b, 1, 1, g * n)
                    tile_sums = torch.matmul(weight, probs).view(b, h, w)
                if sums is None and w == s:  # the only tile
                    sums = tile_sums
                else:
                    if sums is None:
                        sums = torch.zeros(b, h, s, device=query.device)
                    sums[..., :w] += tile_sums
                del scores, probs, s5, tile_sums
                continue
            if rows is None:  # (B, H, n, S), a tensor of its own (the policy may keep it)
                p0 = t0
                rows = torch.empty(b, h, min(per_call, q - t0), s, device=query.device)
            with torch.no_grad():  # the policy's rows carry no gradient
                part = rows[:, :, t0 - p0 : t1 - p0]
                if w < s:
                    part[..., w:].zero_()
                _mean_of_heads(probs.view(b, h, g, n, w), part[..., :w])
                if real is not None:
                    part.mul_(real[:, None, t0:t1, None])
            del scores, probs, s5, part
            if t1 - p0 == rows.shape[2]:
                self.policy.observe(st, rows)
                rows = None
        if sums is not None:
            self.policy.observe_sums(st, sums.div_(g))
        return out.view(b, hq, q, d).transpose(1, 2).contiguous()

    def query_tile(self, batch: int, query_heads: int, queries: int, slots: int, device: torch.device) -> int:
        """Queries per tile of the explicit attention (:attr:`tile_bytes` of float32 scores, a multiple of 16, at
        least 16, at most the chunk)."""
        budget = self.tile_bytes or (8 if device.type == "cpu" else 256) * 1024 * 1024
        return min(queries, max(16, budget // max(1, 4 * batch * query_heads * slots) // 16 * 16))

    def _append(self, st: LayerState, q: int, s: int) -> None:
        chunk = self._chunk
        assert chunk is not None
        old = st.valid.shape[-1]
        if old + q != s:
            raise RuntimeError(
                f"layer {st.layer}: cache holds {s} slots after the chunk, the engine expected {old} + {q}; "
                "was the cache modified outside the engine?"
            )
        b, h = st.valid.shape[:2]
        self._live[st.layer] = self._live[st.layer] + chunk["n_real"][:, None]
        st.valid = torch.cat([st.valid, chunk["valid"][:, None, :].expand(b, h, q)], dim=-1)
        st.position = torch.cat([st.position, chunk["position"][:, None, :].expand(b, h, q)], dim=-1)
        c0 = chunk["clock0"]
        arr = self._shared(("arrival",), lambda: torch.arange(c0, c0 + q, device=st.valid.device).view(1, 1, q))
        st.arrival = torch.cat([st.arrival, arr.expand(b, h, q)], dim=-1)
        for name, t in st.tokens.items():
            pad = torch.zeros(*t.shape[:2], q, *t.shape[3:], dtype=t.dtype, device=t.device)
            st.tokens[name] = torch.cat([t, pad], dim=2)

    def _shared(self, key: tuple[Any, ...], build: Any) -> Tensor:
        """A tensor that every layer of the current chunk would build alike, built once per chunk."""
        chunk = self._chunk
        assert chunk is not None
        masks = chunk["masks"]
        if key not in masks:
            masks[key] = build()
        return masks[key]

    def _causal(self, q: int) -> Tensor:
        return self._shared(("causal", q), lambda: torch.ones(q, q, dtype=torch.bool, device=self.device).tril())

    def _mask(
        self, layer: int, st: LayerState | None, q: int, s: int, sliding_window: int | None, all_live: bool
    ) -> Tensor | None:
        """The boolean mask (True: attend) of a chunk's queries against a layer's S slots: (1, 1, Q, S) when every
        slot is live, (B, 1, Q, S) when all heads of a sequence see the same slots, else (B, H, Q, S); None when
        nothing is masked (one query, every slot live). Masks that depend only on the chunk and S are built once
        per chunk and shared by the layers."""
        chunk = self._chunk
        assert chunk is not None
        if st is not None and all_live:
            if q == 1:
                return None
            old = s - q
            return self._shared(
                ("live", s),
                lambda: torch.cat(
                    [torch.ones(q, old, dtype=torch.bool, device=self.device), self._causal(q)], dim=-1
                ).view(1, 1, q, s),
            )
        if st is None:
            return self._shared(
                ("clock", s, sliding_window), lambda: self._see_something(self._clock_mask(q, s, sliding_window))
            )
        valid = st.valid[:, :1] if self._alike[layer] else st.valid
        old = s - q
        new_part = self._causal(q).view(1, 1, q, q) & valid[:, :, None, old:]
        old_part = valid[:, :, None, :old].expand(-1, -1, q, -1)
        return self._see_something(torch.cat([old_part, new_part], dim=-1))

    def _see_something(self, mask: Tensor) -> Tensor:
        """Queries that see nothing (padding before any real token) see everything instead: their outputs are
        never used, and this keeps every value finite. Only chunks with padding can hold such queries."""
        chunk = self._chunk
        assert chunk is not None
        return mask if chunk["all_real"] else mask | ~mask.any(-1, keepdim=True)

    def _clock_mask(self, q: int, s: int, sliding_window: int | None) -> Tensor:
        chunk = self._chunk
        assert chunk is not None
        end = chunk["clock0"] + q
        key_clock = torch.arange(end - s, end, device=self.device)  # the most recent s rows
        q_clock = torch.arange(chunk["clock0"], end, device=self.device)
        allowed = key_clock.view(1, -1) <= q_clock.view(-1, 1)
        if sliding_window is not None:
            allowed &= key_clock.view(1, -1) > q_clock.view(-1, 1) - sliding_window
        key_valid = self.pad_history[:, end - s : end]  # (B, S)
        return (allowed.view(1, 1, q, s) & key_valid.view(-1, 1, 1, s)).contiguous()

    # ----- attach / detach ----------------------------------------------------------------------
    def install(self) -> None:
        if self._attached:
            raise RuntimeError("this engine is already attached")
        self.adapter.install(self)
        self._attached = True

    def remove(self) -> None:
        if self._attached:
            self.adapter.uninstall(self)
            self._attached = False
        self.scratch.release()

    @property
    def attached(self) -> bool:
        return self._attached

    @contextmanager
    def attached_to(self) -> Iterator[EvictionEngine]:
        self.install()
        try:
            yield self
        finally:
            self.remove()


def _mean_of_heads(probs: Tensor, out: Tensor) -> None:
    """``out = probs.mean(2)`` for (B, H, g, n, w) probabilities (the query heads of each KV head), written into a
    strided ``out``: a chain of additions of the g slices, twice as fast as ``torch.mean`` with ``out`` on the CPU
    (measured: 3 x 48 x 4.4k floats per head, 0.34 -> 0.17 ms)."""
    g = probs.shape[2]
    if g == 1:
        out.copy_(probs[:, :, 0])
        return
    torch.add(probs[:, :, 0], probs[:, :, 1], out=out)
    for j in range(2, g):
        out.add_(probs[:, :, j])
    out.div_(g)


def _gather_tokens(t: Tensor, order: Tensor) -> Tensor:
    """Gather (..., S, ...) along S with (..., L) indices: ``order`` (B, H, L) for (B, H, S, ...) tensors,
    (L', B, H, L) for layers stacked in front."""
    k = order.ndim
    idx = order.view(*order.shape, *([1] * (t.ndim - k))).expand(*order.shape, *t.shape[k:])
    return torch.gather(t, k - 1, idx)
