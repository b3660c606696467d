"""Offline-RL data: task constants, D4RL HDF5 layout, Minari reading, environments and PPO data collection."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import pytest
from namm_transfer.evals.offline_rl import datasets as ds
from namm_transfer.evals.offline_rl import envs, minari_io

# ----------------------------------------------------------------------------------------------------------------
# helpers


def _toy_dataset(n_obs: int = 3, n_act: int = 2) -> dict[str, np.ndarray]:
    """Ten steps: an episode of 3 ending in a terminal, one of 4 ending in a timeout, a partial one of 3."""
    rng = np.random.default_rng(0)
    n = 10
    terminals = np.zeros(n, dtype=bool)
    timeouts = np.zeros(n, dtype=bool)
    terminals[2] = True
    timeouts[6] = True
    return {
        "observations": rng.standard_normal((n, n_obs)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (n, n_act)).astype(np.float32),
        "rewards": np.arange(n, dtype=np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
        "next_observations": rng.standard_normal((n, n_obs)).astype(np.float32),
        "infos/qpos": rng.standard_normal((n, 4)).astype(np.float32),
    }


def _toy_minari_episodes() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    eps = []
    for t, term, trunc in ((4, True, False), (3, False, True), (2, False, False)):
        terminations = np.zeros(t, dtype=bool)
        truncations = np.zeros(t, dtype=bool)
        terminations[-1], truncations[-1] = term, trunc
        eps.append(
            {
                "observations": rng.standard_normal((t + 1, 3)),
                "actions": rng.uniform(-1, 1, (t, 2)).astype(np.float32),
                "rewards": rng.standard_normal(t),
                "terminations": terminations,
                "truncations": truncations,
            }
        )
    return eps


# ----------------------------------------------------------------------------------------------------------------
# constants and scores


def test_normalized_score_uses_d4rl_constants():
    assert envs.normalized_score("hopper", 3234.3) == pytest.approx(100.0, abs=1e-9)
    assert envs.normalized_score("hopper", -20.272305) == pytest.approx(0.0, abs=1e-9)
    assert envs.normalized_score("halfcheetah", 12135.0) == pytest.approx(100.0, abs=1e-9)
    assert envs.normalized_score("halfcheetah", -280.178953) == pytest.approx(0.0, abs=1e-9)
    assert envs.normalized_score("walker2d", 4592.3) == pytest.approx(100.0, abs=1e-9)
    assert envs.normalized_score("walker2d", 1.629008) == pytest.approx(0.0, abs=1e-9)
    mid = (3234.3 + -20.272305) / 2
    assert envs.normalized_score("hopper", mid) == pytest.approx(50.0)
    assert isinstance(envs.normalized_score("hopper", 1000.0), float)
    arr = envs.normalized_score("hopper-medium-v2", np.array([-20.272305, 3234.3]))
    np.testing.assert_allclose(arr, [0.0, 100.0], atol=1e-9)
    assert envs.normalized_score("Hopper-v5", 3234.3) == pytest.approx(100.0)


def test_env_table():
    assert (envs.ENVS["hopper"].state_dim, envs.ENVS["hopper"].act_dim) == (11, 3)
    assert (envs.ENVS["halfcheetah"].state_dim, envs.ENVS["halfcheetah"].act_dim) == (17, 6)
    assert (envs.ENVS["walker2d"].state_dim, envs.ENVS["walker2d"].act_dim) == (17, 6)
    assert {k: v.target_return for k, v in envs.ENVS.items()} == {
        "hopper": 3600.0,
        "halfcheetah": 12000.0,
        "walker2d": 5000.0,
    }
    assert all(v.max_ep_len == 1000 for v in envs.ENVS.values())
    assert envs.ENVS["walker2d"].gym_id() == "Walker2d-v5"
    assert envs.ENVS["halfcheetah"].gym_id("v4") == "HalfCheetah-v4"


def test_unknown_env_and_version_raise():
    with pytest.raises(ValueError, match=r"unknown offline-RL environment 'ant'.*halfcheetah.*hopper.*walker2d"):
        envs.normalized_score("ant", 1.0)
    with pytest.raises(ValueError, match="known environments"):
        envs.make_env("humanoid")
    with pytest.raises(ValueError, match="known versions"):
        envs.make_env("hopper", version="v3")


def test_check_observation():
    obs = np.zeros(11)
    assert envs.check_observation(obs, step=3) is not None
    obs[4] = np.nan
    with pytest.raises(ValueError, match="non-finite observation at step 7 of hopper"):
        envs.check_observation(obs, step=7, env_name="hopper")
    with pytest.raises(ValueError, match="non-finite observation"):
        envs.check_observation(np.array([[0.0, np.inf]]))


@pytest.mark.parametrize("name", ["hopper", "halfcheetah", "walker2d"])
def test_make_env_reset_and_step(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo 4 writes MUJOCO_LOG.TXT (HalfCheetah's deprecated settotalmass) to the cwd
    info = envs.ENVS[name]
    env = envs.make_env(name, seed=0)
    try:
        obs, _ = env.reset(seed=1)
        assert obs.shape == (info.state_dim,)
        assert env.action_space.shape == (info.act_dim,)
        assert env.spec.max_episode_steps == 1000
        obs2, reward, terminated, truncated, _ = env.step(np.zeros(info.act_dim, dtype=np.float32))
        envs.check_observation(obs2, step=0, env_name=name)
        assert np.isfinite(reward) and not truncated
    finally:
        env.close()


# ----------------------------------------------------------------------------------------------------------------
# D4RL HDF5 layout


def test_hdf5_round_trip_is_exact(tmp_path):
    data = _toy_dataset()
    meta = {
        "env_name": "hopper",
        "level": "medium",
        "seed": 3,
        "behaviour_score_mean": 47.25,
        "in_band": True,
        "target_band": [40.0, 60.0],
        "versions": {"numpy": "2.x"},
        "rollout_seed": None,
    }
    path = ds.write_d4rl_hdf5(tmp_path / "sub" / "hopper-medium.hdf5", data, meta)
    assert path.is_file()
    assert not list(path.parent.glob(".*tmp*")), "the temporary file must be gone"
    back = ds.read_d4rl_hdf5(path)
    assert back.pop("metadata") == meta
    assert set(back) == set(data)
    for key, value in data.items():
        assert back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value)
    with h5py.File(path) as f:
        assert f["observations"].dtype == np.float32 and f["terminals"].dtype == bool
        assert "qpos" in f["infos"]
        assert f["metadata"].attrs["level"] == "medium"
    assert ds.read_metadata(path) == meta
    # re-writing what was read gives the same file contents
    again = ds.read_d4rl_hdf5(ds.write_d4rl_hdf5(tmp_path / "again.hdf5", ds.read_d4rl_hdf5(path)))
    assert again.pop("metadata") == meta


def test_write_casts_dtypes(tmp_path):
    data = _toy_dataset()
    data["observations"] = data["observations"].astype(np.float64)
    data["terminals"] = data["terminals"].astype(np.int64)
    back = ds.read_d4rl_hdf5(ds.write_d4rl_hdf5(tmp_path / "x.hdf5", data))
    assert back["observations"].dtype == np.float32 and back["terminals"].dtype == bool
    np.testing.assert_array_equal(back["terminals"], data["terminals"].astype(bool))


def test_missing_key_error_lists_it(tmp_path):
    data = _toy_dataset()
    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        for key in ("observations", "actions", "rewards"):
            f.create_dataset(key, data=data[key])
    with pytest.raises(ds.DatasetFormatError) as err:
        ds.read_d4rl_hdf5(tmp_path / "bad.hdf5")
    msg = str(err.value)
    assert "bad.hdf5 lacks required keys ['terminals', 'timeouts']" in msg
    assert "needs observations, actions, rewards, terminals, timeouts" in msg
    del data["timeouts"]
    with pytest.raises(ds.DatasetFormatError, match=r"lacks required keys \['timeouts'\]"):
        ds.write_d4rl_hdf5(tmp_path / "never.hdf5", data)
    assert not (tmp_path / "never.hdf5").exists()
    with pytest.raises(FileNotFoundError):
        ds.read_d4rl_hdf5(tmp_path / "absent.hdf5")


def test_inconsistent_or_non_finite_data_rejected(tmp_path):
    data = _toy_dataset()
    data["rewards"] = data["rewards"][:-1]
    with pytest.raises(ds.DatasetFormatError, match="mismatched.*rewards"):
        ds.validate_dataset(data)
    data = _toy_dataset()
    data["observations"][5, 1] = np.nan
    with pytest.raises(ds.DatasetFormatError, match="'observations' holds 1 non-finite values .first at row 5"):
        ds.write_d4rl_hdf5(tmp_path / "nan.hdf5", data)
    # a file written by someone else with a NaN is caught on reading
    with h5py.File(tmp_path / "nan.hdf5", "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)
    with pytest.raises(ds.DatasetFormatError, match="non-finite"):
        ds.read_d4rl_hdf5(tmp_path / "nan.hdf5")
    assert ds.read_d4rl_hdf5(tmp_path / "nan.hdf5", check=False)["observations"].shape == (10, 3)


def test_split_trajectories_on_terminal_and_timeout_boundaries():
    data = _toy_dataset()
    trajs = ds.split_trajectories(data)
    assert [len(t["rewards"]) for t in trajs] == [3, 4, 3]
    np.testing.assert_array_equal(trajs[0]["rewards"], [0, 1, 2])
    np.testing.assert_array_equal(trajs[1]["rewards"], [3, 4, 5, 6])
    np.testing.assert_array_equal(trajs[2]["rewards"], [7, 8, 9])  # trailing partial episode kept
    assert trajs[0]["terminals"][-1] and trajs[1]["timeouts"][-1]
    assert not (trajs[2]["terminals"].any() or trajs[2]["timeouts"].any())
    np.testing.assert_array_equal(trajs[1]["infos/qpos"], data["infos/qpos"][3:7])
    assert set(trajs[0]) == set(data)
    # flags on the last step: no empty trailing episode
    data["timeouts"][-1] = True
    assert [len(t["rewards"]) for t in ds.split_trajectories(data)] == [3, 4, 3]


def test_dataset_stats():
    data = _toy_dataset()
    stats = ds.dataset_stats(ds.split_trajectories(data), env_name="hopper")
    np.testing.assert_allclose(stats["returns"], [3.0, 18.0, 24.0])
    np.testing.assert_array_equal(stats["lengths"], [3, 4, 3])
    assert stats["num_trajectories"] == 3 and stats["num_steps"] == 10
    np.testing.assert_allclose(stats["state_mean"], data["observations"].mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats["state_std"], data["observations"].std(0) + 1e-6, rtol=1e-5)
    assert stats["state_mean"].shape == (3,)
    assert stats["return_max"] == 24.0
    assert stats["normalized_return_mean"] == pytest.approx(
        float(np.mean(envs.normalized_score("hopper", [3, 18, 24])))
    )


def test_cache_dir_and_dataset_path(monkeypatch, tmp_path):
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path))
    assert ds.cache_dir() == tmp_path
    assert ds.dataset_path("hopper", "medium") == tmp_path / "d4rl" / "hopper-medium.hdf5"
    assert ds.dataset_path("walker2d", "expert", "v4") == tmp_path / "d4rl" / "walker2d-expert-v4.hdf5"
    monkeypatch.delenv("NAMM_TRANSFER_CACHE")
    assert str(ds.cache_dir()).endswith(".cache/namm-transfer")


# ----------------------------------------------------------------------------------------------------------------
# Minari


def _check_minari_conversion(data, eps):
    assert set(data) >= {"observations", "actions", "rewards", "terminals", "timeouts", "next_observations"}
    np.testing.assert_array_equal(
        data["observations"], np.concatenate([e["observations"][:-1] for e in eps]).astype(np.float32)
    )
    np.testing.assert_array_equal(
        data["next_observations"], np.concatenate([e["observations"][1:] for e in eps]).astype(np.float32)
    )
    np.testing.assert_array_equal(data["actions"], np.concatenate([e["actions"] for e in eps]))
    np.testing.assert_array_equal(data["rewards"], np.concatenate([e["rewards"] for e in eps]).astype(np.float32))
    # the flags step by step: episode 0 terminates, 1 is truncated, 2 ends without a flag (read as a timeout)
    np.testing.assert_array_equal(data["terminals"], [0, 0, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(data["timeouts"], [0, 0, 0, 0, 0, 0, 1, 0, 1])
    trajs = ds.split_trajectories(data)
    assert [len(t["rewards"]) for t in trajs] == [4, 3, 2]
    assert trajs[0]["terminals"][-1] and trajs[1]["timeouts"][-1]
    assert trajs[2]["timeouts"][-1], "an episode ending without a flag is marked as a timeout"
    assert data["observations"].dtype == np.float32 and data["terminals"].dtype == bool


@pytest.mark.parametrize("writer", ["minari", "layout"])
@pytest.mark.parametrize("reader", ["minari", "fallback"])
def test_minari_round_trip(tmp_path, monkeypatch, writer, reader):
    eps = _toy_minari_episodes()
    folder = minari_io.write_minari_fixture(tmp_path, "test/toy/tiny-v0", eps, use_minari=writer == "minari")
    assert (folder / "data" / "main_data.hdf5").is_file() and (folder / "data" / "metadata.json").is_file()
    use = reader == "minari"
    data = ds.read_minari(folder, use_minari=use)
    _check_minari_conversion(data, eps)
    meta = data["metadata"]
    assert meta["source"] == "minari" and meta["total_episodes"] == 3 and meta["total_steps"] == 9
    assert meta["reader"] == ("minari" if use else "h5py-fallback")
    # by dataset id, under MINARI_DATASETS_PATH, and via the data folder itself
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    _check_minari_conversion(ds.read_minari("test/toy/tiny-v0", use_minari=use), eps)
    _check_minari_conversion(ds.read_minari(folder / "data", use_minari=use), eps)


def test_minari_missing_dataset_message(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found locally.*minari download mujoco/hopper/medium-v0"):
        ds.read_minari("mujoco/hopper/medium-v0")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Minari dataset folder"):
        ds.read_minari(tmp_path / "empty")


def test_minari_data_written_as_d4rl(tmp_path):
    eps = _toy_minari_episodes()
    folder = minari_io.write_minari_fixture(tmp_path, "test/toy/tiny-v0", eps, use_minari=False)
    data = ds.read_minari(folder, use_minari=False)
    back = ds.read_d4rl_hdf5(ds.write_d4rl_hdf5(tmp_path / "converted.hdf5", data))
    assert back["metadata"]["dataset_id"] == "test/toy/tiny-v0"
    np.testing.assert_array_equal(back["observations"], data["observations"])


# ----------------------------------------------------------------------------------------------------------------
# imports stay cheap


def test_imports_are_cheap():
    code = (
        "import sys, argparse\n"
        "import namm_transfer.evals.offline_rl as rl\n"
        "from namm_transfer.evals.offline_rl import cli_collect, collect, datasets, envs, behaviour, minari_io\n"
        "p = argparse.ArgumentParser(); cli_collect.add_arguments(p)\n"
        "a = p.parse_args(['--env', 'all', '--level', 'medium-replay', '--max-steps', '5', '--version', 'v4'])\n"
        "assert (a.env, a.level, a.max_steps, a.version, a.seed) == ('all', 'medium-replay', 5, 'v4', 0), a\n"
        "heavy = [m for m in ('torch', 'gymnasium', 'h5py', 'minari', 'stable_baselines3', 'mujoco')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(rl.collect_dataset) and callable(rl.read_d4rl_hdf5)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_rejects_file_output_for_all(tmp_path):
    from namm_transfer.evals.offline_rl import cli_collect

    parser = argparse.ArgumentParser()
    cli_collect.add_arguments(parser)
    args = parser.parse_args(["--env", "all", "--output", str(tmp_path / "x.hdf5")])
    assert cli_collect.main(args) == 2


# ----------------------------------------------------------------------------------------------------------------
# data collection (real PPO, tiny budget)


def _check_saved_run_reloads_exactly(run_dir):
    """The snapshot acts as the model that was saved; a resumed run holds the saved weights, Adam state, counts and
    normalization; a folder in stable-baselines3's pickle format is refused, not unpickled."""
    import torch
    from namm_transfer.evals.offline_rl.behaviour import BehaviourPolicy, BehaviourRun

    run = BehaviourRun("hopper", run_dir=run_dir, record=False)
    run.load_or_create()
    state = json.loads((run_dir / "latest.json").read_text())
    assert run.model.num_timesteps == state["num_timesteps"] == 1024 and run.model._n_updates == state["n_updates"]
    np.testing.assert_array_equal(run.venv.obs_rms.mean, state["obs_rms"]["mean"])
    assert run.venv.ret_rms.count == state["ret_rms"]["count"]
    adam = run.model.policy.optimizer.state_dict()["state"]
    assert adam and all(float(v["exp_avg_sq"].abs().sum()) > 0 for v in adam.values())  # not a fresh optimizer
    snap = BehaviourPolicy.load(run_dir / "snapshots" / "round_0000")
    live = run.current_policy()
    for a, b in zip(snap.policy.state_dict().values(), live.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    obs = np.random.default_rng(0).normal(size=(5, 11)).astype(np.float32)
    np.testing.assert_array_equal(snap.act(obs, deterministic=True), live.act(obs, deterministic=True))
    np.testing.assert_array_equal(snap.obs_mean, live.obs_mean)

    # a resume asked with other settings continues the saved model with its own (as SB3's load did)
    from namm_transfer.evals.offline_rl.behaviour import PPOConfig

    other = BehaviourRun("hopper", run_dir=run_dir, config=PPOConfig(net_arch=(8, 8)), record=False)
    other.load_or_create()
    assert other.config == run.config and other.config.net_arch == (32, 32)
    for a, b in zip(other.model.policy.state_dict().values(), run.model.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    legacy = run_dir.parent / "legacy"
    (legacy / "snapshots").mkdir(parents=True)
    (legacy / "latest.zip").write_bytes(b"PK")
    (legacy / "snapshots" / "round_0000.zip").write_bytes(b"PK")
    with pytest.raises(ValueError, match="pickle, which is not loaded"):
        BehaviourRun("hopper", run_dir=legacy, record=False).load_or_create()
    with pytest.raises(ValueError, match="pickle, which is not loaded"):
        BehaviourPolicy.load(legacy / "snapshots" / "round_0000.zip")


@pytest.mark.slow
def test_collect_smoke_and_resume(tmp_path, monkeypatch):
    """1,024 PPO steps, 2 episodes capped at 50 steps; then resume to 1,536 steps and build medium-replay."""
    from namm_transfer.evals.offline_rl.behaviour import PPOConfig
    from namm_transfer.evals.offline_rl.collect import collect

    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path))
    scratch = tmp_path / "tmp"  # the system temporary folder, watched for training's log folders
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    tiny = PPOConfig(n_steps=512, batch_size=256, n_epochs=1, net_arch=(32, 32))
    common = dict(target_band=None, eval_episodes=2, round_steps=1024, ppo_config=tiny, torch_threads=1)
    path = collect("hopper", "medium", episodes=2, max_steps=1024, max_episode_steps=50, **common)
    assert path == tmp_path / "d4rl" / "hopper-medium.hdf5"
    data = ds.read_d4rl_hdf5(path)
    meta = data.pop("metadata")
    trajs = ds.split_trajectories(data)
    assert len(trajs) == 2 and all(1 <= len(t["rewards"]) <= 50 for t in trajs)
    assert all(t["terminals"][-1] or t["timeouts"][-1] for t in trajs)
    assert data["observations"].shape[1] == 11 and data["actions"].shape[1] == 3
    assert np.all(np.abs(data["actions"]) <= 1.0)
    np.testing.assert_array_equal(
        data["observations"][1 : len(trajs[0]["rewards"])], trajs[0]["next_observations"][:-1]
    )
    assert data["infos/qpos"].shape == (len(data["rewards"]), 6)
    assert meta["env_name"] == "hopper" and meta["level"] == "medium" and meta["gym_id"] == "Hopper-v5"
    assert meta["training_timesteps"] == 1024 and meta["seed"] == 0 and meta["behaviour_deterministic"] is False
    assert meta["num_transitions"] == len(data["rewards"])
    assert meta["dataset_score_mean"] == pytest.approx(
        float(np.mean(envs.normalized_score("hopper", [t["rewards"].sum(dtype=np.float64) for t in trajs])))
    )
    assert meta["ppo_hyperparameters"]["n_steps"] == 512
    assert {"gymnasium", "stable-baselines3", "torch"} <= set(meta["package_versions"])
    run_dir = tmp_path / "behaviour" / "hopper-v5-ppo-seed0"
    assert (run_dir / "latest.safetensors").is_file() and (run_dir / "latest.json").is_file()
    assert (run_dir / "snapshots" / "round_0000.safetensors").is_file()
    assert not list(run_dir.rglob("*.zip")) and not list(run_dir.rglob("*.pkl"))  # nothing pickled
    _check_saved_run_reloads_exactly(run_dir)

    # resume: the saved model continues from 1,024 steps
    path2 = collect("hopper", "medium-replay", max_steps=1536, out=tmp_path / "replay.hdf5", **common)
    history = json.loads((run_dir / "history.json").read_text())
    assert [h["timesteps"] for h in history] == [1024, 1536]
    replay = ds.read_d4rl_hdf5(path2)
    assert len(replay["rewards"]) == 1536  # every training transition, raw observations
    assert replay["metadata"]["training_timesteps"] == 1536
    # the environment is reset when training resumes in a new model: the cut is an episode boundary
    done = replay["terminals"] | replay["timeouts"]
    cont = ~done[:-1]
    np.testing.assert_array_equal(replay["next_observations"][:-1][cont], replay["observations"][1:][cont])
    assert done[1023]
    assert list(scratch.glob("SB3-*")) == []  # no stable-baselines3 log folders (new run and resumed run)


@pytest.mark.slow
def test_collect_multi_env_records_every_env_and_resumes_its_settings(tmp_path, monkeypatch):
    """A 2-env run records the transitions of both envs; a resumed run without settings keeps the saved ones."""
    from namm_transfer.evals.offline_rl.behaviour import FAST_PPO_CONFIGS, BehaviourRun, PPOConfig
    from namm_transfer.evals.offline_rl.collect import collect

    assert FAST_PPO_CONFIGS["hopper"].n_envs == 8
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path))
    two = PPOConfig(n_envs=2, n_steps=256, batch_size=256, n_epochs=1, net_arch=(32, 32))
    common = dict(target_band=None, eval_episodes=2, round_steps=512, torch_threads=1)
    path = collect("hopper", "medium-replay", max_steps=512, out=tmp_path / "r.hdf5", ppo_config=two, **common)
    replay = ds.read_d4rl_hdf5(path)
    assert len(replay["rewards"]) == 512  # 256 steps of each env
    done = replay["terminals"] | replay["timeouts"]
    assert done[255]  # the seam between env 0's and env 1's streams is an episode boundary
    cont = ~done[:-1]
    np.testing.assert_array_equal(replay["next_observations"][:-1][cont], replay["observations"][1:][cont])

    run = BehaviourRun("hopper", seed=0)  # no config: the saved run's settings, not the default preset
    assert run.config == two
    run.train_round(512, eval_episodes=1)
    assert run.timesteps == 1024 and run.model.n_envs == 2


def test_cli_keeps_an_existing_dataset_unless_overwrite(tmp_path, monkeypatch, capsys):
    """A finished collection is not redone by a rerun of the same command (resumable pipelines)."""
    from namm_transfer.evals.offline_rl import cli_collect, collect

    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path))
    existing = ds.dataset_path("hopper", "medium")
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"placeholder")
    calls = []
    monkeypatch.setattr(collect, "collect", lambda *a, **k: calls.append(k) or existing)
    parser = argparse.ArgumentParser()
    cli_collect.add_arguments(parser)
    assert cli_collect.main(parser.parse_args(["--env", "hopper"])) == 0
    assert calls == [] and "exists; kept" in capsys.readouterr().out
    assert cli_collect.main(parser.parse_args(["--env", "hopper", "--overwrite"])) == 0
    assert len(calls) == 1
