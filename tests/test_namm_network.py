"""The NAMM network: parameter layout, scorer semantics, recency embedding."""

from __future__ import annotations

import math

import pytest
import torch

from namm_transfer.namm import NAMM, NAMMConfig, param_layout, recency_embedding


def test_default_config_has_4172_parameters_in_spec_order():
    cfg = NAMMConfig()
    assert cfg.n_params == 4172
    assert [n for n, _ in param_layout(cfg)] == ["W_qkv", "b_qkv", "W_o", "b_o", "w_out", "b_out"]
    assert [math.prod(s) for _, s in param_layout(cfg)] == [2400, 96, 1600, 50, 25, 1]
    assert NAMM(cfg).flat.numel() == 4172


def test_flat_vector_round_trip_is_lossless():
    net = NAMM()
    v = torch.randn(4172)
    net.set_flat(v)
    assert torch.equal(net.get_flat(), v)
    parts = net.unflatten(v)
    # W_qkv is input-by-output, row-major: element (i, j) is v[i * 96 + j]
    assert parts["W_qkv"][3, 40] == v[3 * 96 + 40]
    assert parts["b_qkv"][5] == v[2400 + 5]
    assert parts["W_o"][2, 7] == v[2496 + 2 * 50 + 7]
    assert parts["b_out"][0] == v[-1]
    assert torch.equal(torch.cat([p.reshape(-1) for p in parts.values()]), v)


def test_set_flat_rejects_wrong_length_and_nonfinite():
    net = NAMM()
    with pytest.raises(ValueError, match="4172"):
        net.set_flat(torch.zeros(100))
    bad = torch.zeros(4172)
    bad[7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        net.set_flat(bad)


def test_zero_weights_score_zero():
    net = NAMM()
    x = torch.randn(3, 10, 25)
    assert torch.equal(net.score(x), torch.zeros(3, 10))


def _reference_score(net: NAMM, x: torch.Tensor) -> torch.Tensor:
    """Direct float64 transcription of the spec for one row x (S, 25)."""
    p = {k: t.double() for k, t in net.unflatten(net.flat.detach()).items()}
    x = x.double()
    qkv = x @ p["W_qkv"] + p["b_qkv"]
    q, k, v = qkv[:, :32], qkv[:, 32:64], qkv[:, 64:]
    logits = q @ k.T / math.sqrt(32)
    s = x.shape[0]
    allowed = torch.ones(s, s, dtype=torch.bool).triu()  # i attends to j >= i
    logits = logits.masked_fill(~allowed, float("-inf"))
    o = torch.softmax(logits, -1) @ v
    rm = o @ p["W_o"] + p["b_o"]
    r, m = rm[:, :25], rm[:, 25:]
    h = x * (1 + m) + r
    return h @ p["w_out"] + p["b_out"]


def test_scorer_matches_direct_formula_with_backward_mask():
    torch.manual_seed(0)
    net = NAMM()
    net.set_flat(torch.randn(4172) * 0.2)
    x = torch.randn(2, 17, 25)
    got = net.score(x)
    for i in range(2):
        torch.testing.assert_close(got[i].double(), _reference_score(net, x[i]), atol=1e-4, rtol=1e-4)


def test_backward_mask_newest_token_sees_only_itself():
    torch.manual_seed(1)
    net = NAMM()
    net.set_flat(torch.randn(4172) * 0.3)
    x = torch.randn(1, 9, 25)
    base = net.score(x)
    x2 = x.clone()
    x2[0, :4] = torch.randn(4, 25)  # change old tokens: newer tokens cannot see them
    torch.testing.assert_close(net.score(x2)[0, 4:], base[0, 4:])


def test_invalid_prefix_slots_do_not_change_live_scores():
    torch.manual_seed(2)
    net = NAMM()
    net.set_flat(torch.randn(4172) * 0.3)
    live = torch.randn(1, 6, 25)
    padded = torch.cat([torch.randn(1, 3, 25), live], dim=1)
    valid = torch.tensor([[False] * 3 + [True] * 6])
    s = net.score(padded, valid)
    assert torch.isinf(s[0, :3]).all()
    torch.testing.assert_close(s[0, 3:], net.score(live)[0])


def test_population_rows_use_their_own_parameters():
    torch.manual_seed(3)
    net = NAMM()
    thetas = torch.randn(2, 4172) * 0.2
    x = torch.randn(2, 8, 25)
    both = net.score(x, theta=thetas)
    for i in range(2):
        net.set_flat(thetas[i])
        torch.testing.assert_close(both[i], net.score(x[i : i + 1])[0])


def test_recency_embedding_formula():
    age = torch.tensor([0, 1, 1000, 49999])
    e = recency_embedding(age)
    assert e.shape == (4, 8)
    for j, a in enumerate(age.tolist()):
        for i in range(4):
            assert e[j, i].item() == pytest.approx(math.sin(a / 50000 ** (i / 4)), abs=1e-6)
            assert e[j, 4 + i].item() == pytest.approx(math.cos(a / 50000 ** (i / 4)), abs=1e-6)


def test_normalization_z_scores_with_floor():
    net = NAMM()
    net.set_normalization(torch.full((17,), 2.0), torch.zeros(17))
    out = net.normalize(torch.full((1, 17), 3.0))
    assert torch.allclose(out, torch.full((1, 17), 1.0 / 1e-7))
    with pytest.raises(ValueError):
        net.set_normalization(torch.zeros(16), torch.ones(16))


def test_config_validation():
    with pytest.raises(ValueError):
        NAMMConfig(hop=40)
    with pytest.raises(ValueError, match="unknown"):
        NAMMConfig.from_dict({"n_fft": 32, "bogus": 1})
