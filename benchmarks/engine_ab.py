"""One timed prefill (and optional decoding) of one configuration, for side-by-side comparisons of engine versions.

Prints one JSON line: which ``namm_transfer`` was imported, the configuration, prefill and decode seconds, and the
time inside the policy (``PolicyTimer`` of engine_speed.py). Run it alternately against two versions of the
package (e.g. one laid out with ``pip install --no-deps --target DIR <checkout>`` and put first with PYTHONPATH,
and the working tree), so that both see the same machine state:

    for i in 1 2; do PYTHONPATH=/tmp/old python benchmarks/engine_ab.py 8192 h2o-50; \\
        python benchmarks/engine_ab.py 8192 h2o-50; done

Arguments: prompt length, configuration (unmodified, engine-full, h2o-50, namm-50), new tokens (default 0:
prefill only), and optionally the engine's query-tile size in MiB. SmolLM2-135M's shape, random weights, CPU,
two threads. The session-10 comparisons quoted in BENCHMARKS.md ("Less work per query tile") were run this way.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_speed as es  # noqa: E402


def main(argv: list[str]) -> None:
    import namm_transfer
    from namm_transfer import attach

    torch.set_num_threads(2)
    length, config = int(argv[0]), argv[1]
    new = int(argv[2]) if len(argv) > 2 else 0
    model = es.build_model(30, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 49152, (1, length), generator=torch.Generator().manual_seed(0))
    out: dict = {"package": namm_transfer.__file__, "config": config, "tile_mib": argv[3:]}
    with torch.no_grad():
        if config == "unmodified":
            run = es.run_unmodified(model, ids, max(new, 1), None, torch.device("cpu"))
            print(json.dumps({**out, "prefill": run.prefill_s, "decode": run.decode_s}))
            return
        policy = es.make_policy(config, es.random_namm())
        timer = es.PolicyTimer(policy, torch.device("cpu"))
        with attach(model, policy, update_interval=512, chunk_size=512) as mem:
            if len(argv) > 3:
                mem.engine.tile_bytes = int(float(argv[3]) * 2**20)
            t0 = time.perf_counter()
            logits = mem.prefill(ids)
            t1 = time.perf_counter()
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(new - 1):
                nxt = mem.step(nxt)[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
    print(json.dumps({**out, "prefill": t1 - t0, "decode": t2 - t1, **timer.seconds}))


if __name__ == "__main__":
    main(sys.argv[1:])
