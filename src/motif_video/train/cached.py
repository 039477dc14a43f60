"""Cached training data: VAE latents and text-encoder states computed once, read many times.

Training at scale never runs the VAE or the text encoder: `motif-video cache` encodes every clip once and writes

    <folder>/index.json                 format, version, text_encoder, teacher, dims, one record per sample
    <folder>/shard-00000.safetensors    per sample `<key>.latents` (16, T', H', W') normalised VAE latents,
                                        `<key>.text` (L, D) text states, `<key>.text_mask` (L,) uint8,
                                        optional `<key>.teacher` (N_t, D_t) frozen REPA teacher features
    <folder>/empty_prompt.safetensors   optional `text` (L, D) + `text_mask` (L,) of the empty prompt (CFG dropout)

Images are 1-frame clips (T' = 1). Each record carries its pixel bucket key "FRAMESxHEIGHTxWIDTH" (as
`train.buckets.Bucket`; by default derived from the latent shape): samples that share one have the same latent
shape, so a batch drawn from one bucket stacks without padding.
"""

from __future__ import annotations

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
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
FORMAT = "motif-video-latent-cache"
VERSION = 1


@dataclass
class CachedSample:
    latents: torch.Tensor  # (16, T', H', W'), already (z - mean) / std normalised
    text: torch.Tensor  # (L, D)
    text_mask: torch.Tensor | None = None  # (L,), 1 = real token; None: all real
    caption: str = ""
    bucket: str | None = None  # checked against the latent shape, from which it is derived when None
    teacher: torch.Tensor | None = None  # (N_t, D_t) REPA teacher patch features
    teacher_grid: tuple[int, int, int] | None = None  # the teacher tokens' (t, h, w) layout


def default_bucket(latent_shape) -> str:
    """The pixel bucket "FRAMESxHEIGHTxWIDTH" (train.buckets format) of a Wan-VAE latent (C, T', H', W')."""
    return "x".join(str(n) for n in pixel_shape(*(int(s) for s in latent_shape[1:])))


def _fsync_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CachedLatentWriter:
    """Appends samples to a cache folder in shards of about `shard_bytes`; `close()` writes the index atomically,
    so a cache interrupted mid-write still reads as its last complete index."""

    def __init__(self, folder: str | Path, *, text_encoder: str | None = None, teacher: str | None = None,
                 shard_bytes: int = 1 << 30, trim_text_padding: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.trim_text_padding = trim_text_padding
        index_path = self.folder / INDEX_NAME
        if index_path.is_file():
            self.index = read_index(self.folder)
            for name, value in (("text_encoder", text_encoder), ("teacher", teacher)):
                if value is not None and self.index.get(name) not in (None, value):
                    raise ConfigError(f"cache {self.folder} holds {name}={self.index[name]!r}, not {value!r}")
                if value is not None:
                    self.index[name] = value
        else:
            self.index = {"format": FORMAT, "version": VERSION, "text_encoder": text_encoder, "teacher": teacher,
                          "latent_channels": None, "text_dim": None, "teacher_dim": None, "empty_prompt": None,
                          "shards": [], "samples": []}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_records: list[dict] = []
        self._pending_bytes = 0

    def _check_dim(self, name: str, value: int) -> None:
        if self.index[name] is None:
            self.index[name] = int(value)
        elif self.index[name] != value:
            raise ConfigError(f"cache {self.folder}: {name} is {self.index[name]}, a new sample has {value}")

    def add(self, sample: CachedSample) -> None:
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
        self._check_dim("latent_channels", latents.shape[0])
        self._check_dim("text_dim", text.shape[1])
        bucket = default_bucket(latents.shape)
        if sample.bucket is not None and str(Bucket.parse(sample.bucket)) != bucket:
            # Batches are drawn per bucket and stacked: a key that lies about the shape would break a batch later.
            raise ConfigError(f"bucket {sample.bucket} does not match latents {tuple(latents.shape)} (that is {bucket} "
                              "with the Wan VAE's 4x temporal, 8x spatial compression)")
        key = f"s{len(self.index['samples']) + len(self._pending_records):08d}"
        record = {"key": key, "caption": sample.caption, "bucket": bucket,
                  "latent_shape": list(latents.shape), "text_len": int(text.shape[0])}
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
        for name, t in tensors.items():
            t = t.detach().cpu().contiguous()
            self._pending[name] = t
            self._pending_bytes += t.numel() * t.element_size()
        self._pending_records.append(record)
        if self._pending_bytes >= self.shard_bytes:
            self._flush()

    def set_empty_prompt(self, text: torch.Tensor, text_mask: torch.Tensor | None = None) -> None:
        """The empty prompt's encoder states: what CFG dropout trains with (and what the sampler feeds as 'uncond')."""
        mask = torch.ones(text.shape[0], dtype=torch.uint8) if text_mask is None else text_mask.to(torch.uint8)
        self._check_dim("text_dim", text.shape[1])
        path = self.folder / EMPTY_PROMPT_NAME
        tmp = path.with_name(path.name + ".tmp")
        save_file({"text": text.detach().cpu().contiguous(), "text_mask": mask.cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)
        self.index["empty_prompt"] = EMPTY_PROMPT_NAME

    def _flush(self) -> None:
        if not self._pending_records:
            return
        name = f"shard-{len(self.index['shards']):05d}.safetensors"
        tmp = self.folder / (name + ".tmp")
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        for record in self._pending_records:
            record["shard"] = name
        self.index["shards"].append(name)
        self.index["samples"].extend(self._pending_records)
        self._pending, self._pending_records, self._pending_bytes = {}, [], 0
        _fsync_write_json(self.folder / INDEX_NAME, self.index)

    def close(self) -> Path:
        self._flush()
        if not (self.folder / INDEX_NAME).is_file():
            _fsync_write_json(self.folder / INDEX_NAME, self.index)
        return self.folder

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()


def write_cached_samples(folder: str | Path, samples: Iterable[CachedSample], *, empty_prompt=None,
                         text_encoder: str | None = None, teacher: str | None = None,
                         shard_bytes: int = 1 << 30) -> Path:
    """Write (or append) samples to a cache folder; `empty_prompt`: (text (L, D), mask (L,)) or None."""
    with CachedLatentWriter(folder, text_encoder=text_encoder, teacher=teacher, shard_bytes=shard_bytes) as writer:
        for sample in samples:
            writer.add(sample)
        if empty_prompt is not None:
            writer.set_empty_prompt(*empty_prompt)
    return Path(folder)


def read_index(folder: Path) -> dict:
    path = folder / INDEX_NAME
    if not path.is_file():
        raise ConfigError(f"{folder} is not a latent cache: it has no {INDEX_NAME} "
                          "(write one with `motif-video cache`)")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt cache index {path}: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a motif-video latent cache index")
    if index.get("version") != VERSION:
        raise CheckpointError(f"{path} has cache format version {index.get('version')}; this reader needs {VERSION}")
    return index


# -- reading -------------------------------------------------------------------------------------------------------
def same_source(recorded: str | None, wanted: str, by_name: bool = False) -> bool:
    """Whether the model a cache records (a name, hub id or folder path) is the one a config names: the same
    string, the same folder, or (`by_name`) the same last path component, e.g. `dinov2-base` for
    `/models/dinov2-base` or `facebook/dinov2-base`."""
    if recorded is None:
        return False
    if recorded == wanted:
        return True
    a, b = Path(recorded).expanduser(), Path(wanted).expanduser()
    if a.exists() and b.exists() and a.resolve() == b.resolve():
        return True
    return by_name and a.name == b.name


class CachedLatentDataset(torch.utils.data.Dataset):
    """Samples of one or more cache folders; item i -> dict of float32 tensors + caption + bucket."""

    def __init__(self, folders: list[str | Path] | str | Path, *, buckets: list[str] | None = None,
                 text_encoder: str | None = None, teacher: str | None = None):
        folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
        if not folders:
            raise ConfigError("no cache folders given")
        self.records: list[tuple[Path, dict]] = []
        self.text_dim = self.teacher_dim = None
        self._empty: tuple[Path, str] | None = None
        for folder in map(Path, folders):
            index = read_index(folder)
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
            for record in index["samples"]:
                if buckets is None or record["bucket"] in buckets:
                    self.records.append((folder, record))
        if teacher is not None and any("teacher_grid" not in r for _, r in self.records):
            raise ConfigError("alignment is on but some cached samples have no teacher features")
        if not self.records:
            raise ConfigError(f"no cached samples in {', '.join(map(str, folders))}"
                              + (f" for buckets {buckets}" if buckets else ""))
        self._handles: dict[Path, object] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def bucket_keys(self) -> list[str]:
        return [r["bucket"] for _, r in self.records]


    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            if not path.is_file():
                raise CheckpointError(f"missing cache shard {path} (named in its index.json)")
            try:
                handle = self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"corrupt cache shard {path}: {str(e).splitlines()[0]}") from None
        return handle

    def __getstate__(self):  # DataLoader workers reopen their own file handles
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __getitem__(self, i: int) -> dict:
        folder, record = self.records[i]
        shard = self._open(folder / record["shard"])
        key = record["key"]
        item = {
            "latents": shard.get_tensor(f"{key}.latents").float(),
            "text": shard.get_tensor(f"{key}.text").float(),
            "text_mask": shard.get_tensor(f"{key}.text_mask").bool(),
            "caption": record["caption"],
            "bucket": record["bucket"],
            "index": i,
        }
        if "teacher_grid" in record:
            item["teacher"] = shard.get_tensor(f"{key}.teacher").float()
            item["teacher_grid"] = tuple(record["teacher_grid"])
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
    return batch
