"""Decision Transformers whose memory matters: positions-only (partially observable) tasks, their derived
datasets, and long-context training whose cached rollout is the model's own full-history forward.

Real MuJoCo envs with short random-action episodes; tiny DecisionTransformerModel configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import random_d4rl_file

pytest.importorskip("h5py")
pytest.importorskip("mujoco")

from namm_transfer.evals.offline_rl import pomdp  # noqa: E402
from namm_transfer.evals.offline_rl import train as train_mod  # noqa: E402
from namm_transfer.evals.offline_rl.behaviour import run_episodes as behaviour_episodes  # noqa: E402
from namm_transfer.evals.offline_rl.datasets import (  # noqa: E402
    dataset_path,
    read_d4rl_hdf5,
    split_trajectories,
    write_d4rl_hdf5,
)
from namm_transfer.evals.offline_rl.envs import ENVS, get_env_info, make_env, normalized_score  # noqa: E402
from namm_transfer.evals.offline_rl.rollout import CachedDT, run_episodes  # noqa: E402
from namm_transfer.evals.offline_rl.train import TrainConfig, TrajectorySampler, load_dt, train_dt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the observation layout of the Gymnasium MuJoCo tasks, typed in here: qpos without x (nq - 1 entries), then qvel
LAYOUT = {"hopper": (6, 6), "halfcheetah": (9, 9), "walker2d": (9, 9)}  # (nq, nv)
TINY = dict(hidden_size=32, n_layer=2, n_head=2)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """No test may find (or write) datasets in the user's cache."""
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))


class ScriptedPolicy:
    """Seeded uniform random actions, in the interface of :class:`.behaviour.BehaviourPolicy` (``act``)."""

    def __init__(self, act_dim: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.act_dim = act_dim

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        return self.rng.uniform(-1, 1, (len(obs), self.act_dim)).astype(np.float32)


def _collect(path: Path, env: str, seed: int, episodes: int = 3, max_steps: int = 40) -> Path:
    """A short D4RL-format dataset of the fully observed task, through the collector's own rollout code."""
    res = behaviour_episodes(
        ScriptedPolicy(ENVS[env].act_dim, seed),  # type: ignore[arg-type]
        env,
        episodes=episodes,
        seed=seed,
        n_envs=1,
        max_episode_steps=max_steps,
    )
    data = {k: np.concatenate([ep[k] for ep in res.episodes]) for k in res.episodes[0]}
    return write_d4rl_hdf5(path, data, {"env_name": env, "level": "medium", "seed": seed})


# ----- 1. partially observable tasks -----------------------------------------------------------------------------
def test_po_tasks_names_sizes_and_scores():
    assert {n: (i.state_dim, i.act_dim) for n, i in pomdp.PO_ENVS.items()} == {
        "hopper-po": (5, 3),
        "halfcheetah-po": (8, 6),
        "walker2d-po": (8, 6),
    }
    for name, (nq, nv) in LAYOUT.items():
        assert ENVS[name].state_dim == (nq - 1) + nv and pomdp.POSITION_DIMS[name] == nq - 1
    assert get_env_info("Hopper-PO-medium").name == "hopper-po" and get_env_info("walker2d-po").state_dim == 8
    assert get_env_info("hopper-medium-v2").name == "hopper" and get_env_info("Hopper-v5").name == "hopper"
    assert pomdp.base_name("halfcheetah-po") == "halfcheetah" and pomdp.base_name("hopper") == "hopper"
    assert get_env_info("hopper-po").gym_id() == "Hopper-v5"
    assert normalized_score("hopper-po", 1000.0) == normalized_score("hopper", 1000.0)
    assert dataset_path("hopper-po", "medium").name == "hopper-po-medium.hdf5"
    assert list(ENVS) == ["hopper", "halfcheetah", "walker2d"]  # `--env all` stays the three full tasks
    with pytest.raises(ValueError, match="unknown offline-RL environment"):
        get_env_info("ant-po")


@pytest.mark.parametrize("env", list(LAYOUT))
def test_po_env_observes_qpos_without_x(env):
    """The wrapper's observation is the env's joint positions without x, and the full observation's first
    entries, on the same seed and actions."""
    n = LAYOUT[env][0] - 1
    po = make_env(f"{env}-po", seed=3, max_episode_steps=30)
    full = make_env(env, seed=3, max_episode_steps=30)
    try:
        assert po.observation_space.shape == (n,) and po.action_space.shape == full.action_space.shape
        rng = np.random.default_rng(0)
        o, _ = po.reset(seed=5)
        f, _ = full.reset(seed=5)
        for t in range(12):
            assert o.shape == (n,) and o.dtype == np.float64
            np.testing.assert_array_equal(o, po.unwrapped.data.qpos[1:], err_msg=f"step {t}")
            np.testing.assert_array_equal(o, f[:n], err_msg=f"step {t}")
            assert f.shape == (ENVS[env].state_dim,)
            a = rng.uniform(-1, 1, ENVS[env].act_dim)
            o, r, term, trunc, _ = po.step(a)
            f, rf, term_f, trunc_f, _ = full.step(a)
            assert (r, term, trunc) == (rf, term_f, trunc_f)
            if term or trunc:
                break
    finally:
        po.close()
        full.close()
    with pytest.raises(ValueError, match="default observation"):
        make_env(f"{env}-po", exclude_current_positions_from_observation=False)


@pytest.mark.parametrize("env", list(LAYOUT))
def test_derived_dataset_equals_wrapper_step_by_step(tmp_path, env):
    """Must-show: a dataset collected on the fully observed task and derived offline holds, step by step, the
    observations the positions-only env wrapper gives on the same seeds and actions."""
    seed = 11
    src = _collect(tmp_path / f"{env}.hdf5", env, seed)
    dst = pomdp.derive_po_file(src, env, "medium", tmp_path / f"{env}-po.hdf5")
    full, po = read_d4rl_hdf5(src), read_d4rl_hdf5(dst)
    n = LAYOUT[env][0] - 1
    assert po["observations"].shape == (len(full["rewards"]), n) and po["next_observations"].shape[1] == n
    for key in ("actions", "rewards", "terminals", "timeouts", "infos/qpos", "infos/qvel"):
        np.testing.assert_array_equal(po[key], full[key], err_msg=key)
    # positions = the recorded qpos without x
    np.testing.assert_array_equal(po["observations"], full["infos/qpos"][:, 1:])
    meta = po["metadata"]
    assert meta["env_name"] == f"{env}-po" and meta["dataset_name"] == f"{env}-po-medium"
    assert meta["observed_dims"] == list(range(n)) and meta["seed"] == seed and meta["derived_from"] == str(src)

    trajs = split_trajectories(po)
    assert len(trajs) == 3 and any(t["terminals"][-1] or t["timeouts"][-1] for t in trajs)
    wrapped = make_env(f"{env}-po", max_episode_steps=40)
    try:
        for i, traj in enumerate(trajs):  # the collector resets with the seed once, then continues the stream
            obs, _ = wrapped.reset(seed=seed) if i == 0 else wrapped.reset()
            for t in range(len(traj["rewards"])):
                np.testing.assert_array_equal(traj["observations"][t], obs.astype(np.float32), err_msg=f"ep {i} t {t}")
                obs, r, term, trunc, _ = wrapped.step(traj["actions"][t])
                np.testing.assert_array_equal(traj["next_observations"][t], obs.astype(np.float32))
                assert traj["rewards"][t] == np.float32(r)
                assert (bool(traj["terminals"][t]), bool(traj["timeouts"][t])) == (term, trunc)
            assert term or trunc
    finally:
        wrapped.close()


def test_derive_po_command_and_errors(tmp_path, capsys):
    from namm_transfer.cli import main

    src = _collect(tmp_path / "hopper.hdf5", "hopper", 0, episodes=1, max_steps=10)
    cache_target = dataset_path("hopper-po", "medium")
    assert main(["rl", "derive-po", "--env", "hopper", "--input", str(src)]) == 0
    assert read_d4rl_hdf5(cache_target)["observations"].shape[1] == 5
    assert main(["rl", "derive-po", "--env", "hopper", "--input", str(src)]) == 0
    assert "exists; kept" in capsys.readouterr().out
    # no collected dataset: the command to make it
    assert main(["rl", "derive-po", "--env", "walker2d"]) == 1
    assert "namm-transfer rl collect --env walker2d --level medium" in capsys.readouterr().err
    # an already derived file is not a source
    with pytest.raises(ValueError, match="positions-only data is derived from the fully observed dataset"):
        pomdp.derive_dataset({**read_d4rl_hdf5(cache_target), "metadata": {}}, "hopper")
    # another task's file
    with pytest.raises(ValueError, match="collected on 'hopper', not 'walker2d'"):
        pomdp.derive_po_file(src, "walker2d", output=tmp_path / "x.hdf5")


# ----- 2. long-context Decision Transformers ----------------------------------------------------------------------
def _long_dataset(path: Path, env: str = "hopper", lengths=(380, 250, 320, 60), seed: int = 0) -> Path:
    s, a = get_env_info(env).state_dim, get_env_info(env).act_dim
    rng = np.random.default_rng(seed)
    timeout = [i == len(lengths) - 1 for i in range(len(lengths))]  # the last trajectory times out
    return random_d4rl_file(path, env, s, a, lengths, timeout, rng)


def test_prefix_segments_and_trimmed_padding(tmp_path):
    data = read_d4rl_hdf5(_long_dataset(tmp_path / "d.hdf5", lengths=(30, 12, 25, 8)))
    k, b = 100, 16
    # every segment a prefix: timesteps 0.., the first return-to-go is the episode's return
    sampler = TrajectorySampler(data, context=k, return_scale=10.0, max_ep_len=200, prefix_fraction=1.0)
    batch = sampler.sample(np.random.default_rng(0), b)
    mask = batch["attention_mask"]
    width = mask.shape[1]
    assert width == int(mask.sum(1).max()) == 30 < k  # all-padding columns left out; the longest episode is 30
    returns = {round(float(t["rewards"].sum()) / 10.0, 4): len(t["rewards"]) for t in split_trajectories(data)}
    for row in range(b):
        real = mask[row].bool()
        steps = batch["timesteps"][row][real]
        assert steps.tolist() == list(range(int(real.sum())))
        first_rtg = round(float(batch["returns_to_go"][row][real][0, 0]), 4)
        assert returns[first_rtg] == int(real.sum())  # the whole episode
    # prefix_fraction 0 draws exactly the canonical random numbers (the canonical batches are unchanged)
    canon = TrajectorySampler(data, context=5, return_scale=10.0, max_ep_len=200)
    rng, ref = np.random.default_rng(1), np.random.default_rng(1)
    canon.sample(rng, b)
    ref.choice(len(canon.lengths), size=b, p=canon.p)
    ref.random(b)
    assert rng.random() == ref.random()
    # mixed: some rows start at 0, some do not
    mixed = TrajectorySampler(data, context=k, return_scale=10.0, max_ep_len=200, prefix_fraction=0.5)
    mb = mixed.sample(np.random.default_rng(2), 32)
    first = torch.stack([mb["timesteps"][r][mb["attention_mask"][r].bool()][0] for r in range(32)])
    assert 4 < int((first == 0).sum()) < 28
    # the trimmed batch gives every real token the output it has when left-padded to K
    cfg = TrainConfig(context=k, max_ep_len=200, dropout=0.0, **TINY)
    torch.manual_seed(0)
    model = train_mod.build_dt(sampler.state_dim, sampler.act_dim, cfg).eval()
    pad = k - width

    def left(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros(x.shape[0], pad, *x.shape[2:], dtype=x.dtype), x], dim=1)

    with torch.no_grad():
        got = model(**{key: v for key, v in mb.items()}, return_dict=True).action_preds
        padded = model(**{key: left(v) for key, v in mb.items()}, return_dict=True).action_preds[:, pad:]
    real = mb["attention_mask"].bool()
    torch.testing.assert_close(got[real], padded[real], atol=1e-5, rtol=0)


def _uncached(model, states, actions, rtg, first: int = 0):
    """DecisionTransformerModel.forward over the history ``first .. first + T - 1`` (placeholder zero action last)."""
    b, t = states.shape[:2]
    acts = torch.cat([actions[:, : t - 1], torch.zeros(b, 1, actions.shape[-1])], dim=1)
    with torch.no_grad():
        out = model(
            states=states,
            actions=acts,
            returns_to_go=rtg[..., None],
            timesteps=torch.arange(first, first + t).expand(b, t),
            attention_mask=torch.ones(b, t, dtype=torch.long),
        )
    return out.action_preds[:, -1]


def test_long_context_dt_cached_rollout_equals_full_history_forward(tmp_path):
    """Must-show: a DT trained on 300-step (900-token) segments, loaded back, acts in the cached full-history mode
    exactly as its own forward over the whole history, at every step up to 350 (1049 tokens, beyond the 1024
    position slots GPT-2 would have). The trained weights are then redrawn larger (as the tiny test DTs are) so
    that the whole history shows in the actions: a cache that lost old tokens would fail."""
    k, steps = 300, 350
    cfg = TrainConfig(
        env="hopper",
        dataset=str(_long_dataset(tmp_path / "d.hdf5")),
        steps=3,
        batch_size=2,
        context=k,
        prefix_fraction=0.5,
        max_ep_len=400,
        warmup=1,
        lr=1e-3,
        checkpoint_every=3,
        eval_every=0,
        final_eval=False,
        **TINY,
    )
    train_dt(cfg, tmp_path / "long")
    model, info = load_dt(tmp_path / "long")
    assert info["context_length"] == k and info["max_ep_len"] == 400
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 and "timestep" not in name:
                p.normal_(0.0, 0.2)
    assert json.loads((tmp_path / "long" / "config.json").read_text())["n_positions"] == 1024
    g = torch.Generator().manual_seed(0)
    b = 2
    states = torch.randn(b, steps, info["state_dim"], generator=g)
    rtg = 3.6 - 0.01 * torch.rand(b, steps, generator=g).cumsum(1)

    def drive(actor):
        actor.reset(b)
        return torch.stack([actor.act(rtg[:, i], states[:, i]) for i in range(steps)], dim=1)

    with CachedDT(model, "full") as actor:
        cached = drive(actor)
        assert actor.seen_tokens().tolist() == [3 * steps - 1] * b
    for i in range(steps):
        ref = _uncached(model, states[:, : i + 1], cached[:, : i + 1], rtg[:, : i + 1])
        torch.testing.assert_close(cached[:, i], ref, atol=1e-5, rtol=0, msg=f"step {i}")
    # the history matters: without its first 100 steps the last action is another
    last = steps - 1
    cut = _uncached(model, states[:, 100:], cached[:, 100:], rtg[:, 100:], first=100)
    assert (cut - cached[:, last]).abs().max() > 1e-3


def test_po_long_context_training_resumes_evaluates_and_ships(tmp_path, monkeypatch):
    """hopper-po end to end: derived data, long-context training stopped and resumed (same losses as one run),
    final evaluation in the positions-only env, load by the sidecar's task, cached rollout, shipping by name."""
    src = _collect(tmp_path / "hopper.hdf5", "hopper", 2, episodes=4, max_steps=60)
    data = pomdp.derive_po_file(src, "hopper", "medium")  # the default place, where training looks
    base = dict(
        env="hopper-po",
        steps=4,
        batch_size=3,
        context=60,
        prefix_fraction=0.5,
        max_ep_len=100,
        warmup=2,
        log_every=1,
        checkpoint_every=2,
        eval_every=0,
        eval_episodes=1,
        eval_max_ep_len=8,
        **TINY,
    )
    one = train_dt(TrainConfig(**base), tmp_path / "one")
    part = train_dt(TrainConfig(**base), tmp_path / "two", stop_at=2)
    assert not part.finished and part.step == 2
    with pytest.raises(ValueError, match="prefix_fraction"):
        train_dt(TrainConfig(**{**base, "prefix_fraction": 1.0}), tmp_path / "two")
    rest = train_dt(TrainConfig(**base), tmp_path / "two")
    assert rest.resumed_from == 2 and part.losses + rest.losses == one.losses
    side = json.loads((tmp_path / "two" / train_mod.SIDECAR).read_text())
    assert side["env"] == "hopper-po" and side["state_dim"] == 5 and side["dataset"]["path"] == str(data)
    assert side["eval"]["episodes"] == 1 and side["training"]["config"]["prefix_fraction"] == 0.5
    assert "Long context" in (tmp_path / "two" / "README.md").read_text()
    model, info = load_dt(tmp_path / "two")
    assert info["env"] == "hopper-po" and info["context_length"] == 60
    res = run_episodes(
        model, "hopper-po", 1, mode="cached", max_ep_len=8, state_mean=info["state_mean"], state_std=info["state_std"]
    )
    assert 1 <= res["lengths"][0] <= 8
    with pytest.raises(ValueError, match="hopper has observations of size 11"):
        load_dt(tmp_path / "two", env="hopper")
    # a fully observed dataset for a -po run names the command that derives the right one
    with pytest.raises(ValueError, match="rl derive-po --env hopper"):
        train_dt(TrainConfig(**{**base, "dataset": str(src)}), tmp_path / "three")
    # shipped under its own name, found by it (the task is two words)
    monkeypatch.setattr(train_mod, "shipped_dt_dir", lambda: tmp_path / "weights" / "dt")
    dest = train_mod.ship_dt(tmp_path / "two", "hopper-po-medium-long")
    card = (dest / "README.md").read_text()
    assert card.startswith("# Decision Transformer: hopper-po-medium-long\n")
    assert 'load_dt("shipped:hopper-po-medium-long")' in card and "K-step window, K = 60)" in card
    assert "canonical K-step" not in card and "--model shipped:hopper-po-medium-long" in card
    assert f'load_dt("{(tmp_path / "two").as_posix()}")' in card
    _, shipped = load_dt("shipped:hopper-po-medium-long")
    assert shipped["env"] == "hopper-po" and shipped["content_hash"] == info["content_hash"]
    assert train_mod.resolve_dt("shipped", "hopper-po") == "shipped:hopper-po-medium"


@pytest.mark.parametrize("name, env", [("hopper-medium-long", "hopper"), ("hopper-po-medium-long", "hopper-po")])
def test_shipped_long_context_dt_cached_rollout_equals_its_full_history_forward(name, env):
    """Each shipped long-context DT (K=200), unmodified: its cached full-history rollout acts as its own
    forward over the whole history, checked at steps past its 200-step training window (up to 450 steps, 1,349
    tokens), and the history beyond the window changes its action (so the comparison is not vacuous)."""
    model, info = load_dt(f"shipped:{name}")
    assert info["context_length"] == 200 and info["env"] == env
    steps, b = 450, 2
    g = torch.Generator().manual_seed(1)
    states = torch.randn(b, steps, info["state_dim"], generator=g)  # already in normalized units
    rtg = 3.6 - 0.003 * torch.rand(b, steps, generator=g).cumsum(1)
    with CachedDT(model, "full") as actor:
        actor.reset(b)
        cached = torch.stack([actor.act(rtg[:, i], states[:, i]) for i in range(steps)], dim=1)
        assert actor.seen_tokens().tolist() == [3 * steps - 1] * b
    for i in (0, 199, 200, steps - 1):
        ref = _uncached(model, states[:, : i + 1], cached[:, : i + 1], rtg[:, : i + 1])
        torch.testing.assert_close(cached[:, i], ref, atol=1e-5, rtol=0, msg=f"step {i}")
    last = steps - 1
    cut = _uncached(model, states[:, 200:], cached[:, 200:], rtg[:, 200:], first=200)
    assert (cut - cached[:, last]).abs().max() > 1e-4
