"""One registry for memory policies and host adapters; other packages add theirs via entry points.

Entry-point groups: ``namm_transfer.policies`` (name -> MemoryPolicy subclass or factory) and
``namm_transfer.adapters`` (name -> adapter class with a ``supports(model)`` classmethod or an
``__init__`` that raises ``TypeError`` for models it cannot host).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

__all__ = ["register_policy", "register_adapter", "create_policy", "list_policies", "list_adapters", "find_adapter"]

logger = logging.getLogger(__name__)

_POLICIES: dict[str, Callable[..., Any]] = {}
_ADAPTERS: dict[str, Callable[..., Any]] = {}
_loaded = False


def register_policy(name: str, factory: Callable[..., Any] | None = None) -> Any:
    """Register a policy factory (usable as a decorator)."""

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        if name in _POLICIES and _POLICIES[name] is not f:
            raise ValueError(f"a policy named {name!r} is already registered")
        _POLICIES[name] = f
        return f

    return deco(factory) if factory is not None else deco


def register_adapter(name: str, factory: Callable[..., Any] | None = None) -> Any:
    """Register an adapter class (usable as a decorator). Adapters are tried in registration order."""

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        if name in _ADAPTERS and _ADAPTERS[name] is not f:
            raise ValueError(f"an adapter named {name!r} is already registered")
        _ADAPTERS[name] = f
        return f

    return deco(factory) if factory is not None else deco


def _builtin_namm_policy(namm: Any = "default", budget: Any = None, **kwargs: Any) -> Any:
    from .checkpoint import load_namm
    from .namm import NAMM
    from .policies.namm_policy import NAMMPolicy

    net = namm if isinstance(namm, NAMM) else load_namm(namm)
    return NAMMPolicy(net, budget=budget, **kwargs)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from .policies.baselines import H2O, TOVA, FullCache, L2Norm, RandomEviction, StreamingLLM

    for cls in (FullCache, StreamingLLM, H2O, L2Norm, RandomEviction, TOVA):
        _POLICIES.setdefault(cls.name, cls)
    _POLICIES.setdefault("namm", _builtin_namm_policy)

    from namm_transfer.adapters.decoder_lm import DecoderLMAdapter

    _ADAPTERS.setdefault(DecoderLMAdapter.name, DecoderLMAdapter)
    for extra in ("namm_transfer.adapters.video_llm", "namm_transfer.adapters.decision_transformer"):
        try:
            mod = __import__(extra, fromlist=["ADAPTER"])
            adapter = mod.ADAPTER
            _ADAPTERS.setdefault(adapter.name, adapter)
        except (ImportError, AttributeError):
            pass
    for group, target in (("namm_transfer.policies", _POLICIES), ("namm_transfer.adapters", _ADAPTERS)):
        for ep in entry_points(group=group):
            try:
                target.setdefault(ep.name, ep.load())
            except Exception as err:  # a broken plugin must not break the toolkit
                logger.warning("could not load %s entry point %r: %s", group, ep.name, err)


def list_policies() -> list[str]:
    _load()
    return sorted(_POLICIES)


def list_adapters() -> list[str]:
    _load()
    return list(_ADAPTERS)


def create_policy(name: str, **kwargs: Any) -> Any:
    """Build a registered policy: ``create_policy("h2o", budget=0.5)``."""
    _load()
    if name not in _POLICIES:
        raise KeyError(f"unknown policy {name!r}; registered: {', '.join(sorted(_POLICIES))}")
    return _POLICIES[name](**kwargs)


class UnsupportedModelError(TypeError):
    """No registered adapter accepts the model (the message lists what each adapter said)."""


def find_adapter(model: Any, name: str | None = None) -> Any:
    """Instantiate the first registered adapter that accepts ``model`` (or the one named)."""
    _load()
    if name is not None:
        if name not in _ADAPTERS:
            raise KeyError(f"unknown adapter {name!r}; registered: {', '.join(_ADAPTERS)}")
        return _ADAPTERS[name](model)
    errors = []
    for adapter_name, factory in _ADAPTERS.items():
        try:
            return factory(model)
        except TypeError as err:
            errors.append(f"{adapter_name}: {err}")
    raise UnsupportedModelError(f"no adapter supports {type(model).__name__}. Tried:\n  " + "\n  ".join(errors))
