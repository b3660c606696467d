"""``namm-transfer evolve``: evolve a NAMM with CMA-ES on generated long-context language tasks.

Imports nothing heavy at import time (the CLI's ``--help`` stays torch-free).

Example (the run that produced the shipped checkpoint is recorded in its model card)::

    namm-transfer evolve --model smollm2-135m --run-dir runs/evolve-smollm2 \\
        --stages passkey,kv_retrieval:8 --stages passkey,kv_retrieval,multikey_needle:8 \\
        --warm-start --ship bam.smollm2-135m
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

logger = logging.getLogger(__name__)


def _stage(text: str) -> tuple[list[str], int, list[int] | None]:
    """``TASK[,TASK...]:GENERATIONS[@LENGTH[,LENGTH...]]`` -> (tasks, generations, lengths or None)."""
    head, at, tail = text.partition("@")
    try:
        tasks, gens = head.rsplit(":", 1)
        names, n = [t for t in tasks.split(",") if t], int(gens)
        lengths = [int(x) for x in tail.split(",")] if at else None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"stage {text!r}: use TASK[,TASK...]:GENERATIONS, optionally @LENGTH[,LENGTH...] (prompt lengths in "
            "tokens), e.g. passkey,kv_retrieval:4@2048"
        ) from None
    if not names or n < 0 or (lengths is not None and min(lengths) < 1):
        raise argparse.ArgumentTypeError(
            f"stage {text!r}: needs at least one task, GENERATIONS >= 0 (0: the warm start or --init only) and "
            "positive lengths"
        )
    from namm_transfer.evals.language.tasks import EVAL_ONLY_TASKS

    held = [t for t in names if t in EVAL_ONLY_TASKS]
    if held:  # whole task families kept out of training, so the eval can measure transfer to an unseen family
        raise argparse.ArgumentTypeError(
            f"stage {text!r}: {', '.join(held)} is an evaluation-only task family (never trained on); drop it"
        )
    return names, n, lengths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="registered model name, folder or hub id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--run-dir", default="runs/evolve", help="run folder (an existing run resumes)")
    p.add_argument(
        "--stages",
        type=_stage,
        action="append",
        help="TASKS:GENERATIONS[@LENGTHS], repeatable (incremental curriculum, e.g. short to long prompts: "
        "passkey:4@2048 --stages passkey,multikey_needle:8@4096,8192); LENGTHS default to --lengths; default "
        "passkey,kv_retrieval:10",
    )
    p.add_argument("--population", type=int, default=32)
    p.add_argument("--sigma0", type=float, default=0.065)
    p.add_argument("--elite-ratio", type=float, default=0.5)
    p.add_argument("--full-covariance", action="store_true", help="full CMA-ES instead of the separable variant")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prompts-per-task", type=int, default=2)
    p.add_argument("--pool-size", type=int, default=12, help="training prompts generated per task")
    p.add_argument("--lengths", default="1024,1536,2048", help="training prompt lengths (tokens)")
    p.add_argument("--update-interval", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--member-batch", type=int, default=32)
    p.add_argument("--cache-weight", type=float, default=0.0, help="weight of the cache-size term of the fitness")
    p.add_argument("--cache-target", type=float, default=0.5)
    p.add_argument("--generations", type=int, default=None, help="stop after this many more generations")
    p.add_argument(
        "--sink-tokens",
        type=int,
        default=0,
        metavar="N",
        help="every member always keeps the first N positions (NAMMConfig.sink_tokens; default 0, the paper's rule)",
    )
    p.add_argument(
        "--length-normalized-features",
        action="store_true",
        help="multiply each attention row by its query's live cache length before the spectrogram "
        "(NAMMConfig.length_normalized_features; outside the paper's network, which it is off for)",
    )
    p.add_argument(
        "--warm-start",
        action="store_true",
        help="initialize the CMA-ES mean with the supervised future-attention scorer",
    )
    p.add_argument(
        "--warm-start-labels",
        choices=["future", "answer"],
        default="future",
        help="keep-labels of the warm start: 'future' (attention from every later query, the default) or 'answer' "
        "(attention from the final question, answer cue and teacher-forced answer; computed once and stored in "
        "run_dir/warmstart-labels.safetensors)",
    )
    p.add_argument(
        "--question-tokens",
        type=int,
        default=64,
        metavar="Q",
        help="answer labels of a prompt whose question cannot be located: its last Q prompt tokens stand for the "
        "question (default 64)",
    )
    p.add_argument(
        "--ratio",
        type=float,
        default=None,
        metavar="R",
        help="ratio-mode fitness: every member keeps its own top R share (0 < R < 1), as the eval's ratio:R "
        "protocol, so the fitness is the answer-score ratio vs the full cache at exactly R retained (no cache "
        "term: --cache-weight must be 0); recorded in run.json, a resume must give the same R",
    )
    p.add_argument("--warm-start-steps", type=int, default=300)
    p.add_argument(
        "--warm-start-keep",
        type=float,
        default=0.5,
        help="share of each row labelled 'keep' (by future attention) in the warm start; higher values give a "
        "NAMM that evicts less at each update (default 0.5)",
    )
    p.add_argument(
        "--warm-start-calibrate",
        action="store_true",
        help="shift the warm start's readout bias so that it keeps --warm-start-keep of the training tokens",
    )
    p.add_argument(
        "--warm-start-prompts",
        type=int,
        default=4,
        help="stage-1 prompts per task used for the normalization estimate and the warm start",
    )
    p.add_argument("--init", default=None, help="NAMM checkpoint to start from (mean and normalization)")
    p.add_argument(
        "--calibrate-bias",
        default=None,
        metavar="OFFSETS",
        help="after the generations, evaluate the mean with these readout-bias offsets (comma list, or "
        "LOW:HIGH:COUNT; write --calibrate-bias=-1:3:9 when it starts with a minus) on fresh training-split "
        "prompts and keep the one with the best fitness (run_dir/calibration.jsonl, resumable; the result goes to "
        "run_dir/namm-calibrated and is what --ship ships)",
    )
    p.add_argument("--calibrate-prompts", type=int, default=2, help="calibration prompts per task (last stage)")
    p.add_argument(
        "--calibrate-sinks",
        type=int,
        default=0,
        metavar="N",
        help="calibrate (and ship) with the first N positions always kept (NAMMConfig.sink_tokens; default 0: the "
        "run's own --sink-tokens)",
    )
    p.add_argument(
        "--calibrate-lengths",
        default=None,
        help="calibration prompt lengths (default: the longest training length)",
    )
    p.add_argument(
        "--ship",
        default=None,
        metavar="NAME",
        help="also write the final mean into the package's weights/NAME (with a model card)",
    )


def encode_sample(tokenizer: Any, sample: Any) -> tuple[list[int], tuple[int, int]]:
    """``prompt + answer`` ids and the answer span. Chat models get the answer cue ("The pass key is")
    at the start of the assistant turn, so the answer tokens are what the model would say next."""
    from namm_transfer.evals.language import prompt_answer_ids

    if sample.chat_prompt is not None:
        return prompt_answer_ids(
            tokenizer,
            sample.chat_prompt + sample.answer_cue,
            sample.answer,
            answer_prefix=" ",
            add_special_tokens=False,
        )
    return prompt_answer_ids(tokenizer, sample.prompt, sample.answer, answer_prefix=" ")


def question_start(tokenizer: Any, sample: Any, prompt_len: int) -> int | None:
    """Index of the first token of ``sample``'s final question in the ids of :func:`encode_sample`, or None.

    The prompt text (chat prompt + cue, or the raw prompt) is tokenized again with character offsets (a fast
    tokenizer); the question's first token is the first whose span ends after the question's last occurrence
    starts. None when the tokenizer gives no offsets, the question is not in the text, or the tokens differ.
    """
    question = getattr(sample, "question", None)
    if sample.chat_prompt is not None:
        text, special = sample.chat_prompt + sample.answer_cue, False
    else:
        text, special = sample.prompt, True
    start = text.rfind(question) if question else -1
    if start < 0:
        return None
    try:
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    offsets = enc.get("offset_mapping") if hasattr(enc, "get") else None
    if offsets is None or len(enc["input_ids"]) != prompt_len:
        return None
    for i, (_, end) in enumerate(offsets):
        if end > start:
            return i
    return None


def build_pools(
    tokenizer: Any, tasks: list[str], n: int, lengths: list[int], split: str = "train", seed_base: int = 0
) -> dict[str, list[Any]]:
    """Tokenized prompt + answer pools per task (chat prompts when the tokenizer has a template)."""
    from namm_transfer.evals.language import make_split

    from .fitness import EncodedPrompt

    pools: dict[str, list[Any]] = {}
    for task in tasks:
        samples = make_split(task, split, n=n, lengths=lengths, tokenizer=tokenizer, seed_base=seed_base)
        items = []
        for s in samples:
            ids, (a0, a1) = encode_sample(tokenizer, s)
            q0 = question_start(tokenizer, s, a0)
            items.append(EncodedPrompt(s.id, task, tuple(ids), a1 - a0, question_start=q0))
        pools[task] = items
    return pools


def build_stage_pools(
    tokenizer: Any, stages: list[tuple[list[str], int, list[int] | None]], n: int, lengths: list[int]
) -> dict[str, list[Any]]:
    """The pools of every stage, keyed by :func:`~namm_transfer.evolution.trainer.pool_key`: a stage without lengths
    uses ``lengths`` (the plain task keys), one with lengths its own (the same seeds: the pools of one task at
    different lengths hold the same samples' templates at other sizes)."""
    from .trainer import pool_key

    pools: dict[str, list[Any]] = {}
    for ts, _, own in stages:
        todo = [t for t in ts if pool_key(t, own) not in pools]
        if todo:
            built = build_pools(tokenizer, todo, n, own or lengths)
            pools.update({pool_key(t, own): built[t] for t in todo})
    return pools


def main(args: argparse.Namespace) -> int:
    import torch

    from namm_transfer.checkpoint import load_namm
    from namm_transfer.models import load_model

    from .fitness import FitnessConfig
    from .trainer import Evolution, EvolutionConfig, StageConfig

    if args.ratio is not None and not 0.0 < args.ratio < 1.0:
        raise SystemExit(f"--ratio {args.ratio}: give a share in (0, 1), e.g. --ratio 0.5")
    if args.ratio is not None and args.cache_weight > 0:
        raise SystemExit(
            f"--ratio {args.ratio:g} holds every member to exactly that share, so the cache term cannot matter: "
            "drop --cache-weight (or set it to 0), or drop --ratio"
        )
    if args.ratio is not None and args.calibrate_bias:
        raise SystemExit(
            f"--ratio {args.ratio:g} keeps each member's top share, which a readout-bias offset does not change: "
            "drop --calibrate-bias (it calibrates the threshold rule)"
        )
    torch.manual_seed(args.seed)
    stages = args.stages or [(["passkey", "kv_retrieval"], 10, None)]
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    lengths = [int(x) for x in args.lengths.split(",")]
    pools = build_stage_pools(tokenizer, stages, args.pool_size, lengths)
    fit = FitnessConfig(
        update_interval=args.update_interval,
        chunk_size=args.chunk_size,
        cache_weight=args.cache_weight,
        cache_target=args.cache_target,
        member_batch=args.member_batch,
        ratio=args.ratio,
    )
    cfg = EvolutionConfig(
        stages=[StageConfig(ts, g, own) for ts, g, own in stages],
        population=args.population,
        elite_ratio=args.elite_ratio,
        sigma0=args.sigma0,
        separable=not args.full_covariance,
        seed=args.seed,
        prompts_per_task=args.prompts_per_task,
        fitness=fit,
        model=args.model,
        sink_tokens=args.sink_tokens,
    )
    cfg.length_normalized_features = args.length_normalized_features
    init = load_namm(args.init) if args.init else None
    if args.warm_start and init is None:
        init = _warm_start(args, model, _stage1_pools(pools, stages), stages, fit)
    # what builds the prompt pools (the initial mean is checked by its content, init.safetensors)
    identity = {"lengths": lengths, "pool_size": args.pool_size}
    evo = Evolution(args.run_dir, cfg, model, pools, init=init, identity=identity)

    from tqdm import tqdm

    bar = tqdm(total=evo.total_generations, initial=evo.generation, desc="generations")

    def show(row: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix(
            fit=f"{row['fitness_mean']:.3f}", best=f"{row['fitness_best']:.3f}", cache=f"{row['retained_mean']:.2f}"
        )

    start = evo.generation
    evo.run(args.generations, callback=show)
    bar.close()
    if evo.generation > start or not (evo.run_dir / "namm" / "config.json").exists():
        path = evo.save_mean()  # (an unchanged run keeps the checkpoint it has: a replay on another machine
        print(f"mean after {evo.generation} generations saved to {path}")  # matches it only up to rounding)
    from .card import write_card, write_curve

    write_curve(evo.run_dir)
    calibrated = None
    if args.calibrate_bias:
        calibrated = _calibrate(args, evo, tokenizer, stages[-1][2] or lengths)
    if args.ship:
        from namm_transfer.checkpoint import WEIGHTS_DIR, save_namm

        dest = WEIGHTS_DIR / args.ship
        if calibrated is None:
            evo.save_mean(dest, name=args.ship)
        else:
            net, prov = calibrated
            save_namm(net, dest, provenance=prov, name=args.ship)
        write_card(evo.run_dir, dest, args.ship)
        print(f"shipped as {args.ship} in {dest}")
    return 0


def _stage1_pools(pools: dict[str, list[Any]], stages: list[tuple[list[str], int, list[int] | None]]) -> dict[str, Any]:
    """Stage 1's pools keyed by the task name alone (what the warm start reads)."""
    from .trainer import pool_key

    return {t: pools[pool_key(t, stages[0][2])] for t in stages[0][0]}


def _calibrate(args: argparse.Namespace, evo: Any, tokenizer: Any, lengths: list[int]) -> tuple[Any, dict[str, Any]]:
    """Readout-bias calibration of the mean by the fitness (see ``calibrate.py``); saves run_dir/namm-calibrated."""
    import json

    from namm_transfer.checkpoint import load_namm, save_namm
    from namm_transfer.results import atomic_write_text

    from .calibrate import LOG_NAME, calibrate_bias, parse_offsets

    offsets = parse_offsets(args.calibrate_bias)
    cal_lengths = [int(x) for x in args.calibrate_lengths.split(",")] if args.calibrate_lengths else [max(lengths)]
    tasks = evo.config.stages[-1].tasks
    # a fresh draw of the training split (seed base 1: not the evolution's pool, never the held-out seeds)
    pools = build_pools(tokenizer, tasks, args.calibrate_prompts, cal_lengths, split="train", seed_base=1)
    prompts = [p for t in tasks for p in pools[t]]
    mean = load_namm(evo.run_dir / "namm")  # the run's deployed mean, as saved
    if args.calibrate_sinks:
        from dataclasses import replace

        mean.config = evo.namm.config = replace(evo.namm.config, sink_tokens=args.calibrate_sinks)
    res = calibrate_bias(evo.evaluator, mean, offsets, prompts, evo.run_dir / LOG_NAME)
    for i, off in enumerate(res.offsets):
        mark = "  <- kept" if i == res.best else ""
        print(f"bias offset {off:+.3f}: fitness {res.fitness[i]:.4f}, retained {res.retained[i]:.3f}{mark}")
    theta = mean.get_flat().clone()
    theta[-1] += res.best_offset
    mean.set_flat(theta)
    prov = json.loads((evo.run_dir / "namm" / "config.json").read_text()).get("provenance", {})
    prov["bias_calibration"] = {
        **res.to_dict(),
        "prompts": [p.id for p in prompts],
        "lengths": cal_lengths,
        "sink_tokens": mean.config.sink_tokens,
        "log": LOG_NAME,
    }
    path = save_namm(mean, evo.run_dir / "namm-calibrated", provenance=prov)
    atomic_write_text(evo.run_dir / "calibration.json", json.dumps(prov["bias_calibration"], indent=1) + "\n")
    print(f"calibrated mean (bias offset {res.best_offset:+.3f}) saved to {path}")
    return mean, prov


def _warm_start(
    args: argparse.Namespace, model: Any, pools: dict[str, list[Any]], stages: list[tuple[list[str], int]], fit: Any
) -> Any:
    """Normalization on stage-1 prompts (full cache), then the supervised scorer fit."""
    from pathlib import Path

    from namm_transfer.checkpoint import load_namm, save_namm
    from namm_transfer.namm import NAMM, NAMMConfig

    from .warmstart import LABELS_FILE, WarmStartConfig, fit_scorer, prepare_rows

    out = Path(args.run_dir) / "warmstart"
    if (out / "config.json").exists():
        return load_namm(out)
    namm = NAMM(NAMMConfig(length_normalized_features=args.length_normalized_features))
    stage1 = [p for t in stages[0][0] for p in pools[t][: args.warm_start_prompts]]
    labels = getattr(args, "warm_start_labels", "future")
    ws = WarmStartConfig(
        update_interval=fit.update_interval,
        chunk_size=fit.chunk_size,
        steps=args.warm_start_steps,
        keep_fraction=args.warm_start_keep,
        calibrate=args.warm_start_calibrate,
        seed=args.seed,
        labels=labels,
        question_tokens=getattr(args, "question_tokens", 64),
    )
    # normalization on the stage-1 prompts (full cache) and the labels, once: a rerun reuses the stored ones
    rows = prepare_rows(model, namm, stage1, ws, Path(args.run_dir) / LABELS_FILE)
    metrics = fit_scorer(namm, rows, ws)
    logger.info("warm start: %s", metrics)
    save_namm(
        namm,
        out,
        provenance={
            "trainer": f"supervised warm start ({labels} attention)",
            "labels": labels,
            **metrics,
            "model": args.model,
            "dtype": args.dtype,
            "rows": len(rows),
            "prompts": len(stage1),
            "steps": args.warm_start_steps,
            "keep_label_share": args.warm_start_keep,
            "calibrated": bool(args.warm_start_calibrate),
        },
    )
    return namm
