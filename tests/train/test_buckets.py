"""Buckets, bucket assignment, and the resumable one-bucket-per-batch sampler."""

import numpy as np
import pytest

from motif_video.errors import ConfigError
from motif_video.train.buckets import Bucket, BucketBatchSampler, BucketSet, parse_interleave

PAPER_FRAMES = (1, 33, 65, 121)


def test_bucket_validation():
    assert Bucket(121, 736, 1280).latent_tokens == 31 * 46 * 80  # SPEC: 114,080 video tokens at 1280x736x121
    assert Bucket(1, 16, 32).latent_tokens == 2
    assert Bucket.parse("33x480x848") == Bucket(33, 480, 848)
    for bad in [(32, 480, 848), (0, 480, 848), (33, 470, 848), (33, 480, 850), (33, 0, 848)]:
        with pytest.raises(ConfigError):
            Bucket(*bad)
    with pytest.raises(ConfigError, match="4k\\+1"):
        BucketSet.from_grid([1, 30], ["16:9"], 480)
    with pytest.raises(ConfigError, match="empty"):
        BucketSet([])
    with pytest.raises(ConfigError, match="empty"):
        BucketSet.from_grid(PAPER_FRAMES, [], 480)
    with pytest.raises(ConfigError, match="aspect"):
        BucketSet.from_grid([1], ["0:9"], 480)
    with pytest.raises(ConfigError, match="not FRAMESxHEIGHTxWIDTH"):
        Bucket.parse("33x480")
    with pytest.raises(ConfigError, match="frame count 65"):
        BucketSet.from_grid([1, 65], ["1:1"], {1: 480})


def test_grid_sizes_keep_the_area_and_snap_to_16():
    bs = BucketSet.from_grid(PAPER_FRAMES, ["16:9", "1:1", "9:16"], 720)
    assert len(bs) == 12
    sizes = {(b.height, b.width) for b in bs}
    assert sizes == {(720, 1280), (960, 960), (1280, 720)}
    for b in BucketSet.from_grid([1], ["16:9", "4:3", "1:1", "3:4", "9:16", 2.35], 480):
        assert b.height % 16 == 0 and b.width % 16 == 0
        assert abs(b.height * b.width / (480 * 480 * 16 / 9) - 1) < 0.06
    stage5 = BucketSet.from_grid([1, 65], ["16:9"], {1: 480, 65: 368})
    assert {str(b) for b in stage5} == {"1x480x848", "65x368x656"}


def test_assignment_prefers_longest_fill_then_nearest_aspect():
    bs = BucketSet.from_grid(PAPER_FRAMES, ["16:9", "1:1", "9:16"], 480)

    def assigned(frames, h, w, fps=None, target=None):
        i = bs.assign(frames, h, w, fps, target)
        return None if i is None else str(bs[i])

    # 150 frames at 30 fps resampled to 24 fps: 121 frames need floor(120 * 1.25 + 0.5) + 1 = 151 > 150 -> 65.
    assert assigned(150, 1080, 1920, 30, 24) == "65x480x848"
    assert assigned(151, 1080, 1920, 30, 24) == "121x480x848"
    assert assigned(121, 1080, 1920) == "121x480x848"
    assert assigned(200, 1920, 1080, 24, 24) == "121x848x480"
    assert assigned(40, 500, 520, 24, 24) == "33x640x640"
    assert assigned(1, 4000, 5000) == "1x640x640"  # 5:4 photo: 1:1 is nearer than 16:9 in log aspect
    assert assigned(1, 2000, 4000) == "1x480x848"
    assert assigned(20, 720, 1280, 24, 24) == "1x480x848"  # too short for any video bucket: used as an image
    assert assigned(0, 720, 1280) is None
    videos_only = BucketSet.from_grid([33], ["16:9"], 480)
    assert videos_only.assign(20, 720, 1280, 24, 24) is None
    # Upsampling the rate repeats frames: a 12 fps clip needs only ~half as many frames for a 24 fps bucket.
    assert videos_only.assign(17, 720, 1280, 12, 24) is not None


def make_layout(seed=0, counts=None):
    """Per-sample bucket ids for a mixed image/video bucket set."""
    bs = BucketSet.from_grid([1, 33], ["16:9", "1:1"], 144)
    counts = counts or {0: 23, 1: 9, 2: 17, 3: 6}  # ids follow BucketSet's (frames, h, w) sort order
    bucket_of = np.concatenate([np.full(n, b) for b, n in counts.items()])
    return bs, np.random.default_rng(seed).permutation(bucket_of)


def test_sampler_epoch_covers_each_sample_once_one_bucket_per_batch():
    bs, bucket_of = make_layout()
    sizes = {Bucket(1, 144, 256): 4, Bucket(1, 192, 192): 4, 33: 2}
    sampler = BucketBatchSampler(bucket_of, bs, sizes, interleave="I-V-V", seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(bucket_of)))
    for batch in batches:
        assert len({int(bucket_of[i]) for i in batch}) == 1
        b = bs[int(bucket_of[batch[0]])]
        assert 1 <= len(batch) <= (4 if b.is_image else 2)
    assert list(sampler) != batches  # the next epoch is reshuffled
    with pytest.raises(ConfigError, match="no entry for bucket"):
        BucketBatchSampler(bucket_of, bs, {33: 2}, seed=0)
    with pytest.raises(ConfigError, match="positive integer"):
        BucketBatchSampler(bucket_of, bs, 0, seed=0)
    with pytest.raises(ConfigError, match="only I"):
        parse_interleave("I-X")


def test_sampler_is_deterministic_given_the_seed():
    bs, bucket_of = make_layout()
    a = BucketBatchSampler(bucket_of, bs, 3, seed=11)
    b = BucketBatchSampler(bucket_of, bs, 3, seed=11)
    c = BucketBatchSampler(bucket_of, bs, 3, seed=12)
    ea, eb, ec = list(a), list(b), list(c)
    assert ea == eb and ea != ec
    assert list(a) == list(b)


@pytest.mark.parametrize("stop_at", [0, 1, 7, "end"])
def test_sampler_resumes_at_the_exact_next_batch(stop_at):
    bs, bucket_of = make_layout()
    reference = BucketBatchSampler(bucket_of, bs, 3, seed=5)
    stream = [b for _ in range(3) for b in reference]  # three epochs, uninterrupted

    first = BucketBatchSampler(bucket_of, bs, 3, seed=5)
    n_epoch = len(first)
    stop = n_epoch + (n_epoch if stop_at == "end" else stop_at)  # stop inside (or at the end of) epoch 1
    got = []
    it = iter(first)
    for _ in range(stop):
        try:
            got.append(next(it))
        except StopIteration:
            it = iter(first)
            got.append(next(it))
    state = first.state_dict()

    resumed = BucketBatchSampler(bucket_of, bs, 3, seed=5)
    resumed.load_state_dict(state)
    while len(got) < len(stream):
        got.extend(resumed)
    assert got == stream

    other = BucketBatchSampler(bucket_of, bs, 4, seed=5)
    with pytest.raises(ConfigError, match="different dataset"):
        other.load_state_dict(state)


def test_interleave_pattern_and_its_tail():
    bs, bucket_of = make_layout(counts={0: 8, 1: 4, 2: 45, 3: 0})
    sampler = BucketBatchSampler(bucket_of, bs, {1: 4, 33: 5}, interleave="I-V-V", seed=0, shuffle=False)
    kinds = "".join("I" if bs[int(bucket_of[b[0]])].is_image else "V" for b in sampler.batches(0))
    assert kinds == "IVVIVVIVVVVV"  # 3 image, 9 video batches: V-V pairs until the images run out

    two_images = BucketBatchSampler(bucket_of, bs, {1: 4, 33: 5}, interleave="I-I-V", seed=0)
    kinds = "".join("I" if bs[int(bucket_of[b[0]])].is_image else "V" for b in two_images.batches(0))
    assert kinds == "IIVIV" + "V" * 7
    only_images = BucketBatchSampler(bucket_of, bs, {1: 4, 33: 5}, interleave="I", seed=0)
    assert len(only_images.batches(0)) == 12  # videos are not dropped by a pattern that never names them


def test_sampler_across_ranks_shares_each_global_batch():
    bs, bucket_of = make_layout(counts={0: 24, 1: 7, 2: 12, 3: 2})
    world = 4
    ranks = [BucketBatchSampler(bucket_of, bs, 2, interleave=None, seed=9, rank=r, world_size=world)
             for r in range(world)]
    per_rank = [list(s) for s in ranks]
    assert len({len(p) for p in per_rank}) == 1
    seen = []
    for step in zip(*per_rank):
        assert all(len(b) >= 1 for b in step)
        assert len({int(bucket_of[i]) for b in step for i in b}) == 1  # all ranks train one bucket per step
        seen.extend(i for b in step for i in b)
    assert set(seen) == set(range(len(bucket_of)))
    # Only the 2-sample bucket, smaller than the world, repeats samples (to give each rank one).
    assert len(seen) - len(bucket_of) == world - 2
    with pytest.raises(ConfigError, match="rank layout"):
        BucketBatchSampler(bucket_of, bs, 2, rank=4, world_size=4)


def test_drop_last_that_leaves_nothing_is_rejected():
    bs, bucket_of = make_layout(counts={0: 3, 1: 0, 2: 2, 3: 0})
    with pytest.raises(ConfigError, match="no batches"):
        BucketBatchSampler(bucket_of, bs, 4, drop_last=True)
    assert len(BucketBatchSampler(bucket_of, bs, 4)) == 2
