"""Tiny random models of every supported decoder-LM family (CPU, float32, seconds to build).

Weights are drawn with a standard deviation of 0.08 (transformers' default, 0.02, leaves a model this small with
nearly uniform attention and an attention output far smaller than the residual stream, so an error in attention
hardly moves the logits) and the query and key projections are scaled by 3 (by the query / key norms' weights in
Gemma 3): the mean largest attention probability of a late query is about 0.4-0.6 instead of 1/40, and scaling every
attention score by 1.001 moves the logits by about 3e-3 instead of 8e-6, far above the tests' 1e-5 tolerance.
"""

from __future__ import annotations

import torch

VOCAB = 96
SHARPEN = 3.0


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
        initializer_range=0.08,
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
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if family == "gemma3":  # its q / k norms multiply by (1 + weight), after the projections
                attn.q_norm.weight.add_(SHARPEN - 1.0)
                attn.k_norm.weight.add_(SHARPEN - 1.0)
            else:
                attn.q_proj.weight.mul_(SHARPEN)
                attn.k_proj.weight.mul_(SHARPEN)
    return model.eval()


FAMILIES = ["llama", "qwen2", "mistral", "gemma3"]


def random_d4rl_file(path, env: str, state_dim: int, act_dim: int, lengths, timeout, rng):
    """A D4RL-format HDF5 file of random transitions: trajectories of ``lengths`` steps, each ending in a terminal,
    or in a timeout where ``timeout[i]`` is true; ``rng`` (numpy Generator) draws observations, actions, rewards."""
    import numpy as np
    from namm_transfer.evals.offline_rl.datasets import write_d4rl_hdf5

    lengths = np.asarray(lengths)
    n = int(lengths.sum())
    ends = np.cumsum(lengths) - 1
    timeout = np.asarray(timeout, bool)
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[ends[~timeout]] = True
    timeouts[ends[timeout]] = True
    data = {
        "observations": rng.normal(size=(n, state_dim)) * 2 + 1,
        "actions": rng.uniform(-1, 1, (n, act_dim)),
        "rewards": rng.uniform(0, 3, n),
        "terminals": terminals,
        "timeouts": timeouts,
    }
    return write_d4rl_hdf5(path, data, {"env_name": env, "level": "medium"})
