"""Training clips: where they come from, how they are decoded, and how one becomes a bucket-shaped tensor.

Sources: a folder (every clip or image next to a same-name `.txt` caption) or a CSV / JSONL metadata file (columns
`path`, `caption`, optional `fps`, `num_frames`, `height`, `width`; paths relative to the metadata file). A clip may
also carry a condition caption (a `NAME.condition.txt` file, or a `condition_caption` column): what the clip's
first frame does not show, usually its motion, the prompt image-to-video training pairs with that frame. Images
are 1-frame clips. Metadata that already carries the frame count, size and fps lets a dataset of millions of clips
be bucketed without opening a single file. WebDataset tar shards, local or by URL, are read by `train.shards`.

A long run must not die on one bad file: clips that cannot be opened or have no frames are skipped with a warning
and counted (`ClipDataset.num_skipped`), both when the dataset is built and when a clip later fails to decode.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, MotifVideoError
from ..records import JSONL_SUFFIXES, read_jsonl
from ..pipeline.video_io import IMAGE_EXTENSIONS, MEDIA_EXTENSIONS, probe_video, read_video
from .buckets import Bucket, BucketSet, source_span, temporal_stride

__all__ = [
    "Clip",
    "ClipDataset",
    "IMAGE_EXTENSIONS",
    "collate_clips",
    "decode_frames",
    "frame_indices",
    "load_clip",
    "probe_clip",
    "read_metadata",
    "resize_center_crop",
    "scan_folder",
]

log = logging.getLogger(__name__)

# A clip's condition caption in a dataset folder: `clip.mp4` -> `clip.condition.txt`.
CONDITION_CAPTION_SUFFIX = ".condition.txt"
# How many other clips of the same bucket a failed decode may fall back to before the batch is given up.
MAX_SUBSTITUTES = 8


@dataclass(frozen=True)
class Clip:
    """One training sample's file and caption; frame count, fps and size are filled by probing when unknown."""

    path: Path
    caption: str
    num_frames: int | None = None
    fps: float | None = None
    height: int | None = None
    width: int | None = None
    # Its identity within the dataset (the path relative to the folder, metadata file or tar shard set): what a
    # cached sample is keyed by, so the same clip gets the same key however it was reached.
    source: str | None = None
    # The prompt for when the clip's first frame is given as the image (e.g. only its motion); None: none.
    condition_caption: str | None = None

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_EXTENSIONS

    @property
    def is_probed(self) -> bool:
        return (None not in (self.num_frames, self.height, self.width)) and (self.is_image or self.fps is not None)


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


def scan_folder(root) -> list[Clip]:
    """Every clip/image under `root` (recursively, sorted) with the caption from its same-name `.txt` file."""
    root = Path(root)
    if not root.is_dir():
        raise MotifVideoError(f"dataset folder {root} does not exist or is not a folder")
    clips = []
    for path in sorted(root.rglob("*")):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in MEDIA_EXTENSIONS:
            continue
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            raise MotifVideoError(f"caption file {caption_file} for {path} is missing")
        caption = caption_file.read_text(encoding="utf-8").strip()
        if not caption:
            raise MotifVideoError(f"caption file {caption_file} for {path} is empty")
        condition_file = path.with_suffix(CONDITION_CAPTION_SUFFIX)
        condition = condition_file.read_text(encoding="utf-8").strip() if condition_file.is_file() else None
        clips.append(Clip(path, caption, source=path.relative_to(root).as_posix(), condition_caption=condition or None))
    if not clips:
        raise MotifVideoError(f"no clips or images found under {root} (extensions: {', '.join(MEDIA_EXTENSIONS)})")
    return clips


_NUMERIC = {"fps": float, "num_frames": int, "height": int, "width": int}


def read_metadata(path) -> list[Clip]:
    """Clips listed in a `.csv` (header row) or `.jsonl` (one object a line) metadata file."""
    path = Path(path)
    if not path.is_file():
        raise MotifVideoError(f"metadata file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            missing = [c for c in ("path", "caption") if c not in fields]
            if missing:
                raise MotifVideoError(f"{path}: CSV header lacks column(s) {', '.join(missing)}")
            rows = [(i + 2, row) for i, row in enumerate(reader)]  # line 1 is the header
    elif suffix in JSONL_SUFFIXES:
        rows = read_jsonl(path)
    else:
        raise MotifVideoError(f"metadata file {path} must end in .csv or .jsonl")
    clips = [_clip_from_row(path, line, row) for line, row in rows]
    if not clips:
        raise MotifVideoError(f"metadata file {path} lists no clips")
    return clips


def _clip_from_row(meta: Path, line: int, row: dict) -> Clip:
    rel = row.get("path")
    if rel is None or str(rel).strip() == "":
        raise MotifVideoError(f"{meta}:{line}: row has no path")
    clip_path = Path(str(rel).strip())
    source = clip_path.as_posix()
    if not clip_path.is_absolute():
        clip_path = meta.parent / clip_path
    caption = row.get("caption")
    if caption is None or str(caption).strip() == "":
        raise MotifVideoError(f"{meta}:{line}: clip {clip_path} has no caption")
    condition = str(row.get("condition_caption") or "").strip() or None
    return Clip(clip_path, str(caption).strip(), source=source, condition_caption=condition,
                **clip_numbers(row, f"{meta}:{line}"))


def clip_numbers(row: dict, where: str) -> dict:
    """The optional `fps`, `num_frames`, `height`, `width` of a metadata row, checked; `where` names the row."""
    values = {}
    for key, kind in _NUMERIC.items():
        raw = row.get(key)
        if raw is None or (isinstance(raw, str) and raw.strip() == ""):
            continue
        try:
            value = kind(float(raw)) if kind is int else kind(raw)
        except (TypeError, ValueError, OverflowError):
            raise MotifVideoError(f"{where}: {key}={raw!r} is not a number") from None
        if value < 0 or (kind is float and not math.isfinite(value)) or (key != "num_frames" and value == 0):
            raise MotifVideoError(f"{where}: {key}={raw!r} is out of range")
        values[key] = value
    return values


def probe_clip(clip: Clip) -> Clip:
    """Fill in what the source did not say; MotifVideoError when the file cannot be opened or has no frames. A
    folder of PNG frames (`pipeline.video_io`'s frame-folder format) is a clip too."""
    if clip.num_frames == 0:
        raise MotifVideoError(f"{clip.path} has zero frames")
    if clip.is_image and clip.num_frames not in (None, 1):
        clip = replace(clip, num_frames=1)  # metadata cannot give a still image more frames than it has
    if clip.is_probed:
        return clip
    if not clip.path.exists():
        raise MotifVideoError(f"{clip.path} does not exist")
    if clip.is_image:
        try:
            with Image.open(clip.path) as im:
                width, height = im.size
        except OSError as e:
            raise MotifVideoError(f"cannot read image {clip.path}: {e}") from None
        return replace(clip, num_frames=1, height=clip.height or height, width=clip.width or width)
    info = probe_video(clip.path)
    return replace(clip, num_frames=clip.num_frames or info["frames"], fps=clip.fps or info["fps"],
                   height=clip.height or info["height"], width=clip.width or info["width"])


# ----------------------------------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------------------------------


def frame_indices(num_source_frames: int, num_frames: int, source_fps: float | None = None,
                  target_fps: float | None = None, start: int | None = None,
                  rng: np.random.Generator | None = None) -> list[int]:
    """Source frame indices for `num_frames` output frames at `target_fps`, from `start` or a random start.

    Output frame i is the source frame nearest to i / target_fps seconds after the start: start + floor(i * s + 0.5)
    with s = source_fps / target_fps. Above the source rate frames repeat. Without a `start` or `rng` the clip's
    first frame is the start.
    """
    stride = temporal_stride(source_fps, target_fps)
    span = source_span(num_frames, stride)
    if num_frames < 1 or span > num_source_frames:
        raise MotifVideoError(
            f"{num_frames} frames at a stride of {stride:g} need {span} source frames; the clip has {num_source_frames}"
        )
    last_start = num_source_frames - span
    if start is None:
        start = int(rng.integers(0, last_start + 1)) if rng is not None else 0
    elif not 0 <= start <= last_start:
        raise MotifVideoError(f"start frame {start} is outside 0..{last_start} for this clip and frame count")
    return [start + int(math.floor(i * stride + 0.5)) for i in range(num_frames)]


def decode_frames(path, indices: Sequence[int]) -> np.ndarray:
    """uint8 (len(indices), H, W, 3) of the given source frames (images are 1-frame clips: index 0 only)."""
    path = Path(path)
    if not len(indices) or min(indices) < 0:
        raise MotifVideoError(f"bad frame indices for {path}: {list(indices)[:8]}")
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        if max(indices) != 0:
            raise MotifVideoError(f"{path} is an image: only frame 0 exists")
        try:
            with Image.open(path) as im:
                frame = np.asarray(im.convert("RGB"))  # (H, W, 3)
        except OSError as e:
            raise MotifVideoError(f"cannot read image {path}: {e}") from None
        return np.repeat(frame[None], len(indices), axis=0)  # (N, H, W, 3)
    first, last = min(indices), max(indices)
    # Decode the covered span sequentially rather than seeking: keyframe seeks land on approximate frames, and
    # training clips are short pre-cut segments where the span is most of the clip anyway.
    frames = read_video(path, num_frames=last - first + 1, start=first)  # (span, H, W, 3)
    if len(frames) < last - first + 1:
        raise MotifVideoError(f"{path} ended after {first + len(frames)} frames; frame {last} was needed")
    return frames[[i - first for i in indices]]  # (N, H, W, 3)


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (T, h, w, 3) -> float (3, T, height, width) in [-1, 1]: scale to cover, then crop the centre.

    Covering (not fitting) keeps every output pixel real content; the bucket was chosen for the nearest aspect, so
    little is cropped. Antialiasing matters when downscaling 1080p sources to 144p-360p buckets.
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, h, w)
    h, w = x.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top:top + height, left:left + width]  # (T, 3, H, W)
    x = (x / 127.5 - 1.0).clamp_(-1.0, 1.0)
    return x.permute(1, 0, 2, 3).contiguous()  # (3, T, H, W)


def load_clip(clip: Clip, bucket: Bucket, fps: float | None, start: int | None = None,
              rng: np.random.Generator | None = None) -> torch.Tensor:
    """A probed clip decoded, resampled to `fps` and cropped to `bucket`: float (3, T, H, W) in [-1, 1]. The window
    starts at source frame `start`, a random one from `rng`, or the first."""
    idx = frame_indices(clip.num_frames, bucket.num_frames, clip.fps, None if clip.is_image else fps, start, rng)
    return resize_center_crop(decode_frames(clip.path, idx), bucket.height, bucket.width)


def describe_length(clip: Clip) -> str:
    """'120 frames at 30 fps' (or without a rate for images and unknown rates), for messages."""
    rate = f" at {clip.fps:g} fps" if clip.fps and not clip.is_image else ""
    return f"{clip.num_frames} frame{'s' if clip.num_frames != 1 else ''}{rate}"


# ----------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------


class ClipDataset(Dataset):
    """Clips assigned to buckets; item i is clip i decoded, resampled and cropped to its bucket's shape.

    `fps` is the training frame rate (None: take consecutive source frames). With `random_start` each epoch takes a
    fresh window from each clip, drawn from (seed, epoch, index) so that a resumed run decodes the same frames;
    call `set_epoch` together with the sampler's.
    """

    def __init__(self, clips: Sequence[Clip], buckets: BucketSet, fps: float | None = None, seed: int = 0,
                 random_start: bool = True):
        if fps is not None and not (isinstance(fps, (int, float)) and fps > 0):
            raise ConfigError(f"training fps must be a positive number, got {fps!r}")
        self.buckets = buckets if isinstance(buckets, BucketSet) else BucketSet(buckets)
        self.fps, self.seed, self.random_start = fps, int(seed), bool(random_start)
        self.epoch = 0
        self.clips: list[Clip] = []
        self.bucket_of: list[int] = []
        self.skipped: list[tuple[str, str]] = []  # (path, reason): unreadable, zero-length, or failed to decode
        self.unplaced: list[str] = []  # readable, but no bucket can hold them (too few frames)
        for clip in clips:
            try:
                clip = probe_clip(clip)
            except MotifVideoError as e:
                self._skip(str(clip.path), str(e))
                continue
            b = self.buckets.assign(clip.num_frames, clip.height, clip.width, clip.fps, fps)
            if b is None:
                self.unplaced.append(str(clip.path))
                log.warning("no bucket can hold %s (%s); leaving it out", clip.path, describe_length(clip))
                continue
            self.clips.append(clip)
            self.bucket_of.append(b)
        if not self.clips:
            raise ConfigError(
                f"no bucket in {self.buckets!r} can hold any of the {len(clips)} clips "
                f"({len(self.skipped)} unreadable, {len(self.unplaced)} too short "
                f"{'at the source frame rate' if fps is None else f'at {fps:g} fps'})"
            )
        self._members: dict[int, list[int]] = {}
        self._position: list[int] = []  # index -> its place in its bucket's member list
        for i, b in enumerate(self.bucket_of):
            self._position.append(len(self._members.setdefault(b, [])))
            self._members[b].append(i)
        self._bad: set[int] = set()

    @classmethod
    def from_folder(cls, root, buckets: BucketSet, **kwargs) -> "ClipDataset":
        return cls(scan_folder(root), buckets, **kwargs)

    @classmethod
    def from_metadata(cls, path, buckets: BucketSet, **kwargs) -> "ClipDataset":
        return cls(read_metadata(path), buckets, **kwargs)

    @property
    def num_skipped(self) -> int:
        """Clips dropped as unreadable or empty, including decode failures seen by this process so far."""
        return len(self.skipped)

    def bucket_counts(self) -> dict[Bucket, int]:
        """Samples per bucket, the planner's input."""
        return {self.buckets[b]: len(m) for b, m in sorted(self._members.items())}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.clips)

    def _skip(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))
        log.warning("skipping %s: %s", path, reason)

    def load(self, index: int, start: int | None = None) -> dict:
        """Item `index` with its window starting at source frame `start` (random or first frame when None)."""
        clip, bucket = self.clips[index], self.buckets[self.bucket_of[index]]
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.random_start and start is None else None
        pixels = load_clip(clip, bucket, self.fps, start, rng)
        return {"pixels": pixels, "caption": clip.caption, "index": index, "bucket": bucket}

    def __getitem__(self, index: int) -> dict:
        members = self._members[self.bucket_of[index]]
        at = self._position[index]
        tries = 0
        # A clip that fails to decode is replaced by the next one of the same bucket, so the batch keeps its shape.
        for k in range(len(members)):
            i = members[(at + k) % len(members)]
            if i in self._bad:
                continue
            try:
                return self.load(i)
            except MotifVideoError as e:
                self._bad.add(i)
                self._skip(str(self.clips[i].path), f"decode failed: {e}")
            tries += 1
            if tries > MAX_SUBSTITUTES:
                break
        raise MotifVideoError(f"{tries} clips of bucket {self.buckets[self.bucket_of[index]]} failed to decode in a "
                              "row; check the dataset files")


def collate_clips(items: Sequence[dict]) -> dict:
    """Stack one bucket's items: pixels (B, 3, T, H, W), captions list, indices (B,), bucket."""
    buckets = {item["bucket"] for item in items}
    if len(buckets) != 1:
        raise MotifVideoError(f"a batch must come from one bucket, got {sorted(map(str, buckets))}")
    return {
        "pixels": torch.stack([item["pixels"] for item in items]),  # (B, 3, T, H, W)
        "captions": [item["caption"] for item in items],
        "indices": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "bucket": buckets.pop(),
    }
