"""Data of the video-model trainer (:mod:`.train`): synthetic splits, decoded frames, batches, one forward.

- :func:`load_split`: a synthetic split's questions and its frames decoded once (``frames`` per
  video, segment centres, as the eval reads them) and cached as ``frames-<F>-center.npy``.
- :class:`QuestionBatcher`: the eval's prompt (LongVideoBench text in the model's chat format, video
  first) + the answer letter + the end-of-turn token; labels on those two tokens only. Optionally a
  caption instead of a question (:data:`CAPTION_QUESTION`, answered by :func:`caption_text`: every event's
  colour and shape in order): LLaVA's feature-alignment idea, dense supervision that ties the visual
  tokens to the words the frozen language model already reads.
- :func:`batch_metrics` / :func:`evaluate`: answer cross-entropy and accuracy (greedy letter over the
  whole vocabulary, and among the option letters).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CAPTION_QUESTION",
    "LETTERS",
    "QuestionBatcher",
    "caption_text",
    "batch_metrics",
    "evaluate",
    "load_split",
    "shuffle_options",
    "split_folder",
]

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CAPTION_QUESTION = "List every coloured shape that appears in the video, in order of appearance."


def caption_text(sample: Any) -> str:
    """``"red circle, blue square."``: the events of a synthetic sample (``extra['events']``) in time order."""
    events = sample.extra.get("events") if isinstance(sample.extra, dict) else None
    if not events:
        raise ValueError(f"sample {sample.id!r} has no 'events' ground truth: captions need the synthetic benchmark")
    ordered = sorted(events, key=lambda e: int(e["start_frame"]))
    return ", ".join(f"{e['colour']} {e['shape']}" for e in ordered) + "."


def split_folder(split: str, n_videos: int, video_frames: int, size: int, seed: int, benchmark: str = "v2") -> Path:
    """``<cache>/video_qa/synthetic-<split>-n<N>-f<frames>-s<size>-seed<seed>`` (the eval's naming); benchmark v3's
    folders start ``synthetic3-``."""
    from namm_transfer.models import cache_dir

    stem = "synthetic" if benchmark == "v2" else "synthetic3"
    return cache_dir() / "video_qa" / f"{stem}-{split}-n{n_videos}-f{video_frames}-s{size}-seed{seed}"


def _decode(job: tuple[str, int]) -> np.ndarray:
    from .video_io import read_frames

    frames, _, _ = read_frames(job[0], num_frames=job[1], mode="center")
    return frames


def load_split(
    split: str,
    n_videos: int,
    video_frames: int,
    size: int,
    frames: int,
    seed: int = 0,
    *,
    folder: str | os.PathLike[str] | None = None,
    workers: int = 1,
    benchmark: str = "v2",
) -> tuple[list[Any], np.ndarray]:
    """Questions and decoded frames of a synthetic split: ``(samples, frames (N, F, size, size, 3) uint8)``.

    Generates the split (``benchmark`` ``"v2"`` or ``"v3"``) when its annotations are missing and caches the
    decoded frames as ``frames-<F>-center.npy`` in the split's folder.
    """
    from .benchmarks import load_longvideobench
    from .synthetic import generate_benchmark, generate_benchmark_v3

    if benchmark not in ("v2", "v3"):
        raise ValueError(f"benchmark must be v2 or v3, got {benchmark!r}")
    root = Path(folder) if folder is not None else split_folder(split, n_videos, video_frames, size, seed, benchmark)
    ann = root / f"synthetic_{split}.json"
    if not ann.is_file():
        logger.info("generating the synthetic %s %s split (%d videos) into %s", benchmark, split, n_videos, root)
        if benchmark == "v3":
            generate_benchmark_v3(
                root, n_videos, split, seed, frames_per_video=video_frames, size=size, workers=workers
            )
        else:
            generate_benchmark(
                root,
                n_videos=n_videos,
                frames_per_video=video_frames,
                split=split,
                seed=seed,
                size=size,
                workers=workers,
            )
    samples = load_longvideobench(ann)
    if len(samples) < n_videos:
        raise ValueError(f"{ann} holds {len(samples)} questions, fewer than the {n_videos} asked for")
    samples = samples[:n_videos]
    cache = root / f"frames-{frames}-center.npy"
    if cache.is_file():
        arr = np.load(cache, mmap_mode="r")
        if arr.shape[0] >= n_videos and arr.shape[1] == frames:
            return samples, np.asarray(arr[:n_videos])
    jobs = [(str(s.video_path), frames) for s in samples]
    t0 = time.perf_counter()
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            decoded = list(pool.map(_decode, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    else:
        decoded = [_decode(j) for j in jobs]
    arr = np.stack(decoded)
    tmp = cache.with_name(cache.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, cache)
    logger.info("decoded %d videos (%d frames) in %.1f s -> %s", len(jobs), frames, time.perf_counter() - t0, cache)
    return samples, arr


class QuestionBatcher:
    """Token ids, labels and pixels of training questions (the eval's prompt + answer letter + end of turn)."""

    def __init__(self, model: Any, processor: Any) -> None:
        from namm_transfer.adapters.video_llm import format_prompt

        self.model = model
        self.processor = processor
        tok = processor.tokenizer
        self.letter_ids = []
        for letter in LETTERS[:8]:
            ids = tok(letter, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"the tokenizer splits the answer letter {letter!r} into {ids}; expected one token")
            self.letter_ids.append(int(ids[0]))
        eos = getattr(tok, "eos_token_id", None)
        self.eos_id = None if eos is None else int(eos)
        self.template = format_prompt(model, processor, "{question}")

    def prompt(self, sample: Any) -> str:
        from .benchmarks import build_prompt

        return self.template.replace("{question}", build_prompt(sample, "longvideobench"))

    def encode(self, sample: Any, n_frames: int) -> tuple[list[int], list[int], int]:
        """``(ids, labels, letter position)`` of one question with its answer appended."""
        ids = self.processor.prompt_ids(self.prompt(sample), n_frames)
        answer = [self.letter_ids[sample.answer_index]] + ([self.eos_id] if self.eos_id is not None else [])
        labels = [-100] * len(ids) + answer
        return ids + answer, labels, len(ids)

    def encode_caption(self, sample: Any, n_frames: int) -> tuple[list[int], list[int], None]:
        """``(ids, labels, None)`` of the caption task: :data:`CAPTION_QUESTION`, then :func:`caption_text`."""
        ids = self.processor.prompt_ids(self.template.replace("{question}", CAPTION_QUESTION), n_frames)
        answer = list(self.processor.tokenizer(caption_text(sample), add_special_tokens=False)["input_ids"])
        answer += [self.eos_id] if self.eos_id is not None else []
        return ids + answer, [-100] * len(ids) + answer, None

    def batch(
        self, samples: Sequence[Any], videos: Sequence[np.ndarray], captions: Sequence[bool] | None = None
    ) -> dict[str, Any]:
        """Right-padded ``input_ids``, ``attention_mask``, ``labels``, ``letter_mask`` (B, T) and pixels.

        ``captions[i]`` true: sample ``i`` is the caption task (labels on the caption, no letter position).
        """
        import torch

        captions = [False] * len(samples) if captions is None else list(captions)
        enc = [
            self.encode_caption(s, len(v)) if c else self.encode(s, len(v))
            for s, v, c in zip(samples, videos, captions, strict=True)
        ]
        width = max(len(e[0]) for e in enc)
        b = len(enc)
        ids = torch.full((b, width), self.processor.pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        labels = torch.full((b, width), -100, dtype=torch.long)
        letter = torch.zeros((b, width), dtype=torch.bool)
        for i, (row, lab, pos) in enumerate(enc):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
            labels[i, : len(lab)] = torch.tensor(lab)
            if pos is not None:
                letter[i, pos] = True
        pixels = torch.stack([self.processor.preprocess_frames(v) for v in videos])
        n_options = torch.tensor([len(s.options) for s in samples])
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "letter_mask": letter,
            "pixel_values_videos": pixels,
            "n_options": n_options,
        }


def shuffle_options(sample: Any, rng: np.random.Generator) -> Any:
    order = [int(i) for i in rng.permutation(len(sample.options))]
    options = [sample.options[i] for i in order]
    return dataclasses.replace(sample, options=options, answer_index=order.index(int(sample.answer_index)))


# ----------------------------------------------------------------------------------------------------------------
# one step
def batch_metrics(model: Any, batch: Mapping[str, Any], letter_ids: Sequence[int], autocast: Any) -> dict[str, Any]:
    """Loss (mean cross-entropy of the answer and caption tokens) and the questions' accuracies (NaN when the
    batch holds captions only) of one batch; the loss keeps its graph."""
    import torch

    dev = next(model.model.multi_modal_projector.parameters()).device
    with autocast():
        out = model.model(
            input_ids=batch["input_ids"].to(dev),
            pixel_values_videos=batch["pixel_values_videos"].to(dev),
            attention_mask=batch["attention_mask"].to(dev),
        )
        logits, targets = model.label_logits(out.last_hidden_state, batch["labels"].to(dev))
    loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    where = batch["labels"][:, 1:] != -100
    is_letter = batch["letter_mask"][:, 1:][where].to(dev)
    lg, tg = logits[is_letter].float(), targets[is_letter]
    if lg.shape[0] == 0:  # captions only
        return {"loss": loss, "acc": float("nan"), "acc4": float("nan"), "tokens": int(batch["attention_mask"].sum())}
    acc = (lg.argmax(-1) == tg).float().mean()
    cols = torch.tensor(list(letter_ids), device=dev)
    n_opt = batch["n_options"][batch["letter_mask"].any(1)].to(dev)  # the questions' rows (captions have none)
    restricted = lg[:, cols].masked_fill(torch.arange(len(cols), device=dev)[None] >= n_opt[:, None], -torch.inf)
    acc4 = (cols[restricted.argmax(-1)] == tg).float().mean()
    return {"loss": loss, "acc": float(acc), "acc4": float(acc4), "tokens": int(batch["attention_mask"].sum())}


def evaluate(
    model: Any,
    batcher: QuestionBatcher,
    samples: Sequence[Any],
    frames: np.ndarray,
    batch_size: int,
    autocast: Callable[[], Any],
    caption_probe: bool = False,
) -> dict[str, Any]:
    """Teacher-forced answer loss and accuracies over ``samples`` (options in their stored order).

    ``caption_probe``: also the caption loss with each video's own frames (``val_caption_loss``) and with the
    next video's frames (``val_caption_loss_shuffled``): equal values mean the model does not use the video yet.
    """
    import torch

    def means(fr: Any, captions: bool) -> dict[str, float]:
        """Sample-weighted means of the batch metrics over ``samples`` with frames ``fr``."""
        tot = {"loss": 0.0, "acc": 0.0, "acc4": 0.0}
        for lo in range(0, len(samples), batch_size):
            chunk = list(samples[lo : lo + batch_size])
            batch = batcher.batch(chunk, list(fr[lo : lo + len(chunk)]), [captions] * len(chunk))
            m = batch_metrics(model, batch, batcher.letter_ids, autocast)
            for k in tot:
                tot[k] += float(m[k]) * len(chunk)
        return {k: v / len(samples) for k, v in tot.items()}

    was = model.training
    model.eval()
    n = len(samples)
    t0 = time.perf_counter()
    probe: dict[str, float] = {}
    with torch.no_grad():
        tot = means(frames, False)
        if caption_probe:
            shuffled = np.roll(np.asarray(frames[:n]), 1, axis=0)
            probe["val_caption_loss"] = means(frames, True)["loss"]
            probe["val_caption_loss_shuffled"] = means(shuffled, True)["loss"]
    model.train(was)
    if was:
        model.model.language_model.eval()
    return {
        "val_loss": tot["loss"],
        "val_acc": tot["acc"],
        "val_acc4": tot["acc4"],
        **probe,
        "val_n": n,
        "seconds": round(time.perf_counter() - t0, 2),
    }
