"""Results files: append, resume, refuse another command's file, summaries, shards."""

from __future__ import annotations

import json
import math

import pytest

from namm_transfer.results import (
    ResultsFileError,
    ResultsWriter,
    breakdown_by,
    merge_shards,
    read_results,
    select_shard,
    shard_info,
    shard_path,
    summarize,
)

COMMON_SUMMARY_KEYS = (
    "command",
    "target",
    "model",
    "namm_checkpoint",
    "settings",
    "versions",
    "hardware",
    "started",
    "finished",
    "rows",
    "breakdown",
)
"""Keys every results summary (NAME.json) carries, whatever the target (the common format)."""

SETTINGS = {"budget": 0.25, "update_interval": 64, "seeds": [0, 1]}
CKPT = {"name": "bam.smollm2-135m", "sha256": "ab" * 32}


def make_writer(path, **overrides):
    kwargs = dict(
        command=["namm-transfer", "eval", "--target", "language"],
        target="language",
        settings=SETTINGS,
        model="tiny-llama",
        namm_checkpoint=CKPT,
        rank=0,
        world_size=1,
    )
    kwargs.update(overrides)
    return ResultsWriter(path, **kwargs)


def test_append_resume_and_done_keys(tmp_path):
    out = tmp_path / "lang.json"
    w = make_writer(out)
    assert w.jsonl_path == tmp_path / "lang.jsonl"
    assert w.done_keys() == set()
    w.add({"key": "full/a", "policy": "full", "score": 1.0})
    w.add({"key": "full/b", "policy": "full", "score": 0.0})
    lines = (tmp_path / "lang.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "_header" in json.loads(lines[0])

    w2 = make_writer(out)
    assert w2.resumed == 2
    assert w2.done_keys() == {"full/a", "full/b"}
    w2.add({"key": "namm/a", "policy": "namm", "score": 0.5})
    assert [r["key"] for r in w2.records()] == ["full/a", "full/b", "namm/a"]
    with pytest.raises(ValueError, match="already recorded"):
        w2.add({"key": "full/a", "policy": "full", "score": 1.0})
    with pytest.raises(ValueError, match="policy"):
        w2.add({"key": "x"})
    assert len(make_writer(out).records()) == 3


def test_truncated_last_line_is_dropped_and_rewritten(tmp_path, caplog):
    out = tmp_path / "lang.json"
    w = make_writer(out)
    w.add({"key": "full/a", "policy": "full", "score": 1.0})
    with open(w.jsonl_path, "a") as fh:
        fh.write('{"key": "full/b", "policy": "fu')  # killed mid-write
    with caplog.at_level("WARNING"):
        w2 = make_writer(out)
    assert "truncated" in caplog.text
    assert w2.done_keys() == {"full/a"}
    text = w2.jsonl_path.read_text()
    assert text.endswith("\n") and "full/b" not in text
    w2.add({"key": "full/b", "policy": "full", "score": 0.0})
    header, records, truncated = read_results(w2.jsonl_path)
    assert header is not None and not truncated
    assert [r["key"] for r in records] == ["full/a", "full/b"]


def test_corrupt_middle_line_raises(tmp_path):
    out = tmp_path / "lang.json"
    w = make_writer(out)
    w.add({"key": "full/a", "policy": "full", "score": 1.0})
    lines = w.jsonl_path.read_text().splitlines()
    w.jsonl_path.write_text("\n".join([lines[0], "{oops", lines[1]]) + "\n")
    with pytest.raises(ValueError, match="corrupt"):
        make_writer(out)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model": "other-model"}, "model"),
        ({"target": "video-llava"}, "target"),
        ({"settings": {**SETTINGS, "budget": 0.5}}, "settings.budget"),
        ({"namm_checkpoint": None}, "namm_checkpoint"),
        ({"namm_checkpoint": {**CKPT, "sha256": "cd" * 32}}, "namm_checkpoint"),
    ],
)
def test_header_mismatch_refuses(tmp_path, change, field):
    out = tmp_path / "lang.json"
    make_writer(out).add({"key": "full/a", "policy": "full", "score": 1.0})
    with pytest.raises(ValueError, match="another command") as info:
        make_writer(out, **change)
    assert field in str(info.value)
    # the command line itself is not part of the identity
    assert make_writer(out, command="namm-transfer eval --target language --limit 9").resumed == 1


def test_namm_install_path_is_not_part_of_the_identity(tmp_path):
    """A file written with the NAMM at one path (older decision-transformer headers recorded it) resumes and merges
    with the same checkpoint (name and content) installed elsewhere."""
    out = tmp_path / "lang.json"
    make_writer(out, namm_checkpoint={**CKPT, "path": "/old/checkout/model.safetensors"}).add(
        {"key": "full/a", "policy": "full", "score": 1.0}
    )
    assert make_writer(out).resumed == 1
    assert make_writer(out, namm_checkpoint={**CKPT, "path": "/elsewhere/model.safetensors"}).resumed == 1


def test_namm_hyperparameters_are_part_of_the_identity(tmp_path):
    """Same weights, another threshold (config.json edited, or a setting overridden): another NAMM. A file written
    before the hyperparameters were recorded is still resumed on the name and content alone."""
    from namm_transfer.checkpoint import namm_record
    from namm_transfer.namm import NAMM, NAMMConfig

    net = NAMM()
    net.checkpoint_info = {"name": CKPT["name"], "content_hash": CKPT["sha256"]}
    rec = namm_record(net)
    assert rec == {**CKPT, "config": NAMMConfig().to_dict()}
    out = tmp_path / "lang.json"
    make_writer(out, namm_checkpoint=rec).add({"key": "full/a", "policy": "full", "score": 1.0})
    assert make_writer(out, namm_checkpoint=rec).resumed == 1
    net.config = NAMMConfig(threshold=0.5)
    with pytest.raises(ValueError, match="another command") as info:
        make_writer(out, namm_checkpoint=namm_record(net))
    assert "namm_checkpoint" in str(info.value)
    old = tmp_path / "old.json"
    make_writer(old).add({"key": "full/a", "policy": "full", "score": 1.0})  # header without "config"
    assert make_writer(old, namm_checkpoint=rec).resumed == 1


def test_non_finite_numbers_stored_as_null(tmp_path, caplog):
    w = make_writer(tmp_path / "lang.json")
    with caplog.at_level("WARNING"):
        w.add({"key": "full/a", "policy": "full", "score": float("nan"), "extra": {"x": float("inf")}})
    assert "stored as null" in caplog.text
    line = w.jsonl_path.read_text().splitlines()[1]
    rec = json.loads(line)  # strict JSON: no NaN tokens
    assert "NaN" not in line and "Infinity" not in line
    assert rec["score"] is None and rec["extra"]["x"] is None


def test_numpy_scalars_become_numbers(tmp_path):
    np = pytest.importorskip("numpy")
    w = make_writer(tmp_path / "lang.json")
    w.add({"key": "full/a", "policy": "full", "score": np.float32(0.5), "lens": np.arange(3)})
    rec = w.records()[0]
    assert rec["score"] == 0.5 and rec["lens"] == [0, 1, 2]


def test_finalize_schema(tmp_path):
    w = make_writer(tmp_path / "lang.json")
    w.add({"key": "full/a", "policy": "full", "task": "qa", "score": 1.0, "retained_cache": 1.0})
    w.add({"key": "namm/a", "policy": "namm", "task": "qa", "score": 0.5, "retained_cache": 0.4})
    recs = w.records()
    path = w.finalize(summarize(recs), breakdown_by(recs, "task"), extra={"breakdown_by": "task"})
    assert path == tmp_path / "lang.json"
    summary = json.loads(path.read_text())
    for key in COMMON_SUMMARY_KEYS:
        assert key in summary, key
    assert summary["command"] == "namm-transfer eval --target language"
    assert summary["namm_checkpoint"] == CKPT
    assert summary["settings"] == SETTINGS
    assert set(summary["versions"]) >= {"python", "torch", "transformers", "namm_transfer"}
    assert {"platform", "cpu_count"} <= set(summary["hardware"])
    assert summary["started"].endswith("+00:00") and summary["finished"] >= summary["started"]
    assert [r["policy"] for r in summary["rows"]] == ["full", "namm"]
    assert summary["breakdown"]["qa"][1]["retained_cache"] == pytest.approx(0.4)
    assert summary["breakdown_by"] == "task"
    with pytest.raises(ValueError, match="standard"):
        w.finalize([], {}, extra={"rows": []})


def test_a_rerun_that_records_nothing_keeps_the_run_description(tmp_path):
    """Running a finished command again rewrites only what the code computes from the records: the summary keeps
    the command, versions, hardware, start, end, wall time and device of the run that produced them, byte for byte,
    whatever the command line of the rerun (e.g. the same run asked with an explicit --output). A run that adds or
    drops a unit, or finds a summary of other records, describes itself."""
    out = tmp_path / "lang.json"
    w = make_writer(out)
    w.add({"key": "full/a", "policy": "full", "score": 1.0})
    w.finalize(summarize(w.records()), {}, extra={"wall_s": 2.0, "device": "cpu"})
    first = json.loads(out.read_text())
    old = {
        "command": "namm-transfer eval --target language",
        "versions": {"torch": "0.0-old"},
        "hardware": {"platform": "elsewhere"},
        "started": "2000-01-01T00:00:00+00:00",
        "finished": "2000-01-01T01:00:00+00:00",
        "wall_s": 3600.0,
        "device": "cuda",
    }
    assert set(old) == {"command", "versions", "hardware", "started", "finished", "wall_s", "device"}
    written = json.dumps({**first, **old}, indent=2) + "\n"
    out.write_text(written)

    again = make_writer(out, command=["namm-transfer", "eval", "--target", "language", "--output", str(out)])
    again.finalize(summarize(again.records()), {}, extra={"wall_s": 0.1, "device": "cpu"})  # not the run's
    assert out.read_text() == written  # byte for byte
    assert json.loads(out.read_text())["rows"] == first["rows"]

    # a description field the producing run did not record stays absent
    without_device = {k: v for k, v in {**first, **old}.items() if k != "device"}
    written = json.dumps(without_device, indent=2) + "\n"
    out.write_text(written)
    make_writer(out).finalize(summarize(w.records()), {}, extra={"wall_s": 0.1, "device": "cpu"})
    assert out.read_text() == written

    # a summary of other records (another setting, another count) is not this run's: it describes itself
    for stale in ({"settings": {**SETTINGS, "budget": 0.5}}, {"n_records": 2}, {"records_file": "x.jsonl"}):
        out.write_text(json.dumps({**first, **old, **stale}))
        rerun = make_writer(out)
        rerun.finalize(summarize(rerun.records()), {}, extra={"wall_s": 0.1, "device": "cpu"})
        summary = json.loads(out.read_text())
        assert summary["finished"] > old["finished"] and summary["wall_s"] == 0.1, stale
        assert summary["command"] == rerun.command and summary["device"] == "cpu", stale
    out.write_text(json.dumps({**first, **old}))

    more = make_writer(out)
    more.add({"key": "namm/a", "policy": "namm", "score": 0.5})
    more.finalize(summarize(more.records()), {})
    summary = json.loads(out.read_text())
    assert summary["finished"] > old["finished"] and summary["hardware"] != old["hardware"]
    assert summary["n_records"] == 2 and summary["command"] == more.command and "device" not in summary
    out.write_text(json.dumps({**summary, **old}))

    fewer = make_writer(out)
    assert fewer.drop(["namm/a"]) == 1
    fewer.finalize(summarize(fewer.records()), {})
    assert json.loads(out.read_text())["finished"] > old["finished"]


def test_summarize_exact_numbers():
    records = [
        {"policy": "full", "score": 1.0, "retained_cache": 1.0},
        {"policy": "full", "score": 2.0, "retained_cache": 1.0},
        {"policy": "full", "score": 3.0, "retained_cache": 1.0},
        {"policy": "h2o", "score": 4.0, "retained_cache": 0.25, "peak_memory_mb": 10.0},
        {"policy": "h2o", "score": 6.0, "retained_cache": 0.75, "peak_memory_mb": 20.0},
        {"policy": "h2o", "score": None},
    ]
    rows = summarize(records)
    assert [r["policy"] for r in rows] == ["full", "h2o"]
    full, h2o = rows
    assert full["score"] == 2.0 and full["n"] == 3
    assert full["score_std"] == pytest.approx(math.sqrt(2 / 3), abs=1e-15)
    assert full["retained_cache"] == 1.0 and "peak_memory_mb" not in full and "n_missing" not in full
    assert h2o["score"] == 5.0 and h2o["score_std"] == 1.0 and h2o["n"] == 2 and h2o["n_missing"] == 1
    assert h2o["retained_cache"] == 0.5 and h2o["peak_memory_mb"] == 15.0

    by_task = breakdown_by(
        [{"policy": "full", "task": "b", "score": 1.0}, {"policy": "full", "task": "a", "score": 3.0}, {"policy": "x"}],
        "task",
    )
    assert list(by_task) == ["a", "b"]
    assert by_task["a"] == [{"policy": "full", "score": 3.0, "score_std": 0.0, "n": 1}]


def test_shard_helpers(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert shard_info() == (0, 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert shard_info() == (1, 2)
    monkeypatch.setenv("RANK", "0")
    assert shard_info() == (0, 2)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError):
        shard_info()

    assert shard_path("results/lang.json", 0, 1).as_posix() == "results/lang.jsonl"
    assert shard_path("results/lang.json", 1, 2).as_posix() == "results/lang.rank1-of2.jsonl"
    items = list(range(7))
    shards = [select_shard(items, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shards, [])) == items


def test_two_ranks_then_merge(tmp_path, monkeypatch):
    """Two processes under torchrun-style env vars, a duplicated unit, then a merge and a resume."""
    out = tmp_path / "lang.json"
    samples = ["s0", "s1", "s2", "s3", "s4"]
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        w = make_writer(out, rank=None, world_size=None)
        assert (w.rank, w.world_size) == (rank, 2)
        assert w.jsonl_path.name == f"lang.rank{rank}-of2.jsonl"
        for s in select_shard(samples, w.rank, w.world_size):
            w.add({"key": f"full/{s}", "policy": "full", "score": float(s[1])})
        if rank == 1:  # a unit both ranks happened to write
            w.add({"key": "full/s0", "policy": "full", "score": 0.0})
        shard_summary = w.finalize(summarize(w.records()), {})
        assert shard_summary.name == f"lang.rank{rank}-of2.json"
        assert json.loads(shard_summary.read_text())["shard"] == {"rank": rank, "world_size": 2}

    # the pattern the docs and `report --merge --help` give matches the shard files
    assert sorted(p.name for p in tmp_path.glob("lang.rank*-of*.jsonl")) == [
        "lang.rank0-of2.jsonl",
        "lang.rank1-of2.jsonl",
    ]
    merged = merge_shards(str(tmp_path / "lang.rank*-of*.jsonl"), out)
    assert merged == tmp_path / "lang.jsonl"
    header, records, _ = read_results(merged)
    assert header["model"] == "tiny-llama"
    assert sorted(r["key"] for r in records) == [f"full/{s}" for s in samples]

    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    w = make_writer(out, rank=None, world_size=None)
    assert w.done_keys() == {f"full/{s}" for s in samples}
    rows = summarize(w.records())
    assert rows[0]["score"] == 2.0 and rows[0]["n"] == 5


def test_merge_refuses_mismatched_shards(tmp_path):
    a = make_writer(tmp_path / "lang.json", rank=0, world_size=2)
    a.add({"key": "full/a", "policy": "full", "score": 1.0})
    b = make_writer(tmp_path / "lang.json", rank=1, world_size=2, model="other")
    b.add({"key": "full/b", "policy": "full", "score": 1.0})
    with pytest.raises(ValueError, match="another command"):
        merge_shards([a.jsonl_path, b.jsonl_path], tmp_path / "lang.json")
    with pytest.raises(FileNotFoundError):
        merge_shards(str(tmp_path / "nothing.rank*.jsonl"), tmp_path / "lang.json")


def test_two_real_processes_then_merge(tmp_path):
    """Two concurrent worker processes with torchrun's env vars, each writing its shard."""
    import os
    import subprocess
    import sys

    out = tmp_path / "lang.json"
    code = (
        "import sys\n"
        "from namm_transfer.results import ResultsWriter, select_shard\n"
        "w = ResultsWriter(sys.argv[1], 'cmd', 'language', {'b': 1}, 'tiny', None)\n"
        "for i in select_shard(range(9), w.rank, w.world_size):\n"
        "    w.add({'key': f'full/{i}', 'policy': 'full', 'score': float(i)})\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(out)],
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)},
        )
        for rank in range(2)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    merge_shards([tmp_path / "lang.rank0-of2.jsonl", tmp_path / "lang.rank1-of2.jsonl"], out)
    w = make_writer(out, settings={"b": 1}, model="tiny", namm_checkpoint=None)
    assert w.done_keys() == {f"full/{i}" for i in range(9)}
    assert summarize(w.records())[0]["score"] == 4.0


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    import os

    from namm_transfer.results import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_text() == "{}\n"
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left behind


def test_a_smaller_run_is_refused_a_larger_one_resumes(tmp_path):
    """A smoke test (--limit 1) into a file of a larger run would rewrite its summary from part of it: refused,
    naming what to do; the same or a larger sample list resumes."""
    out = tmp_path / "lang.json"
    w = make_writer(out)
    for sample in ("a", "b/c"):  # sample ids may hold a slash: the policy is what comes before the first
        w.add({"key": f"full/{sample}", "policy": "full", "score": 1.0})
    w = make_writer(out)
    w.refuse_samples_outside(["a", "b/c"])
    w.refuse_samples_outside(["a", "b/c", "d"])
    with pytest.raises(
        ResultsFileError, match=r"holds 1 sample\(s\) this run does not evaluate \(e.g. 'b/c'\).*--output"
    ):
        w.refuse_samples_outside(["a"])


def test_a_foreign_json_at_the_summary_path_is_not_overwritten(tmp_path):
    precious = tmp_path / "notes.json"
    precious.write_text('{"my": "notes"}')
    with pytest.raises(ResultsFileError, match="is not a results summary"):
        make_writer(precious)
    assert precious.read_text() == '{"my": "notes"}' and not (tmp_path / "notes.jsonl").exists()
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ResultsFileError, match="is not a results summary"):
        make_writer(tmp_path / "broken.json")
    w = make_writer(tmp_path / "run.json")
    w.add({"key": "full/a", "policy": "full", "score": 1.0})
    w.finalize([{"policy": "full", "score": 1.0, "n": 1}], {})
    assert make_writer(tmp_path / "run.json").resumed == 1  # its own summary: fine


def test_an_extendable_setting_may_grow_and_keeps_the_records(tmp_path):
    out = tmp_path / "dt.json"
    small = {"episodes": {"hopper": 2, "walker2d": 2}, "seeds": {"hopper": [0, 1], "walker2d": [0, 1]}, "k": 1}
    w = make_writer(out, settings=small, extendable=("episodes", "seeds"))
    w.add({"key": "full/hopper/0", "policy": "full", "score": 1.0})
    # more seeds for one env: the same units plus new ones; the header takes the larger run's settings and command
    grown = {"episodes": {"hopper": 3, "walker2d": 2}, "seeds": {"hopper": [0, 1, 2], "walker2d": [0, 1]}, "k": 1}
    w2 = make_writer(out, settings=grown, extendable=("episodes", "seeds"), command="namm-transfer eval --more")
    assert w2.resumed == 1 and w2.done_keys() == {"full/hopper/0"}
    header, records, _ = read_results(tmp_path / "dt.jsonl")
    assert header["settings"] == grown and header["command"] == "namm-transfer eval --more" and len(records) == 1
    summary = json.loads(w2.finalize([], {}).read_text())
    assert summary["command"] == "namm-transfer eval --more" and summary["settings"] == grown
    # fewer seeds, other seeds, or a setting that is not extendable: refused as before, file untouched
    before = (tmp_path / "dt.jsonl").read_bytes()
    for settings in (
        small,
        {**grown, "seeds": {"hopper": [1, 2, 3], "walker2d": [0, 1]}},
        {**grown, "k": 2},
        {**grown, "seeds": {"hopper": [0, 1, 2]}},
    ):
        with pytest.raises(ResultsFileError, match="another command"):
            make_writer(out, settings=settings, extendable=("episodes", "seeds"))
    # without extendable, growth is refused too
    with pytest.raises(ResultsFileError, match="settings.episodes"):
        make_writer(out, settings={**grown, "episodes": {"hopper": 4, "walker2d": 2}})
    assert (tmp_path / "dt.jsonl").read_bytes() == before
