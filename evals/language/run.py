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
3. ``score``: the generation of sequence 0 is scored by the sample's metric (``contains`` /
   ``contains_all``, :func:`.scoring.score_sample`), in percent. ``loglik`` is the mean log
   probability of the answer tokens (nats per token) on sequence 1 and ``loglik_score`` is
   ``100 * exp(loglik)``, the geometric-mean answer-token probability in percent. Sequence 1 is
   exactly a prefill of ``prompt + answer`` (the engine's decisions do not depend on how the tokens
   are chunked between update steps), at the cost of a second decoding row instead of a second
   prefill.

Matched budgets (``--budget-mode replay``, the default): NAMM runs first and its per-layer,
per-update, per-(sequence, KV head) kept counts (``stats.kept_counts``) are replayed by every
budgeted baseline (:class:`~namm_transfer.policies.base.ReplayBudget`), so a baseline holds exactly
NAMM's cache length at every update of the prompt *and* of the decoding phase. For that the
baselines must feed as many tokens as NAMM did, whatever they generate: every policy therefore
decodes exactly ``max(--max-new-tokens, answer tokens)`` steps with no early stop, and the
generation is cut at the first EOS token only for scoring. ``--max-new-tokens`` defaults to each
task's own budget (``task``: passkey 16, multikey_needle and prose_fact 24, variable_tracking 48,
kv_retrieval 64, whose uuid answers alone take 33-37 SmolLM2 tokens). The NAMM record stores its kept counts,
so an interrupted run resumes the baselines of a sample without rerunning NAMM; every record holds
``kept_counts_hash`` (sha256 of its kept counts), equal for NAMM and every replaying baseline.
``--budget-mode ratio:0.5`` / ``tokens:512`` give baselines a fixed budget instead (NAMM is never
budgeted: it keeps what it scores at or above its threshold).

Per record (``key = f"{policy}/{sample_id}"``): policy, task, sample_id, length (the target
length), prompt_tokens, score, loglik, loglik_score, retained_cache (mean over managed layers and
forward calls of kept / seen tokens for the generated sequence; the statistic of
:class:`~namm_transfer.engine.EvictionStats`, prefill and decoding calls alike), retained_prefill
(prefill calls only), peak_cache_mb, peak_memory_mb, throughput, the generation, the managed layers
and timings.

``peak_cache_mb`` is the largest KV-cache footprint of the generated sequence over the session:
keys and values of every layer (managed layers: the live tokens of each KV head; unmanaged
sliding-window layers: their whole window cache), measured after every forward call and just
before every eviction, when the cache is largest. It is measured the same way on every device and
does not depend on what else runs in the process. ``peak_memory_mb`` is
``torch.cuda.max_memory_allocated`` on a GPU; on the CPU, where the process's resident-set
high-water mark cannot be attributed to one policy (it never goes down, and other sessions ran in
the same process before), it equals ``peak_cache_mb``; ``peak_memory_source`` says which.
``throughput`` is (prompt tokens + max_new_tokens) / wall-clock seconds of the whole session
(prefill, fork and both decoding rows).

Managed layers: the host's full-attention layers (every layer of SmolLM2; the global layers of
Gemma 3, whose sliding-window layers keep their own window cache). ``retained_cache`` is over
managed layers only; the summary names them.

Outputs (``--output results/NAME.json``): ``NAME.jsonl`` (one record per policy and sample,
appended as each finishes; rerun the same command to resume), ``NAME.json`` (summary: ``rows`` one
per policy with ``score`` = mean over tasks of the task score, ``breakdown`` per task,
``by_length``) and ``NAME.png`` (score against retained cache; needs matplotlib). Sharded runs
(``RANK`` / ``WORLD_SIZE``) evaluate ``select_shard(samples, rank, world)``; merge them with
``namm-transfer report --merge``.

Default size and cost: 5 tasks x 4 samples (two at 2048 and two at 4096 tokens) x 6 policies = 120
sessions. Measured for SmolLM2-135M in float32 on this project's CPU machine (CPU seconds on one
thread, update interval and chunk 256): a 2048-token prefill (2070 tokens with the chat template)
takes 18.6 s with the full cache, 18.7 s with H2O at half the cache, 16.4 s with a NAMM; a
4096-token prefill (4118) 45.3 s full, 38.5 s H2O; a decoding step 0.17-0.25 s. With the per-task
decoding budgets (16-64 tokens) that was estimated at about 70 CPU-minutes; the committed default run
(results/language.json, session 7) took 98 minutes of session wall time summed over its 120 sessions, as
two one-thread shards side by side (``RANK=0/1 WORLD_SIZE=2``, 46 and 52 minutes), so about 50 minutes
on two cores; Gemma 3 270M's (results/language-gemma3.json) took 33 and 35 minutes. ``--limit`` runs a
smoke test.

Imports nothing heavy at import time (``--help`` stays torch-free).
"""

from __future__ import annotations

import argparse
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

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TASKS",
    "DEFAULT_LENGTHS",
    "DEFAULT_N",
    "add_arguments",
    "main",
    "parse_budget_mode",
    "run_session",
    "SessionResult",
]

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TASKS = ("passkey", "kv_retrieval", "multikey_needle", "variable_tracking", "prose_fact")
DEFAULT_LENGTHS = (2048, 4096)
DEFAULT_N = 4
DEFAULT_UPDATE_INTERVAL = 256
DEFAULT_CHUNK_SIZE = 256
DEFAULT_MAX_NEW_TOKENS = "task"
SPLIT = "heldout"
DATA_SEED_BASE = 0
STREAMING_SINKS = 4
H2O_RECENT_FRACTION = 0.5
_SUMMARY_FIELDS = (
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


def parse_budget_mode(text: str) -> tuple[str, float | int | None]:
    """Read ``--budget-mode``: ``"replay"`` -> ``("replay", None)``, ``"ratio:0.5"`` -> ``("ratio", 0.5)``,
    ``"tokens:512"`` -> ``("tokens", 512)``."""
    text = text.strip()
    if text == "replay":
        return "replay", None
    kind, _, value = text.partition(":")
    try:
        if kind == "ratio":
            ratio = float(value)
            if not 0.0 < ratio <= 1.0:
                raise ValueError
            return "ratio", ratio
        if kind == "tokens":
            tokens = int(value)
            if tokens < 1:
                raise ValueError
            return "tokens", tokens
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"budget mode {text!r}: use replay (NAMM's cache lengths), ratio:R with 0 < R <= 1, or tokens:N"
    )


def _budget_mode(text: str) -> str:
    kind, value = parse_budget_mode(text)
    return kind if value is None else f"{kind}:{value:g}"


def _namm_selection(text: str) -> str:
    """``threshold`` (the spec's rule) or ``ratio:R`` (NAMM keeps its R highest-scoring tokens of those seen)."""
    if text.strip() == "threshold":
        return "threshold"
    message = f"NAMM selection {text!r}: use threshold or ratio:R with 0 < R <= 1"
    try:
        kind, value = parse_budget_mode(text)
    except argparse.ArgumentTypeError:  # its message lists the budget modes, not the selections
        raise argparse.ArgumentTypeError(message) from None
    if kind != "ratio":
        raise argparse.ArgumentTypeError(message)
    return f"ratio:{value:g}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(model=DEFAULT_MODEL, namm="default", dtype="float32")
    parser.description = (
        "Zero-shot evaluation of a frozen NAMM on held-out generated long-context tasks against the full "
        "cache and eviction baselines (StreamingLLM, H2O, L2, random) at NAMM's own cache lengths. "
        f"Defaults: model {DEFAULT_MODEL}, the shipped default NAMM, float32."
    )
    parser.epilog = (
        "The default size (5 tasks x 4 samples at 2048 and 4096 tokens, all six policies: about 100 minutes on "
        "one thread, measured) takes about 50 minutes on 2 CPU cores as two shards (RANK=0 and RANK=1 with "
        "WORLD_SIZE=2, then `namm-transfer report --merge`); --limit N gives a smoke "
        "test; on a GPU raise --n and --lengths (held-out lengths go up to 8192). For Gemma 3 "
        "(--model gemma3-270m, the base model: raw prompts) the managed layers are its "
        "global-attention layers; write it to another file, e.g. --output results/language-gemma3.json."
    )
    g = parser.add_argument_group("language target")
    g.add_argument(
        "--tasks",
        type=_tasks,
        default=list(DEFAULT_TASKS),
        help=f"comma-separated held-out tasks (default: {','.join(DEFAULT_TASKS)})",
    )
    g.add_argument("--n", type=positive_int, default=DEFAULT_N, help=f"samples per task (default: {DEFAULT_N})")
    g.add_argument(
        "--lengths",
        type=_lengths,
        default=list(DEFAULT_LENGTHS),
        help="comma-separated held-out prompt lengths in tokens; samples cycle through them "
        f"(default: {','.join(map(str, DEFAULT_LENGTHS))})",
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
        "--budget-mode",
        type=_budget_mode,
        default="replay",
        help="baselines' cache budget: replay (NAMM's per-layer, per-update cache lengths for the same "
        "sample; default), ratio:R (keep R of the tokens seen) or tokens:N",
    )
    g.add_argument(
        "--namm-selection",
        type=_namm_selection,
        default="threshold",
        help="how NAMM turns scores into evictions: threshold (namm-spec.md: keep scores >= 0; default) or "
        "ratio:R (keep the R highest-scoring tokens of those seen, per layer and head: the same network at a "
        "budget the user fixes; the baselines then replay that budget)",
    )
    g.add_argument(
        "--namm-sinks",
        type=int,
        default=None,
        metavar="N",
        help="always keep the first N positions under NAMM (NAMMConfig.sink_tokens; default: the checkpoint's, "
        "0 for the paper's rule)",
    )
    g.add_argument("--no-plot", action="store_true", help="do not write the score vs retained-cache PNG")


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
) -> SessionResult:
    """Prefill ``prompt_ids``, fork, decode greedily on row 0 and teacher-force ``answer_ids`` on row 1.

    Both rows run ``max(max_new_tokens, len(answer_ids)) - 1`` steps, whatever is generated, so two
    policies given the same sample make the same update steps (what a replayed budget needs).
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
        attach(model, policy, update_interval=update_interval, chunk_size=chunk_size) as mem,
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


def _group_row(policy: str, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    scores = [s for s in (_num(r.get("score")) for r in records) if s is not None]
    mean = _mean(scores)
    row: dict[str, Any] = {"policy": policy, "score": mean}
    row["score_std"] = (
        math.sqrt(math.fsum((s - mean) ** 2 for s in scores) / len(scores)) if scores and mean is not None else None
    )
    row["n"] = len(scores)
    for field in _SUMMARY_FIELDS:
        row[field] = _mean([v for v in (_num(r.get(field)) for r in records) if v is not None])
    return row


def _policy_order(records: Sequence[Mapping[str, Any]], preferred: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(r["policy"] for r in records))
    return [p for p in preferred if p in seen] + [p for p in seen if p not in preferred]


def breakdown(
    records: Sequence[Mapping[str, Any]], field: str, preferred: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    """``{value of field: [one row per policy]}`` with score, score_std, n and the means of the other fields."""
    parts: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        if r.get(field) is not None:
            parts.setdefault(str(r[field]), []).append(r)

    def order(k: str) -> tuple[int, Any]:
        return (0, int(k)) if k.isdigit() else (1, k)

    out = {}
    for value in sorted(parts, key=order):
        recs = parts[value]
        out[value] = [_group_row(p, [r for r in recs if r["policy"] == p]) for p in _policy_order(recs, preferred)]
    return out


def summary_rows(records: Sequence[Mapping[str, Any]], preferred: Sequence[str]) -> list[dict[str, Any]]:
    """One row per policy. ``score`` and ``loglik_score`` are means over tasks of the task means;
    ``score_std`` is over samples; the other fields are means over samples."""
    by_task = breakdown(records, "task", preferred)
    rows = []
    for policy in _policy_order(records, preferred):
        row = _group_row(policy, [r for r in records if r["policy"] == policy])
        task_rows = [tr for rows_ in by_task.values() for tr in rows_ if tr["policy"] == policy]
        for field in ("score", "loglik_score", "loglik"):
            row[field] = _mean([tr[field] for tr in task_rows if tr.get(field) is not None])
        row["tasks"] = len(task_rows)
        rows.append(row)
    return rows


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[Mapping[str, Any]], by_task: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    tasks = list(by_task)
    head = f"{'policy':<12}{'score':>8}{'loglik%':>9}{'retained':>10}{'KV MB':>9}{'tok/s':>8}{'n':>5}"
    head += "".join(f"{t[:14]:>16}" for t in tasks)
    lines = [head, "-" * len(head)]
    for row in rows:
        line = (
            f"{row['policy']:<12}{_fmt(row['score'], '8.1f')}{_fmt(row.get('loglik_score'), '9.1f')}"
            f"{_fmt(row.get('retained_cache'), '10.3f')}{_fmt(row.get('peak_cache_mb'), '9.2f')}"
            f"{_fmt(row.get('throughput'), '8.1f')}{row['n']:>5}"
        )
        for t in tasks:
            tr = next((x for x in by_task[t] if x["policy"] == row["policy"]), None)
            line += f"{_fmt(tr and tr['score'], '16.1f')}"
        lines.append(line)
    return "\n".join(lines)


def write_plot(
    path: Path, rows: Sequence[Mapping[str, Any]], by_task: Mapping[str, Sequence[Mapping[str, Any]]], title: str
) -> Path | None:
    """Score (%) against retained cache, one marker per policy (large: over tasks; small: per task)."""
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
            if tr["policy"] == row["policy"] and tr.get("retained_cache") is not None and tr.get("score") is not None
        ]
        if pts:
            ax.scatter([x for x, _ in pts], [y for _, y in pts], s=14, alpha=0.35, color=color)
        ax.scatter([row["retained_cache"]], [row["score"]], s=70, color=color, label=row["policy"], edgecolor="black")
    ax.set_xlabel("retained cache (fraction of a full cache, managed layers)")
    ax.set_ylabel("score (%)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0.0, 1.05)
    ax.grid(alpha=0.3)
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


def main(args: argparse.Namespace) -> int:
    import torch

    from namm_transfer.checkpoint import load_namm, namm_record
    from namm_transfer.evolution.cli import encode_sample
    from namm_transfer.models import load_model
    from namm_transfer.policies.base import ReplayBudget
    from namm_transfer.policies.namm_policy import NAMMPolicy
    from namm_transfer.registry import create_policy, find_adapter, list_policies
    from namm_transfer.results import ResultsWriter, select_shard

    from .scoring import score_sample
    from .tasks import make_split

    policies: list[str] = list(args.policies)
    known = list_policies()
    unknown = [p for p in policies if p not in known]
    if unknown:
        print(f"error: unknown policy {', '.join(unknown)}; registered: {', '.join(known)}", file=sys.stderr)
        return 2
    mode, budget_value = parse_budget_mode(args.budget_mode)
    budgeted = [p for p in policies if p not in ("namm", "full")]
    need_namm = "namm" in policies or (mode == "replay" and bool(budgeted))

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or "float32"
    torch.manual_seed(args.seed)
    model_name = args.model or DEFAULT_MODEL
    try:
        namm_net = load_namm(args.namm or "default", device=device) if need_namm else None
    except FileNotFoundError as err:  # no default NAMM shipped yet, or a wrong path
        print(f"error: {err}", file=sys.stderr)
        return 2
    if namm_net is not None and args.namm_sinks is not None:
        if args.namm_sinks < 0:
            print(f"error: --namm-sinks must be >= 0, got {args.namm_sinks}", file=sys.stderr)
            return 2
        from dataclasses import replace

        namm_net.config = replace(namm_net.config, sink_tokens=args.namm_sinks)
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    find_adapter(model)  # an unsupported model is refused before anything is written
    chat = bool(getattr(tokenizer, "chat_template", None))

    per_task = [
        make_split(task, SPLIT, n=args.n, lengths=args.lengths, tokenizer=tokenizer, seed_base=DATA_SEED_BASE)
        for task in args.tasks
    ]
    samples = _interleave(per_task)
    if args.limit is not None:
        samples = samples[: args.limit]

    settings = {
        "split": SPLIT,
        "tasks": list(args.tasks),
        "n": args.n,
        "lengths": list(args.lengths),
        "data_seed_base": DATA_SEED_BASE,
        "seed": args.seed,
        "update_interval": args.update_interval,
        "chunk_size": args.chunk_size,
        "budget_mode": args.budget_mode,
        "namm_selection": args.namm_selection,
        "namm_sink_tokens": namm_net.config.sink_tokens if namm_net is not None else None,
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
    )
    writer.refuse_samples_outside(s.id for s in samples)
    mine = select_shard(samples, writer.rank, writer.world_size)
    done = writer.done_keys()
    order = (["namm"] if "namm" in policies else []) + [p for p in policies if p != "namm"]
    eos = _eos_ids(tokenizer, model)
    logger.info(
        "language eval: %d samples (%d in this shard), policies %s, budget %s, %s on %s",
        len(samples),
        len(mine),
        ",".join(order),
        args.budget_mode,
        model_name,
        device,
    )
    records_by_key = {r["key"]: r for r in writer.records()}

    def make_policy(name: str, replay: dict[int, dict[int, Any]] | None, sample_id: str) -> Any:
        if name == "namm":
            if namm_net is None:  # cannot happen: need_namm is true whenever namm is a policy
                raise RuntimeError("policy namm requested but no NAMM was loaded")
            if args.namm_selection == "threshold":
                return NAMMPolicy(namm_net)
            return NAMMPolicy(namm_net, budget=parse_budget_mode(args.namm_selection)[1])
        if name == "full":
            return create_policy("full")
        if mode == "replay":
            assert replay is not None
            # a NAMM holding a ratio also updated at the end of the prompt (attach's default): so does its replay
            budget: Any = ReplayBudget(
                replay, source=f"namm/{sample_id}", holds_at_prompt_end=args.namm_selection != "threshold"
            )
        else:  # a token count is written with its unit (a bare integer is refused as a budget)
            budget = f"{budget_value}t" if mode == "tokens" else budget_value
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
        todo = [p for p in order if f"{p}/{sample.id}" not in done]
        if not todo:
            continue
        ids, (a0, a1) = encode_sample(tokenizer, sample)
        max_new = sample.max_new_tokens if args.max_new_tokens == "task" else int(args.max_new_tokens)
        prompt_ids, answer_ids = ids[:a0], ids[a0:a1]
        replay: dict[int, dict[int, Any]] | None = None
        replay_needed = mode == "replay" and any(p not in ("namm", "full") for p in todo)
        namm_rec = records_by_key.get(f"namm/{sample.id}")
        if replay_needed and namm_rec is not None and "kept_counts" in namm_rec:
            replay = replay_record(namm_rec["kept_counts"], namm_rec["fork_update"])
        run_list = list(todo)
        if replay_needed and replay is None and "namm" not in run_list:
            run_list.insert(0, "namm")  # needed for its cache lengths only (not a requested policy)
        for policy_name in run_list:
            key = f"{policy_name}/{sample.id}"
            res = run_session(
                model,
                make_policy(policy_name, replay, sample.id),
                prompt_ids,
                answer_ids,
                max_new,
                update_interval=args.update_interval,
                chunk_size=args.chunk_size,
                device=device,
            )
            if policy_name == "namm":
                replay = replay_record(res.kept_counts, res.fork_update)
                if policy_name not in todo:
                    continue
            record = _record(
                key,
                policy_name,
                sample,
                res,
                tokenizer,
                eos,
                score_sample,
                prompt_ids,
                answer_ids,
                max_new,
                device,
                make_budget_label(policy_name, mode, budget_value),
            )
            writer.add(record)
            records_by_key[key] = record
            n_done += 1
            logger.info(
                "[%d/%d] %-10s %-34s score %5.1f loglik%% %5.1f retained %.3f (%.1fs)",
                si + 1,
                len(mine),
                policy_name,
                sample.id,
                record["score"],
                record["loglik_score"],
                record["retained_cache"],
                record["wall_s"],
            )
    if writer.resumed and not n_done:
        logger.info("every unit was already in %s", writer.jsonl_path)

    records = writer.records()
    by_task = breakdown(records, "task", order)
    rows = summary_rows(records, order)
    managed = next((r.get("managed_layers") for r in records if r.get("managed_layers") is not None), None)
    n_layers = next((r.get("n_layers") for r in records if r.get("n_layers") is not None), None)
    extra: dict[str, Any] = {
        "breakdown_by": "task",
        "by_length": breakdown(records, "length", order),
        "managed_layers": managed,
        "n_layers": n_layers,
        "retained_cache_over": "managed (full-attention) layers only; forward calls of prefill and decoding",
        "score": "mean over tasks of the task score (% of samples answered, contains / contains_all)",
        "peak_memory_mb": "torch.cuda.max_memory_allocated on GPU; the KV-cache peak (peak_cache_mb) on CPU",
        "samples": len(samples),
        "limit": args.limit,
    }
    png = writer.summary_path.with_suffix(".png")
    if not args.no_plot and records:
        ckpt = writer.namm_checkpoint or {}
        title = f"{model_name}, NAMM {ckpt.get('name') or '-'}, budget {args.budget_mode}"
        if args.namm_selection != "threshold":
            title += f", NAMM top {args.namm_selection.split(':')[1]}"
        if namm_net is not None and namm_net.config.sink_tokens:
            title += f", {namm_net.config.sink_tokens} sinks kept"
        if write_plot(png, rows, by_task, title) is not None:
            extra["plot"] = png.name
    path = writer.finalize(rows, by_task, extra=extra)
    print(format_table(rows, by_task))
    print(f"managed layers: {managed} of {n_layers}; budget: {args.budget_mode}")
    print(f"results: {path} ({len(records)} records in {writer.jsonl_path})")
    return 0


def make_budget_label(policy: str, mode: str, value: Any) -> str | None:
    if policy == "full":
        return None
    if policy == "namm":
        return "threshold"
    return "replay:namm" if mode == "replay" else f"{mode}:{value:g}"


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
) -> dict[str, Any]:
    gen = list(res.generated)
    cut = next((i for i, t in enumerate(gen) if t in eos), None)
    kept = gen if cut is None else gen[:cut]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    score = 100.0 * float(score_sample(sample, text))
    loglik = _mean(res.answer_logprobs)
    wall = res.prefill_s + res.decode_s
    cache_mb = res.peak_cache_bytes / 2**20
    record: dict[str, Any] = {
        "key": key,
        "policy": policy,
        "task": sample.task,
        "sample_id": sample.id,
        "length": sample.target_length,
        "sample_seed": sample.seed,
        "prompt_tokens": len(prompt_ids),
        "answer_tokens": len(answer_ids),
        "answer": sample.answer,
        "score": score,
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
    }
    if policy == "namm":
        record["kept_counts"] = {str(s): {str(layer): c for layer, c in d.items()} for s, d in res.kept_counts.items()}
        record["fork_update"] = res.fork_update
    return record
