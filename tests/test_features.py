"""The streamed spectrogram + EMA equals a direct float64 computation of namm-spec.md's formulas."""

from __future__ import annotations

import pytest
import torch

from namm_transfer.features import SpectrogramStream


def direct_ema(cols: torch.Tensor, arrival: torch.Tensor, interval: int, gamma: float = 0.99) -> list[torch.Tensor]:
    """One-shot formula per update window, in float64.

    cols: (T, K) attention columns (zeros before each token's arrival); returns the EMA state
    (K, 17) after each update (every ``interval`` rows).
    """
    t_total, k = cols.shape
    g = gamma**16
    window = torch.hann_window(32, periodic=True, dtype=torch.float64)
    state = torch.zeros(k, 17, dtype=torch.float64)
    out = []
    for u0 in range(0, t_total - interval + 1, interval):
        u1 = u0 + interval
        prev = cols[max(0, u0 - 16) : u0].double()
        prev = torch.cat([torch.zeros(16 - prev.shape[0], k, dtype=torch.float64), prev])
        x = torch.cat([prev, cols[u0:u1].double()])  # (16 + interval, K)
        spec = torch.stft(x.T, n_fft=32, hop_length=16, window=window, center=False, return_complex=True).abs()
        n_frames = spec.shape[-1]  # (K, 17, F)
        assert n_frames == interval // 16
        for tok in range(k):
            starts = [u0 - 16 + 16 * f for f in range(n_frames)]
            q = [f for f in range(n_frames) if starts[f] >= arrival[tok]]
            new = g ** len(q) * state[tok]
            for f in q:
                new = new + (1 - g) * g ** (n_frames - 1 - f) * spec[tok, :, f]
            state[tok] = new
        out.append(state.clone())
    return out


@pytest.mark.parametrize(
    "one_product, block_floats", [(False, None), (False, 1), (True, None)], ids=["per-row", "blocks", "one-product"]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stream_equals_direct_formula(seed, one_product, block_floats):
    """``blocks``: the CPU path in blocks of 16 tokens (40 tokens: 16, 16, 8), so that some blocks have only
    tokens for which every frame counts (one product with the frame weights) and others have new tokens (the
    weights masked per token), changing from update to update."""
    torch.manual_seed(seed)
    interval, n_updates, k = 64, 4, 40
    t_total = interval * n_updates
    arrival = torch.sort(torch.randint(0, t_total - 8, (k,))).values
    arrival[0] = 0
    cols = torch.rand(t_total, k)
    for tok in range(k):
        cols[: arrival[tok], tok] = 0.0
    stream = SpectrogramStream(32, 16, 0.99, one_product=one_product)
    if block_floats is not None:
        stream.block_floats = block_floats
    rows = stream.empty_rows(1, 1, k, torch.device("cpu"))
    ema = torch.zeros(1, 1, k, 17)
    start, clock = stream.initial_start(), 0
    expected = direct_ema(cols, arrival, interval)
    gen = torch.Generator().manual_seed(seed)
    for u in range(n_updates):
        # random chunk sizes inside each update window, ending exactly on the update boundary
        end = (u + 1) * interval
        while clock < end:
            q = min(int(torch.randint(1, 40, (1,), generator=gen)), end - clock)
            new = cols[clock : clock + q].T.reshape(1, 1, k, q)
            rows, ema, start = stream.advance(rows, ema, arrival.view(1, 1, k), new, start, clock)
            clock += q
            assert rows.shape[-1] < 32 + 16  # memory: a few rows per token, never the whole interval
        torch.testing.assert_close(ema[0, 0].double(), expected[u], atol=1e-5, rtol=1e-5)


def test_token_without_complete_frame_keeps_previous_state():
    stream = SpectrogramStream()
    k = 2
    arrival = torch.tensor([0, 60]).view(1, 1, k)
    cols = torch.rand(64, k)
    cols[:60, 1] = 0
    rows = stream.empty_rows(1, 1, k, torch.device("cpu"))
    ema = torch.zeros(1, 1, k, 17)
    rows, ema, start = stream.advance(rows, ema, arrival, cols.T.reshape(1, 1, k, 64), stream.initial_start(), 0)
    # token 1 arrived at row 60: no frame of this update starts at or after 60, so its state stays 0
    assert torch.equal(ema[0, 0, 1], torch.zeros(17))
    # token 0 arrived at 0: the first frame (rows -16..15) predates it and does not count
    assert ema[0, 0, 0].abs().sum() > 0


def test_frame_rule_excludes_rows_before_arrival():
    """A token arriving at row 16 gets frames starting at 16, 32 (of rows 0..63): two frames."""
    stream = SpectrogramStream()
    arrival = torch.tensor([16]).view(1, 1, 1)
    col = torch.zeros(64, 1)
    col[16:] = 1.0  # constant attention from arrival on
    rows = stream.empty_rows(1, 1, 1, torch.device("cpu"))
    ema = torch.zeros(1, 1, 1, 17)
    _, ema, _ = stream.advance(rows, ema, arrival, col.T.reshape(1, 1, 1, 64), stream.initial_start(), 0)
    g = 0.99**16
    dc = torch.hann_window(32, periodic=True).sum().item()  # DC bin of a constant-1 frame
    # frames starting at 16 and 32 qualify (F = 4 frames: starts -16, 0, 16, 32)
    expected_dc = (1 - g) * g * dc + (1 - g) * dc
    assert ema[0, 0, 0, 0].item() == pytest.approx(expected_dc, rel=1e-5)


def test_one_product_equals_one_product_per_row():
    """All (sequence, head) rows transformed in one matrix product (the accelerator path) give the state of one
    product per row (the CPU path), with several sequences and heads and chunks that complete no frame."""
    gen = torch.Generator().manual_seed(5)
    b, h, k = 2, 3, 24
    arrival = torch.randint(0, 40, (b, h, k), generator=gen)
    states = []
    for one in (False, True):
        stream = SpectrogramStream(one_product=one)
        rows = stream.empty_rows(b, h, k, torch.device("cpu"))
        ema = torch.zeros(b, h, k, 17)
        start, clock = stream.initial_start(), 0
        for q in (5, 40, 3, 64, 12):
            new = torch.rand(b, h, k, q, generator=torch.Generator().manual_seed(clock))
            rows, ema, start = stream.advance(rows, ema, arrival, new, start, clock)
            clock += q
        states.append((rows, ema, start))
    (r0, e0, s0), (r1, e1, s1) = states
    assert s0 == s1 and torch.equal(r0, r1)
    assert e0.abs().sum() > 0
    torch.testing.assert_close(e1, e0, atol=1e-6, rtol=1e-5)


def test_one_stream_shared_by_layers_of_different_sizes():
    """A NAMM policy keeps one stream for all its layers: on the CPU the stream's scratch buffer serves calls
    of different shapes in turn (grown when needed). Interleaved calls for two layers give the states of a
    separate stream per layer."""
    gen = torch.Generator().manual_seed(9)
    shapes = {"small": (1, 2, 30), "large": (2, 3, 300)}  # (B, H, tokens)
    arrival = {n: torch.randint(0, 40, s, generator=gen) for n, s in shapes.items()}
    shared = SpectrogramStream(one_product=False)
    own = {n: SpectrogramStream(one_product=False) for n in shapes}
    state = {(n, who): None for n in shapes for who in ("shared", "own")}
    for n, (b, h, k) in shapes.items():
        for who in ("shared", "own"):
            state[n, who] = (shared.empty_rows(b, h, k, torch.device("cpu")), torch.zeros(b, h, k, 17), -16)
    clock = 0
    for q in (48, 7, 64, 33, 96):
        for n, (b, h, k) in shapes.items():
            new = torch.rand(b, h, k, q, generator=torch.Generator().manual_seed(clock + k))
            for who, stream in (("shared", shared), ("own", own[n])):
                rows, ema, start = state[n, who]
                state[n, who] = stream.advance(rows, ema, arrival[n], new, start, clock)
        clock += q
    for n in shapes:
        (r0, e0, s0), (r1, e1, s1) = state[n, "shared"], state[n, "own"]
        assert s0 == s1 and torch.equal(r0, r1) and torch.equal(e0, e1)
        assert e0.abs().sum() > 0
