"""Tiny random video LLMs of every supported family, with their real processor classes (CPU, float32).

The builders live in :mod:`namm_transfer.evals.video_qa.run` (``tiny_video_llm``, ``make_tiny_model``),
where ``--model tiny`` and the notebooks use them too; this module gives the tests their names.
32x32-pixel frames in 8-pixel patches; a byte-level tokenizer (one token per byte).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from namm_transfer.evals.video_qa.run import TINY_FAMILIES, byte_level_tokenizer, make_tiny_model, tiny_video_llm

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
