"""A procedurally generated long-video QA benchmark in the LongVideoBench layout.

Why: no real video dataset is reachable offline, and a memory policy for video needs a task where
*which frames it keeps* decides the answer. Each video here is mostly a quiet background scene, with
a few short "events" (a saturated coloured shape) that carry every answer, like the needle moments
of a real long video.

Video (``frames_per_video`` frames, default 64, at ``fps`` frames/s, default 4, ``size`` x ``size``
pixels, default 64; H.264 in mp4, yuv420p, via PyAV):

- background: a muted, low-saturation scene (a base grey-ish colour plus a few low-frequency
  sinusoidal blobs) that drifts slowly (well under a pixel per frame), with small Gaussian pixel
  noise (std ``noise_std``, default 2) in every frame, so consecutive background frames are
  near-duplicates but never identical;
- events: 1 to 5 per video, each a filled shape (``SHAPES``: circle, square, triangle, cross, diamond,
  ring) in a saturated colour (``COLOURS``: red, green, blue, yellow, magenta, cyan), about a third to
  a half of the frame across, shown for ``event_span`` consecutive frames (default 2, so that sampling
  every other frame still sees every event) at one position. Events never touch: each lies inside its
  own 1/k-th of the video with at least one background frame before it, and frame 0 is always
  background.

Questions (4 options, chance 25%), one per video, categories cycled so each gets the same share:

- ``colour``: "Which of these colours did one of the shapes have?"; exactly one option occurs in the
  video (1-3 events, at most 3 distinct colours among them; the distractors never appear);
- ``shape``: the same for shapes;
- ``first`` / ``last``: "Which shape appeared first / last?" over 3-4 events whose colours and shapes
  are all distinct; the options are the events themselves ("red circle"), padded with combinations
  that never appear;
- ``count``: "How many shapes appeared?" with 1-5 events; options are numbers from 1 to 6.

The correct option's position is balanced: item ``i`` has its answer at position ``perm[i % 4]``
for a seeded permutation ``perm`` of A-D, which balances positions overall and (because categories
cycle with period 5) within each category as well, up to one item.

Output (``generate_benchmark``): ``<out_dir>/videos/<id>.mp4`` and ``<out_dir>/synthetic_<split>.json``,
a list of LongVideoBench validation records (id, video_path relative to ``videos/``, subtitle_path
null, duration, duration_group, question_category, question, option0..option4 with "N/A" for the
unused fifth, correct_choice, starting_timestamp_for_subtitles) plus ground-truth fields:
``event_frames`` (sorted frame indices that show an event), ``events`` (per event: frames, start and
end frame, times, shape, colour, centre, radius), ``num_frames``, ``fps``, ``frame_size``,
``answer_text``, ``split``, ``seed`` and ``generator``. The train and test splits derive their random
streams from ``(seed, split)``, so they differ for the same ``seed``; the same arguments always give
byte-identical json and identical decoded frames.

Version 3 (:func:`generate_benchmark_v3`, ``--v3``; ids ``synth3-<split>-NNNNN``, generator
``namm-synthetic-video-qa/3``) is a benchmark in which eviction matters: 32 frames of 32 px by default, all of
them meant to be read, at most a quarter showing an event (one frame each, a large centred saturated shape) and
the rest repeats of one static dark background; the same questions and categories; per question the frames that
bear the answer (``answer_frames``) and the item's seed (``item_seed``, disjoint between splits).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "CATEGORIES",
    "COLOURS",
    "GENERATOR_VERSION",
    "GENERATOR_VERSION_V3",
    "SHAPES",
    "SPLITS",
    "V3_DEFAULTS",
    "check_disjoint_seeds",
    "generate_benchmark",
    "generate_benchmark_v3",
    "make_video_item",
    "make_video_item_v3",
    "render_frames",
    "v3_answer_frames",
    "v3_item_seed",
    "v3_split_seeds",
    "write_mp4",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "namm-synthetic-video-qa/2"
"""Recorded in every item; bump it whenever the generated content changes."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 45),
    "blue": (40, 70, 235),
    "yellow": (240, 225, 30),
    "magenta": (225, 40, 225),
    "cyan": (30, 220, 225),
}
CATEGORIES: tuple[str, ...] = ("colour", "shape", "first", "last", "count")
SPLITS: dict[str, int] = {"train": 0, "test": 1, "val": 2}
"""Split name -> stream id mixed into the seed, so splits with the same seed differ."""

N_OPTIONS = 4
MAX_EVENTS = 5
LVB_OPTION_SLOTS = 5
LVB_DURATION_GROUPS = (15, 60, 600, 3600)

_QUESTION_PREFIX = "Coloured shapes briefly appear in this video, one at a time."
_QUESTIONS = {
    "colour": _QUESTION_PREFIX + " Which of these colours did one of the shapes have?",
    "shape": _QUESTION_PREFIX + " Which of these shapes appeared?",
    "first": _QUESTION_PREFIX + " Which one appeared first?",
    "last": _QUESTION_PREFIX + " Which one appeared last?",
    "count": _QUESTION_PREFIX + " How many shapes appeared in total?",
}


def _duration_group(duration: float) -> int:
    for g in LVB_DURATION_GROUPS:
        if duration <= g:
            return g
    return LVB_DURATION_GROUPS[-1]


def _rng(seed: int, split_code: int, *stream: int) -> np.random.Generator:
    import numpy as np

    return np.random.default_rng([int(seed), split_code, *stream])


# ------------------------------------------------------------------------------ events and question


def _sample_events(rng: np.random.Generator, category: str) -> list[dict[str, Any]]:
    """Shapes and colours of the events, in temporal order (positions and frames come later)."""
    n_c, n_s = len(COLOURS), len(SHAPES)
    colours = list(COLOURS)
    if category in ("colour", "shape"):
        k = int(rng.integers(1, 4))
        pool_size = min(k, 3)
        if category == "colour":
            pool = [colours[i] for i in rng.choice(n_c, size=pool_size, replace=False)]
            ev_colours = [pool[i] for i in rng.integers(0, pool_size, size=k)]
            ev_shapes = [SHAPES[i] for i in rng.integers(0, n_s, size=k)]
        else:
            pool = [SHAPES[i] for i in rng.choice(n_s, size=pool_size, replace=False)]
            ev_shapes = [pool[i] for i in rng.integers(0, pool_size, size=k)]
            ev_colours = [colours[i] for i in rng.integers(0, n_c, size=k)]
    elif category in ("first", "last"):
        k = int(rng.integers(3, 5))
        ev_colours = [colours[i] for i in rng.choice(n_c, size=k, replace=False)]
        ev_shapes = [SHAPES[i] for i in rng.choice(n_s, size=k, replace=False)]
    elif category == "count":
        k = int(rng.integers(1, MAX_EVENTS + 1))
        ev_colours = [colours[i] for i in rng.integers(0, n_c, size=k)]
        ev_shapes = [SHAPES[i] for i in rng.integers(0, n_s, size=k)]
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return [{"shape": s, "colour": c} for s, c in zip(ev_shapes, ev_colours, strict=True)]


def _answer_and_distractors(
    rng: np.random.Generator, category: str, events: list[dict[str, Any]]
) -> tuple[str, list[str]]:
    """The correct option text and exactly three distractor texts."""
    n = N_OPTIONS - 1
    if category in ("colour", "shape"):
        key = category
        universe = list(COLOURS) if key == "colour" else list(SHAPES)
        present = sorted({e[key] for e in events}, key=universe.index)
        answer = present[int(rng.integers(len(present)))]
        absent = [v for v in universe if v not in present]
        distractors = [absent[i] for i in rng.choice(len(absent), size=n, replace=False)]
        return answer, distractors
    if category in ("first", "last"):
        names = [f"{e['colour']} {e['shape']}" for e in events]
        answer = names[0] if category == "first" else names[-1]
        others = [nm for nm in names if nm != answer]
        combos = [f"{c} {s}" for c in COLOURS for s in SHAPES]
        absent = [nm for nm in combos if nm not in names]
        while len(others) < n:
            nm = absent.pop(int(rng.integers(len(absent))))
            others.append(nm)
        return answer, others[:n]
    # count
    k = len(events)
    candidates = [v for v in range(1, MAX_EVENTS + 2) if v != k]
    distractors = [str(candidates[i]) for i in rng.choice(len(candidates), size=n, replace=False)]
    return str(k), distractors


def _place_events(rng: np.random.Generator, events: list[dict[str, Any]], n_frames: int, span: int, size: int) -> None:
    """Give each event its frames, position and radius (in place)."""
    k = len(events)
    for j, ev in enumerate(events):
        seg_lo = (j * n_frames) // k
        seg_hi = ((j + 1) * n_frames) // k
        lo, hi = seg_lo + 1, seg_hi - span  # at least one background frame before each event
        start = int(rng.integers(lo, hi + 1))
        radius = float(rng.uniform(0.26, 0.36) * size)
        margin = radius + 1.0
        cx = float(rng.uniform(margin, size - 1 - margin))
        cy = float(rng.uniform(margin, size - 1 - margin))
        ev.update(
            {
                "start_frame": start,
                "end_frame": start + span - 1,
                "frames": list(range(start, start + span)),
                "centre": [round(cx, 3), round(cy, 3)],
                "radius": round(radius, 3),
            }
        )


# -------------------------------------------------------------------------------------- rendering


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, square_half: float = 0.85) -> np.ndarray:
    """Boolean ``(size, size)`` mask of ``shape`` centred at ``(cx, cy)`` with radius ``r`` (a square's half-width is
    ``square_half * r``: 0.85 in v2, 1.0 in v3, where the square must differ from the circle by more than a pixel
    of blur)."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        h = square_half * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.15 * r
    if shape == "cross":
        t = 0.33 * r
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    if shape == "triangle":
        # Apex up, base at the bottom: half-width grows linearly from 0 at the top to r at the base.
        frac = (dy + r) / (2.0 * r)
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_frames(
    rng: np.random.Generator,
    events: list[dict[str, Any]],
    n_frames: int,
    size: int,
    noise_std: float = 2.0,
) -> np.ndarray:
    """Render a video's frames: ``uint8`` array of shape ``(n_frames, size, size, 3)``.

    ``events`` must already be placed (``frames``, ``centre``, ``radius``, ``shape``, ``colour``).
    """
    import numpy as np

    base = rng.uniform(70, 130) + rng.uniform(-12, 12, size=3)  # muted, low saturation
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    n_waves = 3
    amps = rng.uniform(6, 14, size=(n_waves, 3))
    freqs = rng.uniform(0.5, 1.5, size=(n_waves, 2))
    angle = rng.uniform(0, 2 * np.pi, size=n_waves)
    phase0 = rng.uniform(0, 2 * np.pi, size=n_waves)
    drift = rng.uniform(0.05, 0.2)  # pixels per frame
    t = np.arange(n_frames, dtype=np.float32)[:, None, None]
    waves = np.empty((n_waves, n_frames, size, size), dtype=np.float32)
    for w in range(n_waves):
        proj = xx * np.cos(angle[w]) * freqs[w, 0] + yy * np.sin(angle[w]) * freqs[w, 1]
        np.sin(2 * np.pi * (proj[None] + t * drift / size) + phase0[w], out=waves[w])
    # (waves, T, H, W) x (waves, 3) -> (T, H, W, 3), plus the base colour and the pixel noise.
    frames = np.einsum("wthx,wc->thxc", waves, amps.astype(np.float32))
    frames += base.astype(np.float32)
    frames += rng.standard_normal(size=frames.shape, dtype=np.float32) * np.float32(noise_std)
    for ev in events:
        mask = _shape_mask(ev["shape"], size, ev["centre"][0], ev["centre"][1], ev["radius"])
        colour = np.asarray(COLOURS[ev["colour"]], dtype=np.float32)
        for f in ev["frames"]:
            frames[f][mask] = colour + rng.normal(0.0, noise_std, size=(int(mask.sum()), 3))
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def write_mp4(path: str | os.PathLike[str], frames: np.ndarray, fps: int = 4, crf: int = 18) -> Path:
    """Encode ``frames`` (``uint8``, ``(N, H, W, 3)`` RGB, even H and W) as H.264/yuv420p mp4 with PyAV.

    Single-threaded x264 with fixed settings and no macroblock tree (which made repeated encodings of the same
    frames differ now and then), so the output is reproducible.
    """
    import av

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n, h, w, c = frames.shape
    if c != 3 or h % 2 or w % 2:
        raise ValueError(f"frames must be (N, H, W, 3) with even H and W for yuv420p, got {frames.shape}")
    with av.open(str(p), mode="w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = max(1, 8 * int(fps))
        # x264's macroblock tree gave different bytes for the same frames now and then (one encoder thread, a busy
        # machine: 9 of 40 encodings differed, up to 12 grey levels after decoding); without it 0 of 40 did
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        for arr in frames:
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return p


# ------------------------------------------------------------------------------------------ items


def make_video_item(
    index: int,
    category: str,
    answer_pos: int,
    *,
    seed: int,
    split: str,
    frames_per_video: int,
    size: int,
    fps: int,
    event_span: int,
    noise_std: float,
) -> tuple[dict[str, Any], np.ndarray]:
    """Build one benchmark record and its frames (``uint8`` ``(frames_per_video, size, size, 3)``)."""
    rng = _rng(seed, SPLITS[split], index)
    events = _sample_events(rng, category)
    answer, distractors = _answer_and_distractors(rng, category, events)
    options = list(distractors)
    rng.shuffle(options)
    options.insert(answer_pos, answer)
    _place_events(rng, events, frames_per_video, event_span, size)
    frames = render_frames(rng, events, frames_per_video, size, noise_std=noise_std)

    item_id = f"synth-{split}-{index:05d}"
    record = _record(item_id, category, options, answer_pos, answer, events, frames_per_video, fps, size, split, seed)
    record["generator"] = GENERATOR_VERSION
    return record, frames


def _record(
    item_id: str,
    category: str,
    options: list[str],
    answer_pos: int,
    answer: str,
    events: list[dict[str, Any]],
    frames_per_video: int,
    fps: int,
    size: int,
    split: str,
    seed: int,
    answer_frames: list[int] | None = None,
) -> dict[str, Any]:
    """The LongVideoBench-layout record of one item (both generator versions; ``answer_frames`` for v3). The caller
    adds ``item_seed`` (v3) and ``generator`` last, which keeps the keys in the order earlier files have."""
    duration = frames_per_video / fps
    record: dict[str, Any] = {
        "id": item_id,
        "video_path": f"{item_id}.mp4",
        "subtitle_path": None,
        "duration": duration,
        "duration_group": _duration_group(duration),
        "question_category": category,
        "question": _QUESTIONS[category],
    }
    for i in range(LVB_OPTION_SLOTS):
        record[f"option{i}"] = options[i] if i < len(options) else "N/A"
    record.update({"correct_choice": answer_pos, "starting_timestamp_for_subtitles": 0, "answer_text": answer})
    if answer_frames is not None:
        record["answer_frames"] = answer_frames
    keys = ("shape", "colour", "start_frame", "end_frame", "frames")
    record.update(
        {
            "event_frames": sorted(f for ev in events for f in ev["frames"]),
            "events": [
                {
                    **{k: ev[k] for k in keys},
                    "start_time": round(ev["start_frame"] / fps, 6),
                    "end_time": round((ev["end_frame"] + 1) / fps, 6),
                    "centre": ev["centre"],
                    "radius": ev["radius"],
                }
                for ev in events
            ],
            "num_frames": frames_per_video,
            "fps": fps,
            "frame_size": [size, size],
            "split": split,
            "seed": seed,
        }
    )
    return record


def _write_items(write: Callable[[Any], dict[str, Any]], jobs: list[Any], workers: int) -> list[dict[str, Any]]:
    """Run ``write`` on every job, in ``workers`` spawned processes when there are several jobs and workers (the
    records come back in the jobs' order)."""
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as pool:
            return list(pool.map(write, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    return [write(job) for job in jobs]


def _write_item(job: tuple[int, str, int, dict[str, Any], str]) -> dict[str, Any]:
    """Make one item and write its mp4 (a process-pool job of :func:`generate_benchmark`); returns the record."""
    index, category, answer_pos, common, video_dir = job
    record, frames = make_video_item(index, category, answer_pos, **common)
    write_mp4(Path(video_dir) / record["video_path"], frames, fps=int(common["fps"]))
    return record


def generate_benchmark(
    out_dir: str | os.PathLike[str],
    n_videos: int,
    frames_per_video: int = 64,
    split: str = "train",
    seed: int = 0,
    size: int = 64,
    fps: int = 4,
    *,
    event_span: int = 2,
    noise_std: float = 2.0,
    categories: tuple[str, ...] = CATEGORIES,
    workers: int = 1,
) -> Path:
    """Write ``n_videos`` videos and their LongVideoBench-style json; return the json's path.

    Args:
        out_dir: destination; videos go to ``out_dir/videos/``, the json to
            ``out_dir/synthetic_<split>.json``.
        n_videos: number of videos (one question each).
        frames_per_video: frames per video (>= ``MAX_EVENTS * (event_span + 1) + 1``).
        split: ``"train"``, ``"test"`` or ``"val"``; mixed into the seed.
        seed: base seed; same arguments give identical output.
        size: frame height and width in pixels (even, >= 32).
        fps: frame rate written into the mp4.
        event_span: consecutive frames each event is shown for.
        noise_std: std of the per-pixel Gaussian noise.
        categories: question categories to cycle through (a subset of :data:`CATEGORIES`).
        workers: processes that render and encode videos (the output does not depend on it).
    """
    import time

    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if n_videos < 1:
        raise ValueError(f"n_videos must be >= 1, got {n_videos}")
    if event_span < 1:
        raise ValueError(f"event_span must be >= 1, got {event_span}")
    min_frames = MAX_EVENTS * (event_span + 1) + 1
    if frames_per_video < min_frames:
        raise ValueError(
            f"frames_per_video must be >= {min_frames} for event_span={event_span}, got {frames_per_video}"
        )
    if size < 32 or size % 2:
        raise ValueError(f"size must be even and >= 32, got {size}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    bad = [c for c in categories if c not in CATEGORIES]
    if bad or not categories:
        raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {categories}")

    out = Path(out_dir)
    video_dir = out / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    perm = [int(v) for v in _rng(seed, SPLITS[split], 2**31).permutation(N_OPTIONS)]
    t0 = time.perf_counter()
    common = dict(
        seed=seed,
        split=split,
        frames_per_video=frames_per_video,
        size=size,
        fps=fps,
        event_span=event_span,
        noise_std=noise_std,
    )
    jobs = [(i, categories[i % len(categories)], perm[i % N_OPTIONS], common, str(video_dir)) for i in range(n_videos)]
    records = _write_items(_write_item, jobs, workers)
    json_path = out / f"synthetic_{split}.json"
    json_path.write_text(json.dumps(records, indent=1) + "\n")
    logger.info(
        "wrote %d synthetic videos (%d frames, %dx%d, %d fps) and %s in %.2f s",
        n_videos,
        frames_per_video,
        size,
        size,
        fps,
        json_path,
        time.perf_counter() - t0,
    )
    return json_path


# ================================================================================================== v3
# Version 3: a benchmark in which eviction matters (issue 23). Beside version 2 above, which stays as it is.

GENERATOR_VERSION_V3 = "namm-synthetic-video-qa/3"
"""Recorded in every v3 item; bump it whenever the v3 content changes."""

V3_DEFAULTS: dict[str, Any] = {"frames_per_video": 32, "size": 32, "fps": 4, "noise_std": 2.0}
"""Defaults of :func:`generate_benchmark_v3`: 32 frames of 32 px, every frame read by the model."""
V3_MAX_ANSWER_SHARE = 0.25
"""At most this share of a v3 video's frames show an event (the rest are repeats of one static background)."""
V3_RADIUS = 0.42
"""Event shapes are centred, with this radius as a share of the frame size (large, for a small ViT)."""
V3_SQUARE_HALF = 1.0
"""A v3 square's half-width as a share of the radius (it fills the circle's bounding box)."""
_V3_SPLIT_STRIDE = 10**6
"""Item seeds: ``seed * 10 * stride + split code * stride + index``; splits never share one (index < stride)."""


def v3_item_seed(seed: int, split: str, index: int) -> int:
    """The integer seed of item ``index`` of a v3 split: distinct for every (seed, split, index) with
    ``0 <= index < 10**6`` and ``seed >= 0``, so a split's seeds are disjoint from any other split's."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if not 0 <= index < _V3_SPLIT_STRIDE or seed < 0:
        raise ValueError(f"v3 needs 0 <= index < {_V3_SPLIT_STRIDE} and seed >= 0, got index {index}, seed {seed}")
    return (int(seed) * 10 + SPLITS[split]) * _V3_SPLIT_STRIDE + int(index)


def v3_split_seeds(split: str, n_videos: int, seed: int = 0) -> list[int]:
    """The item seeds of the first ``n_videos`` items of a v3 split (without generating them)."""
    return [v3_item_seed(seed, split, i) for i in range(n_videos)]


def check_disjoint_seeds(a: list[int] | set[int], b: list[int] | set[int], what: str = "train and held-out") -> None:
    """``ValueError`` when two v3 splits share an item seed (a held-out question also seen in training)."""
    shared = sorted(set(a) & set(b))
    if shared:
        raise ValueError(f"the {what} splits share {len(shared)} item seeds (first {shared[:3]}): use other seeds")


def v3_answer_frames(category: str, events: list[dict[str, Any]], answer: str) -> list[int]:
    """The frames that bear the answer: for ``colour`` / ``shape`` those of the events with the answer's colour /
    shape (the other options never appear); for ``first``, ``last`` and ``count`` every event's frames (the order
    or the number needs them all)."""
    if category in ("colour", "shape"):
        return sorted(f for ev in events if ev[category] == answer for f in ev["frames"])
    return sorted(f for ev in events for f in ev["frames"])


def render_frames_v3(
    rng: np.random.Generator, events: list[dict[str, Any]], n_frames: int, size: int, noise_std: float = 2.0
) -> np.ndarray:
    """A v3 video's frames, ``uint8`` ``(n_frames, size, size, 3)``: one static dark grey background (the same in
    every frame up to pixel noise of std ``noise_std``) and each event a saturated shape in its frames."""
    import numpy as np

    base = float(rng.uniform(35, 60))
    frames = np.full((n_frames, size, size, 3), base, dtype=np.float32)
    frames += rng.standard_normal(size=frames.shape, dtype=np.float32) * np.float32(noise_std)
    for ev in events:
        mask = _shape_mask(ev["shape"], size, ev["centre"][0], ev["centre"][1], ev["radius"], V3_SQUARE_HALF)
        colour = np.asarray(COLOURS[ev["colour"]], dtype=np.float32)
        for f in ev["frames"]:
            frames[f][mask] = colour + rng.normal(0.0, noise_std, size=(int(mask.sum()), 3))
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def make_video_item_v3(
    index: int,
    category: str,
    answer_pos: int,
    *,
    seed: int,
    split: str,
    frames_per_video: int,
    size: int,
    fps: int,
    noise_std: float,
) -> tuple[dict[str, Any], np.ndarray]:
    """One v3 record and its frames (``uint8`` ``(frames_per_video, size, size, 3)``).

    Events (1 frame each, centred, radius :data:`V3_RADIUS` of the frame) lie one per 1/k-th of the video with a
    background frame before each; the record adds ``answer_frames`` (:func:`v3_answer_frames`) and ``item_seed``.
    """
    import numpy as np

    item_seed = v3_item_seed(seed, split, index)
    rng = np.random.default_rng([item_seed, 3])
    events = _sample_events(rng, category)
    answer, distractors = _answer_and_distractors(rng, category, events)
    options = list(distractors)
    rng.shuffle(options)
    options.insert(answer_pos, answer)
    _place_events(rng, events, frames_per_video, 1, size)
    centre = (size - 1) / 2.0
    for ev in events:
        ev["centre"], ev["radius"] = [centre, centre], round(V3_RADIUS * size, 3)
    frames = render_frames_v3(rng, events, frames_per_video, size, noise_std=noise_std)

    item_id = f"synth3-{split}-{index:05d}"
    record = _record(
        item_id,
        category,
        options,
        answer_pos,
        answer,
        events,
        frames_per_video,
        fps,
        size,
        split,
        seed,
        answer_frames=v3_answer_frames(category, events, answer),
    )
    record["item_seed"] = item_seed
    record["generator"] = GENERATOR_VERSION_V3
    event_frames = record["event_frames"]
    if len(event_frames) > V3_MAX_ANSWER_SHARE * frames_per_video:  # pragma: no cover - guarded by the caller
        raise AssertionError(f"{item_id}: {len(event_frames)} event frames of {frames_per_video}")
    return record, frames


def _write_item_v3(job: tuple[int, str, int, dict[str, Any], str]) -> dict[str, Any]:
    index, category, answer_pos, common, video_dir = job
    record, frames = make_video_item_v3(index, category, answer_pos, **common)
    write_mp4(Path(video_dir) / record["video_path"], frames, fps=int(common["fps"]))
    return record


def generate_benchmark_v3(
    out_dir: str | os.PathLike[str],
    n_videos: int,
    split: str = "train",
    seed: int = 0,
    *,
    frames_per_video: int = V3_DEFAULTS["frames_per_video"],
    size: int = V3_DEFAULTS["size"],
    fps: int = V3_DEFAULTS["fps"],
    noise_std: float = V3_DEFAULTS["noise_std"],
    categories: tuple[str, ...] = CATEGORIES,
    workers: int = 1,
) -> Path:
    """Write ``n_videos`` v3 videos and ``out_dir/synthetic_<split>.json`` (LongVideoBench layout); return the json.

    v3 differs from version 2 where eviction must matter: at least 32 frames, every frame meant to be read (no
    subsampling), at most a quarter of them (:data:`V3_MAX_ANSWER_SHARE`) showing an event and the rest repeats of
    one static background; large centred shapes, so seeing them is easy and keeping them is the task. Questions,
    categories and the balanced answer positions are version 2's; the question follows the video in the prompt (the
    model's chat format). Each record adds ``answer_frames`` and ``item_seed`` (:func:`v3_item_seed`: the splits'
    seeds are disjoint, :func:`check_disjoint_seeds`).
    """
    import time

    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if not 1 <= n_videos <= _V3_SPLIT_STRIDE:
        raise ValueError(f"n_videos must be in [1, {_V3_SPLIT_STRIDE}], got {n_videos}")
    if frames_per_video < 32:
        raise ValueError(f"v3 videos have at least 32 frames, got frames_per_video={frames_per_video}")
    if size < 32 or size % 2:
        raise ValueError(f"size must be even and >= 32, got {size}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    bad = [c for c in categories if c not in CATEGORIES]
    if bad or not categories:
        raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {categories}")
    out = Path(out_dir)
    video_dir = out / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    perm = [int(v) for v in _rng(seed, SPLITS[split], 2**31 + 3).permutation(N_OPTIONS)]
    common = dict(seed=seed, split=split, frames_per_video=frames_per_video, size=size, fps=fps, noise_std=noise_std)
    jobs = [(i, categories[i % len(categories)], perm[i % N_OPTIONS], common, str(video_dir)) for i in range(n_videos)]
    t0 = time.perf_counter()
    records = _write_items(_write_item_v3, jobs, workers)
    json_path = out / f"synthetic_{split}.json"
    json_path.write_text(json.dumps(records, indent=1) + "\n")
    logger.info(
        "wrote %d v3 videos (%d frames, %d px) and %s in %.2f s",
        n_videos,
        frames_per_video,
        size,
        json_path,
        time.perf_counter() - t0,
    )
    return json_path


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m namm_transfer.evals.video_qa.synthetic OUT_DIR --n-videos 20 --split test``."""
    from namm_transfer.evals.args import StrictParser

    parser = StrictParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--n-videos", type=int, default=20)
    parser.add_argument("--frames-per-video", type=int, default=None, help="default: 64 (v2), 32 (v3)")
    parser.add_argument("--split", default="train", choices=sorted(SPLITS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=None, help="frame size in pixels; default: 64 (v2), 32 (v3)")
    parser.add_argument("--fps", type=int, default=4)
    parser.add_argument("--v3", action="store_true", help="benchmark v3 (eviction matters; answer_frames recorded)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.v3:
        path = generate_benchmark_v3(
            args.out_dir,
            args.n_videos,
            args.split,
            args.seed,
            frames_per_video=args.frames_per_video or V3_DEFAULTS["frames_per_video"],
            size=args.size or V3_DEFAULTS["size"],
            fps=args.fps,
        )
    else:
        path = generate_benchmark(
            args.out_dir, args.n_videos, args.frames_per_video or 64, args.split, args.seed, args.size or 64, args.fps
        )
    print(path)


if __name__ == "__main__":  # pragma: no cover
    main()
