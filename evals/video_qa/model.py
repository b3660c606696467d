"""The project's own small video-LLaVA-style model: a timm ViT + an MLP projector + SmolLM2 (frozen or fine-tuned).

Made the way LLaVA models are made, in the mould of the Hugging Face LLaVA classes, small enough to be
trained here (``namm-transfer video train``) so that the video target has a real model offline:

- :class:`NammVideoLlavaConfig` (``model_type = "namm_video_llava"``): the vision tower (a timm
  Vision Transformer created by name with small dimensions, ``pretrained=False``), the projector,
  ``tokens_per_frame`` and the language model's config (``text_config``) and offline name
  (``text_model``, default ``smollm2-135m``).
- :class:`NammVideoLlavaModel` (``model.model``): ``vision_tower``, ``multi_modal_projector`` and
  ``language_model`` (the base ``LlamaModel``, no head), with ``get_video_features`` and
  ``get_placeholder_mask`` as in transformers' ``VideoLlavaModel``.
- :class:`NammVideoLlavaForConditionalGeneration`: ``model`` + ``lm_head`` (the language model's
  own, tied to its input embeddings), ``forward(input_ids, pixel_values_videos, attention_mask,
  labels)`` and ``generate``.

Each frame (``image_size`` x ``image_size`` pixels) becomes ``(image_size / patch_size)^2`` patch
features, average-pooled to a ``sqrt(tokens_per_frame)`` square grid, then projected by
``Linear -> GELU -> Linear`` (LLaVA-1.5's ``mlp2x_gelu``) into the language model's embedding space;
the ``tokens_per_frame`` features of every frame, in frame order, replace the video placeholder
tokens of the prompt (one ``<video>`` in the text, expanded by the processor to ``frames x
tokens_per_frame`` placeholder ids). The video comes first and the question after it, as in LLaVA.

Saving and loading follow ``save_pretrained`` / ``from_pretrained``, except that a frozen language model
is not saved: a folder holds ``config.json``, ``model.safetensors`` (vision tower and projector
only, plus the language model's weights when it was fine-tuned: ``config.train_lm == "full"``, loaded over
``text_model``'s) and ``processor_config.json``. ``from_pretrained(folder, language_model=...)`` takes the
language model, or loads ``config.text_model`` through :func:`namm_transfer.models.load_model` (the
offline route for SmolLM2). :func:`load_video_model` returns ``(model, processor)``.

The video adapter (:mod:`namm_transfer.adapters.video_llm`) hosts it like the Hugging Face video LLMs:
the class declares its family (``video_llm_family``) and prompt formats (``video_prompt_formats``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast

__all__ = [
    "FAMILY",
    "MODEL_TYPE",
    "PROMPT_FORMATS",
    "NammVideoLlavaConfig",
    "NammVideoLlavaForConditionalGeneration",
    "NammVideoLlavaModel",
    "NammVideoLlavaProjector",
    "LoRALinear",
    "add_lora",
    "merge_lora",
    "build_vision_tower",
    "is_video_model_folder",
    "load_video_model",
    "missing_shipped_message",
    "resolve_shipped",
    "shipped_video_dir",
]

logger = logging.getLogger(__name__)

MODEL_TYPE = "namm_video_llava"
FAMILY = "namm-video-llava"
"""The family the video adapter reports for this model (prompt format, frame layout)."""
PROMPT_FORMATS = (
    "<|im_start|>user\n{video}\n{question}<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n{question}\n{video}<|im_end|>\n<|im_start|>assistant\n",
)
"""(video first, question first): SmolLM2-Instruct's chat turn without its default system prompt."""
WEIGHTS_FILE = "model.safetensors"
TRAINED_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")
"""The parameters this model always trains and saves; the language model is loaded separately."""
LM_PREFIXES = ("model.language_model.", "lm_head.")
"""The language model's parameters: trained and saved too when ``config.train_lm`` is ``"full"``."""
TRAIN_LM_MODES = ("none", "full", "lora")
"""``none``: the language model stays frozen (its weights come from ``text_model``); ``full``: it is fine-tuned
whole (attention architecture unchanged) and its weights are stored in the folder; ``lora``: low-rank adapters
(:class:`LoRALinear`) on its attention and MLP projections are trained, then merged into those projections
(:func:`merge_lora`), so the folder stores a plain language model as with ``full``, or (``lora_adapters``) the folder
stores the adapters alone and loading merges them into ``text_model``'s weights."""
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The ``nn.Linear`` submodules of the decoder layers that :func:`add_lora` wraps."""


class NammVideoLlavaConfig(PretrainedConfig):
    """Configuration of :class:`NammVideoLlavaForConditionalGeneration`.

    Args:
        vision_model: timm model name of the vision tower (a ``VisionTransformer``; created with
            ``pretrained=False`` and the dimensions below, which override the name's).
        image_size: frame height and width the vision tower takes (the processor resizes to it).
        patch_size, vision_embed_dim, vision_depth, vision_heads, vision_mlp_ratio: ViT dimensions.
        tokens_per_frame: language-model tokens per frame (a square number dividing the patch grid:
            the patch features are average-pooled to a ``sqrt(tokens_per_frame)`` square grid).
        projector_hidden_act: activation between the projector's two linear layers.
        text_config: the language model's config (a ``LlamaConfig`` or its dict).
        text_model: name or folder of the language model for :func:`namm_transfer.models.load_model`.
        video_token: the text marker of the video in prompts (expanded by the processor).
        video_token_id: the placeholder id the marker is expanded to (any id of the vocabulary: its
            embedding is replaced by the video features; default 16, ``<empty_output>`` in SmolLM2's).
        image_mean, image_std: pixel normalization after scaling to [0, 1].
        train_lm: :data:`TRAIN_LM_MODES`; with ``"full"`` or ``"lora"`` (merged) the folder's weights hold the
            fine-tuned language model (its tied head once), loaded over ``text_model``'s.
        lora_rank, lora_alpha: the LoRA adapters' rank and scale numerator (``train_lm="lora"``).
        lora_adapters: with ``train_lm="lora"``, the folder stores the adapters only (unmerged, a few MB: the
            shippable form) and :meth:`~NammVideoLlavaForConditionalGeneration.from_pretrained` attaches them to
            ``text_model``'s weights and merges them; False: it stores the merged language model.
    """

    model_type = MODEL_TYPE
    sub_configs = {"text_config": LlamaConfig}

    def __init__(
        self,
        vision_model: str = "vit_tiny_patch16_224",
        image_size: int = 64,
        patch_size: int = 8,
        vision_embed_dim: int = 192,
        vision_depth: int = 6,
        vision_heads: int = 3,
        vision_mlp_ratio: float = 4.0,
        tokens_per_frame: int = 16,
        projector_hidden_act: str = "gelu",
        text_config: LlamaConfig | dict[str, Any] | None = None,
        text_model: str = "smollm2-135m",
        video_token: str = "<video>",
        video_token_id: int = 16,
        image_mean: tuple[float, ...] | list[float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] | list[float] = (0.5, 0.5, 0.5),
        train_lm: str = "none",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_adapters: bool = False,
        **kwargs: Any,
    ) -> None:
        if isinstance(text_config, dict):
            text_config = LlamaConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
        self.text_config = text_config if text_config is not None else LlamaConfig()
        self.vision_model = vision_model
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.vision_embed_dim = int(vision_embed_dim)
        self.vision_depth = int(vision_depth)
        self.vision_heads = int(vision_heads)
        self.vision_mlp_ratio = float(vision_mlp_ratio)
        self.tokens_per_frame = int(tokens_per_frame)
        self.projector_hidden_act = projector_hidden_act
        self.text_model = text_model
        self.video_token = video_token
        self.video_token_id = int(video_token_id)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        if train_lm not in TRAIN_LM_MODES:
            raise ValueError(f"train_lm must be one of {TRAIN_LM_MODES}, got {train_lm!r}")
        self.train_lm = train_lm
        self.lora_rank = int(lora_rank)
        self.lora_alpha = float(lora_alpha)
        self.lora_adapters = bool(lora_adapters)
        if self.lora_adapters and train_lm != "lora":
            raise ValueError(f"lora_adapters needs train_lm='lora', got train_lm={train_lm!r}")
        super().__init__(**kwargs)
        self.validate_dims()

    @property
    def pool_grid(self) -> int:
        """Side of the pooled token grid of one frame (``sqrt(tokens_per_frame)``)."""
        return math.isqrt(self.tokens_per_frame)

    def validate_dims(self) -> None:
        """``ValueError`` for dimensions that do not fit together."""
        grid, side = divmod(self.image_size, self.patch_size)
        p = self.pool_grid
        if side or grid < 1:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if p * p != self.tokens_per_frame or p < 1 or grid % p:
            raise ValueError(
                f"tokens_per_frame {self.tokens_per_frame} must be a square k*k with k dividing the "
                f"{grid}x{grid} patch grid"
            )
        if self.vision_embed_dim % self.vision_heads:
            raise ValueError(f"vision_embed_dim {self.vision_embed_dim} is not divisible by {self.vision_heads} heads")
        if not 0 <= self.video_token_id < int(self.text_config.vocab_size):
            raise ValueError(f"video_token_id {self.video_token_id} is outside the vocabulary")


class LoRALinear(nn.Module):
    """``base(x) + scale * (x A^T) B^T``: a frozen ``nn.Linear`` plus a trainable rank-``rank`` update.

    ``lora_a`` (rank, in) starts Gaussian with std ``1 / rank``, ``lora_b`` (out, rank) at zero, so a fresh adapter
    leaves the output unchanged; ``scale = alpha / rank``. Input (..., in), output (..., out).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.base.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(torch.randn(rank, w.shape[1], device=w.device, dtype=torch.float32) / rank)
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=torch.float32))
        self.scale = float(alpha) / rank

    def forward(self, x: Tensor) -> Tensor:
        update = (x.to(self.lora_a.dtype) @ self.lora_a.T) @ self.lora_b.T
        return self.base(x) + (self.scale * update).to(x.dtype)

    def merged(self) -> nn.Linear:
        """The base layer with the update added to its weight (``W + scale * B A``)."""
        with torch.no_grad():
            delta = (self.lora_b @ self.lora_a) * self.scale
            self.base.weight.add_(delta.to(self.base.weight.dtype))
        return self.base


def add_lora(language_model: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """Wrap every :data:`LORA_TARGETS` ``nn.Linear`` of ``language_model`` in a :class:`LoRALinear` (in place);
    returns the adapters' parameters. The rest of the language model is frozen."""
    language_model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for module in list(language_model.modules()):
        for name in LORA_TARGETS:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                wrapped = LoRALinear(child, rank, alpha)
                setattr(module, name, wrapped)
                params += [wrapped.lora_a, wrapped.lora_b]
    if not params:
        raise ValueError(f"the language model has none of the LoRA target projections {LORA_TARGETS}")
    return params


def merge_lora(language_model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` of ``language_model`` by its merged ``nn.Linear``; returns how many."""
    n = 0
    for module in list(language_model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
                n += 1
    return n


def build_vision_tower(config: NammVideoLlavaConfig) -> nn.Module:
    """The timm Vision Transformer of ``config`` (random weights; timm's own initialization)."""
    import timm

    return timm.create_model(
        config.vision_model,
        pretrained=False,
        num_classes=0,
        global_pool="",
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.vision_embed_dim,
        depth=config.vision_depth,
        num_heads=config.vision_heads,
        mlp_ratio=config.vision_mlp_ratio,
    )


class NammVideoLlavaProjector(nn.Module):
    """``Linear(vision, text) -> act -> Linear(text, text)``, as LLaVA's multi-modal projector."""

    def __init__(self, config: NammVideoLlavaConfig) -> None:
        super().__init__()
        from transformers.activations import ACT2FN

        hidden = int(config.text_config.hidden_size)
        self.linear_1 = nn.Linear(config.vision_embed_dim, hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class NammVideoLlavaPreTrainedModel(PreTrainedModel):
    config_class = NammVideoLlavaConfig
    config: NammVideoLlavaConfig
    base_model_prefix = "model"
    input_modalities = ["video", "text"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: timm and torch initialize the new modules; the language model comes trained."""


def _cache_is_filled(kwargs: dict[str, Any]) -> bool:
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length") and int(cache.get_seq_length()) > 0:
            return True
    return False


class NammVideoLlavaModel(NammVideoLlavaPreTrainedModel):
    """Vision tower, projector and the base language model (no head), as transformers' ``VideoLlavaModel``."""

    def __init__(self, config: NammVideoLlavaConfig, language_model: nn.Module | None = None) -> None:
        super().__init__(config)
        self.vision_tower = build_vision_tower(config)
        self.multi_modal_projector = NammVideoLlavaProjector(config)
        self.post_init()  # before the language model joins: it must not be re-initialized
        if language_model is None:
            from transformers import LlamaModel

            language_model = LlamaModel(config.text_config)
        self.language_model = language_model

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()  # type: ignore[operator,no-any-return]

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)  # type: ignore[operator]

    def get_video_features(
        self, pixel_values_videos: Tensor, project: bool = True, **kwargs: Any
    ) -> BaseModelOutputWithPooling:
        """Video features in the language model's embedding space.

        Args:
            pixel_values_videos: (batch, frames, 3, image_size, image_size), normalized as the
                processor does.
            project: False: ``pooler_output`` holds the pooled vision features (batch * frames, tokens_per_frame,
                vision_embed_dim), before the projector (vision pretraining).

        Returns:
            ``last_hidden_state`` (batch * frames, patches, vision_embed_dim): the vision tower's
            patch features; ``pooler_output`` (batch * frames, tokens_per_frame, text hidden): the
            projected, pooled tokens of every frame in frame order (row-major within a frame).
        """
        c = self.config
        pv = pixel_values_videos
        if not isinstance(pv, Tensor) or pv.ndim != 5 or pv.shape[2] != 3 or pv.shape[-2:] != (c.image_size,) * 2:
            shape = tuple(pv.shape) if isinstance(pv, Tensor) else type(pv).__name__
            raise ValueError(
                f"pixel_values_videos must be (batch, frames, 3, {c.image_size}, {c.image_size}) as the processor "
                f"makes them, got {shape}"
            )
        b, f = pv.shape[:2]
        param = next(self.vision_tower.parameters())
        x = pv.reshape(b * f, *pv.shape[2:]).to(param.device, param.dtype)
        tower: Any = self.vision_tower
        feats = tower.forward_features(x)[:, int(getattr(tower, "num_prefix_tokens", 0)) :]  # (N, patches, D)
        grid = c.image_size // c.patch_size
        if feats.shape[1] != grid * grid:
            raise RuntimeError(f"the vision tower returned {feats.shape[1]} patch features, expected {grid * grid}")
        pooled = feats
        if c.pool_grid != grid:
            sq = feats.transpose(1, 2).reshape(b * f, -1, grid, grid)
            k = grid // c.pool_grid
            pooled = nn.functional.avg_pool2d(sq, kernel_size=k, stride=k).flatten(2).transpose(1, 2)
        tokens = self.multi_modal_projector(pooled) if project else pooled
        return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=tokens)

    def get_placeholder_mask(
        self, input_ids: Tensor, inputs_embeds: Tensor, video_features: Tensor | None = None
    ) -> tuple[None, Tensor]:
        """``(image mask: None, video mask (B, T, 1) bool)``; ``ValueError`` when the counts differ."""
        mask = input_ids == self.config.video_token_id
        n = int(mask.sum())
        if video_features is not None and n * inputs_embeds.shape[-1] != video_features.numel():
            per = video_features.numel() // max(1, inputs_embeds.shape[-1])
            raise ValueError(
                f"the prompt holds {n} video placeholder tokens but the video gives {per} features "
                f"({self.config.tokens_per_frame} per frame): build inputs with the model's processor"
            )
        return None, mask.unsqueeze(-1).to(inputs_embeds.device)

    def merge(
        self, input_ids: Tensor, pixel_values_videos: Tensor | None, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        """Embeddings of ``input_ids`` with the video placeholders replaced by the video features (B, T, hidden)."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values_videos is None:
            return inputs_embeds
        pooled = self.get_video_features(pixel_values_videos).pooler_output
        assert pooled is not None
        feats = pooled.to(inputs_embeds.device, inputs_embeds.dtype)
        _, mask = self.get_placeholder_mask(input_ids, inputs_embeds, feats)
        return inputs_embeds.masked_scatter(mask, feats.reshape(-1, inputs_embeds.shape[-1]))

    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Merge the video into the prompt and run the language model (its output, ``last_hidden_state`` first).

        The other arguments (``attention_mask``, ``position_ids``, the cache: ``cache`` / ``past_key_values``,
        ``use_cache``) pass through to the language model. Pixels are ignored on a decoding step (no
        placeholder in ``input_ids`` and a filled cache).
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("give input_ids or inputs_embeds")
        if pixel_values_videos is not None:
            if input_ids is None:
                raise ValueError("pixel_values_videos needs input_ids (to find the video placeholders)")
            if not bool((input_ids == self.config.video_token_id).any()):
                if not _cache_is_filled(kwargs):
                    raise ValueError(
                        f"pixel_values_videos given but the prompt holds no video placeholder "
                        f"(id {self.config.video_token_id}); build inputs with the model's processor"
                    )
                pixel_values_videos = None
        if input_ids is not None:
            inputs_embeds = self.merge(input_ids, pixel_values_videos, inputs_embeds)
        return self.language_model(inputs_embeds=inputs_embeds, **kwargs)


class NammVideoLlavaForConditionalGeneration(NammVideoLlavaPreTrainedModel, GenerationMixin):
    """The video LLM: :class:`NammVideoLlavaModel` (``model``) and the language model's head (``lm_head``).

    Build one around a (frozen) causal LM with ``NammVideoLlavaForConditionalGeneration(config, lm)``;
    without ``lm`` a random ``LlamaForCausalLM`` of ``config.text_config`` is made (tests).
    """

    video_llm_family = FAMILY
    video_prompt_formats = PROMPT_FORMATS
    trailing_video_tokens = 0

    def __init__(self, config: NammVideoLlavaConfig, language_model: nn.Module | None = None) -> None:
        super().__init__(config)
        if language_model is None:
            from transformers import LlamaForCausalLM

            language_model = LlamaForCausalLM(config.text_config)
        lm: Any = language_model
        head = lm.get_output_embeddings()
        if head is None or not hasattr(lm, "model"):
            raise TypeError(f"expected a causal LM with .model and an output head, got {type(lm).__name__}")
        _check_text_config(config, lm.config)
        config.text_config = lm.config  # one config object for the language model, the cache and generate
        self.model = NammVideoLlavaModel(config, lm.model)
        self.lm_head = head
        if getattr(lm, "generation_config", None) is not None:
            self.generation_config = copy.deepcopy(lm.generation_config)
        ref = next(lm.parameters())
        self.model.vision_tower.to(ref.device)
        self.model.multi_modal_projector.to(ref.device)

    # ----- Hugging Face plumbing ---------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def get_video_features(self, pixel_values_videos: Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        return self.model.get_video_features(pixel_values_videos, **kwargs)

    # ----- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of the last ``logits_to_keep`` positions (0: all), and the loss when ``labels`` are given.

        Args:
            input_ids: (B, T) with the processor's video placeholders.
            pixel_values_videos: (B, frames, 3, image_size, image_size).
            attention_mask: (B, T), 1 for tokens, 0 for padding (pad on the right for training).
            labels: (B, T) token ids, -100 where no loss is taken; shifted inside (position t
                predicts ``labels[:, t + 1]``). The loss is the mean cross-entropy over labelled
                tokens, with the head applied to those positions only.
        """
        out = self.model(
            input_ids=input_ids,
            pixel_values_videos=pixel_values_videos,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        hidden = out.last_hidden_state
        loss = None
        if labels is not None:
            logits_l, targets = self.label_logits(hidden, labels)
            loss = nn.functional.cross_entropy(logits_l.float(), targets)
        kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        rest = {k: v for k, v in out.items() if k != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=self.lm_head(kept), **rest)

    def label_logits(self, hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Logits where a label is predicted: ``(logits (N, vocab), targets (N,))``, in (batch, position) order.

        ``hidden`` (B, T, hidden) are the language model's last hidden states; position ``t``
        predicts ``labels[:, t + 1]`` (labels of -100 are skipped).
        """
        if labels.shape != hidden.shape[:2]:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the sequence {tuple(hidden.shape[:2])}")
        nxt = labels[:, 1:].to(hidden.device)
        where = nxt != -100
        if not bool(where.any()):
            raise ValueError("labels hold no token to predict (all -100 after the first position)")
        return self.lm_head(hidden[:, :-1][where]), nxt[where]

    # ----- save / load (vision tower and projector; the language model too when it is trained) ----------------
    def _has_lora(self) -> bool:
        return any(isinstance(m, LoRALinear) for m in self.model.language_model.modules())

    def _is_trained(self, name: str, lora: bool) -> bool:
        if name.startswith(TRAINED_PREFIXES):
            return True
        if lora:  # during LoRA training: the adapters only
            return name.startswith(LM_PREFIXES) and (".lora_a" in name or ".lora_b" in name)
        return getattr(self.config, "train_lm", "none") != "none" and name.startswith(LM_PREFIXES)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What training changes and a folder stores: the vision tower's and projector's tensors, and with
        ``config.train_lm`` ``"full"`` or ``"lora"`` the language model's (a head tied to the input embeddings once,
        as ``model.language_model.embed_tokens.weight``); while LoRA adapters are attached, their tensors instead."""
        state = self.state_dict()
        lora = self._has_lora()
        out = {k: v for k, v in state.items() if self._is_trained(k, lora)}
        head = out.get("lm_head.weight")
        emb = out.get("model.language_model.embed_tokens.weight")
        if head is not None and emb is not None and head.data_ptr() == emb.data_ptr():
            del out["lm_head.weight"]
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters of :meth:`trainable_state_dict` (each once)."""
        lora = self._has_lora()
        return [p for n, p in self.named_parameters() if self._is_trained(n, lora)]

    def language_model_parameters(self) -> list[nn.Parameter]:
        """The language model's trained parameters (each once; a tied head is the input embedding; the adapters'
        while LoRA adapters are attached)."""
        lora = self._has_lora()
        return [p for n, p in self.named_parameters() if n.startswith(LM_PREFIXES) and self._is_trained(n, lora)]

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | os.PathLike[str], processor: Any = None, **kwargs: Any
    ) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (:meth:`trainable_state_dict`: vision tower + projector,
        and the language model when ``config.train_lm`` is ``"full"`` or ``"lora"``: merged, or with
        ``config.lora_adapters`` its LoRA adapters only, which must then be attached).

        With ``processor`` its ``processor_config.json`` is written too. Returns the folder.
        """
        from safetensors.torch import save_file

        if getattr(self.config, "lora_adapters", False):
            if not self._has_lora():
                raise ValueError(
                    "config.lora_adapters is set but no LoRA adapters are attached (a loaded model has them merged): "
                    "save the training run's model, or set config.lora_adapters = False to store the merged weights"
                )
        elif self._has_lora():
            raise ValueError(
                "merge the LoRA adapters first (merge_lora(model.model.language_model)): a folder stores a plain "
                "language model"
            )
        if kwargs:
            logger.debug("save_pretrained ignores %s", sorted(kwargs))
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(self.config)
        cfg.architectures = [type(self).__name__]
        cfg.save_pretrained(str(out))
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.trainable_state_dict().items()}
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "model_type": MODEL_TYPE})
        if processor is not None:
            processor.save_pretrained(out)
        return out

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *model_args: Any,
        language_model: nn.Module | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        merge: bool = True,
        **kwargs: Any,
    ) -> NammVideoLlavaForConditionalGeneration:
        """Load a folder written by :meth:`save_pretrained` around ``language_model``.

        Without ``language_model``, ``config.text_model`` is loaded with
        :func:`namm_transfer.models.load_model` (``device``, ``dtype``; sdpa attention). The vision
        tower and projector are kept in float32 on a CPU and take ``dtype`` elsewhere. A folder of LoRA adapters
        (``config.lora_adapters``) gets them attached to the language model (float32) and merged into its projections
        (``merge=False``: left attached, as in training).
        """
        from safetensors.torch import load_file

        folder = Path(pretrained_model_name_or_path).expanduser()
        if model_args or kwargs:
            logger.debug("from_pretrained ignores %s", [*model_args, *sorted(kwargs)])
        if not is_video_model_folder(folder):
            raise FileNotFoundError(f"{folder} is not a {MODEL_TYPE} model folder (config.json + {WEIGHTS_FILE})")
        config = NammVideoLlavaConfig.from_pretrained(str(folder))
        if language_model is None:
            from namm_transfer.models import load_model

            language_model, _ = load_model(config.text_model, device=device or "cpu", dtype=dtype or "float32")
        model = cls(config, language_model)
        adapters = bool(getattr(config, "lora_adapters", False))
        if adapters:
            add_lora(model.model.language_model, config.lora_rank, config.lora_alpha)
        weights = load_file(str(folder / WEIGHTS_FILE))
        expected = set(model.trainable_state_dict())
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{folder / WEIGHTS_FILE} does not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        model.load_state_dict(weights, strict=False)
        if adapters and merge:
            merge_lora(model.model.language_model)
        if dtype is not None and str(device or "cpu") != "cpu":
            from namm_transfer.models import _torch_dtype

            model.model.vision_tower.to(_torch_dtype(dtype))
            model.model.multi_modal_projector.to(_torch_dtype(dtype))
        return model.eval()


def _check_text_config(config: NammVideoLlavaConfig, lm_config: Any) -> None:
    want = config.text_config
    diffs = [
        f"{k}: {getattr(lm_config, k, None)} != {getattr(want, k, None)}"
        for k in ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
        if getattr(lm_config, k, None) != getattr(want, k, None)
    ]
    if diffs:
        raise ValueError(f"the language model does not match the video model's text_config ({'; '.join(diffs)})")


# ----- folders, shipped models, loading --------------------------------------------------------------------
def is_video_model_folder(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding a ``namm_video_llava`` config.json and its weights."""
    folder = Path(path).expanduser()
    cfg = folder / "config.json"
    if not cfg.is_file() or not (folder / WEIGHTS_FILE).is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def shipped_video_dir() -> Path:
    """``namm_transfer/weights/video``: where the video models shipped with the package live."""
    import namm_transfer

    return Path(namm_transfer.__file__).resolve().parent / "weights" / "video"


def missing_shipped_message(name: str) -> str:
    """Why a shipped video model is missing, and the command that makes it."""
    return (
        f"no shipped video model {name!r} (looked in {shipped_video_dir() / name}). Create it with "
        f"`namm-transfer video train --preset device --ship {name}` (on a GPU: training/device.sh), "
        "or pass --model with a model folder or a hub id"
    )


def resolve_shipped(name: str) -> Path:
    """The folder of the shipped video model ``name`` (``shipped:NAME`` also accepted).

    Raises ``FileNotFoundError`` naming the command that creates it when it is not there.
    """
    bare = name.split(":", 1)[1] if name.startswith("shipped:") else name
    folder = shipped_video_dir() / bare
    if not is_video_model_folder(folder):
        raise FileNotFoundError(missing_shipped_message(bare))
    return folder


def load_video_model(
    path: str | os.PathLike[str],
    device: str = "cpu",
    dtype: str | None = None,
    *,
    language_model: Any = None,
    tokenizer: Any = None,
) -> tuple[NammVideoLlavaForConditionalGeneration, Any]:
    """``(model, processor)`` of a :class:`NammVideoLlavaForConditionalGeneration` folder (or shipped name).

    The language model and its tokenizer come from ``config.text_model`` through the offline route
    unless given. ``dtype`` defaults to bfloat16 on CUDA and float32 on the CPU; eval mode.
    """
    from .processor import NammVideoLlavaProcessor

    folder = Path(path).expanduser()
    if not folder.is_dir():
        folder = resolve_shipped(str(path))
    if not is_video_model_folder(folder):
        raise FileNotFoundError(f"{folder} is not a {MODEL_TYPE} model folder (config.json + {WEIGHTS_FILE})")
    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    if language_model is None or tokenizer is None:
        from namm_transfer.models import load_model

        config = NammVideoLlavaConfig.from_pretrained(str(folder))
        lm, tok = load_model(config.text_model, device=device, dtype=dtype)
        language_model = language_model if language_model is not None else lm
        tokenizer = tokenizer if tokenizer is not None else tok
    model = NammVideoLlavaForConditionalGeneration.from_pretrained(
        folder, language_model=language_model, device=device, dtype=dtype
    )
    processor = NammVideoLlavaProcessor.from_pretrained(folder, tokenizer=tokenizer)
    return model, processor
