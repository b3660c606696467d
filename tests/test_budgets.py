"""Budgets: how they are written, when they hold (the end of every prompt), and the policies they size (TOVA, the
StreamingLLM's sinks), on the tiny random models of tests/tiny_models.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_engine import _AttentionImplementation
from tiny_models import FAMILIES, VOCAB, tiny_decoder

from namm_transfer.namm import NAMM
from namm_transfer.policies.base import LayerState, RatioBudget, ReplayBudget, TokenBudget, parse_budget
from namm_transfer.policies.baselines import TOVA, StreamingLLM
from namm_transfer.policies.namm_policy import NAMMPolicy
from namm_transfer.registry import create_policy, list_policies
from namm_transfer.session import attach


def _batch(lengths: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, max length), left-padded to the longest."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(0, VOCAB, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, t - n :] = 1
    return ids, mask


def _state(n: int, valid_from: int = 0) -> LayerState:
    """One layer, one sequence, one head of ``n`` slots at positions 0..n-1 (the first ``valid_from`` invalid)."""
    valid = torch.arange(n).view(1, 1, n) >= valid_from
    pos = (torch.arange(n) - valid_from).clamp_min(0).view(1, 1, n)
    seen = torch.tensor([n - valid_from])
    return LayerState(layer=0, valid=valid, position=pos, arrival=torch.arange(n).view(1, 1, n), n_seen=seen)


# ----- how a budget is written ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,want",
    [
        (0.5, RatioBudget(0.5)),
        (1.0, RatioBudget(1.0)),
        ("0.25", RatioBudget(0.25)),
        ("1.0", RatioBudget(1.0)),
        ("50%", RatioBudget(0.5)),
        ("12.5%", RatioBudget(0.125)),
        ("256t", TokenBudget(256)),
        ("1t", TokenBudget(1)),
        ("64tokens", TokenBudget(64)),
        (np.float32(0.5), RatioBudget(0.5)),
        (None, None),
    ],
)
def test_a_budget_is_a_share_or_tokens_with_their_unit(spec, want):
    assert parse_budget(spec) == want
    budget = TokenBudget(3)
    assert parse_budget(budget) is budget


@pytest.mark.parametrize("spec", [1, 256, "1", "256", " 7 ", np.int64(12)])
def test_an_integer_budget_is_refused_with_the_token_form(spec):
    """1 could mean one token or the whole cache: an integer must be written with its unit."""
    n = int(str(spec).strip())
    with pytest.raises(ValueError, match=rf'write "{n}t".*0\.5'):
        parse_budget(spec)


@pytest.mark.parametrize("spec", [0.0, -0.5, 1.5, 2.0, float("nan"), "2.5", "0%", "150%", "-0.5", "lots", "t", True])
def test_a_share_outside_zero_one_or_an_unreadable_budget_is_refused(spec):
    with pytest.raises(ValueError, match=r"share|budget"):
        parse_budget(spec)


def test_attach_refuses_an_integer_budget_and_a_share_of_one_keeps_everything():
    model = tiny_decoder("llama")
    for spec in (1, "1"):
        with pytest.raises(ValueError, match='"1t"'):
            attach(model, "h2o", budget=spec)
    ids, mask = _batch((45, 30))
    with attach(model, "h2o", budget=1.0, update_interval=16, chunk_size=8) as mem:
        mem.prefill(ids, mask)
        stats = mem.stats
        assert stats.update_clock == [16, 32, 45]  # the final update at the prompt's end
        for step, layers in stats.kept_counts.items():
            assert layers == stats.live_counts[step]
        for st in mem.engine.states.values():
            assert st.valid.sum(-1).tolist() == [[45, 45], [30, 30]]
        assert stats.retained_cache() == 1.0


# ----- the budget holds at the end of every prompt --------------------------------------------------------------
def _ratio_policy(name: str, ratio: float):
    if name == "namm":  # the NAMM holding its own top share of scores
        net = NAMM()
        net.set_normalization(torch.zeros(17), torch.ones(17))
        net.set_flat(torch.randn(4172, generator=torch.Generator().manual_seed(3)) * 0.5)
        return NAMMPolicy(net, budget=RatioBudget(ratio))
    return create_policy(name, budget=RatioBudget(ratio))


def _assert_at_ratio(mem, ratio: float, n_seen: list[int]) -> None:
    """Every (sequence, managed layer, KV head) row holds max(1, floor(ratio * n_seen)) live tokens, counted from
    the cache itself (its slot mask, one slot per cached key)."""
    engine = mem.engine
    assert engine.n_seen.tolist() == n_seen
    assert engine.states
    for layer, st in engine.states.items():
        keys, _ = engine.adapter.get_kv(engine.cache, layer)
        assert keys.shape[2] == st.valid.shape[-1]
        want = [[max(1, math.floor(ratio * n))] * st.valid.shape[1] for n in n_seen]
        assert st.valid.sum(-1).tolist() == want, (layer, n_seen)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.5, 0.25])
@pytest.mark.parametrize("name", ["h2o", "l2", "streaming", "random", "tova", "namm"])
def test_every_policy_ends_every_prompt_at_its_ratio_budget(family, ratio, name):
    """The ratio protocol: after a prefill, every policy holds max(1, floor(R * n_seen)) tokens in every layer and
    KV head of every sequence: prompts whose lengths (45 and 30, left-padded; then 11 more tokens each) are not
    multiples of the update interval, so the budget holds only through the update at each prompt's end."""
    model = tiny_decoder(family)
    ids, mask = _batch((45, 30), seed=1)
    more, more_mask = _batch((11, 11), seed=2)
    with attach(model, _ratio_policy(name, ratio), update_interval=16, chunk_size=8) as mem:
        assert mem.engine.config.final_update is True
        mem.prefill(ids, mask)
        _assert_at_ratio(mem, ratio, [45, 30])
        assert mem.stats.update_clock == [16, 32, 45]
        mem.prefill(more, more_mask, reset=False)  # a second prompt of the same sequences
        _assert_at_ratio(mem, ratio, [56, 41])
        assert mem.stats.update_clock == [16, 32, 45, 48, 56]
        mem.prefill(ids[:1, -21:])  # a new sequence
        _assert_at_ratio(mem, ratio, [21])


def test_the_papers_schedule_updates_at_update_steps_only():
    """final_update=False (the threshold protocol's): no update at the prompt's end, so the tokens fed since the
    last update step are all still there; the default resolves per policy."""
    model = tiny_decoder("llama")
    ids, mask = _batch((45, 30), seed=1)
    with attach(model, "h2o", budget=0.5, update_interval=16, chunk_size=8, final_update=False) as mem:
        mem.prefill(ids, mask)
        assert mem.stats.update_clock == [16, 32]
        for st in mem.engine.states.values():  # floor(0.5 * 32) + 13 and floor(0.5 * 17) + 13
            assert st.valid.sum(-1).tolist() == [[29, 29], [21, 21]]
    net = NAMM()
    net.set_normalization(torch.zeros(17), torch.ones(17))
    record = {0: {0: [[4, 4]], 1: [[4, 4]]}}
    resolved = {
        "full": create_policy("full"),
        "namm-threshold": NAMMPolicy(net),
        "replay": create_policy("h2o", budget=ReplayBudget(record)),
        "replay-of-final-updates": create_policy("h2o", budget=ReplayBudget(record, holds_at_prompt_end=True)),
        "h2o-tokens": create_policy("h2o", budget="12t"),
        "namm-ratio": NAMMPolicy(net, budget=0.5),
    }
    want = {
        "full": False,
        "namm-threshold": False,
        "replay": False,
        "replay-of-final-updates": True,
        "h2o-tokens": True,
        "namm-ratio": True,
    }
    for key, policy in resolved.items():
        with attach(model, policy) as mem:
            assert mem.engine.config.final_update is want[key], key
    for explicit in (True, False):
        with attach(model, NAMMPolicy(net), final_update=explicit) as mem:
            assert mem.engine.config.final_update is explicit


def test_a_replay_of_a_run_with_final_updates_makes_them_too():
    """A ratio run updates at the end of its prompt; a replay that says so (``holds_at_prompt_end``) makes the same
    updates and keeps the same counts, in a second prompt too; one that does not stops at the update steps."""
    model = tiny_decoder("llama")
    ids, mask = _batch((45, 30), seed=1)
    more, more_mask = _batch((11, 11), seed=2)

    def run(policy):
        with attach(model, policy, update_interval=16, chunk_size=8) as mem:
            mem.prefill(ids, mask)
            mem.prefill(more, more_mask, reset=False)
            return mem.stats

    recorded = run(create_policy("random", budget=0.25))
    assert recorded.update_clock == [16, 32, 45, 48, 56]
    for name in ("h2o", "l2", "streaming", "random", "tova"):
        stats = run(create_policy(name, budget=ReplayBudget(recorded.kept_counts, holds_at_prompt_end=True)))
        assert stats.update_clock == recorded.update_clock and stats.kept_counts == recorded.kept_counts
    stats = run(create_policy("h2o", budget=ReplayBudget(recorded.kept_counts)))
    assert stats.update_clock == [16, 32, 48]  # update steps only: its third update replays the run's third, at 45
    assert stats.kept_counts[2] == recorded.kept_counts[2] and stats.kept_counts != recorded.kept_counts


# ----- TOVA -------------------------------------------------------------------------------------------------------
def test_tova_is_registered_and_asks_for_the_last_row_only():
    assert "tova" in list_policies()
    policy = create_policy("tova", budget=0.5)
    assert isinstance(policy, TOVA) and policy.needs_attention and policy.observes_last_row
    assert not policy.observes_sums


def test_tova_keeps_the_tokens_the_newest_query_attends_to_most():
    """By hand: the newest query's row over 6 slots (the first one invalid), a 3-token budget: the newest slot (kept
    always) and the two live slots with the highest attention. A padding last query (a row of zeros) leaves the
    row of the newest real query in place."""
    policy = TOVA(budget="3t")
    st = _state(6, valid_from=1)
    policy.init_layer(st)
    row = torch.tensor([[[0.0, 0.10, 0.40, 0.05, 0.30, 0.15]]])
    policy.observe_last_row(st, row)
    assert policy.select(st).tolist() == [[[False, False, True, False, True, True]]]
    policy.observe_last_row(st, torch.zeros(1, 1, 6))  # the last query was padding
    assert policy.select(st).tolist() == [[[False, False, True, False, True, True]]]
    policy.observe_last_row(st, torch.tensor([[[0.0, 0.50, 0.05, 0.20, 0.05, 0.20]]]))
    # 0.50 first, then the tie at 0.20 goes to the newer slot (the newest, kept anyway), then 0.20 at slot 3
    assert policy.select(st).tolist() == [[[False, True, False, True, False, True]]]
    rows = torch.zeros(1, 1, 3, 6)
    rows[..., -1, :] = row  # handed every row of a chunk: the last query's counts
    policy.observe(st, rows)
    assert policy.select(st).tolist() == [[[False, False, True, False, True, True]]]


@pytest.mark.parametrize("family", FAMILIES)
def test_tova_row_is_the_models_attention_of_the_last_query(family):
    """End to end: the row the engine hands TOVA after a prefill equals the unmodified model's attention (eager) of
    the prompt's last query, averaged over the query heads of each KV head, over the real tokens; the engine
    computes only that row (one call per chunk and managed layer, never per-query rows or the explicit attention);
    after evictions while decoding, the row covers the live slots only."""
    model = tiny_decoder(family)
    t = 37
    ids, mask = _batch((t, 25), seed=4)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad(), _AttentionImplementation(model, "eager"):
        att = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True).attentions

    class Counting(TOVA):
        def observe_last_row(self, state, row):
            self.calls[state.layer] = self.calls.get(state.layer, 0) + 1
            super().observe_last_row(state, row)

    policy = Counting(budget=0.5)
    policy.calls = {}
    with attach(model, policy, update_interval=64, chunk_size=8) as mem:
        explicit = []
        mem.engine._attend_with_rows = lambda *a, **k: explicit.append(1)
        mem.prefill(ids, mask)
        assert not explicit and mem.stats.update_clock == [t]  # the final update, after the row was taken
        assert policy.calls == dict.fromkeys(mem.engine.states, 5)  # 37 tokens in chunks of 8
        for layer, st in mem.engine.states.items():
            b, hq = att[layer].shape[:2]
            h = st.valid.shape[1]
            want = att[layer][:, :, -1].reshape(b, h, hq // h, t).double().mean(2)  # (B, H, T)
            got = st.tokens["tova_row"].double()
            for bi in range(b):
                kept = st.position[bi][st.valid[bi]].view(h, -1)  # positions of the kept slots, per head
                real = torch.nonzero(mask[bi]).flatten()  # the column of each real position
                for hi in range(h):
                    torch.testing.assert_close(
                        got[bi, hi][st.valid[bi, hi]], want[bi, hi, real[kept[hi]]], atol=1e-6, rtol=0
                    )
        tok = ids[:, -1:]
        for _ in range(30):  # past the update at clock 64
            tok = mem.step(tok)[:, -1].argmax(-1, keepdim=True)
        assert mem.stats.update_clock == [t, 64] and not explicit
        for st in mem.engine.states.values():
            row = st.tokens["tova_row"]
            assert (row[~st.valid] == 0).all()
            torch.testing.assert_close(row.sum(-1), torch.ones_like(row.sum(-1)), atol=1e-5, rtol=0)


# ----- StreamingLLM's sinks ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "budget,want", [("1t", [9]), ("3t", [0, 1, 9]), ("4t", [0, 1, 2, 9]), ("6t", [0, 1, 2, 3, 8, 9])]
)
def test_streaming_keeps_the_first_sinks_when_the_budget_is_below_their_count(budget, want):
    """Sinks rank first and among themselves the first first: a budget below the sink count keeps positions 0, 1,
    ... (and the newest token, which the engine always keeps); a larger one the sinks and the most recent."""
    policy = StreamingLLM(budget=budget, sinks=4)
    st = _state(10)
    keep = policy.select(st)
    assert st.position[keep].tolist() == want


def test_streaming_sinks_through_the_engine():
    """Through attach: a 3-token budget with 4 sinks keeps positions 0, 1 and the newest at every update."""
    model = tiny_decoder("llama")
    ids, mask = _batch((30, 21), seed=3)
    with attach(model, "streaming", budget="3t", sinks=4, update_interval=8, chunk_size=8, record_kept=True) as mem:
        mem.prefill(ids, mask)
        stats = mem.stats
    assert stats.update_clock == [8, 16, 24, 30]
    for step, layers in stats.kept_positions.items():
        for per_seq in layers.values():
            for b, per_head in enumerate(per_seq):
                newest = stats.update_n_seen[step][b] - 1
                if newest < 0:
                    assert all(len(p) == 0 for p in per_head)  # nothing seen yet (left padding)
                    continue
                want = sorted({0, 1, newest}) if newest >= 2 else list(range(newest + 1))
                assert all(p.tolist() == want for p in per_head), (step, b)
