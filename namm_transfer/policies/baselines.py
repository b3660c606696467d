"""Classic eviction baselines. Each keeps exactly ``min(budget, live)`` tokens per (sequence, head).

* :class:`FullCache` keeps everything (the reference).
* :class:`StreamingLLM` keeps ``sinks`` first tokens and the most recent ones (Xiao et al., 2023).
* :class:`H2O` keeps a ``recent`` window plus the heavy hitters by accumulated attention (Zhang et al., 2023).
* :class:`L2Norm` keeps the tokens whose keys have the lowest L2 norm (Devoto et al., 2024).
* :class:`RandomEviction` keeps a random subset (seeded) plus the newest token.
* :class:`TOVA` keeps the tokens the newest query attends to most (Oren et al., 2024).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Budget, LayerState, MemoryPolicy, stack_layers

__all__ = ["FullCache", "StreamingLLM", "H2O", "L2Norm", "RandomEviction", "TOVA"]


class FullCache(MemoryPolicy):
    """Keep every token."""

    name: ClassVar[str] = "full"

    def __init__(self, budget: Any = None) -> None:
        super().__init__(None)

    def select(self, state: LayerState) -> Tensor:
        return state.valid.clone()


class _Budgeted(MemoryPolicy):
    """Keeps the budget's number of live tokens with the highest :meth:`score` per row."""

    def __init__(self, budget: Budget | str | float | None = 0.5) -> None:
        super().__init__(budget)
        if self.budget is None:
            raise ValueError(f"policy {self.name!r} needs a budget (ratio, tokens or replay)")

    def score(self, state: LayerState) -> Tensor:  # pragma: no cover - interface
        """(B, H, S) float64, higher is kept first; +inf protects a slot."""
        raise NotImplementedError

    def select(self, state: LayerState) -> Tensor:
        return self.keep_top(state, self.score(state))

    def select_layers(self, states: list[LayerState]) -> list[Tensor]:
        return self.keep_top_layers(states, [self.score(st) for st in states])


class StreamingLLM(_Budgeted):
    """Attention sinks (the first ``sinks`` tokens of each sequence) plus the most recent tokens."""

    name: ClassVar[str] = "streaming"

    def __init__(self, budget: Budget | str | float | None = 0.5, sinks: int = 4) -> None:
        super().__init__(budget)
        self.sinks = sinks

    def score(self, state: LayerState) -> Tensor:
        # sinks rank above every other token and among themselves the first first, so that a budget below the
        # sink count keeps positions 0, 1, ... (plus the newest token, which the engine always keeps); the ranking
        # squashes scores to at most 1e300, and 1e200 * k stays exact and distinct for any sink count
        pos = state.position.to(torch.float64)
        return torch.where(state.position < self.sinks, (self.sinks - pos) * 1e200, pos)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "sinks": self.sinks}


class H2O(_Budgeted):
    """Heavy hitters: attention accumulated over every query since arrival, plus a recent window.

    ``recent`` is a fraction of the budget (the H2O paper splits it half and half).
    """

    name: ClassVar[str] = "h2o"
    needs_attention: ClassVar[bool] = True
    observes_sums: ClassVar[bool] = True  # the engine hands over column sums, never per-query rows

    def __init__(self, budget: Budget | str | float | None = 0.5, recent_fraction: float = 0.5) -> None:
        super().__init__(budget)
        if not 0.0 <= recent_fraction <= 1.0:
            raise ValueError(f"recent_fraction must be in [0, 1], got {recent_fraction}")
        self.recent_fraction = recent_fraction

    def init_layer(self, state: LayerState) -> None:
        b, h, s = state.shape
        state.tokens["h2o_acc"] = torch.zeros(b, h, s, device=state.valid.device)

    def observe(self, state: LayerState, rows: Tensor) -> None:
        self.observe_sums(state, rows.sum(-2))

    def observe_sums(self, state: LayerState, sums: Tensor) -> None:
        state.tokens["h2o_acc"] = state.tokens["h2o_acc"] + sums

    def score(self, state: LayerState) -> Tensor:
        return self.scores_layers([state])[0]

    def scores_layers(self, states: list[LayerState]) -> Tensor:
        """(L, B, H, S) scores of layers of one shape, computed for all of them at once."""
        assert self.budget is not None
        valid = stack_layers([st.valid for st in states])
        target = self.budget.targets(states).clamp(min=1).clamp(max=valid.sum(-1))  # (L, B, H)
        n_recent = torch.floor(target.to(torch.float64) * self.recent_fraction).to(torch.int64)
        # rank live slots by recency: the newest live slot has rank 0
        s = valid.shape[-1]
        from_end = torch.arange(s - 1, -1, -1, device=valid.device)
        recent = valid & (from_end < n_recent.unsqueeze(-1))
        acc = stack_layers([st.tokens["h2o_acc"] for st in states])
        return acc.to(torch.float64).masked_fill(recent, float("inf"))

    def select_layers(self, states: list[LayerState]) -> list[Tensor]:
        if len({st.shape for st in states}) > 1:
            return super().select_layers(states)
        return self.keep_top_layers(states, self.scores_layers(states))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "recent_fraction": self.recent_fraction}


class L2Norm(_Budgeted):
    """Keep the tokens whose cached keys have the lowest L2 norm (averaged over nothing: per head)."""

    name: ClassVar[str] = "l2"
    needs_keys: ClassVar[bool] = True

    def score(self, state: LayerState) -> Tensor:
        assert state.keys is not None
        return -state.keys.float().norm(dim=-1).to(torch.float64)


class RandomEviction(_Budgeted):
    """Keep a uniformly random subset of the budget's size (seeded, reproducible)."""

    name: ClassVar[str] = "random"

    def __init__(self, budget: Budget | str | float | None = 0.5, seed: int = 0) -> None:
        super().__init__(budget)
        self.seed = seed
        self._gen: torch.Generator | None = None

    def init_layer(self, state: LayerState) -> None:
        if state.layer == min(self.host.managed_layers if self.host else (state.layer,)):
            self._gen = torch.Generator().manual_seed(self.seed)

    def score(self, state: LayerState) -> Tensor:
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(state.valid.shape, generator=self._gen, dtype=torch.float64).to(state.valid.device)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "seed": self.seed}


class TOVA(_Budgeted):
    """Token Omission Via Attention (Oren et al., 2024): keep the tokens the newest query attends to most.

    Per (sequence, layer, KV head) the score of a cached token is its attention probability from the last query
    fed before the update (the newest token's), averaged over the query heads that share the KV head; the budget's
    number of highest-scoring tokens is kept (ties toward newer tokens, the newest token always). The engine
    computes only that one row per chunk (``observes_last_row``): the host's attention itself runs fused, as for
    a policy that reads no attention. A sequence whose last query was padding keeps the row of its newest real
    query.
    """

    name: ClassVar[str] = "tova"
    needs_attention: ClassVar[bool] = True
    observes_last_row: ClassVar[bool] = True

    def init_layer(self, state: LayerState) -> None:
        b, h, s = state.shape
        state.tokens["tova_row"] = torch.zeros(b, h, s, device=state.valid.device)

    def observe(self, state: LayerState, rows: Tensor) -> None:
        """Rows (B, H, Q, S) of consecutive queries (an engine that hands every row): the last one counts."""
        self.observe_last_row(state, rows[:, :, -1])

    def observe_last_row(self, state: LayerState, row: Tensor) -> None:
        real = row.sum(-1, keepdim=True) > 0.5  # (B, H, 1): a real query's probabilities sum to 1, padding's are 0
        state.tokens["tova_row"] = torch.where(real, row, state.tokens["tova_row"])

    def score(self, state: LayerState) -> Tensor:
        return state.tokens["tova_row"].to(torch.float64)
