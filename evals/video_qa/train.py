"""Training of the project's video model (:mod:`.model`): the vision tower and projector learn; SmolLM2 stays frozen
(``train_lm="none"``), is fine-tuned whole with its own learning rate (``train_lm="full"``, ``lm_lr``) or through
LoRA adapters merged at the end (``train_lm="lora"``, ``lora_rank``, ``lora_alpha``).

Data: the synthetic benchmark (:mod:`.synthetic`), its ``train`` split for training and its ``val``
split for monitoring (the ``test`` split stays held out for ``namm-transfer eval``), generated on
first use into ``<cache>/video_qa/synthetic-<split>-n<N>-f<frames>-s<size>-seed<seed>/`` (the same
folders the eval uses; ``synthetic3-...`` for ``benchmark="v3"``, whose train, val and held-out test item seeds
are checked to be disjoint), then decoded once, ``frames`` uniformly sampled frames per video (the
eval's ``center`` rule), into ``frames-<F>-center.npy`` next to the annotations.

One step: ``batch_size`` questions drawn with replacement; each question's options are shuffled (a
new correct letter; ``shuffle_options``); the prompt is exactly the eval's (LongVideoBench text in
the model's chat format, video first) followed by the answer letter and the end-of-turn token; the
loss is the cross-entropy of those two tokens only (one forward, the head applied at those
positions). ``acc`` is how often the letter is the argmax over the whole vocabulary (what greedy
decoding would answer), ``acc4`` the argmax over the option letters. AdamW on the vision tower and
projector (``lr``) and, with ``train_lm="full"``, on the language model (``lm_lr``; loaded in float32, run under
autocast when ``dtype`` is lower), linear warmup then cosine decay to 10%, gradient clipping over all of them.

Output folder (``--output``, default ``runs/video/<preset>``)::

    train_log.jsonl          one JSON object per line: start (config, data), steps, evals, end
    training_curve.png       loss and accuracy over steps (matplotlib; skipped without it)
    checkpoints/step-NNNNNNN/  model.safetensors (vision + projector, + language model if trained), optimizer.pt
                             (AdamW state, read back with torch.load(weights_only=True)), trainer_state.json
                             (step, config, scheduler, numpy and torch RNG states)
    model/                   the final model: config.json, model.safetensors, processor_config.json,
                             README.md (card generated from the log)

A run resumes from its newest checkpoint when started again with the same settings (a checkpoint of
other settings is an error); ``time_budget_s`` ends a run early with a checkpoint and a final
model. :func:`ship_video_model` copies ``model/``, the log and the curve to
``namm_transfer/weights/video/<name>/``, where ``namm-transfer eval --target video-llava`` finds it.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from namm_transfer.run_folder import (
    LOG_FILE,
    RunConfig,
    TrainClock,
    TrainState,
    append_log,
    latest_checkpoint,
    log_start,
    read_checkpoint,
    read_log,
    resume_run,
    utc_now,
    write_checkpoint,
)

from .train_data import QuestionBatcher, batch_metrics, evaluate, load_split, shuffle_options

__all__ = [
    "IDENTITY_FIELDS",
    "PRESETS",
    "VideoTrainConfig",
    "VideoTrainResult",
    "latest_checkpoint",
    "load_split",
    "read_log",
    "ship_video_model",
    "train_video_model",
]

logger = logging.getLogger(__name__)

CURVE_FILE = "training_curve.png"
MODEL_DIR = "model"
CARD_FILE = "README.md"


@dataclass
class VideoTrainConfig(RunConfig):
    """Settings of one training run (the defaults are the ``device`` preset's model; see :data:`PRESETS`)."""

    preset: str = "custom"
    # data
    benchmark: str = "v2"
    """Synthetic benchmark version: ``v2`` (:func:`.synthetic.generate_benchmark`) or ``v3``
    (:func:`.synthetic.generate_benchmark_v3`: every frame read, at most a quarter answer-bearing)."""
    test_videos: int = 300
    """Size of the held-out test split whose item seeds a ``v3`` run checks to be disjoint from its own."""
    train_videos: int = 6000
    """Questions (one per video) of the synthetic train split."""
    val_videos: int = 100
    """Questions of the synthetic val split, evaluated every ``eval_every`` steps and at the end."""
    video_frames: int = 64
    """Frames per generated video (the eval's synthetic default is 64)."""
    video_size: int = 64
    """Generated frame size in pixels (the eval's synthetic default is 64)."""
    frames: int = 32
    """Frames sampled per video for the model (uniform, segment centres, as the eval)."""
    data_seed: int = 0
    shuffle_options: bool = True
    caption_share: float = 0.0
    """Share of training items turned into the caption task (every shape in order, LLaVA-style feature
    alignment; the val split is always the questions)."""
    # model
    vision_model: str = "vit_tiny_patch16_224"
    image_size: int = 64
    patch_size: int = 8
    vision_embed_dim: int = 192
    vision_depth: int = 6
    vision_heads: int = 3
    tokens_per_frame: int = 16
    text_model: str = "smollm2-135m"
    video_token_id: int = 16
    train_lm: str = "none"
    """``none``: the language model stays frozen; ``full``: it is fine-tuned whole; ``lora``: low-rank adapters on its
    attention and MLP projections, merged into them at the end (its attention architecture unchanged either way)."""
    lora_rank: int = 8
    lora_alpha: float = 16.0
    """LoRA rank and scale numerator (the update is ``alpha / rank * B A``), for ``train_lm="lora"``."""
    lora_adapters: bool = False
    """With ``train_lm="lora"``: the model folder stores the adapters unmerged (a few MB, the shippable form; loading
    merges them into ``text_model``'s weights) instead of the merged language model."""
    vision_pretrain_steps: int = 0
    """Steps of the vision pretraining stage (:mod:`.vision_pretrain`, benchmark v3 only) run before the first
    step: the vision tower learns per-frame labels (shape present, its colour and shape) of the train split,
    ``vision_pretrain_batch`` frames a step at ``vision_pretrain_lr``; 0: none (a random ViT)."""
    vision_pretrain_batch: int = 128
    vision_pretrain_lr: float = 1e-3
    vision_lr: float | None = None
    """The vision tower's learning rate in the language stage (None: ``lr``, as the projector; 0: frozen)."""
    init_from: str | None = None
    """A checkpoint folder (``<run>/checkpoints/step-N``) or model folder of a run of the same model whose trained
    tensors (vision tower, projector, language model or its adapters) start this run, with a fresh optimizer and
    schedule: a curriculum stage (e.g. captions first, then mostly questions)."""
    # optimization
    steps: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    lm_lr: float = 5e-5
    """The language model's (or its adapters') AdamW learning rate (same warmup and cosine)."""
    weight_decay: float = 0.05
    warmup: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    # machine (not part of a run's identity)
    device: str = "cpu"
    dtype: str = "float32"
    """The language model's dtype (a trained one keeps float32 weights and runs under autocast in this dtype); with
    bfloat16 the vision part runs under autocast."""
    gradient_checkpointing: bool = False
    threads: int | None = None
    workers: int = 1
    """Processes that generate and decode the data."""
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0
    """Steps between val evaluations (0: at the end only)."""
    time_budget_s: float | None = None
    """Stop after the step that passes this many seconds of training in this call (then checkpoint and write the
    model so far); a resumed call gets the budget afresh, so a long run can be trained in pieces."""

    def __post_init__(self) -> None:
        for name in ("train_videos", "val_videos", "video_frames", "frames", "steps", "batch_size", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.warmup < 0 or self.eval_every < 0:
            raise ValueError("checkpoint_every and keep_checkpoints must be >= 1, warmup and eval_every >= 0")
        if not 0.0 <= self.caption_share <= 1.0:
            raise ValueError(f"caption_share must be in [0, 1], got {self.caption_share}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be > 0")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.frames > self.video_frames:
            raise ValueError(f"frames {self.frames} exceeds the video's {self.video_frames} frames")
        from .model import TRAIN_LM_MODES

        if self.train_lm not in TRAIN_LM_MODES:
            raise ValueError(f"train_lm must be one of {', '.join(TRAIN_LM_MODES)}, got {self.train_lm!r}")
        if self.lm_lr <= 0 or self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError(
                f"lm_lr and lora_alpha must be > 0 and lora_rank >= 1, got {self.lm_lr}, {self.lora_alpha}, "
                f"{self.lora_rank}"
            )
        if self.vision_pretrain_steps < 0 or self.vision_pretrain_batch < 2 or self.vision_pretrain_lr <= 0:
            raise ValueError(
                "vision_pretrain_steps must be >= 0, vision_pretrain_batch >= 2 and vision_pretrain_lr > 0, got "
                f"{self.vision_pretrain_steps}, {self.vision_pretrain_batch}, {self.vision_pretrain_lr}"
            )
        if self.vision_lr is not None and self.vision_lr < 0:
            raise ValueError(f"vision_lr must be >= 0 (0: frozen), got {self.vision_lr}")
        if self.lora_adapters and self.train_lm != "lora":
            raise ValueError(f"lora_adapters needs train_lm='lora', got {self.train_lm!r}")
        if self.vision_pretrain_steps and self.init_from:
            raise ValueError("init_from loads a trained vision tower: set vision_pretrain_steps=0 with it")
        if self.vision_pretrain_steps and self.benchmark != "v3":
            raise ValueError("vision pretraining needs benchmark v3 (every frame read); set vision_pretrain_steps=0")
        if self.benchmark not in ("v2", "v3"):
            raise ValueError(f"benchmark must be v2 or v3, got {self.benchmark!r}")
        if self.benchmark == "v3" and (self.video_frames < 32 or self.frames != self.video_frames):
            raise ValueError(
                f"benchmark v3 has >= 32 frames per video and the model reads all of them: set frames = video_frames "
                f"(got frames {self.frames}, video_frames {self.video_frames})"
            )

    def model_config(self, text_config: Any) -> Any:
        from .model import NammVideoLlavaConfig

        return NammVideoLlavaConfig(
            vision_model=self.vision_model,
            image_size=self.image_size,
            patch_size=self.patch_size,
            vision_embed_dim=self.vision_embed_dim,
            vision_depth=self.vision_depth,
            vision_heads=self.vision_heads,
            tokens_per_frame=self.tokens_per_frame,
            text_config=text_config.to_dict(),
            text_model=self.text_model,
            video_token_id=self.video_token_id,
            train_lm=self.train_lm,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_adapters=self.lora_adapters,
        )


SECONDS_PER_STEP_CPU_V3 = 19.6
"""Measured: the mean of steps 3-6 (17.4, 18.8, 21.5, 20.6 s) of ``OMP_NUM_THREADS=1 namm-transfer video train
--preset cpu-v3 --threads 1 --train-videos 40 --val-videos 8 --steps 6 --log-every 1 --eval-every 0`` on the real
SmolLM2-135M (full fine-tuning, 4 questions of 32 frames x 4 tokens, half captions), one thread of this project's
shared 2-core machine (load about 2-3)."""
STEPS_CPU_V3 = 360
"""Steps of the ``cpu-v3`` preset: two hours (7,200 s) at the one-thread rate above; the preset runs 2 threads,
which should only shorten it (the 2-thread rate was not measured)."""

_V3: dict[str, Any] = dict(
    benchmark="v3",
    train_lm="full",
    video_frames=32,
    video_size=32,
    frames=32,
    image_size=32,
    patch_size=8,
    vision_heads=3,
    caption_share=0.5,
    lr=1e-3,
)
"""What every v3 preset sets: benchmark v3's 32 frames of 32 pixels, all read, half of the items captions, the
language model trained too."""

_CPU_V3: dict[str, Any] = dict(
    **_V3,
    train_videos=3000,
    val_videos=100,
    vision_embed_dim=96,
    vision_depth=2,
    tokens_per_frame=4,
    steps=STEPS_CPU_V3,
    batch_size=4,
    lm_lr=1e-4,
    warmup=20,
    log_every=5,
    checkpoint_every=20,
    eval_every=120,
    device="cpu",
    dtype="float32",
    threads=2,
)
"""The ``cpu-v3`` preset, which ``cpu-v3-lora`` changes in a few settings."""

PRESETS: dict[str, dict[str, Any]] = {
    "cpu-small": dict(
        train_videos=200,
        val_videos=20,
        video_frames=16,
        video_size=32,
        frames=8,
        image_size=32,
        patch_size=8,
        vision_embed_dim=96,
        vision_depth=2,
        vision_heads=3,
        tokens_per_frame=16,
        steps=60,
        batch_size=2,
        lr=1e-3,
        warmup=10,
        log_every=5,
        checkpoint_every=20,
        eval_every=0,
        device="cpu",
        dtype="float32",
        threads=1,
    ),
    "cpu": dict(
        train_videos=2000,
        val_videos=50,
        frames=32,
        image_size=32,
        patch_size=8,
        vision_embed_dim=96,
        vision_depth=2,
        vision_heads=3,
        tokens_per_frame=16,
        steps=750,
        batch_size=4,
        lr=1e-3,
        warmup=25,
        log_every=5,
        checkpoint_every=10,
        eval_every=150,
        device="cpu",
        dtype="float32",
        threads=1,
    ),
    "device": dict(
        caption_share=0.5, checkpoint_every=250, eval_every=250, device="cuda", dtype="bfloat16", workers=16
    ),
    "cpu-v3": _CPU_V3,
    "cpu-v3-lora": {
        **_CPU_V3,
        **dict(
            train_lm="lora",
            lora_rank=8,
            lora_alpha=16.0,
            lora_adapters=True,
            vision_pretrain_steps=200,
            vision_pretrain_batch=128,
            vision_pretrain_lr=1e-3,
            vision_lr=0.0,
            steps=700,
            lm_lr=5e-4,
            eval_every=100,
            threads=1,
        ),
    },
    "device-v3": dict(
        **_V3,
        train_videos=20000,
        val_videos=300,
        vision_embed_dim=192,
        vision_depth=6,
        tokens_per_frame=16,
        steps=3000,
        batch_size=16,
        lm_lr=5e-5,
        warmup=100,
        log_every=10,
        checkpoint_every=250,
        eval_every=250,
        device="cuda",
        dtype="bfloat16",
        workers=16,
    ),
}
"""What each preset changes in the :class:`VideoTrainConfig` defaults. ``cpu-small``: 8 frames of 32 pixels, a
2-layer ViT, 60 steps of 2 questions (minutes on one core: a smoke run); ``cpu``: the same small ViT on 32 of
the 64 frames of the eval's 64-pixel videos (downscaled to 32 pixels, 16 tokens per frame), 750 steps of 4
questions in float32 on one core (about 30 s a step here, so several resumed sessions: train it with
``--time-budget`` and rerun; bfloat16 is many times slower on CPUs without native support); ``device``: the
shipped model, the defaults (32 frames of 64 pixels, a 6-layer ViT of width 192, 1,500 steps of 16 questions)
in bfloat16 on a GPU, half of the items as the caption task (without it, 544 device steps stayed at chance).

``cpu-v3`` and ``device-v3`` train on benchmark v3 (32 frames of 32 px, all read) and fine-tune the language model
too (``train_lm="full"``; the frozen SmolLM2-135M could not answer even from a text description of the events):
``cpu-v3``: a 2-layer ViT of width 96, 4 tokens per frame, :data:`STEPS_CPU_V3` steps of 4 questions (half
captions), language model at lr 1e-4, in float32 on 2 threads, sized to about two hours from
:data:`SECONDS_PER_STEP_CPU_V3`; ``device-v3``: a 6-layer ViT of width 192, 16 tokens per frame, 3,000 steps of 16
questions (half captions), language model at lr 5e-5 with float32 master weights under bfloat16 autocast, on a GPU
(not run yet).

``cpu-v3-lora``: ``cpu-v3``'s model with the recipe measured to make the language model read the video (see
docs/training.md): the vision pretraining stage first (:mod:`.vision_pretrain`, 200 steps of 128 frames, seconds),
the tower then frozen (``vision_lr=0``), LoRA rank 8 on every projection at lr 5e-4 (the projector at 1e-3), the
adapters stored unmerged (``lora_adapters``: a folder of about 12 MB instead of the whole language model), 700 steps
of 4 (half captions) on one thread."""

IDENTITY_FIELDS = (
    "benchmark",
    "train_lm",
    "lm_lr",
    "lora_rank",
    "lora_alpha",
    "lora_adapters",
    "vision_pretrain_steps",
    "vision_pretrain_batch",
    "vision_pretrain_lr",
    "vision_lr",
    "init_from",
    "train_videos",
    "video_frames",
    "video_size",
    "frames",
    "data_seed",
    "shuffle_options",
    "caption_share",
    "vision_model",
    "image_size",
    "patch_size",
    "vision_embed_dim",
    "vision_depth",
    "vision_heads",
    "tokens_per_frame",
    "text_model",
    "video_token_id",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup",
    "grad_clip",
    "seed",
    "dtype",
)
"""A checkpoint is resumed only by a run that agrees on these (``steps`` may grow)."""


@dataclass
class VideoTrainResult:
    """What :func:`train_video_model` did."""

    output: Path
    step: int
    finished: bool
    """False when stopped by ``stop_at`` (the folder then holds a checkpoint to resume from)."""
    losses: list[float]
    """Loss of every step run in this call."""
    val: dict[str, Any] | None = None
    model_dir: Path | None = None
    seconds_per_step: float | None = None
    resumed_from: int | None = None
    model: Any = None
    """The trained model in memory (as saved in ``model_dir`` when finished)."""


# ----------------------------------------------------------------------------------------------------------------
# one step
def _nanmean(values: list[float]) -> float | None:
    """Mean over the steps that had questions (caption-only steps give NaN); None when none had."""
    real = [v for v in values if not math.isnan(v)]
    return float(np.mean(real)) if real else None


def _autocast_factory(cfg: VideoTrainConfig, device: Any) -> Callable[[], Any]:
    import contextlib

    import torch

    if cfg.dtype == "float32":
        return contextlib.nullcontext
    dt = getattr(torch, cfg.dtype)
    return lambda: torch.autocast(device_type=device.type, dtype=dt)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
def _b64(t: Any) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> Any:
    import torch

    return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())


def _save_checkpoint(output: Path, step: int, st: TrainState, cfg: VideoTrainConfig, train_seconds: float) -> Path:
    import torch
    from safetensors.torch import save_file

    def write(folder: Path) -> dict[str, Any]:
        weights = {k: v.detach().cpu().contiguous().clone() for k, v in st.model.trainable_state_dict().items()}
        save_file(weights, str(folder / "model.safetensors"))
        torch.save(st.optimizer.state_dict(), folder / "optimizer.pt")
        return {
            "format": "namm-transfer-video-checkpoint/1",
            "step": step,
            "config": cfg.to_dict(),
            "scheduler": st.scheduler.state_dict(),
            "numpy_rng": st.rng.bit_generator.state,
            "torch_rng": _b64(torch.get_rng_state()),
            "cuda_rng": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "train_seconds": train_seconds,
        }

    return write_checkpoint(output, step, cfg.keep_checkpoints, write)


def _load_checkpoint(path: Path, st: TrainState, cfg: VideoTrainConfig) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    state = read_checkpoint(path, cfg, IDENTITY_FIELDS, "--restart")
    dev = next(st.model.model.multi_modal_projector.parameters()).device
    weights = load_file(str(path / "model.safetensors"), device=str(dev))
    missing = set(st.model.trainable_state_dict()) ^ set(weights)
    if missing:
        raise ValueError(f"checkpoint {path} does not fit the model: {sorted(missing)[:5]}")
    st.model.load_state_dict(weights, strict=False)
    st.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=dev, weights_only=True))
    st.scheduler.load_state_dict(state["scheduler"])
    st.rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(_unb64(state["torch_rng"]))
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda_rng"]])
    return state


def _init_from(model: Any, folder: Path) -> None:
    """Load the trained tensors of another run's checkpoint or model folder (the same keys as this model's)."""
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"init_from {folder}: no model.safetensors (give a checkpoint or model folder)")
    dev = next(model.model.multi_modal_projector.parameters()).device
    weights = load_file(str(path), device=str(dev))
    want = set(model.trainable_state_dict())
    if set(weights) != want:
        diff = sorted(set(weights) ^ want)
        raise ValueError(
            f"init_from {folder} does not fit this model (same model dimensions and --train-lm needed; a LoRA run "
            f"starts from another's checkpoint, whose adapters are unmerged): {diff[:5]}"
        )
    model.load_state_dict(weights, strict=False)


def _keep_on_resume(entry: Mapping[str, Any]) -> bool:
    """Log entries of the end of a run (final eval, time budget, end) go when it resumes (``steps`` may grow)."""
    return entry.get("event") not in ("end", "time_budget") and not entry.get("final")


# ----------------------------------------------------------------------------------------------------------------
# training
def _lr_lambda(cfg: VideoTrainConfig) -> Callable[[int], float]:
    def f(s: int) -> float:
        if s < cfg.warmup:
            return (s + 1) / max(1, cfg.warmup)
        frac = min(1.0, (s - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def _text_model_source(name: str) -> dict[str, Any] | None:
    try:
        from namm_transfer.models import SOURCE_RECORD, model_dir

        rec = model_dir(name) / SOURCE_RECORD
        return dict(json.loads(rec.read_text(encoding="utf-8"))) if rec.is_file() else None
    except (ValueError, KeyError, OSError):
        return None


def train_video_model(
    config: VideoTrainConfig,
    output: str | os.PathLike[str],
    *,
    resume: bool = True,
    stop_at: int | None = None,
    language_model: Any = None,
    tokenizer: Any = None,
    data_folders: Mapping[str, str | os.PathLike[str]] | None = None,
    progress: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> VideoTrainResult:
    """Train the vision tower and projector of a video model around a language model (trained too per ``train_lm``).

    Args:
        config: the run's settings.
        output: the run folder (see the module docstring); resumed when it holds a checkpoint of the
            same run and ``resume`` is true (else its checkpoints and log are removed).
        stop_at: stop once this step is reached, leaving a checkpoint and no final model.
        language_model, tokenizer: the causal LM (trained in place unless ``train_lm="none"``) and its tokenizer
            (default: ``config.text_model`` through :func:`namm_transfer.models.load_model` on ``config.device`` in
            ``config.dtype``, float32 when trained).
        data_folders: ``{"train": folder, "val": folder}`` instead of the cache folders.
        on_step: called as ``on_step(step, loss)`` after every step.

    Returns:
        A :class:`VideoTrainResult`; when finished, ``output/model`` holds the model and its card.
    """
    import torch

    from .model import NammVideoLlavaForConditionalGeneration, add_lora, merge_lora
    from .processor import NammVideoLlavaProcessor

    cfg = config
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = torch.device(cfg.device)
    folders = dict(data_folders or {})
    train_s, train_f = load_split(
        "train",
        cfg.train_videos,
        cfg.video_frames,
        cfg.video_size,
        cfg.frames,
        cfg.data_seed,
        folder=folders.get("train"),
        workers=cfg.workers,
        benchmark=cfg.benchmark,
    )
    val_s, val_f = load_split(
        "val",
        cfg.val_videos,
        cfg.video_frames,
        cfg.video_size,
        cfg.frames,
        cfg.data_seed,
        folder=folders.get("val"),
        workers=cfg.workers,
        benchmark=cfg.benchmark,
    )
    if cfg.benchmark == "v3":
        _check_v3_seeds(train_s, val_s, cfg)

    train_lm = cfg.train_lm != "none"
    if language_model is None or tokenizer is None:
        from namm_transfer.models import load_model

        # a trained language model keeps float32 master weights (autocast runs it in cfg.dtype)
        lm, tok = load_model(cfg.text_model, device=device, dtype="float32" if train_lm else cfg.dtype)
        language_model = language_model if language_model is not None else lm
        tokenizer = tokenizer if tokenizer is not None else tok
    language_model.requires_grad_(cfg.train_lm == "full")
    language_model.eval()  # no dropout either way; its gradients flow when train_lm
    torch.manual_seed(cfg.seed)
    mcfg = cfg.model_config(language_model.config)
    model = NammVideoLlavaForConditionalGeneration(mcfg, language_model)
    if cfg.train_lm == "lora":
        add_lora(language_model, cfg.lora_rank, cfg.lora_alpha)
    model.model.vision_tower.to(device=device, dtype=torch.float32)
    model.model.multi_modal_projector.to(device=device, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        language_model.gradient_checkpointing_enable()
    processor = NammVideoLlavaProcessor.from_config(mcfg, tokenizer)
    batcher = QuestionBatcher(model, processor)
    if cfg.vision_lr == 0:
        model.model.vision_tower.requires_grad_(False)
    params = [p for p in model.trainable_parameters() if p.requires_grad]
    lm_params = model.language_model_parameters() if train_lm else []
    vision_ids = {id(p) for p in model.model.vision_tower.parameters()}
    vision_own = cfg.vision_lr is not None and cfg.vision_lr > 0 and cfg.vision_lr != cfg.lr
    own = {id(p) for p in lm_params} | (vision_ids if vision_own else set())
    groups = [{"params": [p for p in params if id(p) not in own], "lr": cfg.lr}]
    if lm_params:
        groups.append({"params": lm_params, "lr": cfg.lm_lr})
    if vision_own:
        groups.append({"params": [p for p in params if id(p) in vision_ids], "lr": cfg.vision_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    rng = np.random.default_rng(cfg.seed)
    autocast = _autocast_factory(cfg, device)

    if not resume:
        shutil.rmtree(out / MODEL_DIR, ignore_errors=True)
    st = TrainState(model, opt, sched, rng)
    step, elapsed = resume_run(out, lambda ckpt: _load_checkpoint(ckpt, st, cfg), resume, _keep_on_resume)
    resumed_from = step or None
    if step == 0:
        log_start(
            log_path,
            {
                "time": utc_now(),
                "config": cfg.to_dict(),
                "model_config": {k: v for k, v in mcfg.to_dict().items() if k != "text_config"},
                "trainable_parameters": sum(p.numel() for p in params),
                "train_lm": cfg.train_lm,
                "language_model_parameters_trained": sum(p.numel() for p in lm_params),
                "text_model_source": _text_model_source(cfg.text_model),
                "data": {
                    "train": {
                        "n": len(train_s),
                        "first": train_s[0].id,
                        "annotations": str(train_s[0].video_path.parent.parent),
                    },
                    "val": {"n": len(val_s), "first": val_s[0].id},
                },
                "prompt_template": batcher.template,
                "versions": _versions(),
            },
        )
        if cfg.init_from:
            _init_from(model, Path(cfg.init_from))
            append_log(log_path, {"step": 0, "event": "init_from", "folder": str(cfg.init_from)})
        if cfg.vision_pretrain_steps:
            from .vision_pretrain import pretrain_vision

            pre = pretrain_vision(
                model,
                processor,
                train_s,
                train_f,
                val_s,
                val_f,
                steps=cfg.vision_pretrain_steps,
                batch_frames=cfg.vision_pretrain_batch,
                lr=cfg.vision_pretrain_lr,
                weight_decay=cfg.weight_decay,
                seed=cfg.seed,
            )
            append_log(log_path, {"step": 0, "event": "vision_pretrain", **pre.to_dict()})

    target = cfg.steps if stop_at is None else min(cfg.steps, int(stop_at))
    losses: list[float] = []
    window: dict[str, list[float]] = {"loss": [], "acc": [], "acc4": [], "tokens": []}
    val: dict[str, Any] | None = None
    budget_hit = False
    bar = None
    if progress and step < target:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="video train", unit="step", dynamic_ncols=True)
    model.train()
    language_model.eval()
    clock = TrainClock(elapsed)
    budget_start = elapsed
    t_window = elapsed
    try:
        while step < target:
            idx = rng.integers(0, len(train_s), size=cfg.batch_size)
            batch_samples = [shuffle_options(train_s[i], rng) if cfg.shuffle_options else train_s[i] for i in idx]
            captions = (rng.random(len(idx)) < cfg.caption_share).tolist() if cfg.caption_share > 0 else None
            batch = batcher.batch(batch_samples, [train_f[i] for i in idx], captions)
            lr = float(opt.param_groups[0]["lr"])
            lm_lr = float(opt.param_groups[1]["lr"]) if len(opt.param_groups) > 1 else None
            m = batch_metrics(model, batch, batcher.letter_ids, autocast)
            opt.zero_grad(set_to_none=True)
            m["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            value = float(m["loss"].detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"the training loss became {value} at step {step}; lower the learning rate")
            losses.append(value)
            for k in window:
                window[k].append(value if k == "loss" else float(m[k]))
            if on_step is not None:
                on_step(step, value)
            if bar is not None:
                bar.update(1)
            elapsed = clock.tick()
            budget_hit = cfg.time_budget_s is not None and elapsed - budget_start >= cfg.time_budget_s and step < target
            if step % cfg.log_every == 0 or step == target or budget_hit:
                span = max(elapsed - t_window, 1e-9)
                entry = {
                    "step": step,
                    "loss": float(np.mean(window["loss"])),
                    "acc": _nanmean(window["acc"]),
                    "acc4": _nanmean(window["acc4"]),
                    "lr": lr,
                    **({"lm_lr": lm_lr} if lm_lr is not None else {}),
                    "seconds": round(elapsed, 2),
                    "seconds_per_step": round(span / len(window["loss"]), 4),
                    "tokens_per_s": round(sum(window["tokens"]) / span, 1),
                }
                append_log(log_path, entry)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{entry['loss']:.3f}", acc="-" if entry["acc"] is None else f"{entry['acc']:.2f}"
                    )
                window = {k: [] for k in window}
                t_window = elapsed
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and not budget_hit:
                val = evaluate(model, batcher, val_s, val_f, cfg.batch_size, autocast, cfg.caption_share > 0)
                append_log(log_path, {"step": step, "event": "eval", **val})
                logger.info("step %d: val accuracy %.3f", step, val["val_acc"])
                if "val_caption_loss" in val:
                    logger.info(
                        "step %d: val caption loss %.4f with the video's frames, %.4f with another video's",
                        step,
                        val["val_caption_loss"],
                        val["val_caption_loss_shuffled"],
                    )
                clock.skip()
            if step % cfg.checkpoint_every == 0 or step == target or budget_hit:
                _save_checkpoint(out, step, st, cfg, elapsed)
                clock.skip()
            if budget_hit:
                append_log(log_path, {"step": step, "event": "time_budget", "seconds": round(elapsed, 1)})
                logger.warning("time budget of %.0f s reached at step %d", cfg.time_budget_s, step)
                break
    finally:
        if bar is not None:
            bar.close()

    sps = elapsed / step if step else None
    if step < cfg.steps and not budget_hit:
        return VideoTrainResult(out, step, False, losses, val, None, sps, resumed_from, model)

    model.eval()
    val = evaluate(model, batcher, val_s, val_f, cfg.batch_size, autocast, cfg.caption_share > 0)
    append_log(log_path, {"step": step, "event": "eval", "final": True, **val})
    if cfg.train_lm == "lora" and not cfg.lora_adapters:
        merge_lora(language_model)  # the folder stores a plain language model
    model_dir = model.save_pretrained(out / MODEL_DIR, processor=processor)
    append_log(log_path, {"step": step, "event": "end", "time": utc_now(), "seconds": round(elapsed, 1)})
    from .train_card import write_card, write_curve

    write_curve(log_path, out / CURVE_FILE)
    write_card(model_dir, log_path)
    logger.info("trained %d steps -> %s (val accuracy %.3f)", step, model_dir, val["val_acc"])
    return VideoTrainResult(out, step, True, losses, val, model_dir, sps, resumed_from, model)


def _check_v3_seeds(train_s: list[Any], val_s: list[Any], cfg: VideoTrainConfig) -> None:
    """``ValueError`` unless the v3 train split's item seeds are disjoint from the val split's and from those of the
    held-out test split (``cfg.test_videos`` items of seed ``cfg.data_seed``)."""
    from .synthetic import check_disjoint_seeds, v3_split_seeds

    def seeds(samples: list[Any], split: str) -> list[int]:
        out = [s.extra.get("item_seed") for s in samples]
        if any(v is None for v in out):
            raise ValueError(f"the {split} split has no item_seed: it is not benchmark v3 (regenerate it)")
        return [int(v) for v in out]

    train = seeds(train_s, "train")
    check_disjoint_seeds(train, seeds(val_s, "val"), "train and val")
    check_disjoint_seeds(train, v3_split_seeds("test", cfg.test_videos, cfg.data_seed), "train and held-out test")


def _versions() -> dict[str, Any]:
    from namm_transfer.results import collect_versions

    out = dict(collect_versions())
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


# ----------------------------------------------------------------------------------------------------------------
# shipping
SHIP_FILES = ("config.json", "model.safetensors", "processor_config.json")


def ship_video_model(run_dir: str | os.PathLike[str], name: str) -> Path:
    """Copy a finished run's model, log and curve to ``namm_transfer/weights/video/<name>/``; write its card there."""
    from .model import shipped_video_dir
    from .train_card import write_card

    run = Path(run_dir)
    src = run / MODEL_DIR
    missing = [f for f in SHIP_FILES if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{src} lacks {', '.join(missing)}: the run has not finished (train it to the end first)"
        )
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"--ship name {name!r}: use letters, digits, '.', '_' and '-'")
    dest = shipped_video_dir() / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in SHIP_FILES:
        shutil.copy2(src / f, dest / f)
    shutil.copy2(run / LOG_FILE, dest / LOG_FILE)
    if (run / CURVE_FILE).is_file():
        shutil.copy2(run / CURVE_FILE, dest / CURVE_FILE)
    write_card(dest, dest / LOG_FILE, name=name)
    logger.info("shipped %s -> %s", src, dest)
    return dest
