"""Feature options outside namm-spec.md: length-normalized attention rows (NAMMConfig.length_normalized_features)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from namm_transfer.checkpoint import load_namm, save_namm
from namm_transfer.features import SpectrogramStream, length_normalized_rows, live_lengths
from namm_transfer.namm import NAMM, NAMMConfig
from namm_transfer.policies.namm_policy import NAMMPolicy
from namm_transfer.session import attach


def test_rows_times_live_length_on_a_hand_checked_case():
    # two rows (sequence 0 and 1, one KV head each): slot 0 of row 0 is padding, slots 0-2 of row 1 are dead
    valid = torch.tensor([[[False, True, True, True, True, True]], [[False, False, False, True, True, True]]])
    arrival = torch.tensor([[[0, 1, 2, 3, 4, 5]], [[0, 1, 2, 3, 4, 5]]])
    # the call's queries are at clock rows 3, 4, 5: row 0 sees slots arriving at 1..3, 1..4, 1..5; row 1 slot 3
    # on only
    assert live_lengths(valid, arrival, clock=3, queries=3).tolist() == [[[3, 4, 5]], [[1, 2, 3]]]
    rows = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.5, 0.25]).expand(2, 1, 3, 6)
    out = length_normalized_rows(rows, valid, arrival, clock=3)
    expected = torch.stack(
        [rows[0, 0] * torch.tensor([[3.0], [4.0], [5.0]]), rows[1, 0] * torch.tensor([[1.0], [2.0], [3.0]])]
    )
    assert torch.equal(out, expected.unsqueeze(1))
    assert out[0, 0, 1, 0].item() == 2.0 and out[1, 0, 2, 5].item() == 0.75  # 0.5 * 4, 0.25 * 3
    # a row spread uniformly over the slots its query sees becomes 1 on each of them
    uniform = torch.zeros(1, 1, 1, 6)
    uniform[..., 1:4] = 1 / 3
    assert torch.equal(
        length_normalized_rows(uniform, valid[:1], arrival[:1], clock=3)[..., 1:4], torch.ones(1, 1, 1, 3)
    )
    # a decoding step: one query at the newest token's arrival sees every live slot
    assert live_lengths(valid, arrival, clock=5, queries=1).tolist() == [[[5]], [[3]]]


class _Recording(NAMMPolicy):
    """Records what layer 0 is handed at each observe: (rows, valid, arrival, clock)."""

    def __init__(self, namm: NAMM) -> None:
        super().__init__(namm)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []

    def observe(self, state, rows):  # type: ignore[no-untyped-def]
        if state.layer == 0:
            self.calls.append((rows.clone(), state.valid.clone(), state.arrival.clone(), state.meta["namm_clock"]))
        super().observe(state, rows)


def _keep_all_namm(**options) -> NAMM:
    namm = NAMM(NAMMConfig(**options))  # zero weights: every score is 0 >= threshold 0, nothing is evicted
    namm.set_normalization(torch.zeros(17), torch.ones(17))
    return namm


def _replay(calls, scale: bool) -> torch.Tensor:
    """The layer-0 EMA from the recorded rows through SpectrogramStream alone (the spec's path), the rows multiplied
    by the live lengths counted here by brute force when ``scale``."""
    stream = SpectrogramStream(32, 16, 0.99)
    rows_buf = ema = None
    start, clock = stream.initial_start(), 0
    for rows, valid, arrival, c in calls:
        assert c == clock
        b, h, q, s = rows.shape
        if rows_buf is None:
            rows_buf = stream.empty_rows(b, h, s, rows.device)
            ema = torch.zeros(b, h, s, 17)
        pad = s - rows_buf.shape[2]
        rows_buf = torch.cat([rows_buf, torch.zeros(b, h, pad, rows_buf.shape[3])], 2)
        ema = torch.cat([ema, torch.zeros(b, h, pad, 17)], 2)
        if scale:
            query_clock = torch.arange(c, c + q).view(1, 1, q, 1)
            sees = valid.unsqueeze(2) & (arrival.unsqueeze(2) <= query_clock)  # (B, H, Q, S)
            rows = rows * sees.sum(-1, keepdim=True).float()
        rows_buf, ema, start = stream.advance(rows_buf, ema, arrival, rows.transpose(-1, -2), start, clock)
        clock += q
    return ema


@pytest.fixture(scope="module")
def model():
    return tiny_decoder("llama")


def test_default_features_are_the_spec_and_the_flag_scales_the_engine_rows(model):
    ids = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(0))
    emas = {}
    for flag in (False, True):
        policy = _Recording(_keep_all_namm(length_normalized_features=flag))
        with attach(model, policy, update_interval=64, chunk_size=32) as mem:
            mem.prefill(ids)
            emas[flag] = mem.engine.states[0].tokens["namm_ema"].clone()
            assert mem.engine.states[0].valid.all(), "nothing evicted: the replay's layout is the engine's"
        assert len(policy.calls) >= 7
        # default (flag off): bit for bit the stream of the raw rows, as before the option existed
        assert torch.equal(emas[flag], _replay(policy.calls, scale=flag))
    assert not torch.equal(emas[False], emas[True])
    # with every token live, query t of the prompt sees t + 1 tokens: the EMA grows accordingly
    assert emas[True].mean() > 10 * emas[False].mean()


def test_flag_is_saved_loaded_and_old_checkpoints_load_unchanged(tmp_path):
    assert NAMMConfig().length_normalized_features is False and NAMMConfig().outside_spec() == {}
    namm = _keep_all_namm(length_normalized_features=True, sink_tokens=4)
    assert namm.config.outside_spec() == {"sink_tokens": 4, "length_normalized_features": True}
    save_namm(namm, tmp_path / "flag")
    assert load_namm(tmp_path / "flag").config == namm.config
    assert json.loads((tmp_path / "flag" / "config.json").read_text())["namm_config"]["length_normalized_features"]
    # the default is not written (a default NAMM's config.json and results records are what they were before the
    # option existed), and a checkpoint without the key loads as the spec network
    save_namm(_keep_all_namm(), tmp_path / "old")
    record = json.loads((tmp_path / "old" / "config.json").read_text())["namm_config"]
    assert "length_normalized_features" not in record and "length_normalized_features" not in NAMMConfig().to_dict()
    when_set = ("length_normalized_features", "recent_tokens")  # options recorded only away from their default
    assert sorted(record) == sorted(f for f in NAMMConfig.__dataclass_fields__ if f not in when_set)
    old = load_namm(tmp_path / "old")
    assert old.config == NAMMConfig() and old.config.outside_spec() == {}
    assert load_namm("bam.smollm2-135m").config.length_normalized_features is False
