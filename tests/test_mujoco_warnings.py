"""Making the locomotion envs silences MuJoCo's 'settotalmass is deprecated' warning, and only it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from namm_transfer.evals.offline_rl import envs

mujoco = pytest.importorskip("mujoco")
pytest.importorskip("gymnasium")


@pytest.mark.parametrize("name", sorted(envs.ENVS))
def test_making_an_env_emits_no_settotalmass_warning(name, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # MuJoCo's default handler appends its warnings to MUJOCO_LOG.TXT here
    before = mujoco.get_mju_user_warning()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        envs.make_env(name).close()
    captured = capfd.readouterr()
    assert "settotalmass" not in captured.err + captured.out
    assert not [w for w in caught if "settotalmass" in str(w.message)]
    assert not (tmp_path / "MUJOCO_LOG.TXT").exists()
    assert mujoco.get_mju_user_warning() is before  # the handler is MuJoCo's again once the env is made


def test_the_settotalmass_warning_is_real_and_other_mujoco_warnings_still_pass(tmp_path, monkeypatch, capfd):
    import gymnasium as gym

    monkeypatch.chdir(tmp_path)
    # without the filter, HalfCheetah's XML makes MuJoCo warn (so the test above can fail)
    gym.make("HalfCheetah-v5").close()
    assert envs.SETTOTALMASS_WARNING in capfd.readouterr().err
    (tmp_path / "MUJOCO_LOG.TXT").unlink()

    env = envs.make_env("hopper")
    model, data = env.unwrapped.model, env.unwrapped.data
    data.qpos[:] = np.nan
    with warnings.catch_warnings(record=True) as caught, envs.quiet_settotalmass():
        warnings.simplefilter("always")
        mujoco.mj_step(model, data)  # a diverged simulation: MuJoCo warns, and the filter passes it on
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        "MuJoCo: Nan, Inf or huge value in QPOS at DOF 0. The simulation is unstable. Time = 0.0000."
    ]

    # a Python handler installed before gets every other message, and never the settotalmass one
    seen: list[str] = []
    mujoco.set_mju_user_warning(seen.append)
    try:
        with envs.quiet_settotalmass():
            gym.make("HalfCheetah-v5").close()
            data = mujoco.MjData(model)
            data.qpos[:] = np.nan
            mujoco.mj_step(model, data)
        assert seen == ["Nan, Inf or huge value in QPOS at DOF 0. The simulation is unstable. Time = 0.0000."]
        assert mujoco.get_mju_user_warning() == seen.append
    finally:
        mujoco.set_mju_user_warning(None)
    env.close()
