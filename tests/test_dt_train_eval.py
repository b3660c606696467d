"""Decision Transformer training (resumable), loading (ours, Hugging Face hub layout, shipped), the
``eval --target decision-transformer`` command end to end, and the notebook. Tiny models, short episodes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("h5py")

from card_checks import assert_card_code_ok  # noqa: E402
from namm_transfer.evals.offline_rl import train as train_mod  # noqa: E402
from namm_transfer.evals.offline_rl.train import (  # noqa: E402
    SIDECAR,
    TrainConfig,
    TrajectorySampler,
    build_dt,
    latest_checkpoint,
    load_dt,
    resolve_dt,
    ship_dt,
    train_dt,
)
from tiny_models import random_d4rl_file  # noqa: E402

# D4RL reference returns (reference-numbers.md), typed in here so that the check is independent of envs.py
REF = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3)}
SIZES = {"hopper": (11, 3), "halfcheetah": (17, 6), "walker2d": (17, 6)}
TINY = dict(hidden_size=32, n_layer=2, n_head=2, max_ep_len=100)
POLICIES = ["canonical", "full", "namm", "h2o", "tova", "l2", "streaming", "random"]
BASELINES = ["h2o", "tova", "l2", "streaming", "random"]
LABELS = ["ratio-50", "ratio-25", "threshold"]  # the default protocols
ROWS = [(None, "canonical"), (None, "full"), (None, "full-alt")] + [
    (label, p) for label in LABELS for p in ["namm", *BASELINES]
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """No test may find (or write) datasets in the user's cache."""
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))


def _dataset(path: Path, env: str = "hopper", n_traj: int = 6, seed: int = 0) -> Path:
    s, a = SIZES[env]
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 40, n_traj)
    timeout = [i % 2 == 1 for i in range(n_traj)]  # terminals and timeouts alternate
    return random_d4rl_file(path, env, s, a, lengths, timeout, rng)


def _cfg(dataset: Path, **kw) -> TrainConfig:
    base = dict(
        env="hopper",
        dataset=str(dataset),
        steps=8,
        batch_size=4,
        context=5,
        warmup=4,
        log_every=1,
        checkpoint_every=3,
        eval_every=0,
        final_eval=False,
        **TINY,
    )
    base.update(kw)
    return TrainConfig(**base)


def _log_losses(folder: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines() if x.strip()]
    return {e["step"]: e["loss"] for e in lines if "loss" in e}


# ----- data -------------------------------------------------------------------------------------------------------
def test_sampler_segments_are_left_padded_with_returns_to_go(tmp_path):
    from namm_transfer.evals.offline_rl.datasets import read_d4rl_hdf5, split_trajectories

    data = read_d4rl_hdf5(_dataset(tmp_path / "d.hdf5"))
    sampler = TrajectorySampler(data, context=5, return_scale=10.0, max_ep_len=100)
    batch = sampler.sample(np.random.default_rng(0), 64)
    assert batch["states"].shape == (64, 5, 11) and batch["actions"].shape == (64, 5, 3)
    assert batch["returns_to_go"].shape == (64, 5, 1) and batch["timesteps"].dtype == torch.long
    mask = batch["attention_mask"]
    # left padding: a row is zeros then ones, and padded entries are zero
    assert torch.all(mask[:, 1:] >= mask[:, :-1]) and torch.all(mask[:, -1] == 1)
    assert torch.all(batch["states"][mask == 0] == 0) and torch.all(batch["returns_to_go"][mask == 0] == 0)
    # every real row is (normalized state, action, remaining return / scale, timestep) of some trajectory step
    trajs = split_trajectories(data)
    rows = {}
    for t in trajs:
        rtg = np.cumsum(t["rewards"][::-1])[::-1] / 10.0
        for i in range(len(t["rewards"])):
            rows[tuple(np.round(t["actions"][i], 5))] = (
                rtg[i],
                i,
                (t["observations"][i] - sampler.state_mean) / sampler.state_std,
            )
    for b in range(64):
        for k in np.flatnonzero(mask[b].numpy()):
            rtg, step, state = rows[tuple(np.round(batch["actions"][b, k].numpy(), 5))]
            assert batch["returns_to_go"][b, k, 0].item() == pytest.approx(rtg, rel=1e-5)
            assert batch["timesteps"][b, k].item() == step
            np.testing.assert_allclose(batch["states"][b, k].numpy(), state, rtol=1e-5, atol=1e-5)
    assert sampler.state_std.min() > 0 and abs(float(sampler.states.mean())) < 1e-3


# ----- training: save, resume exactly, load -----------------------------------------------------------------------
def test_train_resumes_exactly_and_saves_a_loadable_model(tmp_path):
    data = _dataset(tmp_path / "hopper.hdf5")
    full = train_dt(_cfg(data), tmp_path / "a")
    assert full.finished and full.step == 8 and len(full.losses) == 8 and full.resumed_from is None

    # interrupted after step 5 with the newest checkpoint at step 3 (the one at 5 is lost), then resumed
    part = train_dt(_cfg(data), tmp_path / "b", stop_at=5)
    assert not part.finished and part.step == 5 and part.losses == full.losses[:5]
    assert not (tmp_path / "b" / "model.safetensors").exists()
    step5 = latest_checkpoint(tmp_path / "b")
    assert step5 is not None and step5.name == "step-0000005"
    import shutil

    shutil.rmtree(step5)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000003"
    rest = train_dt(_cfg(data), tmp_path / "b")
    assert rest.finished and rest.resumed_from == 3
    assert rest.losses == full.losses[3:]  # bit-identical: model, optimizer, scheduler and both RNGs restored
    assert _log_losses(tmp_path / "b") == _log_losses(tmp_path / "a") == dict(enumerate(full.losses, 1))

    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # checkpoints hold safetensors and JSON only (no pickle), and only the newest keep_checkpoints stay
    ckpt_root = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["step-0000006", "step-0000008"]
    assert {f.suffix for c in ckpt_root.iterdir() for f in c.iterdir()} == {".safetensors", ".json"}

    # sidecar, card, loading
    side = json.loads((tmp_path / "a" / SIDECAR).read_text())
    for key in ("state_mean", "state_std", "return_scale", "target_return", "env", "dataset", "training"):
        assert key in side
    assert side["env"] == "hopper" and side["target_return"] == 3600.0 and side["return_scale"] == 1000.0
    assert side["training"]["steps"] == 8 and side["training"]["final_loss"] == full.losses[-1]
    assert side["dataset"]["metadata"]["env_name"] == "hopper" and side["dataset"]["num_trajectories"] == 6
    card = (tmp_path / "a" / "README.md").read_text()
    assert "hopper-medium" in card and "Loss" in card
    assert_card_code_ok(card)

    model, info = load_dt(tmp_path / "a")
    assert info["env"] == "hopper" and info["stats_source"] == "sidecar" and info["format"] == "namm-transfer"
    np.testing.assert_allclose(info["state_mean"], side["state_mean"])
    assert not model.training and model.config.hidden_size == 32

    # another run's checkpoint is refused, not silently mixed
    with pytest.raises(ValueError, match="another training run"):
        train_dt(_cfg(data, seed=1, steps=9), tmp_path / "b")


def test_resume_refuses_another_dataset_level_or_gym_version(tmp_path):
    data = _dataset(tmp_path / "hopper.hdf5")
    part = train_dt(_cfg(data), tmp_path / "run", stop_at=3)
    assert not part.finished and latest_checkpoint(tmp_path / "run").name == "step-0000003"
    other = _dataset(tmp_path / "other.hdf5", seed=1)
    with pytest.raises(ValueError, match="another dataset"):
        train_dt(_cfg(other), tmp_path / "run")
    with pytest.raises(ValueError, match="level: checkpoint 'medium' != now 'expert'"):
        train_dt(_cfg(data, level="expert"), tmp_path / "run")
    with pytest.raises(ValueError, match="version: checkpoint 'v5' != now 'v4'"):
        train_dt(_cfg(data, version="v4"), tmp_path / "run")
    # the same dataset under another path (moved, copied) resumes: identity is its content
    import shutil

    moved = Path(shutil.copy(data, tmp_path / "moved.hdf5"))
    rest = train_dt(_cfg(moved), tmp_path / "run")
    assert rest.finished and rest.resumed_from == 3


def test_bfloat16_training_keeps_float32_weights_and_is_part_of_the_identity(tmp_path):
    """--dtype bfloat16 autocasts the forward pass: the loss is finite and close to the float32 run's at the first
    step, the weights stay float32, and a float32 run does not resume a bfloat16 checkpoint."""
    from safetensors.torch import load_file

    data = _dataset(tmp_path / "hopper.hdf5")
    full = train_dt(_cfg(data, steps=3), tmp_path / "f32")
    half = train_dt(_cfg(data, steps=3, dtype="bfloat16"), tmp_path / "bf16", stop_at=3)
    assert all(math.isfinite(x) for x in half.losses) and half.losses[0] == pytest.approx(full.losses[0], rel=0.05)
    assert half.losses[0] != full.losses[0]  # it did run in another precision
    weights = load_file(str(latest_checkpoint(tmp_path / "bf16") / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    with pytest.raises(ValueError, match="dtype: checkpoint 'bfloat16' != now 'float32'"):
        train_dt(_cfg(data, steps=4), tmp_path / "bf16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        _cfg(data, dtype="float8")


def test_train_cli_end_to_end_and_evaluation_in_the_log(tmp_path, capsys):
    pytest.importorskip("mujoco")
    from namm_transfer.cli import main

    data = _dataset(tmp_path / "hopper.hdf5")
    out = tmp_path / "dt"
    argv = ["rl", "train", "--env", "hopper", "--dataset", str(data), "--output", str(out), "--steps", "2"]
    argv += ["--batch-size", "4", "--warmup", "2", "--eval-episodes", "1", "--eval-max-ep-len", "4", "--no-progress"]
    assert main(argv) == 0
    assert "hopper-medium: 2 steps" in capsys.readouterr().out
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    evals = [e for e in log if e.get("event") == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 2 and evals[0]["lengths"][0] <= 4
    side = json.loads((out / SIDECAR).read_text())
    assert side["eval"]["normalized_score"] == pytest.approx(evals[0]["normalized_score"])
    cfg = json.loads((out / "config.json").read_text())  # the canonical configuration
    assert (cfg["n_layer"], cfg["hidden_size"], cfg["n_head"], cfg["max_ep_len"]) == (3, 128, 1, 1000)
    assert cfg["activation_function"] == "relu" and cfg["resid_pdrop"] == 0.1
    card = (out / "README.md").read_text()
    assert "D4RL normalized score" in card and "the canonical configuration" in card


def test_dataset_with_missing_keys_or_of_another_task_is_a_clear_error(tmp_path, capsys):
    import h5py

    from namm_transfer.cli import main

    bad = tmp_path / "bad.hdf5"
    with h5py.File(bad, "w") as f:
        f["observations"] = np.zeros((5, 11), np.float32)
        f["actions"] = np.zeros((5, 3), np.float32)
        f["rewards"] = np.zeros(5, np.float32)
    assert main(["rl", "train", "--env", "hopper", "--dataset", str(bad), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "lacks required keys ['terminals', 'timeouts']" in err and str(bad) in err

    walker = _dataset(tmp_path / "walker.hdf5", env="walker2d")
    with pytest.raises(ValueError, match="observations of size 17 .* hopper needs 11"):
        train_dt(_cfg(walker), tmp_path / "o2")
    with pytest.raises(FileNotFoundError, match="namm-transfer rl collect --env hopper"):
        train_dt(_cfg(tmp_path / "missing.hdf5"), tmp_path / "o3")


# ----- loading the Hugging Face hub layout, shipped models --------------------------------------------------------
def _hub_folder(tmp_path: Path, env: str = "hopper", legacy_buffers: bool = True) -> tuple[Path, dict]:
    """A folder in the layout of edbeeching/decision-transformer-gym-{env}-medium: config.json + pytorch_model.bin."""
    torch.manual_seed(3)
    s, a = SIZES[env]
    model = build_dt(s, a, TrainConfig(env=env, **TINY))
    folder = tmp_path / f"decision-transformer-gym-{env}-medium"
    model.config.save_pretrained(folder)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if legacy_buffers:  # GPT-2 checkpoints of transformers 4.x also saved these attention buffers
        for i in range(model.config.n_layer):
            state[f"encoder.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 8, 8, dtype=torch.bool))
            state[f"encoder.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, folder / "pytorch_model.bin")
    return folder, model.state_dict()


def test_hub_format_checkpoint_loads_and_acts(tmp_path):
    pytest.importorskip("mujoco")
    from namm_transfer.evals.offline_rl.rollout import run_episodes

    folder, ref = _hub_folder(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]
    with pytest.raises(ValueError, match="carries no state normalization.*--stats"):
        load_dt(folder)
    mean, std = list(np.linspace(-1, 1, 11)), list(np.linspace(0.5, 2, 11))
    model, info = load_dt(folder, stats={"state_mean": mean, "state_std": std})
    assert info["env"] == "hopper" and info["format"] == "hf" and info["weights"] == "pytorch_model.bin"
    assert info["target_return"] == 3600.0 and info["return_scale"] == 1000.0
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
    np.testing.assert_allclose(info["state_std"], std)
    res = run_episodes(
        model, "hopper", 1, max_ep_len=5, state_mean=info["state_mean"], state_std=info["state_std"], seed=1
    )
    assert res["lengths"] == [5] and np.isfinite(res["returns"]).all()

    # a sidecar file next to it, or a dataset to compute the statistics from
    (tmp_path / "stats.json").write_text(json.dumps({"state_mean": mean, "state_std": std, "target_return": 1800}))
    _, info2 = load_dt(folder, stats=tmp_path / "stats.json")
    assert info2["target_return"] == 1800.0
    data = _dataset(tmp_path / "h.hdf5")
    _, info3 = load_dt(folder, dataset=data)
    assert info3["stats_source"].startswith("dataset:") and info3["state_mean"].shape == (11,)


def test_size_mismatch_and_missing_shipped_model_are_clear_errors(tmp_path, monkeypatch):
    folder, _ = _hub_folder(tmp_path, env="walker2d")
    stats = {"state_mean": [0.0] * 17, "state_std": [1.0] * 17}
    with pytest.raises(ValueError, match=r"state_dim=17 and act_dim=6, but hopper .* size 11 .* size 3"):
        load_dt(folder, env="hopper", stats=stats)

    monkeypatch.setattr(train_mod, "shipped_dt_dir", lambda: tmp_path / "weights" / "dt")
    with pytest.raises(FileNotFoundError, match=r"no shipped Decision Transformer for hopper-medium.*rl train"):
        load_dt("shipped:hopper")
    assert resolve_dt(None, "walker2d") == "shipped:walker2d-medium"
    assert resolve_dt("hopper=/a,walker2d=/b", "walker2d") == "/b"
    assert resolve_dt("org/dt-{env}-medium", "hopper") == "org/dt-hopper-medium"
    with pytest.raises(ValueError, match="no entry for halfcheetah"):
        resolve_dt("hopper=/a", "halfcheetah")

    # ship a trained folder, then the shipped name finds it
    data = _dataset(tmp_path / "hopper.hdf5")
    trained = train_dt(_cfg(data, steps=2), tmp_path / "trained")
    dest = ship_dt(trained.output)
    assert dest == tmp_path / "weights" / "dt" / "hopper-medium" and not (dest / "checkpoints").exists()
    _, info = load_dt("shipped:hopper")
    assert info["source"] == "shipped:hopper-medium" and info["stats_source"] == "sidecar"


# ----- replayed budgets -------------------------------------------------------------------------------------------
def _layer_state(n_seen, clock, step, n_valid, layer=0):
    from namm_transfer.policies.base import LayerState

    b, s = len(n_seen), max(n_valid)
    valid = torch.zeros(b, 1, s, dtype=torch.bool)
    for i, n in enumerate(n_valid):
        valid[i, 0, s - n :] = True
    st = LayerState(layer=layer, valid=valid, position=torch.zeros(b, 1, s, dtype=torch.long), arrival=valid.long())
    st.n_seen = torch.tensor(n_seen)
    st.step, st.clock = step, clock
    return st


@pytest.mark.parametrize("fallback", ["hold", "ratio"])
def test_replay_budget_follows_namm_then_falls_back(fallback):
    from namm_transfer.evals.offline_rl.run import _replay_budget

    # episode 0: NAMM made 3 updates (interval 6: seen 6, 12, 18); episode 1: none (ended before clock 6)
    per_episode = [{"layers": [0], "kept_counts": [[[4]], [[5]], [[6]]]}, {"layers": [0], "kept_counts": []}]
    budget = _replay_budget(per_episode, fallback)
    assert budget.target(_layer_state([6, 6], 6, 0, [6, 6])).tolist() == [[4], [6]]
    assert budget.target(_layer_state([18, 18], 18, 2, [9, 9])).tolist() == [[6], [9]]
    # update 4 (clock 30): NAMM's episode 0 had ended; the baseline's is still running
    got = budget.target(_layer_state([30, 30], 30, 4, [11, 11])).tolist()
    expected = 6 if fallback == "hold" else math.ceil(6 / 18 * 30)
    assert got == [[expected], [11]]
    assert [len(s) for s in budget.updates] == [3, 3] and [len(s) for s in budget.extrapolated] == [1, 3]
    # a baseline episode that has itself ended (seen < clock) is not counted
    budget.target(_layer_state([25, 36], 36, 5, [10, 12]))
    assert [len(s) for s in budget.extrapolated] == [1, 4]
    with pytest.raises(ValueError, match="cover 2 episodes"):
        budget.target(_layer_state([6], 6, 0, [6]))


def test_replay_budget_follows_each_layer():
    """Counts are replayed per managed layer (by layer id, not position) for every update and in the fallback."""
    from namm_transfer.evals.offline_rl.run import _replay_budget

    # two managed layers, ids 1 and 3, with other counts at every update
    counts = [[[4], [2]], [[5], [3]]]  # kept_counts[update][layer index][head]
    budget = _replay_budget([{"layers": [1, 3], "kept_counts": counts}], "hold")
    assert budget.target(_layer_state([6], 6, 0, [6], layer=1)).tolist() == [[4]]
    assert budget.target(_layer_state([6], 6, 0, [6], layer=3)).tolist() == [[2]]
    assert budget.target(_layer_state([12], 12, 1, [8], layer=3)).tolist() == [[3]]
    assert budget.target(_layer_state([18], 18, 2, [9], layer=1)).tolist() == [[5]]  # held: the last update's
    assert budget.target(_layer_state([18], 18, 2, [9], layer=3)).tolist() == [[3]]
    with pytest.raises(ValueError, match="no layer 2"):
        budget.target(_layer_state([6], 6, 0, [6], layer=2))


# ----- eval --target decision-transformer end to end --------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    from namm_transfer.checkpoint import save_namm
    from namm_transfer.namm import NAMM

    root = tmp_path_factory.mktemp("dt_eval")
    torch.manual_seed(0)
    specs = []
    for env, (s, a) in SIZES.items():
        model = build_dt(s, a, TrainConfig(env=env, **TINY))
        model.save_pretrained(root / f"dt-{env}")
        side = {"env": env, "state_mean": [0.0] * s, "state_std": [1.0] * s, "return_scale": 1000.0}
        (root / f"dt-{env}" / SIDECAR).write_text(json.dumps(side))
        specs.append(f"{env}={root / f'dt-{env}'}")
    g = torch.Generator().manual_seed(1)
    namm = NAMM()
    namm.set_flat(0.1 * torch.randn(namm.n_params, generator=g))  # keeps a mix of token types on these tiny DTs
    namm.set_normalization(torch.zeros(namm.config.n_bins), torch.ones(namm.config.n_bins))
    save_namm(namm, root / "namm")
    return root, ",".join(specs)


def _eval_argv(root: Path, models: str, out: str = "res.json", *extra: str) -> list[str]:
    argv = ["eval", "--target", "decision-transformer", "--env", "all", "--model", models, "--namm", str(root / "namm")]
    argv += ["--episodes", "2", "--max-ep-len", "12", "--update-interval", "6", "--device", "cpu"]
    return argv + ["--output", str(root / out), "--no-progress", *extra]


def _records(path: Path) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in lines if "_header" not in r]


def _row_key(r: dict) -> tuple:
    return (r["protocol"], r["policy"])


def _expected_interval(records: list[dict], row: tuple, ref: tuple, envs: list[str]) -> dict:
    """The paired bootstrap of ``row`` minus ``ref`` worked out from the records, unit (env, seed), stratum env."""
    from namm_transfer.stats import paired_bootstrap

    by = {(r["env"], r["seed"], _row_key(r)): r["score"] for r in records}
    diffs = {
        env: [by[(env, s, row)] - by[(env, s, ref)] for s in sorted({r["seed"] for r in records if r["env"] == env})]
        for env in envs
    }
    return paired_bootstrap(diffs).as_dict()


def test_eval_end_to_end_scores_schema_and_resume(eval_setup, capsys, monkeypatch):
    pytest.importorskip("mujoco")
    from namm_transfer.cli import main

    root, models = eval_setup
    assert main(_eval_argv(root, models)) == 0
    out = capsys.readouterr().out
    assert "D4RL normalized return" in out and "results:" in out and "vs full (95%)" in out
    summary = json.loads((root / "res.json").read_text())
    for key in ("command", "target", "model", "namm_checkpoint", "settings", "versions", "hardware", "started"):
        assert key in summary
    assert summary["target"] == "decision-transformer" and summary["breakdown_by"] == "env"
    settings = summary["settings"]
    assert summary["namm_checkpoint"]["sha256"] and settings["seeds"] == {env: [0, 1] for env in SIZES}
    assert settings["episodes"] == {env: 2 for env in SIZES}
    assert settings["protocols"] == ["ratio:0.5", "ratio:0.25", "threshold"] and settings["protocol_labels"] == LABELS
    assert settings["update_interval"] == 6 and settings["replay_fallback"] == "hold"
    assert settings["noise_floor"]["policy"] == "full-alt" and settings["noise_floor"]["update_interval"] == 12
    assert (root / "res.png").stat().st_size > 1000 and summary["plot"] == "res.png"

    rows = {_row_key(r): r for r in summary["rows"]}
    assert list(rows) == ROWS
    assert sorted(summary["breakdown"]) == sorted(SIZES)
    for env_rows in summary["breakdown"].values():
        assert [_row_key(r) for r in env_rows] == ROWS

    records = _records(root / "res.jsonl")
    assert len(records) == len(ROWS) * 3 * 2 and len({r["key"] for r in records}) == len(records)
    # the same seeds for every policy and protocol: exactly the same (env, seed) units in every row
    units = {row: {(r["env"], r["seed"]) for r in records if _row_key(r) == row} for row in ROWS}
    assert all(u == {(env, s) for env in SIZES for s in (0, 1)} for u in units.values())
    for r in records:
        lo, hi = REF[r["env"]]
        assert r["score"] == pytest.approx(100 * (r["return"] - lo) / (hi - lo), rel=1e-12, abs=1e-12)
        assert r["seed"] == r["episode"] and 1 <= r["length"] <= 12
        assert len(r["trace"]["t"]) == len(r["trace"]["return"]) == len(r["trace"]["cache_tokens"])
        assert r["trace"]["return"][-1] == float(f"{r['return']:.4g}")  # 4 significant digits (run.TRACE_DIGITS)
        proto = "" if r["protocol"] is None else r["protocol"] + "/"
        assert r["key"] == f"{r['env']}/{proto}{r['policy']}/ep{r['episode']:03d}"
        assert r["update_interval"] == {"canonical": None, "full-alt": 12}.get(r["policy"], 6)
    for row in ROWS:
        env_scores = []
        for env, env_rows in summary["breakdown"].items():
            mine = [r["score"] for r in records if r["env"] == env and _row_key(r) == row]
            got = next(x for x in env_rows if _row_key(x) == row)
            assert got["score"] == pytest.approx(np.mean(mine)) and got["n"] == 2 and got["seeds"] == [0, 1]
            assert got["score_std"] == pytest.approx(np.std(mine))
            env_scores.append(got["score"])
        assert rows[row]["score"] == pytest.approx(np.mean(env_scores)) and rows[row]["n"] == 6

    # paired statistics: vs_full against the shared full cache, vs_namm against the protocol's NAMM, pooled over
    # envs (stratified) in rows and within the env in the breakdown; none against itself or a missing reference
    envs = sorted(SIZES)
    for row in ROWS:
        refs = {"vs_full": (None, "full"), "vs_namm": (row[0], "namm")}
        expected = {k: ref for k, ref in refs.items() if ref != row and ref in rows}
        assert {k for k in ("vs_full", "vs_namm") if k in rows[row]} == set(expected), row
        for k, ref in expected.items():
            assert rows[row][k] == _expected_interval(records, row, ref, envs), (row, k)
            for env in envs:
                env_row = next(x for x in summary["breakdown"][env] if _row_key(x) == row)
                assert env_row[k] == _expected_interval(records, row, ref, [env]), (row, k, env)
    assert "vs_namm" not in rows[(None, "full-alt")] and rows[(None, "full-alt")]["vs_full"]["n"] == 6
    pooled = rows[("ratio-50", "h2o")]["vs_full"]
    per_env = [
        np.mean([r["score"] for r in records if r["env"] == env and _row_key(r) == ("ratio-50", "h2o")])
        - np.mean([r["score"] for r in records if r["env"] == env and r["policy"] == "full"])
        for env in envs
    ]
    assert pooled["mean"] == pytest.approx(np.mean(per_env)) and pooled["lo"] <= pooled["mean"] <= pooled["hi"]

    # cache sizes: full keeps everything, NAMM evicts; under ratio:R NAMM and the baselines keep floor(R * seen) at
    # every update (the same counts); under threshold the baselines replay NAMM's counts exactly while both run
    assert rows[(None, "full")]["retained_cache"] == 1.0 and rows[(None, "full-alt")]["retained_cache"] == 1.0
    assert rows[(None, "canonical")]["retained_cache"] is None
    assert 0 < rows[("threshold", "namm")]["retained_cache"] < 1
    assert rows[("ratio-25", "namm")]["retained_cache"] < rows[("ratio-50", "namm")]["retained_cache"] < 1
    namm = {(r["env"], r["episode"], r["protocol"]): r for r in records if r["policy"] == "namm"}
    for r in records:
        if r["protocol"] in ("ratio-50", "ratio-25"):
            share = {"ratio-50": "0.5", "ratio-25": "0.25"}[r["protocol"]]
            assert r["budget"] == f"ratio:{share}" and "replay" not in r and "replay_updates" not in r
            ref = namm[(r["env"], r["episode"], r["protocol"])]
            if r["length"] == ref["length"]:
                assert r["retained_cache"] == pytest.approx(ref["retained_cache"], abs=1e-12)
        if r["protocol"] == "threshold" and r["policy"] in BASELINES:
            ref = namm[(r["env"], r["episode"], "threshold")]
            assert r["budget"].startswith("replay:namm") and r["replay_updates"] > 0
            if r["length"] == ref["length"]:
                assert r["replay_extrapolated"] == 0
                assert r["retained_cache"] == pytest.approx(ref["retained_cache"], abs=1e-12)
    assert all("replay" in r and r["replay"]["kept_counts"] for k, r in namm.items() if k[2] == "threshold")

    # resume: a second run repeats nothing (no episode batch is run again, the file is unchanged)
    from namm_transfer.evals.offline_rl import run as dt_run

    ran, run_batch = [], dt_run._run_batch
    monkeypatch.setattr(
        dt_run,
        "_run_batch",
        lambda s, env, p, proto, *a: ran.append((env, str(proto), p)) or run_batch(s, env, p, proto, *a),
    )
    size = (root / "res.jsonl").stat().st_size
    assert main(_eval_argv(root, models)) == 0
    assert (root / "res.jsonl").stat().st_size == size and ran == []

    # a run killed before the last batches: only those run again (threshold baselines read NAMM's counts from the
    # file), with the same results; the same policy of another protocol is not run again
    lines = (root / "res.jsonl").read_text().splitlines()
    dropped = [x for x in lines if '"walker2d/threshold/random/' in x or '"walker2d/ratio-25/streaming/' in x]
    assert len(dropped) == 4
    (root / "res.jsonl").write_text("\n".join(x for x in lines if x not in dropped) + "\n")
    assert main(_eval_argv(root, models)) == 0
    assert sorted(ran) == [("walker2d", "ratio:0.25", "streaming"), ("walker2d", "threshold", "random")]
    again = {r["key"]: r for r in _records(root / "res.jsonl")}
    assert len(again) == len(records)
    for x in dropped:
        old = json.loads(x)
        new = again[old["key"]]
        for field in ("return", "score", "length", "retained_cache", "protocol", "budget"):
            assert new[field] == old[field], field
        if old["protocol"] == "threshold":
            assert (new["replay_updates"], new["replay_extrapolated"]) == (
                old["replay_updates"],
                old["replay_extrapolated"],
            )

    # the same output with other settings is refused
    capsys.readouterr()
    assert main(_eval_argv(root, models, "res.json", "--update-interval", "12")) == 1
    assert "written by another command" in capsys.readouterr().err
    assert main(_eval_argv(root, models, "res.json", "--protocols", "ratio:0.5")) == 1
    assert "written by another command" in capsys.readouterr().err


def test_eval_episodes_per_env_protocol_subset_and_no_noise_floor(eval_setup, capsys):
    """--episodes 1,hopper=2: one seed per env, two for hopper, the same for every policy; one protocol; no full-alt."""
    pytest.importorskip("mujoco")
    from namm_transfer.cli import main

    root, models = eval_setup
    argv = _eval_argv(root, models, "per_env.json", "--policies", "full,h2o", "--protocols", "ratio:50%")
    argv[argv.index("--episodes") + 1] = "1,hopper=2"
    assert main([*argv, "--no-noise-floor", "--no-plot"]) == 0
    summary = json.loads((root / "per_env.json").read_text())
    assert summary["settings"]["episodes"] == {"hopper": 2, "halfcheetah": 1, "walker2d": 1}
    assert summary["settings"]["seeds"] == {"hopper": [0, 1], "halfcheetah": [0], "walker2d": [0]}
    assert summary["settings"]["noise_floor"] is None and summary["settings"]["replay_fallback"] is None
    assert [_row_key(r) for r in summary["rows"]] == [(None, "full"), ("ratio-50", "namm"), ("ratio-50", "h2o")]
    records = _records(root / "per_env.jsonl")
    for row in [(None, "full"), ("ratio-50", "namm"), ("ratio-50", "h2o")]:
        got = sorted((r["env"], r["seed"]) for r in records if _row_key(r) == row)
        assert got == [("halfcheetah", 0), ("hopper", 0), ("hopper", 1), ("walker2d", 0)]
    h2o = next(r for r in summary["rows"] if r["policy"] == "h2o")
    assert h2o["vs_full"]["n"] == 4 and h2o["vs_namm"]["n"] == 4


def test_parse_episodes_and_bad_options_are_clear_errors(eval_setup, capsys):
    from namm_transfer.evals.offline_rl.run import DEFAULT_EPISODES, parse_episodes

    assert parse_episodes("20,hopper=30") == (20, {"hopper": 30})
    assert parse_episodes("Walker2d=4,7") == (7, {"walker2d": 4})
    assert parse_episodes("hopper=5") == (DEFAULT_EPISODES, {"hopper": 5})
    for bad, match in [
        ("x", "not a number"),
        ("0", ">= 1"),
        ("3,4", "two counts"),
        ("hopper=2,hopper=3", "hopper given twice"),
        ("ant=3", "unknown offline-RL environment"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_episodes(bad)

    pytest.importorskip("mujoco")
    from namm_transfer.cli import main

    root, models = eval_setup
    for extra, message in [
        (["--update-interval", "10"], "--update-interval must be a positive multiple of 3"),
        (["--protocols", "ratio:2"], "a ratio protocol needs a share in (0, 1)"),
        (["--protocols", "top"], "unknown protocol 'top'"),
        (["--episodes", "2,hopper=x"], "--episodes: not a number in 'hopper=x'"),
    ]:
        assert main(_eval_argv(root, models, "bad_opts.json", *extra)) == 1
        assert message in capsys.readouterr().err, extra
    assert not (root / "bad_opts.jsonl").exists()


def test_eval_errors_are_clear(eval_setup, capsys, monkeypatch):
    pytest.importorskip("mujoco")
    from namm_transfer.cli import main

    root, _ = eval_setup
    # a walker2d-sized checkpoint for hopper
    assert main(_eval_argv(root, f"hopper={root / 'dt-walker2d'}", "bad.json")) == 1
    err = capsys.readouterr().err
    assert "state_dim=17 and act_dim=6, but hopper" in err
    # no shipped DT: tell the user how to make one
    monkeypatch.setattr(train_mod, "shipped_dt_dir", lambda: root / "nothing")
    argv = ["eval", "--target", "decision-transformer", "--env", "hopper", "--output", str(root / "x.json")]
    assert main(argv) == 1
    assert "namm-transfer rl train" in capsys.readouterr().err


# ----- notebook ---------------------------------------------------------------------------------------------------
def test_notebook_runs_with_tiny_settings(eval_setup, tmp_path, monkeypatch):
    pytest.importorskip("mujoco")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root, _ = eval_setup
    path = Path(__file__).resolve().parents[1] / "notebooks" / "decision_transformer.ipynb"
    nb = nbformat.read(path, as_version=4)
    # committed with outputs (python notebooks/execute.py): checked in tests/test_notebooks.py; run here afresh
    idx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    params = "import torch\n\ntorch.set_num_threads(1)\n"
    params += f'env = "hopper"\nsteps = 20\nmodel = "tiny"\nnamm = "{root / "namm"}"\nupdate_interval = 6\n'
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, cell)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "steps, return" in text and "retention" in text and "tiny random" in text
    assert "ratio:0.5: " in text and "threshold: " in text and "kept share per type" in text  # the keep maps
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3


def test_eval_shards_whole_batches_by_rank(eval_setup, monkeypatch):
    pytest.importorskip("mujoco")
    from namm_transfer.cli import main

    root, models = eval_setup
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = _eval_argv(root, models, "shard.json", "--policies", "h2o", "--batch-episodes", "1", "--no-plot")
    argv += ["--protocols", "threshold", "--no-noise-floor"]
    argv[argv.index("all")] = "hopper"
    assert main(argv) == 0
    records = _records(root / "shard.rank1-of2.jsonl")
    # rank 1 of 2 gets the second (env, batch) group: episode 1 of hopper, with NAMM added for the replay
    assert sorted(r["key"] for r in records) == ["hopper/threshold/h2o/ep001", "hopper/threshold/namm/ep001"]
    assert not (root / "shard.jsonl").exists()


def test_shipped_dt_cards_code_is_formatted():
    cards = sorted(train_mod.shipped_dt_dir().glob("*/README.md"))
    assert cards, "the package ships Decision Transformers with cards"
    for card in cards:
        assert_card_code_ok(card.read_text(encoding="utf-8"))
