"""Speed and memory of the eviction engine on the SmolLM2-135M shape (random weights, no download).

    python benchmarks/engine_speed.py --threads 2 --repeats 2 --out BENCHMARKS.md  # the CPU grid (2k/4k/8k, 64 tokens)
    python benchmarks/engine_speed.py --quick                      # a minute: short prompts, 4 layers
    python benchmarks/engine_speed.py --device cuda --dtype bfloat16 --lengths 2048,8192,32768

For every prompt length it times a prefill followed by ``--new-tokens`` greedy tokens for

* ``unmodified``          the plain model (SDPA, DynamicCache), the prompt in one forward call;
* ``unmodified-chunked``  the same, the prompt in ``--chunk-size`` chunks (what ``generate(...,
                          prefill_chunk_size=N)`` does): the fair reference for the engine, which
                          always feeds prompts in chunks;
* ``engine-full``         the engine attached with the full-cache policy (nothing evicted);
* ``namm-50``             a NAMM with random weights (normalization set to mean 0 / std 1) and
                          ``budget=0.5``: keeps exactly half of the tokens seen at every update;
* ``h2o-50``              H2O at the same 50% budget.

Memory. ``peak`` is the highest memory above what the process held after the model was built
(weights excluded; KV cache, activations, engine bookkeeping and policy state included).

* CPU: the kernel's resident-set high-water mark. Before each measurement the script returns freed
  heap to the OS (``malloc_trim``), resets the mark (writing ``5`` to ``/proc/self/clear_refs``) and
  reads ``VmRSS``; afterwards it reads ``VmHWM``. The timed runs keep glibc's allocator as it comes
  (what a user's process does: large tensors are served by fresh mmaps that fault their pages in, smaller
  ones are recycled from the heap), so their peak is what the process really held. Only the feature
  table, which measures memory and nothing else, first fixes glibc's mmap threshold at 128 KiB so that
  every freed tensor leaves the resident set at once (that setting slows the allocation-heavy runs: at
  8k tokens the unmodified model decoded 1.5x slower with it, which is why the timed runs do without).
  Where ``clear_refs`` cannot be written, a thread samples the RSS with psutil every millisecond
  instead (the report says which).
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the run.

Feature memory (what NAMM adds on top of the cache) is measured two ways on a few-layer copy of
the same shape, prefill only, at a fixed chunk size over growing prompt lengths:

* measured: peak of a NAMM that keeps every token (``collect_statistics=True``: same cache as the
  full policy) minus the peak of ``engine-full``;
* accounted: the largest sum, over the run, of the bytes of every policy per-token tensor
  (``engine.states[layer].tokens``, all layers) plus the attention-row tensors of one call of the
  policy's ``observe`` for one layer: the float32 scores of one query tile (on CPU the engine's scratch
  buffer, which also holds the tile's output, probabilities in place; elsewhere B x query heads x tile x
  cache x 4 bytes, twice) and the head-averaged rows handed to the policy (B x KV heads x queries x cache x 4
  bytes). The engine sizes its tiles to about ``EvictionEngine.tile_bytes`` (8 MiB on CPU) of scores, so at
  long contexts a tile is smaller than the chunk, and gathers the rows of consecutive tiles into one call up to
  ``EvictionEngine.rows_bytes`` (16 MiB on CPU).

Timing noise: configurations run interleaved at each length (order reversed on every other round)
and the fastest of ``--repeats`` rounds is kept; the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import gc
import inspect
import json
import os
import platform
import re
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from namm_transfer.evals.args import StrictParser

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024.0**2

CONFIGS = ("unmodified", "unmodified-chunked", "engine-full", "namm-50", "h2o-50")
KEY_CONFIGS = ("unmodified", "unmodified-chunked", "namm-50")

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct) as transformers builds it from its GGUF.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


# ----------------------------------------------------------------------------------------------- memory
_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def fix_malloc() -> bool:
    """Serve allocations >= 128 KiB with mmap so that freed tensors leave the RSS at once (glibc only)."""
    libc = _libc()
    if not libc:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 128 * 1024) == 1
    libc.mallopt(m_trim_threshold, 128 * 1024)
    return ok


def _status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _can_reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class PeakMeter:
    """Peak memory above the starting point of a ``with meter.measure():`` block (bytes in ``.peak``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before the run"
        elif _can_reset_hwm():
            self.method = "VmHWM - VmRSS (high-water mark reset through /proc/self/clear_refs), after malloc_trim"
        else:
            self.method = "psutil RSS sampled every 1 ms in a thread, minus the RSS before the run"
        self.peak = 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[PeakMeter]:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - start
            return
        libc = _libc()
        if libc:
            libc.malloc_trim(0)
        if self.method.startswith("VmHWM"):
            Path("/proc/self/clear_refs").write_text("5")
            start = (_status_kib("VmRSS") or 0) * 1024
            yield self
            self.peak = max(0, (_status_kib("VmHWM") or 0) * 1024 - start)
            return
        import psutil

        proc = psutil.Process()
        start = proc.memory_info().rss
        top = [start]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                top[0] = max(top[0], proc.memory_info().rss)
                time.sleep(0.001)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            yield self
        finally:
            stop.set()
            th.join()
        self.peak = max(0, top[0] - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- models
def build_model(layers: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """A LlamaForCausalLM with SmolLM2-135M's shape (``layers`` of its 30 layers) and random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers}, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    return model.eval()


def random_namm(seed: int = 0) -> Any:
    """A NAMM with random weights (CMA-ES's initial spread, sigma 0.065) and normalization mean 0, std 1."""
    from namm_transfer.namm import NAMM

    g = torch.Generator().manual_seed(seed)
    namm = NAMM()
    namm.set_flat(torch.randn(namm.n_params, generator=g) * 0.065)
    namm.set_normalization(torch.zeros(namm.config.n_bins), torch.ones(namm.config.n_bins))
    return namm


def make_policy(name: str, namm: Any) -> Any:
    from namm_transfer import create_policy
    from namm_transfer.policies.namm_policy import NAMMPolicy

    if name == "engine-full":
        return create_policy("full")
    if name == "namm-50":
        return NAMMPolicy(namm, budget=0.5)
    if name == "namm-keep-all":
        return NAMMPolicy(namm, collect_statistics=True)
    if name == "h2o-50":
        return create_policy("h2o", budget=0.5)
    raise ValueError(f"not an engine configuration: {name}")


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    config: str
    length: int
    new_tokens: int
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_bytes: int = 0
    retained_cache: float = 1.0
    final_cache_tokens: float = 0.0
    state_peak_bytes: int = 0
    rows_peak_bytes: int = 0
    rows_tile: int = 0
    policy_observe_s: float = 0.0
    policy_select_s: float = 0.0
    tokens: list[int] = field(default_factory=list, repr=False)
    same_tokens_as_unmodified: bool | None = None
    load_1min: float = 0.0

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB


class FeatureProbe:
    """Tracks the policy's per-token tensors and the attention-row tensors (accounting, no allocation)."""

    def __init__(self, engine: Any, n_q_heads: int) -> None:
        self.engine = engine
        self.n_q_heads = n_q_heads
        self.state_peak = 0
        self.rows_peak = 0
        self.tile = 0  # the most queries in one query tile of the explicit attention
        policy = engine.policy
        inner = policy.observe

        def observe(state: Any, rows: torch.Tensor) -> None:
            # the engine hands rows over for several query tiles at once (EvictionEngine.rows_bytes); one tile's
            # float32 scores exist at a time: in the engine's scratch buffer on CPU (softmax in place), as scores
            # and probabilities elsewhere
            b, _, q, s = rows.shape
            tile = engine.query_tile(b, self.n_q_heads, q, s, rows.device)
            self.tile = max(self.tile, tile)
            if rows.device.type == "cpu":
                scratch = engine.scratch.buffer
                scores = 0 if scratch is None else scratch.numel() * scratch.element_size()
            else:
                scores = 2 * b * self.n_q_heads * tile * s * 4
            self.rows_peak = max(self.rows_peak, scores + rows.numel() * rows.element_size())
            inner(state, rows)
            self._state()

        policy.observe = observe
        if getattr(policy, "observes_sums", False):
            # column sums instead of rows (H2O): the tile's scores live in the engine's scratch buffer (CPU; on a
            # GPU in tensors of their own, not counted here)
            inner_sums = policy.observe_sums

            def observe_sums(state: Any, sums: torch.Tensor) -> None:
                scratch = engine.scratch.buffer
                held = 0 if scratch is None else scratch.numel() * scratch.element_size()
                self.rows_peak = max(self.rows_peak, held + sums.numel() * sums.element_size())
                inner_sums(state, sums)
                self._state()

            policy.observe_sums = observe_sums

    def _state(self) -> None:
        total = sum(t.numel() * t.element_size() for st in self.engine.states.values() for t in st.tokens.values())
        self.state_peak = max(self.state_peak, total)

    def detach(self) -> None:
        self.engine.policy.__dict__.pop("observe", None)
        self.engine.policy.__dict__.pop("observe_sums", None)


class PolicyTimer:
    """Wall time spent inside the policy's ``observe`` or ``observe_sums`` (folding attention rows or their column
    sums) and ``select_layers`` (choosing what to keep for every layer, at update steps), the policy's own share
    of a run; on CUDA each call is synchronized before and after."""

    def __init__(self, policy: Any, device: torch.device) -> None:
        self.seconds = {"observe": 0.0, "select": 0.0}
        # the engine asks for every layer of an update in one select_layers call (which may batch the layers)
        for name, method in (("observe", "observe"), ("observe", "observe_sums"), ("select", "select_layers")):
            inner = getattr(policy, method, None)
            if inner is None:  # observe_sums: engines before session 10 have none
                continue

            def timed(*a: Any, _inner: Any = inner, _name: str = name) -> Any:
                _sync(device)
                t = time.perf_counter()
                out = _inner(*a)
                _sync(device)
                self.seconds[_name] += time.perf_counter() - t
                return out

            setattr(policy, method, timed)


def run_unmodified(model: Any, ids: torch.Tensor, new_tokens: int, chunk: int | None, device: torch.device) -> Run:
    """Greedy decoding with the model as it is: SDPA and a DynamicCache, positions from the cache length."""
    from transformers import DynamicCache

    run = Run("unmodified" if chunk is None else "unmodified-chunked", ids.shape[1], new_tokens)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config)
        pieces = [ids] if chunk is None else list(ids.split(chunk, dim=1))
        for piece in pieces:
            logits = model(input_ids=piece, **{cache_kw: cache}, use_cache=True, logits_to_keep=1).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        out = [nxt]
        for _ in range(new_tokens - 1):
            logits = model(input_ids=nxt, **{cache_kw: cache}, use_cache=True, logits_to_keep=1).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
        _sync(device)
        t2 = time.perf_counter()
    run.prefill_s, run.decode_s = t1 - t0, t2 - t1
    run.tokens = torch.cat(out, dim=1)[0].tolist()
    run.final_cache_tokens = float(cache.get_seq_length())
    return run


def run_engine(
    model: Any,
    ids: torch.Tensor,
    new_tokens: int,
    config: str,
    namm: Any,
    update_interval: int,
    chunk: int,
    device: torch.device,
) -> Run:
    """Prefill and greedy decoding through ``attach(model, policy)`` (the session's prefill / step)."""
    from namm_transfer import attach

    run = Run(config, ids.shape[1], new_tokens)
    policy = make_policy(config, namm)
    with attach(model, policy, update_interval=update_interval, chunk_size=chunk) as mem:
        timer = PolicyTimer(policy, device)
        probe = FeatureProbe(mem.engine, model.config.num_attention_heads) if policy.needs_attention else None
        _sync(device)
        t0 = time.perf_counter()
        logits = mem.prefill(ids)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        out = [nxt]
        for _ in range(new_tokens - 1):
            nxt = mem.step(nxt)[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
        _sync(device)
        t2 = time.perf_counter()
        stats = mem.stats
        if probe is not None:
            run.state_peak_bytes, run.rows_peak_bytes = probe.state_peak, probe.rows_peak
            run.rows_tile = probe.tile
            probe.detach()
    run.prefill_s, run.decode_s = t1 - t0, t2 - t1
    run.policy_observe_s, run.policy_select_s = timer.seconds["observe"], timer.seconds["select"]
    run.tokens = torch.cat(out, dim=1)[0].tolist()
    run.retained_cache = stats.retained_cache()
    run.final_cache_tokens = float(stats.cache_tokens[-1].mean()) if stats.cache_tokens else 0.0
    return run


def run_config(config: str, model: Any, ids: torch.Tensor, new_tokens: int, namm: Any, args: argparse.Namespace) -> Run:
    if config == "unmodified":
        return run_unmodified(model, ids, new_tokens, None, args.torch_device)
    if config == "unmodified-chunked":
        return run_unmodified(model, ids, new_tokens, args.chunk_size, args.torch_device)
    return run_engine(model, ids, new_tokens, config, namm, args.update_interval, args.chunk_size, args.torch_device)


def measure(
    configs: list[str], model: Any, length: int, new_tokens: int, namm: Any, meter: PeakMeter, args: argparse.Namespace
) -> dict[str, Run]:
    """Run ``configs`` interleaved for ``args.repeats`` rounds; keep each one's fastest round."""
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(3, model.config.vocab_size, (1, length), generator=g).to(args.torch_device)
    best: dict[str, Run] = {}
    for r in range(args.repeats):
        order = configs if r % 2 == 0 else configs[::-1]
        for config in order:
            with meter.measure():
                run = run_config(config, model, ids, new_tokens, namm, args)
            run.peak_bytes = meter.peak
            run.load_1min = round(os.getloadavg()[0], 1)
            log(
                f"  {config:<19} T={length:<6} prefill {run.prefill_s:7.2f}s  decode {run.decode_s:6.2f}s  "
                f"peak {run.peak_mib:8.1f} MiB  retained {run.retained_cache:.3f}"
            )
            prev = best.get(config)
            if prev is not None:  # memory is deterministic up to noise: keep the smaller peak
                run.peak_bytes = min(run.peak_bytes, prev.peak_bytes)
            if prev is None or run.total_s < prev.total_s:
                best[config] = run
            else:
                prev.peak_bytes = run.peak_bytes
    ref = best.get("unmodified") or best.get("unmodified-chunked")
    if ref is not None:
        for run in best.values():
            run.same_tokens_as_unmodified = run.tokens == ref.tokens
    return best


def feature_runs(args: argparse.Namespace, meter: PeakMeter, namm: Any) -> list[dict[str, Any]]:
    """Prefill only, a few layers: NAMM keeping every token vs the full cache, fixed chunk, growing T."""
    model = build_model(args.feature_layers, args.torch_device, args.torch_dtype)
    rows = []
    warm = torch.randint(3, model.config.vocab_size, (1, 2 * args.chunk_size))
    for config in ("engine-full", "namm-keep-all"):  # warm up both paths
        run_engine(
            model, warm.to(args.torch_device), 1, config, namm, args.update_interval, args.chunk_size, args.torch_device
        )
    for length in args.feature_lengths:
        for chunk in (
            sorted({args.chunk_size, *args.feature_chunks})
            if length == max(args.feature_lengths)
            else [args.chunk_size]
        ):
            g = torch.Generator().manual_seed(length)
            ids = torch.randint(3, model.config.vocab_size, (1, length), generator=g).to(args.torch_device)
            peaks = {}
            runs = {}
            for config in ("engine-full", "namm-keep-all"):
                with meter.measure():
                    runs[config] = run_engine(
                        model, ids, 1, config, namm, args.update_interval, chunk, args.torch_device
                    )
                peaks[config] = meter.peak
            nk = runs["namm-keep-all"]
            row = {
                "length": length,
                "chunk": chunk,
                "tile": nk.rows_tile,
                "layers": args.feature_layers,
                "full_peak_mib": peaks["engine-full"] / MIB,
                "namm_peak_mib": peaks["namm-keep-all"] / MIB,
                "measured_extra_mib": (peaks["namm-keep-all"] - peaks["engine-full"]) / MIB,
                "state_mib": nk.state_peak_bytes / MIB,
                "rows_mib": nk.rows_peak_bytes / MIB,
                "accounted_mib": (nk.state_peak_bytes + nk.rows_peak_bytes) / MIB,
                "txt_per_layer_mib": model.config.num_attention_heads * length * length * 4 / MIB,
                "prefill_s_full": runs["engine-full"].prefill_s,
                "prefill_s_namm": nk.prefill_s,
            }
            log(
                f"  features T={length:<6} chunk={chunk:<4} measured +{row['measured_extra_mib']:.1f} MiB, accounted "
                f"state {row['state_mib']:.1f} + rows {row['rows_mib']:.1f} MiB"
            )
            rows.append(row)
    del model
    return rows


# ----------------------------------------------------------------------------------------------- report
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }
    with contextlib.suppress(ImportError):
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 1024**3, 1)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def render_section(result: dict[str, Any]) -> str:
    """Markdown for one device (everything in it comes from ``result``)."""
    args, info, runs, feats = result["args"], result["machine"], result["runs"], result["features"]
    by: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["length"], {})[r["config"]] = r
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"- date: {info['date']}; {info['cpu']}, {info['cpu_count']} CPUs, torch threads {info['torch_threads']}"
        + (f"; GPU {info['gpu']}" if "gpu" in info else ""),
        f"- python {info['python']}, torch {info['torch']}, transformers {info['transformers']}; {info['platform']}",
        f"- model: LlamaForCausalLM with SmolLM2-135M's shape ({args['layers']} layers, hidden 576, 9 query / 3 KV "
        f"heads, vocab 49152), random weights, {args['dtype']}, batch 1, random prompt ids",
        f"- engine: update_interval {args['update_interval']}, chunk_size {args['chunk_size']}; "
        f"{args['new_tokens']} greedy tokens after the prompt; fastest of {args['repeats']} interleaved round(s)",
        f"- memory: {result['memory_method']}",
        f"- load average (1, 5, 15 min) before: {result['load_before']}, after: {result['load_after']}; "
        f"wall time of the whole run {result['wall_s'] / 60:.1f} min",
    ]
    if result.get("note"):
        lines += [f"- note: {result['note']}"]
    lines += [
        "",
        "| T | configuration | prefill s | decode ms/token | total s | peak MiB above weights | "
        "of which policy state / attention rows MiB (accounted) | time in the policy s (observe / select) | "
        "retained cache | cache at end | same tokens as unmodified | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for length in sorted(by):
        for config in CONFIGS:
            r = by[length].get(config)
            if r is None:
                continue
            per_tok = 1000 * r["decode_s"] / max(1, r["new_tokens"] - 1)
            same = {True: "yes", False: "no", None: "-"}[r["same_tokens_as_unmodified"]]
            total = r["prefill_s"] + r["decode_s"]
            feat = (
                f"{r['state_peak_bytes'] / MIB:.1f} / {r['rows_peak_bytes'] / MIB:.1f}"
                if r["state_peak_bytes"] or r["rows_peak_bytes"]
                else "-"
            )
            in_policy = (
                f"{r['policy_observe_s']:.2f} / {r['policy_select_s']:.2f}"
                if r.get("policy_observe_s") or r.get("policy_select_s")  # absent from files of older runs
                else "-"
            )
            lines.append(
                f"| {length} | {config} | {r['prefill_s']:.2f} | {per_tok:.0f} | {total:.2f} | "
                f"{r['peak_bytes'] / MIB:.0f} | {feat} | {in_policy} | {r['retained_cache']:.3f} | "
                f"{r['final_cache_tokens']:.0f} | "
                f"{same} | {r['load_1min']:.1f} |"
            )
    lines += ["", "Ratios (same run, same machine state):", ""]

    def ratio_line(length: int, a: str, b: str, what: str, target: str, prefill_only: bool = False) -> None:
        ra, rb = by.get(length, {}).get(a), by.get(length, {}).get(b)
        if ra is None or rb is None:
            return
        if prefill_only:
            t = _fmt_ratio(ra["prefill_s"], rb["prefill_s"])
            lines.append(f"- T={length}: {a} / {b}: prefill time {t}{what} (target: {target})")
            return
        t = _fmt_ratio(ra["prefill_s"] + ra["decode_s"], rb["prefill_s"] + rb["decode_s"])
        m = _fmt_ratio(ra["peak_bytes"], rb["peak_bytes"])
        lines.append(f"- T={length}: {a} / {b}: time {t}, peak memory {m}{what} (target: {target})")

    lengths = sorted(by)
    if lengths and str(args["device"]).startswith("cuda"):
        # the GPU targets are about the prefill: the chunked prefill of Hugging Face at the same chunk size, and
        # one-shot SDPA within 2x as the aim
        for length in lengths:
            for config in ("engine-full", "h2o-50", "namm-50"):
                ratio_line(length, config, "unmodified-chunked", "", "<= 1.0x: as fast as HF's chunked prefill", True)
            for config in ("engine-full", "h2o-50", "namm-50"):
                ratio_line(length, config, "unmodified", "", "aim <= 2x of one-shot SDPA prefill", True)
        lines.append("")
        lines.append("Whole runs (prefill + decoding):")
        lines.append("")
    if lengths:
        short, long = lengths[0], lengths[-1]
        ratio_line(short, "engine-full", "unmodified", "", "time <= 1.3x")
        ratio_line(short, "engine-full", "unmodified-chunked", "", "time <= 1.3x")
        for length in lengths[1:]:
            if length != long:
                ratio_line(length, "engine-full", "unmodified-chunked", "", "time <= 1.3x")
        ratio_line(long, "namm-50", "unmodified", "", "time < 1.0x: faster than the unmodified model")
        ratio_line(long, "h2o-50", "unmodified", "", "time < 1.0x")
        ratio_line(long, "namm-50", "unmodified-chunked", "", "none; the same chunking, for reference")
        ratio_line(long, "h2o-50", "unmodified-chunked", "", "none; the same chunking, for reference")
    if feats:
        lines += [
            "",
            f"Feature memory ({feats[0]['layers']} layers of the same shape, prefill only, NAMM keeping every token "
            "vs the full cache, so both hold the same cache):",
            "",
            "| T | chunk | largest query tile | full-cache peak MiB | NAMM peak MiB | measured extra MiB | "
            "accounted: per-token state MiB | accounted: attention rows of one observe call MiB | "
            "T x T float32 map per layer MiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for f in feats:
            tile = f.get("tile") or f["chunk"]  # files written before the engine tiled its queries
            lines.append(
                f"| {f['length']} | {f['chunk']} | {tile} | {f['full_peak_mib']:.1f} | {f['namm_peak_mib']:.1f} | "
                f"{f['measured_extra_mib']:.1f} | {f['state_mib']:.2f} | {f['rows_mib']:.1f} | "
                f"{f['txt_per_layer_mib']:.0f} |"
            )
    return "\n".join(lines)


BEGIN = "<!-- engine_speed:{dev}:begin -->"
END = "<!-- engine_speed:{dev}:end -->"


def write_markdown(path: Path, result: dict[str, Any], preamble: str) -> None:
    """Write (or update) ``path``; only this run's section (``--section``, default: its device) is replaced."""
    dev = result["args"].get("section") or result["args"]["device"]
    section = f"{BEGIN.format(dev=dev)}\n{render_section(result)}\n{END.format(dev=dev)}"
    if path.exists():
        text = path.read_text()
        pattern = re.compile(re.escape(BEGIN.format(dev=dev)) + r".*?" + re.escape(END.format(dev=dev)), re.S)
        if pattern.search(text):
            path.write_text(pattern.sub(lambda _: section, text))
            return
        path.write_text(text.rstrip() + f"\n\n## {dev}\n\n{section}\n")
        return
    path.write_text(preamble.format(section=section))


PREAMBLE = """# Benchmarks

Generated by `benchmarks/engine_speed.py` (see its docstring for what is measured and how).

## {{dev}}

{section}
"""


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = StrictParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", default="2048,4096,8192", help="prompt lengths (tokens), all configurations")
    p.add_argument(
        "--key-lengths",
        default="",
        help="extra prompt lengths run only for --key-configs (e.g. 8192 when the full grid is too slow)",
    )
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"configurations to run ({', '.join(CONFIGS)})")
    p.add_argument("--key-configs", default=",".join(KEY_CONFIGS), help="configurations run at --key-lengths")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated after each prompt")
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--update-interval", type=int, default=512)
    p.add_argument(
        "--chunk-size",
        type=int,
        default=512,
        help="engine chunk size, also used by unmodified-chunked (512, the update interval, is fastest on CPU)",
    )
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds; the fastest is kept")
    p.add_argument("--feature-lengths", default="1024,2048,4096,8192", help="prompt lengths of the feature table")
    p.add_argument("--feature-chunks", default="64,256", help="extra chunk sizes at the longest feature length")
    p.add_argument("--feature-layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="a smoke run: short prompts, 4 layers, 8 new tokens")
    p.add_argument("--out", default=None, help="markdown file to write or update (e.g. BENCHMARKS.md)")
    p.add_argument("--json", default=None, help="also write every measurement as JSON")
    p.add_argument(
        "--section",
        default=None,
        help="name of the section of --out this run writes (default: the device, e.g. cpu); another name keeps "
        "a second run of the same device, e.g. cpu-chunk512",
    )
    p.add_argument("--note", default="", help="free text recorded in the report (e.g. what else ran on the machine)")
    p.add_argument(
        "--render", default=None, metavar="JSON", help="measure nothing: rewrite --out from a file written by --json"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.key_lengths, args.new_tokens, args.layers = "256,512", "1024", 8, 4
        args.feature_lengths, args.feature_chunks, args.update_interval = "256,512,1024", "64", 256
        args.chunk_size = 128
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.key_lengths = [int(x) for x in args.key_lengths.split(",") if x]
    args.feature_lengths = [int(x) for x in args.feature_lengths.split(",") if x]
    args.feature_chunks = [int(x) for x in args.feature_chunks.split(",") if x]
    args.configs = [c for c in args.configs.split(",") if c]
    args.key_configs = [c for c in args.key_configs.split(",") if c]
    unknown = sorted(set(args.configs + args.key_configs) - set(CONFIGS))
    if unknown:
        p.error(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    args.torch_device = torch.device(args.device)
    args.torch_dtype = getattr(torch, args.dtype)
    if args.torch_device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        stored = json.loads(Path(args.render).read_text())
        print(render_section(stored))
        if args.out:
            dev = stored["args"].get("section") or stored["args"]["device"]
            write_markdown(Path(args.out), stored, PREAMBLE.replace("{{dev}}", dev))
        return 0
    command = "python " + shlex.join([os.path.relpath(__file__, ROOT), *(sys.argv[1:] if argv is None else argv)])
    if args.threads:
        torch.set_num_threads(args.threads)
    meter = PeakMeter(args.torch_device)
    load_before = tuple(round(x, 1) for x in os.getloadavg())
    t_start = time.time()
    namm = random_namm().to(args.torch_device)
    log(f"building the SmolLM2-135M-shaped model ({args.layers} layers, random weights)")
    model = build_model(args.layers, args.torch_device, args.torch_dtype)
    warm = torch.randint(3, model.config.vocab_size, (1, args.chunk_size), generator=torch.Generator().manual_seed(1))
    for config in args.configs:  # first calls allocate and pick kernels: keep them out of the timings
        run_config(config, model, warm.to(args.torch_device), 2, namm, args)
    runs: list[Run] = []
    plan = [(length, args.configs) for length in args.lengths]
    plan += [(length, args.key_configs) for length in args.key_lengths if length not in args.lengths]

    def result(feats: list[dict[str, Any]], method: str) -> dict[str, Any]:
        return {
            "command": command,
            "args": {k: v for k, v in vars(args).items() if not k.startswith("torch_")},
            "machine": machine_info(args.torch_device),
            "memory_method": method,
            "load_before": load_before,
            "load_after": tuple(round(x, 1) for x in os.getloadavg()),
            "wall_s": time.time() - t_start,
            "note": args.note,
            "runs": [{**asdict(r), "tokens": None} for r in runs],
            "features": feats,
        }

    for length, configs in plan:
        log(f"T={length}: {', '.join(configs)}")
        runs += measure(list(configs), model, length, args.new_tokens, namm, meter, args).values()
        if args.json:  # the lengths measured so far survive an interrupted run
            Path(args.json).write_text(json.dumps(result([], meter.method), indent=1, default=str) + "\n")
    del model
    gc.collect()
    log("feature memory table")
    # memory only from here on: fixing the threshold is process-wide and cannot be undone
    malloc_fixed = bool(args.feature_lengths) and args.torch_device.type == "cpu" and fix_malloc()
    feats = feature_runs(args, meter, namm) if args.feature_lengths else []
    method = meter.method + (
        "; timed runs with glibc's default allocator, the feature table with its mmap threshold fixed at 128 KiB"
        if malloc_fixed
        else ""
    )
    final = result(feats, method)
    print(render_section(final))
    if args.json:
        Path(args.json).write_text(json.dumps(final, indent=1, default=str) + "\n")
    if args.out:
        write_markdown(Path(args.out), final, PREAMBLE.replace("{{dev}}", args.section or args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
