"""Clips streamed from WebDataset-style tar shards, local or remote (any fsspec URL: `s3://`, `gs://`, `https://`).

A corpus of millions of clips is better kept as a few thousand tar files than as millions of small files. Each
shard holds samples as consecutive members that share a key, the member name up to the first dot of its base name
(the WebDataset convention):

    city/tram.mp4    the clip (any video or image extension `train.data` reads), or frames `city/tram.0000.png`,
                     `city/tram.0001.png`, ... (PNG or JPEG, numbered in order)
    city/tram.txt    its caption (or a "caption" field in the JSON)
    city/tram.json   optional metadata: fps, num_frames, height, width (as the CSV/JSONL columns)
    city/tram.condition.txt   optional condition caption (or a "condition_caption" field in the JSON)

A clip's identity is its member name (`city/tram.mp4`), the same as its path in the folder the shard was made from
(`tar --sort=name -cf shard-00000.tar -C folder .`), so a shard set and its folder give the same cached samples.
Members are extracted one sample at a time into a work folder, decoded exactly as files of a folder are, and
deleted once encoded. A sample without a caption or media, or a shard that cannot be read, is logged and skipped:
a stream of millions never stops for one bad entry.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path
from typing import Iterator

import fsspec
from braceexpand import braceexpand
from PIL import Image

from ..errors import ConfigError, MotifVideoError
from ..pipeline.video_io import FOLDER_META
from ..records import JSONL_SUFFIXES
from .data import MEDIA_EXTENSIONS, Clip, clip_numbers

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_shard_spec(data: str) -> bool:
    """Whether a dataset argument names tar shards: a URL, or a path (brace ranges and globs allowed) to `.tar`."""
    data = str(data)
    return "://" in data or data.lower().endswith(SHARD_SUFFIXES)


def shard_urls(spec: str) -> list[str]:
    """The shards a spec names, in order: brace ranges (`shard-{00000..00099}.tar`) expand, globs (`*.tar`) match
    (locally or on the remote filesystem); local shards are checked to exist before any work starts."""
    urls: list[str] = []
    for pattern in braceexpand(str(spec)):
        if any(c in pattern for c in "*?["):
            try:
                fs, _, paths = fsspec.get_fs_token_paths(pattern)
            except (ValueError, ImportError, OSError) as e:
                raise ConfigError(f"cannot list tar shards {pattern}: {e}") from None
            if not paths:
                raise ConfigError(f"no tar shards match {pattern}")
            protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
            urls += sorted(p if protocol == "file" else f"{protocol}://{p}" for p in paths)
        else:
            urls.append(pattern)
    for protocol in sorted({url.partition("://")[0] for url in urls if "://" in url}):
        try:
            fsspec.get_filesystem_class(protocol)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"cannot read {protocol}:// shards: {str(e).splitlines()[0]}") from None
    for url in urls:
        if not url.lower().endswith(SHARD_SUFFIXES):
            raise ConfigError(f"{url} is not a tar shard (names end in {', '.join(SHARD_SUFFIXES)})")
        if "://" not in url and not Path(url).exists():
            raise ConfigError(f"tar shard {url} does not exist")
    if not urls:
        raise ConfigError(f"{spec} names no tar shards")
    return urls


def _split(name: str) -> tuple[str, str]:
    """'./city/tram.0001.png' -> ('city/tram', '0001.png'): the WebDataset key and the member's field."""
    name = name[2:] if name.startswith("./") else name
    folder, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field


def _members(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) of each sample in one shard, streaming it once from start to end."""
    # Local shards are opened directly (a named pipe streams too); anything else through fsspec.
    if "://" not in url:
        opened = open(url, "rb")
    elif url.startswith(("http://", "https://")):
        opened = fsspec.open(url, "rb", block_size=0)  # a plain stream: no range requests, any web server serves it
    else:
        opened = fsspec.open(url, "rb")
    with opened as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        key, fields = None, {}
        for member in tar:
            if not member.isfile():
                continue
            name_key, field = _split(member.name)
            if not field or name_key.rpartition("/")[2].startswith("."):
                continue  # hidden files and extensionless members are not sample fields
            if name_key != key:
                if key is not None:
                    yield key, fields
                key, fields = name_key, {}
            fields[field] = tar.extractfile(member).read()
        if key is not None:
            yield key, fields


def _text_field(fields: dict[str, bytes], member: str, meta: dict, key: str) -> str:
    """A sample's text from its `member` (e.g. "txt"), else the JSON metadata's `key`; stripped, "" when neither."""
    data = next((data for f, data in fields.items() if f.lower() == member), None)
    return (data.decode("utf-8", "replace") if data is not None else str(meta.get(key) or "")).strip()


class TarShardSource:
    """The clips of a set of tar shards; `clips(rank, world)` streams every world-th shard from the rank-th."""

    def __init__(self, spec: str, workdir: str | Path, limit: int | None = None):
        self.urls = shard_urls(spec)
        self.workdir = Path(workdir)
        self.limit = limit
        self.skipped: list[tuple[str, str]] = []  # (shard or sample, reason)
        self._count = 0

    def __len__(self) -> int:
        return len(self.urls)

    def _skip(self, what: str, reason: str) -> None:
        self.skipped.append((what, reason))
        log.warning("skipping %s: %s", what, reason)

    def clips(self, rank: int = 0, world: int = 1) -> Iterator[Clip]:
        yielded = 0
        for url in self.urls[rank::world]:
            try:
                for key, fields in _members(url):
                    clip = self._clip(url, key, fields)
                    if clip is not None:
                        yield clip
                        yielded += 1
                        if self.limit is not None and yielded >= self.limit:
                            return
            except Exception as e:  # noqa: BLE001 - archive, filesystem and network faults of whichever library
                # A truncated or unreachable shard loses what follows the fault, not the run.
                reason = str(e).splitlines()[0] if str(e) else ""
                self._skip(url, f"cannot read the shard ({type(e).__name__}: {reason})")

    def _clip(self, url: str, key: str, fields: dict[str, bytes]) -> Clip | None:
        where = f"{url}:{key}"
        try:
            raw = next((data for f, data in fields.items() if f.lower() == "json"), None)
            meta = json.loads(raw) if raw is not None else {}
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            self._skip(where, f"bad JSON metadata: {e}")
            return None
        caption = _text_field(fields, "txt", meta, "caption")
        if not caption:
            self._skip(where, "no caption (.txt or a JSON 'caption')")
            return None
        media = [f for f in fields if "." + f.lower() in MEDIA_EXTENSIONS]
        frames = sorted((f for f in fields if f.partition(".")[0].isdigit()
                         and "." + f.partition(".")[2].lower() in _FRAME_SUFFIXES),
                        key=lambda f: int(f.partition(".")[0]))
        if len(media) + bool(frames) != 1:
            found = ", ".join(sorted(fields)) or "nothing"
            self._skip(where, f"needs exactly one clip, image or frame sequence; it has {found}")
            return None
        try:
            numbers = clip_numbers(meta, where)
        except MotifVideoError as e:
            self._skip(where, str(e).removeprefix(where + ": "))
            return None
        self._count += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        if media:
            path = self.workdir / f"{self._count:09d}.{media[0]}"
            path.write_bytes(fields[media[0]])
            source = f"{key}.{media[0]}"
        else:
            path = self.workdir / f"{self._count:09d}"
            path.mkdir()
            try:
                for i, f in enumerate(frames):
                    # The frame-folder reader takes PNG: JPEG frames are decoded once and stored losslessly.
                    with Image.open(io.BytesIO(fields[f])) as im:
                        im.convert("RGB").save(path / f"{i:06d}.png", compress_level=1)
            except OSError as e:
                shutil.rmtree(path)
                self._skip(where, f"cannot read frame: {e}")
                return None
            if "fps" in numbers:
                (path / FOLDER_META).write_text(json.dumps({"fps": numbers["fps"]}))
            source = key
        condition = _text_field(fields, "condition.txt", meta, "condition_caption") or None
        return Clip(path, caption, source=source, condition_caption=condition, **numbers)

    def release(self, clip: Clip) -> None:
        """Delete a clip's extracted files once it is encoded or skipped."""
        if clip.path.parent != self.workdir:
            return
        if clip.path.is_dir():
            shutil.rmtree(clip.path, ignore_errors=True)
        else:
            clip.path.unlink(missing_ok=True)


class FileSource:
    """Clips that are files already (a folder or a CSV/JSONL listing); `clips(rank, world)`: every world-th clip."""

    def __init__(self, clips: list[Clip], limit: int | None = None):
        self.all = clips[:limit] if limit is not None else clips
        self.skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return len(self.all)

    def clips(self, rank: int = 0, world: int = 1) -> Iterator[Clip]:
        return iter(self.all[rank::world])

    def release(self, clip: Clip) -> None:
        pass


def open_source(data, workdir: str | Path, limit: int | None = None) -> FileSource | TarShardSource:
    """The clip source a dataset argument names: tar shards (`is_shard_spec`), a CSV/JSONL file, or a folder."""
    from .data import read_metadata, scan_folder

    if is_shard_spec(data):
        return TarShardSource(str(data), workdir, limit)
    path = Path(data)
    if path.suffix.lower() == ".csv" or path.suffix.lower() in JSONL_SUFFIXES:
        return FileSource(read_metadata(path), limit)
    return FileSource(scan_folder(path), limit)


__all__ = ["FileSource", "TarShardSource", "is_shard_spec", "open_source", "shard_urls"]
