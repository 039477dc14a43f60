"""Training clip sources, frame sampling and decoding, on tiny clips written with PyAV here."""

import json
import logging
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from motif_video.errors import ConfigError, MotifVideoError
from motif_video.train.buckets import Bucket, BucketSet
from motif_video.train.data import (
    ClipDataset,
    collate_clips,
    frame_indices,
    read_metadata,
    resize_center_crop,
    scan_folder,
)

LEVEL_STEP = 10  # frame i is a flat grey of level 10 * i: far enough apart to survive MPEG-4 coding


def write_clip(path, num_frames, fps=30, height=32, width=32):
    """A clip whose frame i is flat grey 10 * i, encoded with PyAV (MPEG-4 part 2, near-lossless)."""
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=Fraction(fps))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"qscale": "1"}
    for i in range(num_frames):
        frame = np.full((height, width, 3), LEVEL_STEP * i, np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
    container.close()


def frame_numbers(pixels: torch.Tensor) -> list[int]:
    """Which source frame each output frame of a (3, T, H, W) [-1, 1] tensor shows, read back from its grey level."""
    levels = (pixels + 1) * 127.5
    return [round(float(levels[:, t].mean()) / LEVEL_STEP) for t in range(pixels.shape[1])]


BUCKETS = BucketSet([Bucket(1, 32, 32), Bucket(5, 32, 32), Bucket(9, 32, 48), Bucket(9, 32, 32)])


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "clips"
    (root / "sub").mkdir(parents=True)
    write_clip(root / "square.mp4", 20, fps=30)
    write_clip(root / "sub" / "wide.mp4", 24, fps=24, height=32, width=48)
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(root / "still.png")
    for name, caption in [("square", "a grey square"), ("sub/wide", "a wide clip"), ("still", "a still image")]:
        (root / f"{name}.txt").write_text(caption + "\n")
    return root


def nearest_frames(num_frames, source_fps, target_fps, start):
    """Independent reference: for output time i / target_fps, the source frame nearest in time (later on a tie).

    Exact fractions: at 30 -> 24 fps every other output time falls exactly halfway between two source frames.
    """
    out = []
    for i in range(num_frames):
        t = Fraction(i, target_fps)
        j = min(range(start, start + 10 * num_frames), key=lambda j: (abs(Fraction(j - start, source_fps) - t), -j))
        out.append(j)
    return out


@pytest.mark.parametrize("source_fps,target_fps", [(30, 15), (24, 16), (30, 24), (25, 25), (12, 24)])
def test_frame_indices_match_nearest_in_time(source_fps, target_fps):
    got = frame_indices(200, 9, source_fps, target_fps, start=3)
    assert got == nearest_frames(9, source_fps, target_fps, 3)


def test_frame_indices_random_start_stays_inside_and_is_seeded():
    starts = set()
    for seed in range(400):
        idx = frame_indices(40, 9, 30, 15, rng=np.random.default_rng(seed))
        assert idx == frame_indices(40, 9, 30, 15, rng=np.random.default_rng(seed))
        assert 0 <= idx[0] and idx[-1] <= 39
        starts.add(idx[0])
    assert starts == set(range(0, 40 - 17 + 1))  # 9 frames at stride 2 span 17 source frames
    with pytest.raises(MotifVideoError, match="need 17 source frames"):
        frame_indices(16, 9, 30, 15)
    with pytest.raises(MotifVideoError, match="outside"):
        frame_indices(40, 9, 30, 15, start=30)


def test_folder_dataset_buckets_and_decoded_frames(folder):
    ds = ClipDataset.from_folder(folder, BUCKETS, fps=15)
    names = [c.path.name for c in ds.clips]
    assert names == ["square.mp4", "still.png", "wide.mp4"]
    # square: 20 frames at 30 fps -> 15 fps is stride 2; 9 frames need 17 source frames -> 9x32x32.
    # wide: 24 frames at 24 fps -> stride 1.6, 9 frames need 14 -> nearest aspect 9x32x48. still: the image bucket.
    assert [str(ds.buckets[b]) for b in ds.bucket_of] == ["9x32x32", "1x32x32", "9x32x48"]
    assert ds.num_skipped == 0
    assert ds.bucket_counts() == {Bucket(1, 32, 32): 1, Bucket(9, 32, 32): 1, Bucket(9, 32, 48): 1}

    item = ds.load(0, start=2)
    assert item["pixels"].shape == (3, 9, 32, 32) and item["pixels"].dtype == torch.float32
    assert item["caption"] == "a grey square"
    assert frame_numbers(item["pixels"]) == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    wide = ds.load(2, start=0)["pixels"]
    assert wide.shape == (3, 9, 32, 48)
    assert frame_numbers(wide) == nearest_frames(9, 24, 15, 0)
    still = ds[1]["pixels"]
    assert still.shape == (3, 1, 32, 32)
    assert torch.allclose(still, torch.full_like(still, 200 / 127.5 - 1), atol=1e-5)

    # Random windows: seeded by (seed, epoch, index), so the same epoch decodes the same frames.
    first = frame_numbers(ds[0]["pixels"])
    assert first == frame_numbers(ds[0]["pixels"])
    assert first[0] in (0, 1, 2, 3) and np.all(np.diff(first) == 2)
    windows = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        windows.add(frame_numbers(ds[0]["pixels"])[0])
    assert len(windows) > 1

    batch = collate_clips([ds[0]])
    assert batch["pixels"].shape == (1, 3, 9, 32, 32) and batch["captions"] == ["a grey square"]
    with pytest.raises(MotifVideoError, match="one bucket"):
        collate_clips([ds[0], ds[1]])


def test_csv_and_jsonl_metadata(folder, tmp_path):
    meta_dir = folder  # paths are relative to the metadata file
    (meta_dir / "meta.csv").write_text(
        "path,caption,fps\nsquare.mp4,\"a grey, square\",\nsub/wide.mp4,a wide clip,24\nstill.png,a still,\n"
    )
    ds_csv = ClipDataset.from_metadata(meta_dir / "meta.csv", BUCKETS, fps=15)
    assert [c.caption for c in ds_csv.clips] == ["a grey, square", "a wide clip", "a still"]
    assert [str(ds_csv.buckets[b]) for b in ds_csv.bucket_of] == ["9x32x32", "9x32x48", "1x32x32"]
    assert frame_numbers(ds_csv.load(0, start=1)["pixels"]) == [1, 3, 5, 7, 9, 11, 13, 15, 17]

    # JSONL with the shape fields given: no file is probed, so the metadata's (smaller) frame count is believed.
    rows = [
        {"path": str(folder / "square.mp4"), "caption": "abs path", "fps": 30, "num_frames": 12, "height": 32,
         "width": 32},
        {"path": "sub/wide.mp4", "caption": "wide", "condition_caption": " moving left "},
        {"path": "still.png", "caption": "an image", "num_frames": 9, "height": 40, "width": 40},
    ]
    (meta_dir / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    clips = read_metadata(meta_dir / "meta.jsonl")
    assert clips[0].num_frames == 12 and clips[0].is_probed and not clips[1].is_probed
    assert [c.condition_caption for c in clips] == [None, "moving left", None]
    assert [c.condition_caption for c in ds_csv.clips] == [None] * 3
    ds_jsonl = ClipDataset.from_metadata(meta_dir / "meta.jsonl", BUCKETS, fps=15)
    assert [str(ds_jsonl.buckets[b]) for b in ds_jsonl.bucket_of] == ["5x32x32", "9x32x48", "1x32x32"]
    assert ds_jsonl.clips[1].fps == 24 and ds_jsonl.clips[1].num_frames == 24  # probed

    (meta_dir / "bad.jsonl").write_text('{"path": "square.mp4", "caption": "x", "fps": "fast"}\n')
    with pytest.raises(MotifVideoError, match="bad.jsonl:1: fps='fast' is not a number"):
        read_metadata(meta_dir / "bad.jsonl")
    (meta_dir / "nocol.csv").write_text("file,caption\nsquare.mp4,x\n")
    with pytest.raises(MotifVideoError, match="lacks column"):
        read_metadata(meta_dir / "nocol.csv")


def test_missing_caption_names_the_file(folder, tmp_path):
    (folder / "sub" / "wide.txt").unlink()
    with pytest.raises(MotifVideoError, match=r"wide\.txt.*wide\.mp4 is missing"):
        scan_folder(folder)
    (tmp_path / "m.csv").write_text("path,caption\nclips/square.mp4,ok\nclips/still.png,\n")
    with pytest.raises(MotifVideoError, match=r"m\.csv:3: clip .*still\.png has no caption"):
        read_metadata(tmp_path / "m.csv")


def test_unreadable_and_empty_clips_are_skipped_and_counted(folder, caplog):
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "empty.txt").write_text("nothing")
    (folder / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (folder / "garbage.txt").write_text("noise")
    with caplog.at_level(logging.WARNING):
        ds = ClipDataset.from_folder(folder, BUCKETS, fps=15)
    assert len(ds) == 3 and ds.num_skipped == 2
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in ds.skipped) == ["empty.mp4", "garbage.mp4"]
    assert "skipping" in caplog.text and "garbage.mp4" in caplog.text


def test_decode_failure_during_training_substitutes_same_bucket(folder, caplog):
    # The metadata claims a good shape for a broken file, so it is only found out when decoded.
    (folder / "broken.mp4").write_bytes(b"\x00" * 500)
    write_clip(folder / "other.mp4", 20, fps=30)
    rows = [
        {"path": "broken.mp4", "caption": "b", "fps": 30, "num_frames": 20, "height": 32, "width": 32},
        {"path": "other.mp4", "caption": "o", "fps": 30, "num_frames": 20, "height": 32, "width": 32},
    ]
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = ClipDataset.from_metadata(folder / "m.jsonl", BUCKETS, fps=15)
    assert ds.num_skipped == 0 and ds.bucket_of[0] == ds.bucket_of[1]
    with caplog.at_level(logging.WARNING):
        item = ds[0]
    assert item["index"] == 1 and item["caption"] == "o" and item["pixels"].shape == (3, 9, 32, 32)
    assert ds.num_skipped == 1 and "broken.mp4" in ds.skipped[0][0]
    assert ds[0]["index"] == 1 and ds.num_skipped == 1  # a known-bad clip is not retried


def test_no_bucket_can_hold_the_dataset(tmp_path):
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "a.mp4", "caption": "short", "fps": 30, "num_frames": 6, "height": 32, "width": 32})
    )
    with pytest.raises(ConfigError, match="no bucket.*too short at 15 fps"):
        ClipDataset.from_metadata(tmp_path / "m.jsonl", BucketSet([Bucket(9, 32, 32)]), fps=15)
    with pytest.raises(ConfigError, match="too short at the source frame rate"):
        ClipDataset.from_metadata(tmp_path / "m.jsonl", BucketSet([Bucket(9, 32, 32)]))


def test_resize_center_crop_matches_pil_and_slices():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 32, 64, 3), dtype=np.uint8)
    out = resize_center_crop(frames, 32, 32)  # no scaling needed: a pure centre crop
    assert out.shape == (3, 2, 32, 32)
    expected = torch.from_numpy(frames[:, :, 16:48]).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert torch.equal(out, expected)

    big = rng.integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)
    out = resize_center_crop(big, 32, 32)  # scale 1/2 to 32x48, then crop columns 8..40
    ref = np.asarray(Image.fromarray(big[0]).resize((48, 32), Image.BILINEAR))[:, 8:40]
    got = ((out[:, 0].permute(1, 2, 0) + 1) * 127.5).numpy()
    assert np.abs(got - ref).max() <= 1.01
    assert out.min() >= -1 and out.max() <= 1


def test_dataloader_batches_one_bucket_at_a_time(folder):
    from torch.utils.data import DataLoader

    from motif_video.train.buckets import BucketBatchSampler
    from motif_video.train.planner import PlannedBatchSampler, plan_shards

    write_clip(folder / "square2.mp4", 18, fps=30)
    (folder / "square2.txt").write_text("another square")
    ds = ClipDataset.from_folder(folder, BUCKETS, fps=15)
    sampler = BucketBatchSampler(ds.bucket_of, ds.buckets, batch_size=2, interleave="I-V-V", seed=0)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_clips))
    shapes = sorted(tuple(b["pixels"].shape) for b in batches)
    assert shapes == [(1, 3, 1, 32, 32), (1, 3, 9, 32, 48), (2, 3, 9, 32, 32)]
    assert sorted(i for b in batches for i in b["indices"].tolist()) == list(range(len(ds)))

    plan = plan_shards(ds.bucket_counts(), world_size=2, max_tokens_per_rank=64)
    for rank in range(2):
        planned = PlannedBatchSampler(plan, ds.bucket_of, ds.buckets, rank=rank)
        for batch in DataLoader(ds, batch_sampler=planned, collate_fn=collate_clips):
            assert batch["bucket"].latent_tokens * len(batch["captions"]) <= 64
