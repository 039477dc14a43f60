"""Shape buckets and the batch samplers that draw from them.

A batch must stack into one tensor, so every batch comes from a single bucket (num_frames, height, width). Motif-Video
trains images and videos jointly: images are 1-frame clips, and a fixed interleave such as "I-V-V" (one image batch,
then two video batches) keeps both kinds in every stretch of training instead of long runs of one kind.

Samplers are deterministic given a seed and resumable: `state_dict()` records the epoch and how many batches of it
were handed out, and `load_state_dict()` makes the next batch exactly the one that would have come next.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from ..latents import PATCH, PIXELS_PER_TOKEN, VAE_TEMPORAL, latent_shape, token_grid

__all__ = [
    "Bucket",
    "BucketSet",
    "index_buckets",
    "BucketBatchSampler",
    "ResumableBatchSampler",
    "parse_aspect",
    "parse_interleave",
    "source_span",
    "temporal_stride",
]

SIZE_MULTIPLE = PIXELS_PER_TOKEN  # VAE 8x8 spatial x patch 2x2: one latent token per 16x16 pixels


@dataclass(frozen=True, order=True)
class Bucket:
    """One batch shape: `num_frames` x `height` x `width` pixels."""

    num_frames: int
    height: int
    width: int

    def __post_init__(self):
        t, h, w = self.num_frames, self.height, self.width
        if not all(isinstance(v, (int, np.integer)) for v in (t, h, w)):
            raise ConfigError(f"bucket {t}x{h}x{w}: frames, height and width must be integers")
        if t < 1 or (t - 1) % VAE_TEMPORAL:
            raise ConfigError(
                f"bucket {self}: {t} frames is not 4k+1 (the Wan VAE compresses time 4x after the first frame)"
            )
        if h < SIZE_MULTIPLE or w < SIZE_MULTIPLE or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ConfigError(f"bucket {self}: height and width must be positive multiples of {SIZE_MULTIPLE}")

    def __str__(self) -> str:
        return f"{self.num_frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str) -> "Bucket":
        """'121x736x1280' (frames x height x width) -> Bucket."""
        try:
            t, h, w = (int(v) for v in str(text).lower().split("x"))
        except ValueError:
            raise ConfigError(f"bucket {text!r} is not FRAMESxHEIGHTxWIDTH, e.g. 121x736x1280") from None
        return cls(t, h, w)

    @property
    def is_image(self) -> bool:
        return self.num_frames == 1

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def latent_tokens(self) -> int:
        """Video tokens the transformer sees for one sample of this bucket."""
        return math.prod(token_grid(latent_shape(self.num_frames, self.height, self.width), PATCH))


def parse_aspect(value) -> float:
    """Width / height from a number or a 'W:H' string."""
    try:
        if isinstance(value, str) and ":" in value:
            w, h = value.split(":")
            aspect = float(w) / float(h)
        else:
            aspect = float(value)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"aspect ratio {value!r} is not a number or 'W:H'") from None
    if not (aspect > 0 and math.isfinite(aspect)):
        raise ConfigError(f"aspect ratio {value!r} must be positive")
    return aspect


def _round16(x: float) -> int:
    return max(SIZE_MULTIPLE, int(math.floor(x / SIZE_MULTIPLE + 0.5)) * SIZE_MULTIPLE)


def size_for_aspect(aspect: float, base_resolution: int) -> tuple[int, int]:
    """(height, width) for `aspect` with the pixel area of a 16:9 frame `base_resolution` pixels tall.

    Equal area across aspects keeps the token count (and so memory and step time) about the same for every aspect
    at one resolution, which is what lets the batch size depend on the frame count alone.
    """
    if not (isinstance(base_resolution, (int, np.integer)) and base_resolution >= SIZE_MULTIPLE):
        raise ConfigError(f"base resolution {base_resolution!r} must be an integer >= {SIZE_MULTIPLE}")
    area = base_resolution * base_resolution * 16 / 9
    height = math.sqrt(area / aspect)
    return _round16(height), _round16(height * aspect)


def temporal_stride(source_fps: float | None, target_fps: float | None) -> float:
    """Source frames per output frame; 1 when either rate is unknown (images, or no resampling asked)."""
    if not source_fps or not target_fps:
        return 1.0
    return float(source_fps) / float(target_fps)


def source_span(num_frames: int, stride: float) -> int:
    """Source frames covered by `num_frames` output frames taken every `stride` source frames.

    Output frame i is source frame start + floor(i * stride + 0.5) (nearest frame, halves rounded up), so the last
    one sits floor((n - 1) * stride + 0.5) frames after the start. `data.frame_indices` uses the same rule.
    """
    return int(math.floor((num_frames - 1) * stride + 0.5)) + 1


class BucketSet:
    """An ordered, duplicate-free set of buckets; a clip's bucket is referred to by its index here."""

    def __init__(self, buckets: Iterable[Bucket | str | Sequence[int]]):
        parsed = []
        for b in buckets:
            if isinstance(b, Bucket):
                parsed.append(b)
            elif isinstance(b, str):
                parsed.append(Bucket.parse(b))
            else:
                parsed.append(Bucket(*b))
        self.buckets: tuple[Bucket, ...] = tuple(sorted(set(parsed)))
        if not self.buckets:
            raise ConfigError("the bucket set is empty: give at least one (frames, height, width) bucket")

    @classmethod
    def from_grid(cls, frame_counts: Iterable[int], aspect_ratios: Iterable, base_resolution) -> "BucketSet":
        """Every frame count x every aspect ratio at `base_resolution` (see `size_for_aspect`).

        `base_resolution` may be a mapping {frame_count: resolution}, e.g. {1: 480, 65: 360} for the paper's stage 5
        (480p images with 360p video).
        """
        frame_counts = list(frame_counts)
        aspects = [parse_aspect(a) for a in aspect_ratios]
        if not frame_counts or not aspects:
            raise ConfigError("the bucket set is empty: give at least one frame count and one aspect ratio")
        buckets = []
        for t in frame_counts:
            if isinstance(base_resolution, Mapping):
                if t not in base_resolution:
                    raise ConfigError(f"base resolution map has no entry for frame count {t}")
                res = base_resolution[t]
            else:
                res = base_resolution
            for a in aspects:
                buckets.append(Bucket(int(t), *size_for_aspect(a, res)))
        return cls(buckets)

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, i: int) -> Bucket:
        return self.buckets[i]

    def __iter__(self) -> Iterator[Bucket]:
        return iter(self.buckets)

    def __repr__(self) -> str:
        return f"BucketSet([{', '.join(map(str, self.buckets))}])"

    def index(self, bucket: Bucket) -> int:
        try:
            return self.buckets.index(bucket)
        except ValueError:
            raise ConfigError(f"bucket {bucket} is not in {self!r}") from None

    def assign(self, num_frames: int, height: int, width: int, source_fps: float | None = None,
               target_fps: float | None = None) -> int | None:
        """Index of the bucket for a clip, or None when it cannot fill any.

        A clip can fill a bucket when it has enough source frames for the bucket's frame count at the target fps.
        Among those, the longest frame count wins (a clip is not cut shorter than it must be), then the nearest
        aspect ratio (least cropping), then the nearest pixel area (least rescaling). A 1-frame clip (an image) can
        only fill 1-frame buckets; a video shorter than every video bucket becomes an image sample if there is an
        image bucket.
        """
        if num_frames < 1 or height < 1 or width < 1:
            return None
        stride = temporal_stride(source_fps, target_fps)
        log_aspect = math.log(width / height)
        log_area = math.log(width * height)
        best, best_key = None, None
        for i, b in enumerate(self.buckets):
            if source_span(b.num_frames, stride) > num_frames:
                continue
            key = (-b.num_frames, abs(math.log(b.aspect) - log_aspect), abs(math.log(b.width * b.height) - log_area))
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best


def index_buckets(keys: Sequence[str | Bucket]) -> tuple[BucketSet, list[int]]:
    """Per-sample bucket keys ('33x480x848' or Bucket) -> (the set of them, each sample's index in it): the
    samplers' input for data that already carries its bucket, such as a latent cache."""
    parsed = [k if isinstance(k, Bucket) else Bucket.parse(k) for k in keys]
    bucket_set = BucketSet(parsed)
    where = {b: i for i, b in enumerate(bucket_set)}
    return bucket_set, [where[b] for b in parsed]


def parse_interleave(pattern: str | None) -> tuple[str, ...] | None:
    """'I-V-V' (or 'IVV') -> ('I', 'V', 'V'); None or '' -> None (no fixed interleave: batches shuffled)."""
    if pattern is None or str(pattern).strip() == "":
        return None
    tokens = tuple(c for c in str(pattern).upper() if c not in "-, ")
    if not tokens or any(c not in "IV" for c in tokens):
        raise ConfigError(
            f"interleave pattern {pattern!r} must use only I (image batch) and V (video batch), e.g. I-V-V"
        )
    return tokens


class ResumableBatchSampler:
    """Position bookkeeping shared by the samplers: subclasses give each epoch's batch list, deterministically.

    The position counts batches handed out. Save `state_dict()` after the step that consumed the last batch; a
    DataLoader with workers prefetches ahead of training, so in that case record the number of batches the training
    loop actually consumed and pass it as `batches_done` to `load_state_dict` (see docs/data.md).
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.epoch = 0
        self.batches_done = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def _fingerprint_data(self) -> object:
        raise NotImplementedError

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (lists of dataset indices) for `epoch`, in order."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._epoch_batches(epoch))
        return self._cache[1]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done = int(epoch), 0

    def __iter__(self) -> Iterator[list[int]]:
        """The rest of the current epoch; a finished epoch rolls over to the next one first."""
        batches = self.batches(self.epoch)
        if self.batches_done >= len(batches):
            self.set_epoch(self.epoch + 1)
            batches = self.batches(self.epoch)
        while self.batches_done < len(batches):
            batch = batches[self.batches_done]
            self.batches_done += 1  # counted before the yield: a checkpoint taken after this batch resumes after it
            yield batch

    def fingerprint(self) -> str:
        blob = json.dumps(self._fingerprint_data(), sort_keys=True, default=str).encode()
        return hashlib.sha1(blob).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed,
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: Mapping) -> None:
        try:
            epoch, done = int(state["epoch"]), int(state["batches_done"])
            seed, fp = int(state["seed"]), state["fingerprint"]
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"sampler state {dict(state)!r} lacks epoch/batches_done/seed/fingerprint") from None
        if seed != self.seed or fp != self.fingerprint():
            raise ConfigError(
                "sampler state was saved for a different dataset, bucket set, batch size, interleave, seed or rank "
                "layout; resuming from it would not continue the same sequence"
            )
        if not 0 <= done <= len(self.batches(epoch)):
            raise ConfigError(
                f"sampler state batches_done={done} is outside epoch {epoch} ({len(self.batches(epoch))} batches)"
            )
        self.epoch, self.batches_done = epoch, done


class BucketBatchSampler(ResumableBatchSampler):
    """Batches of dataset indices, one bucket per batch, with an optional image/video interleave.

    With `world_size` > 1 every rank builds the same global plan from the seed and takes its slice: each global
    batch holds `batch_size * world_size` samples of one bucket, so all ranks train the same bucket in a step (the
    simple scheme; `planner.PlannedBatchSampler` balances mixed buckets across ranks instead). A bucket's last
    global batch may be short; it is split as evenly as possible, and when it has fewer samples than ranks it is
    topped up by repeating samples of that bucket so that no rank sits a step out.
    """

    def __init__(self, bucket_of: Sequence[int], buckets: BucketSet | Sequence[Bucket], batch_size,
                 interleave: str | None = "I-V-V", seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        super().__init__(seed)
        self.buckets = buckets if isinstance(buckets, BucketSet) else BucketSet(buckets)
        self.bucket_of = np.asarray(bucket_of, dtype=np.int64)
        if self.bucket_of.ndim != 1 or self.bucket_of.size == 0:
            raise ConfigError("the sampler needs a non-empty list of per-sample bucket indices")
        if self.bucket_of.min() < 0 or self.bucket_of.max() >= len(self.buckets):
            raise ConfigError(f"bucket indices must lie in 0..{len(self.buckets) - 1}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ConfigError(f"rank {rank} / world size {world_size} is not a valid rank layout")
        self.rank, self.world_size = rank, world_size
        self.pattern = parse_interleave(interleave)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.batch_sizes = self._resolve_batch_sizes(batch_size)
        if not self.batches(0):
            raise ConfigError("the sampler yields no batches: every bucket holds fewer samples than one global batch "
                              "(lower data.batch_size, or give a per-frame-count map such as {1: 64, 17: 8})")

    def _resolve_batch_sizes(self, batch_size) -> dict[int, int]:
        used = sorted(set(self.bucket_of.tolist()))
        sizes = {}
        for i in used:
            b = self.buckets[i]
            if isinstance(batch_size, Mapping):
                bs = batch_size.get(b, batch_size.get(str(b), batch_size.get(b.num_frames)))
                if bs is None:
                    raise ConfigError(f"batch size map has no entry for bucket {b} (key by bucket or frame count)")
            else:
                bs = batch_size
            if not (isinstance(bs, (int, np.integer)) and bs >= 1):
                raise ConfigError(f"batch size {bs!r} for bucket {b} must be a positive integer")
            sizes[i] = int(bs)
        return sizes

    def _fingerprint_data(self):
        return {"bucket_of": hashlib.sha1(self.bucket_of.tobytes()).hexdigest(),
                "buckets": [str(b) for b in self.buckets],
                "batch": sorted(self.batch_sizes.items()), "pattern": self.pattern, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "rank": self.rank, "world": self.world_size}

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        image_batches, video_batches = [], []
        for i, bs in sorted(self.batch_sizes.items()):
            members = np.flatnonzero(self.bucket_of == i)
            if self.shuffle:
                members = rng.permutation(members)
            per_step = bs * self.world_size
            for lo in range(0, len(members), per_step):
                batch = members[lo:lo + per_step]
                if len(batch) < per_step:
                    if self.drop_last:
                        continue
                    if len(batch) < self.world_size:  # give every rank at least one sample
                        batch = np.resize(np.concatenate([batch, members]), self.world_size)
                mine = np.array_split(batch, self.world_size)[self.rank]  # (<= bs,) this rank's share
                (image_batches if self.buckets[i].is_image else video_batches).append(mine.tolist())
        if self.shuffle:
            image_batches = [image_batches[j] for j in rng.permutation(len(image_batches))]
            video_batches = [video_batches[j] for j in rng.permutation(len(video_batches))]
        if self.pattern is None:
            merged = image_batches + video_batches
            return [merged[j] for j in rng.permutation(len(merged))] if self.shuffle else merged
        return _interleave(self.pattern, image_batches, video_batches)


def _interleave(pattern: tuple[str, ...], images: list, videos: list) -> list:
    """Follow the pattern while both kinds last; a slot whose kind has run out is skipped, and a kind the pattern
    never names (e.g. videos under "I") follows at the end rather than being dropped."""
    out, i, v = [], 0, 0
    while i < len(images) or v < len(videos):
        progressed = False
        for token in pattern:
            if token == "I" and i < len(images):
                out.append(images[i])
                i += 1
                progressed = True
            elif token == "V" and v < len(videos):
                out.append(videos[v])
                v += 1
                progressed = True
        if not progressed:
            return out + images[i:] + videos[v:]
    return out
