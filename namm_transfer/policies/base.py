"""The memory-policy interface, per-layer cache bookkeeping, and budgets.

A policy sees one managed layer at a time through a :class:`LayerState` and returns which cache
slots to keep. The engine owns the state and re-indexes every per-token tensor when it prunes,
so a policy's own per-token state (an EMA, accumulated attention, ...) follows the cache through
evictions without the policy doing anything.

Layout of one layer's cache (engine invariant): each (sequence, KV head) row holds its live
tokens right-aligned and in arrival order; slots before them are invalid (left padding, or
slack left because other rows of the same layer kept more tokens). Invalid slots are masked out
of the host's attention, so evicting a token and masking it are the same thing to the model.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "HostInfo",
    "LayerState",
    "MemoryPolicy",
    "Budget",
    "RatioBudget",
    "TokenBudget",
    "ReplayBudget",
    "parse_budget",
    "stack_layers",
]


@dataclass(frozen=True)
class HostInfo:
    """What a policy may learn about the host when it is attached."""

    n_layers: int
    managed_layers: tuple[int, ...]
    n_kv_heads: int
    n_q_heads: int
    head_dim: int
    family: str = "unknown"


@dataclass
class LayerState:
    """Bookkeeping of one managed layer. Every tensor in ``tokens`` has shape (B, H, S, ...).

    Attributes:
        layer: host layer index.
        valid: (B, H, S) bool, live tokens (a right-aligned suffix of each row).
        position: (B, H, S) int64, each token's true position in its own sequence (real tokens
            only; what the host's rotary embedding used).
        arrival: (B, H, S) int64, the engine clock (query rows, padding included) at arrival.
        tokens: policy-owned per-token tensors, re-indexed by the engine on every eviction.
        meta: policy-owned per-layer values (not re-indexed).
        keys: (B, H, S, head_dim) the cached keys (after rotary), set by the engine for ``select``.
        n_seen: (B,) int64, real tokens each sequence has fed so far (what a full cache would hold).
        newest_position: (B,) int64, position of the newest real token of each sequence.
        step: index of the current update (0 for the first eviction decision).
        clock: rows processed so far (padded length of the batch).
    """

    layer: int
    valid: Tensor
    position: Tensor
    arrival: Tensor
    tokens: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    keys: Tensor | None = None
    n_seen: Tensor | None = None
    newest_position: Tensor | None = None
    step: int = 0
    clock: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        b, h, s = self.valid.shape
        return b, h, s

    def n_valid(self) -> Tensor:
        """(B, H) live tokens per row."""
        return self.valid.sum(-1)


class Budget:
    """How many tokens a budgeted policy may keep, per (sequence, head) row at an update."""

    holds_at_prompt_end: bool = True
    """Whether a session runs the policy once more at the end of every prompt by default (``attach``'s
    ``final_update=None``), so that the cache holds this budget when the prompt is done, not only at update steps.
    True for ratio and token budgets; for a :class:`ReplayBudget`, whether the replayed run did (False unless
    given)."""

    def target(self, state: LayerState) -> Tensor:  # pragma: no cover - interface
        """(B, H) int64 number of tokens to keep (the caller clamps to the live count)."""
        raise NotImplementedError

    def targets(self, states: list[LayerState]) -> Tensor:
        """(L, B, H): :meth:`target` of each layer of one update (the layers share their shape). A budget whose
        target does not depend on the layer computes it once."""
        return stack_layers([self.target(st) for st in states])

    def describe(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class RatioBudget(Budget):
    """Keep ``floor(ratio * n_seen)`` tokens (at least 1), n_seen = what a full cache would hold."""

    ratio: float

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"a ratio budget must be in (0, 1], got {self.ratio}")

    def target(self, state: LayerState) -> Tensor:
        assert state.n_seen is not None
        t = torch.floor(state.n_seen.to(torch.float64) * self.ratio).to(torch.int64).clamp_min(1)
        return t[:, None].expand(state.shape[0], state.shape[1])

    def targets(self, states: list[LayerState]) -> Tensor:
        if any(st.n_seen is not states[0].n_seen for st in states):  # the engine gives every layer one tensor
            return super().targets(states)
        return self.target(states[0]).expand(len(states), *states[0].shape[:2])

    def describe(self) -> str:
        return f"ratio:{self.ratio:g}"


@dataclass
class TokenBudget(Budget):
    """Keep at most ``tokens`` tokens per row."""

    tokens: int

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"a token budget must be >= 1, got {self.tokens}")

    def target(self, state: LayerState) -> Tensor:
        b, h, _ = state.shape
        return torch.full((b, h), self.tokens, dtype=torch.int64, device=state.valid.device)

    def targets(self, states: list[LayerState]) -> Tensor:
        return self.target(states[0]).expand(len(states), *states[0].shape[:2])

    def describe(self) -> str:
        return f"tokens:{self.tokens}"


@dataclass
class ReplayBudget(Budget):
    """Replay the per-layer, per-update cache lengths recorded in another run.

    ``record[step][layer]`` is a (B, H) list of kept counts, as recorded by the engine in
    :attr:`namm_transfer.engine.EvictionStats.kept_counts`. The baseline run must feed the same
    sequences in the same batch order with the same update interval, and make the same final updates at the ends
    of prompts (``holds_at_prompt_end``, or ``attach``'s ``final_update``).
    """

    record: dict[int, dict[int, Any]]
    source: str = "replay"
    holds_at_prompt_end: bool = False
    """The replayed run also updated at the end of each prompt (a ratio or token budget's default): then so does
    this one by default, so that the two make the same updates. False: update steps only (a NAMM's threshold)."""

    def target(self, state: LayerState) -> Tensor:
        try:
            counts = self.record[state.step][state.layer]
        except KeyError:
            raise ValueError(
                f"replayed budget has no entry for update {state.step}, layer {state.layer}: the run being "
                "replayed made fewer updates (different prompts, lengths, update_interval or final_update?)"
            ) from None
        t = torch.as_tensor(counts, dtype=torch.int64, device=state.valid.device)
        if t.shape != state.shape[:2]:
            raise ValueError(f"replayed counts have shape {tuple(t.shape)}, this batch needs {state.shape[:2]}")
        return t

    def describe(self) -> str:
        return f"replay:{self.source}"

    @classmethod
    def from_json(cls, path: str | Path) -> ReplayBudget:
        data = json.loads(Path(path).read_text())
        record = {int(s): {int(k): v for k, v in layers.items()} for s, layers in data["kept_counts"].items()}
        return cls(record, source=str(path))


def parse_budget(spec: str | float | Budget | None) -> Budget | None:
    """Read a budget: a share of the tokens seen, a token count, or a replayed run.

    * a share in (0, 1]: a float (``0.5``, ``1.0`` keeps everything) or a string (``"0.5"``, ``"50%"``) ->
      :class:`RatioBudget`;
    * tokens: ``"256t"`` (or ``"256tokens"``), or ``TokenBudget(256)`` -> :class:`TokenBudget`;
    * ``"replay:FILE.json"`` -> :class:`ReplayBudget`; a :class:`Budget` or None is returned as it is.

    A bare integer (``1``, ``256``) or a string of digits (``"1"``, ``"256"``) is refused: ``1`` could mean one
    token or the whole cache, so a token count is written with its unit (``"256t"``) and a share as a float.
    """
    if spec is None or isinstance(spec, Budget):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f'not a budget: {spec!r}; write a share (0.5) or a token count ("256t")')
    if isinstance(spec, numbers.Integral):
        raise ValueError(
            f'budget {spec!r} is an integer, which could mean tokens or a share: write "{int(spec)}t" (or '
            f"TokenBudget({int(spec)})) for that many tokens, or a float such as 0.5 for a share of the tokens seen"
        )
    if isinstance(spec, numbers.Real):
        return _share(float(spec), spec)
    if not isinstance(spec, str):
        raise TypeError(f'not a budget: {spec!r} ({type(spec).__name__}); write 0.5, "50%", "256t" or replay:FILE')
    text = spec.strip()
    if text.startswith("replay:"):
        return ReplayBudget.from_json(text.split(":", 1)[1])
    if m := re.fullmatch(r"(\d+)t(?:okens)?", text):
        return TokenBudget(int(m.group(1)))
    if re.fullmatch(r"\d+", text):
        raise ValueError(
            f'budget {spec!r} is an integer, which could mean tokens or a share: write "{text}t" for that many tokens, '
            "or a share such as 0.5 or 50%"
        )
    if m := re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)%", text):
        return _share(float(m.group(1)) / 100.0, spec)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"cannot read budget {spec!r}: write a share (0.5 or 50%), a token count (256t) or replay:FILE.json"
        ) from None
    return _share(value, spec)


def _share(value: float, spec: object) -> RatioBudget:
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(
            f"budget {spec!r}: a share must be in (0, 1] (0.5 keeps half the tokens seen); for a token count "
            'write it with its unit, e.g. "256t"'
        )
    return RatioBudget(value)


class MemoryPolicy:
    """Base class of every memory policy.

    Override :meth:`select` (and :meth:`observe` if ``needs_attention``). Class attributes:

    * ``name``: registry name.
    * ``needs_attention``: the engine computes attention probability rows of the recent queries
      (averaged over the query heads of each KV head) and passes them to :meth:`observe` for
      every chunk, in one call or in several calls over consecutive query tiles of it. Rows are
      only ever (chunk x cache), never (T x T).
    * ``observes_sums``: with ``needs_attention``, the policy needs only the attention each slot received
      summed over the chunk's queries (H2O's accumulated attention): the engine calls :meth:`observe_sums`
      once per chunk instead of :meth:`observe`, and never builds the per-query rows. A subclass that
      overrides :meth:`observe` but not :meth:`observe_sums` (nor sets ``observes_sums`` itself) gets rows.
    * ``observes_last_row``: with ``needs_attention``, the policy needs only the attention row of each chunk's last
      query (TOVA): the engine runs the host's fused attention as for a policy without rows and computes that one
      row on the side, handed to :meth:`observe_last_row` once per chunk. The same rule as for ``observes_sums``
      applies to a subclass that overrides :meth:`observe` alone.
    * ``needs_keys``: :meth:`select` reads ``state.keys``.

    A subclass that overrides :meth:`select` but not :meth:`select_layers` is asked layer by layer.
    """

    name: ClassVar[str] = "base"
    needs_attention: ClassVar[bool] = False
    observes_sums: ClassVar[bool] = False
    observes_last_row: ClassVar[bool] = False
    needs_keys: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "observe" in own and "observe_sums" not in own and "observes_sums" not in own:
            cls.observes_sums = False  # it reads rows: an inherited column-sum shortcut would bypass its observe
        if "observe" in own and "observe_last_row" not in own and "observes_last_row" not in own:
            cls.observes_last_row = False  # likewise for the last-row shortcut
        if "select" in own and "select_layers" not in own:
            cls.select_layers = MemoryPolicy.select_layers  # type: ignore[method-assign]  # it decides per layer

    def __init__(self, budget: Budget | str | float | None = None) -> None:
        self.budget = parse_budget(budget)
        self.host: HostInfo | None = None

    def bind(self, host: HostInfo) -> None:
        """Called once at attach: learn the host's shape."""
        self.host = host

    def init_layer(self, state: LayerState) -> None:
        """Create per-token tensors (with S = current length) and per-layer meta at session start."""

    def observe(self, state: LayerState, rows: Tensor) -> None:
        """Fold attention rows (B, H, Q, S) of Q consecutive queries of the chunk (S includes the whole chunk).

        The engine may split a chunk into several calls (whole query tiles, in order, up to
        ``EvictionEngine.rows_bytes`` per call); ``rows`` may be reused after the call returns, so keep a copy of
        what is needed later.
        """

    def observe_sums(self, state: LayerState, sums: Tensor) -> None:
        """(``observes_sums`` policies) Fold (B, H, S) float32: the rows :meth:`observe` would get, summed over
        every query of the chunk (padding queries count 0). ``sums`` may be reused after the call returns."""
        raise NotImplementedError(f"{type(self).__name__} sets observes_sums but does not define observe_sums")

    def observe_last_row(self, state: LayerState, row: Tensor) -> None:
        """(``observes_last_row`` policies) Fold (B, H, S) float32: the attention probabilities of the chunk's last
        query over every slot of the layer (the chunk's own slots included), averaged over the query heads of each
        KV head; all zeros for a sequence whose last query is padding (``state.valid[..., -1]`` is False there).
        ``row`` may be reused after the call returns."""
        raise NotImplementedError(f"{type(self).__name__} sets observes_last_row but does not define observe_last_row")

    def select(self, state: LayerState) -> Tensor:
        """Return (B, H, S) bool: which slots to keep. Invalid slots are dropped whatever is returned."""
        raise NotImplementedError

    def select_layers(self, states: list[LayerState]) -> list[Tensor]:
        """:meth:`select` for every managed layer at one update (the engine's call, layers in order).

        The default asks layer by layer. A policy may batch the layers instead: on a GPU a small model's
        time goes to launching operations, so one call for all layers costs about what one layer costs.
        """
        return [self.select(st) for st in states]

    def describe(self) -> dict[str, Any]:
        """Settings recorded in results files."""
        return {"policy": self.name, "budget": self.budget.describe() if self.budget else None}

    # helpers shared by budgeted policies ---------------------------------------------------------
    def keep_top(self, state: LayerState, score: Tensor, budget: Budget | None = None) -> Tensor:
        """Keep exactly ``min(target, live)`` live tokens per row with the highest ``score``.

        Ties break toward newer tokens. The newest token is always kept by the engine; it is given
        top priority here so the budget is not exceeded by that rule.
        """
        return self.keep_top_layers([state], [score], budget)[0]

    def keep_top_layers(
        self, states: list[LayerState], scores: list[Tensor] | Tensor, budget: Budget | None = None
    ) -> list[Tensor]:
        """:meth:`keep_top` for several layers: one batched ranking for all of them when their shapes agree.
        ``scores``: one (B, H, S) tensor per layer, or the layers' scores stacked (L, B, H, S)."""
        budget = budget or self.budget
        if budget is None:
            return [st.valid.clone() for st in states]
        if len({tuple(st.valid.shape) for st in states}) > 1:
            return [self.keep_top_layers([st], [sc], budget)[0] for st, sc in zip(states, scores, strict=True)]
        valid = stack_layers([st.valid for st in states])  # (L, B, H, S)
        target = budget.targets(states)  # (L, B, H)
        score = (stack_layers(scores) if isinstance(scores, list) else scores).to(torch.float64)
        nan = torch.isnan(score) & valid
        if bool(nan.any()):  # no boolean indexing: one device read, no nonzero
            layer = states[int(nan.flatten(1).any(1).int().argmax())].layer
            raise FloatingPointError(f"policy {self.name!r} produced NaN scores at layer {layer}")
        target = target.clamp(min=1).clamp(max=valid.sum(-1))
        # protected tokens may score +inf: squash to a finite ceiling so that the newest slot (+inf) ranks
        # first of all; invalid slots rank last. Ties break toward newer slots exactly: a stable sort of the slots
        # in reverse order (no offset added to the scores, which would outrank differences smaller than itself)
        order_key = score.clamp(-1e300, 1e300)
        order_key[..., -1] = float("inf")
        order_key = order_key.masked_fill(~valid, float("-inf")).flip(-1)
        order = torch.argsort(order_key, dim=-1, descending=True, stable=True)
        rank = torch.argsort(order, dim=-1).flip(-1)  # rank of each slot (0 = kept first)
        return list(((rank < target.unsqueeze(-1)) & valid).unbind(0))


def stack_layers(tensors: list[Tensor]) -> Tensor:
    """``torch.stack`` along a new leading layer dimension that makes no copy for a single layer."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
