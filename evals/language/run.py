"""``namm-transfer eval --target language``: a frozen NAMM against full cache and eviction baselines.

For every held-out sample (generated long-context tasks, :mod:`.tasks`) and every policy, one
session is run on the host model:

1. The prompt (the chat prompt followed by the answer cue, e.g. "The pass key is", when the
   tokenizer has a chat template; otherwise the raw prompt, which ends with the cue) is prefilled in
   chunks of ``--chunk-size`` tokens; the policy runs every ``--update-interval`` tokens.
2. The session is then forked into two sequences that share everything fed so far (cache, policy
   state, statistics): sequence 0 decodes greedily, sequence 1 is fed the reference answer
   (teacher forcing). Both advance one token per step, so they reach every later update step
   together, and each keeps its own tokens.
3. ``exact_match``: the generation of sequence 0 is scored by the sample's metric (``contains`` /
   ``contains_all``, :func:`.scoring.score_sample`), in percent. ``loglik`` is the mean log
   probability of the answer tokens (nats per token) on sequence 1 and ``loglik_score`` is
   ``100 * exp(loglik)``, the geometric-mean answer-token probability in percent. Sequence 1 is
   exactly a prefill of ``prompt + answer`` (the engine's decisions do not depend on how the tokens
   are chunked between update steps), at the cost of a second decoding row instead of a second
   prefill.

Primary metric (per prompt): ``loglik_rel = 100 * exp(loglik - loglik_full)``, the answer's
teacher-forced likelihood relative to the full cache's on the same prompt (the full cache scores exactly
100; above 100: the policy made the answer more likely). A record's ``score`` is its loglik_rel and a
summary row's ``score`` is the mean over tasks of the task's mean loglik_rel (``metric`` in the settings
and the summary says so); ``exact_match`` (the score of earlier versions) is kept beside it, averaged the
same way. Rows carry paired intervals (:func:`namm_transfer.stats.compare_policies`, unit = sample_id,
stratum = task, rows = (protocol, policy), 95%, 2000 resamples): ``vs_full`` and ``vs_namm`` on
loglik_rel (the NAMM row of the same protocol), ``exact_match_vs_full`` / ``exact_match_vs_namm`` on exact
match; so do the rows of ``breakdown`` (per task), ``by_length`` and ``by_family_seen_in_training``.

Protocols (``--protocols``, default ``ratio:0.5,ratio:0.25,threshold``, :mod:`namm_transfer.protocols`):

* ``ratio:R`` (label ``ratio-50``...): every budgeted baseline gets ``RatioBudget(R)`` and the NAMM keeps
  its own top share (``NAMMPolicy(net, budget=RatioBudget(R))``): ``floor(R * seen)`` tokens per managed
  layer and KV head at every update and once more at the end of the prompt (``final_update``), so the
  budget holds when the answer starts. Every policy then keeps the same number of tokens: equal kept
  counts (``kept_counts_hash``) and retained cache.
* ``threshold``: NAMM keeps what it scores at or above zero (namm-spec.md); its per-layer, per-update,
  per-(sequence, KV head) kept counts (``stats.kept_counts``) are replayed by every budgeted baseline
  (:class:`~namm_transfer.policies.base.ReplayBudget`), at update steps only, in the prompt *and* in the
  decoding phase. For that every policy decodes exactly ``max(--max-new-tokens, answer tokens)`` steps
  with no early stop; the generation is cut at the first EOS token only for scoring. The NAMM record
  stores its kept counts, so an interrupted run resumes the baselines of a sample without rerunning NAMM.

The full cache runs once per prompt (``protocol`` null) and is shared by every protocol. Noise floor (on
by default; ``--no-noise-floor`` turns it off): the ``full-alt`` row is the full cache run again with half
the prefill chunk (``--chunk-size // 2``), which changes only the order of floating-point sums; its
``vs_full`` (settings ``noise_floor``) shows what "no difference" looks like. ``--max-new-tokens``
defaults to each task's own budget (``task``: passkey and phonebook 16, multikey_needle and prose_fact 24,
variable_tracking 48, kv_retrieval 64, whose uuid answers alone take 33-37 SmolLM2 tokens).

Per record (key ``full/<sample_id>``, ``full-alt/<sample_id>`` or ``<policy>@<protocol label>/<sample_id>``):
policy, protocol, task, sample_id, length (the target length), prompt_tokens, score (= loglik_rel),
exact_match, loglik, loglik_score, difficulty (the task options the calibration chose), calibrated,
family_seen_in_training (false for ``phonebook``, which ``evolve`` refuses to train on:
:data:`.tasks.EVAL_ONLY_TASKS`), budget, retained_cache (mean over managed layers and forward calls of
kept / seen tokens for the generated sequence; the statistic of
:class:`~namm_transfer.engine.EvictionStats`, prefill and decoding calls alike), retained_prefill (prefill
calls only), peak_cache_mb, peak_memory_mb, throughput, the generation, the managed layers, timings and
``kept_counts_hash`` (sha256 of the kept counts).

Calibration (held-out suite v2, :mod:`.calibration`): ``--calibrate`` measures the full cache's exact
match per (task, length) cell on the ``calibration`` split (seeds disjoint from train and held-out),
walking each task's difficulty ladder (:data:`.tasks.DIFFICULTY`: fewer distractors, fewer hops) until a
setting reaches 70%, and writes ``results/language-calibration-<model>.json`` (``--calibration PATH``). The
eval reads that file and runs each cell at the difficulty it passed at. The default task list leaves out the
cells that failed (or are missing), with a notice; tasks named with ``--tasks`` are refused with an error unless
``--keep-uncalibrated`` (run them at the default difficulty) or ``--drop-uncalibrated`` (leave them out); the
settings record both lists.

Sample sizes (``--power RUN.jsonl``, :func:`power_rule`): the paired statistic is the mean over T tasks
of within-task mean differences, so with N prompts spread evenly its variance is ``mean_t(var_t) / N``
and a ``+-h`` 95% interval needs ``N = ceil((1.96 * sd / h)^2)`` prompts with ``sd = sqrt(mean_t var_t)``
(:func:`namm_transfer.stats.required_units`). Pilot: ``namm-transfer eval --target language --power
results/language.jsonl`` (the session-7 run, 20 prompts at 2k/4k, threshold protocol) gives sd 42.6 (namm),
28.9 (h2o), 22.9 (l2), 36.7 (streaming), 44.0 (random) points, so 774, 358, 225, 575 and 826 prompts for
+-3 points; ``--power results/language-budget-cal.jsonl`` (10 prompts) 430 (namm) down to 54 (h2o). A
+-3 point interval of loglik_rel is therefore a GPU-sized run (hundreds of prompts per row); the summary's
``power`` gives the same numbers for every finished run.

Managed layers: the host's full-attention layers (every layer of SmolLM2; the global layers of
Gemma 3, whose sliding-window layers keep their own window cache). ``retained_cache`` is over
managed layers only; the summary names them.

Outputs (``runs/language/language.json`` by default; ``--output results/NAME.json`` for committed results):
``NAME.jsonl`` (one record per session, appended as each finishes; rerun the same command to resume), ``NAME.json``
(summary: ``rows`` one per (protocol, policy) plus ``full`` and ``full-alt``, ``breakdown`` per task,
``by_length``, ``by_family_seen_in_training``, ``power``) and ``NAME.png`` (loglik_rel against retained cache;
needs matplotlib). Sharded runs (``RANK`` / ``WORLD_SIZE``) evaluate ``select_shard(samples, rank, world)``; merge
them with ``namm-transfer report --merge``.

Sizes. Per prompt: 2 full-cache sessions + 3 protocols x 6 policies (namm and the five baselines) = 20
sessions (6 before the protocols). The default run (6 tasks x 4 prompts at 2048 and 4096 tokens) is 24 prompts,
480 sessions, over the cells that passed the calibration (the others are left out with a notice; see
Calibration above). Suite v2 (at least 50 prompts per
length): ``namm-transfer eval --target language --per-length 50 --lengths 2048,4096,8192 --drop-uncalibrated
--output results/language-v2.json`` (at each length ``ceil(50 / tasks run there)`` prompts of every task whose
cell passed: 9 x 6 = 54 when all did), after ``namm-transfer eval --target language --calibrate`` (2048, 4096
and 8192 tokens by default). Measured for SmolLM2-135M in float32 on this project's CPU machine (CPU seconds
on one thread, update interval and chunk 256, before the protocols): a 2048-token prefill (2070 tokens with
the chat template) takes 18.6 s with the full cache, 18.7 s with H2O at half the cache, 16.4 s with a NAMM; a
4096-token prefill (4118) 45.3 s full, 38.5 s H2O; a decoding step 0.17-0.25 s. The committed default run of
session 7 (results/language.json, 120 sessions) took 98 minutes of session wall time as two one-thread shards;
with 20 sessions per prompt a 2k/4k prompt costs about 3 times that per prompt. ``--limit`` runs a smoke test.
Through this eval with the protocols (``namm-transfer eval --target language --model smollm2-135m --policies
full --no-noise-floor --tasks passkey --n 3 --lengths 2048,4096,8192 --keep-uncalibrated --output
runs/cost.json``, one torch thread, on the shared 2-core machine at a load average of 11-13, so wall time is
about 6 times the CPU time) one full-cache prompt took 75.9 s (2070 tokens: prefill 59.7 s, 16 decoding steps
16.1 s), 183.1 s (4118: 156.0 s + 27.1 s) and 561.3 s (8212: 537.2 s + 24.1 s) of wall time; the whole process
used 137 CPU seconds. SmolLM2-135M's context is 8192 positions: an 8k prompt with the chat template (8212
tokens) runs past it, and its full cache missed that passkey.

Imports nothing heavy at import time (``--help`` stays torch-free).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from namm_transfer.evals.args import positive_int

from namm_transfer.protocols import DEFAULT_PROTOCOLS

from .calibration import CALIBRATION_N, CALIBRATION_THRESHOLD

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TASKS",
    "DEFAULT_LENGTHS",
    "DEFAULT_N",
    "add_arguments",
    "main",
    "METRIC",
    "NOISE_FLOOR_POLICY",
    "breakdown",
    "power_rule",
    "run_session",
    "summary_rows",
    "with_loglik_rel",
    "SessionResult",
]

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TASKS = ("passkey", "kv_retrieval", "multikey_needle", "variable_tracking", "prose_fact", "phonebook")
DEFAULT_LENGTHS = (2048, 4096)
CALIBRATION_LENGTHS = (2048, 4096, 8192)
DEFAULT_N = 4
DEFAULT_UPDATE_INTERVAL = 256
DEFAULT_CHUNK_SIZE = 256
DEFAULT_MAX_NEW_TOKENS = "task"
SPLIT = "heldout"
DATA_SEED_BASE = 0
STREAMING_SINKS = 4
H2O_RECENT_FRACTION = 0.5
NOISE_FLOOR_POLICY = "full-alt"
POWER_HALF_WIDTH = 3.0
METRIC = (
    "loglik_rel = 100 * exp(loglik - loglik of the full cache on the same prompt) (loglik: mean log-probability "
    "of the teacher-forced answer tokens); a row's score is the mean over tasks of the task's mean loglik_rel "
    "(the full cache scores exactly 100)"
)
_SUMMARY_FIELDS = (
    "loglik_rel",
    "exact_match",
    "loglik_score",
    "loglik",
    "retained_cache",
    "retained_prefill",
    "peak_cache_mb",
    "peak_memory_mb",
    "throughput",
)


# ----------------------------------------------------------------------------------------------
# options


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one value")
    return list(dict.fromkeys(items))


def _tasks(text: str) -> list[str]:
    from .tasks import TASKS

    names = _csv(text)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return names


def _lengths(text: str) -> list[int]:
    try:
        values = [int(t) for t in _csv(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"lengths are comma-separated integers, got {text!r}") from err
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("lengths must be positive")
    return values


def _max_new_tokens(text: str) -> str:
    if text.strip() == "task":
        return "task"
    return str(positive_int(text))


def _protocols(text: str) -> str:
    """``--protocols``: checked with :func:`namm_transfer.protocols.parse_protocols`, kept in its canonical form."""
    from namm_transfer.protocols import parse_protocols

    try:
        return ",".join(p.spec for p in parse_protocols(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"a percentage in [0, 100], got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(model=DEFAULT_MODEL, namm="default", dtype="float32")
    parser.description = (
        "Zero-shot evaluation of a frozen NAMM on held-out generated long-context tasks against the full "
        "cache and eviction baselines (StreamingLLM, H2O, L2, random) under matched-budget protocols. Score: "
        "the answer's log-likelihood relative to the full cache (loglik_rel, full = 100), with exact match "
        f"beside it. Defaults: model {DEFAULT_MODEL}, the shipped default NAMM, float32."
    )
    parser.epilog = (
        "First calibrate the (task, length) cells the model answers with its full cache: `namm-transfer eval "
        "--target language --calibrate` (2048, 4096 and 8192 tokens; writes "
        "results/language-calibration-<model>.json; resumable). Default run: 6 tasks x 4 prompts at 2048 and 4096 "
        "tokens, 20 sessions a prompt (full, full-alt, 3 protocols x 6 policies); suite v2: --per-length 50 "
        "--lengths 2048,4096,8192 --drop-uncalibrated (at least 50 prompts a length). Shards: RANK and WORLD_SIZE, "
        "then `namm-transfer report --merge`; --limit N gives a smoke test; --power RUN.jsonl says how many prompts "
        "a +-3 point interval needs. For Gemma 3 "
        "(--model gemma3-270m, the base model: raw prompts) the managed layers are its global-attention layers."
    )
    g = parser.add_argument_group("language target")
    g.add_argument(
        "--tasks",
        type=_tasks,
        default=None,
        help=f"comma-separated held-out tasks (default: {','.join(DEFAULT_TASKS)}, of which the cells that failed the "
        "calibration are left out with a notice; tasks named here are refused instead unless --keep-uncalibrated)",
    )
    g.add_argument("--n", type=positive_int, default=DEFAULT_N, help=f"samples per task (default: {DEFAULT_N})")
    g.add_argument(
        "--per-length",
        type=positive_int,
        metavar="N",
        help="instead of --n: at least N prompts per length, split evenly over the tasks whose (task, length) cell "
        "is run (suite v2: 50)",
    )
    g.add_argument(
        "--lengths",
        type=_lengths,
        default=None,
        help="comma-separated held-out prompt lengths in tokens; samples cycle through them "
        f"(default: {','.join(map(str, DEFAULT_LENGTHS))}; with --calibrate: "
        f"{','.join(map(str, CALIBRATION_LENGTHS))})",
    )
    g.add_argument(
        "--update-interval",
        type=positive_int,
        default=DEFAULT_UPDATE_INTERVAL,
        help=f"run the memory policy every N tokens (default: {DEFAULT_UPDATE_INTERVAL}, as in evolution)",
    )
    g.add_argument(
        "--chunk-size",
        type=positive_int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"prefill chunk length (default: {DEFAULT_CHUNK_SIZE})",
    )
    g.add_argument(
        "--max-new-tokens",
        type=_max_new_tokens,
        default=DEFAULT_MAX_NEW_TOKENS,
        help="greedy tokens decoded by every policy, without early stop (cut at the first EOS for scoring): N, "
        "or 'task' for each task's own budget (passkey 16, multikey_needle 24, prose_fact 24, variable_tracking "
        "48, kv_retrieval 64: its uuid answers take 33-37 SmolLM2 tokens) (default: task)",
    )
    g.add_argument(
        "--protocols",
        type=_protocols,
        default=DEFAULT_PROTOCOLS,
        help="matched-budget protocols, comma-separated: ratio:R (every budgeted policy, NAMM included, keeps its "
        "top R of the tokens seen, also at the end of the prompt) and threshold (NAMM keeps scores >= 0; "
        f"baselines replay its kept counts) (default: {DEFAULT_PROTOCOLS}); the full cache runs once per prompt",
    )
    g.add_argument(
        "--no-noise-floor",
        action="store_true",
        help="skip the full-alt row (the full cache again with half the prefill chunk: what no difference looks "
        "like; on by default)",
    )
    g.add_argument(
        "--namm-sinks",
        type=int,
        default=None,
        metavar="N",
        help="always keep the first N positions under NAMM (NAMMConfig.sink_tokens; default: the checkpoint's, "
        "0 for the paper's rule)",
    )
    g.add_argument(
        "--namm-recent",
        type=int,
        default=None,
        metavar="N",
        help="always keep the newest N positions under NAMM (NAMMConfig.recent_tokens, outside the spec; default: "
        "the checkpoint's, 0 for the paper's rule)",
    )
    g.add_argument("--no-plot", action="store_true", help="do not write the score vs retained-cache PNG")
    c = parser.add_argument_group("calibration (which (task, length) cells the full cache answers)")
    c.add_argument(
        "--calibrate",
        action="store_true",
        help="measure the full cache's exact match per (task, length) cell on the calibration split, walking each "
        "task's difficulty ladder until it reaches the threshold; writes --calibration (resumable)",
    )
    c.add_argument(
        "--calibration",
        metavar="PATH",
        help="calibration summary to write (--calibrate) or read (default: results/language-calibration-<model>.json)",
    )
    c.add_argument(
        "--calibration-n",
        type=positive_int,
        default=CALIBRATION_N,
        help=f"calibration prompts per cell and difficulty (default: {CALIBRATION_N})",
    )
    c.add_argument(
        "--calibration-threshold",
        type=_share,
        default=CALIBRATION_THRESHOLD,
        help=f"full-cache exact match (%%) a cell needs (default: {CALIBRATION_THRESHOLD:g})",
    )
    keep = c.add_mutually_exclusive_group()
    keep.add_argument(
        "--keep-uncalibrated",
        action="store_true",
        help="evaluate cells that failed (or lack) the calibration, at the task's default difficulty",
    )
    keep.add_argument(
        "--drop-uncalibrated", action="store_true", help="leave out cells that failed (or lack) the calibration"
    )
    c.add_argument(
        "--power",
        metavar="RUN.jsonl",
        help="print, from a finished (pilot) run's records, how many prompts give a +-3 point interval of each "
        "row's loglik_rel difference from the full cache (namm_transfer.stats.required_units); runs nothing",
    )


# ----------------------------------------------------------------------------------------------
# one session


@dataclass
class SessionResult:
    """What one policy did on one sample (see :func:`run_session`)."""

    generated: list[int]
    """Greedy tokens of sequence 0 (``max_new_tokens`` of them, EOS not removed)."""
    answer_logprobs: list[float]
    """Log probability of each answer token on the teacher-forced sequence 1."""
    kept_counts: dict[int, dict[int, list[list[int]]]]
    """``stats.kept_counts``: ``[update][layer]`` = (2, KV heads) kept tokens (rows repeated before the fork)."""
    fork_update: int
    """Updates made before the fork (on the single prompt sequence)."""
    retained_cache: float
    retained_prefill: float
    peak_cache_bytes: int
    peak_memory_bytes: int | None
    prefill_s: float
    decode_s: float
    managed_layers: tuple[int, ...]
    n_layers: int
    n_updates: int


def _live_cache_bytes(engine: Any, row: int = 0) -> int:
    """KV bytes held for sequence ``row``: live tokens of managed layers, the whole cache of the others."""
    cache = engine.cache
    if cache is None:
        return 0
    total = 0
    for i, layer in enumerate(getattr(cache, "layers", ())):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.ndim != 4 or keys.numel() == 0:
            continue
        per_token = keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
        st = engine.states.get(i)
        if st is not None and st.valid.shape[-1] == keys.shape[-2]:
            n = int(st.valid[row].sum())  # live tokens summed over this layer's KV heads
        else:
            n = keys.shape[1] * keys.shape[2]
        total += n * per_token
    return total


@contextmanager
def _cache_meter(engine: Any) -> Iterator[Callable[[], int]]:
    """Track the largest :func:`_live_cache_bytes` of sequence 0, after every forward call and just
    before every eviction (the engine's ``update`` is wrapped on this instance for the duration)."""
    peak = [0]

    def measure() -> None:
        peak[0] = max(peak[0], _live_cache_bytes(engine))

    original_update = engine.update
    original_forward = engine.forward_chunk

    def update() -> None:
        measure()
        original_update()

    def forward_chunk(*args: Any, **kwargs: Any) -> Any:
        out = original_forward(*args, **kwargs)
        measure()
        return out

    engine.update = update
    engine.forward_chunk = forward_chunk
    try:
        yield lambda: peak[0]
    finally:
        del engine.update
        del engine.forward_chunk


def run_session(
    model: Any,
    policy: Any,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    max_new_tokens: int,
    *,
    update_interval: int,
    chunk_size: int,
    device: Any,
    final_update: bool = False,
) -> SessionResult:
    """Prefill ``prompt_ids``, fork, decode greedily on row 0 and teacher-force ``answer_ids`` on row 1.

    Both rows run ``max(max_new_tokens, len(answer_ids)) - 1`` steps, whatever is generated, so two
    policies given the same sample make the same update steps (what a replayed budget needs).
    ``final_update``: run the policy once more at the end of the prompt (the ratio protocols: the budget holds
    when the answer starts), see :func:`namm_transfer.session.attach`.
    """
    import torch

    from namm_transfer.session import attach

    from .scoring import answer_logprob

    if not answer_ids:
        raise ValueError("the answer has no tokens")
    n_steps = max(max_new_tokens, len(answer_ids)) - 1
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    answer = torch.tensor(list(answer_ids), dtype=torch.long, device=device)
    cuda = prompt.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(prompt.device)
        torch.cuda.reset_peak_memory_stats(prompt.device)
    t0 = time.perf_counter()
    with (
        attach(model, policy, update_interval=update_interval, chunk_size=chunk_size, final_update=final_update) as mem,
        _cache_meter(mem.engine) as peak,
    ):
        engine = mem.engine
        logits = mem.prefill(prompt)[:, -1].float()  # (1, V): predicts the first answer / generated token
        if cuda:
            torch.cuda.synchronize(prompt.device)
        t1 = time.perf_counter()
        n_prefill_calls = len(engine.stats.clock)
        fork_update = engine.update_step
        engine.fork(2)
        generated = [int(logits[0].argmax())]
        answer_logits = [logits[0]]  # row i predicts answer token i
        feed = torch.stack([torch.tensor(generated[0], device=device), answer[0]]).view(2, 1)
        for i in range(n_steps):
            out = mem.step(feed)[:, -1].float()  # (2, V)
            nxt = int(out[0].argmax())
            if len(generated) < max_new_tokens:
                generated.append(nxt)
            if i + 1 < len(answer_ids):
                answer_logits.append(out[1])
                forced = answer[i + 1]
            else:
                forced = out[1].argmax()
            feed = torch.stack([torch.tensor(nxt, device=device), forced]).view(2, 1)
        if cuda:
            torch.cuda.synchronize(prompt.device)
        t2 = time.perf_counter()
        logprobs = answer_logprob(torch.stack(answer_logits)[None], answer[None]).per_token[0].tolist()
        stats = engine.stats
        per_call = stats.retained_per_call()
        result = SessionResult(
            generated=generated,
            answer_logprobs=logprobs,
            kept_counts={
                s: {layer: [list(r) for r in c] for layer, c in d.items()} for s, d in stats.kept_counts.items()
            },
            fork_update=fork_update,
            retained_cache=float(per_call[:, 0].mean()) if per_call.size else 1.0,
            retained_prefill=float(per_call[:n_prefill_calls, 0].mean()) if n_prefill_calls else 1.0,
            peak_cache_bytes=int(peak()),
            peak_memory_bytes=int(torch.cuda.max_memory_allocated(prompt.device)) if cuda else None,
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
            managed_layers=tuple(stats.managed_layers),
            n_layers=int(engine.host.n_layers),
            n_updates=int(engine.update_step),
        )
    return result


def replay_record(kept_counts: Mapping[Any, Mapping[Any, Any]], fork_update: int) -> dict[int, dict[int, Any]]:
    """NAMM's kept counts as a :class:`ReplayBudget` record for a run with the same prefill / fork / steps.

    Updates before the fork were made on one sequence; the engine's fork repeated their rows, so
    only the first row is replayed for them.
    """
    out: dict[int, dict[int, Any]] = {}
    for step, layers in kept_counts.items():
        s = int(step)
        out[s] = {int(layer): (c[:1] if s < fork_update else c) for layer, c in layers.items()}
    return out


def kept_counts_hash(kept_counts: Mapping[Any, Mapping[Any, Any]]) -> str:
    canonical = {str(s): {str(layer): c for layer, c in d.items()} for s, d in kept_counts.items()}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# summaries


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _label(protocol: Any, policy: str) -> str:
    """A row's name: ``policy`` (no protocol: full, full-alt) or ``policy@protocol`` (``namm@ratio-50``)."""
    return str(policy) if protocol is None else f"{policy}@{protocol}"


def _row_key(record: Mapping[str, Any]) -> tuple[Any, str]:
    return (record.get("protocol"), record["policy"])


def _loglik_rel(loglik: float | None, loglik_full: float | None) -> float | None:
    if loglik is None or loglik_full is None:
        return None
    return 100.0 * math.exp(loglik - loglik_full)


def with_loglik_rel(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``records`` whose ``loglik_rel`` and ``score`` are ``100 * exp(loglik - loglik_full)`` with the full
    cache's loglik on the same sample (None without one). Records written before loglik_rel (``score`` = exact match,
    no ``protocol``) get ``exact_match`` = their old ``score`` and ``protocol`` None."""
    full = {r.get("sample_id"): _num(r.get("loglik")) for r in records if r.get("policy") == "full"}
    out = []
    for rec in records:
        r = dict(rec)
        r.setdefault("protocol", None)
        if "exact_match" not in r:
            r["exact_match"] = r.get("score")
        r["loglik_rel"] = r["score"] = _loglik_rel(_num(r.get("loglik")), full.get(r.get("sample_id")))
        out.append(r)
    return out


def _group_row(key: tuple[Any, str], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    scores = [s for s in (_num(r.get("loglik_rel")) for r in records) if s is not None]
    mean = _mean(scores)
    row: dict[str, Any] = {"policy": key[1], "protocol": key[0], "score": mean}
    row["score_std"] = (
        math.sqrt(math.fsum((s - mean) ** 2 for s in scores) / len(scores)) if scores and mean is not None else None
    )
    row["n"] = len(records)
    for field in _SUMMARY_FIELDS:
        row[field] = _mean([v for v in (_num(r.get(field)) for r in records) if v is not None])
    return row


def _row_order(
    records: Sequence[Mapping[str, Any]], preferred: Sequence[str], labels: Sequence[str]
) -> list[tuple[Any, str]]:
    """Rows without a protocol first (full, full-alt), then each protocol in ``labels`` order; within one, the
    policies in ``preferred`` order (NAMM before the baselines), unknown ones last in the order seen."""
    seen = list(dict.fromkeys(_row_key(r) for r in records))
    policies = ["full", NOISE_FLOOR_POLICY, "namm", *[p for p in preferred if p not in ("full", "namm")]]

    def rank(key: tuple[Any, str]) -> tuple[int, int]:
        proto, policy = key
        p = -1 if proto is None else (list(labels).index(proto) if proto in labels else len(labels))
        return p, policies.index(policy) if policy in policies else len(policies)

    return sorted(seen, key=rank)


def _attach_paired(rows: list[dict[str, Any]], records: Sequence[Mapping[str, Any]]) -> None:
    """Add ``vs_full`` / ``vs_namm`` (loglik_rel) and ``exact_match_vs_full`` / ``exact_match_vs_namm`` to ``rows``:
    :func:`namm_transfer.stats.compare_policies` with unit = sample_id, stratum = task, rows = (protocol, policy)."""
    from namm_transfer.stats import compare_policies

    for value, prefix in (("loglik_rel", ""), ("exact_match", "exact_match_")):
        table = compare_policies(
            records,
            unit=lambda r: r["sample_id"],
            value=value,
            stratum=lambda r: r.get("task"),
            group=_row_key,
        )
        for row in rows:
            for name, interval in table.get((row["protocol"], row["policy"]), {}).items():
                row[prefix + name] = interval


def summary_rows(
    records: Sequence[Mapping[str, Any]], preferred: Sequence[str], labels: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One row per (protocol, policy). ``score`` (loglik_rel), ``exact_match``, ``loglik_score`` and ``loglik`` are
    means over tasks of the task means; ``score_std`` is over samples; the other fields are means over samples;
    ``vs_full`` / ``vs_namm`` / ``exact_match_vs_*`` are paired intervals (:func:`_attach_paired`)."""
    rows = []
    for key in _row_order(records, preferred, labels):
        recs = [r for r in records if _row_key(r) == key]
        row = _group_row(key, recs)
        tasks: dict[str, list[Mapping[str, Any]]] = {}
        for r in recs:
            tasks.setdefault(str(r.get("task")), []).append(r)
        for field in ("score", "exact_match", "loglik_rel", "loglik_score", "loglik"):
            task_means = [
                _mean([v for v in (_num(r.get(field)) for r in rs) if v is not None]) for rs in tasks.values()
            ]
            row[field] = _mean([m for m in task_means if m is not None])
        row["tasks"] = len(tasks)
        rows.append(row)
    _attach_paired(rows, records)
    return rows


def breakdown(
    records: Sequence[Mapping[str, Any]], field: str, preferred: Sequence[str], labels: Sequence[str] = ()
) -> dict[str, list[dict[str, Any]]]:
    """``{value of field: summary_rows of its records}`` (booleans as ``"true"`` / ``"false"``)."""
    parts: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        v = r.get(field)
        if v is not None:
            parts.setdefault(str(v).lower() if isinstance(v, bool) else str(v), []).append(r)

    def order(k: str) -> tuple[int, Any]:
        return (0, int(k)) if k.isdigit() else (1, k)

    return {value: summary_rows(parts[value], preferred, labels) for value in sorted(parts, key=order)}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _interval(ci: Mapping[str, Any] | None) -> str:
    return "-" if not ci else f"{ci['mean']:+.1f} [{ci['lo']:+.1f},{ci['hi']:+.1f}]"


def format_table(rows: Sequence[Mapping[str, Any]], by_task: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Rows (``policy@protocol``): loglik_rel score, its paired difference from the full cache, exact match, cache,
    speed, and the score per task."""
    tasks = list(by_task)
    head = f"{'row':<22}{'score':>7}{'vs full [95%]':>22}{'exact':>7}{'retained':>9}{'KV MB':>8}{'tok/s':>7}{'n':>5}"
    head += "".join(f"{t[:12]:>13}" for t in tasks)
    lines = [head, "-" * len(head)]
    for row in rows:
        line = (
            f"{_label(row.get('protocol'), row['policy']):<22}{_fmt(row['score'], '7.1f')}"
            f"{_interval(row.get('vs_full')):>22}{_fmt(row.get('exact_match'), '7.1f')}"
            f"{_fmt(row.get('retained_cache'), '9.3f')}{_fmt(row.get('peak_cache_mb'), '8.2f')}"
            f"{_fmt(row.get('throughput'), '7.1f')}{row['n']:>5}"
        )
        for t in tasks:
            tr = next((x for x in by_task[t] if _row_key(x) == _row_key(row)), None)
            line += f"{_fmt(tr and tr['score'], '13.1f')}"
        lines.append(line)
    return "\n".join(lines)


def write_plot(
    path: Path, rows: Sequence[Mapping[str, Any]], by_task: Mapping[str, Sequence[Mapping[str, Any]]], title: str
) -> Path | None:
    """Score (loglik_rel, full cache = 100) against retained cache, one marker per row (large: over tasks; small:
    per task)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; no plot written")
        return None
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    cmap = plt.get_cmap("tab10")
    for i, row in enumerate(rows):
        if row.get("score") is None or row.get("retained_cache") is None:
            continue
        color = cmap(i % 10)
        pts = [
            (tr["retained_cache"], tr["score"])
            for trs in by_task.values()
            for tr in trs
            if _row_key(tr) == _row_key(row) and tr.get("retained_cache") is not None and tr.get("score") is not None
        ]
        if pts:
            ax.scatter([x for x, _ in pts], [y for _, y in pts], s=14, alpha=0.35, color=color)
        label = _label(row.get("protocol"), row["policy"])
        ax.scatter([row["retained_cache"]], [row["score"]], s=70, color=color, label=label, edgecolor="black")
    ax.set_xlabel("retained cache (fraction of a full cache, managed layers)")
    ax.set_ylabel("loglik_rel (full cache = 100)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0.0, 1.05)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# main


def _eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _interleave(per_task: Sequence[Sequence[Any]]) -> list[Any]:
    """Round-robin over tasks, so that ``--limit`` and shards cover every task."""
    out: list[Any] = []
    for i in range(max((len(s) for s in per_task), default=0)):
        out.extend(s[i] for s in per_task if i < len(s))
    return out


def _unit_plan(
    sample_id: str, policies: Sequence[str], protocols: Sequence[Any], noise_floor: bool
) -> list[tuple[str, str, Any]]:
    """``(key, policy, protocol or None)`` of every session of one prompt, in run order: the full cache (and its
    noise-floor rerun) once, then per protocol the NAMM before the baselines (the threshold protocol's baselines
    replay its kept counts). Keys: ``full/<id>``, ``full-alt/<id>``, ``<policy>@<protocol label>/<id>``."""
    units: list[tuple[str, str, Any]] = []
    if "full" in policies:
        units.append((f"full/{sample_id}", "full", None))
        if noise_floor:
            units.append((f"{NOISE_FLOOR_POLICY}/{sample_id}", NOISE_FLOOR_POLICY, None))
    for proto in protocols:
        names = (["namm"] if "namm" in policies else []) + [p for p in policies if p not in ("namm", "full")]
        units.extend((f"{name}@{proto.label}/{sample_id}", name, proto) for name in names)
    return units


def main(args: argparse.Namespace) -> int:
    if getattr(args, "power", None):
        return power_main(args.power)
    import torch

    from namm_transfer.checkpoint import load_namm, namm_record
    from namm_transfer.evolution.cli import encode_sample
    from namm_transfer.models import load_model
    from namm_transfer.policies.base import RatioBudget, ReplayBudget
    from namm_transfer.policies.namm_policy import NAMMPolicy
    from namm_transfer.protocols import parse_protocols
    from namm_transfer.registry import create_policy, find_adapter, list_policies
    from namm_transfer.results import ResultsWriter, select_shard

    from . import scoring
    from .calibration import CalibrationError, calibration_path, cell_key, load_calibration, plan_cells
    from .tasks import EVAL_ONLY_TASKS, make_split

    if args.lengths is None:
        args.lengths = list(CALIBRATION_LENGTHS if args.calibrate else DEFAULT_LENGTHS)
    default_tasks = args.tasks is None
    if default_tasks:
        args.tasks = list(DEFAULT_TASKS)
    model_name = args.model or DEFAULT_MODEL
    cal_path = Path(args.calibration) if args.calibration else calibration_path(model_name)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or "float32"
    torch.manual_seed(args.seed)
    if args.calibrate:
        model, tokenizer = load_model(model_name, device=device, dtype=dtype)
        find_adapter(model)
        return calibrate_main(args, model, tokenizer, model_name, cal_path, device, dtype)

    policies: list[str] = list(args.policies)
    known = list_policies()
    unknown = [p for p in policies if p not in known]
    if unknown:
        print(f"error: unknown policy {', '.join(unknown)}; registered: {', '.join(known)}", file=sys.stderr)
        return 2
    protocols = parse_protocols(args.protocols)
    budgeted = [p for p in policies if p not in ("namm", "full")]
    need_namm = "namm" in policies or (any(p.kind == "threshold" for p in protocols) and bool(budgeted))
    noise_floor = "full" in policies and not args.no_noise_floor
    alt_chunk = max(1, args.chunk_size // 2)

    # which (task, length) cells, at which difficulty: refused before anything is loaded or written. The default
    # task list leaves out the cells that failed the calibration; tasks the user names are refused instead.
    try:
        if cal_path.is_file() or not args.keep_uncalibrated:
            cells, threshold = load_calibration(cal_path, model_name)  # (a missing file: says how to write it)
        else:
            cells, threshold = None, None
        plan, kept, dropped = plan_cells(
            args.tasks,
            args.lengths,
            cells,
            keep_uncalibrated=args.keep_uncalibrated,
            drop_uncalibrated=args.drop_uncalibrated or (default_tasks and not args.keep_uncalibrated),
            threshold=threshold if threshold is not None else args.calibration_threshold,
            source=str(cal_path) if cells is not None else f"{cal_path} (no such file)",
        )
    except CalibrationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dropped:
        print(f"left out (task, length) cells that failed the calibration: {', '.join(dropped)}", file=sys.stderr)

    try:
        namm_net = load_namm(args.namm or "default", device=device) if need_namm else None
    except FileNotFoundError as err:  # no default NAMM shipped yet, or a wrong path
        print(f"error: {err}", file=sys.stderr)
        return 2
    for flag, field, value in (
        ("--namm-sinks", "sink_tokens", args.namm_sinks),
        ("--namm-recent", "recent_tokens", args.namm_recent),
    ):
        if namm_net is None or value is None:
            continue
        if value < 0:
            print(f"error: {flag} must be >= 0, got {value}", file=sys.stderr)
            return 2
        from dataclasses import replace

        namm_net.config = replace(namm_net.config, **{field: value})
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    find_adapter(model)  # an unsupported model is refused before anything is written
    chat = bool(getattr(tokenizer, "chat_template", None))

    per_task = []
    tasks_at = {n: [t for t in args.tasks if n in plan.get(t, {})] for n in args.lengths}
    for task in args.tasks:
        lengths = [n for n in args.lengths if n in plan.get(task, {})]
        if not lengths:
            continue
        if args.per_length is None:
            per_task.append(
                make_split(
                    task,
                    SPLIT,
                    n=args.n,
                    lengths=lengths,
                    tokenizer=tokenizer,
                    seed_base=DATA_SEED_BASE,
                    options_by_length=plan[task],
                )
            )
            continue
        # --per-length N: ceil(N / tasks run at that length) prompts of this task at each of its lengths, the first
        # ones of the task's cycle through every requested length (ids and seeds do not depend on dropped cells)
        want = {n: math.ceil(args.per_length / len(tasks_at[n])) for n in lengths}
        pool = make_split(
            task,
            SPLIT,
            n=max(want.values()) * len(args.lengths),
            lengths=args.lengths,
            tokenizer=tokenizer,
            seed_base=DATA_SEED_BASE,
            options_by_length=plan[task],
        )
        picked: list[Any] = []
        for sample in pool:
            if want.get(sample.target_length, 0) > sum(x.target_length == sample.target_length for x in picked):
                picked.append(sample)
        per_task.append(picked)
    samples = _interleave(per_task)
    if args.limit is not None:
        samples = samples[: args.limit]

    settings = {
        "split": SPLIT,
        "tasks": list(args.tasks),
        "n": args.n if args.per_length is None else None,
        "per_length": args.per_length,
        "lengths": list(args.lengths),
        "data_seed_base": DATA_SEED_BASE,
        "seed": args.seed,
        "update_interval": args.update_interval,
        "chunk_size": args.chunk_size,
        "protocols": [p.spec for p in protocols],
        "protocol_labels": [p.label for p in protocols],
        "final_update": {p.label: p.kind == "ratio" for p in protocols},
        "metric": METRIC,
        "noise_floor": (
            {
                "policy": NOISE_FLOOR_POLICY,
                "setting": "chunk_size",
                "value": alt_chunk,
                "instead_of": args.chunk_size,
                "why": "the full cache again with another prefill chunk length, which changes only the order of "
                "floating-point sums: its vs_full is what no difference looks like",
            }
            if noise_floor
            else None
        ),
        "calibration": {
            "file": cal_path.name if cells is not None else None,
            "threshold": threshold,
            "cells": {cell_key(t, n): o for t, lens in plan.items() for n, o in sorted(lens.items())},
            "kept_uncalibrated": kept,
            "dropped_uncalibrated": dropped,
        },
        "eval_only_tasks": sorted(t for t in args.tasks if t in EVAL_ONLY_TASKS),
        "namm_sink_tokens": namm_net.config.sink_tokens if namm_net is not None else None,
        **(
            {"namm_recent_tokens": namm_net.config.recent_tokens}
            if namm_net is not None and namm_net.config.recent_tokens
            else {}
        ),
        "max_new_tokens": args.max_new_tokens if args.max_new_tokens == "task" else int(args.max_new_tokens),
        "dtype": dtype,
        "prompt": "chat template + answer cue" if chat else "raw prompt ending in the answer cue",
        "decoding": "greedy, exactly max(max_new_tokens, answer tokens) steps for every policy, cut at EOS to score",
        "baselines": {
            "streaming": {"sinks": STREAMING_SINKS},
            "h2o": {"recent_fraction": H2O_RECENT_FRACTION},
            "random": {"seed": args.seed},
        },
    }
    writer = ResultsWriter(
        args.output,
        args.command,
        target="language",
        settings=settings,
        model=model_name,
        namm_checkpoint=namm_record(namm_net) if namm_net is not None else None,
        extendable=("n", "per_length"),  # more prompts keep the ones already run (their ids and seeds do not change)
    )
    writer.refuse_samples_outside(s.id for s in samples)
    mine = select_shard(samples, writer.rank, writer.world_size)
    done = writer.done_keys()
    order = (["full"] if "full" in policies else []) + (["namm"] if "namm" in policies else []) + budgeted
    eos = _eos_ids(tokenizer, model)
    logger.info(
        "language eval: %d samples (%d in this shard), policies %s, protocols %s, %s on %s",
        len(samples),
        len(mine),
        ",".join(order),
        args.protocols,
        model_name,
        device,
    )
    records_by_key = {r["key"]: r for r in writer.records()}

    def make_policy(name: str, proto: Any, replay: dict[int, dict[int, Any]] | None, sample_id: str) -> Any:
        if name in ("full", NOISE_FLOOR_POLICY):
            return create_policy("full")
        if name == "namm":
            if namm_net is None:  # cannot happen: need_namm is true whenever namm is a policy
                raise RuntimeError("policy namm requested but no NAMM was loaded")
            return NAMMPolicy(namm_net) if proto.kind == "threshold" else NAMMPolicy(namm_net, RatioBudget(proto.ratio))
        if proto.kind == "threshold":
            assert replay is not None
            budget: Any = ReplayBudget(replay, source=f"namm@threshold/{sample_id}")
        else:
            budget = RatioBudget(proto.ratio)
        kwargs: dict[str, Any] = {"budget": budget}
        if name == "random":
            kwargs["seed"] = args.seed
        elif name == "streaming":
            kwargs["sinks"] = STREAMING_SINKS
        elif name == "h2o":
            kwargs["recent_fraction"] = H2O_RECENT_FRACTION
        return create_policy(name, **kwargs)

    n_done = 0
    for si, sample in enumerate(mine):
        todo = [u for u in _unit_plan(sample.id, policies, protocols, noise_floor) if u[0] not in done]
        if not todo:
            continue
        ids, (a0, a1) = encode_sample(tokenizer, sample)
        max_new = sample.max_new_tokens if args.max_new_tokens == "task" else int(args.max_new_tokens)
        prompt_ids, answer_ids = ids[:a0], ids[a0:a1]
        cell = cell_key(sample.task, sample.target_length)
        extra = {
            "difficulty": plan[sample.task][sample.target_length],
            "calibrated": cell not in kept,
            "family_seen_in_training": sample.task not in EVAL_ONLY_TASKS,
        }
        replay: dict[int, dict[int, Any]] | None = None
        namm_threshold_key = f"namm@threshold/{sample.id}"
        namm_rec = records_by_key.get(namm_threshold_key)
        if namm_rec is not None and "kept_counts" in namm_rec:
            replay = replay_record(namm_rec["kept_counts"], namm_rec["fork_update"])
        run_list: list[tuple[str, str, Any, bool]] = []
        for key, name, proto in todo:
            if proto is not None and proto.kind == "threshold" and name != "namm" and replay is None:
                if not any(k == namm_threshold_key for k, *_ in run_list):
                    run_list.append((namm_threshold_key, "namm", proto, False))  # for its cache lengths only
            run_list.append((key, name, proto, True))
        for key, name, proto, wanted in run_list:
            res = run_session(
                model,
                make_policy(name, proto, replay, sample.id),
                prompt_ids,
                answer_ids,
                max_new,
                update_interval=args.update_interval,
                chunk_size=alt_chunk if name == NOISE_FLOOR_POLICY else args.chunk_size,
                device=device,
                final_update=proto is not None and proto.kind == "ratio",
            )
            if name == "namm" and proto.kind == "threshold":
                replay = replay_record(res.kept_counts, res.fork_update)
            if not wanted:
                continue
            full_rec = records_by_key.get(f"full/{sample.id}")
            record = _record(
                key,
                name,
                sample,
                res,
                tokenizer,
                eos,
                scoring.score_sample,
                prompt_ids,
                answer_ids,
                max_new,
                device,
                make_budget_label(name, proto),
                protocol=proto.label if proto is not None else None,
                loglik_full=full_rec.get("loglik") if full_rec is not None else None,
                extra=extra,
            )
            if name == "namm" and proto.kind == "threshold":
                record["kept_counts"] = {
                    str(s): {str(layer): c for layer, c in d.items()} for s, d in res.kept_counts.items()
                }
                record["fork_update"] = res.fork_update
            writer.add(record)
            records_by_key[key] = record
            n_done += 1
            logger.info(
                "[%d/%d] %-22s %-34s loglik_rel %6.1f exact %5.1f retained %.3f (%.1fs)",
                si + 1,
                len(mine),
                key.split("/", 1)[0],
                sample.id,
                record["loglik_rel"] if record["loglik_rel"] is not None else float("nan"),
                record["exact_match"],
                record["retained_cache"],
                record["wall_s"],
            )
    if writer.resumed and not n_done:
        logger.info("every unit was already in %s", writer.jsonl_path)

    records = with_loglik_rel(writer.records())
    labels = [p.label for p in protocols]
    rows = summary_rows(records, order, labels)
    by_task = breakdown(records, "task", order, labels)
    managed = next((r.get("managed_layers") for r in records if r.get("managed_layers") is not None), None)
    n_layers = next((r.get("n_layers") for r in records if r.get("n_layers") is not None), None)
    extra_summary: dict[str, Any] = {
        "breakdown_by": "task",
        "by_length": breakdown(records, "length", order, labels),
        "by_family_seen_in_training": breakdown(records, "family_seen_in_training", order, labels),
        "managed_layers": managed,
        "n_layers": n_layers,
        "retained_cache_over": "managed (full-attention) layers only; forward calls of prefill and decoding",
        "metric": METRIC,
        "score": METRIC,
        "exact_match": "mean over tasks of the task's exact match (% of samples answered, contains / contains_all)",
        "paired": "vs_full / vs_namm (loglik_rel) and exact_match_vs_full / exact_match_vs_namm: "
        "namm_transfer.stats.compare_policies, unit = sample_id, stratum = task, rows = (protocol, policy)",
        "noise_floor": settings["noise_floor"],
        "power": power_rule(records),
        "peak_memory_mb": "torch.cuda.max_memory_allocated on GPU; the KV-cache peak (peak_cache_mb) on CPU",
        "samples": len(samples),
        "limit": args.limit,
    }
    png = writer.summary_path.with_suffix(".png")
    if not args.no_plot and records:
        ckpt = writer.namm_checkpoint or {}
        title = f"{model_name}, NAMM {ckpt.get('name') or '-'}, protocols {args.protocols}"
        if namm_net is not None and namm_net.config.sink_tokens:
            title += f", {namm_net.config.sink_tokens} sinks kept"
        if namm_net is not None and namm_net.config.recent_tokens:
            title += f", newest {namm_net.config.recent_tokens} kept"
        if write_plot(png, rows, by_task, title) is not None:
            extra_summary["plot"] = png.name
    path = writer.finalize(rows, by_task, extra=extra_summary)
    print(format_table(rows, by_task))
    print(f"managed layers: {managed} of {n_layers}; protocols: {args.protocols}")
    print(f"results: {path} ({len(records)} records in {writer.jsonl_path})")
    return 0


def make_budget_label(policy: str, proto: Any) -> str | None:
    """What a record's policy was held to: None (full cache), ``threshold`` (NAMM under the threshold protocol),
    ``replay:namm`` (its baselines) or ``ratio:R``."""
    if proto is None:
        return None
    if proto.kind == "ratio":
        return f"ratio:{proto.ratio:g}"
    return "threshold" if policy == "namm" else "replay:namm"


def _record(
    key: str,
    policy: str,
    sample: Any,
    res: SessionResult,
    tokenizer: Any,
    eos: set[int],
    score_sample: Callable[[Any, str], float],
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    max_new_tokens: int,
    device: str,
    budget: str | None,
    *,
    protocol: str | None = None,
    loglik_full: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One JSONL record. ``score`` is ``loglik_rel`` (None until the sample's full-cache loglik is known; the full
    cache itself scores exactly 100); ``exact_match`` is the generation scored by ``score_sample`` (percent)."""
    gen = list(res.generated)
    cut = next((i for i, t in enumerate(gen) if t in eos), None)
    kept = gen if cut is None else gen[:cut]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    em = 100.0 * float(score_sample(sample, text))
    loglik = _mean(res.answer_logprobs)
    rel = 100.0 if policy == "full" else _loglik_rel(loglik, loglik_full)
    wall = res.prefill_s + res.decode_s
    cache_mb = res.peak_cache_bytes / 2**20
    record: dict[str, Any] = {
        "key": key,
        "policy": policy,
        "protocol": protocol,
        "task": sample.task,
        "sample_id": sample.id,
        "length": sample.target_length,
        "sample_seed": sample.seed,
        "prompt_tokens": len(prompt_ids),
        "answer_tokens": len(answer_ids),
        "answer": sample.answer,
        "score": rel,
        "loglik_rel": rel,
        "exact_match": em,
        "loglik": loglik,
        "loglik_score": 100.0 * math.exp(loglik) if loglik is not None else None,
        "generation": text,
        "generated_tokens": len(kept),
        "max_new_tokens": max_new_tokens,
        "stopped_at_eos": cut is not None,
        "retained_cache": res.retained_cache,
        "retained_prefill": res.retained_prefill,
        "peak_cache_mb": cache_mb,
        "peak_memory_mb": res.peak_memory_bytes / 2**20 if res.peak_memory_bytes is not None else cache_mb,
        "peak_memory_source": "cuda_max_allocated" if res.peak_memory_bytes is not None else "kv_cache",
        "throughput": (len(prompt_ids) + max_new_tokens) / wall if wall > 0 else None,
        "prefill_s": res.prefill_s,
        "decode_s": res.decode_s,
        "wall_s": wall,
        "device": device,
        "budget": budget,
        "managed_layers": list(res.managed_layers),
        "n_layers": res.n_layers,
        "updates": res.n_updates,
        "kept_counts_hash": kept_counts_hash(res.kept_counts),
        **dict(extra or {}),
    }
    return record


# ----------------------------------------------------------------------------------------------
# calibration


def calibrate_main(
    args: argparse.Namespace, model: Any, tokenizer: Any, model_name: str, path: Path, device: str, dtype: str
) -> int:
    """``--calibrate``: walk every (task, length) cell down its difficulty ladder (see :mod:`.calibration`)."""
    from namm_transfer.evolution.cli import encode_sample
    from namm_transfer.results import ResultsFileError, ResultsWriter

    from . import scoring
    from .calibration import CALIBRATION_SPLIT, cell_key, summarize_cells, walk_cell
    from .tasks import DIFFICULTY, make_split

    chat = bool(getattr(tokenizer, "chat_template", None))
    threshold = float(args.calibration_threshold)
    settings = {
        "split": CALIBRATION_SPLIT,
        "n": args.calibration_n,
        "threshold": threshold,
        "data_seed_base": DATA_SEED_BASE,
        "update_interval": args.update_interval,
        "chunk_size": args.chunk_size,
        "max_new_tokens": args.max_new_tokens if args.max_new_tokens == "task" else int(args.max_new_tokens),
        "dtype": dtype,
        "prompt": "chat template + answer cue" if chat else "raw prompt ending in the answer cue",
    }
    writer = ResultsWriter(
        path, args.command, target="language-calibration", settings=settings, model=model_name,
        namm_checkpoint=None, rank=0, world_size=1,
    )  # fmt: skip
    done = {r["key"]: r for r in writer.records()}
    eos = _eos_ids(tokenizer, model)
    previous: dict[str, Any] = {}
    if writer.summary_path.is_file():  # cells of earlier calls (other tasks / lengths) stay in the summary
        try:
            previous = dict(json.loads(writer.summary_path.read_text()).get("cells") or {})
        except ValueError:
            previous = {}
    cells: dict[str, Any] = dict(previous)
    todo = [(t, n) for n in sorted(args.lengths) for t in args.tasks]
    if args.limit is not None:
        todo = todo[: args.limit]
    pools: dict[tuple[str, int, int], list[Any]] = {}

    def measure(task: str, length: int, level: int, options: Mapping[str, Any], i: int) -> float:
        if (task, length, level) not in pools:
            pools[task, length, level] = make_split(
                task, CALIBRATION_SPLIT, n=args.calibration_n, lengths=[length], tokenizer=tokenizer,
                seed_base=DATA_SEED_BASE, **options,
            )  # fmt: skip
        sample = pools[task, length, level][i]
        key = f"full/{sample.id}/level{level}"
        if key in done:
            if done[key].get("difficulty") != dict(options):
                raise ResultsFileError(
                    f"{writer.jsonl_path} holds {key} measured at difficulty {done[key].get('difficulty')}, but "
                    f"level {level} of {task}'s ladder is now {dict(options)}: pass another --calibration PATH"
                )
            return float(done[key]["exact_match"])
        ids, (a0, a1) = encode_sample(tokenizer, sample)
        max_new = sample.max_new_tokens if args.max_new_tokens == "task" else int(args.max_new_tokens)
        res = run_session(
            model, "full", ids[:a0], ids[a0:a1], max_new, update_interval=args.update_interval,
            chunk_size=args.chunk_size, device=device,
        )  # fmt: skip
        record = _record(
            key, "full", sample, res, tokenizer, eos, scoring.score_sample, ids[:a0], ids[a0:a1], max_new, device,
            None, extra={"level": level, "difficulty": dict(options)},
        )  # fmt: skip
        record.pop("kept_counts_hash", None)
        writer.add(record)
        done[key] = record
        logger.info(
            "calibration %-20s %5d level %d #%d: exact %5.1f (%.1fs)", task, length, level, i, record["exact_match"],
            record["wall_s"],
        )  # fmt: skip
        return float(record["exact_match"])

    def write() -> Path:
        ordered = dict(sorted(cells.items(), key=lambda kv: (int(kv[1]["length"]), kv[1]["task"])))
        rows = summarize_cells(list(ordered.values()))
        return writer.finalize(
            rows,
            {},
            extra={
                "cells": ordered,
                "threshold": threshold,
                "metric": "full-cache exact match (contains / contains_all of the greedy answer), %",
                "tuned": {k: c["options"] for k, c in ordered.items() if c["passed"] and c["level"]},
                "failed": [k for k, c in ordered.items() if not c["passed"]],
            },
        )

    out = path
    for task, length in todo:
        cell = walk_cell(
            task,
            length,
            DIFFICULTY[task],
            functools.partial(measure, task, length),
            args.calibration_n,
            threshold,
        )
        cells[cell_key(task, length)] = cell
        out = write()  # after every cell: a long run shows its progress
        tried = ", ".join(f"{t['exact_match']:.0f}%" for t in cell["tried"])
        print(f"{cell_key(task, length):<28} {'passed' if cell['passed'] else 'FAILED':<7} exact match {tried}")
    if not todo:
        out = write()
    print(f"calibration: {out} ({len(writer.records())} prompts in {writer.jsonl_path})")
    return 0


# ----------------------------------------------------------------------------------------------
# power


def power_rule(records: Sequence[Mapping[str, Any]], half_width: float = POWER_HALF_WIDTH) -> dict[str, dict[str, Any]]:
    """Prompts needed for a ``+-half_width``-point 95% interval of each row's loglik_rel difference from the full cache.

    The paired statistic is the mean over tasks of the within-task mean difference; with N prompts spread
    evenly over T tasks its variance is ``mean_t(var_t) / N`` (``var_t``: the within-task variance of the
    per-prompt differences, ddof 1). So ``sd = sqrt(mean_t var_t)`` and N = ``required_units(sd, half_width)``
    (``ceil((1.96 sd / half_width)^2)``, :func:`namm_transfer.stats.required_units`).

    Returns:
        ``{row label: {"sd", "n" (pilot prompts), "required_prompts"}}`` for rows with at least two prompts in
        some task.
    """
    from namm_transfer.stats import required_units

    full = {r["sample_id"]: r.get("loglik_rel") for r in records if r.get("policy") == "full"}
    diffs: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if r.get("policy") == "full":
            continue
        a, b = _num(r.get("loglik_rel")), _num(full.get(r["sample_id"]))
        if a is None or b is None:
            continue
        diffs.setdefault(_label(r.get("protocol"), r["policy"]), {}).setdefault(str(r["task"]), []).append(a - b)
    out: dict[str, dict[str, Any]] = {}
    for label, by_task in diffs.items():
        variances = []
        for values in by_task.values():
            if len(values) >= 2:
                m = math.fsum(values) / len(values)
                variances.append(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))
        if not variances:
            continue
        sd = math.sqrt(math.fsum(variances) / len(variances))
        n = sum(len(v) for v in by_task.values())
        out[label] = {"sd": sd, "n": n, "half_width": half_width, "required_prompts": required_units(sd, half_width)}
    return out


def power_main(path: str) -> int:
    """``--power RUN.jsonl``: print :func:`power_rule` of a finished run (older runs: loglik_rel from loglik)."""
    from namm_transfer.results import read_results

    try:
        _, records, _ = read_results(path)
    except (OSError, ValueError) as err:
        print(f"error: cannot read {path}: {err}", file=sys.stderr)
        return 2
    table = power_rule(with_loglik_rel(records))
    if not table:
        print(f"error: {path} has no row with two prompts of one task beside the full cache", file=sys.stderr)
        return 2
    print(f"prompts for a +-{POWER_HALF_WIDTH:g} point 95% interval of loglik_rel - full ({path})")
    print(f"{'row':<24}{'sd':>8}{'pilot n':>9}{'needed':>8}")
    for label, v in table.items():
        print(f"{label:<24}{v['sd']:8.2f}{v['n']:9d}{v['required_prompts']:8d}")
    return 0
