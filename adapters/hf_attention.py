"""Routing Hugging Face attention layers through an eviction engine.

transformers (5.x) looks up each attention layer's kernel by name in ``AttentionInterface``
using ``module.config._attn_implementation``. We register one kernel, ``"namm_transfer"``, that
forwards to the engine attached to the calling module (``module._namm_engine``), and switch the
configs of the attention modules to it while attached. No mask function is registered under that
name, so transformers builds no mask for these layers: the engine builds every mask itself from
its own bookkeeping (live cache slots, padding, chunk causality, sliding windows).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["KERNEL_NAME", "route_attention", "unroute_attention", "HFCacheRouting"]

KERNEL_NAME = "namm_transfer"
_ENGINE_ATTR = "_namm_engine"
_registered = False


def _kernel(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    engine = getattr(module, _ENGINE_ATTR, None)
    if engine is None:
        raise RuntimeError(
            f"{type(module).__name__} is configured for the namm_transfer kernel but no engine is attached to it; "
            "attach through namm_transfer.attach() and detach with the returned handle"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = engine.attention(
        module.layer_idx,
        query,
        key,
        value,
        scaling=scaling,
        softcap=kwargs.get("softcap"),
        sliding_window=kwargs.get("sliding_window", getattr(module, "sliding_window", None)),
    )
    return out, None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(KERNEL_NAME, _kernel)
    _registered = True


def route_attention(engine: Any, modules: list[nn.Module]) -> list[tuple[Any, str | None]]:
    """Point ``modules`` at ``engine``. Returns what :func:`unroute_attention` needs to undo it."""
    _register()
    for m in modules:
        if getattr(m, _ENGINE_ATTR, None) is not None:
            raise RuntimeError(
                "this model already has a memory policy attached; detach it first (use the handle's detach() "
                "or the context manager)"
            )
    saved: list[tuple[Any, str | None]] = []
    seen: set[int] = set()
    for m in modules:
        setattr(m, _ENGINE_ATTR, engine)
        cfg: Any = m.config
        if id(cfg) not in seen:
            seen.add(id(cfg))
            saved.append((cfg, cfg._attn_implementation))
            cfg._attn_implementation = KERNEL_NAME
    return saved


def unroute_attention(modules: list[nn.Module], saved: list[tuple[Any, str | None]]) -> None:
    for m in modules:
        if hasattr(m, _ENGINE_ATTR):
            delattr(m, _ENGINE_ATTR)
    for cfg, impl in saved:
        cfg._attn_implementation = impl


class HFCacheRouting:
    """Cache access and attention routing shared by the Hugging Face adapters.

    Needs ``self.config`` (the config whose ``DynamicCache`` layout to build) and
    ``self.attn_modules`` (the attention modules to route, in layer order).
    """

    config: Any
    attn_modules: list[nn.Module]
    _saved: Any = None

    def make_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def get_kv(self, cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        lyr = cache.layers[layer]
        return lyr.keys, lyr.values

    def set_kv(self, cache: Any, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        lyr = cache.layers[layer]
        lyr.keys = keys
        lyr.values = values

    def install(self, engine: Any) -> None:
        self._saved = route_attention(engine, self.attn_modules)

    def uninstall(self, engine: Any) -> None:
        unroute_attention(self.attn_modules, self._saved or [])
        self._saved = None
