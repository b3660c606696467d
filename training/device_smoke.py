"""A one-minute check, on the device's GPU and without SmolLM2, of the two things `training/device.sh` runs there.

    python3 training/device_smoke.py DATA_DIR     # DATA_DIR: tiny synthetic splits made here by `--prepare`
    python training/device_smoke.py --prepare DATA_DIR

1. `namm-transfer evolve --device cuda` with a warm start, one generation and population 4 on a tiny random Llama;
2. `train_video_model` on cuda in bfloat16 for 3 steps on a tiny random Llama with tiny synthetic splits whose
   decoded frames are already cached (the device image has no PyAV to decode videos).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def tiny_host(device: str, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    from namm_transfer.evals.video_qa.run import byte_level_tokenizer, tiny_text_config
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_level_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(**tiny_text_config(tok), attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype), tok


def video_config(device: str):  # type: ignore[no-untyped-def]
    from namm_transfer.evals.video_qa.train import PRESETS, VideoTrainConfig

    preset = {**PRESETS["cpu-small"], "threads": None, "device": device}
    return VideoTrainConfig(**{**preset, "dtype": "bfloat16", "steps": 3, "train_videos": 8, "val_videos": 4})


def prepare(data: Path) -> None:
    from namm_transfer.evals.video_qa.train_data import load_split

    cfg = video_config("cpu")
    for split, n in (("train", cfg.train_videos), ("val", cfg.val_videos)):
        load_split(split, n, cfg.video_frames, cfg.video_size, cfg.frames, cfg.data_seed, folder=data / split)
    print("tiny splits in", data)


def main(data: Path) -> int:
    from namm_transfer.evals.video_qa.train import train_video_model

    import namm_transfer.models as models_mod
    from namm_transfer.cli import main as cli

    dev = os.environ.get("SMOKE_DEVICE", "cuda")
    print(torch.cuda.get_device_name(0) if dev == "cuda" else dev, torch.__version__, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="device-smoke-"))
    host, tok = tiny_host(dev)
    models_mod.load_model = lambda *a, **k: (host, tok)  # type: ignore[assignment]
    t = time.perf_counter()
    argv = ["evolve", "--model", "tiny", "--device", dev, "--run-dir", str(tmp / "evolve"), "--stages", "passkey:1"]
    argv += ["--population", "4", "--lengths", "400", "--pool-size", "2", "--update-interval", "64"]
    argv += ["--chunk-size", "64", "--warm-start", "--warm-start-prompts", "1", "--warm-start-steps", "3"]
    argv += ["--warm-start-keep", "0.8", "--warm-start-calibrate", "--cache-weight", "4.0"]
    ok = cli(argv) == 0
    print(f"evolve on {dev}: {'ok' if ok else 'FAILED'} ({time.perf_counter() - t:.1f} s)", flush=True)
    t = time.perf_counter()
    lm, tok = tiny_host(dev, torch.bfloat16)
    res = train_video_model(
        video_config(dev),
        tmp / "video",
        language_model=lm,
        tokenizer=tok,
        data_folders={"train": data / "train", "val": data / "val"},
        progress=False,
    )
    print(f"video train on {dev}: ok ({time.perf_counter() - t:.1f} s) {res}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1] == "--prepare":
        prepare(Path(sys.argv[2]))
    else:
        sys.exit(main(Path(sys.argv[1])))
