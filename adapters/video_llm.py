"""Adapter for Hugging Face video LLMs, video prompts, and what the memory keeps of a video.

Supported hosts (transformers 5.x): ``LlavaNextVideoForConditionalGeneration``,
``VideoLlavaForConditionalGeneration`` and ``LlavaOnevisionForConditionalGeneration``. Qwen2-VL
and its successors are refused: they place tokens with 3-D multimodal rotary positions (M-RoPE),
and the engine continues a sequence with 1-D absolute positions, which would silently shift their
rotary phases.

How a video question runs:

1. :func:`build_inputs` runs the model's own processor (pixels, chat format, placeholder
   expansion), the model's own ``get_video_features`` (vision tower, pooling, projector) and its
   own ``get_placeholder_mask`` + ``masked_scatter`` merge, so the merged ``inputs_embeds`` are
   exactly what the model's forward would hand to its language model. It also returns, per prompt
   token, whether it is text (0) or video (1) and which frame it comes from.
2. :class:`VideoLLMAdapter` (registered as ``"video-llm"``) hosts the inner language model
   (``model.model.language_model``, a base ``LlamaModel`` / ``Qwen2Model`` without head): the
   engine feeds it ``inputs_embeds`` chunk by chunk (token ids are embedded with the language
   model's own input embeddings), and the adapter applies the outer model's ``lm_head``.
3. :func:`answer` / :class:`VideoQASession` prefill the merged embeddings, decode greedily and
   return the text with an :class:`EvictionRecord`: for every update and managed layer, how many
   video and text tokens each KV head kept, and how many of each frame.

>>> sess = VideoQASession(model, processor, "h2o", budget=0.5, update_interval=256)   # doctest: +SKIP
>>> res = sess.answer(frames, "What colour was the shape?", max_new_tokens=16)        # doctest: +SKIP
>>> res.text, res.record.retained_video(), res.record.frame_kept_fraction()           # doctest: +SKIP

Other video LLMs in the same mould (a ``model.model`` with ``get_video_features``,
``get_placeholder_mask`` and ``language_model``, plus ``lm_head``) join by declaring, as class
attributes, ``video_llm_family`` (a family name), ``video_prompt_formats`` ((video first, question
first) formats with ``{video}`` and ``{question}``) and optionally ``trailing_video_tokens`` (video
placeholders after the last frame, default 0); the project's own model
(:mod:`namm_transfer.evals.video_qa.model`) does.

Token positions: for one unpadded sequence the engine's position of a token is its index in the
prompt (generated tokens follow at ``prompt_len + i``), which is how kept positions are mapped
back to modalities and frames. Generated tokens count as text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .decoder_lm import SUPPORTED_DECODER_LMS, DecoderLMAdapter, eos_ids

__all__ = [
    "ADAPTER",
    "SUPPORTED_VIDEO_LLMS",
    "EvictionRecord",
    "VideoLLMAdapter",
    "VideoQAResult",
    "VideoQASession",
    "answer",
    "build_inputs",
    "decode_greedy",
    "eviction_record",
    "format_prompt",
    "frame_kept_fraction",
    "load_frames",
    "merged_video_embeddings",
    "retained_text",
    "retained_video",
    "video_family",
]

SUPPORTED_VIDEO_LLMS = {
    "LlavaNextVideoForConditionalGeneration": "llava-next-video",
    "VideoLlavaForConditionalGeneration": "video-llava",
    "LlavaOnevisionForConditionalGeneration": "llava-onevision",
}
"""Host class name -> family. The family decides the prompt format and the video token layout."""

_TRAILING_VIDEO_TOKENS = {"llava-next-video": 0, "video-llava": 0, "llava-onevision": 1}
"""Video placeholder tokens after the last frame (LLaVA-OneVision appends one ``image_newline``)."""

_MROPE_HOSTS = (
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5OmniThinkerForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration",
    "Glm4vForConditionalGeneration",
)
_IMAGE_ONLY_HOSTS = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "Mistral3ForConditionalGeneration",
    "PaliGemmaForConditionalGeneration",
    "Gemma3ForConditionalGeneration",
    "Idefics3ForConditionalGeneration",
)
_INNER_LMS = {"LlamaModel": "llama", "Qwen2Model": "qwen2", "MistralModel": "mistral", **SUPPORTED_DECODER_LMS}
"""Language models a supported video LLM may wrap: base models (transformers 5) or causal LMs (4.x)."""

_SUPPORTED_LIST = ", ".join(SUPPORTED_VIDEO_LLMS) + " and NammVideoLlavaForConditionalGeneration (the project's own)"


def _declared_family(model: Any) -> str | None:
    """The family a host class declares (``video_llm_family`` with ``video_prompt_formats``), else None."""
    fam = getattr(type(model), "video_llm_family", None)
    formats = getattr(type(model), "video_prompt_formats", None)
    if isinstance(fam, str) and isinstance(formats, tuple) and len(formats) == 2:
        return fam
    return None


def video_family(model: Any) -> str:
    """The family of a supported video LLM; ``TypeError`` naming the supported classes otherwise."""
    cls = type(model).__name__
    if cls in SUPPORTED_VIDEO_LLMS:
        return SUPPORTED_VIDEO_LLMS[cls]
    declared = _declared_family(model)
    if declared is not None:
        return declared
    if cls in _MROPE_HOSTS:
        raise TypeError(
            f"{cls} is not supported: it positions tokens with 3-D multimodal rotary embeddings (M-RoPE: time, "
            "height, width), while the eviction engine continues every sequence with 1-D absolute positions, "
            f"which would silently corrupt its rotary phases. Supported video LLMs: {_SUPPORTED_LIST}"
        )
    if cls in _IMAGE_ONLY_HOSTS:
        raise TypeError(f"{cls} has no video path (it takes images only); supported video LLMs: {_SUPPORTED_LIST}")
    if cls in SUPPORTED_DECODER_LMS:
        raise TypeError(
            f"{cls} is a text-only language model with no video path (attach it with the decoder-lm adapter); "
            f"supported video LLMs: {_SUPPORTED_LIST}"
        )
    raise TypeError(f"{cls} is not a supported video LLM; supported: {_SUPPORTED_LIST}")


def _language_model(model: Any) -> Any:
    inner = getattr(model, "model", None)
    lm = getattr(inner, "language_model", None) if inner is not None else None
    if lm is None:
        lm = getattr(model, "language_model", None)
    if lm is None:
        raise TypeError(f"cannot find the language model of {type(model).__name__} (model.model.language_model)")
    return lm


def _multimodal_core(model: Any) -> Any:
    """The module that owns ``get_video_features`` and ``get_placeholder_mask`` (``model.model`` in transformers 5)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "get_video_features"):
        return inner
    return model


class VideoLLMAdapter(DecoderLMAdapter):
    """Host questions answered for a video LLM: those of its inner language model, plus the LM head.

    The inner language model is a base model without head in transformers 5, so this class is a
    :class:`DecoderLMAdapter` over it whose :meth:`forward` applies the outer model's ``lm_head``;
    layers, cache access, attention routing and the managed (full-attention) layers are the decoder
    adapter's. Attach the whole video LLM (``attach(model, policy)``); feed ``inputs_embeds`` from
    :func:`build_inputs`, and token ids while decoding.
    """

    name = "video-llm"

    def __init__(self, model: Any) -> None:  # not super().__init__: it accepts causal LMs by class name only
        self.video_family = video_family(model)
        lm = _language_model(model)
        lm_cls = type(lm).__name__
        if lm_cls not in _INNER_LMS:
            raise TypeError(
                f"{type(model).__name__} wraps a {lm_cls}, which is not a supported language model; "
                f"supported: {', '.join(_INNER_LMS)}"
            )
        self.host = model
        self.model = lm
        self.family = _INNER_LMS[lm_cls]
        self.config = lm.config
        self._own_head = lm_cls in SUPPORTED_DECODER_LMS  # transformers 4.x layout: the LM has its head
        self.lm_head: Any = None if self._own_head else model.get_output_embeddings()
        if not self._own_head and self.lm_head is None:
            raise TypeError(f"{type(model).__name__} has no lm_head (get_output_embeddings() is None)")
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm
        self._bind_layers(lm, decoder, f"the {lm_cls} inside {type(model).__name__}")
        self._saved = None

    def forward(
        self,
        cache: Any,
        input_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        position_ids: Tensor,
        clock: Tensor,
        logits_to_keep: int = 1,
        **kwargs: Any,
    ) -> Tensor:
        """Run one chunk of (merged) embeddings or token ids; returns logits (B, logits_to_keep, vocab)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            lm: Any = self.model
            inputs_embeds = lm.get_input_embeddings()(input_ids)
        if self._own_head:
            return super().forward(cache, None, inputs_embeds, position_ids, clock, logits_to_keep, **kwargs)
        extra: dict[str, Any] = {self._cache_kw: cache, "use_cache": True, "position_ids": position_ids}
        if self._accepts_cache_position:
            extra["cache_position"] = clock
        out = self.model(inputs_embeds=inputs_embeds, **extra, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        assert self.lm_head is not None
        return self.lm_head(hidden)


ADAPTER = VideoLLMAdapter


# ----- prompts and inputs ------------------------------------------------------------------------------
_FORMATS = {
    # (video first, question first); {video} is the processor's video token
    "llava-next-video": ("USER: {video}\n{question} ASSISTANT:", "USER: {question}\n{video}\nASSISTANT:"),
    "video-llava": ("USER: {video}\n{question} ASSISTANT:", "USER: {question}\n{video}\nASSISTANT:"),
    "llava-onevision": (
        "<|im_start|>user {video}\n{question}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user {question}\n{video}<|im_end|>\n<|im_start|>assistant\n",
    ),
}


def _video_token(processor: Any) -> str:
    tok = getattr(processor, "video_token", None) or getattr(getattr(processor, "tokenizer", None), "video_token", None)
    return tok or "<video>"


def format_prompt(
    model: Any, processor: Any, question: str, video_first: bool = True, use_chat_template: bool | None = None
) -> str:
    """The family's single-turn prompt with one video and ``question``, ending where the answer starts.

    Video first (as LLaVA models are trained): the processor's chat template when it has one
    (``use_chat_template=None`` means "if present"), else the family's format:
    ``USER: <video>\\n{q} ASSISTANT:`` (LLaVA-NeXT-Video, Video-LLaVA) or
    ``<|im_start|>user <video>\\n{q}<|im_end|>\\n<|im_start|>assistant\\n`` (LLaVA-OneVision).
    ``video_first=False`` puts the question before the video in the same format (an ablation: the
    official templates always render media first).
    """
    fam = video_family(model)
    template = getattr(processor, "chat_template", None)
    if use_chat_template is None:
        use_chat_template = bool(template) and video_first
    if use_chat_template:
        content = [{"type": "video"}, {"type": "text", "text": question}]
        if not video_first:
            content.reverse()
        conv = [{"role": "user", "content": content}]
        return processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    fmt = (_FORMATS.get(fam) or type(model).video_prompt_formats)[0 if video_first else 1]
    return fmt.format(video=_video_token(processor), question=question)


@torch.no_grad()
def merged_video_embeddings(model: Any, input_ids: Tensor, pixel_values_videos: Tensor) -> tuple[Tensor, Tensor]:
    """Text embeddings with the video placeholders replaced by the model's own video features.

    Uses the model's ``get_video_features`` (vision tower, feature layer and selection strategy from
    its config, pooling, projector, OneVision's trailing ``image_newline``), its
    ``get_placeholder_mask`` and the same ``masked_scatter`` as its forward.

    Returns:
        ``(inputs_embeds (B, T, hidden), video_features (B, tokens per video, hidden))``.
    """
    fam = video_family(model)
    core = _multimodal_core(model)
    embeds = model.get_input_embeddings()(input_ids)
    # positional: the argument is `pixel_values_videos` in transformers 5.2x but `pixel_values` in 5.17 for
    # LLaVA-NeXT-Video and LLaVA-OneVision
    out = core.get_video_features(pixel_values_videos, return_dict=True)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, embeds.shape[-1]) for f in feats])
    hidden = embeds.shape[-1]
    b = pixel_values_videos.shape[0]
    if fam == "llava-onevision" and feats.dim() == 3:
        # OneVision's trailing image_newline: transformers 5.2x appends it in get_video_features, 5.17 in forward
        n_placeholders = int((input_ids == model.config.video_token_id).sum())
        if n_placeholders == feats.shape[0] * (feats.shape[1] + 1):
            newline = core.image_newline[None, None, :].expand(feats.shape[0], 1, -1).to(feats)
            feats = torch.cat((feats, newline), dim=1)
    feats = feats.to(embeds.device, embeds.dtype)
    flat = feats.reshape(-1, hidden)
    if hasattr(core, "get_placeholder_mask"):
        # in the layout each forward passes: Video-LLaVA's check reads (frames, tokens, hidden) features
        as_passed = feats if fam == "video-llava" else flat
        _, video_mask = core.get_placeholder_mask(input_ids, inputs_embeds=embeds, video_features=as_passed)
    else:  # older layouts: the placeholder test the forward uses
        video_mask = (input_ids == model.config.video_token_id).unsqueeze(-1)
        if int(video_mask.sum()) * hidden != flat.numel():
            raise ValueError(f"{int(video_mask.sum())} video tokens in the prompt, {flat.shape[0]} video features")
    merged = embeds.masked_scatter(video_mask.to(embeds.device), flat)
    return merged, flat.view(b, -1, hidden)


def load_frames(path: str | os.PathLike[str], num_frames: int = 8, **kwargs: Any) -> np.ndarray:
    """Uniformly sampled RGB frames (N, H, W, 3) uint8 of a video file (decord, PyAV fallback)."""
    from namm_transfer.evals.video_qa.video_io import read_frames

    frames, _, _ = read_frames(path, num_frames=num_frames, **kwargs)
    return frames


def _check_frames(frames: Any) -> np.ndarray:
    arr = frames.numpy() if isinstance(frames, Tensor) else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"frames must be (N, H, W, 3) RGB with N >= 1, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {arr.dtype}")
    return arr


@torch.no_grad()
def build_inputs(
    model: Any,
    processor: Any,
    frames: Any,
    prompt_text: str,
    *,
    video_first: bool = True,
    use_chat_template: bool | None = None,
) -> dict[str, Any]:
    """Prompt of one video + question, as the model's own forward would see it.

    Args:
        model: a supported video LLM (see :data:`SUPPORTED_VIDEO_LLMS`).
        processor: the model's processor (``LlavaNextVideoProcessor``, ``VideoLlavaProcessor``,
            ``LlavaOnevisionProcessor``); it makes the pixels and expands the video placeholder.
        frames: (N, H, W, 3) uint8 RGB frames, all of them used (the processor samples none).
        prompt_text: the question, formatted with :func:`format_prompt`; a text that already
            contains the processor's video token is used as the whole prompt.
        video_first: video before the question (the LLaVA convention) or after it.

    Returns:
        dict with ``inputs_embeds`` (1, T, hidden) (merged, as :func:`merged_video_embeddings`),
        ``input_ids`` (1, T), ``token_kind`` (T,) int64 (0 text, 1 video), ``frame_of_token`` (T,)
        int64 (the frame index for frame tokens, -1 otherwise: text, and LLaVA-OneVision's trailing
        newline, which is a video token of no frame), ``n_frames``, ``tokens_per_frame``, ``prompt``
        and ``processor_outputs`` (what ``model.generate(**processor_outputs)`` takes).
    """
    fam = video_family(model)
    arr = _check_frames(frames)
    vtok = _video_token(processor)
    if vtok in prompt_text:
        prompt = prompt_text
    else:
        prompt = format_prompt(model, processor, prompt_text, video_first, use_chat_template)
    if prompt.count(vtok) != 1:
        raise ValueError(f"the prompt must hold exactly one {vtok!r}, got {prompt.count(vtok)}: {prompt!r}")
    proc = processor(text=[prompt], videos=[arr], return_tensors="pt", do_sample_frames=False)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    proc = proc.to(device)
    proc["pixel_values_videos"] = proc["pixel_values_videos"].to(dtype)
    input_ids = proc["input_ids"]
    pixel = proc["pixel_values_videos"]
    n_frames = int(pixel.shape[1])
    if n_frames != arr.shape[0]:
        raise ValueError(f"the processor made {n_frames} frames out of {arr.shape[0]}; disable its frame sampling")
    embeds, feats = merged_video_embeddings(model, input_ids, pixel)
    per_video = feats.shape[1]
    extra = _TRAILING_VIDEO_TOKENS.get(fam, int(getattr(type(model), "trailing_video_tokens", 0)))
    tpf, rem = divmod(per_video - extra, n_frames)
    if rem or tpf < 1:
        raise ValueError(f"{per_video} video features do not split into {n_frames} frames (+{extra})")
    video_id = model.config.video_token_id
    is_video = input_ids[0] == video_id
    t = input_ids.shape[1]
    token_kind = is_video.to(torch.int64).cpu()
    frame_of_token = torch.full((t,), -1, dtype=torch.int64)
    rank = torch.cumsum(token_kind, 0) - 1  # index among the video tokens
    in_frame = token_kind.bool() & (rank < n_frames * tpf)
    frame_of_token[in_frame] = rank[in_frame] // tpf
    return {
        "inputs_embeds": embeds,
        "input_ids": input_ids,
        "token_kind": token_kind,
        "frame_of_token": frame_of_token,
        "n_frames": n_frames,
        "tokens_per_frame": tpf,
        "prompt": prompt,
        "processor_outputs": proc,
    }


# ----- what the memory kept ----------------------------------------------------------------------------
def _extend(a: np.ndarray, n: int, fill: int) -> np.ndarray:
    return a if len(a) >= n else np.concatenate([a, np.full(n - len(a), fill, dtype=a.dtype)])


@dataclass
class EvictionRecord:
    """What every eviction kept, by modality and frame, for one sequence of a session.

    Shapes: U updates, L managed layers (``layers``), H KV heads, F frames, C forward calls.

    Attributes:
        kept_video, kept_text: (U, L, H) tokens of each kind kept at each update.
        kept_per_frame: (U, L, H, F) tokens of each frame kept at each update.
        seen_video, seen_text: (U,) tokens of each kind fed before each update (a full cache).
        seen_per_frame: (U, F) tokens of each frame fed before each update.
        frame_tokens: (F,) tokens per frame in the prompt.
        live_video, live_text: (C, L) tokens of each kind in the cache after each forward call
            (mean over KV heads), the split of the engine's ``cache_tokens``.
        call_seen_video, call_seen_text: (C,) tokens of each kind fed up to each call.
        live_per_frame_end: (L, H, F) tokens of each frame in the cache at the end of the session.
    """

    layers: tuple[int, ...]
    n_frames: int
    update_clock: list[int]
    update_seen: list[int]
    kept_video: np.ndarray
    kept_text: np.ndarray
    kept_per_frame: np.ndarray
    seen_video: np.ndarray
    seen_text: np.ndarray
    seen_per_frame: np.ndarray
    frame_tokens: np.ndarray
    live_video: np.ndarray
    live_text: np.ndarray
    call_seen_video: np.ndarray
    call_seen_text: np.ndarray
    live_per_frame_end: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_updates(self) -> int:
        return len(self.update_clock)

    def _retained(self, live: np.ndarray, seen: np.ndarray) -> float:
        ok = seen > 0
        if not ok.any():
            return float("nan")
        return float((live[ok] / seen[ok, None]).mean())

    def retained_video(self) -> float:
        """Mean over forward calls and managed layers of video tokens in the cache / video tokens fed.

        The video part of the engine's ``retained_cache`` (same calls, same layers; calls before the
        first video token are left out); 1.0 for a full cache, NaN if no video was fed.
        """
        return self._retained(self.live_video, self.call_seen_video)

    def retained_text(self) -> float:
        """The same for text tokens (prompt text and generated tokens)."""
        return self._retained(self.live_text, self.call_seen_text)

    def frame_kept_fraction(self, layer: int | None = None, at: str = "updates") -> np.ndarray:
        """Fraction of each frame's tokens in the cache, mean over KV heads (and managed layers).

        Args:
            layer: one host layer index, or None for the mean over managed layers.
            at: ``"updates"``: (U, F), just after each update, relative to the frame's tokens fed
                by then (NaN for frames not reached yet); ``"end"``: (F,) at the end of the session.
        """
        sel = slice(None) if layer is None else [self.layers.index(layer)]
        if at == "end":
            per = self.live_per_frame_end[sel].mean(axis=(0, 1))  # (F,)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(self.frame_tokens > 0, per / np.maximum(self.frame_tokens, 1), np.nan)
        if at != "updates":
            raise ValueError(f"at must be 'updates' or 'end', got {at!r}")
        if self.n_updates == 0:
            return np.zeros((0, self.n_frames))
        per = self.kept_per_frame[:, sel].mean(axis=(1, 2))  # (U, F)
        seen = self.seen_per_frame.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(seen > 0, per / np.maximum(seen, 1), np.nan)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: per update and layer, kept counts by modality and per frame (mean over heads)."""
        updates = []
        for u in range(self.n_updates):
            updates.append(
                {
                    "clock": self.update_clock[u],
                    "seen": self.update_seen[u],
                    "seen_video": int(self.seen_video[u]),
                    "seen_text": int(self.seen_text[u]),
                    "layers": {
                        str(layer): {
                            "kept_video": self.kept_video[u, li].tolist(),
                            "kept_text": self.kept_text[u, li].tolist(),
                            "kept_per_frame": self.kept_per_frame[u, li].mean(0).round(4).tolist(),
                        }
                        for li, layer in enumerate(self.layers)
                    },
                }
            )
        return {
            "layers": list(self.layers),
            "n_frames": self.n_frames,
            "frame_tokens": self.frame_tokens.tolist(),
            "retained_video": self.retained_video(),
            "retained_text": self.retained_text(),
            "frame_kept_fraction_end": self.frame_kept_fraction(at="end").round(4).tolist(),
            "updates": updates,
            **self.meta,
        }


def eviction_record(
    stats: Any,
    token_kind: Any,
    frame_of_token: Any,
    n_frames: int | None = None,
    *,
    update_interval: int | None = None,
    seq: int = 0,
) -> EvictionRecord:
    """Map the engine's kept positions to video / text tokens and frames.

    Args:
        stats: the session's :class:`~namm_transfer.engine.EvictionStats`, recorded with
            ``record_kept=True`` (``attach(..., record_kept=True)``).
        token_kind, frame_of_token: from :func:`build_inputs` (prompt tokens of sequence ``seq``);
            positions past their end (generated tokens) count as text of no frame.
        n_frames: number of frames (default: ``max(frame_of_token) + 1``).
        update_interval: unused (kept for callers): an update at the end of a prompt (``final_update``) is in
            that call's statistics, as an update inside a call is.
        seq: which sequence of the batch (its positions are its own, padding excluded).
    """
    kind = np.asarray(token_kind, dtype=np.int64).reshape(-1)
    frame = np.asarray(frame_of_token, dtype=np.int64).reshape(-1)
    if kind.shape != frame.shape:
        raise ValueError(f"token_kind {kind.shape} and frame_of_token {frame.shape} differ in length")
    f = int(n_frames) if n_frames is not None else int(frame.max(initial=-1)) + 1
    total = max([len(kind)] + [int(np.asarray(s)[seq]) for s in stats.n_seen])
    kind = _extend(kind, total, 0)
    frame = _extend(frame, total, -1)
    is_video = kind == 1
    cum_video = np.concatenate([[0], np.cumsum(is_video)])
    frame_oh = np.zeros((total + 1, f), dtype=np.int64)  # cumulative tokens per frame
    fi = np.where(frame >= 0)[0]
    np.add.at(frame_oh, (fi + 1, frame[fi]), 1)
    frame_oh = np.cumsum(frame_oh, axis=0)
    layers = tuple(stats.managed_layers)
    if stats.update_clock and not stats.kept_positions:
        raise ValueError("the session has updates but no kept positions: attach with record_kept=True")
    n_upd = len(stats.update_clock)
    h = 0
    for d in stats.kept_positions.values():
        for lst in d.values():
            h = max(h, len(lst[seq]))
    n_l = len(layers)
    kept_video = np.zeros((n_upd, n_l, h), dtype=np.int64)
    kept_text = np.zeros((n_upd, n_l, h), dtype=np.int64)
    kept_per_frame = np.zeros((n_upd, n_l, h, f), dtype=np.int64)
    update_seen = [int(s[seq]) for s in stats.update_n_seen]
    for u in range(n_upd):
        for li, layer in enumerate(layers):
            rows = stats.kept_positions.get(u, {}).get(layer)
            if rows is None:
                continue
            for hi, pos in enumerate(rows[seq]):
                pos = np.asarray(pos, dtype=np.int64)
                kv = int(is_video[pos].sum())
                kept_video[u, li, hi] = kv
                kept_text[u, li, hi] = len(pos) - kv
                fr = frame[pos]
                kept_per_frame[u, li, hi] = np.bincount(fr[fr >= 0], minlength=f)[:f]
    seen_video = np.array([cum_video[n] for n in update_seen], dtype=np.int64)
    seen_text = np.array(update_seen, dtype=np.int64) - seen_video
    seen_per_frame = np.stack([frame_oh[n] for n in update_seen]) if n_upd else np.zeros((0, f), dtype=np.int64)

    # live cache after each forward call: what the last applied update kept + every token fed since
    n_calls = len(stats.clock)
    live_video = np.zeros((n_calls, n_l))
    live_text = np.zeros((n_calls, n_l))
    call_seen = np.array([int(np.asarray(s)[seq]) for s in stats.n_seen], dtype=np.int64)
    u = -1
    for c in range(n_calls):
        clock = stats.clock[c]
        # an update at this call's clock is in its record, a prompt's final update too (the engine re-records the
        # call after an update made by hand)
        while u + 1 < n_upd and stats.update_clock[u + 1] <= clock:
            u += 1
        n = call_seen[c]
        if u < 0:
            live_video[c] = cum_video[n]
            live_text[c] = n - cum_video[n]
            continue
        since = update_seen[u]
        new_v = cum_video[n] - cum_video[since]
        new_t = (n - since) - new_v
        live_video[c] = kept_video[u].mean(-1) + new_v
        live_text[c] = kept_text[u].mean(-1) + new_t
    call_seen_video = np.array([cum_video[n] for n in call_seen], dtype=np.int64)
    # at the end of the session: the last update's kept tokens + every token fed after it
    end_seen = int(call_seen[-1]) if n_calls else 0
    if n_upd:
        since = update_seen[-1]
        live_end = kept_per_frame[-1] + (frame_oh[end_seen] - frame_oh[since])[None, None, :]
    else:
        live_end = np.broadcast_to(frame_oh[end_seen], (n_l, max(h, 1), f)).copy()
    return EvictionRecord(
        layers=layers,
        n_frames=f,
        update_clock=list(stats.update_clock),
        update_seen=update_seen,
        kept_video=kept_video,
        kept_text=kept_text,
        kept_per_frame=kept_per_frame,
        seen_video=seen_video,
        seen_text=seen_text,
        seen_per_frame=seen_per_frame,
        frame_tokens=frame_oh[total],
        live_video=live_video,
        live_text=live_text,
        call_seen_video=call_seen_video,
        call_seen_text=call_seen - call_seen_video,
        live_per_frame_end=live_end,
    )


def retained_video(record: Any) -> float:
    """Video part of the retained cache (see :meth:`EvictionRecord.retained_video`); takes a record or a result."""
    return _as_record(record).retained_video()


def retained_text(record: Any) -> float:
    """Text part of the retained cache (see :meth:`EvictionRecord.retained_text`); takes a record or a result."""
    return _as_record(record).retained_text()


def frame_kept_fraction(record: Any, layer: int | None = None, at: str = "updates") -> np.ndarray:
    """Per-frame kept fraction (see :meth:`EvictionRecord.frame_kept_fraction`); takes a record or a result."""
    return _as_record(record).frame_kept_fraction(layer=layer, at=at)


def _as_record(obj: Any) -> EvictionRecord:
    rec = getattr(obj, "record", obj)
    if not isinstance(rec, EvictionRecord):
        raise TypeError(f"expected an EvictionRecord or a VideoQAResult, got {type(obj).__name__}")
    return rec


# ----- question answering --------------------------------------------------------------------------------
@dataclass
class VideoQAResult:
    """One answered video question.

    Attributes:
        text: the decoded answer (special tokens skipped).
        token_ids: the generated token ids (an EOS that ended decoding included, as ``generate`` does).
        prompt_len: prompt tokens (video placeholders included).
        record: what the memory kept, by modality and frame.
        stats: the engine's raw statistics (``retained_cache()``, ``kept_counts``, ...).
        inputs: the :func:`build_inputs` dict (without the embeddings, to keep results small).
    """

    text: str
    token_ids: list[int]
    prompt_len: int
    record: EvictionRecord
    stats: Any
    inputs: dict[str, Any]

    def retained_cache(self) -> float:
        return float(self.stats.retained_cache())

    def retained_video(self) -> float:
        return self.record.retained_video()

    def retained_text(self) -> float:
        return self.record.retained_text()

    def frame_kept_fraction(self, layer: int | None = None, at: str = "updates") -> np.ndarray:
        return self.record.frame_kept_fraction(layer=layer, at=at)


@torch.no_grad()
def decode_greedy(mem: Any, inputs_embeds: Tensor, max_new_tokens: int, eos: list[int]) -> list[int]:
    """Prefill ``inputs_embeds`` (1, T, hidden) through an attached memory, then decode greedily."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    logits = mem.prefill(inputs_embeds=inputs_embeds)
    out: list[int] = []
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)  # (1,)
        out.append(int(nxt[0]))
        if out[-1] in eos or i == max_new_tokens - 1:
            break
        logits = mem.step(nxt[:, None])
    return out


def answer(
    model: Any,
    processor: Any,
    frames: Any,
    question: str,
    policy: Any = "full",
    *,
    max_new_tokens: int = 32,
    update_interval: int = 512,
    chunk_size: int = 128,
    final_update: bool | None = None,
    video_first: bool = True,
    eos_token_id: int | list[int] | None = None,
    inputs: dict[str, Any] | None = None,
    **policy_kwargs: Any,
) -> VideoQAResult:
    """Answer ``question`` about ``frames`` with ``policy`` managing the language model's KV cache.

    The merged embeddings of :func:`build_inputs` are prefilled in chunks, then the answer is
    decoded greedily (like ``model.generate(do_sample=False)``, stopping at the model's EOS). The
    policy is attached for the call only and detached afterwards, also on errors.

    Args:
        policy: a :class:`~namm_transfer.policies.base.MemoryPolicy` or a registered name
            (``policy_kwargs`` go to its factory, e.g. ``budget=0.5``).
        inputs: a :func:`build_inputs` result to reuse (then ``frames`` and ``question`` are ignored).
        final_update: as :func:`namm_transfer.attach` (None: an update at the end of the prompt for a ratio or token
            budget, none otherwise).
    """
    from namm_transfer.session import attach

    if inputs is None:
        inputs = build_inputs(model, processor, frames, question, video_first=video_first)
    eos = eos_ids(model, eos_token_id)
    embeds = inputs["inputs_embeds"]
    with attach(
        model,
        policy,
        update_interval=update_interval,
        chunk_size=chunk_size,
        final_update=final_update,
        record_kept=True,
        adapter=VideoLLMAdapter.name,
        **policy_kwargs,
    ) as mem:
        tokens = decode_greedy(mem, embeds, max_new_tokens, eos)
        stats = mem.stats
    record = eviction_record(
        stats,
        inputs["token_kind"],
        inputs["frame_of_token"],
        inputs["n_frames"],
        update_interval=update_interval,
    )
    record.meta.update({"policy": getattr(mem.policy, "name", str(policy)), "update_interval": update_interval})
    tokenizer = getattr(processor, "tokenizer", processor)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    kept_inputs = {k: v for k, v in inputs.items() if k != "inputs_embeds"}
    return VideoQAResult(text, tokens, int(embeds.shape[1]), record, stats, kept_inputs)


class VideoQASession:
    """A video LLM, its processor and a memory-policy setting, reused across questions.

    >>> sess = VideoQASession(model, processor, "h2o", budget=0.5, update_interval=256)   # doctest: +SKIP
    >>> sess.answer_file("clip.mp4", "What happens?", num_frames=16).text                  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        policy: Any = "full",
        *,
        update_interval: int = 512,
        chunk_size: int = 128,
        final_update: bool | None = None,
        video_first: bool = True,
        **policy_kwargs: Any,
    ) -> None:
        video_family(model)
        self.model = model
        self.processor = processor
        self.policy = policy
        self.policy_kwargs = policy_kwargs
        self.update_interval = update_interval
        self.chunk_size = chunk_size
        self.final_update = final_update
        self.video_first = video_first

    def build_inputs(self, frames: Any, question: str) -> dict[str, Any]:
        return build_inputs(self.model, self.processor, frames, question, video_first=self.video_first)

    def answer(
        self,
        frames: Any,
        question: str,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> VideoQAResult:
        """Answer one question about (N, H, W, 3) uint8 frames (a fresh policy state each time)."""
        return answer(
            self.model,
            self.processor,
            frames,
            question,
            self.policy,
            max_new_tokens=max_new_tokens,
            update_interval=self.update_interval,
            chunk_size=self.chunk_size,
            final_update=self.final_update,
            video_first=self.video_first,
            eos_token_id=eos_token_id,
            inputs=inputs,
            **self.policy_kwargs,
        )

    def answer_file(
        self, path: str | os.PathLike[str], question: str, num_frames: int = 8, max_new_tokens: int = 32, **read_kw: Any
    ) -> VideoQAResult:
        """Read ``num_frames`` uniformly sampled frames of a video file, then :meth:`answer`."""
        return self.answer(load_frames(path, num_frames, **read_kw), question, max_new_tokens)
