"""Streamed attention spectrogram with a per-token exponential moving average (namm-spec.md).

For each cached token k the signal is its attention column a_k(t) over query rows t. The row
clock ``t`` counts every query the layer has processed (the engine's clock, padding included).
Frames are fixed on that clock: frame ``g`` covers rows ``[g * hop - (n_fft - hop), g * hop + hop)``
(rows before 0 are zeros, i.e. ``n_fft - hop`` zero rows are prepended at the start), so with the
defaults 512 new rows give 32 frames and the result equals ``torch.stft`` over the update window
with the previous window's last 16 rows prepended (periodic Hann, no centering, one-sided,
magnitude). When ``update_interval`` is a multiple of ``hop`` this is exactly the spec's per-update
formula; otherwise incomplete frames simply carry over to the next update.

Stream state per layer, all aligned with the cache's token axis ``S``:

* ``rows``  (B, H, S, R) float32: the last ``R`` rows of each token's column (R < n_fft + hop),
  covering clock rows ``[start, clock)``; layer-level ``start`` is kept by the caller.
* ``ema``   (B, H, S, n_bins) float32: the EMA of the magnitude spectrogram.
* ``arrival`` (B, H, S) int64: the clock row at which the token arrived.

A frame contributes to a token only if its first row is at or after the token's arrival. Frames
that qualify for a token are always a suffix of the frames completed in a call, so the EMA of
the spec, ``sum_f (1 - g) g^(F-1-f) S_f + g^F old`` with ``g = gamma ** hop``, is applied with
``F`` = the number of qualifying frames for that token.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SpectrogramStream"]


class SpectrogramStream:
    """Stateless helper that advances the spectrogram state of one layer by a chunk of rows."""

    def __init__(self, n_fft: int = 32, hop: int = 16, gamma: float = 0.99) -> None:
        self.n_fft = n_fft
        self.hop = hop
        self.overlap = n_fft - hop
        self.frame_decay = gamma**hop
        self.n_bins = n_fft // 2 + 1
        self._window: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def window(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        key = (device, dtype)
        if key not in self._window:
            self._window[key] = torch.hann_window(self.n_fft, periodic=True, dtype=dtype, device=device)
        return self._window[key]

    def initial_start(self) -> int:
        """Clock row of the first buffered row at the start of a sequence (the prepended zeros)."""
        return -self.overlap

    def empty_rows(self, batch: int, heads: int, tokens: int, device: torch.device) -> Tensor:
        return torch.zeros(batch, heads, tokens, self.overlap, device=device)

    def advance(
        self, rows: Tensor, ema: Tensor, arrival: Tensor, new_rows: Tensor, start: int, clock: int
    ) -> tuple[Tensor, Tensor, int]:
        """Fold ``new_rows`` into the state.

        Args:
            rows: (B, H, S, R) buffered rows covering clock ``[start, clock)``.
            ema: (B, H, S, n_bins).
            arrival: (B, H, S) clock row of each token's arrival.
            new_rows: (B, H, S, Q) the next ``Q`` rows (clock ``[clock, clock + Q)``).
            start, clock: as above.
        Returns:
            (rows, ema, start) after the chunk; the clock is now ``clock + Q``.
        """
        buf = torch.cat([rows, new_rows.to(rows.dtype)], dim=-1)
        end = clock + new_rows.shape[-1]
        # Frames end on multiples of hop. The first frame not yet folded starts at `start`.
        n_frames = 0 if end - start < self.n_fft else (end - start - self.n_fft) // self.hop + 1
        if n_frames == 0:
            return buf, ema, start
        frames = buf.unfold(-1, self.n_fft, self.hop)[..., :n_frames, :]  # (B, H, S, F, n_fft)
        spec = torch.fft.rfft(frames * self.window(buf.device, buf.dtype), dim=-1).abs()  # (B,H,S,F,bins)
        frame_start = start + self.hop * torch.arange(n_frames, device=buf.device)  # (F,)
        qualifies = frame_start.view(1, 1, 1, -1) >= arrival.unsqueeze(-1)  # (B, H, S, F)
        g = self.frame_decay
        # weight of frame f: (1 - g) g^(F-1-f) if it qualifies; qualifying frames are a suffix.
        expo = torch.arange(n_frames - 1, -1, -1, device=buf.device, dtype=torch.float64)
        w = ((1.0 - g) * torch.pow(torch.tensor(g, dtype=torch.float64), expo)).to(buf.dtype)
        w = w * qualifies.to(buf.dtype)
        n_q = qualifies.sum(-1)  # (B, H, S)
        decay = torch.pow(torch.tensor(g, dtype=torch.float64, device=buf.device), n_q.to(torch.float64))
        ema = decay.to(ema.dtype).unsqueeze(-1) * ema + torch.einsum("bhsf,bhsfk->bhsk", w, spec).to(ema.dtype)
        new_start = start + self.hop * n_frames
        return buf[..., new_start - start :].contiguous(), ema, new_start
