"""``eval --target decision-transformer`` on the positions-only tasks: the canonical window of one DT against the
cached long history of another (``--canonical-model``), shipped by name, on the same seeds; and the compact
per-episode traces of its records (fewer points, 4 significant digits), which change no score.

Tiny random DTs written to a temporary shipped-DT folder; real MuJoCo envs, short episodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("h5py")
pytest.importorskip("mujoco")

from namm_transfer.evals.offline_rl import run as dt_run  # noqa: E402
from namm_transfer.evals.offline_rl import train as train_mod  # noqa: E402
from namm_transfer.evals.offline_rl.compact_traces import compact_file  # noqa: E402
from namm_transfer.evals.offline_rl.rollout import run_episodes  # noqa: E402
from namm_transfer.evals.offline_rl.train import SIDECAR, TrainConfig, build_dt, load_dt  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(hidden_size=32, n_layer=2, n_head=2, max_ep_len=256)
CANON, LONG = "hopper-po-medium", "hopper-po-medium-long"
TIMING = ("throughput", "batch_wall_s")
"""Record fields that measure time (they differ between any two runs)."""


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """No test may find (or write) datasets in the user's cache."""
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def shipped_root(tmp_path_factory) -> Path:
    """A shipped-DT folder with two different tiny hopper-po DTs: the canonical (K=5) and a long-context one."""
    root = tmp_path_factory.mktemp("dt_history") / "dt"
    for seed, (name, k) in enumerate([(CANON, 5), (LONG, 60)]):
        torch.manual_seed(seed)
        model = build_dt(5, 3, TrainConfig(env="hopper-po", **TINY))
        with torch.no_grad():  # larger weights than the default init: the actions (and returns) depend on them
            for p in model.parameters():
                if p.ndim > 1:
                    p.normal_(0.0, 0.3)
        model.save_pretrained(root / name)
        side = {"env": "hopper-po", "state_mean": [0.0] * 5, "state_std": [1.0] * 5, "return_scale": 1000.0}
        side["context_length"] = k
        (root / name / SIDECAR).write_text(json.dumps(side))
    return root


@pytest.fixture
def shipped(shipped_root, monkeypatch) -> Path:
    monkeypatch.setattr(train_mod, "shipped_dt_dir", lambda: shipped_root)
    return shipped_root


def _argv(out: Path, *extra: str, steps: int = 12) -> list[str]:
    argv = ["eval", "--target", "decision-transformer", "--env", "hopper-po", "--model", f"shipped:{LONG}"]
    argv += ["--policies", "canonical,full", "--episodes", "2", "--max-ep-len", str(steps), "--update-interval", "6"]
    return argv + ["--device", "cpu", "--output", str(out), "--no-progress", "--no-plot", "--no-noise-floor", *extra]


def _records(path: Path) -> list[dict]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in lines if "_header" not in r]


def _reference(name: str, mode: str, steps: int = 12, seed: int = 3) -> dict:
    """The episodes of ``name`` (shipped) run directly, seeds ``seed``, ``seed + 1``."""
    model, info = load_dt(f"shipped:{name}")
    return run_episodes(
        model,
        "hopper-po",
        2,
        mode=mode,
        policy="full",
        state_mean=info["state_mean"],
        state_std=info["state_std"],
        max_ep_len=steps,
        seed=seed,
        update_interval=6,
        context_length=info["context_length"],
    )


def test_canonical_model_runs_the_canonical_row_on_the_same_seeds(shipped, tmp_path, capsys):
    """--canonical-model: the canonical row is the canonical DT's K=5 window, the full row the long-context DT's
    cached history; both on seeds 3 and 4 (--seed 3), each exactly the episodes of its own DT on those seeds, and
    the canonical row's vs_full is the paired interval of the two."""
    from namm_transfer.cli import main
    from namm_transfer.report import render_summary
    from namm_transfer.stats import paired_bootstrap

    out = tmp_path / "po.json"
    assert main(_argv(out, "--canonical-model", f"shipped:{CANON}", "--seed", "3")) == 0
    printed = capsys.readouterr().out
    assert "results:" in printed and "  model" in printed and f"  shipped:{CANON}\n" in printed
    records = _records(tmp_path / "po.jsonl")
    by = {(r["policy"], r["seed"]): r for r in records}
    assert sorted(by) == [("canonical", 3), ("canonical", 4), ("full", 3), ("full", 4)]
    hashes = {name: load_dt(f"shipped:{name}")[1]["content_hash"] for name in (CANON, LONG)}
    canonical = _reference(CANON, "canonical")
    cached = _reference(LONG, "cached")
    for j, seed in enumerate((3, 4)):
        c, f = by[("canonical", seed)], by[("full", seed)]
        assert (c["model"], c["model_sha256"], c["context_length"]) == (f"shipped:{CANON}", hashes[CANON], 5)
        assert (f["model"], f["model_sha256"], f["update_interval"]) == (f"shipped:{LONG}", hashes[LONG], 6)
        assert (c["return"], c["length"]) == (canonical["returns"][j], canonical["lengths"][j])
        assert (f["return"], f["length"]) == (cached["returns"][j], cached["lengths"][j])
    # without --canonical-model the canonical row is the long DT's own window (K=60): other returns, same seeds
    own = _reference(LONG, "canonical")
    assert own["returns"] != canonical["returns"]

    summary = json.loads(out.read_text())
    assert summary["settings"]["canonical_model"] == f"shipped:{CANON}"
    assert summary["settings"]["seeds"] == {"hopper-po": [3, 4]}
    assert summary["canonical_models"]["hopper-po"]["source"] == f"shipped:{CANON}"
    assert summary["canonical_models"]["hopper-po"]["context_length"] == 5
    assert summary["models"]["hopper-po"]["source"] == f"shipped:{LONG}"
    rows = {r["policy"]: r for r in summary["rows"]}
    assert (rows["canonical"]["model"], rows["full"]["model"]) == (f"shipped:{CANON}", f"shipped:{LONG}")
    diffs = [by[("canonical", s)]["score"] - by[("full", s)]["score"] for s in (3, 4)]
    assert rows["canonical"]["vs_full"] == paired_bootstrap({"hopper-po": diffs}).as_dict()
    env_rows = {r["policy"]: r for r in summary["breakdown"]["hopper-po"]}
    assert env_rows["canonical"]["seeds"] == env_rows["full"]["seeds"] == [3, 4]
    assert env_rows["canonical"]["model"] == f"shipped:{CANON}" and env_rows["canonical"]["vs_full"]["n"] == 2
    header = next(x for x in render_summary(summary).splitlines() if x.startswith("| policy"))
    assert "| model |" in header and "| Δ vs full |" in header
    canon_line = next(x for x in render_summary(summary).splitlines() if x.startswith("| canonical"))
    assert f"| shipped:{CANON} |" in canon_line

    # the canonical model is part of the run's identity: a finished run resumes, another canonical DT is refused
    size = (tmp_path / "po.jsonl").stat().st_size
    assert main(_argv(out, "--canonical-model", f"shipped:{CANON}", "--seed", "3")) == 0
    assert (tmp_path / "po.jsonl").stat().st_size == size
    capsys.readouterr()
    assert main(_argv(out, "--seed", "3")) == 1
    assert "settings.canonical_model" in capsys.readouterr().err


def test_canonical_model_errors_and_default(shipped, tmp_path, capsys):
    from namm_transfer.cli import main

    # a canonical DT of another task
    full_obs = shipped / "hopper-medium"
    torch.manual_seed(0)
    build_dt(11, 3, TrainConfig(env="hopper", **TINY)).save_pretrained(full_obs)
    (full_obs / SIDECAR).write_text(json.dumps({"env": "hopper", "state_mean": [0.0] * 11, "state_std": [1.0] * 11}))
    try:
        assert main(_argv(tmp_path / "bad.json", "--canonical-model", "shipped:hopper-medium")) == 1
        assert "state_dim=11 and act_dim=3, but hopper-po has observations of size 5" in capsys.readouterr().err
    finally:
        for f in full_obs.iterdir():
            f.unlink()
        full_obs.rmdir()
    # a missing shipped canonical DT names the commands that make it
    assert main(_argv(tmp_path / "bad.json", "--canonical-model", "shipped:hopper-po-expert")) == 1
    assert "rl derive-po --env hopper-po --level expert" in capsys.readouterr().err
    # the same DT as --model: one model, the settings say which was asked for, no row label needed
    assert main(_argv(tmp_path / "same.json", "--canonical-model", f"shipped:{LONG}")) == 0
    summary = json.loads((tmp_path / "same.json").read_text())
    assert {r["model"] for r in summary["rows"]} == {f"shipped:{LONG}"}
    # no --canonical-model: the identity and the rows are those of earlier runs (no new keys); the shipped NAMM and a
    # baseline under both protocols run on the positions-only DT, on the same seeds
    argv = _argv(tmp_path / "plain.json", "--namm", "default")
    argv[argv.index("--policies") + 1] = "canonical,full,namm,h2o"
    assert main([*argv, "--protocols", "ratio:0.5,threshold"]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert "canonical_model" not in plain["settings"] and "canonical_models" not in plain
    assert all("model" not in r for r in plain["rows"])
    records = _records(tmp_path / "plain.jsonl")
    assert {r["model"] for r in records} == {f"shipped:{LONG}"}
    rows = [(r["protocol"], r["policy"]) for r in plain["rows"]]
    assert rows == [(None, "canonical"), (None, "full")] + [
        (p, x) for p in ("ratio-50", "threshold") for x in ("namm", "h2o")
    ]
    assert all(sorted(r["seed"] for r in records if (r["protocol"], r["policy"]) == row) == [0, 1] for row in rows)
    ratio_namm = next(r for r in plain["rows"] if r["protocol"] == "ratio-50" and r["policy"] == "namm")
    assert ratio_namm["retained_cache"] < 1 and ratio_namm["vs_full"]["n"] == 2


# ----- compact traces -------------------------------------------------------------------------------------------
def _sig_digits(x: float) -> int:
    digits = f"{abs(x):.15g}".replace(".", "").lstrip("0").split("e")[0].rstrip("0")
    return len(digits)


def test_records_are_compact_and_scores_unchanged(shipped, tmp_path, monkeypatch):
    """The records of a 200-step run keep at most TRACE_POINTS + 1 trace points of 4 significant digits and stay
    below 2.5 kB each; every score, return, length and cache statistic (records and summary) is exactly that of the
    same run with unrounded 100-point traces; and rewriting such a run with compact_traces gives the records and
    summary the eval now writes."""
    from namm_transfer.cli import main

    steps = 200
    assert main(_argv(tmp_path / "new.json", steps=steps)) == 0
    points, digits = dt_run.TRACE_POINTS, dt_run.TRACE_DIGITS
    monkeypatch.setattr(dt_run, "TRACE_POINTS", 100)
    monkeypatch.setattr(dt_run, "TRACE_DIGITS", None)
    assert main(_argv(tmp_path / "old.json", steps=steps)) == 0
    monkeypatch.setattr(dt_run, "TRACE_POINTS", points)
    monkeypatch.setattr(dt_run, "TRACE_DIGITS", digits)

    new, old = _records(tmp_path / "new.jsonl"), _records(tmp_path / "old.jsonl")
    assert [r["key"] for r in new] == [r["key"] for r in old]
    assert max(r["length"] for r in new) > 2 * 4  # long enough for the stride (4 steps) to matter
    lines = (tmp_path / "new.jsonl").read_text().splitlines()[1:]
    assert max(len(x.encode()) for x in lines) < 2500
    assert sum(len(x) for x in lines) < sum(len(x) for x in (tmp_path / "old.jsonl").read_text().splitlines()[1:])
    for a, b in zip(new, old, strict=True):
        assert {k: v for k, v in a.items() if k not in (*TIMING, "trace")} == {
            k: v for k, v in b.items() if k not in (*TIMING, "trace")
        }
        ta, tb = a["trace"], b["trace"]
        assert set(ta) == {"t", "return", "cache_tokens"}
        assert ta["t"] == dt_run._trace_index(a["length"], steps) and len(ta["t"]) <= dt_run.TRACE_POINTS + 1
        assert ta["t"] == [t for t in tb["t"] if t % 4 == 0 or t == a["length"] - 1]
        for key in ("return", "cache_tokens"):
            full = dict(zip(tb["t"], tb[key], strict=True))
            assert ta[key] == [float(f"{full[t]:.4g}") for t in ta["t"]], key
            assert all(_sig_digits(v) <= 4 for v in ta[key])
        assert ta["return"][-1] == float(f"{a['return']:.4g}")
    s_new, s_old = json.loads((tmp_path / "new.json").read_text()), json.loads((tmp_path / "old.json").read_text())

    def scores(summary):
        strip = lambda rows: [{k: v for k, v in r.items() if k != "throughput"} for r in rows]  # noqa: E731
        return strip(summary["rows"]), {env: strip(rows) for env, rows in summary["breakdown"].items()}

    assert scores(s_new) == scores(s_old)
    assert (s_new["settings"]["trace_points"], s_new["settings"]["trace_digits"]) == (50, 4)

    # the committed files of earlier runs: 100 unrounded points and full_tokens (3 t + 2) per record
    path = tmp_path / "old.jsonl"
    text = path.read_text().splitlines()
    legacy = [text[0]]
    for line in text[1:]:
        r = json.loads(line)
        r["trace"]["full_tokens"] = [float(3 * t + 2) for t in r["trace"]["t"]]
        legacy.append(json.dumps(r))
    path.write_text("\n".join(legacy) + "\n")
    before_rows = json.loads((tmp_path / "old.json").read_text())["rows"]
    compact_file(path)
    rewritten = _records(path)
    for a, b in zip(new, rewritten, strict=True):
        assert b["trace"] == a["trace"]
    summary = json.loads((tmp_path / "old.json").read_text())
    assert summary["settings"] == s_new["settings"] and summary["rows"] == before_rows
    # the eval then finds every episode done and rewrites its summary byte for byte
    data = (tmp_path / "old.json").read_bytes()
    assert main(_argv(tmp_path / "old.json", steps=steps)) == 0
    assert (tmp_path / "old.json").read_bytes() == data
    # a file whose traces lack the new rule's steps is refused
    r = json.loads(path.read_text().splitlines()[1])
    with pytest.raises(ValueError, match="its trace has no step"):
        from namm_transfer.evals.offline_rl.compact_traces import compact_record

        compact_record({**r, "trace": {**r["trace"], "t": [t + 1 for t in r["trace"]["t"]]}}, steps)
    assert np.isfinite(r["score"])
