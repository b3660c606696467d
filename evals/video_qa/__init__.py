"""Video QA evaluation: frame reading, benchmark readers, prompts, scoring and a synthetic benchmark.

Importing this package is cheap (no numpy, torch, decord or PyAV); the names below load their
module on first use.

- :mod:`.video_io`: ``read_frames``, ``sample_indices``, ``VideoError`` (decord, PyAV fallback);
- :mod:`.benchmarks`: ``QASample``, ``load_longvideobench``, ``load_mlvu``, ``load_videomme``,
  ``build_prompt``, ``parse_answer``, ``score_response``, ``accuracy``, ``mlvu_m_avg``;
- :mod:`.synthetic`: ``generate_benchmark``, a procedurally generated long-video QA set in the
  LongVideoBench layout;
- :mod:`.run`: ``namm-transfer eval --target video-llava`` (``add_arguments``, ``main``) and its
  helpers: ``load_video_llm``, ``find_annotations``, ``load_samples``, ``synthetic_benchmark``,
  ``peak_cache_mb``, ``token_kept_fractions``, ``plot_kept_frames``, and the tiny random models of
  mechanics-only runs (``tiny_video_llm``, ``make_tiny_model``, ``is_mechanics_only``);
- :mod:`.model` / :mod:`.processor`: the project's own small video model (timm ViT + projector +
  frozen SmolLM2; ``NammVideoLlavaForConditionalGeneration``, ``NammVideoLlavaProcessor``,
  ``load_video_model``); :mod:`.train` (``train_video_model``, ``ship_video_model``; with
  :mod:`.train_data` and :mod:`.train_card`) and :mod:`.cli_train` (``namm-transfer video train``).
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "VideoError": "video_io",
    "read_frames": "video_io",
    "sample_indices": "video_io",
    "video_info": "video_io",
    "QASample": "benchmarks",
    "accuracy": "benchmarks",
    "build_prompt": "benchmarks",
    "build_longvideobench_prompt": "benchmarks",
    "build_mlvu_prompt": "benchmarks",
    "build_videomme_prompt": "benchmarks",
    "load_longvideobench": "benchmarks",
    "load_mlvu": "benchmarks",
    "load_videomme": "benchmarks",
    "mlvu_m_avg": "benchmarks",
    "parse_answer": "benchmarks",
    "score_response": "benchmarks",
    "generate_benchmark": "synthetic",
    "find_annotations": "run",
    "is_mechanics_only": "run",
    "load_samples": "run",
    "load_video_llm": "run",
    "make_tiny_model": "run",
    "peak_cache_mb": "run",
    "plot_kept_frames": "run",
    "synthetic_benchmark": "run",
    "tiny_video_llm": "run",
    "token_kept_fractions": "run",
    "NammVideoLlavaConfig": "model",
    "NammVideoLlavaForConditionalGeneration": "model",
    "load_video_model": "model",
    "NammVideoLlavaProcessor": "processor",
    "VideoTrainConfig": "train",
    "ship_video_model": "train",
    "train_video_model": "train",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
