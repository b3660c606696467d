"""Eviction engine on tiny random models of every supported family (the issue's must-show list)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, VOCAB, tiny_decoder

from namm_transfer.namm import NAMM
from namm_transfer.policies.base import LayerState, MemoryPolicy, ReplayBudget
from namm_transfer.policies.namm_policy import NAMMPolicy
from namm_transfer.registry import create_policy
from namm_transfer.session import attach

BUDGETED = ["streaming", "h2o", "l2", "random", "tova"]
"""The registered budgeted baselines."""


def _batch(b=2, t=40, pad=(0, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i, p in enumerate(pad[:b]):
        mask[i, :p] = 0
    return ids, mask


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_decoder(request.param)


# ----- keep everything == unmodified model -------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_keep_everything_matches_unmodified_model(model, batch):
    ids, mask = _batch(batch, 40, pad=(0, 7, 13))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        gen_ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with attach(model, "full", update_interval=16, chunk_size=8) as mem:
        logits = mem.prefill(ids, mask, logits_to_keep=26)
        for b in range(batch):
            real = mask[b].bool()
            real[: 40 - 26] = False
            got = logits[b][real[-26:]]
            torch.testing.assert_close(got, ref[b][real], atol=1e-5, rtol=0)
        gen = mem.generate(ids, mask, max_new_tokens=12, pad_token_id=0)  # stops at the model's EOS, as HF does
        assert torch.equal(gen, gen_ref)
        assert mem.stats.retained_cache() == 1.0
        # the decoding steps' logits too: the reference's tokens fed one at a time after the prompt
        mem.prefill(ids, mask)
        steps = torch.stack([mem.step(gen_ref[:, i : i + 1])[:, -1] for i in range(40, 51)], 1)
    full_mask = torch.cat([mask, torch.ones(batch, 11, dtype=mask.dtype)], 1)
    with torch.no_grad():
        ref_steps = model(
            input_ids=gen_ref[:, :51], attention_mask=full_mask, position_ids=(full_mask.cumsum(1) - 1).clamp_min(0)
        ).logits[:, 40:51]
    torch.testing.assert_close(steps, ref_steps, atol=1e-5, rtol=0)


def test_generate_stops_at_the_models_eos_by_default():
    """As ``model.generate``: without ``eos_token_id`` the model's generation config decides where a sequence ends
    (then it is padded); ``eos_token_id=[]`` decodes every token asked for."""
    model = tiny_decoder("llama")
    ids, mask = _batch(2, 24, pad=(0, 5), seed=5)
    with attach(model, "full", update_interval=16, chunk_size=8) as mem:
        free = mem.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    assert free.shape[1] == 30
    stop = int(free[0, 25])  # sequence 0's second new token
    saved = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = stop, 0
    try:
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        with attach(model, "full", update_interval=16, chunk_size=8) as mem:
            out = mem.generate(ids, mask, max_new_tokens=6)
    finally:
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = saved
    first = int((free[0, 24:] == stop).nonzero()[0])
    assert out[0, 24 + first] == stop and (out[0, 25 + first :] == 0).all()
    assert torch.equal(out[:, : ref.shape[1]], ref) and (out[:, ref.shape[1] :] == 0).all()


# ----- eviction == masking the evicted tokens out of attention --------------------------------------------
class Scripted(MemoryPolicy):
    """Evict fixed positions per sequence at the first update (all layers and heads)."""

    name = "scripted"

    def __init__(self, evict: dict[int, set[int]]):
        super().__init__()
        self.evict = evict

    def select(self, state: LayerState) -> torch.Tensor:
        keep = state.valid.clone()
        if state.step == 0:
            for b, positions in self.evict.items():
                for p in positions:
                    keep[b] &= state.position[b] != p
        return keep


def _reference_masked(model, ids, mask, evict, t_evict):
    """Unmodified model over the whole sequence; evicted keys are invisible to queries at clock >= t_evict."""
    b, t = ids.shape
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    allowed = torch.ones(t, t, dtype=torch.bool).tril().expand(b, t, t).clone()
    allowed &= mask.bool()[:, None, :]
    for bi, positions in evict.items():
        for p in positions:
            key = int(((pos[bi] == p) & mask[bi].bool()).nonzero()[0])
            allowed[bi, t_evict:, key] = False
    eye = torch.eye(t, dtype=torch.bool).expand(b, t, t)

    def finite(a):
        return a | (eye & ~a.any(-1, keepdim=True))  # padding queries see themselves (finite values)

    attn_mask = finite(allowed)[:, None]
    window = getattr(model.config, "sliding_window", None)
    if "sliding_attention" in (getattr(model.config, "layer_types", None) or []):
        # sliding layers are not managed: plain sliding-window causal mask over the padded clock
        idx = torch.arange(t)
        sliding = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - window)
        sliding = sliding.expand(b, t, t) & mask.bool()[:, None, :]
        attn_mask = {"full_attention": attn_mask, "sliding_attention": finite(sliding)[:, None]}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attn_mask, position_ids=pos).logits


def test_eviction_equals_masked_reference(model):
    ids, mask = _batch(2, 24, pad=(0, 5), seed=1)
    evict = {0: {0, 3, 4, 9}, 1: {1, 2, 7}}  # different sets per sequence
    with attach(model, Scripted(evict), update_interval=16, chunk_size=8) as mem:
        tail = mem.prefill(ids, mask, logits_to_keep=8)  # chunk 16..23 runs after the eviction at 16
        steps = [tail]
        toks = [tail[:, -1].argmax(-1, keepdim=True)]
        for _ in range(5):
            steps.append(mem.step(toks[-1]))
            toks.append(steps[-1][:, -1].argmax(-1, keepdim=True))
        kept = mem.stats.kept_counts[0]
    for layer in kept:  # at clock 16: sequence 0 saw 16 real tokens (evicts 4), sequence 1 saw 11 (evicts 3)
        assert kept[layer] == [[12, 12], [8, 8]]
    full_ids = torch.cat([ids, *toks[:-1]], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 5, dtype=torch.long)], dim=1)
    ref = _reference_masked(model, full_ids, full_mask, evict, t_evict=16)
    got = torch.cat(steps, dim=1)  # positions 16 .. 28
    torch.testing.assert_close(got, ref[:, 16:], atol=1e-5, rtol=0)


class _AttentionImplementation:
    """Run ``model`` with another registered attention implementation inside the block (every sub-config)."""

    def __init__(self, model, name):
        self.configs = [
            m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")
        ]
        self.name = name

    def __enter__(self):
        self.before = [c._attn_implementation for c in self.configs]
        for c in self.configs:
            c._attn_implementation = self.name

    def __exit__(self, *exc):
        for c, impl in zip(self.configs, self.before, strict=True):
            c._attn_implementation = impl


class RandomPerHead(MemoryPolicy):
    """Keep each live slot of each (sequence, KV head) with probability 0.6 at every update."""

    name = "random-per-head"

    def __init__(self):
        super().__init__()
        self.g = torch.Generator().manual_seed(1)

    def select(self, state: LayerState) -> torch.Tensor:
        return state.valid & (torch.rand(state.valid.shape, generator=self.g) < 0.6)


@pytest.mark.parametrize("kind", ["random-per-head", "namm", "h2o-50", "random-50", "tova-50"])
def test_evictions_per_head_over_several_updates_equal_masked_reference(model, kind):
    """Six updates of evictions that differ per sequence and per KV head (one sequence all padding at the first,
    the last while decoding): every logit equals the unmodified model's with each layer's and head's evicted tokens
    masked out from the clock of their eviction on (rebuilt from ``record_kept``). With a budget every layer keeps
    the same number of slots (other slots per layer and head), so the engine compacts the layers together, and
    holds its budget at the end of the prompt (the default final update at clock 45, between two update steps)."""
    from transformers import AttentionInterface

    t, new, interval = 45, 6, 8
    ids, mask = _batch(2, t, pad=(0, 20), seed=0)
    if kind == "namm":
        net = NAMM()
        net.set_normalization(torch.zeros(17), torch.ones(17))
        net.set_flat(torch.randn(4172, generator=torch.Generator().manual_seed(3)) * 0.5)
        policy = NAMMPolicy(net)
    elif kind.endswith("-50"):
        policy = create_policy(kind[: -len("-50")], budget=0.5)
    else:
        policy = RandomPerHead()
    with attach(model, policy, update_interval=interval, chunk_size=interval, record_kept=True) as mem:
        steps = [mem.prefill(ids, mask)[:, -1]]
        for _ in range(new):
            steps.append(mem.step(steps[-1].argmax(-1)[:, None])[:, -1])
        stats = mem.stats
    # the budgeted kinds update once more when the 45-token prompt ends (attach's default final_update); the
    # unbudgeted ones (a NAMM's threshold, a scripted policy) at the update steps only, the paper's schedule
    final = [45] if kind.endswith("-50") else []
    assert stats.update_clock == [8, 16, 24, 32, 40, *final, 48] and stats.retained_cache() < 0.9
    if kind == "random-50" and len(stats.managed_layers) > 1:  # the layers keep other slots: not a trivial group
        first, second = stats.managed_layers[:2]
        assert any(
            not np.array_equal(a, b)
            for u in stats.kept_positions
            for seq_a, seq_b in zip(stats.kept_positions[u][first], stats.kept_positions[u][second], strict=True)
            for a, b in zip(seq_a, seq_b, strict=True)
        )
    full_ids = torch.cat([ids, torch.stack([x.argmax(-1) for x in steps[:-1]], 1)], 1)
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=torch.long)], 1)
    n = full_ids.shape[1]
    pos = (full_mask.cumsum(1) - 1).clamp_min(0)
    cfg = model.config
    hq, h = cfg.num_attention_heads, cfg.num_key_value_heads
    eye = torch.eye(n, dtype=torch.bool)

    def finite(a):
        return a | (eye & ~a.any(-1, keepdim=True))  # padding queries see themselves (finite values)

    base = torch.ones(n, n, dtype=torch.bool).tril().expand(2, n, n) & full_mask.bool()[:, None, :]
    masks = {}
    for layer in stats.managed_layers:
        m = base[:, None].expand(2, h, n, n).clone()
        for u, clock in enumerate(stats.update_clock):
            for b in range(2):
                for hh in range(h):
                    kept = set(stats.kept_positions[u][layer][b][hh].tolist())
                    for j in range(clock):
                        if full_mask[b, j] and int(pos[b, j]) not in kept:
                            m[b, hh, clock:, j] = False
        masks[layer] = finite(m).repeat_interleave(hq // h, dim=1)
    other = finite(base)[:, None]
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or []):  # unmanaged: the model's own window
        idx = torch.arange(n)
        window = (idx[None, :] <= idx[:, None]) & (idx[None, :] > idx[:, None] - cfg.sliding_window)
        other = finite(window.expand(2, n, n) & full_mask.bool()[:, None, :])[:, None]

    def masked(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
        am = masks.get(module.layer_idx, other)
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=am, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("namm-test-masked", masked)
    with torch.no_grad(), _AttentionImplementation(model, "namm-test-masked"):
        ref = model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits
    torch.testing.assert_close(torch.stack(steps, 1), ref[:, t - 1 :], atol=1e-5, rtol=0)


def test_namm_state_equals_the_spec_formula_on_the_models_own_attention(model):
    """End to end: the spectrogram EMA the engine stores for every managed layer, KV head and token equals
    namm-spec.md's formula (float64) applied to the unmodified model's attention (eager, averaged over the query
    heads of each KV head; padding rows and columns zero), with left padding and chunks smaller than the update
    interval."""
    from test_features import direct_ema

    t, interval = 96, 32
    ids, mask = _batch(2, t, pad=(0, 5), seed=0)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad(), _AttentionImplementation(model, "eager"):
        attentions = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True).attentions
    net = NAMM()  # all-zero weights: every score is 0 >= threshold, nothing is evicted
    net.set_normalization(torch.zeros(17), torch.ones(17))
    with attach(model, NAMMPolicy(net), update_interval=interval, chunk_size=8) as mem:
        mem.prefill(ids, mask)
        states = mem.engine.states
        assert states
        for layer, st in states.items():
            b, hq = attentions[layer].shape[:2]
            h = st.valid.shape[1]
            att = attentions[layer].view(b, h, hq // h, t, t).double().mean(2)
            for bi in range(b):
                real = mask[bi].bool()
                for hi in range(h):
                    cols = att[bi, hi] * real.view(t, 1) * real.view(1, t)
                    want = direct_ema(cols, torch.arange(t), interval)[-1][real]
                    got = st.tokens["namm_ema"][bi, hi][st.valid[bi, hi]].double()
                    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


class ScriptedWithRows(Scripted):
    """The same evictions, but asking for attention rows: the engine takes its explicit, tiled path."""

    name = "scripted-rows"
    needs_attention = True

    def init_layer(self, state: LayerState) -> None:
        self.row_sums: dict[int, list[torch.Tensor]] = {}

    def observe(self, state: LayerState, rows: torch.Tensor) -> None:
        assert torch.isfinite(rows).all()
        self.row_sums.setdefault(state.layer, []).append(rows.sum(-1))  # each real query's row sums to 1


@pytest.mark.parametrize("tile_bytes", [1, 1 << 30], ids=["16-query-tiles", "one-tile"])
def test_eviction_equals_masked_reference_on_the_explicit_attention_path(model, tile_bytes):
    """The explicit float32 attention (policies that read rows), split into query tiles or not, computes the
    same attention as the unmodified model with the evicted tokens masked out, and hands over one row per
    query that sums to 1 (0 for padding queries)."""
    ids, mask = _batch(2, 64, pad=(0, 5), seed=1)
    evict = {0: {0, 3, 4, 9, 20}, 1: {1, 2, 7, 25}}
    policy = ScriptedWithRows(evict)
    with attach(model, policy, update_interval=32, chunk_size=32) as mem:
        mem.engine.tile_bytes = tile_bytes
        tail = mem.prefill(ids, mask, logits_to_keep=32)  # the second chunk runs after the eviction at 32
        steps = [tail]
        toks = [tail[:, -1].argmax(-1, keepdim=True)]
        for _ in range(3):
            steps.append(mem.step(toks[-1]))
            toks.append(steps[-1][:, -1].argmax(-1, keepdim=True))
    full_ids = torch.cat([ids, *toks[:-1]], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    ref = _reference_masked(model, full_ids, full_mask, evict, t_evict=32)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref[:, 32:], atol=1e-5, rtol=0)
    for layer, sums in policy.row_sums.items():
        if layer not in mem.engine.states:
            continue
        got = torch.cat(sums, dim=-1)  # (B, H, queries fed)
        want = full_mask[:, None, :].float().expand_as(got)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["h2o", "namm"])
def test_query_tiles_give_the_same_policy_state(name):
    """Rows handed over in 16-query tiles fold into the same H2O scores / NAMM spectrogram EMA, and the same
    tokens are kept, as rows handed over a chunk at a time."""
    model = tiny_decoder("llama")
    ids, mask = _batch(2, 96, pad=(0, 9), seed=4)
    results = []
    for tile_bytes in (1, 1 << 30):
        policy = NAMMPolicy(_namm(torch.randn(4172, generator=torch.Generator().manual_seed(3)) * 0.1), budget=0.5)
        if name == "h2o":
            policy = create_policy("h2o", budget=0.5)
        with attach(model, policy, update_interval=32, chunk_size=32) as mem:
            mem.engine.tile_bytes = tile_bytes
            logits = mem.prefill(ids, mask, logits_to_keep=4)
            state = {k: v.clone() for st in mem.engine.states.values() for k, v in st.tokens.items()}
            results.append(
                (logits, state, mem.stats.kept_counts, [st.position.clone() for st in mem.engine.states.values()])
            )
    (l1, s1, k1, p1), (l2, s2, k2, p2) = results
    assert k1 == k2
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)
    assert s1.keys() == s2.keys()
    for key in s1:
        torch.testing.assert_close(s1[key], s2[key], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tile_bytes", [1, 1 << 30], ids=["16-query-tiles", "one-tile"])
def test_h2o_column_sums_equal_its_rows(tile_bytes):
    """H2O asks for column sums (observes_sums): the engine sums each chunk's attention over queries and query
    heads itself. The accumulated scores, the tokens kept and the logits equal those of the same policy fed
    per-query rows, through padding (the first chunk's padding queries, which see nothing, take the general
    path; padding queries of a later chunk, which see the cache, the tiled one), several chunks, query tiles
    and decoding."""
    from namm_transfer.policies.baselines import H2O

    class H2OFromRows(H2O):
        observes_sums = False

    model = tiny_decoder("llama")
    ids, mask = _batch(2, 96, pad=(0, 9), seed=5)
    more, more_mask = _batch(2, 24, pad=(0, 0), seed=6)
    more_mask[1, 3:10] = 0  # padding queries inside a later chunk: they see the cache, and must weigh 0
    results = []
    for policy in (H2O(budget=0.5), H2OFromRows(budget=0.5)):
        with attach(model, policy, update_interval=32, chunk_size=32) as mem:
            mem.engine.tile_bytes = tile_bytes
            logits = [mem.prefill(ids, mask, logits_to_keep=4)]
            logits.append(mem.prefill(more, more_mask, logits_to_keep=4, reset=False))
            tok = logits[-1][:, -1].argmax(-1, keepdim=True)
            for _ in range(40):  # past the next update (clock 128)
                logits.append(mem.step(tok))
                tok = logits[-1][:, -1].argmax(-1, keepdim=True)
            acc = [st.tokens["h2o_acc"].clone() for st in mem.engine.states.values()]
            pos = [st.position.clone() for st in mem.engine.states.values()]
            results.append((torch.cat(logits, 1), acc, pos, mem.stats.kept_counts))
    (l1, a1, p1, k1), (l2, a2, p2, k2) = results
    assert k1 == k2 and len(k1) >= 4
    assert any(c < 64 for step in k1.values() for layer in step.values() for row in layer for c in row)  # evicted
    for x, y in zip(p1, p2, strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a1, a2, strict=True):
        assert x.abs().max() > 1.0
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)


def test_a_subclass_that_overrides_observe_alone_gets_rows():
    """A subclass of H2O that overrides observe (to read rows) but not observe_sums is handed rows, not sums;
    it keeps what H2O keeps."""
    from namm_transfer.policies.baselines import H2O

    class RowReader(H2O):
        def observe(self, state, rows):
            self.shapes = getattr(self, "shapes", set()) | {rows.ndim}
            super().observe(state, rows)

    class ExplicitSums(RowReader):
        observes_sums = True

    assert H2O.observes_sums and not RowReader.observes_sums and ExplicitSums.observes_sums
    model = tiny_decoder("llama")
    ids, mask = _batch(2, 64, pad=(0, 5), seed=7)
    kept = []
    for policy in (H2O(budget=0.5), RowReader(budget=0.5)):
        with attach(model, policy, update_interval=32, chunk_size=32) as mem:
            mem.prefill(ids, mask)
            kept.append([st.position.clone() for st in mem.engine.states.values()])
    assert policy.shapes == {4}  # (B, H, Q, S) rows, every call
    for a, b in zip(*kept, strict=True):
        assert torch.equal(a, b)


class KeepsRows(ScriptedWithRows):
    """Keeps the very row tensors it is handed (no copy), and a copy of each to compare with later."""

    def init_layer(self, state: LayerState) -> None:
        super().init_layer(state)
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.shared_checked = 0

    def observe(self, state: LayerState, rows: torch.Tensor) -> None:
        super().observe(state, rows)
        scratch = self.engine.scratch.buffer
        if scratch is not None:  # not a view of the engine's scratch buffer
            assert rows.untyped_storage().data_ptr() != scratch.untyped_storage().data_ptr()
            self.shared_checked += 1
        self.kept.append((rows, rows.clone()))


def test_scratch_buffer_is_reused_and_rows_handed_over_stay_intact():
    """On the CPU the explicit attention writes scores and output tiles into one scratch buffer reused by every
    tile, layer and chunk (grown by half at least when a larger tile needs it); the rows a policy is handed are
    tensors of their own, so a policy that keeps them (a NAMM keeps its last rows) never sees them overwritten by
    a later tile."""
    model = tiny_decoder("llama")
    ids, mask = _batch(2, 64, pad=(0, 5), seed=2)
    policy = KeepsRows({0: {1, 5}, 1: {2}})
    with attach(model, policy, update_interval=32, chunk_size=16) as mem:
        engine = mem.engine
        engine.tile_bytes = 1  # 16-query tiles: several tiles per chunk
        policy.engine = engine
        buffers = set()
        calls = []
        original = engine.scratch.get

        def recording(numel, dtype, device):
            buf = original(numel, dtype, device)
            buffers.add(buf.data_ptr())
            calls.append(numel)
            return buf

        engine.scratch.get = recording
        mem.prefill(ids, mask, logits_to_keep=1)
        for _ in range(8):
            mem.step(ids[:, :1])
        assert engine.scratch.buffer is not None
    assert engine.scratch.buffer is None  # released on detach
    assert len(calls) >= 10 * len(engine.states) and len(buffers) <= 4
    assert len(policy.kept) >= len(calls) and policy.shared_checked >= len(calls)
    for rows, copy in policy.kept:  # nothing a later tile wrote reached the rows kept
        assert torch.equal(rows, copy)


class RecordsRows(Scripted):
    """The scripted evictions, recording every call of observe: (layer, rows)."""

    name = "records-rows"
    needs_attention = True

    def init_layer(self, state: LayerState) -> None:
        self.calls: list[tuple[int, torch.Tensor]] = []

    def observe(self, state: LayerState, rows: torch.Tensor) -> None:
        if not hasattr(self, "calls"):
            self.calls = []
        self.calls.append((state.layer, rows.clone()))


def test_rows_of_consecutive_tiles_are_handed_over_together():
    """``rows_bytes`` gathers the rows of consecutive query tiles into one call of observe (whole tiles, queries in
    order, never past the chunk): per layer and chunk, the rows concatenated over calls are the same whether each
    16-query tile is its own call, two tiles go together, or the whole chunk does, with padding and evictions.
    (The first chunk, where left padding leaves queries that see nothing, takes the general path: one call.)"""
    model = tiny_decoder("llama")
    b, kv = 2, model.config.num_key_value_heads
    ids, mask = _batch(b, 96, pad=(0, 5), seed=4)
    evict = {0: {1, 5, 30}, 1: {2, 40}}
    seen = {}
    for name, rows_bytes in (("tile", 1), ("two-tiles", 4 * b * kv * 96 * 32), ("chunk", 1 << 30)):
        policy = RecordsRows(evict)
        with attach(model, policy, update_interval=48, chunk_size=48) as mem:
            mem.engine.tile_bytes = 1  # 16-query tiles
            mem.engine.rows_bytes = rows_bytes  # two-tiles: 32 queries of the second chunk's ~96 slots, not 48
            mem.prefill(ids, mask)
            for _ in range(3):
                mem.step(ids[:, :1])
        layer = policy.calls[0][0]
        seen[name] = [r for lay, r in policy.calls if lay == layer]
    sizes = {name: [r.shape[2] for r in calls] for name, calls in seen.items()}
    assert sizes == {
        "tile": [48, 16, 16, 16, 1, 1, 1],
        "two-tiles": [48, 32, 16, 1, 1, 1],
        "chunk": [48, 48, 1, 1, 1],
    }

    def by_slots(calls):  # the calls of one chunk see the same slots
        out = {}
        for r in calls:
            out.setdefault(r.shape[-1], []).append(r)
        return {k: torch.cat(v, 2) for k, v in out.items()}

    reference = by_slots(seen["tile"])
    assert any(r[..., 0, :].sum() > 0 for r in reference.values())
    for name in ("two-tiles", "chunk"):
        got = by_slots(seen[name])
        assert got.keys() == reference.keys()
        for k in got:
            assert torch.equal(got[k], reference[k])


@pytest.mark.parametrize("tile_bytes", [1, None], ids=["16-query-tiles", "one-tile"])
def test_explicit_attention_carries_gradients(tile_bytes):
    """Fed through the engine with autograd on (not the session, which runs without it), a policy that reads
    attention rows and keeps everything gives the unmodified model's logits and parameter gradients: the explicit
    attention path leaves its in-place shortcuts (scratch buffers, products written into the output) to autograd-
    free runs."""
    model = tiny_decoder("llama")
    ids, _ = _batch(1, 48, pad=(0,), seed=8)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        ref = model(input_ids=ids).logits
        ref_grads = torch.autograd.grad(ref.square().mean(), params)
        with attach(model, create_policy("h2o", budget=1.0), update_interval=64, chunk_size=24) as mem:
            mem.engine.tile_bytes = tile_bytes
            mem.engine.reset(1)
            logits = torch.cat([mem.engine.forward_chunk(ids[:, i : i + 24], logits_to_keep=24) for i in (0, 24)], 1)
            grads = torch.autograd.grad(logits.square().mean(), params)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_explicit_attention_in_bfloat16_agrees_with_the_fused_path():
    """A bfloat16 model (value tensors not float32: the output tile is not written into the float32 scratch) gets
    the same logits through the explicit path as through SDPA, up to bfloat16 rounding."""
    model = tiny_decoder("llama").to(torch.bfloat16)
    ids, mask = _batch(2, 48, pad=(0, 5), seed=3)
    evict = {0: {0, 3, 4, 9}, 1: {1, 2, 7}}
    outs = []
    for policy in (Scripted(evict), ScriptedWithRows(evict)):
        with attach(model, policy, update_interval=16, chunk_size=16) as mem:
            mem.engine.tile_bytes = 1
            outs.append(mem.prefill(ids, mask, logits_to_keep=32).float())
    scale = float(outs[0].abs().max())
    assert scale > 0.1
    # bfloat16 keeps 8 bits of mantissa; two kernels' roundings, accumulated over the layers, differ by a few units
    # of the logits' last place (2^-8 of their scale, about 0.01 here)
    torch.testing.assert_close(outs[1], outs[0], atol=0.025 * scale, rtol=3e-2)


# ----- the engine's cache: appends in place -------------------------------------------------------------------
def test_engine_cache_appends_in_place_and_matches_a_dynamic_cache(model):
    """Managed layers use a cache layer that writes new tokens into spare capacity (no copy of the whole layer
    per token); sliding-window layers stay as transformers builds them; what it holds equals a DynamicCache."""
    import inspect

    from namm_transfer.adapters.hf_attention import _growing_layer_class
    from transformers import DynamicCache

    ids, mask = _batch(1, 40, pad=(0,), seed=2)
    with attach(model, "full", update_interval=16, chunk_size=8) as mem:
        mem.prefill(ids, mask)
        cache = mem.engine.cache
        for i, lyr in enumerate(cache.layers):
            assert isinstance(lyr, _growing_layer_class()) == (i in mem.engine.states)
        managed = next(iter(mem.engine.states))
        lyr = cache.layers[managed]
        before = lyr.keys.data_ptr()
        grew = 0
        for _ in range(6):
            cap = lyr.capacity()
            mem.step(ids[:, :1])
            assert lyr.keys.shape[-2] == 40 + _ + 1
            grew += lyr.capacity() != cap
            assert lyr.keys.data_ptr() == before or lyr.capacity() != cap  # same buffer unless it had to grow
            before = lyr.keys.data_ptr()
        assert grew <= 1
        keys, values = lyr.keys.clone(), lyr.values.clone()
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model(input_ids=torch.cat([ids, ids[:, :1].repeat(1, 6)], 1), **{kw: ref}, use_cache=True)
    torch.testing.assert_close(keys, ref.layers[managed].keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(values, ref.layers[managed].values, atol=1e-5, rtol=0)


def test_growing_cache_layer_behaves_like_a_dynamic_layer():
    from namm_transfer.adapters.hf_attention import _growing_layer_class
    from transformers.cache_utils import DynamicLayer

    grow, plain = _growing_layer_class()(), DynamicLayer()
    g = torch.Generator().manual_seed(0)
    for q in (5, 1, 1, 7, 1):
        k, v = torch.randn(2, 3, q, 4, generator=g), torch.randn(2, 3, q, 4, generator=g)
        a, b = grow.update(k, v), plain.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert grow.get_seq_length() == plain.get_seq_length() == 15
    assert grow.capacity() >= 15
    # assignment (the engine's compaction) writes into the same buffer when it fits
    ptr = grow.keys.data_ptr()
    grow.keys, grow.values = grow.keys[:, :, ::2].clone(), grow.values[:, :, ::2].clone()
    plain.keys, plain.values = plain.keys[:, :, ::2].clone(), plain.values[:, :, ::2].clone()
    assert grow.keys.data_ptr() == ptr and torch.equal(grow.keys, plain.keys) and torch.equal(grow.values, plain.values)
    for layer in (grow, plain):
        layer.crop(-2)
        layer.batch_repeat_interleave(2)
    assert torch.equal(grow.keys, plain.keys) and torch.equal(grow.values, plain.values)
    k, v = torch.randn(4, 3, 2, 4, generator=g), torch.randn(4, 3, 2, 4, generator=g)
    a, b = grow.update(k, v), plain.update(k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    grow.reset()
    plain.reset()  # transformers >= 5.18 drops the tensors; 5.17 zeroes them in place
    assert grow.get_seq_length() == plain.get_seq_length() and grow.is_initialized == plain.is_initialized
    if plain.is_initialized:
        assert torch.equal(grow.keys, plain.keys) and torch.equal(grow.values, plain.values)


# ----- NAMM as a policy ------------------------------------------------------------------------------------
def _namm(flat=None):
    net = NAMM()
    net.set_normalization(torch.zeros(17), torch.ones(17))
    if flat is not None:
        net.set_flat(flat)
    return net


def oldest_token_vector(oldest_age: int) -> torch.Tensor:
    """Score = cos(age / f) - cos((oldest_age - 0.5) / f), f = 50000**(3/4): negative only for age >= oldest_age."""
    net = NAMM()
    p = net.unflatten(torch.zeros(4172))
    f = 50000 ** (3 / 4)
    p["w_out"][7] = 1.0  # the cos of the slowest recency frequency (monotone decreasing in age here)
    p["b_out"][0] = -torch.cos(torch.tensor((oldest_age - 0.5) / f, dtype=torch.float64)).item()
    return torch.cat([t.reshape(-1) for t in p.values()])


def test_zero_namm_evicts_nothing(model):
    ids, mask = _batch(2, 40, pad=(0, 6))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    with attach(model, NAMMPolicy(_namm()), update_interval=16, chunk_size=8) as mem:
        logits = mem.prefill(ids, mask)
        assert mem.stats.retained_cache() == 1.0
        assert len(mem.stats.kept_counts) == 2
    torch.testing.assert_close(logits[:, -1], ref, atol=1e-5, rtol=0)


def test_namm_vector_evicts_exactly_the_oldest_token(model):
    ids, _ = _batch(1, 16)
    policy = NAMMPolicy(_namm(oldest_token_vector(15)))
    with attach(model, policy, update_interval=16, chunk_size=16, record_kept=True) as mem:
        mem.prefill(ids)
        kept = mem.stats.kept_positions[0]
    for layer in mem.stats.managed_layers:
        for head_positions in kept[layer][0]:
            assert head_positions.tolist() == list(range(1, 16))


def _assert_namm_keeps(model, net, budget, expect, label):
    """Prefill 16 tokens with ``net`` as the policy (one update); every layer and head keeps exactly ``expect``."""
    ids, _ = _batch(1, 16)
    with attach(model, NAMMPolicy(net, budget=budget), update_interval=16, chunk_size=16, record_kept=True) as mem:
        mem.prefill(ids)
        kept = mem.stats.kept_positions[0]
    for layer in mem.stats.managed_layers:
        for head_positions in kept[layer][0]:
            assert head_positions.tolist() == list(expect), label


def test_sink_tokens_are_kept_whatever_the_score(model):
    """NAMMConfig.sink_tokens: the first positions survive a vector that scores them (the oldest) negative, in
    threshold mode and with a token budget; 0 (the spec) evicts them."""
    from dataclasses import replace

    for sinks, budget, expect in ((0, None, range(2, 16)), (2, None, range(16)), (1, "8t", [0, *range(9, 16)])):
        net = _namm(oldest_token_vector(14))  # negative for ages >= 14: positions 0 and 1 of 16
        net.config = replace(net.config, sink_tokens=sinks)
        _assert_namm_keeps(model, net, budget, expect, (sinks, budget))
    with pytest.raises(ValueError, match="sink_tokens"):
        replace(NAMM().config, sink_tokens=-1)


def newest_tokens_vector(youngest_age: int) -> torch.Tensor:
    """Score = cos((youngest_age - 0.5) / f) - cos(age / f): negative only for age < youngest_age (the newest)."""
    net = NAMM()
    p = net.unflatten(torch.zeros(4172))
    f = 50000 ** (3 / 4)
    p["w_out"][7] = -1.0
    p["b_out"][0] = torch.cos(torch.tensor((youngest_age - 0.5) / f, dtype=torch.float64)).item()
    return torch.cat([t.reshape(-1) for t in p.values()])


def test_recent_tokens_are_kept_whatever_the_score(model):
    """NAMMConfig.recent_tokens: the newest positions survive a vector that scores them negative, in threshold mode
    and with a token budget; 0 (the spec) protects the newest token only."""
    from dataclasses import replace

    cases = ((0, None, [*range(12), 15]), (3, None, [*range(12), 13, 14, 15]), (2, "8t", [*range(6), 14, 15]))
    for recent, budget, expect in cases:
        net = _namm(newest_tokens_vector(4))  # negative for ages < 4: positions 12..15 of 16
        net.config = replace(net.config, recent_tokens=recent)
        _assert_namm_keeps(model, net, budget, expect, (recent, budget))
    assert replace(NAMM().config, recent_tokens=3).outside_spec() == {"recent_tokens": 3}
    assert "recent_tokens" not in NAMM().config.to_dict()  # default configs record what older files hold
    with pytest.raises(ValueError, match="recent_tokens"):
        replace(NAMM().config, recent_tokens=-1)


def test_nonfinite_namm_score_is_a_clear_error(model):
    v = torch.zeros(4172)
    v[-1] = 3e38  # readout bias
    v[-26 + 7] = 3e38  # readout weight on cos(age / f) ~ 1: their sum overflows float32 to inf
    ids, _ = _batch(1, 16)
    with attach(model, NAMMPolicy(_namm(v)), update_interval=16) as mem, pytest.raises(FloatingPointError):
        mem.prefill(ids)


def test_namm_without_normalization_is_refused(model):
    ids, _ = _batch(1, 16)
    net = NAMM()
    net.set_flat(torch.randn(4172) * 0.1)
    with attach(model, NAMMPolicy(net), update_interval=16) as mem, pytest.raises(RuntimeError, match="normaliz"):
        mem.prefill(ids)


def test_population_members_evict_their_own_tokens(model):
    """Batched members (one per sequence) equal separate runs with each member's weights."""
    torch.manual_seed(5)
    thetas = torch.randn(2, 4172) * 0.3
    ids, _ = _batch(1, 48, seed=3)
    ids2 = ids.repeat(2, 1)
    policy = NAMMPolicy(_namm())
    policy.set_population(thetas, torch.tensor([0, 1]))
    with attach(model, policy, update_interval=16, chunk_size=16) as mem:
        both = mem.prefill(ids2)
        counts = mem.stats.kept_counts
    for i in range(2):
        single = NAMMPolicy(_namm(thetas[i]))
        with attach(model, single, update_interval=16, chunk_size=16) as mem:
            one = mem.prefill(ids)
            for step, layers in mem.stats.kept_counts.items():
                for layer, c in layers.items():
                    assert counts[step][layer][i] == c[0]
        torch.testing.assert_close(both[i], one[0], atol=1e-5, rtol=0)


# ----- budgets ---------------------------------------------------------------------------------------------
def _live_after_each_update(mem):
    """Wrap the engine's update: after each, the live slots of every managed layer's cache rows, {layer: (B, H)},
    read from the cache itself (its slot mask and its key tensor's length), not from the policy's decision."""
    engine, seen = mem.engine, []
    update = engine.update

    def spy():
        update()
        after = {}
        for layer, st in engine.states.items():
            keys, _ = engine.adapter.get_kv(engine.cache, layer)
            assert keys.shape[2] == st.valid.shape[-1]  # one slot flag per cached key
            after[layer] = st.valid.sum(-1).tolist()
        seen.append(after)

    engine.update = spy
    return seen


@pytest.mark.parametrize("name", BUDGETED)
@pytest.mark.parametrize("budget", [0.5, "10t"])
def test_baselines_respect_budget_exactly(model, name, budget):
    ids, mask = _batch(2, 48, pad=(0, 9))
    with attach(model, create_policy(name, budget=budget), update_interval=16, chunk_size=8) as mem:
        live_after = _live_after_each_update(mem)
        mem.prefill(ids, mask)
        stats = mem.stats
    assert len(stats.kept_counts) == 3 and len(live_after) == 3
    for step, layers in stats.kept_counts.items():
        seen = stats.update_n_seen[step]
        for layer, counts in layers.items():
            live = stats.live_counts[step][layer]
            for b in range(2):
                target = max(1, int(seen[b] * 0.5)) if budget == 0.5 else 10
                assert counts[b] == [min(target, n) for n in live[b]]
            assert live_after[step][layer] == counts  # what the cache holds, not only what the policy chose


def test_budgeted_ranking_keeps_the_highest_scores_and_breaks_ties_toward_newer_slots():
    """Differences far below any additive tie-break offset still decide; exact ties go to the newer slot; the newest
    slot is always among the kept; invalid slots never are."""
    policy = create_policy("h2o", budget="3t")
    valid = torch.tensor([[[False, True, True, True, True, True]]])
    st = LayerState(layer=0, valid=valid, position=torch.arange(6).view(1, 1, 6), arrival=torch.arange(6).view(1, 1, 6))
    score = torch.tensor([[[9.0, 4e-10, 0.0, 1e-300, 0.0, -5.0]]], dtype=torch.float64)
    assert policy.keep_top(st, score).tolist() == [[[False, True, False, True, False, True]]]
    tied = torch.tensor([[[0.0, 1.0, 1.0, 1.0, 1.0, -5.0]]], dtype=torch.float64)
    assert policy.keep_top(st, tied).tolist() == [[[False, False, False, True, True, True]]]


def test_budget_exact_count_after_each_update(model):
    """With a token budget every update leaves exactly min(budget, live) tokens per row."""
    ids, _ = _batch(1, 64)
    with attach(model, "h2o", budget="12t", update_interval=16, chunk_size=16) as mem:
        mem.prefill(ids)
        for layers in mem.stats.kept_counts.values():
            for counts in layers.values():
                assert counts == [[12, 12]]


@pytest.mark.parametrize("source", ["namm", "random-per-head"])
def test_replayed_budget_reproduces_recorded_lengths(model, source):
    """A replayed budget gives every layer, sequence and KV head at every update the recorded count. The
    random-per-head source records counts that differ between layers and between heads, so a replay that mixed
    them up would show."""
    torch.manual_seed(7)
    ids, mask = _batch(2, 64, pad=(0, 10), seed=4)
    policy = NAMMPolicy(_namm(torch.randn(4172) * 0.5)) if source == "namm" else RandomPerHead()
    with attach(model, policy, update_interval=16, chunk_size=8) as mem:
        mem.prefill(ids, mask)
        recorded = mem.stats.kept_counts
        retained = mem.stats.retained_cache()
    assert retained < 1.0  # this policy evicts something
    if source == "random-per-head":
        per_step = list(recorded.values())
        assert any(c[0] != c[1] for step in per_step for layer in step.values() for c in layer)  # heads differ
        if len(per_step[0]) > 1:
            assert any(len({str(c) for c in step.values()}) > 1 for step in per_step)  # layers differ
    for name in BUDGETED:
        with attach(model, name, budget=ReplayBudget(recorded), update_interval=16, chunk_size=8) as mem:
            live_after = _live_after_each_update(mem)
            mem.prefill(ids, mask)
            assert mem.stats.kept_counts == recorded
            assert dict(enumerate(live_after)) == recorded
            assert mem.stats.retained_cache() == pytest.approx(retained)


# ----- attach / detach / errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores_model_and_double_attach_is_refused(family):
    model = tiny_decoder(family)
    ids, _ = _batch(1, 20)
    impl = {name: m.config._attn_implementation for name, m in model.named_modules() if hasattr(m, "config")}
    forwards = {name: m.forward for name, m in model.named_modules()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
    mem = attach(model, "h2o", budget=0.5, update_interval=8)
    with pytest.raises(RuntimeError, match="already"):
        attach(model, "full")
    mem.prefill(ids)
    assert model.config._attn_implementation != "sdpa"  # routed to the engine while attached
    mem.detach()
    mem.detach()  # idempotent
    assert {name: m.config._attn_implementation for name, m in model.named_modules() if hasattr(m, "config")} == impl
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "_namm_engine") for m in model.modules())
    assert {name: m.forward for name, m in model.named_modules()} == forwards
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    with pytest.raises(RuntimeError, match="detached"):
        mem.prefill(ids)
    with attach(model, "full"):
        pass  # attaching again after detach works


def test_unsupported_model_is_refused_with_supported_list():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        attach(m, "full")


def test_attention_dropout_in_training_mode_and_bidirectional_gemma_are_refused():
    """The engine's attention is causal and has no dropout: a model that would silently lose either is refused."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    model = LlamaForCausalLM(LlamaConfig(**cfg, num_key_value_heads=2, attention_dropout=0.5)).train()
    ids, _ = _batch(1, 8)
    with attach(model, "full") as mem:
        with pytest.raises(RuntimeError, match=r"attention dropout 0.5 .*model.eval\(\)"):
            mem.prefill(ids)
    model.eval()
    with attach(model, "full") as mem:
        mem.prefill(ids)  # eval mode: no dropout asked for
    gemma = Gemma3ForCausalLM(
        Gemma3TextConfig(**cfg, num_key_value_heads=1, head_dim=16, use_bidirectional_attention=True)
    )
    with pytest.raises(TypeError, match="bidirectional attention"):
        attach(gemma.eval(), "full")


def test_all_sliding_model_is_refused_with_fix():
    from transformers import MistralConfig, MistralForCausalLM

    m = MistralForCausalLM(
        MistralConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            sliding_window=16,
        )
    )
    with pytest.raises(ValueError, match="sliding_window=None"):
        attach(m, "full")


def test_host_without_attention_rows_is_refused():
    class NoRows:
        name = "no-rows"
        provides_attention_rows = False

        def host_info(self):
            from namm_transfer.policies.base import HostInfo

            return HostInfo(n_layers=1, managed_layers=(0,), n_kv_heads=1, n_q_heads=1, head_dim=4)

    from namm_transfer.engine import EvictionEngine

    for name in ("h2o", "tova"):
        with pytest.raises(ValueError, match="attention rows"):
            EvictionEngine(NoRows(), create_policy(name, budget=0.5))
    EvictionEngine(NoRows(), create_policy("l2", budget=0.5))  # key norms need no rows


def test_bad_inputs_are_clear_errors(model):
    ids, _ = _batch(2, 16)
    with attach(model, "full") as mem:
        with pytest.raises(RuntimeError, match="none was started"):
            mem.prefill(ids, reset=False)
        with pytest.raises(ValueError, match="attention_mask"):
            mem.prefill(ids, torch.ones(2, 5))
        right = torch.ones(2, 16, dtype=torch.long)
        right[1, 12:] = 0  # a right-padded batch: the model would continue from a padding slot
        with pytest.raises(ValueError, match=r"sequence\(s\) \[1\] on the right.*padding_side = 'left'"):
            mem.prefill(ids, right)
        mem.prefill(ids, right.flip(-1))  # the same lengths padded on the left
        with pytest.raises(ValueError, match="empty"):
            mem.prefill(ids[:, :0])
        mem.prefill(ids)
        with pytest.raises(ValueError, match="one token"):
            mem.step(ids)
        with pytest.raises(RuntimeError, match="directly"):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="budget"):
        create_policy("h2o", budget="lots")
    with pytest.raises(KeyError, match="registered"):
        create_policy("nope")


def test_fork_after_shared_prefix_equals_separate_runs(model):
    """Feeding a prefix once and forking equals feeding every copy from the start."""
    torch.manual_seed(11)
    thetas = torch.randn(3, 4172) * 0.3
    ids, _ = _batch(1, 48, seed=6)
    policy = NAMMPolicy(_namm())
    with attach(model, policy, update_interval=16, chunk_size=8) as mem:
        mem.engine.reset(1)
        mem.engine.forward_chunk(input_ids=ids[:, :8])
        mem.engine.forward_chunk(input_ids=ids[:, 8:16], allow_update=False)
        mem.engine.fork(3)
        policy.set_population(thetas, torch.arange(3))
        mem.engine.update()
        forked = mem.prefill(ids.repeat(3, 1)[:, 16:], reset=False)
        forked_counts = mem.stats.kept_counts
        policy.set_population(thetas, torch.arange(3))
        direct = mem.prefill(ids.repeat(3, 1))
        assert mem.stats.kept_counts == forked_counts
    torch.testing.assert_close(forked, direct, atol=1e-5, rtol=0)


# ----- the host-side mirrors: live slots per row, heads alike, masks shared per chunk -------------------------
class ScriptedPerHead(Scripted):
    """Evict fixed positions per (sequence, KV head) at the first update; heads of a sequence differ."""

    name = "scripted-per-head"

    def select(self, state: LayerState) -> torch.Tensor:
        keep = state.valid.clone()
        if state.step == 0:
            for (b, h), positions in self.evict.items():
                for p in positions:
                    keep[b, h] &= state.position[b, h] != p
        return keep


class ScriptedPerHeadWithRows(ScriptedPerHead):
    name = "scripted-per-head-rows"
    needs_attention = True

    def observe(self, state: LayerState, rows: torch.Tensor) -> None:
        pass


def _assert_mirrors(engine):
    """The engine's host-side counts equal what the device tensors hold."""
    for layer, st in engine.states.items():
        assert engine._live[layer].tolist() == st.valid.sum(-1).tolist()
        assert engine._alike[layer] == bool((st.valid == st.valid[:, :1]).all())
    assert engine._n_seen_host.tolist() == engine.n_seen.tolist()


@pytest.mark.parametrize("policy_cls", [Scripted, ScriptedWithRows], ids=["fused", "rows"])
def test_equal_evictions_without_padding_equal_masked_reference(model, policy_cls):
    """Sequences that evict as many tokens each leave every slot live after compaction: the engine then masks
    nothing but causality inside the chunk (one mask shared by the layers), and still equals the reference."""
    ids, mask = _batch(2, 40, pad=(0, 0), seed=2)
    evict = {0: {0, 3, 9}, 1: {2, 5, 6}}
    with attach(model, policy_cls(evict), update_interval=16, chunk_size=8) as mem:
        tail = mem.prefill(ids, mask, logits_to_keep=24)
        steps, toks = [tail], [tail[:, -1].argmax(-1, keepdim=True)]
        for _ in range(3):
            steps.append(mem.step(toks[-1]))
            toks.append(steps[-1][:, -1].argmax(-1, keepdim=True))
        for layer, st in mem.engine.states.items():
            assert bool(st.valid.all()), layer  # the path under test: every slot live
        _assert_mirrors(mem.engine)
    full_ids = torch.cat([ids, *toks[:-1]], dim=1)
    ref = _reference_masked(model, full_ids, torch.ones_like(full_ids), evict, t_evict=16)
    torch.testing.assert_close(torch.cat(steps, dim=1), ref[:, 16:], atol=1e-5, rtol=0)


def test_per_head_evictions_agree_between_the_fused_and_the_explicit_path(model):
    """Heads of one sequence holding different slots (a mask per head) give the same logits through SDPA as
    through the explicit attention that reads every head's live slots directly."""
    if model.config.num_key_value_heads < 2:
        pytest.skip("needs two KV heads")
    ids, mask = _batch(2, 40, pad=(0, 5), seed=3)
    evict = {(0, 0): {0, 3, 9}, (0, 1): {1}, (1, 1): {2, 6, 7, 8}}
    outs = []
    for policy_cls in (ScriptedPerHead, ScriptedPerHeadWithRows):
        with attach(model, policy_cls(evict), update_interval=16, chunk_size=8) as mem:
            steps = [mem.prefill(ids, mask, logits_to_keep=24)]
            for _ in range(3):
                steps.append(mem.step(steps[-1][:, -1].argmax(-1, keepdim=True)))
            _assert_mirrors(mem.engine)
            assert not any(mem.engine._alike.values())
            outs.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


class CoinFlips(MemoryPolicy):
    """Keeps each live slot with probability 0.7 at every update: counts differ per head and per update."""

    name = "coin-flips"

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)

    def select(self, state: LayerState) -> torch.Tensor:
        return state.valid & (torch.rand(state.valid.shape, generator=self.gen) < 0.7)


@pytest.mark.parametrize("pad", [(0, 0), (0, 11)], ids=["no-padding", "padding"])
def test_host_mirrors_follow_the_cache_through_evictions(pad):
    """Live counts, heads alike and tokens seen, kept on the host so that the per-layer path never reads the
    device, stay equal to the device tensors through prefill, evictions that differ per head, decoding and
    forking; the statistics come from them."""
    model = tiny_decoder("qwen2")
    ids, mask = _batch(2, 72, pad=pad, seed=5)
    with attach(model, CoinFlips(), update_interval=16, chunk_size=8) as mem:
        out = mem.prefill(ids, mask)
        _assert_mirrors(mem.engine)
        heads_differ = not all(mem.engine._alike.values())
        for _ in range(20):
            out = mem.step(out[:, -1].argmax(-1, keepdim=True))
            _assert_mirrors(mem.engine)
            heads_differ |= not all(mem.engine._alike.values())
        assert heads_differ  # the per-head mask path was exercised
        want = np.stack([st.valid.sum(-1).float().mean(-1).numpy() for st in mem.engine.states.values()])
        np.testing.assert_allclose(mem.stats.cache_tokens[-1], want)
        assert mem.stats.n_seen[-1].tolist() == mem.engine.n_seen.tolist()
        mem.engine.fork(2)
        _assert_mirrors(mem.engine)


# ----- policies choose for every layer of an update in one call ---------------------------------------------
def _run_policy(model, policy, ids, mask):
    with attach(model, policy, update_interval=16, chunk_size=8) as mem:
        logits = mem.prefill(ids, mask, logits_to_keep=4)
        for _ in range(17):  # decoding crosses one more update
            logits = mem.step(logits[:, -1:].argmax(-1))
        positions = [st.position.clone() for st in mem.engine.states.values()]
        stats = mem.stats
        evicted = [
            np.array(stats.live_counts[step][layer]) - np.array(kept[layer])
            for step, kept in stats.kept_counts.items()
            for layer in kept
        ]
        assert any((e > 0).any() for e in evicted), "nothing was evicted: the test would prove nothing"
        return logits, stats.kept_counts, positions


@pytest.mark.parametrize(
    "make",
    [
        lambda: NAMMPolicy(_namm(torch.randn(4172, generator=torch.Generator().manual_seed(11)) * 0.3)),
        lambda: NAMMPolicy(_namm(torch.randn(4172, generator=torch.Generator().manual_seed(12)) * 0.3), budget=0.5),
        lambda: create_policy("h2o", budget=0.5),
        lambda: create_policy("streaming", budget=0.4),
        lambda: create_policy("l2", budget="12t"),
        lambda: create_policy("random", budget=0.5),
        lambda: create_policy("tova", budget=0.5),
    ],
    ids=["namm-threshold", "namm-budget", "h2o", "streaming", "l2", "random", "tova"],
)
def test_batched_select_over_layers_equals_layer_by_layer(make):
    """``select_layers`` (every layer of an update in one call of the network / one ranking) keeps exactly what
    asking layer by layer keeps, with padding, a population of NAMM weights and groups cut by size."""
    model = tiny_decoder("llama", layers=3)
    ids, mask = _batch(2, 40, pad=(0, 6), seed=8)
    batched = make()
    one_by_one = make()
    one_by_one.select_layers = lambda states, _p=one_by_one: [type(_p).select_layers(_p, [st])[0] for st in states]
    runs = [_run_policy(model, p, ids, mask) for p in (batched, one_by_one)]
    (l1, k1, p1), (l2, k2, p2) = runs
    assert k1 == k2
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)
    if isinstance(batched, NAMMPolicy):
        for layer, sc in batched.last_scores.items():
            torch.testing.assert_close(sc, one_by_one.last_scores[layer], atol=1e-5, rtol=1e-5)


def test_namm_population_scored_over_layers_in_groups_equals_layer_by_layer():
    """A population (one weight vector per sequence) batched over layers, also when ``batch_bytes`` cuts the
    layers into groups of one, keeps what the layer-by-layer scoring keeps."""
    model = tiny_decoder("qwen2", layers=3)
    ids, mask = _batch(2, 40, pad=(0, 3), seed=9)
    theta = torch.randn(2, 4172, generator=torch.Generator().manual_seed(13)) * 0.3
    results = []
    for mode in ("batched", "groups-of-one", "per-layer"):
        policy = NAMMPolicy(_namm())
        policy.set_population(theta, torch.tensor([0, 1]))
        if mode == "groups-of-one":
            policy.batch_bytes = 1
        if mode == "per-layer":
            policy.select_layers = lambda states, _p=policy: [NAMMPolicy.select_layers(_p, [st])[0] for st in states]
        results.append(_run_policy(model, policy, ids, mask))
    (l0, k0, p0) = results[0]
    for logits, kept, positions in results[1:]:
        assert kept == k0
        for a, b in zip(positions, p0, strict=True):
            assert torch.equal(a, b)
        torch.testing.assert_close(logits, l0, atol=1e-5, rtol=0)


def test_a_subclass_that_overrides_select_alone_is_asked_per_layer():
    calls = []

    class Logged(create_policy("h2o", budget=0.5).__class__):
        def select(self, state):
            calls.append(state.layer)
            return super().select(state)

    model = tiny_decoder("llama", layers=3)
    ids, mask = _batch(1, 32, pad=(0,), seed=2)
    with attach(model, Logged(budget=0.5), update_interval=16, chunk_size=16) as mem:
        mem.prefill(ids, mask)
    assert calls == [0, 1, 2, 0, 1, 2]

    # a NAMM subclass whose select calls the NAMM's own: asked per layer, keeps what the NAMM keeps
    namm_calls = []

    class LoggedNAMM(NAMMPolicy):
        def select(self, state):
            namm_calls.append(state.layer)
            return super().select(state)

    kept = []
    for cls in (NAMMPolicy, LoggedNAMM):
        policy = cls(_namm(torch.randn(4172, generator=torch.Generator().manual_seed(3)) * 0.1), budget=0.5)
        with attach(model, policy, update_interval=16, chunk_size=16) as mem:
            mem.prefill(ids, mask)
            kept.append([st.position.clone() for st in mem.engine.states.values()])
    assert namm_calls == [0, 1, 2, 0, 1, 2]
    for a, b in zip(*kept, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("g", [1, 2, 3, 4])
def test_mean_of_query_heads_into_a_strided_slice(g):
    """The rows' average over the query heads sharing a KV head, written into part of a larger rows tensor (what
    the explicit attention does per tile), equals ``mean``; the slots beside it are left alone."""
    from namm_transfer.engine import _mean_of_heads

    probs = torch.rand(2, 3, g, 5, 7, generator=torch.Generator().manual_seed(g))
    rows = torch.full((2, 3, 9, 10), -1.0)
    _mean_of_heads(probs, rows[:, :, 2:7, :7])
    torch.testing.assert_close(rows[:, :, 2:7, :7], probs.mean(2), atol=1e-7, rtol=1e-6)
    assert (rows[:, :, :2] == -1).all() and (rows[:, :, 7:] == -1).all() and (rows[..., 7:] == -1).all()
