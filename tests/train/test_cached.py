"""The cached-latent format: what the writer stores, what the reader returns, and clear errors for broken caches."""

import json

import pytest
import torch

from motif_video.errors import CheckpointError, ConfigError
from motif_video.train.cached import (CachedLatentDataset, CachedLatentWriter, CachedSample, collate, same_source,
                                      write_cached_samples)


def sample(frames=1, hw=4, length=6, real=4, dim=8, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(length, dtype=torch.bool)
    mask[:real] = True
    return CachedSample(torch.randn(16, frames, hw, hw, generator=gen), torch.randn(length, dim, generator=gen),
                        mask, **kwargs)


def test_roundtrip_trims_padding_and_keys_buckets_in_pixels(tmp_path):
    a, b = sample(caption="an image"), sample(frames=3, hw=6, seed=1, caption="a clip", bucket="9x48x48")
    empty = (torch.randn(2, 8), torch.ones(2))
    write_cached_samples(tmp_path, [a, b], empty_prompt=empty, text_encoder="minilm")
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == "motif-video-latent-cache" and index["text_encoder"] == "minilm"
    assert [s["bucket"] for s in index["samples"]] == ["1x32x32", "9x48x48"]  # (T'-1)*4+1 x 8H' x 8W'
    ds = CachedLatentDataset(tmp_path, text_encoder="minilm")
    first = ds[0]
    assert torch.equal(first["latents"], a.latents)
    assert torch.equal(first["text"], a.text[:4]) and first["text_mask"].all()  # trailing pads dropped
    assert first["caption"] == "an image" and ds.text_dim == 8
    text, mask = ds.empty_prompt()
    assert torch.equal(text, empty[0]) and mask.all()
    batch = collate([ds[0], ds[0]])
    assert batch["latents"].shape == (2, 16, 1, 4, 4) and batch["text"].shape == (2, 4, 8)


def test_appending_and_sharding(tmp_path):
    write_cached_samples(tmp_path, [sample(seed=i) for i in range(3)], shard_bytes=1)  # a shard per sample
    write_cached_samples(tmp_path, [sample(seed=9)])
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index["shards"]) == 4 and len(index["samples"]) == 4
    ds = CachedLatentDataset(tmp_path)
    assert torch.equal(ds[3]["latents"], sample(seed=9).latents)
    assert torch.equal(ds[1]["latents"], sample(seed=1).latents)
    assert len(CachedLatentDataset([tmp_path, tmp_path])) == 8
    assert len(CachedLatentDataset(tmp_path, buckets=["1x32x32"])) == 4


def test_an_interrupted_writer_leaves_the_last_complete_index(tmp_path):
    with pytest.raises(RuntimeError):
        with CachedLatentWriter(tmp_path, shard_bytes=1) as writer:
            writer.add(sample(seed=0))  # flushed: in the index
            writer.add(sample(seed=1))
            raise RuntimeError("killed")
    assert len(CachedLatentDataset(tmp_path)) == 2  # every add flushed at shard_bytes=1


def test_broken_caches_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="is not a latent cache"):
        CachedLatentDataset(tmp_path)
    (tmp_path / "index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="corrupt cache index"):
        CachedLatentDataset(tmp_path)
    write_cached_samples(tmp_path / "a", [sample()])
    (tmp_path / "a" / "shard-00000.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing cache shard"):
        CachedLatentDataset(tmp_path / "a")[0]
    write_cached_samples(tmp_path / "b", [sample(dim=8)])
    write_cached_samples(tmp_path / "c", [sample(dim=6)])
    with pytest.raises(ConfigError, match="text_dim=6, other caches have 8"):
        CachedLatentDataset([tmp_path / "b", tmp_path / "c"])
    with pytest.raises(ConfigError, match="text_dim is 8, a new sample has 6"):
        write_cached_samples(tmp_path / "b", [sample(dim=6)])
    with pytest.raises(ConfigError, match="4k\\+1"):
        write_cached_samples(tmp_path / "d", [sample(bucket="2x32x32")])
    with pytest.raises(ConfigError, match="bucket 5x32x32 does not match latents \\(16, 1, 4, 4\\)"):
        write_cached_samples(tmp_path / "d", [sample(bucket="5x32x32")])
    with pytest.raises(ConfigError, match="teacher features need the teacher's name"):
        write_cached_samples(tmp_path / "e", [sample(teacher=torch.randn(16, 3), teacher_grid=(1, 4, 4))])
    with pytest.raises(ConfigError, match="holds teacher features of None"):
        CachedLatentDataset(tmp_path / "b", teacher="dinov2")
    write_cached_samples(tmp_path / "f", [sample(), sample(hw=6)])
    ds = CachedLatentDataset(tmp_path / "f")
    with pytest.raises(ConfigError, match="batch mixes latent shapes"):
        collate([ds[0], ds[1]])


def test_source_names_match_by_string_folder_or_name(tmp_path):
    (tmp_path / "dinov2-base").mkdir()
    assert same_source("facebook/dinov2-base", "dinov2-base", by_name=True)
    assert same_source(str(tmp_path / "dinov2-base"), "dinov2-base", by_name=True)
    assert not same_source("facebook/dinov2-base", "dinov2-large", by_name=True)
    assert not same_source("/models/a/text_encoder", "/models/b/text_encoder")
    assert same_source(str(tmp_path / "dinov2-base"), str(tmp_path / "." / "dinov2-base"))
    assert not same_source(None, "x")


def test_source_keys_skip_what_is_cached_and_parts_merge(tmp_path):
    from motif_video.train.cached import merge_parts, sample_key

    a, b = sample(seed=1, source="a.mp4"), sample(seed=2, source="b.png")
    write_cached_samples(tmp_path, [a, b])
    write_cached_samples(tmp_path, [sample(seed=3, source="a.mp4"), b])  # the same clips again: nothing added
    index = json.loads((tmp_path / "index.json").read_text())
    assert [r["key"] for r in index["samples"]] == [sample_key("a.mp4", "1x32x32"), sample_key("b.png", "1x32x32")]
    assert len(index["shards"]) == 1
    assert torch.equal(CachedLatentDataset(tmp_path)[0]["latents"], a.latents)  # the first copy is kept

    # two part writers (two processes) add to it; the merge keeps one index, sorted by source
    for part, names in (("0002-00000", ["d.mp4", "a.mp4"]), ("0002-00001", ["c.mp4"])):
        with CachedLatentWriter(tmp_path, part=part, keyed_by_source=True, shard_bytes=1) as writer:
            added = [writer.add(sample(seed=len(n), source=n)) for n in names]
        assert added == [n != "a.mp4" for n in names]
    assert json.loads((tmp_path / "index.json").read_text()) == index  # parts never touch index.json
    (tmp_path / "shard-0001-00000-00000.safetensors").write_bytes(b"written, never indexed")
    merged = merge_parts(tmp_path, remove_orphans=True)
    assert [r["source"] for r in merged["samples"]] == ["a.mp4", "b.png", "c.mp4", "d.mp4"]
    assert not list(tmp_path.glob("index-*.json")) and not (tmp_path / "shard-0001-00000-00000.safetensors").exists()
    assert len(CachedLatentDataset(tmp_path)) == 4
    with pytest.raises(ConfigError, match="needs each sample's source"):
        CachedLatentWriter(tmp_path, part="0003-00000").add(sample())
