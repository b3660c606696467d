"""Host-side work of each configuration: tensors allocated and device reads per run, on a model too small for the
arithmetic to matter.

    python benchmarks/engine_ops.py                      # about a minute on the CPU

On a GPU, a small model's time goes to the host launching operations (BENCHMARKS.md, GPU section), so the number
of operations per layer, and every read of a device value (which stalls the host until the GPU's queue drains),
is what the engine and its policies must keep small. This counts them where no GPU is needed: a 30-layer model of
SmolLM2-135M's layout with hidden size 64 (one KV head), a 2,048-token prompt in 256-token chunks with an update
after each (8 updates), then one greedy token, under ``torch.profiler``: ``aten::empty`` / ``empty_strided``
calls (tensors allocated) and ``aten::_local_scalar_dense`` calls (a Python read of a tensor value: ``.item()``,
``bool(t)``; a ``.cpu()`` copy is not counted, being free on the CPU). Times are the fastest of three runs, one
thread; they are noisy and only indicative.

Operator calls count what would launch a kernel on a GPU: the ``aten::`` calls that do the work themselves (no
call under them launches one), leaving out views, allocations and other calls that only touch metadata
(:data:`NO_KERNEL`). An allocation made inside a kernel (the output of ``torch.cat``, for instance) is not an
``aten::empty`` call, so "tensors allocated" misses those; the operator calls do not. "Per layer and decoded
token" is the difference between a run with five new tokens and one with one, over four tokens and the model's 30
layers.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from namm_transfer.evals.args import StrictParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_speed as es  # noqa: E402

NO_KERNEL = frozenset(
    "aten::" + name
    for name in (
        "view as_strided slice transpose expand unsqueeze squeeze select t _unsafe_view reshape _reshape_alias "
        "alias detach permute unfold split narrow unbind view_as flatten contiguous to lift_fresh result_type "
        "resolve_conj resolve_neg empty empty_like empty_strided new_empty new_empty_strided item _local_scalar_dense "
        "is_nonzero"
    ).split()
)
"""Calls that launch no kernel: views, allocations, metadata (``contiguous`` and ``to`` count through the copy
they make when they make one)."""


def operator_calls(prof: Any) -> int:
    """``aten::`` calls of a profile that launch a kernel themselves: not in :data:`NO_KERNEL`, and no call under
    them does (``aten::bmm`` counts, its ``resolve_conj`` calls do not; ``aten::matmul`` does not, its ``bmm``
    does)."""
    below: dict[int, bool] = {}  # whether a call's subtree launches a kernel

    def kernel_below(e: Any) -> bool:
        if id(e) not in below:
            inner = any([kernel_below(c) for c in e.cpu_children if c.name.startswith("aten::")])
            below[id(e)] = inner or e.name not in NO_KERNEL
        return below[id(e)]

    def launches_kernel(e: Any) -> bool:
        inner = any(kernel_below(c) for c in e.cpu_children if c.name.startswith("aten::"))
        return e.name not in NO_KERNEL and not inner

    return sum(launches_kernel(e) for e in prof.events() if e.name.startswith("aten::"))


TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, vocab_size=512)


def main(argv: list[str] | None = None) -> int:
    from torch.profiler import ProfilerActivity, profile

    p = StrictParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="unmodified-chunked,engine-full,h2o-50,namm-50")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=256, help="also the update interval")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    es.SMOLLM2_135M.update(TINY)
    dev = torch.device("cpu")
    model = es.build_model(30, dev, torch.float32)
    namm = es.random_namm()
    ids = torch.randint(3, TINY["vocab_size"], (1, args.length), generator=torch.Generator().manual_seed(0))

    def run(config: str, new_tokens: int) -> es.Run:
        if config.startswith("unmodified"):
            return es.run_unmodified(model, ids, new_tokens, args.chunk_size, dev)
        return es.run_engine(model, ids, new_tokens, config, namm, args.chunk_size, args.chunk_size, dev)

    print(
        "| configuration | prefill ms | decode ms/token | tensors allocated | device reads | operator calls "
        "| operator calls per layer and decoded token |"
    )
    print("|---|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        run(config, 2)  # warm-up
        prefill = min(run(config, 1).prefill_s for _ in range(3))
        decode = min(run(config, 17).decode_s for _ in range(2)) / 16
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(config, 1)
        with profile(activities=[ProfilerActivity.CPU]) as longer:
            run(config, 5)
        counts = {e.key: e.count for e in prof.key_averages()}
        allocs = counts.get("aten::empty", 0) + counts.get("aten::empty_strided", 0)
        reads = counts.get("aten::_local_scalar_dense", 0)
        ops = operator_calls(prof)
        per_token = (operator_calls(longer) - ops) / 4 / model.config.num_hidden_layers
        print(
            f"| {config} | {prefill * 1000:.0f} | {decode * 1000:.1f} | {allocs} | {reads} | {ops} | {per_token:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
