"""Fitness of NAMM parameter vectors on language prompts (answer log-likelihood, prefill only).

For a prompt ``p`` with answer tokens ``a_1..a_A`` the score is the geometric-mean probability
of the answer under teacher forcing, ``exp(mean_i log P(a_i | p, a_<i))`` (in [0, 1]; a
prefill-only stand-in for exact match that is smooth in the parameters). Per task, a member's
fitness is ``sum_p score_member(p) / sum_p score_full(p)`` over the generation's prompts (a ratio
of sums, so a prompt on which the full cache scores 0 does not divide by zero), and the member's
fitness is the mean over tasks, minus an optional cache-size term::

    fitness = mean_task(ratio) - cache_weight * max(0, retained_cache - cache_target)

Ratio mode (``FitnessConfig.ratio = R``): every member runs as the eval's ratio protocol runs a NAMM, its
own top share ``NAMMPolicy(member, budget=RatioBudget(R))``, holding ``floor(R * seen)`` tokens per managed
layer and KV head at every update and once more at the end of the prompt (before the answer). The fitness is
then the answer-score ratio vs the full cache at exactly ``R`` retained; the cache term would be constant, so
``cache_weight`` must be 0.

Cost savings: the first ``update_interval`` tokens of a prompt are identical for every member
(no eviction has happened yet), so they are fed once and the engine is forked into one copy per
member; members are then evaluated as one batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..namm import NAMM
from ..policies.base import RatioBudget
from ..policies.namm_policy import NAMMPolicy
from ..session import AttachedMemory, attach

__all__ = ["EncodedPrompt", "FitnessConfig", "FitnessEvaluator", "answer_score", "combine_prompt_scores"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedPrompt:
    """A tokenized prompt with its answer appended: ``ids = prompt + answer``.

    ``question_start``: index of the first token of the prompt's final question (the question, then the chat
    template's turn markers and the answer cue, then the answer); None when unknown. The warm start's answer
    labels use it (:mod:`.warmstart`).
    """

    id: str
    task: str
    ids: tuple[int, ...]
    answer_len: int
    question_start: int | None = None

    def __post_init__(self) -> None:
        if self.answer_len < 1 or self.answer_len >= len(self.ids):
            raise ValueError(f"prompt {self.id}: answer length {self.answer_len} invalid for {len(self.ids)} tokens")
        prompt_len = len(self.ids) - self.answer_len
        if self.question_start is not None and not 0 <= self.question_start < prompt_len:
            raise ValueError(
                f"prompt {self.id}: question start {self.question_start} outside the prompt's {prompt_len} tokens"
            )


@dataclass
class FitnessConfig:
    update_interval: int = 256
    """NAMM update interval (tokens) during evolution."""
    chunk_size: int = 256
    """Prefill chunk length."""
    cache_weight: float = 0.0
    """Weight of the cache-size penalty (0 = the paper's pure performance fitness)."""
    cache_target: float = 0.5
    """Retained-cache level above which the penalty applies."""
    member_batch: int = 32
    """Population members evaluated in one batch (lower it to save memory)."""
    ratio: float | None = None
    """Ratio mode: every member keeps its own top ``ratio`` share (the eval's ratio protocol), see the module
    docstring; None: the NAMM's threshold (the paper's rule)."""

    def __post_init__(self) -> None:
        if self.ratio is not None:
            if not 0.0 < self.ratio < 1.0:
                raise ValueError(f"the ratio-mode share must lie in (0, 1), got {self.ratio}")
            if self.cache_weight > 0:
                raise ValueError(
                    f"ratio mode (ratio {self.ratio:g}) holds every member to exactly that share, so a cache term "
                    f"(cache_weight {self.cache_weight:g}) cannot matter: set the cache weight to 0 or drop the ratio"
                )


def answer_score(logits: Tensor, answer_ids: Tensor) -> Tensor:
    """Geometric-mean answer probability. logits: (B, A, V) predicting answer_ids (B, A) -> (B,)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, answer_ids.unsqueeze(-1)).squeeze(-1)
    return logp.mean(-1).exp()


RETAINED_MEASURE = 2
"""Version of the retained-cache measure, recorded with every logged generation and calibration. 1 (before
2026-11-28, unrecorded): the record of the members' shared prefix was taken before their first update, so the
first eviction was not counted and the retained cache came out too high by (1 - r1) / n (r1: the share kept at
the first update, n: the prompt's forward calls). 2: every call's record is taken after its update."""


@dataclass
class GenerationResult:
    fitness: np.ndarray  # (P,)
    task_ratio: dict[str, np.ndarray]  # task -> (P,)
    retained: np.ndarray  # (P,)
    full_scores: dict[str, float] = field(default_factory=dict)


class FitnessEvaluator:
    """Scores a population of NAMM vectors on a list of prompts with one host model."""

    def __init__(self, model: Any, namm: NAMM, config: FitnessConfig | None = None) -> None:
        self.model = model
        self.namm = namm
        self.config = config or FitnessConfig()
        # keyed by the tokens, not the id alone: ids repeat across draws of one split with other seeds (the
        # calibration's fresh prompts share ids with the evolution's pool)
        self._full_cache: dict[tuple[str, tuple[int, ...], int], float] = {}
        self.device = next(model.parameters()).device
        self.last_stats: Any = None  # ratio mode: the engine statistics of the last member batch

    # ----- full-cache reference ----------------------------------------------------------------------
    @torch.no_grad()
    def full_score(self, prompt: EncodedPrompt) -> float:
        key = (prompt.id, prompt.ids, prompt.answer_len)
        if key not in self._full_cache:
            ids = torch.tensor([prompt.ids], device=self.device)
            a = prompt.answer_len
            with attach(
                self.model, "full", update_interval=self.config.update_interval, chunk_size=self.config.chunk_size
            ) as mem:
                logits = mem.prefill(ids, logits_to_keep=a + 1)[:, :a]
            self._full_cache[key] = float(answer_score(logits, ids[:, -a:])[0])
        return self._full_cache[key]

    # ----- population ----------------------------------------------------------------------------------
    @torch.no_grad()
    def member_scores(self, thetas: Tensor, prompt: EncodedPrompt) -> tuple[np.ndarray, np.ndarray]:
        """Scores (P,) and retained cache (P,) of every member on one prompt."""
        cfg = self.config
        if cfg.ratio is not None:
            return self._member_scores_ratio(thetas, prompt, cfg.ratio)
        p_total = thetas.shape[0]
        ids = torch.tensor([prompt.ids], device=self.device)
        a = prompt.answer_len
        t = ids.shape[1]
        prefix = min(cfg.update_interval, t)
        scores, retained = [], []
        policy = NAMMPolicy(self.namm)
        with attach(self.model, policy, update_interval=cfg.update_interval, chunk_size=cfg.chunk_size) as mem:
            for start in range(0, p_total, cfg.member_batch):
                members = thetas[start : start + cfg.member_batch]
                n = members.shape[0]
                self._start_members(mem, policy, ids[:, :prefix], members)
                if prefix == cfg.update_interval:
                    mem.engine.update()
                if prefix < t:
                    logits = mem.prefill(ids[:, prefix:].expand(n, -1), logits_to_keep=a + 1, reset=False)[:, :a]
                else:  # whole prompt shorter than one interval: no eviction can happen
                    logits = self._prefix_logits.expand(n, -1, -1)[:, -a - 1 : -1]
                scores.append(answer_score(logits, ids[:, -a:].expand(n, -1)).cpu().numpy())
                retained.append(mem.stats.retained_per_call().mean(0))
        return np.concatenate(scores), np.concatenate(retained)

    def _member_scores_ratio(
        self, thetas: Tensor, prompt: EncodedPrompt, ratio: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ratio mode: each member keeps its own top ``ratio`` share, at update steps and at the end of the prompt.

        As the eval's ratio protocol: the prompt (without the answer) is fed with ``final_update``, so the cache
        holds ``floor(ratio * seen)`` tokens per managed layer and KV head when the answer starts; the logits of
        the prompt's last token predict the first answer token, the answer (teacher-forced) the rest. The engine
        statistics of the last batch stay in :attr:`last_stats` (tests read the kept counts there).
        """
        cfg = self.config
        p_total = thetas.shape[0]
        ids = torch.tensor([prompt.ids], device=self.device)
        a = prompt.answer_len
        t_prompt = ids.shape[1] - a
        prefix = min(cfg.update_interval, t_prompt)
        scores, retained = [], []
        policy = NAMMPolicy(self.namm, budget=RatioBudget(ratio))
        with attach(
            self.model, policy, update_interval=cfg.update_interval, chunk_size=cfg.chunk_size, final_update=True
        ) as mem:
            for start in range(0, p_total, cfg.member_batch):
                members = thetas[start : start + cfg.member_batch]
                n = members.shape[0]
                self._start_members(mem, policy, ids[:, :prefix], members)
                if prefix < t_prompt:
                    if prefix == cfg.update_interval:
                        mem.engine.update()
                    last = mem.prefill(ids[:, prefix:t_prompt].expand(n, -1), reset=False)  # (n, 1, V); final update
                else:  # the prompt is one interval or shorter: its last token's logits came with the prefix
                    last = self._prefix_logits[:, -1:].expand(n, -1, -1)
                    mem.engine.update()  # the update step, or the final update at the end of a shorter prompt
                pieces = [last]
                if a > 1:
                    pieces.append(mem.prefill(ids[:, t_prompt:-1].expand(n, -1), logits_to_keep=a - 1, reset=False))
                logits = torch.cat(pieces, dim=1)  # (n, A, V): row i predicts answer token i
                scores.append(answer_score(logits, ids[:, -a:].expand(n, -1)).cpu().numpy())
                retained.append(mem.stats.retained_per_call().mean(0))
                self.last_stats = mem.stats
        return np.concatenate(scores), np.concatenate(retained)

    def _start_members(self, mem: AttachedMemory, policy: NAMMPolicy, prefix_ids: Tensor, members: Tensor) -> None:
        """Feed the prefix every member shares once, then fork the engine into one batch row per member (P, D)."""
        policy.set_population(None)
        self._feed_prefix(mem, prefix_ids)
        mem.engine.fork(members.shape[0])
        policy.set_population(members, torch.arange(members.shape[0]))

    def _feed_prefix(self, mem: AttachedMemory, prefix_ids: Tensor) -> None:
        eng = mem.engine
        eng.reset(1, self.device)
        t = prefix_ids.shape[1]
        pos = 0
        logits = []
        while pos < t:
            end = min(t, pos + self.config.chunk_size)
            out = eng.forward_chunk(input_ids=prefix_ids[:, pos:end], logits_to_keep=end - pos, allow_update=False)
            logits.append(out)
            pos = end
        self._prefix_logits = torch.cat(logits, dim=1)

    def evaluate(self, thetas: Tensor, prompts: list[EncodedPrompt]) -> GenerationResult:
        """Fitness of each member (P,) on ``prompts`` (all members see the same prompts)."""
        thetas = torch.as_tensor(thetas, dtype=torch.float32)
        per_prompt = []
        for pr in prompts:
            s, r = self.member_scores(thetas, pr)
            per_prompt.append((pr.task, s, self.full_score(pr), r))
        return combine_prompt_scores(per_prompt, self.config)


def combine_prompt_scores(
    per_prompt: list[tuple[str, np.ndarray, float, np.ndarray]], config: FitnessConfig
) -> GenerationResult:
    """Fitness from per-prompt results ``(task, member scores (P,), full-cache score, retained (P,))``.

    Per task: sum of member scores / sum of full-cache scores (the sum itself when the full cache scores 0);
    averaged over tasks, minus ``cache_weight * max(0, retained - cache_target)`` with retained averaged over
    prompts.
    """
    by_task: dict[str, list[tuple[np.ndarray, float]]] = {}
    for task, scores, full, _ in per_prompt:
        by_task.setdefault(task, []).append((np.asarray(scores, dtype=np.float64), float(full)))
    ratios: dict[str, np.ndarray] = {}
    full_totals: dict[str, float] = {}
    for task, items in sorted(by_task.items()):
        member_sum = np.sum([s for s, _ in items], axis=0)
        full_sum = float(sum(f for _, f in items))
        full_totals[task] = full_sum
        ratios[task] = member_sum / full_sum if full_sum > 0 else member_sum
    retained = np.mean(np.stack([np.asarray(r, dtype=np.float64) for *_, r in per_prompt]), axis=0)
    perf = np.mean(np.stack(list(ratios.values())), axis=0)
    penalty = config.cache_weight * np.maximum(0.0, retained - config.cache_target)
    return GenerationResult(fitness=perf - penalty, task_ratio=ratios, retained=retained, full_scores=full_totals)
