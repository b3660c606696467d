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

__all__ = ["KERNEL_NAME", "route_attention", "unroute_attention", "HFCacheRouting", "make_growing_cache"]

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
    if dropout:  # transformers passes the attention dropout only in training mode
        raise RuntimeError(
            f"{type(module).__name__} asks for attention dropout {dropout:g} (the model is in training mode), which "
            "the eviction engine does not apply; call model.eval() before attaching, or set the attention dropout "
            "to 0"
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
        return make_growing_cache(self.config)

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


# ----- a KV cache that appends in place -----------------------------------------------------------------
_GROWING_LAYER: Any = None


def _growing_layer_class() -> Any:
    """``DynamicLayer`` with spare capacity: appends write into it instead of concatenating (built lazily, so
    importing this module does not import transformers)."""
    global _GROWING_LAYER
    if _GROWING_LAYER is not None:
        return _GROWING_LAYER
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):  # type: ignore[misc]
        """A full-attention cache layer whose ``keys`` / ``values`` are views of the first ``n`` slots of
        buffers with room to spare.

        ``DynamicLayer.update`` concatenates, which copies the whole layer for every chunk and every decoded
        token; here an append writes only the new slots, and the buffers grow by ``growth`` when full (each
        token is copied a bounded number of times). Assigning ``keys`` / ``values`` (the engine's compaction,
        ``crop``, batch edits) writes into the existing buffer when the new tensor fits and has the same
        batch, head and feature sizes, and otherwise adopts it as the new buffer.
        """

        growth = 1.25

        def __init__(self, **kwargs: Any) -> None:
            self._buf: dict[str, torch.Tensor | None] = {"keys": None, "values": None}
            self._len: dict[str, int] = {"keys": 0, "values": 0}
            self._empty: dict[str, torch.Tensor | None] = {}  # what was assigned while no buffer is held
            super().__init__(**kwargs)

        def _get(self, name: str) -> torch.Tensor | None:
            buf = self._buf[name]
            return self._empty.get(name) if buf is None else buf[:, :, : self._len[name]]

        def _set(self, name: str, t: torch.Tensor | None) -> None:
            if t is None or t.dim() != 4:  # None (reset) or DynamicLayer's empty placeholder tensor
                self._buf[name], self._len[name], self._empty[name] = None, 0, t
                return
            buf, n = self._buf[name], t.shape[-2]
            fits = (
                buf is not None
                and buf.shape[:2] == t.shape[:2]
                and buf.shape[-1] == t.shape[-1]
                and buf.shape[-2] >= n
                and buf.dtype == t.dtype
                and buf.device == t.device
            )
            if fits:
                assert buf is not None
                prefix = buf[:, :, :n]
                if t.data_ptr() != prefix.data_ptr() or t.stride() != prefix.stride():
                    if t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():
                        t = t.clone()  # another view of the same buffer: copy it out before overwriting
                    prefix.copy_(t)
            else:
                buf = t
            self._buf[name], self._len[name] = buf, n

        keys = property(lambda self: self._get("keys"), lambda self, t: self._set("keys", t))
        values = property(lambda self: self._get("values"), lambda self, t: self._set("values", t))

        def _append(self, name: str, new: torch.Tensor) -> torch.Tensor:
            buf, n, q = self._buf[name], self._len[name], new.shape[-2]
            if buf is None or buf.shape[:2] != new.shape[:2] or buf.shape[-1] != new.shape[-1]:
                if n:
                    held = tuple(self._get(name).shape)  # type: ignore[union-attr]
                    raise RuntimeError(f"cannot append {tuple(new.shape)} to a cache holding {held}")
                buf = None
            if buf is None or buf.shape[-2] < n + q:
                cap = max(n + q, int(n * self.growth) + q)
                grown = new.new_empty(*new.shape[:2], cap, new.shape[-1])
                if n:
                    assert buf is not None
                    grown[:, :, :n].copy_(buf[:, :, :n])
                buf = grown
            buf[:, :, n : n + q].copy_(new)
            self._buf[name], self._len[name] = buf, n + q
            return buf[:, :, : n + q]

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            return self._append("keys", key_states), self._append("values", value_states)

        def capacity(self) -> int:
            buf = self._buf["keys"]
            return 0 if buf is None else buf.shape[-2]

    _GROWING_LAYER = GrowingLayer
    return GrowingLayer


def make_growing_cache(config: Any) -> Any:
    """``DynamicCache(config=config)`` with every plain full-attention layer replaced by one that appends in
    place (sliding-window and other special layers are left as transformers builds them)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=config)
    growing = _growing_layer_class()
    cache.layers = [growing() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
