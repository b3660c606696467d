"""Vision pretraining of the video model (the project's stand-in for LLaVA's pretrained CLIP): per-frame attributes.

A LLaVA model starts from a vision encoder that already tells things apart; the project's ViT starts random, and a
random ViT's tokens barely differ between a background frame and a frame with a shape (measured on the ``cpu-v3``
model: the between-frame std of the projected tokens is a quarter of their std), so the language model has nothing
to read. This stage trains the vision tower alone, without the language model (milliseconds per frame), on labels
that the synthetic generator's event records give for every frame of the TRAINING split:

- ``present``: the frame shows a shape (an event's frame);
- ``colour`` and ``shape``: that shape's colour and shape (frames with a shape only).

Every pooled token of a frame (``tokens_per_frame`` of them, :meth:`.model.NammVideoLlavaModel.get_video_features`
before the projector) predicts all three through one linear head (``1 + colours + shapes`` outputs), so each token
the language model will read carries the frame's content. Batches hold half event frames, half background frames.
The head is dropped afterwards; the projector is not trained here. Accuracy is measured per frame (from the mean of
its tokens' logits) on the held-out frames of another split (``val``).

Only benchmark v3 (every frame read: frame ``f`` of the model's input is the video's frame ``f``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FrameLabels", "VisionPretrainResult", "frame_labels", "frame_metrics", "pretrain_vision"]

logger = logging.getLogger(__name__)


@dataclass
class FrameLabels:
    """Per-frame labels of a set of videos, flattened in (video, frame) order: arrays of length ``videos * frames``.

    ``present`` 1 where a shape is shown; ``colour`` / ``shape`` the index into :data:`.synthetic.COLOURS` /
    :data:`.synthetic.SHAPES` there, -1 elsewhere.
    """

    present: np.ndarray
    colour: np.ndarray
    shape: np.ndarray


def frame_labels(samples: Sequence[Any], n_frames: int) -> FrameLabels:
    """The :class:`FrameLabels` of ``samples`` (their ``extra['events']``, frames ``0..n_frames-1`` as read)."""
    from .synthetic import COLOURS, SHAPES

    colours, shapes = list(COLOURS), list(SHAPES)
    n = len(samples) * n_frames
    present, colour, shape = np.zeros(n, np.int64), np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    for i, s in enumerate(samples):
        events = s.extra.get("events") if isinstance(s.extra, dict) else None
        if events is None:
            raise ValueError(f"sample {s.id!r} has no 'events': vision pretraining needs the synthetic benchmark")
        if int(s.extra.get("num_frames", n_frames)) != n_frames:
            raise ValueError(
                f"sample {s.id!r} has {s.extra.get('num_frames')} frames but {n_frames} are read: vision pretraining "
                "needs every frame read (benchmark v3, frames = video_frames)"
            )
        for ev in events:
            for f in ev["frames"]:
                j = i * n_frames + int(f)
                present[j], colour[j], shape[j] = 1, colours.index(ev["colour"]), shapes.index(ev["shape"])
    return FrameLabels(present, colour, shape)


@dataclass
class VisionPretrainResult:
    """What :func:`pretrain_vision` measured: ``train`` and ``held_out`` per-frame accuracies (``present``,
    ``colour`` and ``shape``, the latter two on frames with a shape), losses and seconds."""

    steps: int
    losses: list[float]
    train: dict[str, float]
    held_out: dict[str, float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": float(np.mean(self.losses[-10:])) if self.losses else None,
            "train": self.train,
            "held_out": self.held_out,
            "seconds": round(self.seconds, 2),
        }


def _frame_logits(model: Any, head: Any, pixels: Any) -> Any:
    """(N, tokens_per_frame, outputs): the head on every pooled token of ``pixels`` (N, 3, S, S), one frame each."""
    feats = model.model.get_video_features(pixels[:, None], project=False).pooler_output
    return head(feats)


def _loss(logits: Any, present: Any, colour: Any, shape: Any, n_colours: int) -> Any:
    import torch
    from torch.nn import functional as F

    t = logits.shape[1]
    flat = logits.reshape(-1, logits.shape[-1])
    rep = lambda x: x.repeat_interleave(t)  # noqa: E731  (one label per token)
    p, c, s = rep(present), rep(colour), rep(shape)
    loss = F.binary_cross_entropy_with_logits(flat[:, 0], p.float())
    on = p > 0
    if bool(on.any()):
        loss = loss + F.cross_entropy(flat[on, 1 : 1 + n_colours], c[on])
        loss = loss + F.cross_entropy(flat[on, 1 + n_colours :], s[on])
    return loss if isinstance(loss, torch.Tensor) else torch.tensor(loss)


def frame_metrics(
    model: Any, head: Any, processor: Any, frames: np.ndarray, labels: FrameLabels, batch: int = 512
) -> dict[str, float]:
    """Per-frame accuracies on ``frames`` (videos, F, H, W, 3): ``present`` over all frames, ``colour`` and
    ``shape`` over the frames with a shape (a frame's prediction: the mean of its tokens' logits)."""
    import torch

    from .synthetic import COLOURS

    nc = len(COLOURS)
    flat = np.asarray(frames).reshape(-1, *frames.shape[2:])
    outs = []
    was = model.training
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(flat), batch):
            px = processor.preprocess_frames(flat[lo : lo + batch])
            outs.append(_frame_logits(model, head, px).mean(1))
    model.train(was)
    logits = torch.cat(outs)
    present = torch.from_numpy(labels.present)
    on = present > 0
    pred_p = (logits[:, 0] > 0).long()
    pred_c = logits[on, 1 : 1 + nc].argmax(-1)
    pred_s = logits[on, 1 + nc :].argmax(-1)
    return {
        "present": float((pred_p == present).float().mean()),
        "colour": float((pred_c == torch.from_numpy(labels.colour)[on]).float().mean()),
        "shape": float((pred_s == torch.from_numpy(labels.shape)[on]).float().mean()),
        "frames": int(len(present)),
        "shape_frames": int(on.sum()),
    }


def pretrain_vision(
    model: Any,
    processor: Any,
    train_samples: Sequence[Any],
    train_frames: np.ndarray,
    held_samples: Sequence[Any],
    held_frames: np.ndarray,
    *,
    steps: int,
    batch_frames: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
) -> VisionPretrainResult:
    """Train ``model.model.vision_tower`` (in place) on per-frame labels of the training videos; measure it on the
    held-out videos.

    Args:
        model: a :class:`~.model.NammVideoLlavaForConditionalGeneration` (only its vision tower changes).
        processor: its processor (pixel normalization).
        train_samples, train_frames: the training split's questions and decoded frames (videos, F, H, W, 3) uint8.
        held_samples, held_frames: another split's (per-frame accuracy on frames never trained on).
        steps: AdamW steps of ``batch_frames`` frames (half with a shape, half background), cosine to 10% of ``lr``.
    """
    import torch

    from .synthetic import COLOURS, SHAPES

    if steps < 1 or batch_frames < 2:
        raise ValueError(f"vision pretraining needs steps >= 1 and batch_frames >= 2, got {steps}, {batch_frames}")
    n_frames = int(train_frames.shape[1])
    labels = frame_labels(train_samples, n_frames)
    held_labels = frame_labels(held_samples, int(held_frames.shape[1]))
    pos, neg = np.flatnonzero(labels.present > 0), np.flatnonzero(labels.present == 0)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("vision pretraining needs frames with and without a shape in the training split")
    tower = model.model.vision_tower
    dev = next(tower.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    dim = int(model.config.vision_embed_dim)
    head = torch.nn.Linear(dim, 1 + len(COLOURS) + len(SHAPES)).to(dev)
    with torch.no_grad():
        head.weight.normal_(0.0, dim**-0.5, generator=gen)
        head.bias.zero_()
    frozen = [p for p in tower.parameters() if not p.requires_grad]
    tower.requires_grad_(True)
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps)))
    )
    rng = np.random.default_rng(seed)
    flat = np.asarray(train_frames).reshape(-1, *train_frames.shape[2:])
    half = batch_frames // 2
    losses: list[float] = []
    was = model.training
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = np.concatenate([rng.choice(pos, half), rng.choice(neg, batch_frames - half)])
        px = processor.preprocess_frames(flat[idx]).to(dev)
        logits = _frame_logits(model, head, px)
        sel = torch.from_numpy(idx)
        loss = _loss(
            logits,
            torch.from_numpy(labels.present[sel]).to(dev),
            torch.from_numpy(labels.colour[sel]).to(dev),
            torch.from_numpy(labels.shape[sel]).to(dev),
            len(COLOURS),
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    model.train(was)
    for p in frozen:
        p.requires_grad_(False)
    sub = rng.choice(len(train_samples), size=min(len(train_samples), len(held_samples)), replace=False)
    train_m = frame_metrics(
        model,
        head,
        processor,
        np.asarray(train_frames)[np.sort(sub)],
        frame_labels([train_samples[i] for i in np.sort(sub)], n_frames),
    )
    held_m = frame_metrics(model, head, processor, held_frames, held_labels)
    logger.info(
        "vision pretraining: %d steps in %.1f s, held-out per-frame accuracy: present %.3f, colour %.3f, shape %.3f",
        steps,
        seconds,
        held_m["present"],
        held_m["colour"],
        held_m["shape"],
    )
    return VisionPretrainResult(steps, losses, train_m, held_m, seconds)
