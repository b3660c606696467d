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

The transform is a matmul with the windowed one-sided DFT matrix, run on the rows in the engine's own
time-major layout (query row x token): on CPU this is faster than ``torch.fft.rfft`` over the token-major
frames (fewer, larger BLAS calls and no copy of the chunk into the token-major buffer), and it is the same
transform (the exactness tests compare it with a float64 ``rfft`` of the formula). On the CPU it runs per
(sequence, head) and block of tokens, so that the block's transform, magnitudes and sum over frames stay in
the cache; for a block whose tokens all predate the update's first frame the sum over frames is one product
with the frame weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .scratch import Scratch

__all__ = ["SpectrogramStream", "live_lengths", "length_normalized_rows"]


def live_lengths(valid: Tensor, arrival: Tensor, clock: int, queries: int) -> Tensor:
    """The number of live cached tokens each query of a call sees, per (sequence, KV head) row.

    Args:
        valid: (B, H, S) bool, the live slots (the chunk's own tokens included).
        arrival: (B, H, S) int64, each slot's clock row at arrival.
        clock: the clock row of the call's first query; query ``j`` is at ``clock + j``.
        queries: ``Q``, the number of queries in the call.
    Returns:
        (B, H, Q) int64: for query ``j``, the live slots that arrived at or before ``clock + j`` (those its
        attention row spreads over, itself included).
    """
    # each live slot counts from the first query at or after its arrival on: a histogram of that query index
    # (slots that arrived before the call count from query 0, later ones never), summed cumulatively
    first = (arrival - clock).clamp_(0, queries)
    hist = torch.zeros(*valid.shape[:-1], queries + 1, dtype=torch.int64, device=valid.device)
    hist.scatter_add_(-1, first, valid.to(torch.int64))
    return hist[..., :queries].cumsum(-1)


def length_normalized_rows(rows: Tensor, valid: Tensor, arrival: Tensor, clock: int) -> Tensor:
    """Attention rows times the live cache length of their query (``NAMMConfig.length_normalized_features``).

    Args:
        rows: (B, H, Q, S) attention rows of queries at clock ``[clock, clock + Q)``.
        valid, arrival: (B, H, S), see :func:`live_lengths`.
    Returns:
        (B, H, Q, S) float: ``rows[b, h, j, k] * live_lengths(...)[b, h, j]`` (a new tensor; a uniform row becomes 1
        on every live slot).
    """
    counts = live_lengths(valid, arrival, clock, rows.shape[-2])
    return rows * counts.unsqueeze(-1).to(rows.dtype)


class SpectrogramStream:
    """Stateless helper that advances the spectrogram state of one layer by a chunk of rows."""

    def __init__(self, n_fft: int = 32, hop: int = 16, gamma: float = 0.99, one_product: bool | None = None) -> None:
        # transform all (sequence, head) rows in one matrix product (one launch, the frames copied into a batch)
        # rather than one product per row over strided frames (no copy). None: per row on the CPU, where the copy
        # costs more than the calls; one product elsewhere, where each call costs the host more than its work (a
        # NAMM evolution batch holds hundreds of rows)
        self.one_product = one_product
        self.n_fft = n_fft
        self.hop = hop
        self.overlap = n_fft - hop
        self.frame_decay = gamma**hop
        self.n_bins = n_fft // 2 + 1
        self._dft: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        # CPU: the time-major rows, the transform and its magnitudes go into one buffer reused by every call
        # (layers and tiles in turn)
        self.scratch = Scratch()

    def dft_matrix(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """(2 * n_bins, n_fft): rows ``k`` give the real part, rows ``n_bins + k`` the imaginary part of bin ``k``
        of the Hann-windowed DFT (built in float64, then cast)."""
        key = (device, dtype)
        if key not in self._dft:
            n = self.n_fft
            t = torch.arange(n, dtype=torch.float64)
            ang = 2.0 * torch.pi * torch.outer(torch.arange(self.n_bins, dtype=torch.float64), t) / n
            win = torch.hann_window(n, periodic=True, dtype=torch.float64)
            mat = torch.cat([torch.cos(ang) * win, -torch.sin(ang) * win])
            self._dft[key] = mat.to(device=device, dtype=dtype)
        return self._dft[key]

    def initial_start(self) -> int:
        """Clock row of the first buffered row at the start of a sequence (the prepended zeros)."""
        return -self.overlap

    def empty_rows(self, batch: int, heads: int, tokens: int, device: torch.device) -> Tensor:
        return torch.zeros(batch, heads, tokens, self.overlap, device=device)

    block_floats = 1 << 19
    """CPU: the size of one block's transform (frames x 2 n_bins x tokens floats, 2 MiB). A block's transform and
    magnitudes stay in the cache between the product, the magnitude and the sum over frames; larger blocks save
    calls (measured on a 2-core EPYC: 4,096 tokens x 28 frames per head, 24 ms -> 17 ms per call)."""

    def _fold_in_blocks(
        self, rows: Tensor, new_rows: Tensor, first: Tensor, wv: Tensor, n_frames: int
    ) -> tuple[Tensor, Tensor]:
        """CPU path of :meth:`advance`: the rows left buffered (B, H, S, R') and the weighted sum over frames of the
        magnitudes (B, H, bins, S), one (sequence, head) row and one block of tokens at a time. The chunk's rows
        are read where they are (the engine's time-major rows): only the frames that reach back into the buffered
        rows are built in a small stitched buffer (at most n_fft + hop rows). For a block where every frame
        qualifies for every token (all but the newest tokens) the sum over frames is one product with the
        weights; elsewhere the weights are masked per token."""
        b, h, s, r = rows.shape
        q = new_rows.shape[-1]
        nb, hop, n_fft = self.n_bins, self.hop, self.n_fft
        new_t = new_rows.transpose(-1, -2).to(rows.dtype).reshape(b * h, q, s)  # a view for the engine's rows
        k0 = min(n_frames, -(-r // hop))  # frames that start inside the buffered rows
        n_st = hop * (k0 - 1) + n_fft if k0 else 0  # rows those frames cover: buffered, then the first new ones
        blk = min(s, max(16, self.block_floats // (n_frames * 2 * nb)))
        n_buf, n_spec = b * h * n_st * s, n_frames * 2 * nb * blk
        scratch = self.scratch.get(n_buf + n_spec + n_spec // 2, rows.dtype, rows.device)
        stitched = scratch[:n_buf].view(b * h, n_st, s)
        if k0:
            stitched[:, :r] = rows.reshape(b * h, s, r).transpose(-1, -2)
            stitched[:, r:] = new_t[:, : n_st - r]
        dft = self.dft_matrix(rows.device, rows.dtype).expand(n_frames, 2 * nb, n_fft)
        folded = torch.empty(b * h, nb, s, dtype=rows.dtype, device=rows.device)
        first = first.reshape(b * h, s)
        n_blocks = -(-s // blk)
        # one host read: which (row, block) has a token for which some frame does not qualify
        partial = torch.zeros(b * h, n_blocks * blk, dtype=torch.bool, device=rows.device)
        partial[:, :s] = first > 0
        partial_blocks = partial.view(b * h, n_blocks, blk).any(-1).tolist()
        frame_idx = torch.arange(n_frames, device=rows.device).view(-1, 1)
        for i in range(b * h):
            # (F, S, n_fft) strided views: frames [0, k0) in the stitched rows, the rest in the chunk's rows
            old_frames = stitched[i].unfold(0, n_fft, hop) if k0 else None
            new_frames = new_t[i, hop * k0 - r :].unfold(0, n_fft, hop)[: n_frames - k0] if k0 < n_frames else None
            for j, c0 in enumerate(range(0, s, blk)):
                c1 = min(s, c0 + blk)
                k = c1 - c0
                spec = scratch[n_buf : n_buf + n_frames * 2 * nb * k].view(n_frames, 2 * nb, k)
                if old_frames is not None:
                    torch.bmm(dft[:k0], old_frames[:, c0:c1].transpose(-1, -2), out=spec[:k0])
                if new_frames is not None:
                    torch.bmm(dft[k0:], new_frames[:, c0:c1].transpose(-1, -2), out=spec[k0:])
                mag = scratch[n_buf + n_spec : n_buf + n_spec + n_frames * nb * k].view(n_frames, nb, k)
                re, im = spec[:, :nb], spec[:, nb:]
                torch.mul(re, re, out=mag).addcmul_(im, im).sqrt_()  # magnitudes (no overflow: |bin| <= 32)
                if partial_blocks[i][j]:
                    w = wv.view(-1, 1) * (frame_idx >= first[i, c0:c1]).to(wv.dtype)  # (F, k)
                    folded[i, :, c0:c1] = mag.mul_(w.unsqueeze(1)).sum(0)
                else:
                    folded[i, :, c0:c1] = torch.matmul(wv.view(1, -1), mag.view(n_frames, nb * k)).view(nb, k)
        # rows from the first frame not folded (hop * n_frames after start) on stay buffered
        cut = hop * n_frames
        if cut >= r:
            left = new_rows[..., cut - r :].to(rows.dtype).contiguous()
        else:
            left = torch.cat([rows[..., cut:], new_rows.to(rows.dtype)], dim=-1)
        return left, folded.view(b, h, nb, s)

    @torch.no_grad()
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
            (rows, ema, start) after the chunk; the clock is now ``clock + Q``. The state carries no gradient
            (a NAMM is evolved, never backpropagated through its features).
        """
        end = clock + new_rows.shape[-1]
        # Frames end on multiples of hop. The first frame not yet folded starts at `start`.
        n_frames = 0 if end - start < self.n_fft else (end - start - self.n_fft) // self.hop + 1
        if n_frames == 0:
            return torch.cat([rows, new_rows.to(rows.dtype)], dim=-1), ema, start
        # time-major buffer (B, H, T, S): the engine's rows arrive as a transposed view of (B, H, Q, S)
        b, h, s, r = rows.shape
        t = r + new_rows.shape[-1]
        nb = self.n_bins
        one = self.one_product if self.one_product is not None else rows.device.type != "cpu"
        # frames that qualify for a token are a suffix: the first is ceil((arrival - start) / hop), clamped
        first = torch.div(arrival - start + self.hop - 1, self.hop, rounding_mode="floor").clamp_(0, n_frames)
        g = self.frame_decay
        # weight of frame f: (1 - g) g^(F-1-f) if it qualifies
        expo = torch.arange(n_frames - 1, -1, -1, device=rows.device, dtype=torch.float64)
        wv = ((1.0 - g) * torch.pow(torch.tensor(g, dtype=torch.float64), expo)).to(rows.dtype)  # (F,)
        if one:
            buf = torch.cat([rows.transpose(-1, -2), new_rows.transpose(-1, -2).to(rows.dtype)], dim=-2)
            frames = buf.view(b * h, t, s).unfold(1, self.n_fft, self.hop)[:, :n_frames]  # (B*H, F, S, n_fft)
            spec = torch.matmul(self.dft_matrix(buf.device, buf.dtype), frames.transpose(-1, -2))
            spec = spec.view(b, h, n_frames, 2 * nb, s)
            mag = torch.hypot(spec[..., :nb, :], spec[..., nb:, :])  # (B, H, F, bins, S) magnitudes
            del spec
            qualifies = torch.arange(n_frames, device=buf.device).view(1, 1, -1, 1) >= first.unsqueeze(-2)
            w = wv.view(1, 1, -1, 1) * qualifies.to(buf.dtype)  # (B, H, F, S)
            folded = mag.mul_(w.unsqueeze(-2)).sum(2)  # (B, H, bins, S)
            left = buf[..., self.hop * n_frames :, :].transpose(-1, -2).contiguous()
        else:
            left, folded = self._fold_in_blocks(rows, new_rows, first, wv, n_frames)
        n_q = n_frames - first  # (B, H, S) qualifying frames
        decay = torch.pow(torch.tensor(g, dtype=torch.float64, device=rows.device), n_q.to(torch.float64))
        ema = decay.to(ema.dtype).unsqueeze(-1) * ema + folded.transpose(-1, -2).to(ema.dtype)
        return left, ema, start + self.hop * n_frames
