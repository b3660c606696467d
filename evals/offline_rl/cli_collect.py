"""``namm-transfer rl collect``: train a PPO behaviour policy and write a D4RL-format dataset.

Importing this module is cheap (no torch, gymnasium or stable-baselines3): they load inside :func:`main`.

Example::

    namm-transfer rl collect --env hopper --level medium          # -> ~/.cache/namm-transfer/d4rl/hopper-medium.hdf5
    namm-transfer rl collect --env all --level medium-replay --max-steps 1000000
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .envs import ENVS, VERSIONS

logger = logging.getLogger(__name__)

LEVEL_NAMES = ("medium", "medium-replay", "expert")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``collect`` options to ``parser``."""
    parser.add_argument(
        "--env", default="hopper", choices=[*ENVS, "all"], help="task, or all three one after another (default hopper)"
    )
    parser.add_argument(
        "--level",
        default="medium",
        choices=LEVEL_NAMES,
        help="medium: PPO policy at 40-60 D4RL score (halfcheetah 35-45); medium-replay: all training transitions "
        "up to medium; expert: trained as long as the budget allows (default medium)",
    )
    parser.add_argument("--seed", type=int, default=0, help="training and rollout seed (default 0)")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="training budget of the run in env steps (default 1.5M for medium / medium-replay, 3M for expert)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="transitions to collect (default 1,000,000 unless --episodes is set)"
    )
    parser.add_argument("--episodes", type=int, default=None, help="episodes to collect (stops at --steps too if set)")
    parser.add_argument("--version", default="v5", choices=list(VERSIONS), help="Gymnasium MuJoCo version (default v5)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="output .hdf5 file (a folder with --env all); default $NAMM_TRANSFER_CACHE/d4rl/{env}-{level}.hdf5",
    )
    parser.add_argument(
        "--round-steps", type=int, default=20_480, help="training steps between evaluations (default 20480)"
    )
    parser.add_argument("--eval-episodes", type=int, default=10, help="evaluation episodes per round (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--overwrite", action="store_true", help="collect again even if the output dataset already exists"
    )
    parser.add_argument(
        "--ppo",
        default="fast",
        choices=["fast", "zoo"],
        help="PPO settings of a new behaviour run: fast (SB3 defaults on 8 envs, ~1,500 steps/s on one core) or "
        "zoo (rl-baselines3-zoo's tuned one-env settings, 5-20x slower here); a resumed run keeps its own "
        "(default fast)",
    )


def _preset_config(preset: str, env_name: str, presets: dict) -> object | None:
    """The preset's config for a new run, or None (the run's saved settings / the default) for ``fast``."""
    return None if preset == "fast" else presets[preset][env_name]


def main(args: argparse.Namespace) -> int:
    """Run the collection described by ``args`` (from :func:`add_arguments`); returns the exit code."""
    from .behaviour import PPO_PRESETS
    from .collect import collect
    from .datasets import dataset_path

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = list(ENVS) if args.env == "all" else [args.env]
    output = getattr(args, "output", None)
    if output is not None and len(names) > 1 and output.suffix in (".hdf5", ".h5"):
        logger.error("--output must be a folder with --env all, got %s", output)
        return 2
    for name in names:
        out = output
        if output is not None and len(names) > 1:
            out = Path(output) / f"{name}-{args.level}.hdf5"
        target = out if out is not None else dataset_path(name, args.level, args.version)
        if Path(target).is_file() and not getattr(args, "overwrite", False):
            print(f"{name}-{args.level}: {target} exists; kept (pass --overwrite to collect again)")
            continue
        try:
            path = collect(
                name,
                level=args.level,
                steps=args.steps,
                episodes=args.episodes,
                seed=args.seed,
                version=args.version,
                out=out,
                max_steps=args.max_steps,
                round_steps=getattr(args, "round_steps", 20_480),
                eval_episodes=getattr(args, "eval_episodes", 10),
                torch_threads=getattr(args, "threads", 1),
                ppo_config=_preset_config(getattr(args, "ppo", "fast"), name, PPO_PRESETS),
            )
        except (ValueError, FileNotFoundError) as exc:
            logger.error("%s: %s", name, exc)
            return 1
        print(f"{name}-{args.level}: {path}")
    return 0


if __name__ == "__main__":  # python -m namm_transfer.evals.offline_rl.cli_collect ...
    from namm_transfer.evals.args import StrictParser

    _parser = StrictParser(prog="namm-transfer rl collect", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(main(_parser.parse_args()))
