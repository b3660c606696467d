"""``namm-transfer eval --target video-llava`` end to end, on a tiny random Video-LLaVA and generated videos."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")  # the transformers video processors need it
pytest.importorskip("av")

from namm_transfer.evals.video_qa import run as vqa  # noqa: E402
from namm_transfer.evals.video_qa.synthetic import generate_benchmark  # noqa: E402
from tiny_vlms import tiny_vlm_folder  # noqa: E402

from namm_transfer.checkpoint import save_namm  # noqa: E402
from namm_transfer.cli import main  # noqa: E402
from namm_transfer.namm import NAMM  # noqa: E402
from namm_transfer.protocols import Protocol  # noqa: E402
from namm_transfer.report import MECHANICS_NOTE  # noqa: E402
from namm_transfer.results import read_results  # noqa: E402

POLICIES = ["namm", "full", "h2o", "l2", "streaming", "random"]
BASELINES = POLICIES[2:]
LABELS = ["ratio-50", "ratio-25", "threshold"]  # the default protocols
RATIO = {"ratio-50": 0.5, "ratio-25": 0.25}
UNITS = [(None, "full"), (None, "full-alt")] + [(lab, p) for lab in LABELS for p in POLICIES if p != "full"]
FRAMES = 8
NEW_TOKENS = 4
GOOD = 3  # generated videos; the benchmark also lists a corrupt, an empty and a missing one
BAD = {"corrupt-0": "corrupt", "empty-0": "empty", "missing-0": "not found"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Video-LLaVA folder, a random NAMM checkpoint, and a LongVideoBench-layout benchmark."""
    root = tmp_path_factory.mktemp("video_eval")
    model = tiny_vlm_folder(root / "model", "video-llava")
    namm = NAMM()
    gen = torch.Generator().manual_seed(0)
    namm.set_flat(torch.randn(namm.n_params, generator=gen) * 0.5)  # evicts most of the video
    namm.set_normalization(torch.zeros(namm.config.n_bins), torch.ones(namm.config.n_bins))
    save_namm(namm, root / "namm")
    bench = root / "bench"
    json_path = generate_benchmark(bench, n_videos=GOOD, frames_per_video=16, size=32, split="test", seed=0)
    items = json.loads(json_path.read_text())
    good_mp4 = (bench / "videos" / items[0]["video_path"]).read_bytes()
    (bench / "videos" / "corrupt.mp4").write_bytes(good_mp4[:48] + b"\x00garbage" * 64)
    (bench / "videos" / "empty.mp4").write_bytes(b"")
    items.append({**items[0], "id": "corrupt-0", "video_path": "corrupt.mp4"})
    items.append({**items[1], "id": "empty-0", "video_path": "empty.mp4"})
    items.append({**items[2], "id": "missing-0", "video_path": "missing.mp4"})
    json_path.write_text(json.dumps(items))
    return {"root": root, "model": str(model), "namm": str(root / "namm"), "bench": str(bench), "ids": items}


def _argv(setup, output, *extra):
    return [
        "eval",
        "--target",
        "video-llava",
        "--model",
        setup["model"],
        "--bench",
        "longvideobench",
        "--data-dir",
        setup["bench"],
        "--namm",
        setup["namm"],
        "--frames",
        str(FRAMES),
        "--update-interval",
        "64",
        "--chunk-size",
        "64",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--output",
        str(output),
        *extra,
    ]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def _key(protocol, policy, sid):
    return f"{policy}/{sid}" if protocol is None else f"{policy}@{protocol}/{sid}"


def test_eval_end_to_end_resume_and_failures(setup, capsys):
    out = setup["root"] / "results" / "video.json"
    jsonl = out.with_suffix(".jsonl")
    policies = ["--policies", ",".join(POLICIES)]

    # a run stopped after 2 samples, then killed in the middle of the second sample's threshold baselines
    assert main(_argv(setup, out, *policies, "--limit", "2")) == 0
    first = _lines(jsonl)
    assert [r["key"] for r in first] == [_key(*u, s["id"]) for s in setup["ids"][:2] for u in UNITS]
    assert [(r["protocol"], r["policy"]) for r in first] == UNITS * 2  # every record names its protocol
    kept_lines = jsonl.read_text().splitlines()[:-3]  # drop threshold's l2, streaming, random of the second sample
    jsonl.write_text("\n".join(kept_lines) + '\n{"key": "l2/synth-te')  # and leave a half-written line
    capsys.readouterr()

    assert main(_argv(setup, out, *policies)) == 0
    printed = capsys.readouterr().out
    assert MECHANICS_NOTE in printed and "| namm |" in printed
    _, records, truncated = read_results(jsonl)
    assert not truncated
    keys = [r["key"] for r in records]
    expected = {_key(*u, s["id"]) for s in setup["ids"] for u in UNITS}
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected  # every unit exactly once
    assert records[: 2 * len(UNITS) - 3] == first[:-3]  # finished units are not recomputed
    by_key = {r["key"]: r for r in records}

    # a smoke test into the finished file would rewrite its summary from one sample: refused, nothing written
    before = (jsonl.read_bytes(), out.read_bytes())
    assert main(_argv(setup, out, *policies, "--limit", "1")) == 2
    assert "does not evaluate" in capsys.readouterr().err and (jsonl.read_bytes(), out.read_bytes()) == before

    # failures are recorded per sample, protocol and policy; the run went on
    for sid, cause in BAD.items():
        for u in UNITS:
            rec = by_key[_key(*u, sid)]
            assert rec["score"] is None and rec["correct"] is None and cause in rec["error"], rec["error"]
            assert rec["protocol"] == u[0]

    # threshold: baselines replay NAMM's cache lengths exactly, also for the units resumed from NAMM's record
    kv = 2 * 2 * 16 * 4  # K and V x 2 KV heads x head_dim 16 x float32, per layer and token
    for item in setup["ids"][:GOOD]:
        sid = item["id"]
        namm = by_key[f"namm@threshold/{sid}"]
        full = by_key[f"full/{sid}"]
        assert 0 < namm["retained_cache"] < 1 and 0 <= namm["retained_video"] < 1
        assert full["retained_cache"] == full["retained_video"] == full["retained_text"] == 1.0
        assert full["peak_cache_mb"] == pytest.approx((full["prompt_tokens"] + NEW_TOKENS - 1) * 2 * kv / 2**20)
        assert namm["peak_cache_mb"] < full["peak_cache_mb"]
        assert namm["budget"] == "threshold" and namm["final_update"] is False
        for p in BASELINES:
            rec = by_key[f"{p}@threshold/{sid}"]
            assert rec["budget"] == "replay:namm" and rec["final_update"] is False
            assert rec["kept_counts"] == namm["kept_counts"], (p, sid)
            assert rec["retained_cache"] == pytest.approx(namm["retained_cache"], abs=1e-12), (p, sid)
            assert rec["peak_cache_mb"] == pytest.approx(namm["peak_cache_mb"], abs=1e-12)
            assert 0 <= rec["retained_video"] <= 1 and 0 <= rec["retained_text"] <= 1
        # no update at the end of the prompt under threshold (today's protocol): its length is no multiple of 64
        prompt = namm["prompt_tokens"]
        assert prompt % 64 != 0 and prompt not in namm["update_seen"]

        # ratio:R: every policy, the NAMM included, keeps floor(R x tokens seen) in every layer and head at every
        # update, and once more at the end of the prompt
        for label, ratio in RATIO.items():
            recs = [by_key[f"{p}@{label}/{sid}"] for p in ["namm", *BASELINES]]
            for rec in recs:
                assert rec["budget"] == f"ratio:{ratio:g}" and rec["final_update"] is True
                seen = rec["update_seen"]
                assert prompt in seen and seen == sorted(seen)  # the update at the end of the prompt
                assert seen == [s for s in range(64, prompt + NEW_TOKENS, 64) if s < prompt] + [prompt] + [
                    s for s in range(64, prompt + NEW_TOKENS, 64) if s > prompt
                ]
                assert len(rec["kept_counts"]) == len(seen)
                for step, n_seen in enumerate(seen):
                    layers = rec["kept_counts"][str(step)]
                    assert set(layers) == {"0", "1"}
                    for counts in layers.values():
                        assert counts == [[math.floor(ratio * n_seen)] * 2], (rec["key"], step, n_seen, counts)
                assert rec["retained_cache"] == pytest.approx(recs[0]["retained_cache"], abs=1e-12)
                assert 0 <= rec["retained_video"] <= 1 and rec["retained_cache"] < 1

        assert by_key[f"namm@ratio-25/{sid}"]["retained_cache"] < by_key[f"namm@ratio-50/{sid}"]["retained_cache"]

        # the noise floor: the full cache under half the chunk size
        alt = by_key[f"full-alt/{sid}"]
        assert alt["chunk_size"] == 32 and full["chunk_size"] == 64 and alt["protocol"] is None
        assert alt["retained_cache"] == 1.0 and alt["budget"] is None and "kept_counts" not in full
        for rec in (by_key[_key(*u, sid)] for u in UNITS):
            assert rec["frames"] == FRAMES and len(rec["frame_indices"]) == FRAMES and rec["n_generated"] <= NEW_TOKENS
            assert rec["score"] in (0.0, 100.0) and rec["correct"] == (rec["score"] == 100.0)
            assert rec["prediction"] in (None, "A", "B", "C", "D") and isinstance(rec["response"], str)
            assert rec["throughput"] > 0 and rec["tokens_per_frame"] == 17 and len(rec["frame_kept_end"]) == FRAMES
        assert len(namm["frame_kept_updates"]) == namm["n_updates"] == len(namm["update_clock"]) > 0
        assert set(namm["frames_with_events"]) <= set(range(FRAMES))
        assert full["peak_memory_mb"] == full["peak_cache_mb"] and full["peak_memory_source"] == "kv_cache"
        for label in LABELS:  # per layer and frame, at the end; its mean over layers is frame_kept_end
            rec = by_key[f"namm@{label}/{sid}"]
            grid = rec["frame_kept_end_layers"]
            assert len(grid) == 2 and all(len(row) == FRAMES and all(0 <= v <= 1 for v in row) for row in grid)
            assert [(a + b) / 2 for a, b in zip(*grid, strict=True)] == pytest.approx(rec["frame_kept_end"], abs=2e-3)
    plotted = by_key[f"namm@ratio-50/{setup['ids'][0]['id']}"]  # token-level fractions for the picture's samples
    assert len(plotted["token_kept_first"]) == len(plotted["token_kept_end"]) == FRAMES * 17
    assert all(0 <= v <= 1 for v in plotted["token_kept_first"] + plotted["token_kept_end"])

    # the summary
    summary = json.loads(out.read_text())
    assert summary["target"] == "video-llava" and summary["note"] == MECHANICS_NOTE
    settings = summary["settings"]
    assert settings["mechanics_only"] is True and settings["frames"] == FRAMES and settings["update_interval"] == 64
    assert settings["bench"] == "longvideobench" and settings["seed"] == 0 and "{prompt}" in settings["prompt_template"]
    assert summary["namm_checkpoint"]["sha256"] and summary["managed_layers"] == [0, 1]
    assert settings["protocols"] == ["ratio:0.5", "ratio:0.25", "threshold"] and settings["protocol_labels"] == LABELS
    assert settings["noise_floor"]["policy"] == "full-alt" and settings["noise_floor"]["value"] == 32
    rows = {(r["protocol"], r["policy"]): r for r in summary["rows"]}
    assert list(rows) == UNITS
    for (label, p), row in rows.items():
        assert row["n"] == GOOD and row["n_missing"] == row["n_errors"] == len(BAD) and row["mechanics_only"]
        assert 0 <= row["score"] <= 100 and row["score_std"] >= 0 and 0 <= row["retained_video"] <= 1
        if label is not None and p != "namm":
            assert row["retained_cache"] == pytest.approx(rows[(label, "namm")]["retained_cache"], abs=1e-12)
        # paired intervals: against the shared full cache, and against the NAMM of the same protocol
        assert ("vs_full" in row) == (p != "full") and ("vs_namm" in row) == (label is not None and p != "namm")
        for ref in ("full", "namm"):
            if f"vs_{ref}" not in row:
                continue
            other = rows[(None, "full")] if ref == "full" else rows[(label, "namm")]
            ci = row[f"vs_{ref}"]
            assert ci["n"] == GOOD and ci["resamples"] == 2000 and ci["level"] == 0.95
            assert ci["lo"] <= ci["mean"] <= ci["hi"]
            # one question per category here: the mean over categories is the score difference
            assert ci["mean"] == pytest.approx(row["score"] - other["score"], abs=1e-9)
    assert rows[(None, "full")]["retained_cache"] == 1.0 and rows[("threshold", "namm")]["retained_video"] < 1
    assert rows[(None, "full-alt")]["retained_cache"] == 1.0
    assert set(summary["breakdown"]) == {"category", "duration_group"}
    cats = summary["breakdown"]["category"]
    assert set(cats) == {item["question_category"] for item in setup["ids"][:GOOD]}
    for brows in cats.values():
        assert {(r["protocol"], r["policy"]) for r in brows} == set(UNITS)
        for r in brows:
            assert r["n"] == 1 and (r["policy"] == "full" or r["vs_full"]["n"] == 1)
    png = out.with_name("video.kept-frames.png")
    assert summary["kept_frames_png"] == png.name and png.stat().st_size > 10_000
    assert summary["kept_frames_protocol"] == "ratio-50"
    layers_png = out.with_name("video.kept-layers.png")
    assert summary["kept_layers_png"] == layers_png.name
    head = layers_png.read_bytes()[:24]  # PNG signature + IHDR: width, height
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    # one panel per protocol, 80 dpi: (3.6 x 3 + 0.8) x 3.4 inches
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (928, 272)

    # the missing video restored: the next run of the same command retries the failed units, and only those
    missing = Path(setup["bench"]) / "videos" / "missing.mp4"
    shutil.copy(Path(setup["bench"]) / "videos" / setup["ids"][2]["video_path"], missing)
    try:
        assert main(_argv(setup, out, *policies)) == 0
    finally:
        missing.unlink()
    _, again, _ = read_results(jsonl)
    now = {r["key"]: r for r in again}
    assert set(now) == set(by_key)
    for u in UNITS:
        assert now[_key(*u, "missing-0")].get("error") is None and now[_key(*u, "missing-0")]["score"] in (0.0, 100.0)
        assert "corrupt" in now[_key(*u, "corrupt-0")]["error"]
        for item in setup["ids"][:GOOD]:
            assert now[_key(*u, item["id"])] == by_key[_key(*u, item["id"])]  # not recomputed


def test_sharded_run_merges(setup, monkeypatch):
    out = setup["root"] / "shards" / "video.json"
    args = _argv(
        setup,
        out,
        "--policies",
        "namm,full,h2o",
        "--protocols",
        "ratio:0.5,threshold",
        "--limit",
        "2",
        "--plot-samples",
        "0",
    )
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(args) == 0
        shard = _lines(out.with_name(f"video.rank{rank}-of2.jsonl"))
        assert {r["id"] for r in shard} == {setup["ids"][rank]["id"]}
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["report", "--merge", str(out.with_name("video.rank*-of2.jsonl")), "--output", str(out)]) == 0

    def no_work(*a, **k):
        raise AssertionError("every unit is in the merged file; nothing should run")

    monkeypatch.setattr(vqa._Evaluator, "sample", no_work)
    assert main(args) == 0
    rows = {(r["protocol"], r["policy"]): r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == [
        (None, "full"),
        (None, "full-alt"),
        ("ratio-50", "namm"),
        ("ratio-50", "h2o"),
        ("threshold", "namm"),
        ("threshold", "h2o"),
    ]
    assert all(r["n"] == 2 for r in rows.values())
    for label in ("ratio-50", "threshold"):
        h2o, namm = rows[(label, "h2o")], rows[(label, "namm")]
        assert h2o["retained_cache"] == pytest.approx(namm["retained_cache"], abs=1e-12)
        assert h2o["vs_namm"]["n"] == h2o["vs_full"]["n"] == 2


def test_question_without_options_is_a_clear_error(setup, tmp_path, capsys):
    items = json.loads(Path(setup["bench"], "synthetic_test.json").read_text())[:2]
    for i in range(5):
        items[1][f"option{i}"] = "N/A"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(items))
    argv = _argv(setup, tmp_path / "bad_results.json", "--annotations", str(bad))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "has no options" in err and items[1]["id"] in err and "bad.json" in err
    assert not (tmp_path / "bad_results.jsonl").exists()  # nothing was run


def test_helpers(setup, tmp_path, monkeypatch, capsys):
    assert vqa._grid(17) == (1, 4) and vqa._grid(144) == (0, 12) and vqa._grid(257) == (1, 16) and vqa._grid(6) is None
    assert vqa.find_annotations("longvideobench", setup["bench"]).name == "synthetic_test.json"
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text("[]")
    with pytest.raises(vqa._UsageError, match="--annotations"):
        vqa.find_annotations("longvideobench", tmp_path)
    model, _ = vqa.load_video_llm(setup["model"])
    assert vqa.is_mechanics_only(model, setup["model"]) and vqa.kv_bytes_per_token(model) == 256
    copy = tmp_path / "copy"
    shutil.copytree(setup["model"], copy)
    os.remove(copy / vqa.TINY_MARKER)
    assert vqa.is_mechanics_only(model, str(copy))  # hidden size 64: still a tiny model
    assert vqa._order(["h2o", "full", "namm"]) == ["namm", "full", "h2o"]
    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))
    tiny = Path(vqa._resolve_model("tiny:llava-onevision"))
    assert (tiny / vqa.TINY_MARKER).is_file() and tiny.name == "tiny-llava-onevision"
    assert vqa._resolve_model("some/hub-id") == "some/hub-id"
    assert main(_argv(setup, tmp_path / "x.json", "--policies", "h2o,full")) == 2  # nothing to replay
    assert "--protocols ratio:0.5" in capsys.readouterr().err  # ...and the message names the ways out
    assert main(_argv(setup, tmp_path / "x.json", "--protocols", "ratio:2")) == 2  # a share outside (0, 1)
    assert main(_argv(setup, tmp_path / "x.json", "--protocols", "ratio:0.5,budget")) == 2
    assert "unknown protocol 'budget'" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()

    # the runs of one sample: full (and its noise-floor twin) once, then each protocol's NAMM and baselines
    r50, thr = Protocol("ratio", 0.5), Protocol("threshold")
    assert vqa.units_of(["h2o", "full", "namm"], [r50, thr], noise_floor=True) == [
        (None, "full"),
        (None, "full-alt"),
        (r50, "namm"),
        (r50, "h2o"),
        (thr, "namm"),
        (thr, "h2o"),
    ]
    assert vqa.units_of(["h2o", "namm"], [thr], noise_floor=True) == [(thr, "namm"), (thr, "h2o")]  # no full
    assert vqa.units_of(["full", "l2"], [r50], noise_floor=False) == [(None, "full"), (r50, "l2")]
    assert [vqa.Unit(p, "h2o").key("a/b") for p in (None, r50, thr)] == [
        "h2o/a/b",
        "h2o@ratio-50/a/b",
        "h2o@threshold/a/b",
    ]
    assert vqa.alt_chunk_size(256) == 128 and vqa.alt_chunk_size(3) == 1 and vqa.alt_chunk_size(1) == 2

    # MLVU's headline is M-Avg, the mean over task types
    recs = [
        {"policy": "full", "category": c, "correct": ok, "score": 100.0 * ok}
        for c, ok in (("NQA", True), ("NQA", False), ("AO", True))
    ]
    row = vqa._rows(recs, [vqa.Unit(None, "full")], "mlvu", mechanics_only=False)[0]
    assert row["score"] == pytest.approx(75.0) and row["accuracy"] == pytest.approx(200 / 3)
    assert row["score_std"] == pytest.approx(25.0) and "mechanics_only" not in row


def test_cached_synthetic_benchmark_of_an_older_generator_is_made_again(tmp_path, monkeypatch):
    from namm_transfer.evals.video_qa.synthetic import GENERATOR_VERSION

    monkeypatch.setenv("NAMM_TRANSFER_CACHE", str(tmp_path / "cache"))
    path = vqa.synthetic_benchmark(n_videos=2, frames_per_video=16, size=32)
    first = path.read_bytes()
    assert json.loads(first)[0]["generator"] == GENERATOR_VERSION
    assert vqa.synthetic_benchmark(n_videos=2, frames_per_video=16, size=32).read_bytes() == first  # reused
    records = json.loads(first)
    for r in records:
        r["generator"] = "namm-synthetic-video-qa/0"
    path.write_text(json.dumps(records))
    assert vqa.synthetic_benchmark(n_videos=2, frames_per_video=16, size=32).read_bytes() == first  # made again
    own = tmp_path / "mine"
    shutil.copytree(path.parent, own)
    (own / path.name).write_text(json.dumps(records))
    assert vqa.synthetic_benchmark(own).read_text() == json.dumps(records)  # a folder given: used as it is


def test_notebook_executes(setup, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    path = Path(__file__).resolve().parents[1] / "notebooks" / "video_llava.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    # committed with outputs (python notebooks/execute.py): checked in tests/test_notebooks.py; run here afresh
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    injected = f"WORK_DIR = {str(tmp_path)!r}\nNAMM_CHECKPOINT = {setup['namm']!r}\n"
    nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell(injected))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: one thread, like the tests
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()
    texts = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any("Traceback" in t for t in texts)
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    summary = json.loads((tmp_path / "results" / "video-llava-synthetic.json").read_text())
    assert summary["settings"]["mechanics_only"] and summary["settings"]["bench"] == "synthetic"
    assert not math.isnan(summary["rows"][0]["retained_cache"])
    assert (tmp_path / "results" / "video-llava-synthetic.kept-frames.png").is_file()


def test_answer_text_stops_at_eos_and_other_special_tokens():
    """A reply ends at EOS or at any special token (a model that starts a new chat turn after its letter, as the
    shipped video model trained under transformers 5.17 does: 'B<|im_start|>assistant\\nC...' must read 'B')."""
    from namm_transfer.evals.video_qa.benchmarks import parse_answer
    from namm_transfer.evals.video_qa.run import answer_text, byte_level_tokenizer

    tok = byte_level_tokenizer()
    letter = tok("B", add_special_tokens=False)["input_ids"]
    rest = tok("assistant\nC is it", add_special_tokens=False)["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    stop = {eos} | set(tok.all_special_ids)
    ids = letter + [bos] + rest
    assert answer_text(ids, stop, tok) == ("B", 1) and parse_answer(answer_text(ids, stop, tok)[0], 4) == (1, False)
    assert answer_text(letter + [eos] + rest, {eos}, tok) == ("B", 1)
    assert answer_text(ids, {eos}, tok)[0] == "Bassistant\nC is it"  # only EOS: the marker is dropped, not cut
    assert parse_answer("Bassistant\nC is it", 4) == (2, False)  # ...and the wrong letter would be read


def test_rows_pair_each_policy_with_the_full_cache_and_its_protocols_namm():
    """Worked by hand: questions q1, q2 (category A) and q3, q5 (B, q5 scored as q3: a stratum needs two units to
    be resampled within); h2o's q4 failed. The interval's mean is the mean over
    categories of the within-category mean difference; vs_namm takes the NAMM of the row's own protocol."""
    scores = {
        (None, "full"): [100, 0, 100, 100],
        (None, "full-alt"): [100, 0, 0, 0],
        ("ratio-50", "namm"): [100, 100, 0, 0],
        ("ratio-50", "h2o"): [0, 100, 100, 100],
        ("threshold", "namm"): [0, 0, 0, 0],
        ("threshold", "h2o"): [100, 0, 100, 100],
    }
    cats = {"q1": "A", "q2": "A", "q3": "B", "q4": "B", "q5": "B"}
    records = [
        {"protocol": proto, "policy": pol, "id": q, "category": cats[q], "score": float(v), "correct": v == 100}
        for (proto, pol), values in scores.items()
        for q, v in zip(("q1", "q2", "q3", "q5"), values, strict=True)
    ]
    records.append({"protocol": "ratio-50", "policy": "h2o", "id": "q4", "category": "B", "score": None, "error": "x"})
    r50, thr = Protocol("ratio", 0.5), Protocol("threshold")
    units = vqa.units_of(["namm", "full", "h2o"], [r50, thr], noise_floor=True)
    rows = {(r["protocol"], r["policy"]): r for r in vqa._rows(records, units, "longvideobench", False)}
    assert list(rows) == list(scores)

    def mean(key, ref):
        return rows[key][f"vs_{ref}"]["mean"]

    assert "vs_full" not in rows[(None, "full")] and "vs_namm" not in rows[(None, "full")]
    assert "vs_namm" not in rows[(None, "full-alt")] and "vs_namm" not in rows[("ratio-50", "namm")]
    # full-alt - full: A (0, 0) -> 0, B (-100, -100) -> -100: mean -50 in every resample (strata resampled within)
    alt = rows[(None, "full-alt")]["vs_full"]
    assert (alt["mean"], alt["lo"], alt["hi"], alt["n"], alt["excludes_zero"]) == (-50.0, -50.0, -50.0, 4, True)
    # h2o under ratio-50 - its NAMM: A (-100, 0) -> -50, B (100) -> 100: 25 (the threshold NAMM would give 75)
    assert mean(("ratio-50", "h2o"), "namm") == pytest.approx(25.0) and rows[("ratio-50", "h2o")]["vs_namm"]["n"] == 4
    assert rows[("ratio-50", "h2o")]["n"] == 4 and rows[("ratio-50", "h2o")]["n_errors"] == 1
    # ... - the full cache: A (-100, 100) -> 0, B (0) -> 0
    assert mean(("ratio-50", "h2o"), "full") == pytest.approx(0.0)
    # h2o under threshold - its NAMM: A (100, 0) -> 50, B (100) -> 100: 75; NAMM - full: A (-100, 0), B (-100): -75
    assert mean(("threshold", "h2o"), "namm") == pytest.approx(75.0)
    assert mean(("threshold", "namm"), "full") == pytest.approx(-75.0)
    assert mean(("ratio-50", "namm"), "full") == pytest.approx(-25.0)  # A (0, 100) -> 50, B (-100)
    for row in rows.values():
        for ref in ("full", "namm"):
            if f"vs_{ref}" in row:
                ci = row[f"vs_{ref}"]
                assert ci["lo"] <= ci["mean"] <= ci["hi"] and ci["resamples"] == 2000 and ci["level"] == 0.95

    # within one category: the same comparison on its questions only
    by_cat = vqa._breakdown(records, "category")
    b = {(r["protocol"], r["policy"]): r for r in by_cat["B"]}
    assert b[("ratio-50", "h2o")]["vs_namm"]["mean"] == 100.0 and b[("ratio-50", "h2o")]["vs_namm"]["n"] == 2
    a = {(r["protocol"], r["policy"]): r for r in by_cat["A"]}
    assert a[("ratio-50", "h2o")]["vs_namm"]["mean"] == -50.0 and a[("threshold", "h2o")]["vs_full"]["n"] == 2
