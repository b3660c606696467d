"""Scoring for the generated long-context tasks: exact match on generations and answer log-likelihood.

Exact-match rule (``contains``): take the first non-empty line of the generation (when that line ends
with a colon, as in "The variables are:", the next non-empty line is appended); normalize it and
the answer by Unicode NFKC, case-folding, deleting punctuation (every Unicode ``P*`` character and
the usual symbols) and collapsing whitespace; the sample scores 1 when the normalized answer occurs
in the normalized line as whole words (``" 12345 "`` inside ``" the pass key is 12345 "``; ``1234``
does not match ``12345``). ``contains_all`` (variable tracking) scores the fraction of the answers
that occur in the first line by the same rule. Task scores are means in percent.

Log-likelihood: :func:`build_answer_batch` lays out ``prompt + answer`` token sequences, left-padded
so that every answer ends at the last position; one prefill over ``input_ids`` gives logits whose
``logits[:, -A - 1 : -1]`` slice predicts the ``A`` answer positions, and :func:`answer_logprob` sums
and averages the answer tokens' log-probabilities.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "normalize_text",
    "first_line",
    "contains_answer",
    "exact_match",
    "match_all",
    "score_sample",
    "task_score",
    "score_generations",
    "AnswerLogProb",
    "answer_logprob",
    "AnswerBatch",
    "build_answer_batch",
    "prompt_answer_ids",
]

_SYMBOLS = set("$+<=>^`|~")


def normalize_text(text: str) -> str:
    """NFKC, case-fold, delete punctuation and ASCII symbols, collapse whitespace."""
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = [" " if ch.isspace() else ch for ch in text if not unicodedata.category(ch).startswith("P")]
    kept = [ch for ch in kept if ch not in _SYMBOLS]
    return " ".join("".join(kept).split())


def first_line(generation: str) -> str:
    """The first line with non-space content, joined with the next one when it ends with a colon."""
    lines = [line.strip() for line in generation.splitlines() if line.strip()]
    if not lines:
        return ""
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def contains_answer(generation: str, answer: str) -> bool:
    """Whether the normalized ``answer`` occurs, as whole words, in the generation's first line."""
    a = normalize_text(answer)
    if not a:
        return False
    return f" {a} " in f" {normalize_text(first_line(generation))} "


def exact_match(generation: str, answers: str | Sequence[str]) -> float:
    """1.0 if any of the answers is contained in the first line (see module docstring), else 0.0."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    return float(any(contains_answer(generation, a) for a in answers))


def match_all(generation: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` contained in the first line."""
    answers = list(answers)
    if not answers:
        return 0.0
    return sum(contains_answer(generation, a) for a in answers) / len(answers)


def score_sample(sample: Any, generation: str) -> float:
    """Score in [0, 1] for a :class:`~.tasks.Sample` (or a dict with ``answers`` and ``metric``)."""
    get = sample.get if isinstance(sample, dict) else lambda k, d=None: getattr(sample, k, d)
    answers = get("answers") or [get("answer")]
    metric = get("metric", "contains") or "contains"
    if metric == "contains":
        return exact_match(generation, answers)
    if metric == "contains_all":
        return match_all(generation, answers)
    raise ValueError(f"unknown metric {metric!r}")


def task_score(scores: Iterable[float]) -> float:
    """Mean of per-sample scores in percent (NaN for no samples)."""
    scores = list(scores)
    return 100.0 * sum(scores) / len(scores) if scores else math.nan


def score_generations(samples: Sequence[Any], generations: Sequence[str]) -> dict[str, float]:
    """Per-task scores in percent plus their unweighted ``average``."""
    if len(samples) != len(generations):
        raise ValueError(f"{len(samples)} samples but {len(generations)} generations")
    by_task: dict[str, list[float]] = {}
    for s, g in zip(samples, generations, strict=True):
        task = s["task"] if isinstance(s, dict) else s.task
        by_task.setdefault(task, []).append(score_sample(s, g))
    out = {t: task_score(v) for t, v in by_task.items()}
    out["average"] = sum(out.values()) / len(out) if out else math.nan
    return out


# ------------------------------------------------------------------------------------- log-likelihood


class AnswerLogProb(NamedTuple):
    """``total`` and ``mean`` are (batch,); ``per_token`` is (batch, A) with zeros where masked."""

    total: Any
    mean: Any
    per_token: Any


def answer_logprob(logits: Any, answer_ids: Any, mask: Any = None) -> AnswerLogProb:
    """Log-likelihood of answer tokens.

    Args:
        logits: (batch, A, vocab), the logits that *predict* the A answer positions (for a sequence
            ending with the answer, ``full_logits[:, -A - 1 : -1]``).
        answer_ids: (batch, A) target token ids.
        mask: optional (batch, A), 1 for real answer tokens, 0 for positions to ignore (answers
            shorter than A in a batch).

    Returns:
        :class:`AnswerLogProb` with ``total`` (batch,), ``mean`` (batch,) over unmasked tokens, and
        ``per_token`` (batch, A). Computed in float32 whatever the logits' dtype.
    """
    import torch

    if logits.dim() != 3 or answer_ids.dim() != 2 or logits.shape[:2] != answer_ids.shape:
        raise ValueError(f"expected logits (B, A, V) and ids (B, A), got {tuple(logits.shape)} and "
                         f"{tuple(answer_ids.shape)}")  # fmt: skip
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, answer_ids.long().unsqueeze(-1)).squeeze(-1)
    m = torch.ones_like(tok) if mask is None else mask.to(tok.dtype)
    tok = tok * m
    total = tok.sum(-1)
    mean = total / m.sum(-1).clamp_min(1.0)
    return AnswerLogProb(total, mean, tok)


def prompt_answer_ids(
    tokenizer: Any, prompt: str, answer: str, *, answer_prefix: str = " ", add_special_tokens: bool = True
) -> tuple[list[int], tuple[int, int]]:
    """Token ids of ``prompt`` followed by ``answer_prefix + answer``, and the answer span [start, end).

    The two parts are tokenized separately and concatenated, so the span is exact; use
    ``answer_prefix=" "`` after a raw prompt ending in a cue ("The pass key is"), ``""`` after a chat
    prompt (which ends with the assistant header). Chat prompts already contain their special tokens
    as text: pass ``add_special_tokens=False`` for them.
    """
    p = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    a = tokenizer.encode(answer_prefix + answer, add_special_tokens=False)
    if not p:
        raise ValueError("the prompt tokenizes to nothing: no position would predict the first answer token")
    if not a:
        raise ValueError("the answer tokenizes to nothing")
    return p + a, (len(p), len(p) + len(a))


@dataclass
class AnswerBatch:
    """Left-padded ``prompt + answer`` sequences whose answers end at the last position.

    Shapes: ``input_ids``, ``attention_mask``, ``position_ids`` (B, T); ``answer_ids``,
    ``answer_mask`` (B, A) where A is the longest answer; row ``i`` holds its answer in the last
    ``answer_lengths[i]`` positions, and ``spans[i]`` is that answer's [start, end) in row coordinates.
    Feed ``input_ids`` / ``attention_mask`` / ``position_ids`` to the model once, then
    ``answer_logprob(logits[:, batch.logits_slice], batch.answer_ids, batch.answer_mask)``.
    """

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    answer_ids: Any
    answer_mask: Any
    answer_lengths: list[int]
    spans: list[tuple[int, int]]

    @property
    def logits_slice(self) -> slice:
        a = self.answer_ids.shape[1]
        return slice(-a - 1, -1)


def build_answer_batch(
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    *,
    answer_prefix: str = " ",
    add_special_tokens: bool = True,
    pad_token_id: int | None = None,
) -> AnswerBatch:
    """Tokenize ``prompt + answer`` pairs into an :class:`AnswerBatch` (left padding, true positions)."""
    import torch

    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "eos_token_id", None) or 0
    rows, lens = [], []
    for p, a in zip(prompts, answers, strict=True):
        ids, (s, e) = prompt_answer_ids(
            tokenizer, p, a, answer_prefix=answer_prefix, add_special_tokens=add_special_tokens
        )
        rows.append(ids)
        lens.append(e - s)
    t = max(len(r) for r in rows)
    a_max = max(lens)
    input_ids = torch.full((len(rows), t), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, t - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, t - len(r) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    answer_ids = input_ids[:, t - a_max :].clone()
    answer_mask = torch.zeros((len(rows), a_max), dtype=torch.long)
    for i, n in enumerate(lens):
        answer_mask[i, a_max - n :] = 1
    spans = [(t - n, t) for n in lens]
    return AnswerBatch(input_ids, attention_mask, position_ids, answer_ids, answer_mask, lens, spans)
