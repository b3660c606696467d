"""namm-transfer: attach a frozen, language-trained Neural Attention Memory Model to other transformers.

Importing the package is cheap: torch and transformers load on first use of an attribute.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "NAMM": "namm_transfer.namm",
    "NAMMConfig": "namm_transfer.namm",
    "attach": "namm_transfer.session",
    "AttachedMemory": "namm_transfer.session",
    "EngineConfig": "namm_transfer.engine",
    "EvictionEngine": "namm_transfer.engine",
    "MemoryPolicy": "namm_transfer.policies.base",
    "LayerState": "namm_transfer.policies.base",
    "RatioBudget": "namm_transfer.policies.base",
    "TokenBudget": "namm_transfer.policies.base",
    "ReplayBudget": "namm_transfer.policies.base",
    "NAMMPolicy": "namm_transfer.policies.namm_policy",
    "create_policy": "namm_transfer.registry",
    "register_policy": "namm_transfer.registry",
    "register_adapter": "namm_transfer.registry",
    "list_policies": "namm_transfer.registry",
    "load_namm": "namm_transfer.checkpoint",
    "save_namm": "namm_transfer.checkpoint",
    "list_namms": "namm_transfer.checkpoint",
    "import_reference_checkpoint": "namm_transfer.checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'namm_transfer' has no attribute {name!r}")
