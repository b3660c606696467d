"""Where a prefill's time goes on a GPU: prefill times by chunk size, then a torch.profiler table per configuration.

    python benchmarks/engine_profile_gpu.py > engine_profile.txt      # on a machine with CUDA (about 3 minutes)

Same model as ``engine_speed.py`` (SmolLM2-135M's shape, random weights, bfloat16). First the prefill of 8k and
32k random tokens in 512- and 2048-token chunks (update interval = chunk) for Hugging Face's one-shot and chunked
prefill, the engine with the full cache, H2O and a random NAMM at 50% (fastest of two, after a warm-up); then
one profiled 8k prefill in 512-token chunks per configuration, sorted by host (self CPU) time and by device time.
A profile whose host time is many times its device time is bound by the host launching kernels, not by the GPU.
``benchmarks/data/engine_profile_gpu-c7c5114.txt`` is one run (H200, commit c7c5114's engine; the run was cut off
by its time limit during the H2O profile).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_speed as es  # noqa: E402

CONFIGS = ("unmodified", "unmodified-chunked", "engine-full", "h2o-50", "namm-50")


def main() -> int:
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (engine_speed.py measures the CPU)")
    dev = torch.device("cuda")
    model = es.build_model(30, dev, torch.bfloat16)
    namm = es.random_namm().to(dev)

    def prefill(config: str, ids: torch.Tensor, chunk: int) -> float:
        if config.startswith("unmodified"):
            run = es.run_unmodified(model, ids, 1, None if config == "unmodified" else chunk, dev)
        else:
            run = es.run_engine(model, ids, 1, config, namm, chunk, chunk, dev)
        return run.prefill_s

    warm = torch.randint(3, model.config.vocab_size, (1, 1024), device=dev)
    for config in CONFIGS:
        prefill(config, warm, 512)
    for length in (8192, 32768):
        ids = torch.randint(3, model.config.vocab_size, (1, length), device=dev)
        for chunk in (512, 2048):
            for config in CONFIGS:
                if config == "unmodified" and chunk != 512:
                    continue
                best = min(prefill(config, ids, chunk) for _ in range(2))
                print(f"T={length} chunk={chunk} {config:<19} prefill {best * 1000:8.1f} ms", flush=True)
    ids = torch.randint(3, model.config.vocab_size, (1, 8192), device=dev)
    for config in CONFIGS[1:]:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            prefill(config, ids, 512)
        print(f"=== profile {config} T=8192 chunk 512", flush=True)
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        print(table.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
