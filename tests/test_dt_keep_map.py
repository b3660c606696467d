"""What a memory policy keeps in a Decision Transformer (evals/offline_rl/keep_map.py): the token-type split of the
fed stream, the shares by layer, timestep and bucket, the counts against the engine's cache lengths under the
NAMM's ratio and threshold protocols, and the plot. Tiny random DTs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from namm_transfer.evals.offline_rl.keep_map import KeepMap, keep_map, keep_map_episode, namm_policy, plot_keep_maps
from namm_transfer.evals.offline_rl.rollout import CachedDT
from namm_transfer.evals.offline_rl.train import TrainConfig, build_dt

from namm_transfer.policies.base import MemoryPolicy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(hidden_size=32, n_layer=2, n_head=2, max_ep_len=100)
NAN = math.nan


def _tiny_dt(state_dim: int = 11, act_dim: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = build_dt(state_dim, act_dim, TrainConfig(env="hopper", **TINY)).eval()
    with torch.no_grad():  # larger than the default init, so that the actions vary
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.3)
    return model


class KeepStates(MemoryPolicy):
    """Keeps the tokens that arrived at clock 1 mod 3 (the engine's clock, not the positions the map reads)."""

    name = "keep-states-test"

    def select(self, state):
        return state.valid & (state.arrival % 3 == 1)


def test_token_types_are_the_fed_stream_and_shares_are_exact():
    """Token i of the map is the stream's i-th fed row: R_t, s_t, a_t for i = 3t, 3t + 1, 3t + 2 (checked against
    the adapter's own embedding of each value), and a policy that keeps the state tokens gives exact shares."""
    model = _tiny_dt()
    steps, b = 10, 1
    g = torch.Generator().manual_seed(0)
    states = torch.randn(b, steps, 11, generator=g)
    rtg = 3.6 - 0.01 * torch.rand(b, steps, generator=g).cumsum(1)
    with CachedDT(model, KeepStates(), update_interval=6) as actor:
        fed = []
        forward = actor.engine.forward_chunk

        def recording(**kwargs):
            fed.append(kwargs["inputs_embeds"][0].clone())
            return forward(**kwargs)

        actor.engine.forward_chunk = recording
        actor.reset(b)
        actions = torch.stack([actor.act(rtg[:, t], states[:, t]) for t in range(steps)], dim=1)
        end, last = keep_map(actor), keep_map(actor, step=-1)
        live = [int(v) for v in actor.cache_tokens()]
        valid = {layer: st.valid[0].sum(-1).tolist() for layer, st in actor.engine.states.items()}
        engine_counts = actor.stats.kept_counts[last.step]
        n_updates = len(actor.stats.kept_counts)
        ad = actor.adapter
        stream = torch.cat(fed, dim=0)
        assert stream.shape[0] == end.n_tokens == 3 * steps - 1
        values = {0: rtg[0, :, None], 1: states[0], 2: actions[0]}
        for i in range(end.n_tokens):
            kind, t = int(end.token_types[i]), int(end.timesteps[i])
            expected = ad.embed_tokens(kind, values[kind][t][None, None], torch.tensor([[t]]))[0, 0]
            torch.testing.assert_close(stream[i], expected, atol=0, rtol=0, msg=f"token {i}")
    assert (end.n_tokens, last.n_tokens, last.step, n_updates) == (29, 24, 3, 4)
    assert end.layers == last.layers == [0, 1] and end.mask.shape == (2, 2, 29)
    # counts: the engine's cache lengths and its kept counts at the update
    assert end.kept_counts().tolist() == [valid[0], valid[1]] and live == [int(end.kept_counts().mean())]
    assert last.kept_counts().tolist() == [engine_counts[0][0], engine_counts[1][0]]
    # after update 3 (24 tokens): the 8 states and the newest token (a_7, always kept); then R_8 s_8 a_8 R_9 s_9
    np.testing.assert_array_equal(last.share_by_layer_type(), [[0.0, 1.0, 1 / 8]] * 2)
    np.testing.assert_array_equal(end.share_by_layer_type(), [[2 / 10, 1.0, 2 / 9]] * 2)
    np.testing.assert_array_equal(end.kept_by_layer_type(), [[2 * 2, 10 * 2, 2 * 2]] * 2)
    grid = end.share_by_timestep()
    assert grid.shape == (2, 3, 10)
    np.testing.assert_array_equal(grid[:, 0], [[0.0] * 8 + [1.0, 1.0]] * 2)
    np.testing.assert_array_equal(grid[:, 1], [[1.0] * 10] * 2)
    np.testing.assert_array_equal(grid[:, 2], [[0.0] * 7 + [1.0, 1.0, NAN]] * 2)
    starts, share = end.share_by_bucket(5)
    assert starts.tolist() == [0, 5]
    np.testing.assert_array_equal(share, [[0.0, 1.0, 0.0], [2 / 5, 1.0, 2 / 4]])
    digest = json.loads(json.dumps(end.summary(5)))
    assert digest["share_by_layer_type"]["1"] == {"return": 0.2, "state": 1.0, "action": 2 / 9}
    assert digest["share_by_bucket_type"]["action"] == [0.0, 0.5] and digest["kept_counts"] == [[14, 14]] * 2


def test_keep_map_errors():
    model = _tiny_dt()
    with CachedDT(model, "full", update_interval=6) as actor:
        actor.reset(1)
        actor.act([3.6], torch.zeros(1, 11))
        with pytest.raises(ValueError, match="no update has happened yet"):
            keep_map(actor, step=0)
        with pytest.raises(ValueError, match="outside the batch of 1"):
            keep_map(actor, sequence=1)
        for _ in range(3):
            actor.act([3.6], torch.zeros(1, 11))
        with pytest.raises(ValueError, match="no update 5: there were 1"):
            keep_map(actor, step=5)
        assert keep_map(actor, step=0).mask.all()  # the full cache keeps everything
    with pytest.raises(ValueError, match="mask must be"):
        KeepMap([0, 1], np.zeros((1, 1, 3), dtype=bool))


@pytest.mark.parametrize("protocol", ["ratio:0.5", "threshold"])
def test_namm_keep_map_of_an_episode_adds_up_to_the_cache(protocol, tmp_path):
    """One hopper episode with the NAMM (random weights) under each protocol: at the end the map holds what the
    engine's cache holds (mean over layers and heads = the reported cache size), at the last update exactly the
    engine's kept counts; under ratio:0.5 half of the seen tokens (plus the newest) per layer and head."""
    pytest.importorskip("mujoco")
    from namm_transfer.namm import NAMM

    g = torch.Generator().manual_seed(1)
    namm = NAMM()
    namm.set_flat(0.1 * torch.randn(namm.n_params, generator=g))
    namm.set_normalization(torch.zeros(namm.config.n_bins), torch.ones(namm.config.n_bins))
    model = _tiny_dt()
    end = keep_map_episode(model, "hopper", namm_policy(namm, protocol), max_steps=30, update_interval=6, seed=2)
    last = keep_map_episode(
        model, "hopper", namm_policy(namm, protocol), max_steps=30, update_interval=6, seed=2, step=-1
    )
    assert end.info["return"] == last.info["return"] and end.info["length"] == last.info["length"] >= 3
    assert end.n_tokens == 3 * end.info["length"] - 1
    assert float(end.kept_counts().mean()) == pytest.approx(end.info["cache_tokens"], rel=0, abs=1e-12)
    assert last.kept_counts().tolist() == last.info["kept_counts"]
    assert last.n_tokens % 6 == 0 and last.n_tokens <= end.n_tokens
    if protocol == "ratio:0.5":
        half = last.n_tokens // 2
        assert ((last.kept_counts() >= half) & (last.kept_counts() <= half + 1)).all()
        assert last.policy["budget"] == "ratio:0.5"
    else:
        assert last.policy["budget"] is None and last.policy["threshold"] == 0.0
    # shares are kept / seen per type; the three types' kept tokens add up to the layer's cache
    seen = last.seen_by_type()
    assert seen.tolist() == [last.n_tokens // 3] * 3
    np.testing.assert_allclose(
        (last.share_by_layer_type() * seen * last.mask.shape[1]).sum(1), last.kept_counts().sum(1), rtol=1e-12
    )
    png = plot_keep_maps({protocol: last, f"{protocol} end": end}, tmp_path / "keep.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_namm_policy_follows_the_protocol():
    from namm_transfer.namm import NAMM
    from namm_transfer.protocols import parse_protocols

    namm = NAMM()
    assert namm_policy(namm, "ratio:0.25").budget.describe() == "ratio:0.25"
    (threshold,) = parse_protocols("threshold")
    assert namm_policy(namm, threshold).budget is None


def test_keep_map_command_writes_the_picture_and_its_numbers(tmp_path, capsys):
    pytest.importorskip("mujoco")
    from namm_transfer.evals.offline_rl.keep_map import main
    from namm_transfer.evals.offline_rl.train import SIDECAR

    from namm_transfer.checkpoint import save_namm
    from namm_transfer.namm import NAMM

    model = _tiny_dt(5, 3)
    model.save_pretrained(tmp_path / "dt")
    side = {"env": "hopper-po", "state_mean": [0.0] * 5, "state_std": [1.0] * 5, "return_scale": 1000.0}
    (tmp_path / "dt" / SIDECAR).write_text(json.dumps(side))
    g = torch.Generator().manual_seed(1)
    namm = NAMM()
    namm.set_flat(0.1 * torch.randn(namm.n_params, generator=g))
    namm.set_normalization(torch.zeros(namm.config.n_bins), torch.ones(namm.config.n_bins))
    save_namm(namm, tmp_path / "namm")
    argv = ["--env", "hopper-po", "--model", str(tmp_path / "dt"), "--namm", str(tmp_path / "namm")]
    argv += ["--max-steps", "20", "--update-interval", "6", "--step", "-1", "--output", str(tmp_path / "k" / "m.png")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ratio-50: " in out and "threshold: " in out and "m.json" in out
    assert (tmp_path / "k" / "m.png").read_bytes()[:4] == b"\x89PNG"
    digest = json.loads((tmp_path / "k" / "m.json").read_text())
    assert digest["env"] == "hopper-po" and list(digest["maps"]) == ["ratio-50", "threshold"]
    for m in digest["maps"].values():
        assert m["step"] == m["n_tokens"] // 6 - 1 and m["kept_counts"] == m["episode"]["kept_counts"]
        assert set(m["share_by_layer_type"]["0"]) == {"return", "state", "action"}
    assert digest["maps"]["ratio-50"]["policy"]["budget"] == "ratio:0.5"
    # bad input: a clear error, nothing written
    assert main([*argv[:-1], str(tmp_path / "bad.png"), "--update-interval", "4"]) == 1
    assert "multiple of 3" in capsys.readouterr().err and not (tmp_path / "bad.png").exists()
