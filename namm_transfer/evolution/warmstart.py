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

Answer labels (``labels="answer"``). The target of a cached token at an update step is the attention it
receives from the prompt's question and answer: the queries from the first token of the final question
(:attr:`EncodedPrompt.question_start`: the question, the chat template's turn markers, the answer cue) to the
one that predicts the last answer token under teacher forcing, i.e. positions ``[q0, T - 1)`` of
``ids = prompt + answer`` (T tokens), each query's attention averaged over the query heads that share the KV
head (the engine's rows), then over those queries. When a prompt does not mark its question, ``q0`` is the
first of its last ``question_tokens`` prompt tokens. The target does not depend on the step (every step's
cached tokens precede the answer); the features do. The full-cache run also updates once at the end of the
prompt (as the eval's ratio protocol does, before the answer), and that step is recorded too. Within each
(layer, KV head) row the top ``keep_fraction`` by target are labelled "keep". The fitted network's own top
``keep_fraction`` of a row is what ``NAMMPolicy(net, budget=RatioBudget(keep_fraction))`` keeps: the fit
reports how much of it matches the labels (``top_share_precision``).

Labels are computed once per run (:func:`prepare_rows` stores them, with the normalization statistics, in
``run_dir/warmstart-labels.safetensors``; a rerun with the same settings reuses them, one with other settings is
refused).

The result only initializes CMA-ES: the final choice is made by the task fitness (see
:class:`namm_transfer.evolution.trainer.Evolution`, ``init=``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..namm import NAMM
from ..policies.base import LayerState
from ..policies.namm_policy import NAMMPolicy
from ..session import attach
from .fitness import EncodedPrompt

__all__ = [
    "LABEL_KINDS",
    "LABELS_FILE",
    "WarmStartConfig",
    "answer_query_span",
    "collect_warmstart_data",
    "fit_scorer",
    "prepare_rows",
]

LABEL_KINDS = ("future", "answer")
LABELS_FILE = "warmstart-labels.safetensors"
"""Where :func:`prepare_rows` stores the label rows in a run folder."""

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
    labels: str = "future"
    """``future``: attention from every later query; ``answer``: attention from the question and answer (module
    docstring)."""
    question_tokens: int = 64
    """Answer labels of a prompt that does not mark its question: the last this many prompt tokens stand for it."""

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must lie in (0, 1], got {self.keep_fraction}")
        if self.labels not in LABEL_KINDS:
            raise ValueError(f"unknown warm-start labels {self.labels!r}: use one of {', '.join(LABEL_KINDS)}")
        if self.question_tokens < 1:
            raise ValueError(f"question_tokens must be >= 1, got {self.question_tokens}")


def answer_query_span(prompt: EncodedPrompt, question_tokens: int = 64) -> tuple[int, int]:
    """``[q0, q1)``: the query positions whose attention makes the answer labels of ``prompt``.

    ``q0`` is :attr:`EncodedPrompt.question_start` (else the first of the last ``question_tokens`` prompt tokens),
    ``q1 = len(ids) - 1``: the last query that predicts an answer token (the answer is teacher-forced).
    """
    t = len(prompt.ids)
    prompt_len = t - prompt.answer_len
    q0 = prompt.question_start if prompt.question_start is not None else max(0, prompt_len - question_tokens)
    return q0, t - 1


class _Recorder(NAMMPolicy):
    """Keeps every token; snapshots scorer inputs at each update and accumulates later attention.

    ``query_span``: also accumulate, in ``tokens["answer_acc"]``, the attention from the queries at positions
    ``[q0, q1)`` of the (single, unpadded) sequence.
    """

    def __init__(self, namm: NAMM, query_span: tuple[int, int] | None = None) -> None:
        super().__init__(namm)
        self.snapshots: list[dict[str, Any]] = []
        self.query_span = query_span

    def init_layer(self, state: LayerState) -> None:
        super().init_layer(state)
        b, h, s = state.shape
        state.tokens["future_acc"] = torch.zeros(b, h, s, dtype=torch.float64, device=state.valid.device)
        state.tokens["answer_acc"] = torch.zeros(b, h, s, dtype=torch.float64, device=state.valid.device)
        state.meta["recorder_queries"] = 0

    def observe(self, state: LayerState, rows: Tensor) -> None:
        """rows: (B, H, Q, S), the next Q queries of the sequence in order."""
        super().observe(state, rows)
        state.tokens["future_acc"] = state.tokens["future_acc"] + rows.sum(-2).double()
        first = state.meta["recorder_queries"]
        q = rows.shape[-2]
        state.meta["recorder_queries"] = first + q
        if self.query_span is not None:
            lo, hi = max(self.query_span[0] - first, 0), min(self.query_span[1] - first, q)
            if lo < hi:
                state.tokens["answer_acc"] = state.tokens["answer_acc"] + rows[..., lo:hi, :].sum(-2).double()

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


def _row_labels(
    x: Tensor, valid: Tensor, target: Tensor, cfg: WarmStartConfig, rows: list[tuple[Tensor, Tensor]]
) -> None:
    """Append one (x (S, d_in), label (S,)) row per head: x (H, S, d_in), valid (H, S), target (H, S)."""
    for head in range(x.shape[0]):
        v = valid[head]
        f = target[head][v]
        if f.numel() < 4:
            continue
        k = max(1, int(round(cfg.keep_fraction * f.numel())))
        label = torch.zeros(f.shape, dtype=torch.float32)
        label[torch.topk(f, k).indices] = 1.0
        xs = x[head][v]
        if xs.shape[0] > cfg.max_tokens_per_row:  # keep the newest tokens of very long rows
            xs, label = xs[-cfg.max_tokens_per_row :], label[-cfg.max_tokens_per_row :]
        rows.append((xs.float(), label))


@torch.no_grad()
def _collect_answer(
    model: Any, namm: NAMM, pr: EncodedPrompt, cfg: WarmStartConfig, rows: list[tuple[Tensor, Tensor]]
) -> None:
    """Answer labels of one prompt (module docstring): full-cache run, update steps and the prompt's end."""
    device = next(model.parameters()).device
    q0, q1 = answer_query_span(pr, cfg.question_tokens)
    prompt_len = len(pr.ids) - pr.answer_len
    rec = _Recorder(namm, query_span=(q0, q1))
    ids = torch.tensor([pr.ids], device=device)
    with attach(model, rec, update_interval=cfg.update_interval, chunk_size=cfg.chunk_size, final_update=True) as mem:
        mem.prefill(ids[:, :prompt_len])  # ends with the final update of the prompt (unless on an update step)
        mem.prefill(ids[:, prompt_len:], reset=False)
    for snap in rec.snapshots:
        if snap["clock"] > prompt_len:  # the end of the answer: no decision the answer depends on
            continue
        n_slots = snap["x"].shape[-2]
        target = snap["state"].tokens["answer_acc"].cpu()[..., :n_slots] / (q1 - q0)  # (1, H, S)
        _row_labels(snap["x"][0], snap["valid"][0], target[0], cfg, rows)


@torch.no_grad()
def collect_warmstart_data(
    model: Any, namm: NAMM, prompts: list[EncodedPrompt], config: WarmStartConfig | None = None
) -> list[tuple[Tensor, Tensor]]:
    """Rows of (x (S, d_in), label (S,)) from full-cache runs of ``prompts`` (batch 1 each), labelled by
    ``config.labels``."""
    cfg = config or WarmStartConfig()
    device = next(model.parameters()).device
    rows: list[tuple[Tensor, Tensor]] = []
    for pr in prompts:
        if cfg.labels == "answer":
            _collect_answer(model, namm, pr, cfg, rows)
            logger.info("warm start (answer labels): %s -> %d rows so far", pr.id, len(rows))
            continue
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
            _row_labels(snap["x"][0], snap["valid"][0], future[0], cfg, rows)
        logger.info("warm start: %s -> %d rows so far", pr.id, len(rows))
    return rows


def _labels_identity(prompts: list[EncodedPrompt], cfg: WarmStartConfig) -> dict[str, Any]:
    """What the stored labels depend on (besides the host model, which the run folder fixes)."""
    digest = hashlib.sha256()
    for pr in prompts:
        digest.update(json.dumps([pr.id, pr.task, list(pr.ids), pr.answer_len, pr.question_start]).encode())
    return {
        "labels": cfg.labels,
        "keep_fraction": cfg.keep_fraction,
        "update_interval": cfg.update_interval,
        "chunk_size": cfg.chunk_size,
        "min_future": cfg.min_future,
        "max_tokens_per_row": cfg.max_tokens_per_row,
        "question_tokens": cfg.question_tokens,
        "prompts": [pr.id for pr in prompts],
        "prompts_sha256": digest.hexdigest(),
    }


def prepare_rows(
    model: Any, namm: NAMM, prompts: list[EncodedPrompt], config: WarmStartConfig, path: str | Path
) -> list[tuple[Tensor, Tensor]]:
    """The warm start's label rows, computed once: loaded from ``path`` when it holds them, else computed and stored.

    Computing them first estimates ``namm``'s normalization on ``prompts`` (full cache) when it has none, then
    runs :func:`collect_warmstart_data`; the file (safetensors) holds the rows (``x`` (N, d_in) and ``label`` (N,)
    concatenated, ``offsets`` (R + 1,)), the normalization (set on ``namm`` when loading) and the settings, which a
    rerun must share (else ValueError: another run folder, or the same settings).
    """
    from safetensors import safe_open
    from safetensors.torch import save as st_save

    from ..results import atomic_write_bytes
    from .trainer import estimate_normalization

    path = Path(path)
    identity = _labels_identity(prompts, config)
    if path.exists():
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("identity", "{}"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118  (safe_open has no __iter__)
        if meta != identity:
            diff = sorted(k for k in set(meta) | set(identity) if meta.get(k) != identity.get(k))
            raise ValueError(
                f"{path} holds warm-start labels made with other settings (differs in {diff}); use another "
                "--run-dir, or the settings it was made with"
            )
        namm.set_normalization(tensors["feature_mean"], tensors["feature_std"])
        off = tensors["offsets"].tolist()
        x, y = tensors["x"], tensors["label"]
        logger.info("warm start: reusing %d label rows from %s", len(off) - 1, path)
        return [(x[a:b], y[a:b]) for a, b in zip(off[:-1], off[1:], strict=True)]
    if not bool(namm.normalization_ready):
        estimate_normalization(model, namm, prompts, config.update_interval, config.chunk_size)
    rows = collect_warmstart_data(model, namm, prompts, config)
    if not rows:
        raise ValueError("no warm-start rows: prompts too short for an update step with later queries")
    offsets = torch.tensor([0] + [r[1].numel() for r in rows]).cumsum(0)
    payload = {
        "x": torch.cat([r[0] for r in rows]).contiguous(),
        "label": torch.cat([r[1] for r in rows]).contiguous(),
        "offsets": offsets,
        "feature_mean": namm.feature_mean.detach().cpu().float().contiguous(),
        "feature_std": namm.feature_std.detach().cpu().float().contiguous(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, st_save(payload, metadata={"identity": json.dumps(identity)}))
    logger.info("warm start: %d label rows stored in %s", len(rows), path)
    return rows


def top_share_precision(namm: NAMM, rows: list[tuple[Tensor, Tensor]]) -> float:
    """Mean over rows of the share of the network's own top-k tokens (k = the row's keep labels) labelled keep:
    how well ``NAMMPolicy(net, budget=RatioBudget(keep_fraction))`` would keep what the labels keep."""
    total = 0.0
    with torch.no_grad():
        for x, y in rows:
            k = int(y.sum())
            if k == 0:
                continue
            s = namm.score(x.unsqueeze(0))[0]
            total += float(y[torch.topk(s, k).indices].mean())
    return total / max(1, len(rows))


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
    return {
        "loss": loss_val,
        "accuracy": correct / total,
        "kept_fraction": kept / total,
        "top_share_precision": top_share_precision(namm, rows),
    }
