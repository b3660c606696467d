"""Tiny random video LLMs of every supported family, with their real processor classes (CPU, float32), and the
checks every video LLM passes (the Hugging Face families and the project's own model).

The builders live in :mod:`namm_transfer.evals.video_qa.run` (``tiny_video_llm``, ``make_tiny_model``),
where ``--model tiny`` and the notebooks use them too; this module gives the tests their names.
32x32-pixel frames in 8-pixel patches; a byte-level tokenizer (one token per byte).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from namm_transfer.adapters.video_llm import VideoLLMAdapter, answer, load_frames
from namm_transfer.evals.video_qa.run import TINY_FAMILIES, byte_level_tokenizer, make_tiny_model, tiny_video_llm
from namm_transfer.evals.video_qa.synthetic import generate_benchmark

from namm_transfer.session import attach

FAMILIES = list(TINY_FAMILIES)
TOKENS_PER_FRAME = {"llava-next-video": 4, "video-llava": 17, "llava-onevision": 4}
"""Video tokens per frame of the tiny models (OneVision adds one newline token per video)."""


def tiny_tokenizer() -> Any:
    """The byte-level tokenizer with the special tokens the video processors need."""
    return byte_level_tokenizer()


def tiny_vlm(family: str, tok: Any = None, seed: int = 0) -> tuple[Any, Any]:
    """``(model, processor)`` of a tiny random ``family`` model (eval mode)."""
    return tiny_video_llm(family, tok, seed=seed)


def tiny_vlm_folder(folder: str | Path, family: str = "video-llava", seed: int = 0) -> Path:
    """A ``save_pretrained`` folder (model + processor + the tiny marker) that ``from_pretrained`` loads offline."""
    return make_tiny_model(folder, family, seed=seed)


def synthetic_video(folder: Path, n_frames: int, size: int, seed: int) -> tuple[np.ndarray, str]:
    """``(frames (n_frames, size, size, 3) uint8, question)`` of one synthetic benchmark video (coloured shapes on
    a drifting background, 16 frames written to mp4 in ``folder``), ``n_frames`` read back."""
    json_path = generate_benchmark(folder, n_videos=1, frames_per_video=16, size=size, seed=seed)
    item = json.loads(json_path.read_text())[0]
    frames = load_frames(folder / "videos" / item["video_path"], num_frames=n_frames)
    assert frames.shape == (n_frames, size, size, 3) and frames.dtype == np.uint8
    return frames, item["question"]


def check_inputs_match_forward(model: Any, inputs: dict[str, Any], n_frames: int, tpf: int, extra: int = 0) -> Any:
    """``build_inputs`` gives the embeddings the model's own forward feeds its language model, and its layout:
    ``n_frames * tpf`` video tokens (plus ``extra``, e.g. OneVision's newline) in one contiguous run, ``tpf``
    per frame in frame order, and text tokens of no frame. Returns the video positions (n,)."""
    captured = {}

    def grab(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs["processor_outputs"])
    finally:
        handle.remove()
    assert torch.equal(inputs["inputs_embeds"], captured["embeds"])

    kind, frame = inputs["token_kind"], inputs["frame_of_token"]
    assert inputs["tokens_per_frame"] == tpf and inputs["n_frames"] == n_frames
    video_pos = torch.nonzero(kind).flatten()
    assert len(video_pos) == n_frames * tpf + extra
    assert torch.equal(video_pos, torch.arange(video_pos[0], video_pos[0] + len(video_pos)))  # contiguous
    assert torch.equal(torch.bincount(frame[frame >= 0]), torch.full((n_frames,), tpf))
    assert bool((frame[kind == 0] == -1).all()) and bool((frame[video_pos[: n_frames * tpf]].diff() >= 0).all())
    return video_pos


def check_full_policy_is_the_model(model: Any, processor: Any, inputs: dict[str, Any], new_tokens: int = 8) -> Any:
    """Keeping everything (policy ``full``) reproduces the unmodified model: the greedy answer of ``generate``,
    the prefill logits through ``attach`` (which finds the video adapter through the registry), and the model
    is unmodified once detached. Returns the answer (:func:`~namm_transfer.adapters.video_llm.answer`)."""
    po = inputs["processor_outputs"]
    t = po["input_ids"].shape[1]
    with torch.no_grad():
        ref_logits = model(**po).logits
        ref = model.generate(**po, do_sample=False, max_new_tokens=new_tokens)
    res = answer(
        model, processor, None, "", "full", max_new_tokens=new_tokens, update_interval=16, chunk_size=16, inputs=inputs
    )
    assert res.token_ids == ref[0, t:].tolist()
    assert res.retained_video() == 1.0 and res.retained_text() == 1.0 and res.retained_cache() == 1.0
    with attach(model, "full", update_interval=16, chunk_size=16) as mem:
        assert isinstance(mem.engine.adapter, VideoLLMAdapter)  # found through the registry, no name given
        logits = mem.prefill(inputs_embeds=inputs["inputs_embeds"], logits_to_keep=t)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(model(**po).logits, ref_logits)  # detached: unmodified
    return res
