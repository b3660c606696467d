"""Card and curve of a video-model training run, generated from its ``train_log.jsonl`` (no number typed by hand)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from namm_transfer.results import atomic_write_text
from namm_transfer.run_folder import fmt_number, markdown_table, read_log

__all__ = ["write_card", "write_curve"]

_TEXT_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct, loaded through the offline route; "}


def write_curve(log_path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path | None:
    """Training loss, training and val accuracy over steps as a PNG; None without matplotlib or log entries."""
    rows = read_log(log_path)
    steps = [r for r in rows if "loss" in r and "event" not in r]
    if not steps:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    evals = [r for r in rows if r.get("event") == "eval"]
    start = next((r for r in rows if r.get("event") == "start"), {})
    cfg = start.get("config") or {}
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(
        f"video train --preset {cfg.get('preset', '?')}: benchmark {cfg.get('benchmark', 'v2')}, "
        f"train_lm {cfg.get('train_lm', 'none')}",
        fontsize=10,
    )
    ax = fig.subplots(1, 2)
    x = [r["step"] for r in steps]
    ax[0].plot(x, [r["loss"] for r in steps], label="train (mean since last log)")
    if evals:
        ax[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("answer cross-entropy")
    ax[0].legend()
    ax[1].plot(x, [float("nan") if r["acc"] is None else 100 * r["acc"] for r in steps], label="train (greedy letter)")
    if evals:
        ax[1].plot([r["step"] for r in evals], [100 * r["val_acc"] for r in evals], "o-", label="val (greedy letter)")
    ax[1].axhline(25, color="grey", lw=0.8, ls="--", label="chance (4 options)")
    ax[1].set_xlabel("step")
    ax[1].set_ylabel("accuracy %")
    ax[1].set_ylim(0, 100)
    ax[1].legend()
    path = Path(out)
    fig.savefig(path, dpi=100)
    return path


def _lm_stored(train_lm: str, adapters: bool) -> str:
    if adapters:
        return "its LoRA adapters stored here"
    return "its fine-tuned weights stored here" if train_lm != "none" else "frozen, not stored here"


def write_card(folder: str | os.PathLike[str], log_path: str | os.PathLike[str], name: str | None = None) -> Path:
    """Write ``README.md`` into a model folder from its config.json and the run's log."""
    folder = Path(folder)
    rows = read_log(log_path)
    start = next((r for r in rows if r.get("event") == "start"), {})
    end: dict[str, Any] = next((r for r in reversed(rows) if r.get("event") == "end"), {})
    steps = [r for r in rows if "loss" in r and "event" not in r]
    evals = [r for r in rows if r.get("event") == "eval"]
    final = next((r for r in reversed(evals) if r.get("final")), evals[-1] if evals else {})
    cfg = start.get("config") or {}
    mcfg = (
        json.loads((folder / "config.json").read_text(encoding="utf-8")) if (folder / "config.json").is_file() else {}
    )
    src = start.get("text_model_source") or {}
    budget = next((r for r in rows if r.get("event") == "time_budget"), None)
    size_mb = (
        (folder / "model.safetensors").stat().st_size / 2**20 if (folder / "model.safetensors").is_file() else None
    )
    title = name or folder.name
    train_lm = str(cfg.get("train_lm") or "none")
    adapters = train_lm == "lora" and bool(cfg.get("lora_adapters"))
    lora = (
        f", rank {cfg.get('lora_rank')} alpha {cfg.get('lora_alpha')} adapters "
        f"{'stored unmerged, merged into the base weights at load' if adapters else 'merged'}"
        if train_lm == "lora"
        else ""
    )
    lm_state = (
        f"language model fine-tuned (`--train-lm {train_lm}`{lora}, AdamW lr {cfg.get('lm_lr')})"
        if train_lm != "none"
        else "language model frozen (`--train-lm none`)"
    )
    lines = [
        f"# Video model: {title}",
        "",
        f"A small video-LLaVA-style model trained by `namm-transfer video train --preset {cfg.get('preset', '?')}`: "
        f"a timm `{mcfg.get('vision_model', '?')}` Vision Transformer made small (frames of "
        f"{mcfg.get('image_size')} px in {mcfg.get('patch_size')}-px patches, width {mcfg.get('vision_embed_dim')}, "
        f"{mcfg.get('vision_depth')} layers, {mcfg.get('vision_heads')} heads, trained from scratch) and a two-layer "
        f"GELU projector turn every frame into {mcfg.get('tokens_per_frame')} tokens, spliced into the prompt of "
        f"`{mcfg.get('text_model')}` ({_TEXT_MODELS.get(str(mcfg.get('text_model')), '')}"
        f"{_lm_stored(train_lm, adapters)}), "
        "video first and question after it.",
        "",
        (
            "This folder holds the vision tower, the projector and the language model's LoRA adapters "
            if adapters
            else "This folder holds the vision tower, the projector and the fine-tuned language model "
            if train_lm != "none"
            else "This folder holds only the vision tower and projector "
        )
        + f"({start.get('trainable_parameters', '?')} parameters, "
        f"{fmt_number(size_mb, 1)} MB): `config.json`, `model.safetensors`, `processor_config.json`.",
        "",
        "## Data",
        f"- synthetic benchmark {cfg.get('benchmark', 'v2')} (`namm_transfer.evals.video_qa.synthetic`), train split: "
        f"{cfg.get('train_videos')} "
        f"videos of {cfg.get('video_frames')} frames at {cfg.get('video_size')} px (seed {cfg.get('data_seed')}); "
        f"{cfg.get('frames')} frames sampled per video (segment centres, as the eval)",
        f"- options shuffled per draw: {cfg.get('shuffle_options')}; val split: {cfg.get('val_videos')} videos; the "
        "test split stays held out for `namm-transfer eval --target video-llava`",
        f"- prompt: `{json.dumps(start.get('prompt_template', '?'))}` with the LongVideoBench question text, "
        "followed by the answer letter and the end-of-turn token (the only labelled tokens)",
    ]
    if src:
        pkgs = ", ".join(f"{p.get('package')}=={p.get('version')}" for p in src.get("packages") or [])
        lines.append(
            f"- language model source: `{src.get('gguf_file', '?')}` from {pkgs or '?'} "
            f"(sha256 `{str(src.get('gguf_sha256', '?'))[:16]}...`), {src.get('upstream', '')}"
        )
    lines += [
        "",
        "## Training",
        f"- {steps[-1]['step'] if steps else 0} steps of {cfg.get('batch_size')} questions, AdamW lr {cfg.get('lr')} "
        f"(warmup {cfg.get('warmup')}, cosine to 10%), weight decay {cfg.get('weight_decay')}, grad clip "
        f"{cfg.get('grad_clip')}, seed {cfg.get('seed')}, language model in {cfg.get('dtype')} on {cfg.get('device')}",
        f"- {lm_state}",
        f"- caption task (every shape in order, LLaVA-style feature alignment) for "
        f"{fmt_number(100 * float(cfg.get('caption_share') or 0.0), 0)}% of the training items",
        f"- {fmt_number(end.get('seconds'), 0)} s of training; "
        f"{fmt_number(steps[-1].get('seconds_per_step') if steps else None, 3)} s per step, "
        f"{fmt_number(steps[-1].get('tokens_per_s') if steps else None, 0)} tokens/s at the end",
    ]
    pre = next((r for r in rows if r.get("event") == "vision_pretrain"), None)
    if pre:
        held = pre.get("held_out") or {}
        lines.append(
            f"- vision pretraining first: {pre.get('steps')} steps of {cfg.get('vision_pretrain_batch')} frames "
            f"(per-frame labels of the train split: shape present, its colour, its shape), {pre.get('seconds')} s; "
            f"held-out per-frame accuracy {fmt_number(100 * float(held.get('present', 0)), 1)}% present, "
            f"{fmt_number(100 * float(held.get('colour', 0)), 1)}% colour, "
            f"{fmt_number(100 * float(held.get('shape', 0)), 1)}% shape ({held.get('frames')} val frames); the "
            f"tower then {'stayed frozen' if cfg.get('vision_lr') == 0 else 'trained on'}"
        )
    if budget:
        lines.append(f"- stopped by the time budget at step {budget['step']} (of {cfg.get('steps')} planned)")
    lines += [
        "",
        "## Results (teacher-forced answer letter)",
        "",
        f"Final val accuracy: **{fmt_number(100 * float(final['val_acc']) if final else None, 1)}%** greedy letter "
        f"over the whole vocabulary ({fmt_number(100 * float(final['val_acc4']) if final else None, 1)}% among the "
        f"option letters), {final.get('val_n', '?')} questions, chance 25%.",
    ]
    if final and "val_caption_loss" in final:
        lines += [
            "",
            f"Caption loss on the val videos: {fmt_number(final['val_caption_loss'], 4)} with each video's own "
            f"frames, {fmt_number(final['val_caption_loss_shuffled'], 4)} with the next video's frames (equal values: "
            "the model does not use the video yet).",
        ]
    if evals:
        lines += markdown_table(
            ["step", "val loss", "val acc %", "val acc (letters) %"],
            [
                [
                    r["step"],
                    fmt_number(r.get("val_loss"), 3),
                    fmt_number(100 * r["val_acc"], 1),
                    fmt_number(100 * r["val_acc4"], 1),
                ]
                for r in evals
            ],
        )
    if steps:
        marks = sorted({steps[round(i * (len(steps) - 1) / 8)]["step"] for i in range(9)})
        by = {r["step"]: r for r in steps}
        lines += markdown_table(
            ["step", "train loss", "train acc %", "lr"],
            [
                [
                    s,
                    fmt_number(by[s]["loss"], 3),
                    fmt_number(None if by[s]["acc"] is None else 100 * by[s]["acc"], 1),
                    f"{float(by[s]['lr']):.2e}",
                ]
                for s in marks
            ],
        )
    versions = start.get("versions") or {}
    lines += [
        "",
        "Held-out accuracy with memory policies: `namm-transfer eval --target video-llava` (results in "
        "`results/video-llava-synthetic.json`).",
        "",
        "## Use",
        "",
        "```python",
        "from namm_transfer.evals.video_qa.model import load_video_model",
        "",
        f'model, processor = load_video_model("{title}")  # SmolLM2 comes through the offline route',
        "```",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items() if v)}.",
        "",
    ]
    path = folder / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path
