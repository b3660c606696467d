"""A flat buffer reused by consecutive calls instead of fresh multi-MiB temporaries.

On the CPU a fresh tensor of several MiB per call is served by new pages from the kernel (page faults and
zeroing) more often than not; the engine's explicit attention and the NAMM's spectrogram write their per-tile
temporaries into one of these instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Scratch"]


class Scratch:
    """One flat buffer, grown by half at least when a call needs more (so that a cache growing by one token per
    decoded step does not reallocate it every step), never shrunk until :meth:`release`."""

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The buffer, at least ``numel`` elements of ``dtype`` on ``device`` (slice and view it; its contents are
        whatever the last user left)."""
        buf = self.buffer
        if buf is not None and buf.dtype == dtype and buf.device == device:
            if buf.numel() >= numel:
                return buf
            numel = max(numel, buf.numel() * 3 // 2)
        self.buffer = None  # release before allocating the new one
        buf = self.buffer = torch.empty(numel, dtype=dtype, device=device)
        return buf

    def release(self) -> None:
        self.buffer = None
