"""Adapter for Hugging Face decoder-only language models.

Supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, Gemma3ForCausalLM (also the
language model inside video LLMs of those families, through :class:`DecoderLMAdapter` with
``inputs_embeds``).

Managed layers are the full-attention layers. Sliding-window layers (5 of every 6 in Gemma 3,
all of them in a Mistral config with ``sliding_window`` set, Qwen2 with ``use_sliding_window``)
keep their own window cache; the engine still builds their masks. The retained-cache statistic
is computed over managed layers only.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from namm_transfer.policies.base import HostInfo

from .hf_attention import HFCacheRouting

__all__ = ["DecoderLMAdapter", "SUPPORTED_DECODER_LMS"]

SUPPORTED_DECODER_LMS = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Gemma3ForCausalLM": "gemma3",
}


def eos_ids(model: Any, eos_token_id: int | list[int] | None = None) -> list[int]:
    """The ids that end a generation: ``eos_token_id`` if given, else the model's ``generation_config.eos_token_id``
    (what ``model.generate`` stops at by default); ``[]`` when neither names one."""
    if eos_token_id is None:
        gen = getattr(model, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


class DecoderLMAdapter(HFCacheRouting):
    """Host questions answered for a decoder LM: layers, cache access, chunk feeding."""

    name = "decoder-lm"

    def __init__(self, model: nn.Module) -> None:
        cls = type(model).__name__
        if cls not in SUPPORTED_DECODER_LMS:
            raise TypeError(f"{cls} is not a supported decoder LM; supported: {', '.join(SUPPORTED_DECODER_LMS)}")
        if getattr(model.config, "use_bidirectional_attention", False):
            raise TypeError(
                f"this {cls} uses bidirectional attention (an embedding model's setting); the engine's attention is "
                "causal: supported are causal decoder LMs"
            )
        self.model = model
        self.family = SUPPORTED_DECODER_LMS[cls]
        self.config: Any = model.config
        decoder: Any = model.get_decoder() if hasattr(model, "get_decoder") else model.model  # type: ignore[operator]
        self._bind_layers(model, decoder, f"this {cls}")
        self._saved: Any = None

    def _bind_layers(self, lm: nn.Module, decoder: Any, what: str) -> None:
        """Attention modules, managed (full-attention) layers and the forward's cache keyword of ``lm``."""
        self.attn_modules: list[nn.Module] = [layer.self_attn for layer in decoder.layers]
        for i, m in enumerate(self.attn_modules):
            if getattr(m, "layer_idx", i) != i:
                raise RuntimeError(f"attention module {i} reports layer_idx {m.layer_idx}")
        probe = self.make_cache()
        sliding = [bool(getattr(layer, "is_sliding", False)) for layer in probe.layers]
        if len(sliding) != len(self.attn_modules):
            sliding = [False] * len(self.attn_modules)
        self.managed = tuple(i for i, s in enumerate(sliding) if not s)
        if not self.managed:
            raise ValueError(
                f"every layer of {what} uses a sliding window (config.sliding_window="
                f"{getattr(self.config, 'sliding_window', None)}), so there is no full-attention cache to manage; "
                "load it with sliding_window=None (as Mistral v0.2+ and most Qwen2 checkpoints do)"
            )
        params = inspect.signature(lm.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._accepts_cache_position = "cache_position" in params

    # ----- host description ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def host_info(self) -> HostInfo:
        c = self.config
        n_heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
        return HostInfo(
            n_layers=len(self.attn_modules),
            managed_layers=self.managed,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or n_heads,
            n_q_heads=n_heads,
            head_dim=head_dim,
            family=self.family,
        )

    # ----- feeding ----------------------------------------------------------------------------------
    def forward(
        self,
        cache: Any,
        input_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        position_ids: Tensor,
        clock: Tensor,
        logits_to_keep: int = 1,
        **kwargs: Any,
    ) -> Tensor:
        """Run one chunk; returns logits (B, logits_to_keep, vocab)."""
        extra: dict[str, Any] = {self._cache_kw: cache, "use_cache": True, "position_ids": position_ids}
        if self._accepts_cache_position:
            extra["cache_position"] = clock
        out = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep, **extra, **kwargs
        )
        return out.logits
