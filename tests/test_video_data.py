"""Video data: frame sampling and decoding, the synthetic benchmark, benchmark readers, prompts, scoring."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from namm_transfer.evals.video_qa.benchmarks import (
    ANSWER_DIRECTLY,
    QASample,
    accuracy,
    build_longvideobench_prompt,
    build_mlvu_prompt,
    build_prompt,
    build_videomme_prompt,
    load_longvideobench,
    load_mlvu,
    load_videomme,
    mlvu_m_avg,
    parse_answer,
    score_response,
)
from namm_transfer.evals.video_qa.synthetic import CATEGORIES, COLOURS, SHAPES, generate_benchmark, write_mp4
from namm_transfer.evals.video_qa.video_io import VideoError, available_backends, read_frames, sample_indices

av = pytest.importorskip("av")
HAS_DECORD = "decord" in available_backends()
needs_decord = pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")

N_FRAMES = 40


def _pattern_frames(n: int = N_FRAMES, size: int = 32) -> np.ndarray:
    """Frames that are easy to tell apart: brightness and a bar position encode the frame index."""
    frames = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        frames[i] = 20 + (200 * i) // n
        col = (i * 3) % (size - 4)
        frames[i, :, col : col + 4, 0] = 255
        frames[i, :, col : col + 4, 1:] = 0
    return frames


@pytest.fixture(scope="module")
def pattern_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("vid") / "pattern.mp4"
    frames = _pattern_frames()
    write_mp4(path, frames, fps=10)
    return path, frames


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("synth")
    path = generate_benchmark(out, 20, frames_per_video=64, split="test", seed=7)
    return path, json.loads(path.read_text())


# ------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((10, 5), {}, [1, 3, 5, 7, 9]),
        ((64, 4), {}, [8, 24, 40, 56]),
        ((10, 3), {}, [1, 5, 8]),
        ((7, 1), {}, [3]),
        ((5, 8), {}, [0, 0, 1, 2, 2, 3, 4, 4]),
        ((10, 4), {"mode": "linspace"}, [0, 3, 6, 9]),
        ((10, 1), {"mode": "linspace"}, [0]),
        ((5,), {}, [0, 1, 2, 3, 4]),
        ((20,), {"fps": 1.0, "native_fps": 4.0}, [0, 4, 8, 12, 16]),
        ((100,), {"fps": 2.0, "native_fps": 30.0}, [0, 15, 30, 45, 60, 75, 90]),
        ((10,), {"fps": 4.0, "native_fps": 30.0}, [0, 7]),
        ((6,), {"fps": 25.0, "native_fps": 10.0}, [0, 1, 2, 3, 4, 5]),
        ((64,), {"num_frames": 4, "fps": 2.0, "native_fps": 4.0}, [8, 24, 40, 56]),
        ((16,), {"num_frames": 10, "fps": 1.0, "native_fps": 4.0}, [0, 4, 8, 12]),
    ],
)
def test_sample_indices_exact(args: tuple, kwargs: dict, expected: list[int]) -> None:
    assert sample_indices(*args, **kwargs) == expected


def test_sample_indices_rules() -> None:
    for total in (1, 2, 7, 27, 31, 64, 1001):  # 27/47 and 31/23: numpy's rounding differs from the exact rule
        for n in (1, 2, 3, 8, 23, 32, 47, 100):
            centre = sample_indices(total, n)
            assert len(centre) == n and centre == sorted(centre) and 0 <= centre[0] and centre[-1] < total
            assert centre == [int(np.floor((i + 0.5) * total / n)) for i in range(n)]
            lin = sample_indices(total, n, mode="linspace")
            assert lin == np.linspace(0, total - 1, n).astype(int).tolist()
    assert sample_indices(31, 23, mode="linspace")[11] == 14  # the reference loaders' frame (15 in exact arithmetic)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((10, 0), {}, "num_frames must be >= 1"),
        ((10, -3), {}, "num_frames must be >= 1"),
        ((0, 4), {}, "0 frames"),
        ((10,), {"fps": 0.0, "native_fps": 4.0}, "fps must be a positive"),
        ((10,), {"fps": 1.0}, "native_fps"),
        ((10, 2), {"mode": "random"}, "mode"),
    ],
)
def test_sample_indices_errors(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(VideoError, match=match):
        sample_indices(*args, **kwargs)


# ------------------------------------------------------------------------------------------ reading


def _frame_ids(frames: np.ndarray, reference: np.ndarray) -> list[int]:
    """Which reference frame each decoded frame is closest to."""
    d = np.abs(frames[:, None].astype(np.int16) - reference[None].astype(np.int16)).mean(axis=(2, 3, 4))
    return d.argmin(axis=1).tolist()


@pytest.mark.parametrize("backend", ["av", pytest.param("decord", marks=needs_decord), "auto"])
def test_read_frames_returns_requested_frames(pattern_video: tuple[Path, np.ndarray], backend: str) -> None:
    path, reference = pattern_video
    frames, indices, meta = read_frames(path, num_frames=8, backend=backend)
    assert indices == sample_indices(N_FRAMES, 8) == [2, 7, 12, 17, 22, 27, 32, 37]
    assert frames.dtype == np.uint8 and frames.shape == (8, 32, 32, 3)
    assert _frame_ids(frames, reference) == indices
    assert meta["total_frames"] == N_FRAMES and meta["native_fps"] == pytest.approx(10.0)
    assert meta["duration"] == pytest.approx(4.0) and (meta["height"], meta["width"]) == (32, 32)
    assert meta["backend"] == ("decord" if backend == "auto" and HAS_DECORD else backend.replace("auto", "av"))


@needs_decord
@pytest.mark.parametrize("kwargs", [{"num_frames": 8}, {"num_frames": 50}, {"fps": 3.0}, {}])
def test_decord_and_pyav_agree(pattern_video: tuple[Path, np.ndarray], kwargs: dict) -> None:
    path, reference = pattern_video
    f_dec, i_dec, m_dec = read_frames(path, backend="decord", **kwargs)
    f_av, i_av, m_av = read_frames(path, backend="av", **kwargs)
    assert i_dec == i_av
    assert {k: m_dec[k] for k in ("total_frames", "native_fps", "duration")} == {
        k: m_av[k] for k in ("total_frames", "native_fps", "duration")
    }
    assert f_dec.shape == f_av.shape
    diff = np.abs(f_dec.astype(np.int16) - f_av.astype(np.int16))
    assert diff.mean() < 1.0 and diff.max() <= 8
    assert _frame_ids(f_dec, reference) == i_dec


def test_missing_file(tmp_path: Path) -> None:
    for backend in ("auto", "av"):
        with pytest.raises(VideoError, match="not found.*nope.mp4"):
            read_frames(tmp_path / "nope.mp4", num_frames=4, backend=backend)


@pytest.mark.parametrize("backend", ["auto", "av", pytest.param("decord", marks=needs_decord)])
def test_corrupt_files(tmp_path: Path, pattern_video: tuple[Path, np.ndarray], backend: str) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    data = pattern_video[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for path in (garbage, truncated):
        with pytest.raises(VideoError, match=rf"cannot decode video .*{path.name}.*corrupt"):
            read_frames(path, num_frames=4, backend=backend)


def test_empty_videos(tmp_path: Path) -> None:
    zero = tmp_path / "zero.mp4"
    zero.write_bytes(b"")
    with pytest.raises(VideoError, match="empty \\(0 bytes\\)"):
        read_frames(zero, num_frames=4)
    # A container with a video stream but no frames.
    no_frames = tmp_path / "no_frames.avi"
    with av.open(str(no_frames), "w") as container:
        stream = container.add_stream("mjpeg", rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuvj420p"
        container.start_encoding()
        for packet in stream.encode():
            container.mux(packet)
    for backend in ("auto", "av"):
        with pytest.raises(VideoError, match="no_frames.avi contains no frames"):
            read_frames(no_frames, num_frames=4, backend=backend)


def test_read_frames_bad_arguments(pattern_video: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="num_frames must be >= 1"):
        read_frames(pattern_video[0], num_frames=0)
    with pytest.raises(VideoError, match="num_frames must be >= 1"):
        read_frames(tmp_path / "missing.mp4", num_frames=0)
    with pytest.raises(VideoError, match="backend must be"):
        read_frames(pattern_video[0], num_frames=2, backend="opencv")
    assert issubclass(VideoError, ValueError)


def test_package_import_is_light() -> None:
    code = (
        "import sys, namm_transfer.evals.video_qa as v; v.parse_answer; v.QASample; "
        "print(sorted(m for m in ('torch', 'numpy', 'av', 'decord') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_splits_differ(tmp_path: Path) -> None:
    a = generate_benchmark(tmp_path / "a", 5, frames_per_video=32, split="train", seed=3)
    b = generate_benchmark(tmp_path / "b", 5, frames_per_video=32, split="train", seed=3)
    c = generate_benchmark(tmp_path / "c", 5, frames_per_video=32, split="test", seed=3)
    assert a.read_bytes() == b.read_bytes()
    rec = json.loads(a.read_text())[1]
    fa, _, _ = read_frames(a.parent / "videos" / rec["video_path"], backend="av")
    fb, _, _ = read_frames(b.parent / "videos" / rec["video_path"], backend="av")
    assert np.array_equal(fa, fb)
    train, test = json.loads(a.read_text()), json.loads(c.read_text())
    strip = ("id", "video_path", "split")
    assert [{k: v for k, v in r.items() if k not in strip} for r in train] != [
        {k: v for k, v in r.items() if k not in strip} for r in test
    ]
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in test)


def test_synthetic_layout_and_balance(synth: tuple[Path, list[dict]]) -> None:
    path, records = synth
    assert len(records) == 20
    assert Counter(r["question_category"] for r in records) == {c: 4 for c in CATEGORIES}
    assert Counter(r["correct_choice"] for r in records) == {0: 5, 1: 5, 2: 5, 3: 5}
    for cat in CATEGORIES:
        assert sorted(r["correct_choice"] for r in records if r["question_category"] == cat) == [0, 1, 2, 3]
    lvb_keys = {
        "id",
        "video_path",
        "subtitle_path",
        "duration",
        "duration_group",
        "question_category",
        "question",
        "option0",
        "option1",
        "option2",
        "option3",
        "option4",
        "correct_choice",
        "starting_timestamp_for_subtitles",
    }
    for r in records:
        assert lvb_keys <= set(r)
        assert r["option4"] == "N/A" and r["subtitle_path"] is None
        assert r["duration"] == 16.0 and r["duration_group"] == 60
        options = [r[f"option{i}"] for i in range(4)]
        assert len(set(options)) == 4 and options[r["correct_choice"]] == r["answer_text"]
        assert (path.parent / "videos" / r["video_path"]).is_file()
        events = r["events"]
        frames = sorted(f for e in events for f in e["frames"])
        assert frames == r["event_frames"] and len(set(frames)) == len(frames)
        assert 0 not in frames and frames[-1] < r["num_frames"]
        starts = [e["start_frame"] for e in events]
        assert starts == sorted(starts)
        # Events never touch: a background frame separates consecutive events.
        for e1, e2 in zip(events, events[1:], strict=False):
            assert e2["start_frame"] > e1["end_frame"] + 1
        names = [f"{e['colour']} {e['shape']}" for e in events]
        cat = r["question_category"]
        if cat == "count":
            assert r["answer_text"] == str(len(events))
        elif cat == "first":
            assert r["answer_text"] == names[0] and len(set(names)) == len(names)
        elif cat == "last":
            assert r["answer_text"] == names[-1] and len(set(names)) == len(names)
        else:
            key = cat
            present = {e[key] for e in events}
            assert [o in present for o in options].count(True) == 1
            assert set(options) <= set(COLOURS if key == "colour" else SHAPES)


def test_synthetic_event_frames_stand_out(synth: tuple[Path, list[dict]]) -> None:
    path, records = synth
    ratios = []
    for r in records[:10]:
        frames, indices, meta = read_frames(path.parent / "videos" / r["video_path"])
        assert indices == list(range(64)) and meta["total_frames"] == 64 and meta["native_fps"] == pytest.approx(4)
        assert frames.shape == (64, 64, 64, 3)
        f = frames.astype(np.float32)
        events = set(r["event_frames"])
        background = [i for i in range(64) if i not in events]
        bg_diffs = [np.abs(f[i] - f[i - 1]).mean() for i in background[1:] if i - 1 not in events]
        for i in events:
            prev_bg = max(j for j in background if j < i)
            ev_diff = np.abs(f[i] - f[prev_bg]).mean()
            assert ev_diff > 8.0
            ratios.append(ev_diff / max(bg_diffs))
        assert max(bg_diffs) < 3.0  # background frames are near-duplicates
    assert min(ratios) > 4.0


def test_synthetic_loads_through_longvideobench_reader(synth: tuple[Path, list[dict]]) -> None:
    path, records = synth
    samples = load_longvideobench(path)
    assert len(samples) == len(records)
    for s, r in zip(samples, records, strict=True):
        assert s.id == r["id"] and s.video_path.is_file()
        assert s.video_path == path.parent / "videos" / r["video_path"]
        assert len(s.options) == 4 and s.answer_index == r["correct_choice"]
        assert s.options[s.answer_index] == r["answer_text"]
        assert s.category == r["question_category"] and s.duration_group == 60
        assert s.extra["event_frames"] == r["event_frames"] and s.extra["benchmark"] == "longvideobench"
    prompt = build_prompt(samples[0])
    assert prompt.startswith(records[0]["question"] + "\nA. ") and prompt.endswith(
        "\nD. " + records[0]["option3"] + "\n" + ANSWER_DIRECTLY
    )


def test_synthetic_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        generate_benchmark(tmp_path, 2, split="dev")
    with pytest.raises(ValueError, match="frames_per_video"):
        generate_benchmark(tmp_path, 2, frames_per_video=8)


# ------------------------------------------------------------------------------------------ prompts


def _sample(**kw: object) -> QASample:
    base = {
        "id": "q1",
        "video_path": "v.mp4",
        "question": "What is shown?",
        "options": ["a cat", "a dog", "a car", "a tree"],
    }
    base.update(kw)
    base.setdefault("answer_index", 1)
    return QASample(**base)  # type: ignore[arg-type]


def test_prompt_formats_exact() -> None:
    s = _sample()
    assert build_longvideobench_prompt(s) == (
        "What is shown?\nA. a cat\nB. a dog\nC. a car\nD. a tree\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert build_videomme_prompt(s) == build_longvideobench_prompt(s)
    assert build_mlvu_prompt(s) == (
        "What is shown?\n(A) a cat\n(B) a dog\n(C) a car\n(D) a tree\nOnly give the best option.\nBest option: ("
    )
    raw = _sample(extra={"question_with_options": "Why?\n(A) x\n(B) y", "benchmark": "mlvu"})
    assert build_prompt(raw) == "Why?\n(A) x\n(B) y\nOnly give the best option.\nBest option: ("
    assert build_prompt(s, "videomme", pre_prompt="P\n", post_prompt="The best answer is:").startswith("P\nWhat is")
    with pytest.raises(ValueError, match="unknown benchmark"):
        build_prompt(s, "nextqa")


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("B", 4, (1, False)),
        ("(C) because the dog runs", 4, (2, False)),
        ("The answer is D.", 4, (3, False)),
        ("none", 4, (None, True)),
        ("", 4, (None, True)),
        ("A", 4, (0, False)),
        ("B) a dog", 4, (1, False)),
        ("I think E, no wait, C", 4, (2, False)),
        ("B, not C", 4, (1, False)),  # the first valid letter, not the last
        ("(A) or (D)", 4, (0, False)),
        ("E", 5, (4, False)),
        ("Apple Banana", 4, (None, True)),
        ("answer: b", 4, (None, True)),
    ],
)
def test_parse_answer(text: str, n: int, expected: tuple) -> None:
    assert parse_answer(text, n) == expected


def test_parse_answer_random_fallback_is_seeded() -> None:
    picks = [parse_answer("no idea", 4, rng=np.random.default_rng(5)) for _ in range(3)]
    assert len(set(picks)) == 1 and picks[0][1] is True and 0 <= picks[0][0] < 4
    assert parse_answer("no idea", 4, rng=random.Random(1)) == parse_answer("no idea", 4, rng=random.Random(1))
    assert parse_answer("C", 4, rng=np.random.default_rng(5)) == (2, False)
    with pytest.raises(ValueError, match="n_options"):
        parse_answer("A", 0)


def test_accuracy_per_category() -> None:
    samples = [
        _sample(id="1", category="count", duration_group=60, answer_index=0),
        _sample(id="2", category="count", duration_group=60, answer_index=1),
        _sample(id="3", category="first", duration_group=600, answer_index=2),
        _sample(id="4", category="first", duration_group=600, answer_index=3),
        _sample(id="5", category="first", duration_group=60, answer_index=None),
    ]
    replies = ["A", "nothing", "C.", "(D)", "B"]
    records = [score_response(s, r) for s, r in zip(samples, replies, strict=True)]
    assert [r["correct"] for r in records] == [True, False, True, True, None]
    assert records[1]["used_fallback"] and records[1]["pred_index"] is None
    acc = accuracy(records, by=("category", "duration_group"))
    assert acc["accuracy"] == pytest.approx(0.75) and acc["n"] == 4 and acc["n_fallback"] == 1
    assert acc["by"]["category"] == {
        "count": {"accuracy": 0.5, "n": 2, "correct": 1},
        "first": {"accuracy": 1.0, "n": 2, "correct": 2},
    }
    assert acc["by"]["duration_group"]["60"]["accuracy"] == 0.5
    assert acc["by"]["duration_group"]["600"]["accuracy"] == 1.0
    assert mlvu_m_avg(records) == pytest.approx(0.75)
    uneven = [{"correct": True, "category": "AC"}] + [{"correct": False, "category": "NQA"}] * 3
    assert accuracy(uneven)["accuracy"] == pytest.approx(0.25)
    assert mlvu_m_avg(uneven) == pytest.approx(0.5)  # mean over task types, not over questions


# ------------------------------------------------------------------------------------------ readers


def test_mlvu_reader(tmp_path: Path) -> None:
    root = tmp_path / "MLVU"
    (root / "json").mkdir(parents=True)
    (root / "video" / "1_plotQA").mkdir(parents=True)
    (root / "video" / "1_plotQA" / "p1.mp4").write_bytes(b"x")
    # Original release layout: candidates list, answer as text.
    (root / "json" / "1_plotQA.json").write_text(
        json.dumps(
            [
                {
                    "video": "p1.mp4",
                    "duration": 300,
                    "question": "What does the hero hold?",
                    "candidates": ["A sword", "A cup", "A book", "A lamp"],
                    "answer": "A book",
                    "question_type": "plotQA",
                }
            ]
        )
    )
    # lmms-eval layout: options inside the question text, answer as a letter.
    (root / "json" / "2_needle.json").write_text(
        json.dumps(
            [
                {
                    "video_name": "n1.mp4",
                    "question": "What colour is the car?\n(A) red\n(B) blue\n(C) green\n(D) black",
                    "answer": "B",
                    "task_type": "needle",
                },
                {
                    "video_name": "n2.mp4",
                    "question": "How many birds?\n(A) 1\n(B) 2\n(C) 3",
                    "answer": "(C)",
                    "task_type": "NQA",
                },
            ]
        )
    )
    # Open-ended task: skipped, not an error.
    (root / "json" / "9_summary.json").write_text(
        json.dumps(
            [{"video": "s.mp4", "question": "Summarize the video.", "answer": "...", "question_type": "summary"}]
        )
    )
    samples = load_mlvu(root)
    assert [s.category for s in samples] == ["PQA", "NQA", "NQA"]
    plot, needle, birds = samples
    assert plot.options == ["A sword", "A cup", "A book", "A lamp"] and plot.answer_index == 2
    assert plot.video_path == root / "video" / "1_plotQA" / "p1.mp4"
    assert needle.question == "What colour is the car?" and needle.options == ["red", "blue", "green", "black"]
    assert needle.answer_index == 1 and birds.answer_index == 2 and len(birds.options) == 3
    assert needle.video_path == root / "video" / "2_needle" / "n1.mp4"
    assert build_prompt(needle) == (
        "What colour is the car?\n(A) red\n(B) blue\n(C) green\n(D) black\nOnly give the best option.\nBest option: ("
    )
    assert build_prompt(plot).startswith("What does the hero hold?\n(A) A sword\n")
    assert [s.id for s in load_mlvu(root / "json" / "2_needle.json")] == ["2_needle-0", "2_needle-1"]
    assert len(load_mlvu(root, task_types=["PQA"])) == 1
    records = [score_response(s, r) for s, r in zip(samples, ["(C) A book", "A", "C"], strict=True)]
    assert mlvu_m_avg(records) == pytest.approx((1.0 + 0.5) / 2)


def test_videomme_reader(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "abcXYZ.mp4").write_bytes(b"x")
    records = [
        {
            "video_id": "001",
            "duration": "short",
            "domain": "Knowledge",
            "sub_category": "Astronomy",
            "url": "https://example.invalid/abcXYZ",
            "videoID": "abcXYZ",
            "question_id": "001-1",
            "task_type": "Counting Problem",
            "question": "How many planets are shown?",
            "options": ["A. 3.", "B. 4.", "C. 5.", "D. 8."],
            "answer": "D",
        },
        {
            "video_id": "601",
            "duration": "long",
            "domain": "Film & Television",
            "sub_category": "Movie & TV Show",
            "videoID": "qqq",
            "question_id": "601-2",
            "task_type": "Temporal Reasoning",
            "question": "What happens first?",
            "options": ["A. A door opens.", "B. Rain.", "C. A call.", "D. Silence."],
            "answer": "A",
        },
    ]
    path = tmp_path / "videomme.json"
    path.write_text(json.dumps(records))
    samples = load_videomme(path)
    first, second = samples
    assert first.id == "001-1" and first.options == ["3.", "4.", "5.", "8."] and first.answer_index == 3
    assert second.options[0] == "A door opens."  # only the letter prefix is removed
    assert first.duration_group == "short" and first.category == "Counting Problem"
    assert first.extra["domain"] == "Knowledge" and first.video_path == tmp_path / "data" / "abcXYZ.mp4"
    assert second.video_path == tmp_path / "data" / "qqq.mp4"
    assert build_prompt(first) == (
        "How many planets are shown?\nA. 3.\nB. 4.\nC. 5.\nD. 8.\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert [s.id for s in load_videomme(path, durations=["long"])] == ["601-2"]
    jsonl = tmp_path / "videomme.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert [s.id for s in load_videomme(jsonl)] == ["001-1", "601-2"]
    scored = [score_response(s, r) for s, r in zip(samples, ["D", "B"], strict=True)]
    acc = accuracy(scored, by="duration_group")
    assert acc["by"]["duration_group"] == {
        "long": {"accuracy": 0.0, "n": 1, "correct": 0},
        "short": {"accuracy": 1.0, "n": 1, "correct": 1},
    }
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        parquet = tmp_path / "test.parquet"
        parquet.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            load_videomme(parquet)


def test_question_without_options_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'q9' has no options"):
        QASample(id="q9", video_path="v.mp4", question="Why?", options=[], answer_index=None)
    lvb = tmp_path / "lvb.json"
    lvb.write_text(
        json.dumps(
            [{"id": "lvb-7", "video_path": "x.mp4", "question": "Q?", **{f"option{i}": "N/A" for i in range(5)}}]
        )
    )
    with pytest.raises(ValueError, match="'lvb-7' has no options"):
        load_longvideobench(lvb)
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "4_count.json").write_text(
        json.dumps([{"video_name": "c.mp4", "question": "How many?", "answer": "A", "task_type": "count", "id": "c-1"}])
    )
    with pytest.raises(ValueError, match="'c-1' has no options"):
        load_mlvu(tmp_path)
    with pytest.raises(ValueError, match="answer index 4"):
        _sample(answer_index=4)
