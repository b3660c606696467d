"""Tiny random models of every supported decoder-LM family (CPU, float32, seconds to build)."""

from __future__ import annotations

import torch

VOCAB = 96


def tiny_decoder(family: str, seed: int = 0, layers: int = 2) -> torch.nn.Module:
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None))
    elif family == "gemma3":
        n = max(layers, 3)
        cfg = Gemma3TextConfig(
            **{**common, "num_hidden_layers": n},
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention"] * (n - 1) + ["full_attention"],
        )
        model = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["llama", "qwen2", "mistral", "gemma3"]
