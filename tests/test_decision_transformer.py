"""Decision Transformer adapter and online rollouts on tiny random DecisionTransformerModel configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from namm_transfer.adapters.decision_transformer import (
    TOKEN_TYPES,
    DecisionTransformerAdapter,
    feed_tokens,
    kept_token_stats,
    token_timestep,
    token_type,
)
from namm_transfer.evals.offline_rl.rollout import CachedDT, CanonicalDT, canonical_actions, run_episodes

from namm_transfer.policies.base import MemoryPolicy
from namm_transfer.registry import find_adapter
from namm_transfer.session import attach

STATE, ACT = 11, 3


def _dt_attention() -> str:
    """sdpa where this transformers version supports it for DecisionTransformerModel (5.2x), else eager (5.17)."""
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    try:
        DecisionTransformerModel(
            DecisionTransformerConfig(
                state_dim=2, act_dim=1, hidden_size=8, n_layer=1, n_head=1, n_inner=8, attn_implementation="sdpa"
            )
        )
        return "sdpa"
    except ValueError:
        return "eager"


DT_ATTN = _dt_attention()


def tiny_dt(state_dim: int = STATE, act_dim: int = ACT, seed: int = 0, max_ep_len: int = 100):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.manual_seed(seed)
    cfg = DecisionTransformerConfig(
        state_dim=state_dim,
        act_dim=act_dim,
        hidden_size=32,
        n_layer=2,
        n_head=2,
        n_inner=64,
        max_ep_len=max_ep_len,
        initializer_range=0.2,  # larger than the default so that small context changes show in the actions
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=DT_ATTN,
    )
    return DecisionTransformerModel(cfg).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine two threads spin (10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dt():
    return tiny_dt()


def _inputs(b: int, t: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(b, t, STATE, generator=g)
    rtg = 3.6 - 0.05 * torch.rand(b, t, generator=g).cumsum(1)
    return states, rtg


def _drive(actor, states, rtg, alive=None):
    """Step ``actor`` through a whole history; returns (B, T, act_dim) actions."""
    b, t = states.shape[:2]
    actor.reset(b)
    out = []
    for i in range(t):
        out.append(actor.act(rtg[:, i], states[:, i], None if alive is None else alive[:, i]))
    return torch.stack(out, dim=1)


def _uncached(model, states, actions, rtg):
    """DecisionTransformerModel.forward over the whole history ``0 .. T-1`` (placeholder zero action last)."""
    b, t = states.shape[:2]
    acts = torch.cat([actions[:, : t - 1], torch.zeros(b, 1, ACT)], dim=1)
    with torch.no_grad():
        out = model(
            states=states,
            actions=acts,
            returns_to_go=rtg[..., None],
            timesteps=torch.arange(t).expand(b, t),
            attention_mask=torch.ones(b, t, dtype=torch.long),
        )
    return out.action_preds[:, -1]


# ----- adapter basics -------------------------------------------------------------------------------------
def test_registry_finds_adapter_and_rejects_others(dt):
    from tiny_models import tiny_decoder

    assert isinstance(find_adapter(dt), DecisionTransformerAdapter)
    with pytest.raises(TypeError, match="not a DecisionTransformerModel"):
        DecisionTransformerAdapter(tiny_decoder("llama"))
    host = DecisionTransformerAdapter(dt).host_info()
    assert host.managed_layers == (0, 1) and host.n_kv_heads == 2 and host.head_dim == 16


def test_embed_steps_and_whole_history_feed_match_forward(dt):
    b, t = 2, 9
    states, rtg = _inputs(b, t)
    actions = torch.randn(b, t, ACT)
    ts = torch.arange(t).expand(b, t)
    with torch.no_grad():
        ref = dt(states=states, actions=actions, returns_to_go=rtg[..., None], timesteps=ts)
        with attach(dt, "full", update_interval=6, chunk_size=4) as mem:
            ad = mem.engine.adapter
            emb = ad.embed_steps(rtg[..., None], states, actions, ts)
            # per-token embedding == slices of the stacked one
            torch.testing.assert_close(ad.embed_tokens(1, states, ts), emb[:, 1::3], atol=0, rtol=0)
            mem.engine.reset(b)
            got = feed_tokens(mem.engine, emb)
            assert mem.engine.stats.update_clock == [6, 12, 18, 24]  # the clock hits every multiple
    torch.testing.assert_close(got, ref.action_preds, atol=1e-5, rtol=0)
    assert dt.config._attn_implementation == DT_ATTN  # detached: the model is restored


def test_token_type_helpers():
    idx = np.arange(9)
    assert token_type(idx).tolist() == [0, 1, 2] * 3
    assert token_timestep(idx).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert TOKEN_TYPES[token_type(4)] == "state"


# ----- cached == uncached whole-history forward ------------------------------------------------------------
def test_cached_equals_uncached_forward_over_whole_history(dt):
    b, t = 2, 12
    states, rtg = _inputs(b, t, seed=1)
    with CachedDT(dt, "full", update_interval=12, chunk_size=8) as actor:
        acts = _drive(actor, states, rtg)
        assert actor.seen_tokens().tolist() == [3 * t - 1] * b
        assert actor.stats.update_clock == [12, 24]
    for i in range(t):
        ref = _uncached(dt, states[:, : i + 1], acts[:, : i + 1], rtg[:, : i + 1])
        torch.testing.assert_close(acts[:, i], ref, atol=1e-5, rtol=0, msg=f"step {i}")


def test_canonical_window_equals_cached_only_inside_window(dt):
    """Equal while the history fits in the K-step window (t < K). Once the window slides (t >= K), the
    canonical forward recomputes every window token without the dropped steps (through both layers) and
    its action differs from the cached one, which still attends to the whole history."""
    k, b, t = 5, 2, 12
    states, rtg = _inputs(b, t, seed=2)
    canon = _drive(CanonicalDT(dt, context_length=k), states, rtg)
    with CachedDT(dt, "full", update_interval=12) as actor:
        cached = _drive(actor, states, rtg)
    torch.testing.assert_close(canon[:, :k], cached[:, :k], atol=1e-5, rtol=0)
    # first slide: the histories are still identical (same actions up to t = K - 1), only the window differs
    assert (canon[:, k] - cached[:, k]).abs().max() > 1e-3
    # and the canonical action at t = K is exactly the forward over the last K steps alone
    acts = torch.cat([canon[:, 1:k], torch.zeros(b, 1, ACT)], dim=1)
    ref = canonical_actions(
        dt, states[:, 1 : k + 1], acts, rtg[:, 1 : k + 1, None], torch.arange(1, k + 1).expand(b, k), k
    )
    torch.testing.assert_close(canon[:, k], ref, atol=1e-6, rtol=0)


# ----- keep everything == plain cached path; batched == single ----------------------------------------------
def _encoder_cache_kwarg(model) -> str:
    """The encoder's cache argument: ``cache`` (5.2x) or ``past_key_values`` (5.17). Passing the wrong one is
    silently swallowed by the encoder's ``**kwargs`` and every call then runs uncached on a fresh cache."""
    import inspect

    params = inspect.signature(model.encoder.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    assert name in params, list(params)
    return name


def _plain_hf_cached(model, states, rtg):
    """Plain transformers cached rollout (DynamicCache, no engine): same chunking as CachedDT."""
    from transformers import DynamicCache

    ad = DecisionTransformerAdapter(model)
    b, t = states.shape[:2]
    cache = DynamicCache(config=model.config)
    cache_kw = _encoder_cache_kwarg(model)
    out, prev = [], None
    with torch.no_grad():
        for i in range(t):
            ts = torch.full((b, 1), i)
            pieces = [] if prev is None else [ad.embed_tokens(2, prev[:, None], ts - 1)]
            pieces += [ad.embed_tokens(0, rtg[:, i, None, None], ts), ad.embed_tokens(1, states[:, i, None], ts)]
            emb = torch.cat(pieces, dim=1)
            h = model.encoder(
                inputs_embeds=emb,
                position_ids=torch.zeros(b, emb.shape[1], dtype=torch.long),
                use_cache=True,
                **{cache_kw: cache},
            ).last_hidden_state
            prev = model.predict_action(h[:, -1])
            out.append(prev)
    return torch.stack(out, dim=1)


def test_full_policy_equals_plain_cached_path(dt):
    states, rtg = _inputs(3, 15, seed=3)
    ref = _plain_hf_cached(dt, states, rtg)
    with CachedDT(dt, "full", update_interval=9) as actor:
        got = _drive(actor, states, rtg)
        assert actor.stats.retained_cache() == 1.0
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy,kwargs", [("full", {}), ("h2o", {"budget": 0.5})])
def test_batched_episodes_equal_single(dt, policy, kwargs):
    b, t = 3, 16
    states, rtg = _inputs(b, t, seed=4)
    ends = [16, 7, 11]  # episode lengths: 1 and 2 finish early
    alive = torch.tensor([[i < e for i in range(t)] for e in ends])
    with CachedDT(dt, policy, update_interval=12, **kwargs) as actor:
        batched = _drive(actor, states, rtg, alive)
        kept_b = actor.stats.kept_counts
        ret_b = actor.retained_per_episode()
        for j, e in enumerate(ends):
            single = _drive(actor, states[j : j + 1, :e], rtg[j : j + 1, :e])
            torch.testing.assert_close(batched[j, :e], single[0], atol=1e-5, rtol=0, msg=f"episode {j}")
            # the same kept counts at every update the single episode made
            for step, layers in actor.stats.kept_counts.items():
                for layer, counts in layers.items():
                    assert kept_b[step][layer][j] == counts[0]
            assert ret_b[j] == pytest.approx(actor.retained_per_episode()[0], abs=1e-12)


# ----- evicting policy ----------------------------------------------------------------------------------
def test_evicting_policy_shrinks_cache_and_type_stats_add_up(dt):
    b, t = 2, 30
    states, rtg = _inputs(b, t, seed=5)
    with CachedDT(dt, "h2o", update_interval=12, budget=0.5) as actor:
        acts = _drive(actor, states, rtg)
        stats = actor.stats
        cache, seen = actor.cache_tokens(), actor.seen_tokens()
        kept = actor.kept_token_stats(age_edges=(0, 2, 8))
        retained = actor.retained_per_episode()
    assert torch.isfinite(acts).all()
    assert (cache < seen).all() and (cache <= 0.5 * seen + 12).all()
    assert 0.4 < retained.mean() < 1.0
    assert stats.update_clock == list(range(12, 3 * t, 12))
    total = sum(sum(sum(h) for h in per_seq) for layers in stats.kept_counts.values() for per_seq in layers.values())
    assert kept["total"] == total == sum(kept["by_type"].values()) == sum(kept["by_age"].values())
    assert list(kept["by_age"]) == ["0-1", "2-7", "8+"]
    assert sum(sum(v.values()) for v in kept["by_layer"].values()) == total
    for name in TOKEN_TYPES:
        assert 0.0 < kept["retention_by_type"][name] <= 1.0
    assert sum(kept["seen_by_type"].values()) == 2 * 2 * sum(n for seen_b in stats.update_n_seen for n in seen_b)
    # the same numbers straight from kept_positions
    direct = kept_token_stats(stats, age_edges=(0, 2, 8))
    assert direct["by_type"] == kept["by_type"]
    # and counted by hand: token (return, state, action) = position % 3, age = newest timestep - position // 3
    by_type, by_age = [0, 0, 0], {"0-1": 0, "2-7": 0, "8+": 0}
    for step, layers in stats.kept_positions.items():
        for per_seq in layers.values():
            for b, heads in enumerate(per_seq):
                newest = (int(stats.update_n_seen[step][b]) - 1) // 3
                for pos in heads:
                    for p in (int(x) for x in pos):
                        by_type[p % 3] += 1
                        age = newest - p // 3
                        by_age["0-1" if age < 2 else "2-7" if age < 8 else "8+"] += 1
    assert [kept["by_type"][name] for name in TOKEN_TYPES] == by_type
    assert kept["by_age"] == by_age and min(by_age.values()) > 0


# ----- real environment ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,policy,kw", [("canonical", "full", {}), ("cached", "full", {}), ("cached", "h2o", {"budget": 0.5})]
)
def test_hopper_rollout(dt, mode, policy, kw):
    pytest.importorskip("mujoco")
    from namm_transfer.evals.offline_rl.envs import normalized_score

    res = run_episodes(
        dt,
        "hopper",
        2,
        mode=mode,
        policy=policy,
        policy_kwargs=kw,
        max_ep_len=20,
        update_interval=12,
        context_length=5,
        seed=3,
    )
    assert len(res["returns"]) == 2 and all(1 <= n <= 20 for n in res["lengths"])
    assert np.all(np.isfinite(res["returns"]))
    assert res["normalized_scores"] == pytest.approx([normalized_score("hopper", r) for r in res["returns"]])
    assert res["steps_per_second"] > 0
    assert len(res["trace"]["cache_tokens"]) == max(res["lengths"])
    if mode == "cached":
        assert res["managed_layers"] == [0, 1]
        if policy == "full":
            assert res["retained_cache"] == 1.0
        else:
            assert res["retained_cache"] < 1.0 or max(res["lengths"]) * 3 < 12
            assert res["kept_tokens"] is None or res["kept_tokens"]["total"] > 0
    else:
        assert res["retained_cache"] is None and 0 < res["context_fraction"] <= 1.0
    assert not dt.training


class _ScriptedEnv:
    """A tiny deterministic task (no MuJoCo): observation t is ``obs0 + t`` and reward t is ``t + 1``; ends at 6."""

    def __init__(self, state_dim: int, act_dim: int) -> None:
        import gymnasium as gym

        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (state_dim,), np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (act_dim,), np.float32)
        self.obs0 = np.linspace(-1.0, 2.0, state_dim)
        self.t = 0

    def reset(self, seed=None):
        self.t = 0
        return self.obs0.copy(), {}

    def step(self, action):
        self.t += 1
        return self.obs0 + self.t, float(self.t), self.t >= 6, False, {}

    def close(self):
        pass


@pytest.mark.parametrize("mode", ["canonical", "cached"])
def test_rollout_feeds_scaled_returns_to_go_and_normalized_states(dt, mode, monkeypatch):
    """What the model is given at step t: return-to-go ``(target - sum of rewards so far) / return_scale`` and
    the state ``(obs_t - mean) / std`` (the DT paper's evaluation), in both modes."""
    from namm_transfer.evals.offline_rl import rollout

    seen = []
    cls = rollout.CachedDT if mode == "cached" else rollout.CanonicalDT
    act = cls.act

    def spy(self, returns_to_go, states, alive=None):
        seen.append((np.array(returns_to_go, dtype=np.float64), np.array(states, dtype=np.float64)))
        return act(self, returns_to_go, states, alive)

    monkeypatch.setattr(cls, "act", spy)
    mean, std = np.linspace(0.5, -0.5, STATE), np.linspace(0.5, 2.0, STATE)
    res = run_episodes(
        dt, "hopper", 2, mode=mode, target_return=360.0, state_mean=mean, state_std=std, return_scale=100.0,
        max_ep_len=10, env_fn=lambda i: _ScriptedEnv(STATE, ACT),
    )  # fmt: skip
    assert res["lengths"] == [6, 6] and res["returns"] == [21.0, 21.0]
    assert len(seen) == 6
    obs0 = _ScriptedEnv(STATE, ACT).obs0
    for t, (rtg, states) in enumerate(seen):
        rewards_so_far = t * (t + 1) / 2  # 1 + 2 + ... + t
        np.testing.assert_allclose(rtg.reshape(-1), [(360.0 - rewards_so_far) / 100.0] * 2, rtol=0, atol=1e-12)
        np.testing.assert_allclose(states, np.stack([(obs0 + t - mean) / std] * 2), rtol=0, atol=1e-12)


def test_rollouts_are_reproducible(dt):
    pytest.importorskip("mujoco")
    a = run_episodes(dt, "hopper", 1, mode="cached", max_ep_len=10, seed=7)
    b = run_episodes(dt, "hopper", 1, mode="cached", max_ep_len=10, seed=7)
    assert a["returns"] == b["returns"]


# ----- bad input -----------------------------------------------------------------------------------------
def test_model_env_size_mismatch_names_both(dt):
    pytest.importorskip("mujoco")
    wrong = tiny_dt(state_dim=17, act_dim=6)
    with pytest.raises(ValueError, match=r"state_dim=17.*act_dim=6.*\(11,\).*\(3,\)"):
        run_episodes(wrong, "hopper", 1, max_ep_len=5)


def test_non_finite_observation_is_a_clear_error(dt):
    pytest.importorskip("mujoco")
    import gymnasium as gym

    class NaNAfter(gym.Wrapper):
        def step(self, action):
            obs, r, term, trunc, info = self.env.step(action)
            return obs * np.nan, r, term, trunc, info

    def env_fn(i):
        return NaNAfter(gym.make("Hopper-v5", max_episode_steps=10))

    with pytest.raises(ValueError, match="non-finite observation .* step 1"):
        run_episodes(dt, "hopper", 1, max_ep_len=10, env_fn=env_fn)
    assert dt.config._attn_implementation == DT_ATTN  # the canonical mode never attached anything


def test_bad_settings(dt):
    with pytest.raises(ValueError, match="multiple of 3"):
        CachedDT(dt, "full", update_interval=10)
    with pytest.raises(ValueError, match="max_ep_len"):
        run_episodes(dt, "hopper", 1, max_ep_len=1000)
    with pytest.raises(ValueError, match="mode"):
        run_episodes(dt, "hopper", 1, mode="window", max_ep_len=5)
    with CachedDT(dt, "full") as actor:
        actor.reset(2)
        with pytest.raises(ValueError, match=r"states must have shape \(batch, 11\)"):
            actor.act(torch.zeros(2), torch.zeros(2, 5))
        with pytest.raises(ValueError, match="NaN"):
            actor.act(torch.zeros(2), torch.full((2, STATE), float("nan")))
    assert dt.config._attn_implementation == DT_ATTN


# ----- token types follow the clock: evicting every action token == masking them out ---------------------------
class DropActions(MemoryPolicy):
    """Keep return and state tokens only (the engine also keeps the newest token, an action at updates)."""

    name = "drop-actions"

    def select(self, state):
        return state.valid & (token_type(state.position) != 2)


def test_evicting_action_tokens_equals_masked_reference(dt):
    b, t, u = 2, 14, 9
    states, rtg = _inputs(b, t, seed=6)
    with CachedDT(dt, DropActions(), update_interval=u) as actor:
        acts = _drive(actor, states, rtg)
        kept = actor.kept_token_stats()
        n_updates = len(actor.stats.update_clock)
    # at every update, each (layer, sequence, head) row keeps only its newest action token
    assert kept["by_type"]["action"] == n_updates * 2 * b * 2
    assert kept["by_type"]["state"] == kept["seen_by_type"]["state"]
    # reference: the whole history at once; action token p is hidden from queries from the first update that
    # does not find it newest, i.e. from clock (floor((p + 1) / u) + 1) * u on
    ad = DecisionTransformerAdapter(dt)
    ts = torch.arange(t).expand(b, t)
    with torch.no_grad():
        emb = ad.embed_steps(rtg[..., None], states, acts, ts)
    n = 3 * t
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    hidden_from = torch.where(k % 3 == 2, ((k + 1) // u + 1) * u, n + 1)
    allowed = (k <= q) & (q < hidden_from)
    # a 4D mask reaches the attention kernel as-is: additive float works for every kernel, a bool one only for
    # sdpa (eager, the only choice for this model on transformers 5.17, would add it: +1 / +0, no masking)
    additive = torch.zeros(n, n, dtype=emb.dtype).masked_fill(~allowed, torch.finfo(emb.dtype).min)
    with torch.no_grad():
        h = dt.encoder(
            inputs_embeds=emb,
            attention_mask=additive.expand(b, 1, n, n),
            position_ids=torch.zeros(b, n, dtype=torch.long),
        ).last_hidden_state
        ref = dt.predict_action(h[:, 1::3])
    torch.testing.assert_close(acts, ref, atol=1e-5, rtol=0)
