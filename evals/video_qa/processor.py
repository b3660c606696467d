"""Processor of the project's video model (:mod:`.model`): frames to pixels, one ``<video>`` to placeholders.

It plays the part of transformers' ``VideoLlavaProcessor`` for the video adapter and the trainer:
``processor(text=[prompt], videos=[frames], return_tensors="pt")`` gives ``input_ids``,
``attention_mask`` and ``pixel_values_videos`` in a ``BatchFeature``; every frame is used (no frame
sampling here: the caller samples frames).

- Pixels: (frames, H, W, 3) uint8 RGB -> scaled to [0, 1], resized to ``image_size`` square
  (bilinear, antialiased) when needed, normalized with ``image_mean`` / ``image_std`` ->
  (batch, frames, 3, image_size, image_size) float32.
- Text: the prompt is split at its one ``video_token`` (``"<video>"``); both sides are tokenized
  without special tokens (the chat format spells them out) and ``frames x tokens_per_frame``
  placeholder ids (``video_token_id``) go between. The tokenizer needs no new token: the
  placeholders' embeddings are replaced by the video features.
- Batches are padded on the right (``padding_side="left"`` is available for generation).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["PROCESSOR_FILE", "NammVideoLlavaProcessor"]

PROCESSOR_FILE = "processor_config.json"


class NammVideoLlavaProcessor:
    """Tokenizer + frame preprocessing of :class:`~.model.NammVideoLlavaForConditionalGeneration`."""

    chat_template: str | None = None
    """None: prompts use the model's own format (:data:`~.model.PROMPT_FORMATS`)."""

    def __init__(
        self,
        tokenizer: Any,
        image_size: int = 64,
        tokens_per_frame: int = 16,
        video_token: str = "<video>",
        video_token_id: int = 16,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.tokens_per_frame = int(tokens_per_frame)
        self.video_token = video_token
        self.video_token_id = int(video_token_id)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any) -> NammVideoLlavaProcessor:
        """The processor that fits a :class:`~.model.NammVideoLlavaConfig`."""
        return cls(
            tokenizer,
            image_size=config.image_size,
            tokens_per_frame=config.tokens_per_frame,
            video_token=config.video_token,
            video_token_id=config.video_token_id,
            image_mean=config.image_mean,
            image_std=config.image_std,
        )

    # ----- pixels -----------------------------------------------------------------------------------------
    def preprocess_frames(self, frames: Any) -> Tensor:
        """(frames, H, W, 3) uint8 RGB (numpy or torch) -> (frames, 3, image_size, image_size) float32."""
        arr = frames.detach().cpu().numpy() if isinstance(frames, Tensor) else np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
            raise ValueError(f"a video must be (frames, H, W, 3) RGB with at least one frame, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise ValueError(f"video frames must be uint8, got {arr.dtype}")
        x = torch.from_numpy(np.array(arr, copy=True)).permute(0, 3, 1, 2).float().div_(255.0)  # memmaps are read-only
        s = self.image_size
        if x.shape[-2:] != (s, s):
            x = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return (x - mean) / std

    # ----- text -------------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def prompt_ids(self, prompt: str, n_frames: int | None) -> list[int]:
        """Token ids of ``prompt`` with its video marker expanded to ``n_frames x tokens_per_frame`` placeholders."""
        count = prompt.count(self.video_token)
        if n_frames is None:
            if count:
                raise ValueError(f"the prompt holds {self.video_token!r} but no video was given")
            return self._encode(prompt)
        if count != 1:
            raise ValueError(f"the prompt must hold exactly one {self.video_token!r}, got {count}: {prompt!r}")
        before, after = prompt.split(self.video_token)
        video = [self.video_token_id] * (n_frames * self.tokens_per_frame)
        return self._encode(before) + video + self._encode(after)

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        videos: Any = None,
        return_tensors: str | None = "pt",
        padding_side: str = "right",
        **kwargs: Any,
    ) -> Any:
        """``BatchFeature`` with ``input_ids`` (B, T), ``attention_mask`` (B, T) and ``pixel_values_videos``.

        ``videos``: one (frames, H, W, 3) uint8 array per prompt (all with the same number of
        frames), or None for text only. Keyword arguments of the transformers processors that do
        not apply here (``do_sample_frames``, ``padding``) are accepted and ignored.
        """
        from transformers import BatchFeature

        if text is None:
            raise ValueError("give the prompt text (with one video marker per video)")
        texts = [text] if isinstance(text, str) else list(text)
        vids = None if videos is None else ([videos] if _is_single_video(videos) else list(videos))
        if vids is not None and len(vids) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(vids)} videos (one video per prompt)")
        pixels = None
        frames: list[int | None] = [None] * len(texts)
        if vids is not None:
            per = [self.preprocess_frames(v) for v in vids]
            if len({p.shape[0] for p in per}) != 1:
                raise ValueError(f"videos of a batch need the same number of frames, got {[p.shape[0] for p in per]}")
            pixels = torch.stack(per)
            frames = [int(p.shape[0]) for p in per]
        ids = [self.prompt_ids(t, f) for t, f in zip(texts, frames, strict=True)]
        pad = self.pad_token_id
        width = max(len(i) for i in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for b, row in enumerate(ids):
            sl = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
            input_ids[b, sl] = torch.tensor(row, dtype=torch.long)
            mask[b, sl] = 1
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if pixels is not None:
            data["pixel_values_videos"] = pixels
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for value in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if value is not None:
                return int(value)
        return 0

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return str(self.tokenizer.decode(*args, **kwargs))

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return list(self.tokenizer.batch_decode(*args, **kwargs))

    # ----- save / load --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": type(self).__name__,
            "image_size": self.image_size,
            "tokens_per_frame": self.tokens_per_frame,
            "video_token": self.video_token,
            "video_token_id": self.video_token_id,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
        }

    def save_pretrained(self, save_directory: str | os.PathLike[str], save_tokenizer: bool = False) -> Path:
        """Write ``processor_config.json`` (and the tokenizer with ``save_tokenizer``: the shipped
        models do not carry it, it comes with the language model)."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / PROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        if save_tokenizer:
            self.tokenizer.save_pretrained(str(out))
        return out

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], tokenizer: Any = None) -> NammVideoLlavaProcessor:
        """Read ``processor_config.json`` of ``folder`` (else the model's config.json); the tokenizer is
        the one given, else the folder's own (``AutoTokenizer``)."""
        path = Path(folder).expanduser()
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(path))
        if (path / PROCESSOR_FILE).is_file():
            data = json.loads((path / PROCESSOR_FILE).read_text(encoding="utf-8"))
            data.pop("processor_class", None)
            return cls(tokenizer, **data)
        from .model import NammVideoLlavaConfig

        return cls.from_config(NammVideoLlavaConfig.from_pretrained(str(path)), tokenizer)


def _is_single_video(videos: Any) -> bool:
    if isinstance(videos, (list, tuple)):
        return False
    return getattr(videos, "ndim", 0) == 4
