"""``namm-transfer eval --target video-llava``: memory policies on multiple-choice video QA.

::

    namm-transfer eval --target video-llava --model <hub id or folder> \\
        --bench longvideobench|mlvu|videomme|synthetic --data-dir DIR [--frames N] \\
        [--policies full,namm,h2o,tova,l2,streaming,random] [--protocols ratio:0.5,ratio:0.25,threshold] \\
        [--no-noise-floor] [--update-interval 256] [--max-new-tokens 32]

Without ``--model`` the model is the project's own small video LLM (:data:`DEFAULT_MODEL`, shipped in
``namm_transfer/weights/video/``; a SmolLM2-135M behind a small ViT, made by ``namm-transfer video train``)
on the synthetic benchmark's held-out split, so the default runs offline.

What one sample does:

1. ``--frames N`` frames are read, uniformly sampled (:func:`~.video_io.read_frames`, ``--frame-sampling``
   ``center``: the centre frame of each of N equal segments; ``linspace``: first to last frame). N is
   recorded in the settings and in every record (default: 8 for Video-LLaVA, its training setting;
   32 for LLaVA-NeXT-Video and LLaVA-OneVision, their reference video evaluations, and for the project's
   own model, its training setting).
2. The prompt is the benchmark's reference text (:func:`~.benchmarks.build_prompt`: LongVideoBench and
   Video-MME list "A. ..." options and end "Answer with the option's letter from the given choices
   directly."; MLVU ends "Best option: ("), wrapped in the model's own chat format with the video
   first (:func:`namm_transfer.adapters.video_llm.format_prompt`); the template is recorded.
   The model's own processor and vision tower build the merged embeddings once per sample, shared by
   every policy.
3. The full cache runs once (protocol null), then, with the noise floor on (the default;
   ``--no-noise-floor`` turns it off), once more as ``full-alt`` with half the prefill chunk size
   (:func:`alt_chunk_size`): a setting that must not change a full cache's answers, so ``full-alt``'s
   paired difference from ``full`` is the noise floor of every comparison (the summary's
   ``settings.noise_floor`` describes it). Then, for each matched-budget protocol of ``--protocols``
   (:mod:`namm_transfer.protocols`; default ``ratio:0.5,ratio:0.25,threshold``), the NAMM first and
   then every baseline:

   - ``ratio:R`` (label ``ratio-50``): every baseline gets ``RatioBudget(R)`` and the NAMM keeps its own
     top share of scores (``NAMMPolicy(net, budget=RatioBudget(R))``): ``floor(R x tokens seen)`` tokens in
     every managed layer and KV head at every update and once more at the end of the prompt (the
     engine's ``final_update``), so the answer is decoded from a cache held to the budget. The share is
     of **all tokens seen** (video, prompt text and generated tokens), not of the video tokens alone;
     ``retained_video`` (the video share kept) is reported beside ``retained_cache`` in every record
     and row.
   - ``threshold`` (the paper's): the NAMM keeps the tokens it scores at or above its threshold, and
     every baseline runs at NAMM's cache size: a :class:`~namm_transfer.policies.base.ReplayBudget` of
     NAMM's per-update, per-layer, per-head kept counts for the same sample (``--budget namm``, the
     default). ``--budget 0.25`` or ``256t`` gives these baselines that fixed budget instead (needed to
     run them without NAMM). No update at the end of the prompt, as before.
4. Greedy decoding generates exactly ``--max-new-tokens`` tokens for every policy, with no early stop:
   a replayed budget needs the same update steps as NAMM's run, and decoding past EOS may cross
   an update boundary. The text is then cut at the first EOS (the model's ``eos_token_id`` and the
   tokenizer's) or other special token of the tokenizer (such as a new chat turn's ``<|im_start|>``, which
   is never part of an answer) before parsing, so the answer is what ``generate`` would have returned.
5. The answer is parsed with :func:`~.benchmarks.parse_answer`: the first standalone capital letter
   among the options' letters. Fallback when there is none (``--answer-fallback``): ``none`` (the
   default) records no prediction and scores it wrong; ``random`` draws an option with a generator
   seeded by ``(--seed, sample id)``, as the reference evaluations do. Either way ``used_fallback``
   is recorded.

A video that is missing, empty or cannot be decoded is recorded for that sample (one record per
policy with an ``error`` field and ``score: null``) and the run goes on; the next run of the same command
(resuming the file) tries those units again. A benchmark record without options is a data error and stops the run
before any model is loaded, with a message naming the sample.

Records (``NAME.jsonl``, key ``"{policy}@{protocol label}/{sample id}"``, or ``"{policy}/{sample id}"``
for ``full`` and ``full-alt``): policy, protocol (the label, null for the full cache), id, category,
duration_group, correct, score (100 or 0), prediction (letter), response (text up to EOS), budget,
final_update, chunk_size, retained_cache, retained_video, retained_text, peak_cache_mb, throughput,
seconds, frames, frame_indices, prompt tokens; ``frame_kept_end`` (per-frame kept fraction at the end,
mean over managed layers and KV heads) for every policy; under a protocol also ``kept_counts`` (per
update, layer and head: what the threshold baselines replay, so a resumed run replays them without
rerunning NAMM), ``update_clock`` and ``update_seen`` (tokens seen at each update); for NAMM also
``frame_kept_updates`` (after each update) and ``frame_kept_end_layers`` (per managed layer and frame,
at the end, mean over KV heads).

- ``peak_cache_mb``: the largest number of live KV bytes over the forward calls of the sample: live
  tokens per managed layer from the engine statistics (just before each update and after every
  call), times ``2 (K and V) x kv_heads x head_dim x bytes per element`` from the model's config and
  dtype; layers the policy does not manage (sliding-window) count ``min(tokens, sliding_window)``.
  ``peak_memory_mb`` is ``torch.cuda.max_memory_allocated`` during the policy's run on a GPU (model
  weights and activations included), and the KV-cache peak on the CPU; ``peak_memory_source`` says which.
- ``throughput``: (prompt tokens + generated tokens) / seconds of prefill and decoding (the vision
  tower, shared by every policy, is not counted).
- ``retained_cache`` / ``retained_video`` / ``retained_text``: the engine's and the
  :class:`~namm_transfer.adapters.video_llm.EvictionRecord`'s, over the managed layers (every
  full-attention layer of the language model; the summary names them).

Summary (``NAME.json``): one row per (protocol, policy), in the order the units run (``full``,
``full-alt``, then each protocol's NAMM and baselines), with ``policy``, ``protocol`` (null for
``full`` and ``full-alt``), ``score`` = accuracy % (MLVU: M-Avg, the mean over task types, with the
overall accuracy in ``accuracy``), ``score_std`` (population std of the per-sample 0/100 scores; MLVU:
over task types), ``n``, ``n_missing`` (failed samples and questions without an answer), ``n_errors``,
``n_fallback``, retained_cache, retained_video, retained_text, peak_cache_mb, peak_memory_mb,
throughput, and the paired intervals (:func:`paired_rows`, :func:`namm_transfer.stats.compare_policies`,
stratified paired bootstrap, 2000 resamples, 95%): ``vs_full``, the row's per-question score minus the
full cache's on the same questions, and ``vs_namm``, minus the NAMM's of the same protocol (unit = question
id, stratum = category: the mean is the mean over categories of the within-category mean difference,
which is the score difference when the categories hold as many questions each, as in the synthetic
benchmark, and MLVU's M-Avg difference); absent where there is no reference (the ``full`` row; the NAMM's
``vs_namm``; ``full-alt`` has ``vs_full`` only). ``breakdown`` per ``category`` and per
``duration_group`` where the benchmark has them, the same rows and intervals within each group; the
managed layers. Without ``--output`` the files are ``runs/video-llava/video-llava-<bench>.json(l)``
(relative to the current folder).

Data: ``--bench synthetic`` (the default) reads the synthetic benchmark's test split
(:mod:`.synthetic`: ``--synthetic-videos`` 50 videos of ``--synthetic-frames`` 64 frames at 4 fps,
``--synthetic-size`` 64 pixels), generated on first use into ``--data-dir`` or
``<cache>/video_qa/synthetic-test-n50-f64-s64-seed0`` (``<cache>``: ``$NAMM_TRANSFER_CACHE`` or
``~/.cache/namm-transfer``). The other benchmarks read ``--annotations`` or the file found in
``--data-dir`` (:func:`find_annotations`). The annotation file's sha256 is part of the settings.

Tiny random models: ``mechanics_only`` is set in the settings when ``--mechanics-only`` is given,
when the model folder holds a ``namm_transfer_tiny.json`` marker (written by
:func:`make_tiny_model`), or when the language model's hidden size is under 256 (no released video
LLM is that small; the smallest LLaVA-OneVision has 896). Such runs are labelled "tiny random model:
measures mechanics and cache, not accuracy". ``--model tiny`` (or ``tiny:<family>``) builds such a
model into the cache folder for a smoke run without the hub.

Pictures (80 dpi, need matplotlib; none with ``--plot-samples 0``): ``NAME.kept-layers.png``
(:func:`plot_kept_layers`): for the NAMM of each protocol, one heatmap of the kept fraction of every
frame (x) in every managed layer (y) at the end, mean over the samples. ``NAME.kept-frames.png``
(:func:`plot_kept_frames`), for the NAMM of the first protocol (``kept_frames_protocol`` in the summary):
for the first ``--plot-samples`` samples (default 3), NAMM's kept fraction of every frame after
every update; for the first, its frames as thumbnails titled with their kept fraction at their
first eviction and at the end, and the patch-level kept map of its most-kept frame when the frame's
tokens form a square grid (Video-LLaVA's CLS token, the first of each frame, is reported apart).
NAMM's records of those samples (every protocol) carry the token-level fractions (``token_kept_first``,
``token_kept_end``, one value per video token in frame order).

Resuming and sharding: rerunning the same command skips the units (protocol, policy, sample) already
in ``NAME.jsonl``. Under
torchrun / accelerate (``RANK``, ``WORLD_SIZE``) each rank evaluates ``select_shard(samples)`` into
``NAME.rank{r}-of{w}.jsonl``; ``namm-transfer report --merge 'NAME.rank*-of*.jsonl' --output NAME.json``
merges them and one more single-process run of the same command writes the summary.

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

from namm_transfer.evals.args import default_output
from namm_transfer.evals.args import nonnegative_int as _nonneg_int
from namm_transfer.evals.args import positive_int as _pos_int

from namm_transfer.protocols import DEFAULT_PROTOCOLS, Protocol

__all__ = [
    "BENCHES",
    "DEFAULT_FRAMES",
    "DEFAULT_MODEL",
    "FULL_ALT",
    "MODEL_CLASSES",
    "SYNTHETIC_DEFAULTS",
    "TINY_FAMILIES",
    "TINY_MARKER",
    "Unit",
    "add_arguments",
    "alt_chunk_size",
    "byte_level_tokenizer",
    "find_annotations",
    "frame_kept_end_layers",
    "is_mechanics_only",
    "kv_bytes_per_token",
    "load_samples",
    "load_video_llm",
    "main",
    "make_tiny_model",
    "paired_rows",
    "peak_cache_mb",
    "plot_kept_frames",
    "plot_kept_layers",
    "synthetic_benchmark",
    "tiny_text_config",
    "tiny_video_llm",
    "token_kept_fractions",
    "units_of",
]

logger = logging.getLogger(__name__)

BENCHES = ("synthetic", "longvideobench", "mlvu", "videomme")
DEFAULT_MODEL = "smollm2-135m-video"
"""The target's model when ``--model`` is not given: the project's own small video model (a ViT and a
projector trained by ``namm-transfer video train`` around the frozen SmolLM2-135M), shipped in
``namm_transfer/weights/video/<name>/`` (:mod:`.model`). A hub id such as ``LanguageBind/Video-LLaVA-7B-hf``
selects a released model instead."""
DEFAULT_FRAMES = {"video-llava": 8, "llava-next-video": 32, "llava-onevision": 32, "namm-video-llava": 32}
"""Frames per video by family when ``--frames`` is not given (always recorded in the settings)."""
MODEL_CLASSES = {
    "video_llava": "VideoLlavaForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
"""``config.model_type`` -> transformers class that :func:`load_video_llm` instantiates."""
TINY_MARKER = "namm_transfer_tiny.json"
"""A file in a model folder that marks it as a tiny random model (runs are then ``mechanics_only``)."""
TINY_HIDDEN = 256
"""Language models narrower than this are taken for tiny random models."""


class _SyntheticDefaults(TypedDict):
    n_videos: int
    frames_per_video: int
    size: int
    fps: int
    seed: int
    split: str


SYNTHETIC_DEFAULTS: _SyntheticDefaults = {
    "n_videos": 50,
    "frames_per_video": 64,
    "size": 64,
    "fps": 4,
    "seed": 0,
    "split": "test",
}
"""The synthetic benchmark the target generates when ``--bench synthetic`` is given no annotations."""

_PROMPT_BENCH = {
    "synthetic": "longvideobench",
    "longvideobench": "longvideobench",
    "mlvu": "mlvu",
    "videomme": "videomme",
}


class _UsageError(ValueError):
    """A problem with the command's arguments or data; the command reports ``error: ...`` and exits with 2."""


# ----------------------------------------------------------------------------------------------
# command line


def _protocols(text: str) -> tuple[Any, ...]:
    from namm_transfer.protocols import parse_protocols

    try:
        return parse_protocols(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The target's options (the common ones, --model, --policies, --namm, ..., come from the CLI)."""
    g = parser.add_argument_group(
        "video-llava",
        f"default model: {DEFAULT_MODEL}, the project's own video model shipped with the package (made by "
        "`namm-transfer video train --ship NAME`; --model NAME picks another shipped one); a hub id such as "
        "LanguageBind/Video-LLaVA-7B-hf or a save_pretrained folder selects another model; --model tiny (or "
        "tiny:llava-next-video, tiny:llava-onevision) builds a tiny random model for a mechanics-only smoke run",
    )
    g.add_argument(
        "--bench",
        choices=BENCHES,
        default="synthetic",
        help="benchmark (default: synthetic, generated into the cache folder or --data-dir if absent); "
        "without --output the results go to runs/video-llava/video-llava-<bench>.json",
    )
    g.add_argument("--data-dir", help="benchmark root (videos and annotations)")
    g.add_argument("--annotations", help="annotation file (default: found in --data-dir)")
    g.add_argument(
        "--frames",
        type=_pos_int,
        help="frames per video, uniformly sampled (default: 8 for Video-LLaVA, 32 for LLaVA-NeXT-Video / OneVision)",
    )
    g.add_argument(
        "--frame-sampling",
        choices=["center", "linspace"],
        default="center",
        help="uniform rule: segment centres, or first to last frame (default: center)",
    )
    g.add_argument("--update-interval", type=_pos_int, default=256, help="tokens between evictions (default: 256)")
    g.add_argument("--chunk-size", type=_pos_int, default=256, help="prefill chunk length (default: 256)")
    g.add_argument(
        "--max-new-tokens", type=_pos_int, default=32, help="tokens generated for every policy (default: 32)"
    )
    g.add_argument(
        "--budget",
        default="namm",
        help="baselines' budget: 'namm' replays NAMM's cache lengths per sample, layer and update (default); "
        "or a ratio (0.25), a token count (256t)",
    )
    g.add_argument(
        "--protocols",
        type=_protocols,
        default=DEFAULT_PROTOCOLS,
        help="matched-budget protocols, comma-separated: ratio:R (every policy, the NAMM included, keeps the share R "
        "of the tokens seen, also at the end of the prompt), threshold (the NAMM thresholds, the baselines get "
        f"--budget); default: {DEFAULT_PROTOCOLS}",
    )
    g.add_argument(
        "--no-noise-floor",
        dest="noise_floor",
        action="store_false",
        help="do not run the full cache a second time under another prefill chunk size (the full-alt row, whose "
        "difference from full is the noise floor of the paired comparisons; on by default)",
    )
    g.add_argument(
        "--answer-fallback",
        choices=["none", "random"],
        default="none",
        help="when no option letter is found: score as wrong (none, default) or pick a seeded random option",
    )
    g.add_argument(
        "--mechanics-only",
        action="store_true",
        help="label the run as measuring mechanics and cache, not accuracy (automatic for tiny random models)",
    )
    g.add_argument(
        "--plot-samples",
        type=_nonneg_int,
        default=3,
        help="samples shown in NAME.kept-frames.png (0: no picture; default: 3)",
    )
    g.add_argument(
        "--synthetic-videos",
        type=_pos_int,
        default=SYNTHETIC_DEFAULTS["n_videos"],
        help="synthetic benchmark: videos (default: 50)",
    )
    g.add_argument(
        "--synthetic-frames",
        type=_pos_int,
        default=SYNTHETIC_DEFAULTS["frames_per_video"],
        help="synthetic benchmark: frames per video (default: 64, at 4 fps)",
    )
    g.add_argument(
        "--synthetic-size",
        type=_pos_int,
        default=SYNTHETIC_DEFAULTS["size"],
        help="synthetic benchmark: frame size in pixels (default: 64)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the evaluation described by ``args`` (see :func:`add_arguments`); returns the exit code."""
    try:
        return _run(args)
    except _UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------
# data


def synthetic_benchmark(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    n_videos: int = SYNTHETIC_DEFAULTS["n_videos"],
    frames_per_video: int = SYNTHETIC_DEFAULTS["frames_per_video"],
    size: int = SYNTHETIC_DEFAULTS["size"],
    seed: int = SYNTHETIC_DEFAULTS["seed"],
) -> Path:
    """The synthetic benchmark's test split: its json path, generated first when absent.

    ``data_dir`` defaults to ``<cache>/video_qa/synthetic-test-n{n}-f{frames}-s{size}-seed{seed}``
    (``<cache>`` is ``$NAMM_TRANSFER_CACHE`` or ``~/.cache/namm-transfer``). A folder that already
    holds ``synthetic_test.json`` is used as it is, except a default folder made by an older generator (other
    videos for the same records), which is made again.
    """
    from namm_transfer.models import cache_dir

    from .synthetic import GENERATOR_VERSION, generate_benchmark

    split = SYNTHETIC_DEFAULTS["split"]
    if data_dir is None:
        name = f"synthetic-{split}-n{n_videos}-f{frames_per_video}-s{size}-seed{seed}"
        folder = cache_dir() / "video_qa" / name
    else:
        folder = Path(data_dir).expanduser()
    path = folder / f"synthetic_{split}.json"
    if path.is_file():
        if data_dir is not None or _generator_of(path) == GENERATOR_VERSION:
            return path
        logger.info("the cached synthetic benchmark in %s was made by an older generator; making it again", folder)
    logger.info("generating the synthetic video QA benchmark (%d videos) into %s", n_videos, folder)
    return generate_benchmark(
        folder,
        n_videos=n_videos,
        frames_per_video=frames_per_video,
        split=split,
        seed=seed,
        size=size,
        fps=SYNTHETIC_DEFAULTS["fps"],
    )


def _generator_of(path: Path) -> str | None:
    """The ``generator`` of the first record of a synthetic benchmark's json (None if unreadable)."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
        return str(records[0]["generator"])
    except (OSError, ValueError, LookupError, TypeError):
        return None


def find_annotations(bench: str, data_dir: str | os.PathLike[str]) -> Path:
    """The annotation file of ``bench`` inside ``data_dir`` (MLVU: the folder itself).

    Looked for: LongVideoBench ``lvb_val.json`` (else ``synthetic_test.json``, else the only json);
    Video-MME the only parquet / json / jsonl file in ``data_dir`` or ``data_dir/videomme``.
    Raises ``ValueError`` naming the candidates when there is none or more than one.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise _UsageError(f"--data-dir {root} is not a folder")
    if bench == "mlvu":
        return root
    if bench in ("longvideobench", "synthetic"):
        for name in ("lvb_val.json", "synthetic_test.json"):
            if (root / name).is_file():
                return root / name
        found = sorted(root.glob("*.json"))
    else:
        found = sorted(
            p for sub in (root, root / "videomme") for ext in ("parquet", "json", "jsonl") for p in sub.glob(f"*.{ext}")
        )
    if len(found) == 1:
        return found[0]
    what = "no annotation file" if not found else f"{len(found)} candidate files ({', '.join(p.name for p in found)})"
    raise _UsageError(f"{what} for --bench {bench} in {root}; name one with --annotations")


def load_samples(
    bench: str, annotations: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None
) -> list[Any]:
    """Read a benchmark into :class:`~.benchmarks.QASample` objects (``synthetic`` reads as LongVideoBench).

    Raises ``ValueError`` naming the file (and the sample) for an unreadable file, a question without
    options, an answer outside its options, or repeated sample ids.
    """
    from . import benchmarks

    path = Path(annotations)
    try:
        if bench in ("longvideobench", "synthetic"):
            samples = benchmarks.load_longvideobench(path, data_dir)
        elif bench == "mlvu":
            samples = benchmarks.load_mlvu(path)
        elif bench == "videomme":
            samples = benchmarks.load_videomme(path, data_dir)
        else:
            raise _UsageError(f"unknown --bench {bench!r}; expected one of {', '.join(BENCHES)}")
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise _UsageError(f"cannot read the {bench} annotations {path}: {err}") from err
    if not samples:
        raise _UsageError(f"{path} holds no {bench} questions")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise _UsageError(f"{path}: sample ids are not unique ({', '.join(dup)}); results are keyed by id")
    return samples


# ----------------------------------------------------------------------------------------------
# tiny random models (mechanics-only runs, tests, notebooks)

_TINY_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>", "<|im_start|>", "<|im_end|>"]
_TINY_PINPOINTS = [[32, 32], [32, 64], [64, 32]]
TINY_FAMILIES = ("video-llava", "llava-next-video", "llava-onevision")


def byte_level_tokenizer() -> Any:
    """A byte-level tokenizer (one token per byte, no merges) with the special tokens the video processors need."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_TINY_SPECIAL)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_TINY_SPECIAL)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


def tiny_text_config(tokenizer: Any) -> dict[str, Any]:
    """Keyword arguments of the tiny models' language-model config (``LlamaConfig``, ``Qwen2Config``).

    The vocabulary of ``tokenizer``, 2 layers, hidden 64, 4 query and 2 KV heads, 1024 positions.
    """
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.05,
    )


def tiny_video_llm(family: str = "video-llava", tokenizer: Any = None, seed: int = 0) -> tuple[Any, Any]:
    """A tiny random model of a supported family with its real processor class: ``(model, processor)``.

    32x32-pixel frames in 8-pixel patches: 17 tokens per frame for Video-LLaVA (CLS + 4x4), 4 for
    LLaVA-NeXT-Video and LLaVA-OneVision (2x2 after pooling; OneVision adds one newline token per
    video). Language model: 2 layers, hidden 64, 4 query and 2 KV heads; float32, eval mode.
    """
    import torch
    import transformers as tf

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")
    tok = tokenizer if tokenizer is not None else byte_level_tokenizer()
    torch.manual_seed(seed)
    # keyword bags shared by the families' config and processor classes (heterogeneous values)
    ids: dict[str, Any] = dict(
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>")
    )
    text = tiny_text_config(tok)
    vision: dict[str, Any] = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    square: dict[str, Any] = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model: tf.PreTrainedModel
    proc: tf.ProcessorMixin
    if family == "llava-next-video":
        model = tf.LlavaNextVideoForConditionalGeneration(
            tf.LlavaNextVideoConfig(
                vision_config=tf.CLIPVisionConfig(**vision),
                text_config=tf.LlamaConfig(**text),
                image_grid_pinpoints=_TINY_PINPOINTS,
                **ids,
            )
        )
        proc = tf.LlavaNextVideoProcessor(
            video_processor=tf.LlavaNextVideoVideoProcessor(**square),
            image_processor=tf.LlavaNextImageProcessor(**square, image_grid_pinpoints=_TINY_PINPOINTS),
            tokenizer=tok,
            patch_size=8,
            vision_feature_select_strategy="default",
        )
    elif family == "video-llava":
        model = tf.VideoLlavaForConditionalGeneration(
            tf.VideoLlavaConfig(vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**text), **ids)
        )
        proc = tf.VideoLlavaProcessor(
            video_processor=tf.VideoLlavaVideoProcessor(**square),
            image_processor=tf.VideoLlavaImageProcessor(**square),
            tokenizer=tok,
            patch_size=8,
        )
    else:
        model = tf.LlavaOnevisionForConditionalGeneration(
            tf.LlavaOnevisionConfig(
                vision_config=tf.SiglipVisionConfig(**vision),
                text_config=tf.Qwen2Config(**text),
                image_grid_pinpoints=_TINY_PINPOINTS,
                **ids,
            )
        )
        proc = tf.LlavaOnevisionProcessor(
            video_processor=tf.LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}),
            image_processor=tf.LlavaOnevisionImageProcessor(
                size={"height": 32, "width": 32}, image_grid_pinpoints=_TINY_PINPOINTS
            ),
            tokenizer=tok,
            num_image_tokens=16,
            vision_feature_select_strategy="full",
        )
    return model.eval(), proc


def make_tiny_model(folder: str | os.PathLike[str], family: str = "video-llava", seed: int = 0) -> Path:
    """Save a :func:`tiny_video_llm` (model and processor) with the tiny marker into ``folder``; returns it."""
    out = Path(folder).expanduser()
    model, proc = tiny_video_llm(family, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    marker = {"family": family, "seed": seed, "note": "random weights: measures mechanics and cache, not accuracy"}
    (out / TINY_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return out


def _resolve_model(name: str) -> str:
    """The folder or hub id behind ``--model``.

    ``tiny`` / ``tiny:<family>``: a tiny model folder in the cache (made on first use). An existing
    folder or a hub id (``owner/name``): unchanged. Otherwise (``NAME`` or ``shipped:NAME``) a video
    model shipped in ``namm_transfer/weights/video/NAME/``; when it is not there the error names the
    command that creates it.
    """
    if name != "tiny" and not name.startswith("tiny:"):
        if Path(name).expanduser().is_dir() or ("/" in name and not name.startswith("shipped:")):
            return name
        from .model import resolve_shipped

        try:
            return str(resolve_shipped(name))
        except FileNotFoundError as err:
            raise _UsageError(str(err)) from err
    family = name.split(":", 1)[1] if ":" in name else "video-llava"
    if family not in TINY_FAMILIES:
        raise _UsageError(f"--model {name}: unknown family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")
    from namm_transfer.models import cache_dir

    folder = cache_dir() / "models" / f"tiny-{family}"
    if not (folder / TINY_MARKER).is_file():
        make_tiny_model(folder, family)
    return str(folder)


# ----------------------------------------------------------------------------------------------
# model


def _text_config(model_or_config: Any) -> Any:
    cfg = getattr(model_or_config, "config", model_or_config)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else getattr(cfg, "text_config", cfg)


def load_video_llm(name_or_path: str, device: str = "cpu", dtype: str | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` of a supported video LLM from a hub id or a ``save_pretrained`` folder.

    The class follows ``config.model_type`` (:data:`MODEL_CLASSES`); the processor is ``AutoProcessor``.
    A folder of the project's own video model (:func:`.model.is_video_model_folder`) loads with
    :func:`.model.load_video_model` (its language model through the offline route).
    ``dtype`` defaults to bfloat16 on CUDA and float32 on the CPU. Attention is ``sdpa`` (the engine
    computes the attention rows a policy needs itself). Raises ``ValueError`` for a config that
    cannot be read or a model type other than those of :data:`MODEL_CLASSES`.
    """
    if Path(name_or_path).expanduser().is_dir():
        from .model import is_video_model_folder, load_video_model

        if is_video_model_folder(name_or_path):
            return load_video_model(name_or_path, device=device, dtype=dtype)

    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor

    kw: dict[str, Any] = {}
    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("NAMM_TRANSFER_OFFLINE"):
        kw["local_files_only"] = True
    try:
        config = AutoConfig.from_pretrained(name_or_path, **kw)
    except (OSError, ValueError) as err:
        raise _UsageError(f"cannot load the model config of {name_or_path!r}: {str(err).splitlines()[0]}") from err
    cls_name = MODEL_CLASSES.get(config.model_type)
    if cls_name is None:
        raise _UsageError(
            f"{name_or_path!r} is a {config.model_type!r} model; the video-llava target supports "
            f"{', '.join(f'{t} ({c})' for t, c in MODEL_CLASSES.items())}"
        )
    if dtype is None:
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    cls = getattr(transformers, cls_name)
    model = cls.from_pretrained(name_or_path, dtype=getattr(torch, dtype), attn_implementation="sdpa", **kw)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(name_or_path, **kw)
    return model, processor


def is_mechanics_only(model: Any, model_path: str | None = None, flag: bool = False) -> bool:
    """True for ``flag``, a folder with :data:`TINY_MARKER`, or a language model narrower than :data:`TINY_HIDDEN`."""
    if flag:
        return True
    if model_path is not None and (Path(model_path).expanduser() / TINY_MARKER).is_file():
        return True
    hidden = getattr(_text_config(model), "hidden_size", None)
    return hidden is not None and int(hidden) < TINY_HIDDEN


def kv_bytes_per_token(model: Any) -> int:
    """Bytes one token occupies in one layer's KV cache: ``2 x kv_heads x head_dim x element size``."""
    tc = _text_config(model)
    heads = int(tc.num_attention_heads)
    kv = int(getattr(tc, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // heads)
    itemsize = next(model.parameters()).element_size()
    return 2 * kv * head_dim * itemsize


def peak_cache_mb(stats: Any, model: Any) -> float:
    """Largest live KV cache (MB = 2**20 bytes) over the forward calls of one session (sequence 0).

    Managed layers: the live tokens per KV head that the engine recorded after every call
    (``cache_tokens``) and just before every update (``live_counts``, the most a call holds). Other
    layers (sliding windows the policy leaves alone): ``min(tokens fed, sliding_window)``.
    """
    tc = _text_config(model)
    n_layers = int(tc.num_hidden_layers)
    kv = int(getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads)
    per_head_token = kv_bytes_per_token(model) / kv
    unmanaged = n_layers - len(stats.managed_layers)
    window = getattr(tc, "sliding_window", None) if unmanaged else None

    def others(n_seen: int) -> float:
        return unmanaged * kv * (min(n_seen, int(window)) if window else n_seen)

    peak = 0.0
    for tokens, seen in zip(stats.cache_tokens, stats.n_seen, strict=True):
        live = float(sum(float(t) for t in tokens[:, 0])) * kv + others(int(seen[0]))
        peak = max(peak, live)
    for step, layers in stats.live_counts.items():
        live = float(sum(sum(c[0]) for c in layers.values())) + others(int(stats.update_n_seen[step][0]))
        peak = max(peak, live)
    return peak * per_head_token / 2**20


def token_kept_fractions(result: Any) -> tuple[Any, Any]:
    """Per prompt token, the fraction of (managed layer, KV head) caches that kept it: ``(first, end)``.

    ``first``: at the first update after the token arrived (its first eviction decision; 1.0 for
    tokens no update saw). ``end``: at the end of the session (the last update's kept positions plus
    every token fed after it). Both (T,) float arrays over the prompt; one unpadded sequence, so a
    token's position is its index in the prompt.
    """
    import numpy as np

    stats, t = result.stats, int(result.prompt_len)
    first, end = np.ones(t), np.ones(t)
    seen = [int(s[0]) for s in stats.update_n_seen]
    before = 0
    for u, upto in enumerate(seen):
        kept = np.zeros(t)
        count = 0
        for rows in stats.kept_positions.get(u, {}).values():
            for pos in rows[0]:
                pos = np.asarray(pos, dtype=np.int64)
                kept[pos[pos < t]] += 1
                count += 1
        frac = kept / max(count, 1)
        lo, hi = min(before, t), min(upto, t)
        first[lo:hi] = frac[lo:hi]
        before = max(before, upto)
        if u == len(seen) - 1:
            end = frac.copy()
            end[min(upto, t) :] = 1.0
    return first, end


# ----------------------------------------------------------------------------------------------
# one sample


def _eos_ids(model: Any, processor: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), _text_config(model), getattr(processor, "tokenizer", None)):
        value = getattr(src, "eos_token_id", None) if src is not None else None
        if value is None:
            continue
        ids.update([int(value)] if isinstance(value, int) else [int(v) for v in value])
    return ids


def answer_text(token_ids: Sequence[int], stop_ids: set[int], tokenizer: Any) -> tuple[str, int]:
    """``(text, n)``: the first ``n`` generated tokens, up to the first stop token (EOS or another special
    token), decoded without special tokens."""
    cut = next((i for i, tok in enumerate(token_ids) if int(tok) in stop_ids), len(token_ids))
    return str(tokenizer.decode(list(token_ids[:cut]), skip_special_tokens=True)), cut


def _finite_list(values: Any, digits: int = 4) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, (list, tuple)) or getattr(v, "ndim", 0) > 0:
            out.append(_finite_list(v, digits))
        else:
            f = float(v)
            out.append(round(f, digits) if math.isfinite(f) else None)
    return out


def _replay_record(kept_counts: Mapping[Any, Mapping[Any, Any]]) -> dict[int, dict[int, Any]]:
    return {int(s): {int(layer): c for layer, c in layers.items()} for s, layers in kept_counts.items()}


FULL_ALT = "full-alt"
"""The noise-floor row: the full cache run a second time with another prefill chunk size (:func:`alt_chunk_size`)."""


class Unit(NamedTuple):
    """One policy run on every sample: ``policy`` under ``protocol`` (None for ``full`` and ``full-alt``)."""

    protocol: Protocol | None
    policy: str

    @property
    def label(self) -> str | None:
        """The protocol's label (``ratio-50``, ``threshold``), None for a protocol-free unit."""
        return None if self.protocol is None else self.protocol.label

    def key(self, sample_id: str) -> str:
        """The record key: ``{policy}/{id}`` without a protocol, ``{policy}@{protocol label}/{id}`` with one."""
        return f"{self.policy}/{sample_id}" if self.protocol is None else f"{self.policy}@{self.label}/{sample_id}"


def units_of(policies: Sequence[str], protocols: Sequence[Protocol], noise_floor: bool) -> list[Unit]:
    """The runs of one sample, in order: ``full`` (and ``full-alt`` with ``noise_floor``) once, then for every
    protocol its NAMM (first: the threshold protocol's baselines replay it) and its baselines."""
    units = []
    if "full" in policies:
        units.append(Unit(None, "full"))
        if noise_floor:
            units.append(Unit(None, FULL_ALT))
    for proto in protocols:
        units.extend(Unit(proto, p) for p in _order(policies) if p != "full")
    return units


def alt_chunk_size(chunk_size: int) -> int:
    """The noise floor's prefill chunk size: half of ``chunk_size`` (2 for a chunk of 1). A full cache computes the
    same attention whatever the chunking, so ``full-alt`` differs from ``full`` only by floating-point order."""
    return chunk_size // 2 if chunk_size > 1 else 2


def _base_record(unit: Unit, sample: Any, frames: int) -> dict[str, Any]:
    return {
        "key": unit.key(sample.id),
        "policy": unit.policy,
        "protocol": unit.label,
        "id": sample.id,
        "category": sample.category,
        "duration_group": sample.duration_group,
        "answer_index": sample.answer_index,
        "answer_letter": sample.answer_letter,
        "frames": frames,
    }


def _failure_record(unit: Unit, sample: Any, frames: int, err: BaseException) -> dict[str, Any]:
    rec = _base_record(unit, sample, frames)
    rec.update({"error": f"{type(err).__name__}: {err}", "correct": None, "score": None, "prediction": None})
    return rec


def frame_kept_end_layers(record: Any) -> Any:
    """(L, F) fraction of each frame's tokens in each managed layer's cache at the end of the session (mean over
    KV heads); NaN for a frame without tokens.

    ``record``: an :class:`~namm_transfer.adapters.video_llm.EvictionRecord`.
    """
    import numpy as np

    per = np.asarray(record.live_per_frame_end, dtype=float).mean(axis=1)  # (L, F)
    tokens = np.asarray(record.frame_tokens, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tokens[None, :] > 0, per / np.maximum(tokens[None, :], 1), np.nan)


class _Evaluator:
    """Runs the units (protocol, policy) of one command on one sample at a time."""

    def __init__(self, args: argparse.Namespace, model: Any, processor: Any, namm: Any) -> None:
        self.args = args
        self.model = model
        self.processor = processor
        self.namm = namm
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.eos = _eos_ids(model, processor) | {int(i) for i in getattr(self.tokenizer, "all_special_ids", [])}
        self.cuda = str(args.device).startswith("cuda")

    def policy(self, unit: Unit, replay: dict[int, dict[int, Any]] | None, sample_id: str) -> tuple[Any, Any, bool]:
        """``(policy, budget label, final_update)`` of ``unit``: a ratio protocol holds every policy, the NAMM's
        top share included, to ``RatioBudget(R)`` at every update and at the end of the prompt; the threshold
        protocol's NAMM thresholds and its baselines replay the NAMM's kept counts (or get ``--budget``)."""
        from namm_transfer.policies.base import RatioBudget, ReplayBudget, parse_budget
        from namm_transfer.policies.namm_policy import NAMMPolicy
        from namm_transfer.registry import create_policy

        name, proto = unit.policy, unit.protocol
        if proto is None:  # full, full-alt
            return create_policy("full"), None, False
        ratio = proto.kind == "ratio"
        budget: Any
        if name == "namm":
            if ratio:
                budget = RatioBudget(float(proto.ratio))  # type: ignore[arg-type]
                return NAMMPolicy(self.namm, budget=budget), budget.describe(), True
            return NAMMPolicy(self.namm), "threshold", False
        if ratio:
            budget = RatioBudget(float(proto.ratio))  # type: ignore[arg-type]
        elif self.args.budget == "namm":
            if replay is None:
                raise RuntimeError(f"no NAMM kept counts to replay for sample {sample_id!r}")
            budget = ReplayBudget(replay, source=f"namm@{proto.label}/{sample_id}")
        else:
            budget = parse_budget(self.args.budget)
        label = "replay:namm" if isinstance(budget, ReplayBudget) else budget.describe()
        kw: dict[str, Any] = {"budget": budget}
        if name == "random":
            kw["seed"] = self.args.seed
        return create_policy(name, **kw), label, ratio

    def run_policy(
        self, unit: Unit, sample: Any, inputs: dict[str, Any], replay: Any, extra: dict[str, Any], plot: bool = False
    ) -> dict[str, Any]:
        import torch
        from namm_transfer.adapters.video_llm import answer

        from .benchmarks import score_response

        args = self.args
        name = unit.policy
        policy, budget_label, final_update = self.policy(unit, replay, sample.id)
        chunk = alt_chunk_size(args.chunk_size) if name == FULL_ALT else args.chunk_size
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = answer(
            self.model,
            self.processor,
            None,
            "",
            policy,
            max_new_tokens=args.max_new_tokens,
            update_interval=args.update_interval,
            chunk_size=chunk,
            final_update=final_update,
            eos_token_id=[],  # no early stop: every policy makes the same update steps (see the module doc)
            inputs=inputs,
        )
        seconds = time.perf_counter() - t0
        ids = res.token_ids
        text, cut = answer_text(ids, self.eos, self.tokenizer)
        rng = random.Random(f"{args.seed}/{sample.id}") if args.answer_fallback == "random" else None
        scored = score_response(sample, text, rng=rng)
        rec = _base_record(unit, sample, int(inputs["n_frames"]))
        rec.update(
            {
                "correct": scored["correct"],
                "score": None if scored["correct"] is None else 100.0 * bool(scored["correct"]),
                "prediction": scored["pred_letter"],
                "pred_index": scored["pred_index"],
                "used_fallback": scored["used_fallback"],
                "response": text,
                "n_generated": cut,
                "budget": budget_label,
                "final_update": final_update,
                "chunk_size": chunk,
                "retained_cache": res.retained_cache(),
                "retained_video": res.retained_video(),
                "retained_text": res.retained_text(),
                "peak_cache_mb": peak_cache_mb(res.stats, self.model),
                "throughput": (res.prompt_len + len(ids)) / max(seconds, 1e-9),
                "seconds": seconds,
                "prompt_tokens": res.prompt_len,
                "video_tokens": int(inputs["token_kind"].sum()),
                "tokens_per_frame": int(inputs["tokens_per_frame"]),
                "n_updates": len(res.record.update_clock),
                "frame_kept_end": _finite_list(res.frame_kept_fraction(at="end")),
                **extra,
            }
        )
        if self.cuda:
            rec["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
            rec["peak_memory_source"] = "cuda_max_allocated"
        else:
            rec["peak_memory_mb"] = rec["peak_cache_mb"]
            rec["peak_memory_source"] = "kv_cache"
        if unit.protocol is not None:  # what the policy kept at every update (the threshold baselines replay NAMM's)
            rec["kept_counts"] = res.stats.kept_counts_json()
            rec["update_clock"] = list(res.record.update_clock)
            rec["update_seen"] = list(res.record.update_seen)
        if name == "namm":
            rec["frame_kept_updates"] = _finite_list(res.frame_kept_fraction(at="updates"))
            rec["frame_kept_end_layers"] = _finite_list(frame_kept_end_layers(res.record), 3)
            if plot:
                first, end = token_kept_fractions(res)
                in_frame = inputs["frame_of_token"].numpy() >= 0
                rec["token_kept_first"] = _finite_list(first[in_frame], 3)
                rec["token_kept_end"] = _finite_list(end[in_frame], 3)
        return rec

    def sample(self, sample: Any, todo: Sequence[Unit], writer: Any, plot: bool) -> None:
        from .video_io import VideoError, read_frames

        args = self.args
        try:
            frames, indices, _ = read_frames(sample.video_path, num_frames=args.frames, mode=args.frame_sampling)
        except VideoError as err:
            logger.warning("sample %s: %s", sample.id, err)
            for unit in todo:
                writer.add(_failure_record(unit, sample, args.frames, err))
            return
        from namm_transfer.adapters.video_llm import build_inputs

        from .benchmarks import build_prompt

        prompt = build_prompt(sample, _PROMPT_BENCH[args.bench])
        t0 = time.perf_counter()
        inputs = build_inputs(self.model, self.processor, frames, prompt)
        encode_seconds = time.perf_counter() - t0
        extra: dict[str, Any] = {
            "frame_indices": list(indices),
            "video_path": str(sample.video_path),
            "encode_seconds": encode_seconds,
        }
        events = sample.extra.get("event_frames")
        if isinstance(events, list):
            shown = set(int(e) for e in events)
            extra["frames_with_events"] = [j for j, i in enumerate(indices) if int(i) in shown]
        replays: dict[Protocol | None, Any] = {}  # threshold protocol -> NAMM's kept counts on this sample
        for unit in todo:
            proto = unit.protocol
            replaying = (
                proto is not None and proto.kind == "threshold" and args.budget == "namm" and unit.policy != "namm"
            )
            if replaying and proto not in replays:  # resumed: NAMM ran on this sample before
                done = _find_record(writer, Unit(proto, "namm").key(sample.id))
                if done is None or "kept_counts" not in done:
                    missing = RuntimeError(f"NAMM's record for {sample.id} has no kept counts to replay")
                    writer.add(_failure_record(unit, sample, args.frames, missing))
                    continue
                replays[proto] = _replay_record(done["kept_counts"])
            rec = self.run_policy(unit, sample, inputs, replays.get(proto) if replaying else None, extra, plot=plot)
            writer.add(rec)
            if unit.policy == "namm" and proto is not None and proto.kind == "threshold":
                replays[proto] = _replay_record(rec["kept_counts"])


def _find_record(writer: Any, key: str) -> dict[str, Any] | None:
    """The record of ``key`` already in the writer's file, or None."""
    for rec in writer.records():
        if rec.get("key") == key:
            return rec
    return None


# ----------------------------------------------------------------------------------------------
# the run


def _order(policies: Sequence[str]) -> list[str]:
    """NAMM first (the baselines replay it), then the full cache, then the others in the order given."""
    first = [p for p in ("namm", "full") if p in policies]
    return first + [p for p in policies if p not in first]


def _default_output(args: argparse.Namespace) -> str:
    """``--output`` when given; else ``runs/video-llava/video-llava-<bench>.json`` (the CLI's default too)."""
    return str(args.output or default_output("video-llava", vars(args)))


def _rows(
    records: list[dict[str, Any]], units: Sequence[Unit], bench: str, mechanics_only: bool
) -> list[dict[str, Any]]:
    """One row per unit (protocol, policy) in ``units``' order, with its paired intervals (:func:`paired_rows`)."""
    from namm_transfer.results import summarize

    from .benchmarks import accuracy

    rows = {(r["protocol"], r["policy"]): r for r in summarize(records, group_by=("protocol", "policy"))}
    paired = paired_rows(records)
    out = []
    for unit in units:
        row = rows.get((unit.label, unit.policy))
        if row is None:
            continue
        recs = [r for r in records if (r.get("protocol"), r["policy"]) == (unit.label, unit.policy)]
        for field in ("retained_text", "peak_cache_mb"):
            vals = [r[field] for r in recs if isinstance(r.get(field), (int, float))]
            if vals:
                row[field] = math.fsum(vals) / len(vals)
        row["n_fallback"] = sum(1 for r in recs if r.get("used_fallback") and r.get("score") is not None)
        row["n_errors"] = sum(1 for r in recs if r.get("error"))
        if bench == "mlvu":
            scored = [r for r in recs if r.get("correct") is not None]
            per = accuracy(scored, by="category")["by"]["category"]
            if per:
                accs = [100.0 * v["accuracy"] for v in per.values()]
                row["accuracy"] = row["score"]
                row["score"] = math.fsum(accs) / len(accs)
                row["score_std"] = math.sqrt(math.fsum((a - row["score"]) ** 2 for a in accs) / len(accs))
        row.update(paired.get((unit.label, unit.policy), {}))
        if mechanics_only:
            row["mechanics_only"] = True
        out.append(row)
    return out


def paired_rows(records: Sequence[Mapping[str, Any]]) -> dict[Any, dict[str, dict[str, Any]]]:
    """``{(protocol label, policy): {"vs_full": ..., "vs_namm": ...}}``: paired bootstrap intervals
    (:func:`namm_transfer.stats.compare_policies`) of each row's per-question score minus the full cache's (run once,
    shared by every protocol) and minus the NAMM's of the same protocol; unit = question id, stratum = category
    (the mean is the mean over categories of the within-category mean difference). Failed questions are left out.
    """
    from namm_transfer.stats import compare_policies

    return compare_policies(
        records,
        unit=lambda r: r.get("id"),
        stratum=lambda r: r.get("category"),
        group=lambda r: (r.get("protocol"), r["policy"]),
        references=("full", "namm"),
    )


def _breakdown(records: Sequence[Mapping[str, Any]], field: str) -> dict[str, list[dict[str, Any]]]:
    """``breakdown_by`` per (protocol, policy) with each row's paired intervals within that group of questions."""
    from namm_transfer.results import breakdown_by

    out = breakdown_by(records, field, group_by=("protocol", "policy"))
    for value, rows in out.items():
        paired = paired_rows([r for r in records if r.get(field) is not None and str(r[field]) == value])
        for row in rows:
            row.update(paired.get((row["protocol"], row["policy"]), {}))
    return out


def _run(args: argparse.Namespace) -> int:
    from namm_transfer.protocols import parse_protocols
    from namm_transfer.results import ResultsWriter, select_shard

    policies = _order(list(args.policies))
    protocols = getattr(args, "protocols", DEFAULT_PROTOCOLS)
    if isinstance(protocols, str):
        try:
            protocols = parse_protocols(protocols)
        except ValueError as err:
            raise _UsageError(f"--protocols: {err}") from err
    protocols = tuple(protocols)
    noise_floor = bool(getattr(args, "noise_floor", True))
    threshold = any(p.kind == "threshold" for p in protocols)
    if threshold and args.budget == "namm" and "namm" not in policies and any(p != "full" for p in policies):
        raise _UsageError(
            "the threshold protocol's baselines replay NAMM's cache lengths (--budget namm), so --policies must "
            "include namm; or give them a fixed budget such as --budget 0.25, or use only ratio protocols "
            "(--protocols ratio:0.5)"
        )
    units = units_of(policies, protocols, noise_floor)
    model_name = args.model or DEFAULT_MODEL
    model_path = _resolve_model(model_name)  # a missing shipped model fails before any data is made
    # data next: a bad annotation file fails before any model is loaded
    if args.bench == "synthetic":
        annotations = (
            Path(args.annotations)
            if args.annotations
            else synthetic_benchmark(
                args.data_dir,
                n_videos=args.synthetic_videos,
                frames_per_video=args.synthetic_frames,
                size=args.synthetic_size,
                seed=SYNTHETIC_DEFAULTS["seed"],
            )
        )
        data_dir = annotations.parent if args.data_dir is None else Path(args.data_dir)
    else:
        if args.data_dir is None and args.annotations is None:
            raise _UsageError(f"--bench {args.bench} needs --data-dir (the benchmark's folder) or --annotations")
        annotations = Path(args.annotations) if args.annotations else find_annotations(args.bench, args.data_dir)
        data_dir = Path(args.data_dir) if args.data_dir else annotations.parent
    samples = load_samples(args.bench, annotations, data_dir)
    output = _default_output(args)

    import torch
    from namm_transfer.adapters.video_llm import VideoLLMAdapter, format_prompt, video_family

    from namm_transfer.registry import list_policies

    if args.budget != "namm":
        from namm_transfer.policies.base import parse_budget

        try:
            parse_budget(args.budget)
        except ValueError as err:
            raise _UsageError(str(err)) from err
    unknown = [p for p in policies if p not in list_policies()]
    if unknown:
        raise _UsageError(f"unknown policies {', '.join(unknown)}; registered: {', '.join(list_policies())}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    model, processor = load_video_llm(model_path, device=device, dtype=args.dtype)
    family = video_family(model)
    if args.frames is None:
        args.frames = DEFAULT_FRAMES[family]
    mechanics = is_mechanics_only(
        model, model_path if Path(model_path).expanduser().is_dir() else None, args.mechanics_only
    )
    managed = list(VideoLLMAdapter(model).managed)

    namm = None
    namm_info = None
    if "namm" in policies:
        from namm_transfer.checkpoint import load_namm, namm_record

        try:
            namm = load_namm(args.namm or "default", device=device)
        except (FileNotFoundError, ValueError) as err:
            raise _UsageError(f"cannot load the NAMM {args.namm or 'default'!r}: {err}; pass --namm PATH") from err
        namm_info = namm_record(namm)

    from namm_transfer.run_folder import sha256_file

    settings: dict[str, Any] = {
        "bench": args.bench,
        "annotations": annotations.name,
        "annotations_sha256": sha256_file(annotations) if annotations.is_file() else None,
        "frames": args.frames,
        "frame_sampling": args.frame_sampling,
        "prompt_template": format_prompt(model, processor, "{prompt}"),
        "prompt_builder": _PROMPT_BENCH[args.bench],
        "video_first": True,
        "subtitles": False,
        "update_interval": args.update_interval,
        "chunk_size": args.chunk_size,
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy, exactly max_new_tokens for every policy, text cut at the first EOS or special token",
        "protocols": [p.spec for p in protocols],
        "protocol_labels": [p.label for p in protocols],
        "ratio_rule": "ratio:R: every policy, the NAMM included (its top share of scores), keeps "
        "floor(R x tokens seen) tokens (prompt incl. video + generated, not the video tokens alone) in every "
        "managed layer and KV head at every update and once more at the end of the prompt; retained_video reports "
        "the video share kept",
        "budget_rule": "threshold protocol: the NAMM keeps what it scores >= its threshold; the baselines "
        + (
            "replay NAMM's kept counts per sample, update, layer and head"
            if args.budget == "namm"
            else f"get the fixed budget {args.budget}"
        ),
        "noise_floor": {
            "policy": FULL_ALT,
            "reference": "full",
            "setting": "chunk_size",
            "value": alt_chunk_size(args.chunk_size),
            "note": "the full cache run again with another prefill chunk size, which must not change its answers: "
            "its vs_full interval is the comparisons' noise floor",
        }
        if noise_floor and "full" in policies
        else None,
        "answer_fallback": args.answer_fallback,
        "seed": args.seed,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "model_family": family,
        "mechanics_only": mechanics,
    }
    if args.bench == "synthetic":
        settings["synthetic"] = {
            "n_videos": args.synthetic_videos,
            "frames_per_video": args.synthetic_frames,
            "size": args.synthetic_size,
            "seed": SYNTHETIC_DEFAULTS["seed"],
            "split": SYNTHETIC_DEFAULTS["split"],
        }
    writer = ResultsWriter(
        output,
        getattr(args, "command", "namm-transfer eval --target video-llava"),
        target="video-llava",
        settings=settings,
        model=model_name,
        namm_checkpoint=namm_info,
    )
    torch.manual_seed(args.seed)
    selected = samples[: args.limit] if args.limit else samples
    writer.refuse_samples_outside(s.id for s in selected)
    ids = {s.id for s in selected}
    failed = [r["key"] for r in writer.records() if r.get("error") and r["key"].split("/", 1)[1] in ids]
    if failed:  # a video restored since, a decoder installed since: these units run again
        logger.info("retrying %d unit(s) that failed in an earlier run", writer.drop(failed))
    plot_ids = {s.id for s in selected[: args.plot_samples]}
    shard = select_shard(selected, writer.rank, writer.world_size)
    ev = _Evaluator(args, model, processor, namm)
    try:
        from tqdm import tqdm

        progress: Any = tqdm(shard, desc="video QA", unit="sample", disable=None)
    except ImportError:  # pragma: no cover
        progress = shard
    if mechanics:
        logger.warning("mechanics-only run: %s", _mechanics_note())
    for sample in progress:
        done = writer.done_keys()
        todo = [u for u in units if u.key(sample.id) not in done]
        if todo:
            ev.sample(sample, todo, writer, plot=sample.id in plot_ids)

    keys = {u.key(s.id) for u in units for s in shard}
    records = [r for r in writer.records() if r["key"] in keys]
    rows = _rows(records, units, args.bench, mechanics)
    breakdown: dict[str, Any] = {}
    for field in ("category", "duration_group"):
        if any(r.get(field) is not None for r in records):
            breakdown[field] = _breakdown(records, field)
    extra: dict[str, Any] = {
        "breakdown_by": list(breakdown),
        "managed_layers": managed,
        "retained_cache_denominator": "tokens a full cache would hold at that call (prompt incl. video + generated), "
        "over the managed layers",
        "n_samples": len(shard),
    }
    if mechanics:
        extra["note"] = _mechanics_note()
    stem = writer.summary_path.with_suffix("")
    picture = layers_picture = None
    if args.plot_samples and "namm" in policies:
        try:
            picture = plot_kept_frames(
                records,
                stem.with_name(stem.name + ".kept-frames.png"),
                max_samples=args.plot_samples,
                frame_sampling=args.frame_sampling,
                protocol=protocols[0].label,
            )
            layers_picture = plot_kept_layers(
                records,
                stem.with_name(stem.name + ".kept-layers.png"),
                protocols=[p.label for p in protocols],
                layers=managed,
            )
        except ImportError as err:
            logger.warning("no picture of the kept frames: %s", err)
    if picture is not None:
        extra["kept_frames_png"] = picture.name
        extra["kept_frames_protocol"] = protocols[0].label
    if layers_picture is not None:
        extra["kept_layers_png"] = layers_picture.name
    path = writer.finalize(rows, breakdown, extra=extra)

    from namm_transfer.report import render_rows

    print(f"video-llava on {args.bench} ({len(shard)} samples, {args.frames} frames, {model_name})")
    if mechanics:
        print(f"note: {_mechanics_note()}")
    print(render_rows(rows))
    pictures = [str(p) for p in (picture, layers_picture) if p is not None]
    print(f"wrote {path}" + (f" and {', '.join(pictures)}" if pictures else ""))
    return 0


def _mechanics_note() -> str:
    from namm_transfer.report import MECHANICS_NOTE

    return MECHANICS_NOTE


# ----------------------------------------------------------------------------------------------
# picture


def _grid(tokens_per_frame: int) -> tuple[int, int] | None:
    """``(leading tokens, side)`` when a frame's tokens are a square grid, possibly after one CLS token."""
    for lead in (0, 1):
        side = math.isqrt(max(tokens_per_frame - lead, 0))
        if side > 1 and side * side == tokens_per_frame - lead:
            return lead, side
    return None


def _floats(values: Sequence[Any] | None) -> Any:
    import numpy as np

    return np.asarray([np.nan if v is None else v for v in (values or [])], dtype=float)


def plot_kept_frames(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    max_samples: int = 3,
    policy: str = "namm",
    frame_sampling: str = "center",
    protocol: str | None = None,
    dpi: int = 80,
) -> Path | None:
    """Draw which frames and patches ``policy`` kept into a PNG; returns its path (None: nothing to draw).

    Top: for up to ``max_samples`` samples, the kept fraction of every frame (x) after every update
    (y, labelled with the tokens seen by then; blank: not fed yet); red marks on frames that show an
    event (synthetic benchmark). Middle: one sample's frames, titled with their kept fraction at their
    first eviction and at the end. Bottom, when the frame's tokens form a square grid (after a leading
    CLS token for Video-LLaVA): the patch-level kept fraction of that sample's most-kept frame at its
    first eviction and at the end. The sample is the first one recorded with token-level fractions
    (``token_kept_first`` / ``token_kept_end``). ``frame_sampling`` re-reads the thumbnails as the run
    read its frames. ``protocol``: draw only the records of that protocol label (None: any).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure, SubFigure

    recs = [r for r in records if r.get("policy") == policy and r.get("frame_kept_updates") is not None]
    if protocol is not None:
        recs = [r for r in recs if r.get("protocol") == protocol]
    recs = sorted((r for r in recs if not r.get("error")), key=lambda r: not r.get("token_kept_end"))[:max_samples]
    if not recs:
        return None
    first = recs[0]
    n_frames = int(first["frames"])
    frames = None
    try:
        from .video_io import read_frames

        frames, _, _ = read_frames(first["video_path"], num_frames=n_frames, mode=frame_sampling)
    except Exception as err:  # noqa: BLE001 - the picture must not fail the run
        logger.info("no thumbnails for %s: %s", first.get("id"), err)
    tpf = int(first.get("tokens_per_frame", 0))
    tok_first, tok_end = _floats(first.get("token_kept_first")), _floats(first.get("token_kept_end"))
    per_frame_first = None
    if tpf and tok_first.size == tok_end.size == tpf * n_frames:
        tok_first, tok_end = tok_first.reshape(n_frames, tpf), tok_end.reshape(n_frames, tpf)
        per_frame_first = tok_first.mean(1)
    grid = _grid(tpf)
    patch = None
    if grid is not None and per_frame_first is not None and frames is not None:
        j = int(np.nanargmax(per_frame_first)) if np.isfinite(per_frame_first).any() else 0
        patch = (j, grid)

    ratios = [1.4] + ([0.7] if frames is not None else []) + ([1.1] if patch is not None else [])
    fig = Figure(figsize=(max(10.0, 3.2 * len(recs)), sum(ratios) * 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    subs: list[Figure | SubFigure] = [fig]
    if len(ratios) > 1:  # one column of sub-figures (squeeze=False: always a 2-D array)
        subs = list(fig.subfigures(len(ratios), 1, squeeze=False, height_ratios=ratios)[:, 0])
    axes = subs[0].subplots(1, len(recs), squeeze=False)[0]
    image = None
    for ax, rec in zip(axes, recs, strict=True):
        data = np.asarray([_floats(row) for row in rec["frame_kept_updates"]], dtype=float)
        if data.size == 0:
            data = np.full((1, int(rec["frames"])), np.nan)
        image = ax.imshow(
            np.ma.masked_invalid(data), aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest"
        )
        clocks = rec.get("update_clock") or []
        if clocks:
            step = max(1, len(clocks) // 6)
            ax.set_yticks(range(0, len(clocks), step), [str(c) for c in clocks[::step]])
        ax.set_xlabel("frame")
        ax.set_ylabel("update (tokens seen)")
        ax.set_title(f"{rec['id']}" + (f" ({rec['category']})" if rec.get("category") else ""), fontsize=9)
        for j in rec.get("frames_with_events") or []:
            ax.plot(j, -0.5, marker="v", color="red", markersize=7, clip_on=False)
    if image is not None:
        subs[0].colorbar(image, ax=list(axes), label="kept fraction", shrink=0.9)
    which = policy if protocol is None else f"{policy} ({protocol})"
    subs[0].suptitle(f"{which}: kept fraction of each frame after each update (red: frames with an event)", fontsize=10)

    row = 1
    if frames is not None:
        n = min(len(frames), 16)
        thumbs = subs[row].subplots(1, n, squeeze=False)[0]
        end = _floats(first.get("frame_kept_end"))
        events = set(first.get("frames_with_events") or [])
        for j, ax in enumerate(thumbs):
            ax.imshow(frames[j])
            ax.set_xticks([])
            ax.set_yticks([])
            label = "–" if j >= end.size or not np.isfinite(end[j]) else f"{end[j]:.2f}"
            if per_frame_first is not None:
                label = f"{per_frame_first[j]:.2f}→{label}"
            ax.set_title(label, fontsize=8)
            if j in events:
                for spine in ax.spines.values():
                    spine.set_edgecolor("red")
                    spine.set_linewidth(2)
        how = "at first eviction → at the end" if per_frame_first is not None else "at the end"
        subs[row].suptitle(f"{first['id']}: frames and their kept fraction {how}", fontsize=10)
        row += 1
    if patch is not None and frames is not None:
        j, (lead, side) = patch
        h, w = frames[j].shape[:2]
        ax_img, ax_first, ax_end, ax_over = subs[row].subplots(1, 4)
        ax_img.imshow(frames[j])
        ax_img.set_title(f"frame {j}", fontsize=9)
        maps = {}
        for ax, name, tok in ((ax_first, "first eviction", tok_first), (ax_end, "end", tok_end)):
            maps[name] = tok[j, lead:].reshape(side, side)
            im = ax.imshow(maps[name], vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
            cls = f", CLS {tok[j, 0]:.2f}" if lead else ""
            ax.set_title(f"patches: {name}{cls}", fontsize=9)
        ax_over.imshow(frames[j])
        ax_over.imshow(
            maps["first eviction"],
            vmin=0,
            vmax=1,
            cmap="viridis",
            alpha=0.55,
            extent=(-0.5, w - 0.5, h - 0.5, -0.5),
            interpolation="nearest",
        )
        ax_over.set_title("overlay (first eviction)", fontsize=9)
        for ax in (ax_img, ax_first, ax_end, ax_over):
            ax.set_xticks([])
            ax.set_yticks([])
        subs[row].colorbar(im, ax=[ax_first, ax_end, ax_over], shrink=0.8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def plot_kept_layers(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    protocols: Sequence[str | None],
    policy: str = "namm",
    layers: Sequence[int] | None = None,
    dpi: int = 80,
) -> Path | None:
    """Draw, for ``policy`` under each protocol label, the kept fraction of every frame (x) in every managed layer
    (y) at the end of the session, mean over the recorded samples (``frame_kept_end_layers``, mean over KV heads),
    into a PNG with one panel per protocol; returns its path (None: no record to draw).

    The panels share one colour scale from 0 to the largest fraction drawn (1 when nothing was kept), so that a
    cache holding little of the video still shows which frames and layers keep it. ``layers``: the managed layers'
    indices in the model, for the y labels (default: their positions).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: list[tuple[str, Any, int, float]] = []
    for proto in protocols:
        recs = [
            r
            for r in records
            if r.get("policy") == policy
            and r.get("protocol") == proto
            and not r.get("error")
            and r.get("frame_kept_end_layers")
        ]
        shapes = {np.shape(r["frame_kept_end_layers"]) for r in recs}
        if not recs or len(shapes) != 1:
            if len(shapes) > 1:
                logger.info("%s/%s: samples differ in frames or layers; not drawn", policy, proto)
            continue
        stack = np.stack([_floats2(r["frame_kept_end_layers"]) for r in recs])  # (N, L, F)
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(stack, axis=0) if np.isfinite(stack).any() else stack[0]
        cache = [float(r["retained_cache"]) for r in recs if isinstance(r.get("retained_cache"), (int, float))]
        panels.append((str(proto), mean, len(recs), math.fsum(cache) / max(len(cache), 1)))
    if not panels:
        return None
    finite = [float(np.nanmax(m)) for _, m, _, _ in panels if np.isfinite(m).any()]
    top = max(finite) if finite and max(finite) > 0 else 1.0
    fig = Figure(figsize=(3.6 * len(panels) + 0.8, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (label, mean, n, retained) in zip(axes, panels, strict=True):
        image = ax.imshow(
            np.ma.masked_invalid(mean), aspect="auto", vmin=0, vmax=top, cmap="viridis", interpolation="nearest"
        )
        n_layers = mean.shape[0]
        names = list(layers) if layers is not None and len(layers) == n_layers else list(range(n_layers))
        ticks = list(range(0, n_layers, max(1, math.ceil(n_layers / 8))))
        ax.set_yticks(ticks, [str(names[i]) for i in ticks])
        ax.set_xlabel("frame")
        ax.set_ylabel("layer")
        ax.set_title(f"{label}: {n} samples, cache {100 * retained:.0f}%", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="kept fraction at the end", shrink=0.9)
    fig.suptitle(f"{policy}: kept fraction of each frame in each layer at the end (mean over samples)", fontsize=10)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def _floats2(rows: Sequence[Sequence[Any]]) -> Any:
    import numpy as np

    return np.asarray([_floats(row) for row in rows], dtype=float)
