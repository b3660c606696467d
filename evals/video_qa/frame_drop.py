"""Frame-drop check of a trained video model on benchmark v3: are the answer-bearing frames where the generator says?

For every held-out question the model answers three times (teacher-forced, the letter with the highest logit among
the options, as ``val_acc4`` of the trainer; options in their stored order):

- ``full``: all frames;
- ``no_answer``: the question's ``answer_frames`` (the generator's record) removed;
- ``no_distractor``: as many frames removed, drawn (seeded) from the frames that show no event.

A model that reads the video loses accuracy without the answer frames and keeps it without as many distractors.
With ``captions`` the same three conditions also give each video's teacher-forced caption loss (the caption task of
training: every shape in order), which shows whether the model reads the frames even where it cannot yet answer.
The differences to ``full`` come with paired bootstrap intervals (:func:`namm_transfer.stats.paired_bootstrap`,
stratified by question category).

Command line (prints the JSON summary; ``--output`` also writes it)::

    python -m namm_transfer.evals.video_qa.frame_drop --model runs/video/cpu-v3-lora/model --questions 300
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CONDITIONS", "drop_plan", "frame_drop_eval", "load_checkpoint_model", "main"]

logger = logging.getLogger(__name__)

CONDITIONS = ("full", "no_answer", "no_distractor")


def drop_plan(sample: Any, n_frames: int, rng: np.random.Generator) -> dict[str, list[int]]:
    """The frames each condition removes from ``sample``'s video: ``{"full": [], "no_answer": answer_frames,
    "no_distractor": as many frames without an event}``."""
    extra = sample.extra if isinstance(sample.extra, dict) else {}
    answer = [int(f) for f in extra.get("answer_frames") or []]
    events = {int(f) for f in extra.get("event_frames") or []}
    if not answer or not events:
        raise ValueError(f"sample {sample.id!r} has no answer_frames / event_frames: the frame drop needs benchmark v3")
    others = [f for f in range(n_frames) if f not in events]
    if len(others) < len(answer):
        raise ValueError(f"sample {sample.id!r}: {len(answer)} answer frames but only {len(others)} without an event")
    distract = sorted(int(f) for f in rng.choice(others, size=len(answer), replace=False))
    return {"full": [], "no_answer": sorted(answer), "no_distractor": distract}


def frame_drop_eval(
    model: Any,
    processor: Any,
    samples: Sequence[Any],
    frames: np.ndarray,
    *,
    seed: int = 0,
    captions: bool = False,
) -> dict[str, Any]:
    """Accuracy of ``model`` on ``samples`` (frames ``(N, F, H, W, 3)`` uint8) under the :data:`CONDITIONS`, one
    question a forward (the videos of a condition differ in length).

    Returns ``{"n", "seed", "accuracy": {condition: share}, "by_category": {category: {condition: share}},
    "vs_full": {condition: PairedInterval dict}, "correct": {condition: [0/1 per question]}}``; with ``captions``
    also ``"caption_loss": {condition: mean}``, ``"caption_vs_full"`` (intervals of the loss differences) and
    ``"caption_losses": {condition: [per question]}``.
    """
    import torch

    from namm_transfer.stats import paired_bootstrap

    from .train_data import QuestionBatcher, batch_metrics

    batcher = QuestionBatcher(model, processor)
    rng = np.random.default_rng(seed)
    n_frames = int(frames.shape[1])
    plans = [drop_plan(s, n_frames, rng) for s in samples]
    correct: dict[str, list[int]] = {c: [] for c in CONDITIONS}
    cap: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    was = model.training
    model.eval()
    with torch.no_grad():
        for cond in CONDITIONS:
            for i, sample in enumerate(samples):
                video = np.delete(np.asarray(frames[i]), plans[i][cond], axis=0)
                m = batch_metrics(model, batcher.batch([sample], [video]), batcher.letter_ids, _null)
                correct[cond].append(int(round(float(m["acc4"]))))
                if captions:
                    mc = batch_metrics(model, batcher.batch([sample], [video], [True]), batcher.letter_ids, _null)
                    cap[cond].append(float(mc["loss"]))
    model.train(was)
    cats = [str(s.extra.get("question_category", "?")) for s in samples]
    by_cat = {
        c: {
            cond: float(np.mean([v for v, k in zip(correct[cond], cats, strict=True) if k == c])) for cond in CONDITIONS
        }
        for c in sorted(set(cats))
    }

    def intervals(values: dict[str, list[float]] | dict[str, list[int]]) -> dict[str, Any]:
        out = {}
        for cond in CONDITIONS[1:]:
            diffs: dict[Hashable, list[float]] = {}
            for k, a, b in zip(cats, values[cond], values["full"], strict=True):
                diffs.setdefault(k, []).append(float(a - b))
            out[cond] = paired_bootstrap(diffs).as_dict()
        return out

    extra: dict[str, Any] = {}
    if captions:
        extra = {
            "caption_loss": {c: float(np.mean(v)) for c, v in cap.items()},
            "caption_vs_full": intervals(cap),
            "caption_losses": cap,
        }
    vs_full = intervals(correct)
    return {
        "n": len(samples),
        "seed": seed,
        "accuracy": {c: float(np.mean(v)) for c, v in correct.items()},
        "by_category": by_cat,
        "vs_full": vs_full,
        "correct": correct,
        **extra,
    }


def load_checkpoint_model(folder: str | Path, language_model: Any = None, tokenizer: Any = None) -> tuple[Any, Any]:
    """``(model, processor)`` of a training checkpoint (``<run>/checkpoints/step-N``: its ``trainer_state.json``
    config and ``model.safetensors``), around ``config.text_model`` (or the given language model and tokenizer); LoRA
    adapters are attached as in training (unmerged). Eval mode."""
    import json as _json

    from safetensors.torch import load_file

    from .model import NammVideoLlavaForConditionalGeneration, add_lora
    from .processor import NammVideoLlavaProcessor
    from .train import VideoTrainConfig

    folder = Path(folder)
    state_file = folder / "trainer_state.json"
    if not state_file.is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not a training checkpoint (trainer_state.json + model.safetensors)")
    cfg = VideoTrainConfig.from_dict(_json.loads(state_file.read_text(encoding="utf-8"))["config"])
    if language_model is None or tokenizer is None:
        from namm_transfer.models import load_model

        language_model, tokenizer = load_model(cfg.text_model, device="cpu", dtype="float32")
    model = NammVideoLlavaForConditionalGeneration(cfg.model_config(language_model.config), language_model)
    if cfg.train_lm == "lora":
        add_lora(model.model.language_model, cfg.lora_rank, cfg.lora_alpha)
    weights = load_file(str(folder / "model.safetensors"))
    if set(weights) != set(model.trainable_state_dict()):
        raise ValueError(f"{folder}/model.safetensors does not fit the model of its trainer_state.json")
    model.load_state_dict(weights, strict=False)
    return model.eval(), NammVideoLlavaProcessor.from_config(model.config, tokenizer)


def _null() -> Any:
    import contextlib

    return contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    """``python -m namm_transfer.evals.video_qa.frame_drop``: the frame-drop check of a trained model folder."""
    from namm_transfer.evals.args import StrictParser

    parser = StrictParser(prog="python -m namm_transfer.evals.video_qa.frame_drop", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        required=True,
        help="a trained video model folder (or shipped name), or a training checkpoint (<run>/checkpoints/step-N)",
    )
    parser.add_argument("--questions", type=int, default=300, help="held-out v3 test questions (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="data seed of the test split and of the drawn frames")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--captions", action="store_true", help="also the caption loss under each condition (twice the forwards)"
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON summary here")
    args: argparse.Namespace = parser.parse_args(argv)
    import torch

    from .model import load_video_model
    from .synthetic import V3_DEFAULTS
    from .train_data import load_split

    torch.set_num_threads(args.threads)
    if (Path(args.model) / "trainer_state.json").is_file():
        model, processor = load_checkpoint_model(args.model)
    else:
        model, processor = load_video_model(args.model)
    f, size = int(V3_DEFAULTS["frames_per_video"]), int(V3_DEFAULTS["size"])
    samples, frames = load_split("test", args.questions, f, size, f, args.seed, benchmark="v3")
    out = frame_drop_eval(model, processor, samples, frames, seed=args.seed, captions=args.captions)
    per_question = ("correct", "caption_losses")
    summary = {"model": str(args.model), **{k: v for k, v in out.items() if k not in per_question}}
    text = json.dumps(summary, indent=1)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        full = {**summary, **{k: out[k] for k in per_question if k in out}}
        args.output.write_text(json.dumps(full, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
