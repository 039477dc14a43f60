"""Cached training data: VAE latents and text-encoder states computed once, read many times.

Training at scale never runs the VAE or the text encoder: `motif-video cache` encodes every clip once and writes

    <folder>/index.json                 format, version, text_encoder, teacher, frame_rate, dims, one record per
                                        sample (key, source, caption, bucket, latent_shape, text_len, shard)
    <folder>/shard-*.safetensors        per sample `<key>.latents` (16, T', H', W') normalised VAE latents,
                                        `<key>.text` (L, D) text states, `<key>.text_mask` (L,) uint8,
                                        optional `<key>.teacher` (N_t, D_t) frozen REPA teacher features,
                                        optional `<key>.image_tokens` (N_i, D_i) SigLIP tokens of the clip's
                                        first frame (image-to-video training; written when the text encoder
                                        has a vision tower; caches without them read as before),
                                        optional `<key>.condition_text` (L_c, D) states of the clip's condition
                                        caption (what image-to-video training pairs with its first frame; the
                                        record then holds `condition_caption`)
    <folder>/empty_prompt.safetensors   optional `text` (L, D) + `text_mask` (L,) of the empty prompt (CFG dropout)

Images are 1-frame clips (T' = 1). Each record carries its pixel bucket key "FRAMESxHEIGHTxWIDTH" (as
`train.buckets.Bucket`; by default derived from the latent shape): samples that share one have the same latent
shape, so a batch drawn from one bucket stacks without padding. A sample's key derives from its clip's identity
(`source`) and bucket (`sample_key`); samples written without a source (and caches written before sources were
recorded) have running-counter keys `s00000000`, ... and read the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, ConfigError
from ..latents import pixel_shape
from ..pipeline.text import pad_text
from .buckets import Bucket

INDEX_NAME = "index.json"
PART_GLOB = "index-*.json"  # one per writer of a distributed `cache` run, folded into index.json at its end
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
FORMAT = "motif-video-latent-cache"
VERSION = 1
# Header fields that every sample of a cache shares; a writer appending with another value is refused.
HEADER_FIELDS = ("text_encoder", "teacher", "frame_rate")


@dataclass
class CachedSample:
    latents: torch.Tensor  # (16, T', H', W'), already (z - mean) / std normalised
    text: torch.Tensor  # (L, D)
    text_mask: torch.Tensor | None = None  # (L,), 1 = real token; None: all real
    caption: str = ""
    bucket: str | None = None  # checked against the latent shape, from which it is derived when None
    teacher: torch.Tensor | None = None  # (N_t, D_t) REPA teacher patch features
    teacher_grid: tuple[int, int, int] | None = None  # the teacher tokens' (t, h, w) layout
    source: str | None = None  # the clip's identity (its path in the dataset); None: a running-counter key
    image_tokens: torch.Tensor | None = None  # (N_i, D_i) vision-tower tokens of the first frame (I2V)
    condition_text: torch.Tensor | None = None  # (L_c, D) states of the condition caption (I2V), real tokens only
    condition_caption: str | None = None


def default_bucket(latent_shape) -> str:
    """The pixel bucket "FRAMESxHEIGHTxWIDTH" (train.buckets format) of a Wan-VAE latent (C, T', H', W')."""
    return "x".join(str(n) for n in pixel_shape(*(int(s) for s in latent_shape[1:])))


def sample_key(source: str, bucket: str) -> str:
    """A sample's key from its clip's identity and its bucket: the same inputs give the same key whatever the order,
    the process count or an interruption, so re-caching finds what is already there instead of duplicating it."""
    return "c" + hashlib.sha256(f"{source}\n{bucket}".encode()).hexdigest()[:24]


def _fsync_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _new_index(header: dict) -> dict:
    index = {"format": FORMAT, "version": VERSION, **{name: None for name in HEADER_FIELDS},
             "latent_channels": None, "text_dim": None, "teacher_dim": None, "image_dim": None,
             "empty_prompt": None,
             "shards": [], "samples": []}
    index.update({k: v for k, v in header.items() if v is not None})
    return index


def _agree(index: dict, header: dict, where) -> None:
    """Fill `index`'s unset header fields from `header`, refusing one that is set to something else."""
    for name, value in header.items():
        if value is None:
            continue
        recorded = index.get(name)
        # Models are compared as names (an older cache may record an install path, a newer one a portable name).
        same = recorded in (None, value) or (name in ("text_encoder", "teacher") and isinstance(recorded, str)
                                             and same_source(recorded, value, by_name=name == "teacher"))
        if not same:
            raise ConfigError(f"cache {where} holds {name}={recorded!r}, not {value!r}")
        index[name] = value


def check_append(folder: Path, header: dict, keyed_by_source: bool = False) -> dict | None:
    """The index of the cache in `folder` (None: no cache yet), with `header` filled in; ConfigError when samples
    with this header cannot join it."""
    if not (folder / INDEX_NAME).is_file():
        return None
    index = read_index(folder)
    if keyed_by_source and any("source" not in r for r in index["samples"]):
        raise ConfigError(f"cache {folder} was written before samples were keyed by their source clip, so caching "
                          "into it again would duplicate them: cache into a new folder")
    _agree(index, header, folder)
    return index


class CachedLatentWriter:
    """Appends samples to a cache folder in shards of about `shard_bytes`.

    Alone (`part=None`) it extends index.json after each shard. With `part` (one writer per process of a distributed
    `cache`) it writes `shard-<part>-NNNNN.safetensors` and its own `index-<part>.json`, and never touches
    index.json; `merge_parts` folds the parts in. Either way a shard is complete before an index names it, so a
    cache interrupted mid-write reads as its last complete index. Samples with a `source` are keyed by it
    (`sample_key`): one already in the cache is not written again (`add` returns False).
    """

    def __init__(self, folder: str | Path, *, text_encoder: str | None = None, teacher: str | None = None,
                 frame_rate: float | str | None = None, shard_bytes: int = 1 << 30, trim_text_padding: bool = True,
                 part: str | None = None, keyed_by_source: bool = False):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"cache folder {self.folder} is an existing file")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create cache folder {self.folder}: {e.strerror or e}") from None
        self.shard_bytes = shard_bytes
        self.trim_text_padding = trim_text_padding
        self.part = part
        header = {"text_encoder": text_encoder, "teacher": teacher, "frame_rate": frame_rate}
        merged = check_append(self.folder, header, keyed_by_source)
        if part is None:
            self.index = merged if merged is not None else _new_index(header)
            self._index_path = self.folder / INDEX_NAME
        else:
            base = _new_index({}) if merged is None else {k: v for k, v in merged.items()
                                                           if k not in ("shards", "samples")}
            self.index = {**base, "shards": [], "samples": []}
            _agree(self.index, header, self.folder)
            self._index_path = self.folder / f"index-{part}.json"
        self.done: set[str] = {r["key"] for r in (merged or self.index)["samples"]}
        self._counter = len((merged or self.index)["samples"])
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_records: list[dict] = []
        self._pending_bytes = 0

    def _check_dim(self, name: str, value: int) -> None:
        if self.index.get(name) is None:  # .get: caches written before a field existed
            self.index[name] = int(value)
        elif self.index[name] != value:
            raise ConfigError(f"cache {self.folder}: {name} is {self.index[name]}, a new sample has {value}")

    def add(self, sample: CachedSample) -> bool:
        """Queue a sample for the current shard; False (nothing written) when its key is already in the cache."""
        latents, text = sample.latents, sample.text
        if latents.dim() != 4:
            raise ConfigError(f"cached latents must be (C, T, H, W), got {tuple(latents.shape)}")
        if text.dim() != 2:
            raise ConfigError(f"cached text states must be (L, D), got {tuple(text.shape)}")
        mask = torch.ones(text.shape[0], dtype=torch.uint8) if sample.text_mask is None \
            else sample.text_mask.to(torch.uint8).reshape(-1)
        if mask.shape[0] != text.shape[0]:
            raise ConfigError(f"text_mask has {mask.shape[0]} entries for {text.shape[0]} text tokens")
        if self.trim_text_padding and mask.any():
            # The text encoder attends with this mask, so the real tokens' states do not depend on the padding:
            # dropping trailing pads is exact and saves most of the space (512-token padding).
            last = int(mask.nonzero().max()) + 1
            text, mask = text[:last], mask[:last]
        bucket = default_bucket(latents.shape)
        if sample.bucket is not None and str(Bucket.parse(sample.bucket)) != bucket:
            # Batches are drawn per bucket and stacked: a key that lies about the shape would break a batch later.
            raise ConfigError(f"bucket {sample.bucket} does not match latents {tuple(latents.shape)} (that is {bucket} "
                              "with the Wan VAE's 4x temporal, 8x spatial compression)")
        if sample.source is not None:
            key = sample_key(sample.source, bucket)
            if key in self.done:
                return False
        elif self.part is not None:
            raise ConfigError("a part writer needs each sample's source (counter keys of parallel writers collide)")
        else:
            key = f"s{self._counter:08d}"
        self._check_dim("latent_channels", latents.shape[0])
        self._check_dim("text_dim", text.shape[1])
        record = {"key": key, "caption": sample.caption, "bucket": bucket,
                  "latent_shape": list(latents.shape), "text_len": int(text.shape[0])}
        if sample.source is not None:
            record["source"] = sample.source
        tensors = {f"{key}.latents": latents, f"{key}.text": text, f"{key}.text_mask": mask}
        if sample.teacher is not None:
            if self.index["teacher"] is None:
                raise ConfigError("teacher features need the teacher's name (write the cache with teacher=...)")
            if sample.teacher.dim() != 2 or sample.teacher_grid is None:
                raise ConfigError("teacher features must be (N, D) and come with teacher_grid (t, h, w)")
            if int(torch.tensor(sample.teacher_grid).prod()) != sample.teacher.shape[0]:
                raise ConfigError(f"teacher_grid {sample.teacher_grid} does not hold {sample.teacher.shape[0]} tokens")
            self._check_dim("teacher_dim", sample.teacher.shape[1])
            tensors[f"{key}.teacher"] = sample.teacher
            record["teacher_grid"] = list(sample.teacher_grid)
        if sample.image_tokens is not None:
            if sample.image_tokens.dim() != 2:
                raise ConfigError(f"image tokens must be (N, D), got {tuple(sample.image_tokens.shape)}")
            self._check_dim("image_dim", sample.image_tokens.shape[1])
            tensors[f"{key}.image_tokens"] = sample.image_tokens
            record["image_tokens"] = int(sample.image_tokens.shape[0])
        if sample.condition_text is not None:
            if sample.condition_text.dim() != 2 or sample.condition_text.shape[1] != text.shape[1]:
                raise ConfigError(f"condition text states must be (L, {text.shape[1]}), got "
                                  f"{tuple(sample.condition_text.shape)}")
            tensors[f"{key}.condition_text"] = sample.condition_text
            record["condition_caption"] = sample.condition_caption or ""
        for name, t in tensors.items():
            t = t.detach().cpu().contiguous()
            self._pending[name] = t
            self._pending_bytes += t.numel() * t.element_size()
        self._pending_records.append(record)
        self.done.add(key)
        self._counter += 1
        if self._pending_bytes >= self.shard_bytes:
            self._flush()
        return True

    def set_empty_prompt(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> None:
        """The empty prompt's encoder states: what CFG dropout trains with (and what the sampler feeds as 'uncond')."""
        mask = torch.ones(text.shape[0], dtype=torch.uint8) if text_mask is None else text_mask.to(torch.uint8)
        self._check_dim("text_dim", text.shape[1])
        path = self.folder / EMPTY_PROMPT_NAME
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({"text": text.detach().cpu().contiguous(), "text_mask": mask.cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)
        self.index["empty_prompt"] = EMPTY_PROMPT_NAME

    def _shard_name(self) -> str:
        if self.part is not None:
            return f"shard-{self.part}-{len(self.index['shards']):05d}.safetensors"
        n = len(self.index["shards"])
        while (self.folder / f"shard-{n:05d}.safetensors").exists():  # a shard of an interrupted write
            n += 1
        return f"shard-{n:05d}.safetensors"

    def _flush(self) -> None:
        if not self._pending_records:
            return
        name = self._shard_name()
        tmp = self.folder / f"{name}.{os.getpid()}.tmp"
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        for record in self._pending_records:
            record["shard"] = name
        self.index["shards"].append(name)
        self.index["samples"].extend(self._pending_records)
        self._pending, self._pending_records, self._pending_bytes = {}, [], 0
        _fsync_write_json(self._index_path, self.index)

    def close(self) -> Path:
        self._flush()
        _fsync_write_json(self._index_path, self.index)  # also records an empty prompt set after the last shard
        return self.folder

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()


def write_cached_samples(folder: str | Path, samples: Iterable[CachedSample], *, empty_prompt=None,
                         text_encoder: str | None = None, teacher: str | None = None,
                         shard_bytes: int = 1 << 30) -> Path:
    """Write (or append) samples to a cache folder; `empty_prompt`: (text (L, D), mask (L,)) or None. Samples with a
    `source` already in the cache are not written again."""
    with CachedLatentWriter(folder, text_encoder=text_encoder, teacher=teacher, shard_bytes=shard_bytes) as writer:
        for sample in samples:
            writer.add(sample)
        if empty_prompt is not None:
            writer.set_empty_prompt(*empty_prompt)
    return Path(folder)


def _sample_order(numbered: tuple[int, dict]):
    # Samples keyed by source sort by it, so a cache's order (hence a training run's data order) does not depend
    # on how many processes wrote it or where it was interrupted; older counter-keyed samples keep their order.
    position, record = numbered
    return (0, position, "", "") if "source" not in record else (1, 0, record["source"], record["bucket"])


def merge_parts(folder: str | Path, *, remove_orphans: bool = False) -> dict:
    """Fold every part index (`index-*.json`) into index.json and delete the parts; returns the merged index.

    A key found twice (the same clip listed twice, or a part left by an interrupted run) keeps its first copy.
    `remove_orphans` also deletes temporary files and shards that no index names (written by a process killed
    between a shard and its index): only safe while no other writer works in the folder.
    """
    folder = Path(folder)
    index = read_index(folder) if (folder / INDEX_NAME).is_file() else None
    parts = sorted(folder.glob(PART_GLOB))
    for path in parts:
        part = _load_index(path)
        if index is None:
            index = _new_index({})
        _agree(index, {k: part.get(k) for k in (*HEADER_FIELDS, "latent_channels", "text_dim", "teacher_dim",
                                                  "image_dim", "empty_prompt")}, folder)
        keys = {r["key"] for r in index["samples"]}
        index["shards"] += [s for s in part["shards"] if s not in index["shards"]]
        index["samples"] += [r for r in part["samples"] if r["key"] not in keys]
    if index is None:
        index = _new_index({})
    index["samples"] = [r for _, r in sorted(enumerate(index["samples"]), key=_sample_order)]
    _fsync_write_json(folder / INDEX_NAME, index)
    for path in parts:
        path.unlink()
    if remove_orphans:
        named = set(index["shards"])
        for path in folder.glob("shard-*"):
            if path.name not in named and (path.suffix == ".tmp" or path.name.endswith(".safetensors")):
                path.unlink()
        for path in folder.glob("*.tmp"):
            if path.name.startswith((INDEX_NAME, "index-", EMPTY_PROMPT_NAME)):
                path.unlink()
    return index


def read_index(folder: Path) -> dict:
    path = folder / INDEX_NAME
    if not path.is_file():
        raise ConfigError(f"{folder} is not a latent cache: it has no {INDEX_NAME} "
                          "(write one with `motif-video cache`)")
    return _load_index(path)


def _load_index(path: Path) -> dict:
    return load_index_file(path, FORMAT, VERSION, "cache")


def load_index_file(path: Path, fmt: str, version: int, what: str, *, other_format: str | None = None) -> dict:
    """A folder's index json, of format `fmt` at `version`: a CheckpointError when it is corrupt or of another
    version; of another format, a ConfigError `other_format` (a hint for a folder given in the wrong place) or a
    CheckpointError."""
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt {what} index {path}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != fmt:
        if other_format:
            raise ConfigError(other_format)
        raise CheckpointError(f"{path} is not a motif-video {what} index")
    if index.get("version") != version:
        raise CheckpointError(f"{path} has {what} format version {index.get('version')}; this reader needs {version}")
    return index


# -- reading -------------------------------------------------------------------------------------------------------
def same_source(recorded: str | None, wanted: str, by_name: bool = False) -> bool:
    """Whether the model a cache records (a name, hub id or folder path) is the one a config names: the same
    string, the same folder, a relative name that ends the other's path (`Motif-Video-2B/text_encoder`, as
    `motif-video cache` records it, for `/models/Motif-Video-2B/text_encoder`), or (`by_name`) the same last path
    component, e.g. `dinov2-base` for `/models/dinov2-base` or `facebook/dinov2-base`."""
    if recorded is None:
        return False
    if recorded == wanted:
        return True
    a, b = Path(recorded).expanduser(), Path(wanted).expanduser()
    if a.exists() and b.exists() and a.resolve() == b.resolve():
        return True
    for short, long in ((a, b), (b, a)):
        if not short.is_absolute() and len(short.parts) <= len(long.parts) \
                and long.parts[len(long.parts) - len(short.parts):] == short.parts:
            return True
    return by_name and a.name == b.name


class ShardedSamples(torch.utils.data.Dataset):
    """The samples that the index.json of one or more folders lists, read from the folders' safetensors shards: the
    records (optionally of some buckets only), their bucket keys, one open handle per shard in each process, and the
    fields every kind of sample has. Subclasses read and check each folder's index (`_read_index`) and add their own
    tensors to an item."""

    kind = "cache"  # what messages call a folder

    def __init__(self, folders: list[str | Path] | str | Path, buckets: list[str] | None):
        folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
        if not folders:
            raise ConfigError(f"no {self.kind} folders given")
        self.records: list[tuple[Path, dict]] = []
        for folder in map(Path, folders):
            index = self._read_index(folder)
            self.records += [(folder, r) for r in index["samples"] if buckets is None or r["bucket"] in buckets]
        if not self.records:
            raise ConfigError(f"no samples in {self.kind} {', '.join(map(str, folders))}"
                              + (f" for buckets {buckets}" if buckets else ""))
        self._handles: dict[Path, object] = {}

    def _read_index(self, folder: Path) -> dict:
        """`folder`'s index, checked against the folders read before it."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    @property
    def bucket_keys(self) -> list[str]:
        return [r["bucket"] for _, r in self.records]

    def __getstate__(self):  # DataLoader workers reopen their own file handles
        return {**self.__dict__, "_handles": {}}

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            if not path.is_file():
                raise CheckpointError(f"missing {self.kind} shard {path} (named in its index.json)")
            try:
                handle = self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"corrupt {self.kind} shard {path}: {str(e).splitlines()[0]}") from None
        return handle

    def _sample(self, i: int) -> tuple[dict, object, dict]:
        """Sample i's record, its open shard, and the item's shared fields (text states, mask, caption, bucket)."""
        folder, record = self.records[i]
        shard = self._open(folder / record["shard"])
        key = record["key"]
        item = {"text": shard.get_tensor(f"{key}.text").float(),
                "text_mask": shard.get_tensor(f"{key}.text_mask").bool(),
                "caption": record["caption"], "bucket": record["bucket"], "index": i}
        return record, shard, item


class CachedLatentDataset(ShardedSamples):
    """Samples of one or more cache folders; item i -> dict of float32 tensors + caption + bucket."""

    def __init__(self, folders: list[str | Path] | str | Path, *, buckets: list[str] | None = None,
                 text_encoder: str | None = None, teacher: str | None = None):
        self.text_encoder, self.teacher = text_encoder, teacher
        self.text_dim = self.teacher_dim = None
        self._empty: tuple[Path, str] | None = None
        super().__init__(folders, buckets)
        if teacher is not None and any("teacher_grid" not in r for _, r in self.records):
            raise ConfigError("alignment is on but some cached samples have no teacher features")

    def _read_index(self, folder: Path) -> dict:
        index = read_index(folder)
        text_encoder, teacher = self.text_encoder, self.teacher
        if text_encoder is not None and not same_source(index.get("text_encoder"), text_encoder):
            raise ConfigError(f"cache {folder} was written with text encoder {index.get('text_encoder')!r}, "
                              f"the config wants {text_encoder!r}")
        if teacher is not None and not same_source(index.get("teacher"), teacher, by_name=True):
            raise ConfigError(f"cache {folder} holds teacher features of {index.get('teacher')!r}, the config "
                              f"wants {teacher!r} (re-run `motif-video cache` with that teacher)")
        for name in ("text_dim", "teacher_dim"):
            mine, theirs = getattr(self, name), index.get(name)
            if theirs is not None and mine is not None and mine != theirs:
                raise ConfigError(f"cache {folder} has {name}={theirs}, other caches have {mine}")
            setattr(self, name, mine if theirs is None else theirs)
        if index.get("empty_prompt") and self._empty is None:
            self._empty = (folder, index["empty_prompt"])
        return index

    def __getitem__(self, i: int) -> dict:
        record, shard, item = self._sample(i)
        key = record["key"]
        item["latents"] = shard.get_tensor(f"{key}.latents").float()
        if "teacher_grid" in record:
            item["teacher"] = shard.get_tensor(f"{key}.teacher").float()
            item["teacher_grid"] = tuple(record["teacher_grid"])
        if record.get("image_tokens"):
            item["image_tokens"] = shard.get_tensor(f"{key}.image_tokens").float()
        if "condition_caption" in record:
            item["condition_text"] = shard.get_tensor(f"{key}.condition_text").float()
        return item

    def empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._empty is None:
            return None
        folder, name = self._empty
        with safe_open(str(folder / name), framework="pt") as f:
            return f.get_tensor("text").float(), f.get_tensor("text_mask").bool()


def collate(items: list[dict]) -> dict:
    shapes = {tuple(it["latents"].shape) for it in items}
    if len(shapes) != 1:
        raise ConfigError(f"a batch mixes latent shapes {sorted(shapes)}: give samples of different sizes different "
                          "bucket keys")
    text, mask = pad_text([it["text"] for it in items], [it["text_mask"] for it in items])
    batch = {
        "latents": torch.stack([it["latents"] for it in items]),  # (B, 16, T', H', W')
        "text": text,
        "text_mask": mask,
        "captions": [it["caption"] for it in items],
        "indices": torch.tensor([it["index"] for it in items]),
    }
    if "teacher" in items[0]:
        batch["teacher"] = torch.stack([it["teacher"] for it in items])  # (B, N_t, D_t)
        batch["teacher_grid"] = items[0]["teacher_grid"]
    if all("image_tokens" in it for it in items):  # (a batch mixing caches with and without: latent + mask only)
        batch["image_tokens"] = torch.stack([it["image_tokens"] for it in items])  # (B, N_i, D_i)
    if any("condition_text" in it for it in items):  # per sample (L_c, D) or None: lengths differ, few are used
        batch["condition_texts"] = [it.get("condition_text") for it in items]
    return batch
