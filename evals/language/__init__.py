"""Language evaluation: generated long-context tasks, their scoring, and LongBench loading/metrics.

Modules: :mod:`.tasks` (passkey, multi-key needle, key-value retrieval, variable tracking, prose facts;
``make_split``), :mod:`.prose` (the project's own procedural prose), :mod:`.scoring` (exact match and
answer log-likelihood), :mod:`.longbench` (LongBench JSONL files, prompts and metrics). Importing this
package does not import torch.
"""

from __future__ import annotations

from .scoring import (
    AnswerBatch,
    AnswerLogProb,
    answer_logprob,
    build_answer_batch,
    exact_match,
    prompt_answer_ids,
    score_generations,
    score_sample,
    task_score,
)
from .tasks import DEPTHS, HELDOUT_LENGTHS, TASKS, TRAIN_LENGTHS, Sample, generate, make_counter, make_split

__all__ = [
    "AnswerBatch",
    "AnswerLogProb",
    "DEPTHS",
    "HELDOUT_LENGTHS",
    "Sample",
    "TASKS",
    "TRAIN_LENGTHS",
    "answer_logprob",
    "build_answer_batch",
    "exact_match",
    "generate",
    "make_counter",
    "make_split",
    "prompt_answer_ids",
    "score_generations",
    "score_sample",
    "task_score",
]
