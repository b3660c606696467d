"""Supervised warm start of the NAMM scorer (allowed by the project's research goal).

Signal: in a full-cache run, which cached tokens receive attention *later*. At every update step
we record, per (layer, KV head) row, the scorer inputs of every cached token (the same features
the NAMM sees at that moment: normalized spectrogram EMA + recency) and, as the target, the
attention mass the token goes on to receive from all queries after that step until the end of
the prompt (averaged over those queries). Within each row the tokens whose future attention is in
the top ``keep_fraction`` are labelled "keep" (1), the rest "evict" (0), and the BAM scorer is
fitted with a logistic loss so that ``score >= 0`` predicts "keep". The newest tokens have few
future queries in a prompt's last window, so only update steps with at least ``min_future``
later queries are used.

The result only initializes CMA-ES: the final choice is made by the task fitness (see
:class:`namm_transfer.evolution.trainer.Evolution`, ``init=``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..namm import NAMM
from ..policies.base import LayerState
from ..policies.namm_policy import NAMMPolicy
from ..session import attach
from .fitness import EncodedPrompt

__all__ = ["WarmStartConfig", "collect_warmstart_data", "fit_scorer"]

logger = logging.getLogger(__name__)


@dataclass
class WarmStartConfig:
    update_interval: int = 256
    chunk_size: int = 256
    keep_fraction: float = 0.5
    min_future: int = 64
    steps: int = 300
    lr: float = 3e-3
    rows_per_batch: int = 32
    max_tokens_per_row: int = 1024
    seed: int = 0
    calibrate: bool = False
    """after the fit, shift the readout bias so that ``score >= 0`` keeps ``keep_fraction`` of the training
    tokens (a logistic fit to unbalanced labels can otherwise collapse to keeping everything)"""

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must lie in (0, 1], got {self.keep_fraction}")


class _Recorder(NAMMPolicy):
    """Keeps every token; snapshots scorer inputs at each update and accumulates later attention."""

    def __init__(self, namm: NAMM) -> None:
        super().__init__(namm)
        self.snapshots: list[dict[str, Any]] = []

    def init_layer(self, state: LayerState) -> None:
        super().init_layer(state)
        b, h, s = state.shape
        state.tokens["future_acc"] = torch.zeros(b, h, s, dtype=torch.float64, device=state.valid.device)

    def observe(self, state: LayerState, rows: Tensor) -> None:
        super().observe(state, rows)
        state.tokens["future_acc"] = state.tokens["future_acc"] + rows.sum(-2).double()

    def select(self, state: LayerState) -> Tensor:
        b, h, s = state.shape
        assert state.newest_position is not None
        age = (state.newest_position.view(b, 1, 1) - state.position).clamp_min(0)
        x = self.namm.features(state.tokens["namm_ema"], age)
        self.snapshots.append(
            {
                "layer": state.layer,
                "clock": state.clock,
                "x": x.cpu(),
                "valid": state.valid.cpu(),
                "acc_at": state.tokens["future_acc"].cpu().clone(),
                "state": state,
            }
        )
        return state.valid.clone()


@torch.no_grad()
def collect_warmstart_data(
    model: Any, namm: NAMM, prompts: list[EncodedPrompt], config: WarmStartConfig | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Rows of (x (S, d_in), label (S,)) from full-cache runs of ``prompts`` (batch 1 each)."""
    cfg = config or WarmStartConfig()
    device = next(model.parameters()).device
    rows: list[tuple[Tensor, Tensor]] = []
    for pr in prompts:
        rec = _Recorder(namm)
        with attach(model, rec, update_interval=cfg.update_interval, chunk_size=cfg.chunk_size) as mem:
            mem.prefill(torch.tensor([pr.ids], device=device))
            end_clock = mem.engine.clock
        for snap in rec.snapshots:
            n_future = end_clock - snap["clock"]
            if n_future < cfg.min_future:
                continue
            final = snap["state"].tokens["future_acc"].cpu()[..., : snap["acc_at"].shape[-1]]
            future = (final - snap["acc_at"]) / n_future  # (1, H, S) mean attention from later queries
            x, valid = snap["x"][0], snap["valid"][0]
            for head in range(x.shape[0]):
                v = valid[head]
                f = future[0, head][v]
                if f.numel() < 4:
                    continue
                k = max(1, int(round(cfg.keep_fraction * f.numel())))
                label = torch.zeros(f.shape, dtype=torch.float32)
                label[torch.topk(f, k).indices] = 1.0
                xs = x[head][v]
                if xs.shape[0] > cfg.max_tokens_per_row:  # keep the newest tokens of very long rows
                    xs, label = xs[-cfg.max_tokens_per_row :], label[-cfg.max_tokens_per_row :]
                rows.append((xs.float(), label))
        logger.info("warm start: %s -> %d rows so far", pr.id, len(rows))
    return rows


def fit_scorer(
    namm: NAMM, rows: list[tuple[Tensor, Tensor]], config: WarmStartConfig | None = None
) -> dict[str, float]:
    """Fit ``namm``'s flat vector to the labels with a logistic loss (in place). Returns train metrics."""
    cfg = config or WarmStartConfig()
    if not rows:
        raise ValueError("no warm-start rows: prompts too short for an update step with later queries")
    gen = torch.Generator().manual_seed(cfg.seed)
    theta = namm.get_flat().clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    loss_val = float("nan")
    for step in range(cfg.steps):
        idx = torch.randint(0, len(rows), (min(cfg.rows_per_batch, len(rows)),), generator=gen)
        loss = torch.zeros(())
        for i in idx.tolist():
            x, y = rows[i]
            s = namm.score(x.unsqueeze(0), theta=theta)[0]
            loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(s, y)
        loss = loss / len(idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_val = loss.item()
        if step % 50 == 0:
            logger.info("warm start step %d loss %.4f", step, loss_val)
    theta = theta.detach()
    if cfg.calibrate:
        with torch.no_grad():
            scores = torch.cat([namm.score(x.unsqueeze(0), theta=theta)[0] for x, _ in rows])
            cut = torch.quantile(scores.float(), 1.0 - cfg.keep_fraction)
            theta[-1] -= cut.to(theta.dtype)  # b_out, the last entry of the flat layout
    namm.set_flat(theta)
    with torch.no_grad():
        correct = total = kept = 0
        for x, y in rows:
            s = namm.score(x.unsqueeze(0))[0]
            pred = (s >= 0).float()
            correct += int((pred == y).sum())
            kept += int(pred.sum())
            total += y.numel()
    return {"loss": loss_val, "accuracy": correct / total, "kept_fraction": kept / total}
