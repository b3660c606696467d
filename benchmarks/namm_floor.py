"""The NAMM network's own arithmetic in a run, and the least time that arithmetic can take on this machine.

    python benchmarks/namm_floor.py --json benchmarks/data/namm_floor-cpu.json      # about 8 minutes on the CPU

Runs ``unmodified``, ``h2o-50`` and ``namm-50`` of ``engine_speed.py`` at one prompt length (SmolLM2-135M's shape,
random weights, prefill in 512-token chunks with an update after each, then greedy decoding; interleaved rounds,
the fastest run of each kept) and counts, from the shapes of every call the engine makes to the NAMM policy:

* spectrogram (``observe``): the windowed DFT of every frame completed in the call, for every (sequence, KV head,
  token): 2 x 34 x 32 flops per frame and token (a matrix product; the magnitudes and the weighted sum over
  frames are not counted);
* scorer (``select_layers``): for every (layer, sequence, KV head) row of S tokens, the backward attention,
  S (S + 1) / 2 pairs x 2 x 2 x 32 flops (scores and weighted values), and the three linear maps,
  2 x S x (25 x 96 + 32 x 50 + 25) flops.

Then, on the same threads, it measures this machine's float32 matrix-product rate (2048 x 2048 x 2048, fastest
of five) and the rate of torch's fused attention on the scorer's shape (causal, one head of 32, 4,096 tokens,
9 rows per call). The floor is the counted arithmetic at those rates: what the NAMM's network would cost with
kernels as fast as the machine's best, before any other work. H2O's run is the same engine without the
network's arithmetic (it needs only column sums), so ``h2o-50 + floor`` is about the least a NAMM run can take.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from namm_transfer.evals.args import StrictParser
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_speed as es  # noqa: E402


class FlopCounter:
    """Wraps a NAMMPolicy's ``observe`` and ``select_layers``: counts their arithmetic from the shapes."""

    def __init__(self, policy: Any) -> None:
        self.spectrogram = 0.0
        self.scorer_attention = 0.0
        self.scorer_linear = 0.0
        stream = policy.stream
        cfg = policy.namm.config
        # multiply-adds per token of the scorer's linear maps (25 x 96 + 32 x 50 + 25 with the defaults)
        linear = cfg.d_in * 3 * cfg.head_dim + cfg.head_dim * 2 * cfg.d_in + cfg.d_in
        observe, select_layers = policy.observe, policy.select_layers

        def counted_observe(state: Any, rows: torch.Tensor) -> None:
            b, h, q, s = rows.shape
            start, clock = state.meta["namm_start"], state.meta["namm_clock"]
            span = clock + q - start
            frames = 0 if span < stream.n_fft else (span - stream.n_fft) // stream.hop + 1
            self.spectrogram += 2.0 * (2 * stream.n_bins) * stream.n_fft * frames * b * h * s
            observe(state, rows)

        def counted_select(states: list[Any]) -> list[torch.Tensor]:
            for st in states:
                b, h, s = st.shape
                self.scorer_attention += 4.0 * cfg.head_dim * b * h * s * (s + 1) / 2
                self.scorer_linear += 2.0 * linear * b * h * s
            return select_layers(states)

        policy.observe, policy.select_layers = counted_observe, counted_select


def best_of(fn: Any, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def machine_rates() -> dict[str, float]:
    """float32 GFLOP/s of a large matrix product and of the fused causal attention on the scorer's shape."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    matmul = 2 * 2048**3 / best_of(lambda: a @ b) / 1e9
    n, s = 9, 4096
    q, k, v = (torch.randn(n, 1, s, 32, generator=g) for _ in range(3))
    sdpa_s = best_of(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    sdpa = 4.0 * 32 * n * s * (s + 1) / 2 / sdpa_s / 1e9
    return {"matmul_gflops": matmul, "causal_attention_gflops": sdpa}


def main(argv: list[str] | None = None) -> int:
    p = StrictParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the fastest run of each is kept")
    p.add_argument("--json", default=None, help="write the counts, rates and times here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model = es.build_model(30, device, torch.float32)
    namm = es.random_namm()
    ids = torch.randint(3, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    warm = ids[:, :512]
    runs: dict[str, Any] = {}
    counter: FlopCounter | None = None
    original = es.make_policy

    def make_policy(name: str, net: Any) -> Any:
        nonlocal counter
        policy = original(name, net)
        if name == "namm-50":
            counter = FlopCounter(policy)
        return policy

    es.make_policy = make_policy
    configs = ["unmodified", "h2o-50", "namm-50"]

    def run(config: str, prompt: torch.Tensor, new_tokens: int) -> Any:
        if config == "unmodified":
            return es.run_unmodified(model, prompt, new_tokens, None, device)
        return es.run_engine(model, prompt, new_tokens, config, namm, 512, 512, device)

    for config in configs:  # first calls allocate and pick kernels
        run(config, warm, 2)
    for round_ in range(args.repeats):  # interleaved, the order reversed every other round; the fastest is kept
        for config in configs if round_ % 2 == 0 else configs[::-1]:
            r = run(config, ids, args.new_tokens)
            total = r.prefill_s + r.decode_s
            es.log(f"round {round_ + 1}, {config}: {total:.1f} s")
            if config not in runs or total < runs[config]["total_s"]:
                runs[config] = {
                    "prefill_s": r.prefill_s,
                    "decode_s": r.decode_s,
                    "total_s": total,
                    "policy_observe_s": r.policy_observe_s,
                    "policy_select_s": r.policy_select_s,
                }
    assert counter is not None
    rates = machine_rates()
    flops = {
        "spectrogram": counter.spectrogram,
        "scorer_attention": counter.scorer_attention,
        "scorer_linear": counter.scorer_linear,
    }
    floor = {
        "spectrogram_s": flops["spectrogram"] / (rates["matmul_gflops"] * 1e9),
        "scorer_attention_s": flops["scorer_attention"] / (rates["causal_attention_gflops"] * 1e9),
        "scorer_linear_s": flops["scorer_linear"] / (rates["matmul_gflops"] * 1e9),
    }
    floor["total_s"] = sum(floor.values())
    out = {
        "command": "python " + " ".join([Path(__file__).relative_to(es.ROOT).as_posix(), *(argv or sys.argv[1:])]),
        "args": vars(args),
        "machine": es.machine_info(device),
        "runs": runs,
        "flops": flops,
        "rates": rates,
        "floor": floor,
    }
    print(render(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def render(d: dict[str, Any]) -> str:
    r, f, fl, rt = d["runs"], d["flops"], d["floor"], d["rates"]
    unmod, h2o, namm = (r[c]["total_s"] for c in ("unmodified", "h2o-50", "namm-50"))
    net = r["namm-50"]["policy_observe_s"] + r["namm-50"]["policy_select_s"]
    lines = [
        f"NAMM network arithmetic, T={d['args']['length']} + {d['args']['new_tokens']} tokens, 50% budget "
        f"({d['machine']['date']}, {d['args']['threads']} threads):",
        "",
        "| part | GFLOP | machine rate GFLOP/s | floor s |",
        "|---|---|---|---|",
        f"| spectrogram (DFT products) | {f['spectrogram'] / 1e9:.0f} | {rt['matmul_gflops']:.0f} (matrix product) "
        f"| {fl['spectrogram_s']:.1f} |",
        f"| scorer attention | {f['scorer_attention'] / 1e9:.0f} | {rt['causal_attention_gflops']:.0f} (fused "
        f"causal attention) | {fl['scorer_attention_s']:.1f} |",
        f"| scorer linear maps | {f['scorer_linear'] / 1e9:.0f} | {rt['matmul_gflops']:.0f} | "
        f"{fl['scorer_linear_s']:.1f} |",
        f"| **total** | {sum(f.values()) / 1e9:.0f} | | **{fl['total_s']:.1f}** |",
        "",
        f"Runs (seconds, prefill + decoding): unmodified {unmod:.1f}, h2o-50 {h2o:.1f}, namm-50 {namm:.1f} "
        f"(of which in the NAMM's observe + select {net:.1f}). h2o-50 + the floor = {h2o + fl['total_s']:.1f} s "
        f"= {(h2o + fl['total_s']) / unmod:.2f}x the unmodified run; namm-50 = {namm / unmod:.2f}x.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
