"""Reading and writing clips: H.264 `.mp4` (PyAV), `.gif` (Pillow), folders of PNG frames, and single images
(`.png`, 1-frame clips: the image half of joint image + video data).

Frames are always uint8 RGB arrays shaped (T, H, W, 3) at the boundary of this module. Writes go through
`motif_video.files` (a unique temporary name beside the destination, renamed into place when complete), so an
interrupted or failed write never leaves a half-written clip where a dataset scanner would pick it up.
"""

from __future__ import annotations

import functools
import json
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
from PIL import Image

from ..errors import MotifVideoError
from ..files import atomic_dir, atomic_file, check_writable_dir

__all__ = ["write_video", "check_output", "read_video", "probe_video", "to_uint8_frames", "VIDEO_EXTENSIONS",
           "IMAGE_EXTENSIONS", "MEDIA_EXTENSIONS"]

# Extensions read through PyAV; `.gif` is written with Pillow but read with PyAV like the rest.
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif")
# Still images, read with Pillow as 1-frame clips.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
# A PNG-frame folder records its frame rate here; folders without it are read at DEFAULT_FPS.
FOLDER_META = "video.json"
DEFAULT_FPS = 24.0


# ----------------------------------------------------------------------------------------------------------------
# Input normalisation
# ----------------------------------------------------------------------------------------------------------------


def to_uint8_frames(frames) -> np.ndarray:
    """(T, H, W, 3) uint8 from a uint8 array, a float array in [0, 1], or a torch tensor of either."""
    if hasattr(frames, "detach"):  # torch tensor, without importing torch for users who never need it
        frames = frames.detach().float().cpu().numpy() if frames.is_floating_point() else frames.detach().cpu().numpy()
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise MotifVideoError(f"frames must be shaped (T, H, W, 3), got {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise MotifVideoError(f"frames must be non-empty, got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise MotifVideoError("frames contain NaN or infinite values")
        return np.ascontiguousarray(np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8))
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        if arr.min() < 0 or arr.max() > 255:
            raise MotifVideoError(f"integer frames must lie in 0..255, got {arr.min()}..{arr.max()}")
        return arr.astype(np.uint8)
    raise MotifVideoError(f"unsupported frame dtype {arr.dtype}")


def _kind(path: Path, raw: str) -> str:
    """'mp4', 'gif', 'png' or 'folder' from the destination's spelling."""
    if raw.endswith(("/", os.sep)) or path.suffix == "":
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        return "mp4"
    if suffix == ".gif":
        return "gif"
    if suffix == ".png":
        return "png"
    raise MotifVideoError(
        f"cannot write {path.name}: use .mp4, .gif, .png (one frame), or a folder path (no extension) for PNG frames"
    )


def _rate(fps: float) -> Fraction:
    if not (isinstance(fps, (int, float, Fraction)) and fps > 0 and np.isfinite(float(fps))):
        raise MotifVideoError(f"fps must be a positive number, got {fps!r}")
    # NTSC rates such as 23.976 come back as 24000/1001 rather than a huge exact binary fraction.
    return Fraction(fps).limit_denominator(1001)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def write_video(frames, path, fps: float = 24, *, crf: int = 18, overwrite: bool = False) -> Path:
    """Write frames (T, H, W, 3) to `path` and return it.

    `.mp4`: H.264 (libx264, yuv420p, constant quality `crf`). yuv420p stores colour at half resolution, so an odd
    width or height is padded by one replicated row/column to the next even size (read back as the padded size).
    `.gif`: Pillow, looping; GIF stores delays in 1/100 s, so the rate is rounded to such a delay (24 fps -> 25).
    `.png`: a single frame (T must be 1).
    No extension or a trailing '/': a folder of `frame_00000.png`... plus `video.json` holding the fps. An existing
    folder is replaced only when `check_output` allows it (empty, or holding only a previous output of ours; with
    `overwrite`, any folder holding our `video.json`).
    The output appears complete or not at all (`motif_video.files`), with the mode the umask gives new files.
    """
    raw = os.fspath(path)
    path = Path(raw)
    kind = check_output(raw, overwrite=overwrite)
    rate = _rate(fps)
    arr = to_uint8_frames(frames)
    if kind == "png" and arr.shape[0] != 1:
        raise MotifVideoError(f"cannot write {arr.shape[0]} frames to {path.name}: a .png holds one frame")
    if kind == "folder":
        with atomic_dir(path) as tmp:
            for i, frame in enumerate(arr):
                Image.fromarray(frame).save(tmp / f"frame_{i:05d}.png")
            (tmp / FOLDER_META).write_text(json.dumps({"fps": float(rate), "frames": int(arr.shape[0])}) + "\n")
        return path
    writer = {"mp4": _write_mp4, "gif": _write_gif, "png": _write_png}[kind]
    with atomic_file(path) as tmp:
        try:
            writer(arr, tmp, rate, crf)
        except av.FFmpegError as e:
            if isinstance(e, OSError) and e.errno:
                raise
            raise MotifVideoError(f"cannot write {path}: {_reason(e)}") from e
    return path


_FRAME_FILE = re.compile(r"^frame_\d{5}\.png$")


def check_output(path, overwrite: bool = False) -> str:
    """Check that a clip can be written to `path` before any work is spent on it; returns its kind ('mp4', 'gif',
    'png' or 'folder'). An existing file is replaced (atomically). An existing folder is replaced only when it is
    empty or holds nothing but a previous frame-folder output (frame_NNNNN.png + video.json); with `overwrite`,
    when it holds our video.json. A folder this package did not write is never replaced."""
    raw = os.fspath(path)
    path = Path(raw)
    kind = _kind(path, raw)
    check_writable_dir(path.parent if str(path.parent) else Path("."), "video")
    if kind != "folder":
        if path.is_dir():
            raise MotifVideoError(f"cannot write {path}: a folder with that name exists")
        return kind
    if path.exists() and not path.is_dir():
        raise MotifVideoError(f"cannot write PNG frames to {path}: a file with that name exists")
    if path.is_dir():
        names = [e.name for e in os.scandir(path)]
        ours = FOLDER_META in names
        if names and not (ours and all(n == FOLDER_META or _FRAME_FILE.match(n) for n in names)):
            if not ours:
                raise MotifVideoError(f"{path} is a folder with other files in it ({len(names)} entries) that this "
                                      "program did not write; give a new or empty folder for PNG frames")
            if not overwrite:
                raise MotifVideoError(f"{path} holds a previous frame output and other files; pass --overwrite to "
                                      "replace the whole folder, or give a new folder")
    return kind


def _write_mp4(arr: np.ndarray, tmp: Path, rate: Fraction, crf: int) -> None:
    t, h, w, _ = arr.shape
    if h % 2 or w % 2:
        arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")  # (T, H', W', 3), both even
    container = av.open(os.fspath(tmp), mode="w", format="mp4")
    try:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = "yuv420p"
        # One encoder thread: x264's threaded encoder is not repeatable (measured: the same frames gave two different
        # files in ten writes), and the same seed must give the same file. Cost: 3.9 s against 3.2 s for a
        # 121-frame 1280x736 clip on 2 cores, small beside generating it.
        stream.options = {"crf": str(int(crf)), "threads": "1", **_x264_cpu_options()}
        for frame in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):  # drain the encoder's look-ahead buffer
            container.mux(packet)
    finally:
        container.close()


# Every CPU with x264's AVX-512 level also has these (AVX-512 F/BW/DQ/VL implies AVX2, FMA3, BMI2, LZCNT).
_X264_BELOW_AVX512 = "MMX2,SSE,SSE2,SSE3,SSSE3,SSE4.1,SSE4.2,AVX,FMA3,AVX2,LZCNT,BMI1,BMI2"


@functools.lru_cache(maxsize=1)
def _x264_cpu_options() -> dict:
    """x264 without its AVX-512 kernels where the CPU has them: with them the same frames gave different files
    within one process (measured: 4 files from 25 writes of one 32x32 clip; 1 from 25 without), and the same seed
    must give the same file. Same speed and size for a 121-frame 1280x736 clip. x264 takes a named CPU list as is,
    so the list is only named on a CPU known to have all of it."""
    import torch

    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return {}
    return {"x264-params": f"asm={_X264_BELOW_AVX512}"}


def _write_gif(arr: np.ndarray, tmp: Path, rate: Fraction, crf: int) -> None:
    del crf  # GIF is palette based, there is no quality knob
    images = [Image.fromarray(frame) for frame in arr]
    duration_ms = max(10, int(round(100.0 / float(rate))) * 10)  # GIF delays are whole 1/100 s
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


def _write_png(arr: np.ndarray, tmp: Path, rate: Fraction, crf: int) -> None:
    Image.fromarray(arr[0]).save(tmp, format="PNG")


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


class _Source:
    """Frames of one clip in presentation order as (time in seconds, lazy RGB getter), plus its nominal fps."""

    def __init__(self, fps: float, frames: Iterator[tuple[float, Callable[[], np.ndarray]]], close: Callable[[], None]):
        self.fps = fps
        self.frames = frames
        self.close = close


def _open_source(path: Path) -> _Source:
    if not path.exists():
        raise MotifVideoError(f"video not found: {path}")
    if path.is_dir():
        files = sorted(path.glob("*.png"))
        if not files:
            raise MotifVideoError(f"{path} holds no PNG frames")
        fps = _folder_fps(path)

        def folder_frames():
            for i, f in enumerate(files):
                yield i / fps, (lambda f=f: _read_png(f))

        return _Source(fps, folder_frames(), lambda: None)
    if path.stat().st_size == 0:
        raise MotifVideoError(f"{path} is empty (0 bytes)")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        frame = _read_png(path)
        return _Source(DEFAULT_FPS, iter([(0.0, lambda: frame)]), lambda: None)
    try:
        container = av.open(os.fspath(path))
    except av.FFmpegError as e:
        raise MotifVideoError(f"cannot open {path}: {_reason(e)}") from e
    if not container.streams.video:
        container.close()
        raise MotifVideoError(f"{path} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else DEFAULT_FPS

    def av_frames():
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else i / fps
                yield t, (lambda frame=frame: frame.to_ndarray(format="rgb24"))
        except av.FFmpegError as e:
            raise MotifVideoError(f"cannot decode {path}: {_reason(e)}") from e

    return _Source(fps, av_frames(), container.close)


def _reason(e: Exception) -> str:
    return (getattr(e, "strerror", None) or str(e)).splitlines()[0]


def _folder_fps(path: Path) -> float:
    meta = path / FOLDER_META
    if not meta.exists():
        return DEFAULT_FPS
    try:
        fps = float(json.loads(meta.read_text())["fps"])
    except (ValueError, KeyError, TypeError) as e:
        raise MotifVideoError(f"{meta} is not valid frame-folder metadata: {e}") from e
    if not fps > 0:
        raise MotifVideoError(f"{meta} gives a non-positive fps")
    return fps


def _read_png(path: Path) -> np.ndarray:  # any Pillow-readable image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise MotifVideoError(f"cannot read frame {path}: {e}") from e


def read_video(path, num_frames: int | None = None, fps: float | None = None, start: int = 0) -> np.ndarray:
    """Decode a clip to uint8 (T, H, W, 3).

    `start` is the index of the first source frame to use. Without `fps`, frames start, start+1, ... are returned;
    with `fps`, output frame k shows the source frame whose timestamp is nearest to t_start + k / fps, so a 30 fps
    clip read at 15 fps yields every other frame and one read at 48 fps repeats frames. At most `num_frames` frames
    come back (fewer when the clip ends first).
    """
    path = Path(path)
    if start < 0:
        raise MotifVideoError(f"start must be >= 0, got {start}")
    if num_frames is not None and num_frames < 1:
        raise MotifVideoError(f"num_frames must be >= 1, got {num_frames}")
    if fps is not None and not fps > 0:
        raise MotifVideoError(f"fps must be positive, got {fps}")
    src = _open_source(path)
    try:
        out = _take_by_time(src, num_frames, float(fps), start) if fps else _take_by_index(src, num_frames, start)
    finally:
        src.close()
    if not out:
        raise MotifVideoError(f"{path} has no frames" + (f" at or after frame {start}" if start else ""))
    return np.stack(out)


def _take_by_index(src: _Source, num_frames: int | None, start: int) -> list[np.ndarray]:
    out = []
    for i, (_, get) in enumerate(src.frames):
        if i < start:
            continue
        out.append(get())
        if num_frames is not None and len(out) == num_frames:
            break
    return out


def _take_by_time(src: _Source, num_frames: int | None, fps: float, start: int) -> list[np.ndarray]:
    # Streaming nearest-timestamp selection: source frame i covers targets in [mid(i-1, i), mid(i, i+1)), so each
    # decoded frame can be settled as soon as its successor's time is known; only chosen frames are converted.
    out: list[np.ndarray] = []
    t0 = None
    k = 0  # next output index
    prev = None  # (time, getter) of the previous source frame
    cache: tuple[int, np.ndarray] | None = None

    def emit_until(boundary: float, frame_id: int, get) -> bool:
        nonlocal k, cache
        while t0 + k / fps < boundary - 1e-9:
            if cache is None or cache[0] != frame_id:
                cache = (frame_id, get())
            out.append(cache[1])
            k += 1
            if num_frames is not None and k >= num_frames:
                return True
        return False

    for i, (t, get) in enumerate(src.frames):
        if i < start:
            continue
        if t0 is None:
            t0 = t
        if prev is not None and emit_until((prev[0] + t) / 2, i - 1, prev[1]):
            return out
        prev = (t, get)
    if prev is not None:
        # The last frame is shown for one nominal source period.
        emit_until(prev[0] + 1.0 / src.fps, -1, prev[1])
    return out


def probe_video(path) -> dict:
    """{'frames', 'height', 'width', 'fps'} of a clip without decoding its pictures when the container says."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
        h, w, _ = read_video(path).shape[1:]
        return {"frames": 1, "height": int(h), "width": int(w), "fps": DEFAULT_FPS}
    if path.is_dir() or not path.exists():
        src = _open_source(path)  # raises for a missing path or an empty folder
        files = sorted(path.glob("*.png"))
        h, w, _ = _read_png(files[0]).shape
        return {"frames": len(files), "height": int(h), "width": int(w), "fps": src.fps}
    if path.stat().st_size == 0:
        raise MotifVideoError(f"{path} is empty (0 bytes)")
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise MotifVideoError(f"{path} has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            frames = stream.frames
            duration = None
            if not frames:  # GIF and some streams carry no frame count: count packets (no decoding)
                frames, total = 0, 0
                for packet in container.demux(stream):
                    if packet.size:
                        frames += 1
                        total += packet.duration or 0
                duration = float(total * stream.time_base) if total and stream.time_base else None
            rate = stream.average_rate or stream.guessed_rate
            fps = frames / duration if duration else (float(rate) if rate else DEFAULT_FPS)
    except av.FFmpegError as e:
        raise MotifVideoError(f"cannot open {path}: {_reason(e)}") from e
    if not frames or not width or not height:
        raise MotifVideoError(f"{path} has no decodable video frames")
    return {"frames": int(frames), "height": int(height), "width": int(width), "fps": float(fps)}
