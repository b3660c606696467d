"""The NAMM network: features, recency embedding and the backward-attention-memory (BAM) scorer.

Everything here follows ``namm-spec.md`` (see the README). Shapes use these letters:

* ``N``  rows scored independently: (sequence, KV head) pairs of one host layer
* ``S``  cached tokens of one row, oldest first
* ``D``  the flat parameter count (4,172 with the default config)
* ``P``  population members (evolution); each row picks its member's parameters

The network is stateless apart from its parameters and the frozen normalization statistics;
the per-token state (the spectrogram EMA) lives in :mod:`namm_transfer.features` and is stored
by the eviction engine next to the KV cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["NAMMConfig", "NAMM", "OUTSIDE_SPEC", "recency_embedding", "param_layout"]


@dataclass(frozen=True)
class NAMMConfig:
    """Hyperparameters of a NAMM. The defaults are the paper's (namm-spec.md)."""

    n_fft: int = 32
    """STFT window length along the query-time axis."""
    hop: int = 16
    """STFT hop; also the number of rows carried over from the previous window."""
    gamma: float = 0.99
    """EMA discount per query row; a frame is discounted by ``gamma ** hop``."""
    recency_dims: int = 8
    """Size of the sinusoidal recency (age) embedding: half sines, half cosines."""
    recency_base: float = 50000.0
    """Base of the recency embedding frequencies: ``age / base ** (i / (recency_dims / 2))``."""
    head_dim: int = 32
    """Width of the scorer's single attention head (q, k and v each)."""
    threshold: float = 0.0
    """Tokens with score ``>= threshold`` are kept."""
    max_tokens: int | None = None
    """Optional hard cap: keep at most this many tokens per (sequence, head) (top-k by score)."""
    std_floor: float = 1e-7
    """Lower bound of the normalization standard deviation."""
    sink_tokens: int = 0
    """Always keep the tokens at the first ``sink_tokens`` positions (the attention sinks). 0 is the spec (only the
    newest token is protected). Not in the paper: added because an evolved NAMM can score the first token far out
    of its training range (it receives a large share of every head's attention) and evict it in a few heads,
    which costs a language model much of its accuracy (measured: training/README.md, session 6)."""
    recent_tokens: int = 0
    """Always keep the newest ``recent_tokens`` positions of each sequence (a recent window, as H2O's and
    StreamingLLM's). 0 is the spec (only the newest token is protected). Not in the paper: under a ratio budget that
    also holds at the end of the prompt, a scorer that has seen little of the question's attention yet can evict
    the question itself (issue 22's first measurements, docs/findings.md)."""
    length_normalized_features: bool = False
    """Multiply every attention row by the number of live cached tokens its query sees (in its sequence and KV head)
    before the spectrogram, so a token that gets the uniform share of attention has signal 1 however long the cache
    (:func:`namm_transfer.features.length_normalized_rows`). False is the spec. Not in the paper: raw attention
    shrinks as the cache grows, so a NAMM evolved on short prompts sees features below its training range on long
    ones (issue 22). The normalization statistics must then be estimated with the flag on too."""

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def d_in(self) -> int:
        return self.recency_dims + self.n_bins

    @property
    def n_params(self) -> int:
        return sum(math.prod(shape) for _, shape in param_layout(self))

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict. Options added after checkpoints and results files were written
        (:data:`RECORDED_WHEN_SET`) appear only when set, so a default config's record stays what those files hold."""
        data = asdict(self)
        for name, default in RECORDED_WHEN_SET.items():
            if data[name] == default:
                del data[name]
        return data

    def outside_spec(self) -> dict[str, Any]:
        """The options set away from namm-spec.md (name -> value); empty for the paper's network."""
        return {name: getattr(self, name) for name in OUTSIDE_SPEC if getattr(self, name) != OUTSIDE_SPEC[name]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NAMMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown NAMM config fields {sorted(unknown)}; known fields: {sorted(known)}")
        return cls(**data)

    def __post_init__(self) -> None:
        if self.n_fft <= 0 or self.hop <= 0 or self.hop > self.n_fft:
            raise ValueError(f"need 0 < hop <= n_fft, got n_fft={self.n_fft}, hop={self.hop}")
        if self.recency_dims % 2:
            raise ValueError(f"recency_dims must be even (sines and cosines), got {self.recency_dims}")
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {self.gamma}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.recent_tokens < 0:
            raise ValueError(f"recent_tokens must be >= 0, got {self.recent_tokens}")


OUTSIDE_SPEC: dict[str, Any] = {"sink_tokens": 0, "recent_tokens": 0, "length_normalized_features": False}
"""Config fields that are not in the paper's network, with the value that keeps namm-spec.md."""

RECORDED_WHEN_SET: dict[str, Any] = {"recent_tokens": 0, "length_normalized_features": False}
"""Config fields that :meth:`NAMMConfig.to_dict` leaves out at this (their default) value."""


def param_layout(cfg: NAMMConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the flat parameter vector, in order (namm-spec.md, "Scorer").

    Matrices are input-by-output and row-major: ``W_qkv`` is (d_in, 3 * head_dim) with output
    columns q | k | v, ``W_o`` is (head_dim, 2 * d_in) with output columns r | m.
    """
    d, h = cfg.d_in, cfg.head_dim
    return [
        ("W_qkv", (d, 3 * h)),
        ("b_qkv", (3 * h,)),
        ("W_o", (h, 2 * d)),
        ("b_o", (2 * d,)),
        ("w_out", (d,)),
        ("b_out", (1,)),
    ]


def recency_embedding(age: Tensor, dims: int = 8, base: float = 50000.0) -> Tensor:
    """Sinusoidal embedding of token ages: ``[sin(age / base**(i/half)), cos(...)]`` for i < half.

    Args:
        age: any shape, the newest position minus each token's position (>= 0).
    Returns:
        ``age.shape + (dims,)`` float32.
    """
    half = dims // 2
    freq = base ** (torch.arange(half, device=age.device, dtype=torch.float64) / half)
    angle = age.to(torch.float64)[..., None] / freq  # float64: ages reach 1e5, float32 would lose ~1e-3 rad
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).to(torch.float32)


class NAMM(nn.Module):
    """Backward attention memory scorer with frozen feature normalization.

    ``flat`` holds the single deployed parameter vector (``D`` floats). Evolution can score
    many members at once by passing ``theta`` of shape (N, D) (one vector per scored row) to
    :meth:`score`. The normalization statistics (17 bins each) are buffers saved with the
    weights; ``mean = 0, std = 1`` means "not estimated yet" (see :attr:`normalization_ready`).
    """

    feature_mean: Tensor
    feature_std: Tensor
    normalization_ready: Tensor

    def __init__(self, config: NAMMConfig | None = None) -> None:
        super().__init__()
        self.config = config or NAMMConfig()
        self.flat = nn.Parameter(torch.zeros(self.config.n_params), requires_grad=False)
        self.register_buffer("feature_mean", torch.zeros(self.config.n_bins))
        self.register_buffer("feature_std", torch.ones(self.config.n_bins))
        self.register_buffer("normalization_ready", torch.tensor(False))

    # ----- flat vector -------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        return self.config.n_params

    def get_flat(self) -> Tensor:
        """A copy of the flat parameter vector (D,)."""
        return self.flat.detach().clone()

    def set_flat(self, vector: Tensor) -> None:
        """Load a flat parameter vector of exactly ``n_params`` finite floats."""
        vector = torch.as_tensor(vector, dtype=torch.float32).reshape(-1)
        if vector.numel() != self.n_params:
            raise ValueError(
                f"NAMM parameter vector has {vector.numel()} values, this config needs {self.n_params} "
                f"(config: {self.config})"
            )
        if not torch.isfinite(vector).all():
            raise ValueError("NAMM parameter vector contains NaN or inf")
        with torch.no_grad():
            self.flat.copy_(vector.to(self.flat.device))

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split (..., D) vectors into named tensors (..., *shape) following :func:`param_layout`."""
        out: dict[str, Tensor] = {}
        start = 0
        for name, shape in param_layout(self.config):
            size = math.prod(shape)
            out[name] = theta[..., start : start + size].reshape(*theta.shape[:-1], *shape)
            start += size
        return out

    # ----- normalization ------------------------------------------------------------------------
    def set_normalization(self, mean: Tensor, std: Tensor) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        n = self.config.n_bins
        if mean.numel() != n or std.numel() != n:
            raise ValueError(f"normalization statistics need {n} values each, got {mean.numel()} and {std.numel()}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()) or (std < 0).any():
            raise ValueError("normalization statistics must be finite with std >= 0")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        self.normalization_ready.fill_(True)

    def normalize(self, ema: Tensor) -> Tensor:
        """z-score the 17 spectral bins: (E - mean) / max(std, std_floor). ema: (..., n_bins)."""
        std = self.feature_std.clamp_min(self.config.std_floor).to(ema.device)
        return (ema - self.feature_mean.to(ema.device)) / std

    # ----- scoring ------------------------------------------------------------------------------
    def features(self, ema: Tensor, age: Tensor) -> Tensor:
        """Scorer input (..., d_in): recency embedding of ``age`` then normalized spectral EMA."""
        rec = recency_embedding(age, self.config.recency_dims, self.config.recency_base)
        return torch.cat([rec, self.normalize(ema.float())], dim=-1)

    def score(self, x: Tensor, valid: Tensor | None = None, theta: Tensor | None = None) -> Tensor:
        """Score tokens with the BAM scorer.

        Args:
            x: (N, S, d_in) scorer inputs, oldest token first.
            valid: (N, S) bool; invalid slots must form a prefix of each row (the engine's
                layout: padding and masked slots first, live tokens right-aligned). They are
                never attended to by live tokens; their scores are returned as ``-inf``.
            theta: (N, D) or (D,) parameters; default: the deployed :attr:`flat` vector.
        Returns:
            (N, S) float32 scores.
        """
        if x.ndim != 3 or x.shape[-1] != self.config.d_in:
            raise ValueError(f"NAMM.score expects (N, S, {self.config.d_in}) inputs, got {tuple(x.shape)}")
        theta = self.flat if theta is None else theta
        if theta.ndim == 1:
            theta = theta.unsqueeze(0)
        # the module may stay on the CPU while the host runs on a GPU: the parameters follow the inputs
        p = self.unflatten(theta.to(device=x.device, dtype=x.dtype))  # each (N or 1, *shape)
        h, d = self.config.head_dim, self.config.d_in
        n, s, _ = x.shape
        shared = theta.shape[0] == 1  # one vector for every row: 2-D products with the bias fused in

        def linear(inp: Tensor, w: str, bias: str) -> Tensor:  # (N, S, i) -> (N, S, o)
            if shared:
                out = torch.addmm(p[bias][0], inp.reshape(n * s, -1), p[w][0])
                return out.view(n, s, -1)
            return torch.baddbmm(p[bias].unsqueeze(-2), inp, p[w])

        # Backward mask (token i sees j >= i) == causal attention on the reversed sequence. Everything else is
        # per token, so the whole scorer runs on the reversed tokens and only the scores are flipped back.
        # Invalid slots are a prefix, so after the flip they are a suffix no live token sees.
        xr = x.flip(-2)
        q, k, v = linear(xr, "W_qkv", "b_qkv").unsqueeze(1).split(h, dim=-1)  # each (N, 1, S, h)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)  # (N, S, h)
        r, m = linear(attn, "W_o", "b_o").split(d, dim=-1)
        hidden = torch.addcmul(r + xr, xr, m)  # x * (1 + m) + r
        if shared:
            sr = torch.matmul(hidden, p["w_out"][0]) + p["b_out"][0]  # (N, S)
        else:
            sr = torch.baddbmm(p["b_out"].unsqueeze(-1), hidden, p["w_out"].unsqueeze(-1)).squeeze(-1)
        scores = sr.flip(-1)
        if valid is not None:
            scores = scores.masked_fill(~valid, float("-inf"))
        return scores

    def extra_repr(self) -> str:
        return f"params={self.n_params}, config={self.config}"
