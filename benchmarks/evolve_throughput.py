"""Seconds per member-prompt and generations per hour of ``namm-transfer evolve``, for several member batch sizes.

One generation of the trainer is the population scored on the generation's prompts by
:class:`namm_transfer.evolution.fitness.FitnessEvaluator` (the members share the first ``update_interval`` tokens,
then run as batches of ``member_batch`` forked sequences). This script times exactly that call on the real host
model (default SmolLM2-135M, the registry's GGUF dequantized to float32), with one training prompt per task at each
length, for every ``--member-batches`` setting side by side (interleaved per length, same prompts, same
population), and prints seconds per member-prompt, generations per hour and the ratio of each setting to the first
(``all`` = the whole population in one batch, which is what today's default ``--member-batch 32`` does for a
population of at most 32).

The population is a CMA-ES-like draw around a shipped NAMM's weights (``--namm``, default the default checkpoint;
``mean + sigma * N(0, 1)``, seeded), so the members evict like a trained NAMM does. The full-cache reference runs
(one per prompt, cached by the trainer across generations) are timed once per length and reported apart; a
generation's time below is the members' evaluation only.

    OMP_NUM_THREADS=1 python benchmarks/evolve_throughput.py --lengths 1024,2048 --population 8 \\
        --member-batches all,4 --threads 1 --json /tmp/evolve_throughput.json
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from namm_transfer.evals.args import StrictParser


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _batch(text: str, population: int) -> int:
    return population if text == "all" else int(text)


def main(argv: list[str] | None = None) -> int:
    p = StrictParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--lengths", default="1024,2048", help="prompt lengths (tokens), one prompt per task each")
    p.add_argument("--tasks", default="passkey,kv_retrieval")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--member-batches", default="all,4", help="settings compared; the first is the reference")
    p.add_argument("--update-interval", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--namm", default="bam.smollm2-135m", help="checkpoint whose weights are the population's mean")
    p.add_argument("--sigma", type=float, default=0.065)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write every measurement here")
    p.add_argument("--note", default="", help="what else ran on the machine")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from namm_transfer.checkpoint import load_namm
    from namm_transfer.evolution.cli import build_pools
    from namm_transfer.evolution.fitness import FitnessConfig, FitnessEvaluator
    from namm_transfer.models import load_model

    t_start, commit = time.time(), _commit()  # the code imported now is the code measured
    load_before = os.getloadavg()
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    namm = load_namm(args.namm)
    gen = torch.Generator().manual_seed(args.seed)
    mean = namm.get_flat()
    thetas = mean + args.sigma * torch.randn(args.population, mean.numel(), generator=gen)
    tasks = [t for t in args.tasks.split(",") if t]
    settings = [s for s in args.member_batches.split(",") if s]
    evaluator = FitnessEvaluator(model, namm, FitnessConfig(args.update_interval, args.chunk_size))
    results: list[dict[str, Any]] = []
    for length in [int(x) for x in args.lengths.split(",")]:
        pools = build_pools(tokenizer, tasks, 1, [length])
        prompts = [pools[t][0] for t in tasks]
        t0 = time.perf_counter()
        for pr in prompts:
            evaluator.full_score(pr)
        full_s = time.perf_counter() - t0
        for setting in settings:
            evaluator.config = FitnessConfig(
                args.update_interval, args.chunk_size, member_batch=_batch(setting, args.population)
            )
            t0 = time.perf_counter()
            res = evaluator.evaluate(thetas, prompts)
            gen_s = time.perf_counter() - t0
            member_prompts = args.population * len(prompts)
            row = {
                "length": length,
                "tokens": [len(pr.ids) for pr in prompts],
                "member_batch": setting,
                "generation_s": round(gen_s, 2),
                "member_prompts": member_prompts,
                "s_per_member_prompt": round(gen_s / member_prompts, 3),
                "generations_per_hour": round(3600.0 / gen_s, 2),
                "full_cache_s": round(full_s, 2),
                "fitness_mean": float(res.fitness.mean()),
                "retained_mean": float(res.retained.mean()),
                "load_1min": os.getloadavg()[0],
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    info = {
        "command": "python benchmarks/evolve_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)),
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "device": args.device,
        "model": args.model,
        "population": args.population,
        "tasks": tasks,
        "update_interval": args.update_interval,
        "chunk_size": args.chunk_size,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "wall_min": round((time.time() - t_start) / 60, 1),
        "note": args.note,
    }
    print()
    for k, v in info.items():
        print(f"- {k}: {v}")
    print()
    print(
        "| length | member batch | generation s | s per member-prompt | generations per hour | time vs "
        f"{settings[0]} | full-cache runs s | fitness mean | retained |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results:
        ref = next(r for r in results if r["length"] == row["length"] and r["member_batch"] == settings[0])
        ratio = row["generation_s"] / ref["generation_s"]
        print(
            f"| {row['length']} | {row['member_batch']} | {row['generation_s']:.1f} | "
            f"{row['s_per_member_prompt']:.2f} | {row['generations_per_hour']:.1f} | {ratio:.2f}x | "
            f"{row['full_cache_s']:.1f} | {row['fitness_mean']:.4f} | {row['retained_mean']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
