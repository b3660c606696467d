"""``namm-transfer rl train``: train a Decision Transformer on a collected D4RL-format dataset.

Importing this module is cheap (no torch, transformers or gymnasium): they load inside :func:`main`.

Examples::

    namm-transfer rl train --env hopper --level medium                 # -> runs/dt/hopper-medium
    namm-transfer rl train --env all --ship                            # train all three and ship them
    namm-transfer rl train --env hopper --output runs/dt/hopper-medium # again: resumes from the last checkpoint
    namm-transfer rl train --env hopper-po --context 200 --prefix-fraction 0.5 --batch-size 16 \
        --output runs/dt/hopper-po-medium-long --ship --ship-name hopper-po-medium-long   # long context, see below

The canonical configuration (K = 20, 3 layers, hidden 128, 1 head, ReLU, dropout 0.1, AdamW lr 1e-4, weight decay
1e-4, linear warmup, gradient clip 0.25) is the default. A run that is killed resumes exactly from its newest
checkpoint (every ``--checkpoint-every`` steps) when started again with the same options; ``--restart`` starts afresh.
``--ship`` copies the finished model, sidecar, card and log into ``namm_transfer/weights/dt/{env}-{level}/``,
where ``namm-transfer eval --target decision-transformer`` finds it (``--ship-name`` ships under another name,
e.g. ``hopper-medium-long``, found with ``--model shipped:hopper-medium-long``).

Long-context DTs (``training/dt-long.sh``): ``--context 200`` or more (up to 1000 for whole episodes) and
``--prefix-fraction``, the share of segments that start at their episode's first step, so that the cached rollout's
long history is in the training distribution. Partially observable tasks (``--env hopper-po``, positions only)
train on the dataset of ``namm-transfer rl derive-po``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .envs import ENVS, VERSIONS
from .pomdp import PO_ENVS

logger = logging.getLogger(__name__)

LEVEL_NAMES = ("medium", "medium-replay", "expert")
DEFAULT_OUTPUT = Path("runs") / "dt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` options to ``parser``."""
    parser.add_argument(
        "--env",
        default="hopper",
        choices=[*ENVS, *PO_ENVS, "all"],
        help="task (hopper-po etc.: positions only), or all three fully observed (default hopper)",
    )
    parser.add_argument("--level", default="medium", choices=LEVEL_NAMES, help="dataset level (default medium)")
    parser.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="D4RL-format .hdf5 file (a folder of {env}-{level}.hdf5 files with --env all); default "
        "$NAMM_TRANSFER_CACHE/d4rl/{env}-{level}.hdf5 as written by `namm-transfer rl collect`",
    )
    parser.add_argument(
        "--steps", type=int, default=6_000, help="gradient steps in total (default 6000, as the shipped DTs)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="segments per batch (default 64)")
    parser.add_argument(
        "--context", type=int, default=20, help="K, timesteps per segment (default 20; long-context DTs: 200+)"
    )
    parser.add_argument(
        "--prefix-fraction",
        type=float,
        default=0.0,
        help="share of segments that start at their episode's first step (default 0: all start anywhere)",
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    parser.add_argument("--warmup", type=int, default=1_000, help="linear warmup steps (default 1000)")
    parser.add_argument("--grad-clip", type=float, default=0.25, help="gradient norm clip (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization, sampling and dropout")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="precision of the forward pass (default float32; bfloat16: autocast, weights and optimizer float32)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a busy 2-core machine more threads spin; raise it on an idle one)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"output folder (with --env all: the parent of {{env}}-{{level}}/); "
        f"default {DEFAULT_OUTPUT}/{{env}}-{{level}}",
    )
    parser.add_argument("--log-every", type=int, default=100, help="steps between log lines (default 100)")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=5000,
        help="steps between canonical evaluations, 0 = final only (default 5000)",
    )
    parser.add_argument("--eval-episodes", type=int, default=5, help="episodes per evaluation (default 5)")
    parser.add_argument(
        "--eval-max-ep-len", type=int, default=None, help="steps per evaluation episode (default: max_ep_len, 1000)"
    )
    parser.add_argument("--version", default="v5", choices=list(VERSIONS), help="Gymnasium MuJoCo version (default v5)")
    parser.add_argument("--restart", action="store_true", help="ignore existing checkpoints and start afresh")
    parser.add_argument(
        "--ship", action="store_true", help="copy the finished model to namm_transfer/weights/dt/{env}-{level}/"
    )
    parser.add_argument(
        "--ship-name", default=None, help="name of the shipped folder (default {env}-{level}), e.g. hopper-medium-long"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run the training described by ``args`` (from :func:`add_arguments`); returns the exit code."""
    from .datasets import DatasetFormatError
    from .train import TrainConfig, ship_dt, train_dt

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = list(ENVS) if args.env == "all" else [args.env]
    if args.ship_name is not None and len(names) > 1:
        print("error: --ship-name names one model; give one --env", file=sys.stderr)
        return 2
    output = args.output
    dataset = args.dataset
    if len(names) > 1 and dataset is not None and dataset.suffix in (".hdf5", ".h5"):
        print(f"error: --dataset must be a folder with --env all, got {dataset}", file=sys.stderr)
        return 2
    failures = 0
    for name in names:
        out = (output or DEFAULT_OUTPUT) / f"{name}-{args.level}" if (output is None or len(names) > 1) else output
        data = None
        if dataset is not None:
            data = dataset / f"{name}-{args.level}.hdf5" if len(names) > 1 else dataset
        try:
            cfg = TrainConfig(
                env=name,
                level=args.level,
                dataset=None if data is None else str(data),
                steps=args.steps,
                batch_size=args.batch_size,
                context=args.context,
                prefix_fraction=args.prefix_fraction,
                lr=args.lr,
                weight_decay=args.weight_decay,
                warmup=args.warmup,
                grad_clip=args.grad_clip,
                seed=args.seed,
                device=args.device,
                dtype=args.dtype,
                threads=args.threads,
                log_every=args.log_every,
                checkpoint_every=args.checkpoint_every,
                eval_every=args.eval_every,
                eval_episodes=args.eval_episodes,
                eval_max_ep_len=args.eval_max_ep_len,
                version=args.version,
            )
            result = train_dt(cfg, out, resume=not args.restart, progress=not args.no_progress)
        except (ValueError, FileNotFoundError, DatasetFormatError) as exc:
            print(f"error: {name}-{args.level}: {exc}", file=sys.stderr)
            failures += 1
            continue
        score = (result.eval or {}).get("normalized_score")
        speed = f"{result.steps_per_second:.2f} steps/s" if result.steps_per_second else "no new steps"
        score_text = "not evaluated" if score is None else f"D4RL normalized score {score:.1f}"
        print(f"{name}-{args.level}: {result.step} steps ({speed}), {score_text} -> {result.output}")
        if args.ship and result.finished:
            print(f"shipped: {ship_dt(result.output, args.ship_name)}")
    return 1 if failures else 0


if __name__ == "__main__":  # python -m namm_transfer.evals.offline_rl.cli_train ...
    from namm_transfer.evals.args import StrictParser

    _parser = StrictParser(prog="namm-transfer rl train", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
