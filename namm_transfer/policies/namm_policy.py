"""The NAMM as a memory policy: streamed spectrogram features in, keep / evict out."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..features import SpectrogramStream, length_normalized_rows
from ..namm import NAMM
from .base import Budget, LayerState, MemoryPolicy, stack_layers

__all__ = ["NAMMPolicy"]


class NAMMPolicy(MemoryPolicy):
    """Evict the tokens a NAMM scores below its threshold (namm-spec.md, "Selection").

    Args:
        namm: the network (weights and frozen normalization statistics).
        budget: optional; if given, keep the ``budget`` highest-scoring tokens instead of
            thresholding (an ablation; the paper thresholds).
        collect_statistics: keep every token and accumulate the pooled mean and variance of the
            17 EMA bins over layers, heads and tokens at every update (the normalization
            estimate of the spec); finish with :meth:`finalize_statistics`.

    Evolution scores a whole population in one batch with :meth:`set_population`.
    """

    name: ClassVar[str] = "namm"
    needs_attention: ClassVar[bool] = True

    def __init__(
        self, namm: NAMM, budget: Budget | str | float | None = None, collect_statistics: bool = False
    ) -> None:
        super().__init__(budget)
        self.namm = namm
        cfg = namm.config
        self.stream = SpectrogramStream(cfg.n_fft, cfg.hop, cfg.gamma)
        self.collect_statistics = collect_statistics
        self._stat_sum = torch.zeros(cfg.n_bins, dtype=torch.float64)
        self._stat_sq = torch.zeros(cfg.n_bins, dtype=torch.float64)
        self._stat_n = 0
        self._theta: Tensor | None = None  # (P, D)
        self._member: Tensor | None = None  # (B,) member index of each sequence
        self.last_scores: dict[int, Tensor] = {}

    # ----- population ---------------------------------------------------------------------------
    def set_population(self, theta: Tensor | None, member_of_sequence: Tensor | None = None) -> None:
        """Score sequence ``b`` with ``theta[member_of_sequence[b]]``; ``None`` restores the deployed weights."""
        if theta is None:
            self._theta = self._member = None
            return
        theta = torch.as_tensor(theta, dtype=torch.float32)
        if theta.ndim != 2 or theta.shape[1] != self.namm.n_params:
            raise ValueError(f"population must be (P, {self.namm.n_params}), got {tuple(theta.shape)}")
        if not torch.isfinite(theta).all():
            raise ValueError("population parameters contain NaN or inf")
        self._theta = theta
        self._member = None if member_of_sequence is None else torch.as_tensor(member_of_sequence, dtype=torch.long)

    # ----- engine hooks ---------------------------------------------------------------------------
    def init_layer(self, state: LayerState) -> None:
        b, h, s = state.shape
        dev = state.valid.device
        state.tokens["namm_rows"] = self.stream.empty_rows(b, h, s, dev)
        state.tokens["namm_ema"] = torch.zeros(b, h, s, self.stream.n_bins, device=dev)
        state.meta["namm_start"] = self.stream.initial_start()
        state.meta["namm_clock"] = 0

    def observe(self, state: LayerState, rows: Tensor) -> None:
        q = rows.shape[-2]
        if self.namm.config.length_normalized_features:  # outside the spec; off by default
            rows = length_normalized_rows(rows, state.valid, state.arrival, state.meta["namm_clock"])
        buf, ema, start = self.stream.advance(
            state.tokens["namm_rows"],
            state.tokens["namm_ema"],
            state.arrival,
            rows.transpose(-1, -2),
            state.meta["namm_start"],
            state.meta["namm_clock"],
        )
        state.tokens["namm_rows"], state.tokens["namm_ema"] = buf, ema
        state.meta["namm_start"] = start
        state.meta["namm_clock"] += q

    def select(self, state: LayerState) -> Tensor:
        return self._decide([state])[0]

    def select_layers(self, states: list[LayerState]) -> list[Tensor]:
        """Score every layer of the update in as few calls of the network as the shapes and
        :attr:`batch_bytes` allow (consecutive layers of one shape go together), then keep by threshold
        (or budget). A subclass that overrides :meth:`select` alone is asked layer by layer."""
        return self._decide(states)

    def _decide(self, states: list[LayerState]) -> list[Tensor]:
        if self.collect_statistics:
            return [self._collect(st) for st in states]
        if not bool(self.namm.normalization_ready):
            raise RuntimeError(
                "this NAMM has no normalization statistics: load a trained checkpoint (load_namm), or estimate "
                "them first with NAMMPolicy(namm, collect_statistics=True) and finalize_statistics()"
            )
        keeps: list[Tensor] = []
        group: list[LayerState] = []
        row_bytes = 4 * self.namm.config.d_in  # float32 scorer inputs per token
        limit = self.batch_bytes
        if limit is None:
            limit = (4 if states and states[0].valid.device.type == "cpu" else 256) * 1024 * 1024
        for st in states:
            b, h, s = st.shape
            if group and (group[0].shape != st.shape or (len(group) + 1) * b * h * s * row_bytes > limit):
                keeps += self._select_group(group)
                group = []
            group.append(st)
        if group:
            keeps += self._select_group(group)
        return keeps

    batch_bytes: int | None = None
    """At most this many bytes of scorer inputs (float32) per call of the network when layers are batched (the
    call's temporaries are about ten times that). None: 4 MiB on the CPU, where batching saves little and a group's
    temporaries would add to the peak memory, 256 MiB on accelerators, where each call costs the host far more
    than its arithmetic."""

    def _collect(self, state: LayerState) -> Tensor:
        live = state.tokens["namm_ema"][state.valid].to(torch.float64)
        self._stat_sum += live.sum(0).cpu()
        self._stat_sq += (live**2).sum(0).cpu()
        self._stat_n += live.shape[0]
        return state.valid.clone()

    def _select_group(self, states: list[LayerState]) -> list[Tensor]:
        scores = self.scores_layers(states)  # (L, B, H, S)
        for st, sc in zip(states, scores, strict=True):
            self.last_scores[st.layer] = sc
        valid = stack_layers([st.valid for st in states])
        bad = ~torch.isfinite(scores) & valid
        if bool(bad.any()):  # one device read for the group
            st = states[int(bad.flatten(1).any(1).int().argmax())]
            raise FloatingPointError(
                f"NAMM produced non-finite scores at layer {st.layer} (update {st.step}); check the weights "
                "and normalization statistics (std near 0?) of the checkpoint"
            )
        sinks, recent = self.namm.config.sink_tokens, self.namm.config.recent_tokens
        if sinks > 0 or recent > 0:  # protected like the newest token: +inf ranks first in keep_top too
            position = stack_layers([st.position for st in states])  # (L, B, H, S)
            protect = position < sinks
            if recent > 0:
                protect = protect | (position > _newest_positions(states)[:, :, None, None] - recent)
            scores = scores.masked_fill(protect & valid, float("inf"))
        if self.budget is not None:
            return self.keep_top_layers(states, list(scores.unbind(0)))
        keep = (scores >= self.namm.config.threshold) & valid
        cap = self.namm.config.max_tokens
        if cap is not None:
            from .base import TokenBudget

            capped = self.keep_top_layers(states, list(scores.unbind(0)), TokenBudget(cap))
            keep = keep & stack_layers(capped)
        return list(keep.unbind(0))

    def scores(self, state: LayerState) -> Tensor:
        """(B, H, S) float32 scores; invalid slots get -inf."""
        return self.scores_layers([state])[0]

    def scores_layers(self, states: list[LayerState]) -> Tensor:
        """(L, B, H, S) float32 scores of layers of one shape, in one call of the network; invalid slots get
        -inf."""
        b, h, s = states[0].shape
        n_layers = len(states)
        newest = _newest_positions(states).view(n_layers, b, 1, 1)
        age = (newest - stack_layers([st.position for st in states])).clamp_min(0)
        ema = stack_layers([st.tokens["namm_ema"] for st in states])
        x = self.namm.features(ema, age).reshape(n_layers * b * h, s, -1)
        theta = None
        if self._theta is not None:
            member = self._member
            if member is None:
                if self._theta.shape[0] != 1:
                    raise ValueError("a population of several members needs member_of_sequence")
                member = torch.zeros(b, dtype=torch.long)
            if member.shape[0] != b:
                raise ValueError(f"member_of_sequence has {member.shape[0]} entries, the batch has {b} sequences")
            rows = self._theta.to(x.device)[member.to(x.device)].repeat_interleave(h, dim=0)  # (B*H, D)
            theta = rows.repeat(n_layers, 1)  # (L*B*H, D), rows in (layer, sequence, head) order
        valid = stack_layers([st.valid for st in states]).reshape(n_layers * b * h, s)
        with torch.no_grad():
            scores = self.namm.score(x, valid, theta)
        return scores.view(n_layers, b, h, s)

    # ----- normalization estimate ------------------------------------------------------------------
    def finalize_statistics(self) -> tuple[Tensor, Tensor]:
        """Set the NAMM's frozen normalization from what was collected; returns (mean, std)."""
        if self._stat_n == 0:
            raise RuntimeError("no statistics collected: feed prompts long enough to reach an update step")
        mean = self._stat_sum / self._stat_n
        var = (self._stat_sq / self._stat_n - mean**2).clamp_min(0.0)
        std = var.sqrt()
        self.namm.set_normalization(mean.float(), std.float())
        self.collect_statistics = False
        return mean.float(), std.float()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "threshold": self.namm.config.threshold,
            "max_tokens": self.namm.config.max_tokens,
            "sink_tokens": self.namm.config.sink_tokens,
            **({"recent_tokens": self.namm.config.recent_tokens} if self.namm.config.recent_tokens else {}),
        }


def _newest_positions(states: list[LayerState]) -> Tensor:
    """(L, B) position of each sequence's newest token, per layer (set by the engine before ``select``)."""
    newest = [st.newest_position for st in states]
    if any(t is None for t in newest):
        raise RuntimeError("the engine sets newest_position before select")
    return stack_layers([t for t in newest if t is not None])
