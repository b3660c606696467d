"""Readout-bias calibration: pick the NAMM's eviction threshold by the task fitness.

A NAMM evicts the tokens whose score is below 0, so adding ``delta`` to the readout bias ``b_out`` (the last
entry of the flat layout) moves the threshold without changing the ranking or the uneven way the network spreads
the cache over layers and heads. Evolution sets the threshold for its training prompts; prompts of another length
end at another cache size (more updates evict more). This stage evaluates the evolved mean with a grid of bias
offsets as one population on calibration prompts and keeps the offset with the best fitness (the run's own
fitness: answer-probability ratio vs the full cache minus the cache term), so the final choice is made by the task
fitness, not by a target size.

Resumable like every results file here: ``calibration.jsonl`` in the run folder gets a header (offsets, prompts,
hash of the mean) and one line per prompt (every offset's answer score and retained cache, and the full-cache
score); a rerun with the same settings skips the prompts already done, and a rerun with other settings is
refused with a message.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..namm import NAMM
from ..results import atomic_write_text
from .fitness import RETAINED_MEASURE, EncodedPrompt, FitnessEvaluator, combine_prompt_scores

__all__ = ["CalibrationResult", "calibrate_bias", "parse_offsets"]

logger = logging.getLogger(__name__)

LOG_NAME = "calibration.jsonl"


def parse_offsets(text: str) -> list[float]:
    """``"0,0.5,1"`` -> [0.0, 0.5, 1.0]; ``"-1:3:9"`` -> 9 evenly spaced values from -1 to 3."""
    text = text.strip()
    try:
        if ":" in text:
            lo, hi, n = text.split(":")
            values = np.linspace(float(lo), float(hi), int(n)).tolist()
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"bias offsets {text!r}: use a comma list (0,0.5,1) or LOW:HIGH:COUNT (-1:3:9)") from None
    if not values or not all(np.isfinite(values)):
        raise ValueError(f"bias offsets {text!r}: need at least one finite value")
    return [float(v) for v in values]


@dataclass
class CalibrationResult:
    offsets: list[float]
    fitness: np.ndarray  # (K,)
    retained: np.ndarray  # (K,)
    task_ratio: dict[str, np.ndarray]  # task -> (K,)
    best: int  # index into offsets

    @property
    def best_offset(self) -> float:
        return self.offsets[self.best]

    def to_dict(self) -> dict[str, Any]:
        return {
            "offsets": self.offsets,
            "fitness": [float(x) for x in self.fitness],
            "retained": [float(x) for x in self.retained],
            "task_ratio": {k: [float(x) for x in v] for k, v in self.task_ratio.items()},
            "best_offset": self.best_offset,
            "best_fitness": float(self.fitness[self.best]),
            "best_retained": float(self.retained[self.best]),
            "retained_measure": RETAINED_MEASURE,
        }


def _header(
    mean_hash: str, offsets: Sequence[float], prompts: Sequence[EncodedPrompt], namm_config: dict[str, Any]
) -> dict[str, Any]:
    return {
        "kind": "header",
        "mean_hash": mean_hash,
        "offsets": list(offsets),
        "prompts": [p.id for p in prompts],
        "namm_config": namm_config,
        "retained_measure": RETAINED_MEASURE,  # a log of the older measure is not mixed in: it is refused
    }


def calibrate_bias(
    evaluator: FitnessEvaluator,
    namm: NAMM,
    offsets: Sequence[float],
    prompts: Sequence[EncodedPrompt],
    log_path: str | Path,
) -> CalibrationResult:
    """Evaluate ``namm`` with each readout-bias offset on ``prompts``; returns the fitness of every offset.

    ``evaluator`` scores with its own NAMM module (whose normalization must be ``namm``'s, and whose config, e.g.
    ``sink_tokens``, applies); ``namm``'s flat vector is the base. Ties go to the smaller cache (the lower
    offset).
    """
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    offsets = [float(x) for x in offsets]
    base = namm.get_flat().detach().float().cpu()
    thetas = base.repeat(len(offsets), 1)
    thetas[:, -1] += torch.tensor(offsets)
    from .trainer import _mean_hash

    header = _header(_mean_hash(base.double().numpy()), offsets, prompts, evaluator.namm.config.to_dict())
    log_path = Path(log_path)
    done: dict[str, dict[str, Any]] = {}
    if log_path.exists() and log_path.stat().st_size > 0:
        text = [x for x in log_path.read_text().splitlines() if x.strip()]
        lines = []
        for i, x in enumerate(text):
            try:
                lines.append(json.loads(x))
            except json.JSONDecodeError:
                if i < len(text) - 1:
                    raise ValueError(f"{log_path} line {i + 1} is corrupt; cannot resume the calibration") from None
                # killed while writing the last line: that prompt is scored again
                atomic_write_text(log_path, "".join(t + "\n" for t in text[:-1]))
        if not lines or lines[0].get("kind") != "header" or lines[0] != header:
            raise ValueError(
                f"{log_path} holds a calibration with other settings (offsets, prompts or NAMM); "
                "move it away or delete it to calibrate again"
            )
        done = {x["prompt"]: x for x in lines[1:]}
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(json.dumps(header) + "\n")
    per_prompt = []
    for pr in prompts:
        if pr.id not in done:
            scores, retained = evaluator.member_scores(thetas, pr)
            row: dict[str, Any] = {
                "prompt": pr.id,
                "task": pr.task,
                "full": evaluator.full_score(pr),
                "scores": [float(x) for x in scores],
                "retained": [float(x) for x in retained],
            }
            with open(log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            done[pr.id] = row
            logger.info("calibration %s: retained %s", pr.id, " ".join(f"{x:.2f}" for x in retained))
        r = done[pr.id]
        per_prompt.append((r["task"], np.asarray(r["scores"]), r["full"], np.asarray(r["retained"])))
    res = combine_prompt_scores(per_prompt, evaluator.config)
    order = sorted(range(len(offsets)), key=lambda i: (-res.fitness[i], offsets[i]))
    return CalibrationResult(offsets, res.fitness, res.retained, res.task_ratio, best=order[0])
