"""``namm-transfer video train``: train the project's small video model (vision tower + projector; SmolLM2 too with
``--train-lm full``).

Importing this module is cheap (no torch or transformers): they load inside :func:`main`.

Examples::

    namm-transfer video train                                   # --preset cpu-small: minutes on one CPU core
    namm-transfer video train --preset device --ship smollm2-135m-video   # the shipped model (GPU, see
                                                                # training/device.sh)
    namm-transfer video train --preset device --output runs/video/device  # again: resumes from its checkpoint
    namm-transfer video train --preset cpu-v3 --time-budget 3600           # benchmark v3, SmolLM2 fine-tuned too
    namm-transfer video train --preset cpu-v3-lora --time-budget 6000      # v3: vision pretraining, then LoRA

Presets set every option below; an option given on the command line overrides its preset value.
A run resumes from its newest checkpoint when started again with the same settings; ``--restart``
starts afresh. ``--ship NAME`` copies the finished model, its card (generated from the log), the log
and the curve into ``namm_transfer/weights/video/NAME/``, where ``namm-transfer eval --target
video-llava --model NAME`` (and, for the default name, plain ``eval --target video-llava``) finds it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TRAIN_LM_CHOICES = ("none", "full", "lora")
"""``--train-lm`` values: :data:`.model.TRAIN_LM_MODES`, spelled out here so that ``--help`` imports no torch."""

_OVERRIDES: dict[str, tuple[type, str]] = {
    "steps": (int, "gradient steps in total"),
    "batch_size": (int, "questions per step"),
    "lr": (float, "AdamW learning rate of the vision tower and projector (warmup, then cosine to 10%%)"),
    "lm_lr": (float, "AdamW learning rate of the language model with --train-lm full (same schedule)"),
    "weight_decay": (float, "AdamW weight decay"),
    "warmup": (int, "linear warmup steps"),
    "grad_clip": (float, "gradient norm clip"),
    "train_videos": (int, "questions (videos) of the synthetic train split"),
    "val_videos": (int, "questions of the synthetic val split"),
    "caption_share": (float, "share of training items turned into the caption task (every shape in order)"),
    "video_frames": (int, "frames per generated video (>= 16)"),
    "video_size": (int, "generated frame size in pixels"),
    "frames": (int, "frames sampled per video for the model"),
    "image_size": (int, "frame size the vision tower takes"),
    "patch_size": (int, "ViT patch size"),
    "vision_embed_dim": (int, "ViT width"),
    "vision_depth": (int, "ViT layers"),
    "vision_heads": (int, "ViT heads"),
    "tokens_per_frame": (int, "language-model tokens per frame (a square, >= 16 for the shipped model)"),
    "text_model": (str, "language model (offline name or folder)"),
    "lora_rank": (int, "LoRA rank with --train-lm lora"),
    "lora_alpha": (float, "LoRA scale numerator (update = alpha / rank * B A) with --train-lm lora"),
    "vision_pretrain_steps": (
        int,
        "steps of the vision pretraining stage before the first step (per-frame shape/colour labels of the train "
        "split, no language model; benchmark v3; 0: none)",
    ),
    "vision_pretrain_batch": (int, "frames per vision pretraining step"),
    "vision_pretrain_lr": (float, "AdamW learning rate of the vision pretraining stage"),
    "vision_lr": (float, "learning rate of the vision tower in the language stage (0: frozen; default: --lr)"),
    "init_from": (
        str,
        "start from another run's checkpoint (<run>/checkpoints/step-N) or model folder of the same model, with a "
        "fresh optimizer and schedule (a curriculum stage)",
    ),
    "test_videos": (int, "held-out v3 test questions whose seeds must be disjoint from training's"),
    "dtype": (str, "the language model's dtype: float32, bfloat16, float16"),
    "threads": (int, "torch CPU threads"),
    "workers": (int, "processes generating and decoding the data"),
    "log_every": (int, "steps between log lines"),
    "checkpoint_every": (int, "steps between checkpoints"),
    "eval_every": (int, "steps between val evaluations (0: at the end only)"),
    "seed": (int, "seed of the initialization and the batches"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``namm-transfer video train``."""
    from .train import PRESETS

    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="cpu-small",
        help="cpu-small: 8 frames of 32 px, a 2-layer ViT, 60 steps (minutes on one core); cpu: 32 frames, the same "
        "ViT, 750 steps of 4 (hours on one core; resumable, use --time-budget); device: the shipped "
        "model, 32 frames of 64 px, a 6-layer ViT, 1500 steps of 16 (half captions) in bfloat16 on a GPU; "
        "cpu-v3: benchmark v3 with the language model fine-tuned too (--train-lm full), 360 steps of 4 (measured "
        "19.6 s/step on one thread: about two hours); cpu-v3-lora: the recipe that learns on benchmark v3: vision "
        "pretraining (200 steps of per-frame labels), the tower then frozen, LoRA rank 8 adapters stored unmerged "
        "(--lora-adapters), 700 steps of 4 (about 7 s/step on one thread); device-v3: the same as cpu-v3 on a "
        "GPU, a 6-layer ViT, 16 tokens per frame, 3000 steps of 16 (default: cpu-small)",
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the preset's)")
    parser.add_argument(
        "--benchmark",
        choices=["v2", "v3"],
        default=None,
        help="synthetic benchmark: v2 (64 frames, sampled) or v3 (32 frames read whole, at most a quarter "
        "answer-bearing) (default: the preset's)",
    )
    parser.add_argument(
        "--train-lm",
        choices=list(TRAIN_LM_CHOICES),
        default=None,
        help="none: the language model stays frozen; full: it is fine-tuned whole with --lm-lr; lora: rank "
        "--lora-rank adapters on its attention and MLP projections, merged at the end (its attention architecture "
        "unchanged; its weights are saved with the model either way) (default: the preset's)",
    )
    for name, (kind, text) in _OVERRIDES.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=kind, default=None, help=f"{text} (default: the preset's)")
    parser.add_argument(
        "--lora-adapters",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --train-lm lora: store the LoRA adapters unmerged in the model folder (a few MB, the shippable "
        "form; loading merges them into the base language model) instead of the merged language model "
        "(default: the preset's)",
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute the language model's activations"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="stop after this many seconds of training in this call (a rerun resumes)",
    )
    parser.add_argument("--output", type=Path, default=None, help="run folder (default: runs/video/<preset>)")
    parser.add_argument("--restart", action="store_true", help="ignore existing checkpoints and start afresh")
    parser.add_argument("--ship", metavar="NAME", help="copy the finished model to namm_transfer/weights/video/NAME/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~.train.VideoTrainConfig` of the preset with the options given on the command line."""
    from .train import PRESETS, VideoTrainConfig

    values: dict[str, Any] = dict(PRESETS[args.preset])
    for name in _OVERRIDES:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if args.device is not None:
        values["device"] = args.device
    for name in ("benchmark", "train_lm", "lora_adapters"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if args.gradient_checkpointing:
        values["gradient_checkpointing"] = True
    if args.time_budget is not None:
        values["time_budget_s"] = args.time_budget
    return VideoTrainConfig(preset=args.preset, **values)


def main(args: argparse.Namespace) -> int:
    """Run ``namm-transfer video train``; returns the exit code."""
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        why = f"--preset {args.preset} trains on {cfg.device}, which is not available"
        print(f"error: {why}; pass --device cpu (slow) or use --preset cpu-small", file=sys.stderr)
        return 2
    from namm_transfer.models import ModelNotAvailableError

    from .model import missing_shipped_message  # noqa: F401  (imports the model stack early: clear errors)
    from .train import ship_video_model, train_video_model

    out = args.output or Path("runs") / "video" / args.preset
    try:
        result = train_video_model(cfg, out, resume=not args.restart, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ModelNotAvailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    per = f"{result.seconds_per_step:.2f} s/step" if result.seconds_per_step else "no new steps"
    acc = "" if result.val is None else f", val accuracy {100 * result.val['val_acc']:.1f}%"
    print(f"video model: {result.step} steps ({per}){acc} -> {result.model_dir or result.output}")
    if args.ship:
        if not result.finished:
            print("error: the run has not finished; nothing shipped", file=sys.stderr)
            return 1
        print(f"shipped: {ship_video_model(result.output, args.ship)}")
    return 0


if __name__ == "__main__":  # python -m namm_transfer.evals.video_qa.cli_train ...
    from namm_transfer.evals.args import StrictParser

    _parser = StrictParser(prog="namm-transfer video train", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
