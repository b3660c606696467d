"""Reading frames out of video files: decord first, PyAV as the fallback.

:func:`read_frames` returns ``(frames, indices, meta)``:

- ``frames``: ``uint8`` array of shape ``(N, H, W, 3)`` (RGB), one row per entry of ``indices``;
- ``indices``: the frame indices that were read (``list[int]``, length ``N``, non-decreasing; the
  same index may appear twice when more frames are asked for than the video has);
- ``meta``: ``{"total_frames", "native_fps", "duration", "backend", "height", "width"}``.

Which frames are read is decided by :func:`sample_indices` from the frame count and frame rate the
container reports, so both backends read the same indices for the same file.

Sampling rules (also in :func:`sample_indices`):

- ``num_frames=N`` (default ``mode="center"``): the video's ``T`` frames are cut into ``N`` equal
  segments and the frame at each segment's centre is taken: ``index_i = floor((i + 0.5) * T / N)``
  for ``i = 0 .. N-1`` (computed in integers as ``((2 i + 1) T) // (2 N)``). This is the "middle
  frame of each segment" rule of TSN-style and InternVL-style video evaluation. ``mode="linspace"``
  gives ``np.linspace(0, T - 1, N).astype(int)`` instead, the rule of the lmms-eval / LLaVA-NeXT
  video loaders (it always includes the first and the last frame).
- ``fps=f``: one frame every ``native_fps / f`` frames: ``index_k = floor(k * native_fps / f)`` for
  every ``k`` with ``index_k < T``; when ``f >= native_fps`` every frame is taken. When
  ``num_frames`` is given as well it is a cap: more than ``num_frames`` fps-sampled frames fall
  back to ``num_frames`` uniform ones (the LLaVA-OneVision / LLaVA-Video rule).
- neither: every frame.

Backends: decord seeks to the key frame before each requested frame; PyAV decodes sequentially from
the start up to the last requested frame (exact, but slow near the end of long videos). On the
generated test videos both return the same indices and the same pixels (frame-exact).

Every failure is a :class:`VideoError` (a ``ValueError``) whose message names the file and the cause:
a missing file, a file that no backend can decode, a video without frames, or bad arguments.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["BACKENDS", "VideoError", "available_backends", "read_frames", "sample_indices", "video_info"]

logger = logging.getLogger(__name__)

BACKENDS = ("decord", "av")
"""Backends in the order ``backend="auto"`` tries them."""


class VideoError(ValueError):
    """A video cannot be read: missing, unreadable or corrupt, empty, or asked for with bad arguments."""


def available_backends() -> list[str]:
    """Return the backends whose Python package imports here, in :data:`BACKENDS` order."""
    found = []
    for name in BACKENDS:
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - a broken install counts as absent
            continue
        found.append(name)
    return found


def sample_indices(
    total: int,
    num_frames: int | None = None,
    fps: float | None = None,
    native_fps: float | None = None,
    mode: str = "center",
) -> list[int]:
    """Choose which frames of a ``total``-frame video to read.

    Args:
        total: number of frames in the video (>= 1).
        num_frames: number of uniformly spaced frames (>= 1); with ``fps``, an upper bound.
        fps: frames per second of video to sample (> 0); needs ``native_fps``.
        native_fps: the video's own frame rate (> 0).
        mode: ``"center"`` (segment centres, the default) or ``"linspace"`` (first to last frame
            inclusive); only used for uniform sampling.

    Returns:
        Frame indices, non-decreasing, each in ``[0, total)``. Uniform sampling always returns
        exactly ``num_frames`` indices, repeating frames when ``num_frames > total``. The rules are
        in the module docstring; for example ``sample_indices(10, 5) == [1, 3, 5, 7, 9]`` and
        ``sample_indices(64, 4) == [8, 24, 40, 56]``.

    Raises:
        VideoError: ``total < 1``, ``num_frames < 1``, ``fps <= 0``, ``fps`` without a positive
            ``native_fps``, or an unknown ``mode``.
    """
    if isinstance(total, bool) or not isinstance(total, int):
        raise VideoError(f"total must be an int, got {total!r}")
    if total < 1:
        raise VideoError(f"cannot sample frames from a video with {total} frames (it is empty)")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)):
        raise VideoError(f"num_frames must be an int, got {num_frames!r}")
    if num_frames is not None and num_frames < 1:
        raise VideoError(f"num_frames must be >= 1, got {num_frames}")
    if mode not in ("center", "linspace"):
        raise VideoError(f"mode must be 'center' or 'linspace', got {mode!r}")

    if fps is not None:
        if not fps > 0 or math.isinf(fps):
            raise VideoError(f"fps must be a positive finite number, got {fps!r}")
        if native_fps is None or not native_fps > 0 or math.isinf(native_fps):
            raise VideoError(f"fps sampling needs the video's native_fps (> 0), got {native_fps!r}")
        step = native_fps / fps
        if step <= 1.0:
            indices = list(range(total))
        else:
            count = math.ceil(total / step)
            # The tiny epsilon keeps exact multiples (k * 7.5 == 15.0) from flooring one frame low.
            indices = [int(math.floor(k * step + 1e-9)) for k in range(count)]
            indices = [i for i in indices if i < total]
        if num_frames is not None and len(indices) > num_frames:
            return _uniform(total, num_frames, mode)
        return indices
    if num_frames is None:
        return list(range(total))
    return _uniform(total, num_frames, mode)


def _uniform(total: int, n: int, mode: str) -> list[int]:
    if mode == "center":
        return [((2 * i + 1) * total) // (2 * n) for i in range(n)]
    import numpy as np

    # numpy's own float rounding, not the exact integer rule ((i (T-1)) // (N-1)): the reference loaders use
    # np.linspace, and the two differ for about 1% of (T, N) pairs (T=31, N=23: frame 14 here, 15 exactly)
    return [int(i) for i in np.linspace(0, total - 1, n).astype(int)]


def _check_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise VideoError(f"video file not found: {p}")
    if not p.is_file():
        raise VideoError(f"video path is not a file: {p}")
    if p.stat().st_size == 0:
        raise VideoError(f"video file is empty (0 bytes): {p}")
    return p


def _short(exc: BaseException) -> str:
    """First meaningful line of a backend's error, without decord's timestamp, source path and C++ stack."""
    text = str(exc).strip() or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("Stack trace")]
    line = lines[0] if lines else text
    line = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", line)
    return line[:300]


# ----------------------------------------------------------------------------------------- decord


def _decord_open(p: Path) -> tuple[Any, dict[str, Any]]:
    import decord

    try:
        vr = decord.VideoReader(str(p), ctx=decord.cpu(0))
    except Exception as exc:  # noqa: BLE001 - decord raises DECORDError / RuntimeError
        raise VideoError(f"cannot decode video {p} with decord (corrupt or unsupported file?): {_short(exc)}") from exc
    total = len(vr)
    if total < 1:
        raise VideoError(f"video {p} contains no frames")
    native_fps = float(vr.get_avg_fps())
    # Height and width are filled from the decoded frames (or by video_info): no decode here.
    meta = {"total_frames": total, "native_fps": native_fps, "height": 0, "width": 0}
    return vr, meta


def _decord_read(vr: Any, p: Path, indices: list[int]) -> np.ndarray:
    try:
        batch = vr.get_batch(indices)
    except Exception as exc:  # noqa: BLE001
        raise VideoError(f"cannot decode frames of {p} with decord (corrupt file?): {_short(exc)}") from exc
    arr = batch.asnumpy() if hasattr(batch, "asnumpy") else batch.numpy()
    return arr


# -------------------------------------------------------------------------------------------- PyAV


def _av_open(p: Path) -> tuple[Any, dict[str, Any]]:
    import av

    try:
        container = av.open(str(p))
    except Exception as exc:  # noqa: BLE001 - av.error.* (InvalidDataError, EOFError, ...)
        raise VideoError(f"cannot decode video {p} with PyAV (corrupt or unsupported file?): {_short(exc)}") from exc
    try:
        if not container.streams.video:
            raise VideoError(f"video {p} has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        native_fps = float(rate) if rate else 0.0
        total = int(stream.frames or 0)
        if total <= 0:
            # Containers without a frame count (some mkv/webm/avi): count the demuxed packets, then
            # reopen (seeking back is not supported by every demuxer).
            total = sum(1 for pkt in container.demux(stream) if pkt.size)
            container.close()
            container = av.open(str(p))
            stream = container.streams.video[0]
        if total < 1:
            raise VideoError(f"video {p} contains no frames")
        if native_fps <= 0 and stream.duration and stream.time_base:
            native_fps = total / float(stream.duration * stream.time_base)
        meta = {
            "total_frames": total,
            "native_fps": native_fps,
            "height": int(stream.height or 0),
            "width": int(stream.width or 0),
        }
    except VideoError:
        container.close()
        raise
    except Exception as exc:  # noqa: BLE001
        container.close()
        raise VideoError(f"cannot read the video stream of {p} with PyAV: {_short(exc)}") from exc
    return container, meta


def _av_read(container: Any, p: Path, indices: list[int]) -> np.ndarray:
    import numpy as np

    wanted = set(indices)
    last_wanted = max(indices)
    got: dict[int, np.ndarray] = {}
    n_decoded = 0
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    try:
        # Sequential decoding: exact frame positions without relying on seek accuracy.
        for i, frame in enumerate(container.decode(stream)):
            n_decoded = i + 1
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last_wanted:
                break
    except Exception as exc:  # noqa: BLE001
        if not got:
            raise VideoError(f"cannot decode frames of {p} with PyAV (corrupt file?): {_short(exc)}") from exc
        logger.warning("decoding %s stopped after %d frames: %s", p, n_decoded, _short(exc))
    finally:
        container.close()
    if not got:
        raise VideoError(f"video {p} contains no decodable frames")
    missing = sorted(wanted.difference(got))
    if missing:
        logger.warning(
            "%s: only %d frames decoded; %d requested indices (from %d on) repeat the last decoded frame",
            p,
            n_decoded,
            len(missing),
            missing[0],
        )
        fill = got[max(got)]
        for i in missing:
            got[i] = fill
    return np.stack([got[i] for i in indices])


# ----------------------------------------------------------------------------------------- public


def _resolve_backends(backend: str) -> list[str]:
    if backend == "auto":
        found = available_backends()
        if not found:
            raise VideoError("no video backend available: install decord or PyAV (pip install 'namm-transfer[video]')")
        return found
    if backend not in BACKENDS:
        raise VideoError(f"backend must be 'auto', 'decord' or 'av', got {backend!r}")
    try:
        __import__(backend)
    except Exception as exc:  # noqa: BLE001
        raise VideoError(f"backend {backend!r} is not importable here: {_short(exc)}") from exc
    return [backend]


def _open(p: Path, backend: str) -> tuple[str, Any, dict[str, Any]]:
    errors: list[str] = []
    for name in _resolve_backends(backend):
        try:
            handle, meta = _decord_open(p) if name == "decord" else _av_open(p)
        except VideoError as exc:
            errors.append(str(exc))
            logger.debug("backend %s failed on %s: %s", name, p, exc)
            continue
        return name, handle, meta
    if len(errors) == 1:
        raise VideoError(errors[0])
    # Prefer the last backend's diagnosis (PyAV's names the cause), and keep the others.
    raise VideoError(errors[-1] + " [other backends: " + "; ".join(errors[:-1]) + "]")


def video_info(path: str | os.PathLike[str], backend: str = "auto") -> dict[str, Any]:
    """Return ``{"total_frames", "native_fps", "duration", "backend", "height", "width"}`` without decoding frames."""
    p = _check_path(path)
    name, handle, meta = _open(p, backend)
    if name == "av":
        handle.close()
    else:
        try:
            meta["height"], meta["width"] = (int(v) for v in handle[0].shape[:2])
        except Exception as exc:  # noqa: BLE001
            raise VideoError(f"cannot decode the first frame of {p} with decord: {_short(exc)}") from exc
    return _finish_meta(meta, name)


def _finish_meta(meta: dict[str, Any], backend: str) -> dict[str, Any]:
    fps = meta["native_fps"]
    out = dict(meta)
    out["duration"] = meta["total_frames"] / fps if fps > 0 else float("nan")
    out["backend"] = backend
    return out


def read_frames(
    path: str | os.PathLike[str],
    num_frames: int | None = None,
    fps: float | None = None,
    backend: str = "auto",
    mode: str = "center",
) -> tuple[np.ndarray, list[int], dict[str, Any]]:
    """Decode sampled frames of a video.

    Args:
        path: the video file.
        num_frames: uniform sampling of this many frames (see :func:`sample_indices`).
        fps: sample this many frames per second of video instead (``num_frames`` then caps it).
        backend: ``"auto"`` (decord, then PyAV if decord is missing or fails on this file),
            ``"decord"`` or ``"av"``.
        mode: uniform sampling rule, ``"center"`` or ``"linspace"``.

    Returns:
        ``(frames, indices, meta)``: frames ``uint8`` of shape ``(N, H, W, 3)`` in RGB order, the
        ``N`` frame indices, and ``meta`` with ``total_frames``, ``native_fps``, ``duration``
        (seconds), ``backend``, ``height`` and ``width``.

    Raises:
        VideoError: missing, empty, corrupt or frameless file, or bad arguments.
    """
    if num_frames is not None and not isinstance(num_frames, bool) and isinstance(num_frames, int) and num_frames < 1:
        raise VideoError(f"num_frames must be >= 1, got {num_frames}")
    p = _check_path(path)
    name, handle, meta = _open(p, backend)
    try:
        indices = sample_indices(meta["total_frames"], num_frames, fps, meta["native_fps"], mode=mode)
    except VideoError:
        if name == "av":
            handle.close()
        raise
    if name == "decord":
        try:
            frames = _decord_read(handle, p, indices)
        except VideoError as exc:
            if backend != "auto" or "av" not in available_backends():
                raise
            logger.warning("decord failed on %s (%s); retrying with PyAV", p, exc)
            name, handle, meta = _open_av_only(p)
            frames = _av_read(handle, p, indices)
    else:
        frames = _av_read(handle, p, indices)
    meta["height"], meta["width"] = int(frames.shape[1]), int(frames.shape[2])
    logger.debug("read %d frames of %s with %s", len(indices), p, name)
    return frames, indices, _finish_meta(meta, name)


def _open_av_only(p: Path) -> tuple[str, Any, dict[str, Any]]:
    handle, meta = _av_open(p)
    return "av", handle, meta
