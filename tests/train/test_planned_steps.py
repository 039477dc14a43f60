"""The shard planner in the training loop: what each rank trains per step, and its resume on any process count."""

from collections import Counter

import pytest

from motif_video.train.buckets import Bucket, BucketSet
from motif_video.train.loop import train
from motif_video.train.steps import PlannedSteps
from tests.train.engine_helpers import build_config, make_cache, one_thread  # noqa: F401
from tests.train.test_resume import Crash, crash_after

# 3 buckets of different cost; 40 + 30 + 20 samples
BUCKETS = BucketSet([Bucket(1, 64, 64), Bucket(17, 64, 64), Bucket(33, 64, 112)])
BUCKET_OF = [0] * 40 + [1] * 30 + [2] * 20


def steps_of(world, planner="annealed", **kwargs):
    return [PlannedSteps(BUCKET_OF, BUCKETS, planner=planner, seed=5, rank=r, world=world, max_tokens=252,
                         micro_batches=2, **kwargs) for r in range(world)]


def take(sources, n):
    """n steps of every rank: [(per-rank micro-batches), ...] and the position after the last."""
    iters = [iter(s) for s in sources]
    out, position = [], None
    for _ in range(n):
        steps = [next(it) for it in iters]
        assert len({s.position["steps_done"] for s in steps}) == 1  # one global position
        out.append([s.micro_batches for s in steps])
        position = steps[0].position
    return out, position


def samples(steps):
    return Counter(i for step in steps for rank in step for mb in rank if mb.weight > 0 for i in mb.indices)


@pytest.mark.parametrize("planner", ["greedy", "annealed"])
def test_every_sample_once_per_epoch_and_equal_micro_batch_counts(planner):
    ranks = steps_of(4, planner)
    per_epoch = len(ranks[0].plan(0, [0, 0, 0]).steps)
    steps, _ = take(ranks, 2 * per_epoch)
    for epoch in (steps[:per_epoch], steps[per_epoch:]):
        assert samples(epoch) == Counter(range(len(BUCKET_OF)))
    for step in steps:
        assert len({len(rank) for rank in step}) == 1  # FSDP pairs every rank's collectives
        total = sum(len(mb.indices) for rank in step for mb in rank if mb.weight > 0)
        assert sum(mb.weight for rank in step for mb in rank) == pytest.approx(1.0)
        ids = sorted(i for rank in step for mb in rank if mb.weight > 0 for i in mb.sample_ids)
        assert ids == list(range(total))  # global positions: the per-sample randomness keys
        for rank in step:
            for mb in rank:
                assert len({BUCKET_OF[i] for i in mb.indices}) == 1
                assert sum(BUCKETS[BUCKET_OF[i]].latent_tokens for i in mb.indices) <= 252


def test_resume_on_the_same_and_on_another_process_count():
    full, _ = take(steps_of(2), 12)
    head, position = take(steps_of(2), 3)
    # same process count: the same plan, continued
    again = steps_of(2)
    for s in again:
        s.load_state_dict(position)
    tail, _ = take(again, 9)
    assert [[[mb.indices for mb in r] for r in st] for st in head + tail] == \
        [[[mb.indices for mb in r] for r in st] for st in full]
    # 2 -> 3 processes: the rest of the epoch re-planned, reproducibly, every sample still once
    def resumed():
        ranks = steps_of(3)
        for s in ranks:
            s.load_state_dict(position)
        return ranks

    left = len(resumed()[0].plan(0, position["consumed"]).steps)
    rest, after = take(resumed(), left)
    assert take(resumed(), left)[0] == rest
    assert samples(head) + samples(rest) == Counter(range(len(BUCKET_OF)))
    assert after["epoch"] == 0 and after["consumed"] == [40, 30, 20]


def test_planned_training_resumes_exactly(tmp_path):
    cache = make_cache(tmp_path / "cache", n_images=6, n_videos=5)
    sections = dict(data={"cache_dirs": [str(cache)], "planner": "annealed", "planner_micro_batches": 2},
                    optim={"lr": 1e-3, "steps": 8}, checkpointing={"every": 3, "keep_last": 2})
    full = train(build_config(tmp_path / "full", cache, **sections))
    config = build_config(tmp_path / "cut", cache, **sections)
    with pytest.raises(Crash):
        train(config, callbacks=[crash_after(5)])
    resumed = train(config, resume=True)
    assert sorted(resumed.losses) == [4, 5, 6, 7, 8]
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(full.losses[step], abs=1e-6, rel=0)
