"""Do the video tokens of the ``cpu-v3`` model differ between frames, and are they on the scale of SmolLM2's words?

Prints (and with ``--out`` writes) for the ``cpu-v3`` preset's model (seed 0) on the first 8 val videos of benchmark
v3: SmolLM2-135M's input-embedding norms; the projected video tokens' mean norm, their element std, and their
between-frame std (std over the 32 frames of a video, per token slot and channel, averaged): the part of the tokens
that carries the video. Measured for the random ViT, after the vision pretraining stage
(``--vision-pretrain-steps``), and for a run's checkpoint (``--checkpoint``: vision tower and projector taken from
its ``model.safetensors``; the language model's tokens are not involved).

Usage (seconds on one thread)::

    OMP_NUM_THREADS=1 python training/video_token_scale.py --vision-pretrain-steps 200 \
        --checkpoint runs/video/cpu-v3-lora/checkpoints/step-0000100
"""

from __future__ import annotations

import json
from pathlib import Path

from namm_transfer.evals.args import StrictParser


def main() -> None:
    p = StrictParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision-pretrain-steps", type=int, default=200)
    p.add_argument("--train-videos", type=int, default=1000, help="train split used by the vision pretraining")
    p.add_argument("--checkpoint", type=Path, default=None, help="a run's checkpoint folder (model.safetensors)")
    p.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = p.parse_args()

    import torch
    from namm_transfer.evals.video_qa.model import NammVideoLlavaForConditionalGeneration
    from namm_transfer.evals.video_qa.processor import NammVideoLlavaProcessor
    from namm_transfer.evals.video_qa.train import PRESETS, VideoTrainConfig
    from namm_transfer.evals.video_qa.train_data import load_split
    from namm_transfer.evals.video_qa.vision_pretrain import pretrain_vision
    from safetensors.torch import load_file

    from namm_transfer.models import load_model

    torch.set_num_threads(1)
    lm, tok = load_model("smollm2-135m", device="cpu", dtype="float32")
    emb = lm.get_input_embeddings().weight.detach()
    cfg = VideoTrainConfig(**PRESETS["cpu-v3"])
    torch.manual_seed(0)
    model = NammVideoLlavaForConditionalGeneration(cfg.model_config(lm.config), lm).eval()
    proc = NammVideoLlavaProcessor.from_config(model.config, tok)
    val_s, val_f = load_split("val", 100, 32, 32, 32, 0, benchmark="v3")
    pixels = torch.stack([proc.preprocess_frames(v) for v in val_f[:8]])

    def spread() -> dict[str, float]:
        with torch.no_grad():
            v = model.model.get_video_features(pixels).pooler_output.reshape(8, 32, cfg.tokens_per_frame, -1)
        return {
            "token_norm": round(float(v.norm(dim=-1).mean()), 4),
            "token_std": round(float(v.std()), 4),
            "between_frame_std": round(float(v.std(dim=1).mean()), 4),
        }

    out: dict[str, object] = {
        "embedding_norm_mean": round(float(emb.norm(dim=-1).mean()), 4),
        "embedding_std": round(float(emb.std()), 4),
        "random_vit": spread(),
    }
    if args.vision_pretrain_steps:
        train_s, train_f = load_split("train", args.train_videos, 32, 32, 32, 0, benchmark="v3")
        pretrain_vision(model, proc, train_s, train_f, val_s, val_f, steps=args.vision_pretrain_steps)
        out["after_vision_pretraining"] = spread()
    if args.checkpoint is not None:
        weights = load_file(str(args.checkpoint / "model.safetensors"))
        keep = {
            k: v for k, v in weights.items() if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))
        }
        model.load_state_dict(keep, strict=False)
        out[f"checkpoint {args.checkpoint}"] = spread()
    text = json.dumps(out, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
