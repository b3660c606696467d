"""Attach a memory policy to a model and run it: ``attach(model, policy)`` -> :class:`AttachedMemory`.

>>> with attach(model, "namm", update_interval=512) as mem:          # doctest: +SKIP
...     out = mem.generate(input_ids, attention_mask, max_new_tokens=32)
...     print(mem.stats.retained_cache())

Generation goes through :meth:`AttachedMemory.generate` (greedy; the same main arguments as
``model.generate``): Hugging Face's ``generate`` derives positions and masks from the cache
length, which eviction changes, so it is not used while a policy is attached.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .engine import EngineConfig, EvictionEngine, EvictionStats
from .policies.base import MemoryPolicy
from .registry import create_policy, find_adapter

__all__ = ["attach", "AttachedMemory"]


def attach(
    model: Any,
    policy: MemoryPolicy | str = "namm",
    *,
    update_interval: int = 512,
    chunk_size: int = 512,
    final_update: bool | None = None,
    record_kept: bool = False,
    adapter: str | None = None,
    **policy_kwargs: Any,
) -> AttachedMemory:
    """Attach ``policy`` to ``model``'s attention. Reversible: use as a context manager or call ``detach()``.

    Args:
        model: a supported host (see ``namm-transfer info``).
        policy: a :class:`MemoryPolicy` or a registered name (``full``, ``namm``, ``h2o``, ...);
            ``policy_kwargs`` go to the registered factory (e.g. ``budget=0.5``).
        update_interval: run the policy every this many tokens (a multiple of 3 for Decision Transformers).
        chunk_size: prefill chunk length (chunks also end at update steps, so at most ``update_interval`` tokens).
            The default, 512 (the default ``update_interval``, so the longest chunk it allows), is the chunk of the
            timed runs in BENCHMARKS.md: in its "CPU" table (``benchmarks/engine_speed.py --chunk-size 512``, the run
            of 2026-11-28) the engine keeping every token takes 1.05x the unmodified model's time at 2048 tokens and
            0.99x / 1.03x Hugging Face's own prefill in 512-token chunks at 2048 / 4096 tokens, where the run of
            2026-11-27 at 128-token chunks (an older engine too) took 1.30x. On the GPU each chunk costs about the
            same host time whatever it holds: 2048-token chunks cut the prefill 2-4x against 512 ("Reading the GPU
            run"), so there raise ``update_interval`` and ``chunk_size`` together where the policy allows. Smaller
            chunks bound the activations of one forward call (chunk x hidden per layer) and the attention rows a
            policy is handed (BENCHMARKS.md's feature-memory table: 16.8 MiB at 64-token chunks, 24.6 at 512).
        final_update: run the policy once more at the end of every prompt (``prefill`` / ``generate``), so that a
            budget holds when the prompt is done and decoding starts, whatever the prompt's length. None (the
            default): on for a policy with a ratio or token budget (``h2o``, ``l2``, ``streaming``, ``random``,
            ``tova``, a :class:`~namm_transfer.policies.namm_policy.NAMMPolicy` with a budget), off for one without
            (``full``, the NAMM's threshold); a :class:`~namm_transfer.policies.base.ReplayBudget` follows the run it
            replays (its ``holds_at_prompt_end``, False unless given). False: the paper's schedule, the policy runs
            at update steps only (the threshold protocol's, and what a replay of such a run needs).
    """
    if isinstance(policy, str):
        policy = create_policy(policy, **policy_kwargs)
    elif policy_kwargs:
        raise TypeError(f"policy keyword arguments {sorted(policy_kwargs)} need a policy name, not an instance")
    host = find_adapter(model, adapter)
    cfg = EngineConfig(update_interval, chunk_size, final_update, record_kept)
    assert isinstance(policy, MemoryPolicy), f"not a MemoryPolicy: {policy!r}"
    engine = EvictionEngine(host, policy, cfg)
    engine.install()
    return AttachedMemory(engine)


class AttachedMemory:
    """Handle of an attached policy: feeds the model and exposes statistics."""

    def __init__(self, engine: EvictionEngine) -> None:
        self.engine = engine

    # context manager -------------------------------------------------------------------------------
    def __enter__(self) -> AttachedMemory:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def detach(self) -> None:
        """Restore the model exactly as it was (idempotent)."""
        self.engine.remove()

    @property
    def policy(self) -> MemoryPolicy:
        return self.engine.policy

    @property
    def stats(self) -> EvictionStats:
        return self.engine.stats

    def _check(self) -> None:
        if not self.engine.attached:
            raise RuntimeError("this memory handle was detached; attach again to keep using it")

    # feeding ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int = 1,
        reset: bool = True,
    ) -> Tensor:
        """Feed a (left-padded) prompt in chunks; returns logits of its last ``logits_to_keep`` positions.

        The policy runs at every update step and, with ``final_update`` (by default whenever the policy has a ratio
        or token budget, see :func:`attach`), once more after the last chunk unless the prompt ended on an update
        step: the cache then holds the budget when the prompt is done.

        Args:
            input_ids: (B, T); or inputs_embeds: (B, T, hidden).
            attention_mask: (B, T), 0 for padding. New sequences must be padded on the left (a right-padded batch
                is refused: the model would continue from a padding slot); a continuation (``reset=False``) may
                hold padding anywhere, which the engine hides and does not count as seen.
            reset: start new sequences (True) or continue the current ones.
        Returns:
            (B, logits_to_keep, vocab).
        """
        self._check()
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("give input_ids or inputs_embeds")
        b, t = ref.shape[0], ref.shape[1]
        if t == 0:
            raise ValueError("empty prompt")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, t):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, t)}")
            real = attention_mask.bool()
            right = (real[:, :-1] & ~real[:, 1:]).any(-1)  # a padding slot after a real token
            # (new sequences only: continuing ones may pad a finished sequence, which the engine hides)
            if reset and bool(right.any()):
                rows = right.nonzero().flatten().tolist()
                raise ValueError(
                    f"attention_mask pads sequence(s) {rows[:8]} on the right; the session needs left padding (the "
                    "last slot of every sequence a real token): set tokenizer.padding_side = 'left'"
                )
        if not 1 <= logits_to_keep <= t:
            raise ValueError(f"logits_to_keep must be in [1, {t}], got {logits_to_keep}")
        eng = self.engine
        if not reset and eng.cache is None:
            raise RuntimeError("prefill(reset=False) continues the current sequences, but none was started yet")
        if reset:
            eng.reset(b, ref.device)
        cfg = eng.config
        pieces = []
        pos = 0
        while pos < t:
            clock = eng.clock
            to_update = cfg.update_interval - clock % cfg.update_interval
            end = min(t, pos + cfg.chunk_size, pos + to_update)
            want = max(0, min(end - pos, logits_to_keep - (t - end)))
            out = eng.forward_chunk(
                input_ids=None if input_ids is None else input_ids[:, pos:end],
                inputs_embeds=None if inputs_embeds is None else inputs_embeds[:, pos:end],
                attention_mask=None if attention_mask is None else attention_mask[:, pos:end],
                logits_to_keep=max(want, 1),
            )
            if want:
                pieces.append(out[:, -want:])
            pos = end
        if cfg.final_update and eng.clock % cfg.update_interval != 0:
            eng.update()
        return torch.cat(pieces, dim=1)

    @torch.no_grad()
    def step(self, token_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Feed one token per sequence (B, 1) and return its logits (B, 1, vocab)."""
        self._check()
        if token_ids.ndim != 2 or token_ids.shape[1] != 1:
            raise ValueError(f"step feeds one token per sequence: expected (B, 1), got {tuple(token_ids.shape)}")
        return self.engine.forward_chunk(input_ids=token_ids, attention_mask=attention_mask, logits_to_keep=1)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> Tensor:
        """Greedy decoding, like ``model.generate(..., do_sample=False)``.

        Args:
            eos_token_id: the id(s) that end a sequence; None (the default, as in ``model.generate``): the model's
                ``generation_config.eos_token_id``; ``[]``: never stop before ``max_new_tokens``.
            pad_token_id: what follows a finished sequence's EOS; None: the model's
                ``generation_config.pad_token_id``, else the first EOS id, else 0.

        Returns:
            (B, T + n) the prompt followed by the generated tokens; sequences that finished early
            are padded with ``pad_token_id``.
        """
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        from .adapters.decoder_lm import eos_ids

        model = getattr(self.engine.adapter, "model", None)
        eos = eos_ids(model, eos_token_id)
        if pad_token_id is None:
            pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        logits = self.prefill(input_ids, attention_mask)
        b = input_ids.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = [input_ids]
        eos_t = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt[:, None])
            if eos:
                done |= torch.isin(nxt, eos_t)
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            logits = self.step(nxt[:, None])
        return torch.cat(out, dim=1)
