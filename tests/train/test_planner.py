"""Shard planner: the naive baseline's numbers by hand, the annealed plan's guarantees, and the planned sampler."""

import numpy as np
import pytest

from motif_video.errors import ConfigError, MotifVideoError
from motif_video.train.buckets import Bucket, BucketSet
from motif_video.train.planner import (
    PlannedBatchSampler,
    ShardPlan,
    naive_plan,
    plan_shards,
    sample_work,
)

IMG = Bucket(1, 32, 32)  # 1 x 2 x 2 = 4 latent tokens
SHORT = Bucket(5, 32, 32)  # 2 x 2 x 2 = 8
LONG = Bucket(9, 64, 64)  # 3 x 4 x 4 = 48


def test_sample_work_is_tokens_plus_attention():
    assert LONG.latent_tokens == 48
    assert sample_work(LONG, 0.0) == 48
    assert sample_work(LONG, 0.5) == 48 + 0.5 * 48 * 48
    big = Bucket(121, 736, 1280)
    assert sample_work(big) == pytest.approx(114080 * (1 + 114080 / (6 * 1536)))


def test_naive_plan_numbers_by_hand():
    plan = naive_plan({IMG: 10, SHORT: 3, LONG: 4}, world_size=4, attention_coeff=0.0)
    # Budget defaults to one LONG sample (48 tokens), so the fixed batch is 1. Steps: IMG 4+4+2, SHORT 3, LONG 4.
    assert [[sum(n for _, n in slot) for slot in step] for step in plan.steps] == [
        [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    st = plan.stats()
    assert st.steps == 5 and st.micro_batches == 17
    assert st.utilisation == pytest.approx((1 + 1 + 0.5 + 0.75 + 1) / 5)
    assert st.token_fill == pytest.approx((10 * 4 / 48 + 3 * 8 / 48 + 4 * 1) / 17)
    assert st.epoch_work == pytest.approx(3 * 4 + 8 + 48)
    assert st.weighted_utilisation == pytest.approx((10 * 4 + 3 * 8 + 4 * 48) / (4 * st.epoch_work))
    assert st.epoch_time(step_overhead=10) == pytest.approx(st.epoch_work + 50)
    accum = naive_plan({IMG: 10}, world_size=2, micro_batches_per_step=3, attention_coeff=0.0)
    per_rank = [[[n for _, n in slot] for slot in step] for step in accum.steps]
    assert per_rank == [[[1, 1, 1], [1, 1, 1]], [[1, 1], [1, 1]]]


def skewed_counts():
    """Mostly images and short clips with a long-clip minority, spread over a few aspects (with 12 ranks, the
    counts do not divide evenly)."""
    bs = BucketSet.from_grid([1, 33, 65, 121], ["16:9", "1:1", "9:16"], 144)
    per_frames = {1: 700, 33: 300, 65: 60, 121: 45}
    share = {0: 0.6, 1: 0.3, 2: 0.1}
    counts = {}
    for b in bs:
        aspect = 0 if b.width > b.height else 1 if b.width == b.height else 2
        counts[b] = int(per_frames[b.num_frames] * share[aspect]) + 1
    return counts


@pytest.mark.parametrize("micro", [1, 3])
def test_plan_respects_counts_budget_and_slots(micro):
    counts = skewed_counts()
    world = 12
    plan = plan_shards(counts, world, micro_batches_per_step=micro, seed=1)
    assert plan.counts() == counts  # every sample once
    budget = plan.max_tokens_per_rank
    assert budget == max(b.latent_tokens for b in counts)
    for step in plan.steps:
        assert len(step) == world
        for slot in step:
            assert 1 <= len(slot) <= micro  # no idle rank, no more micro-batches than asked
            for b, n in slot:
                assert n >= 1 and plan.buckets[b].latent_tokens * n <= budget
    # The fewest steps that hold the bucket's fullest micro-batches.
    min_micro = sum(-(-n // max(1, budget // b.latent_tokens)) for b, n in counts.items())
    assert len(plan.steps) == -(-min_micro // (world * micro))
    assert plan_shards(counts, world, micro_batches_per_step=micro, seed=1).steps == plan.steps  # seeded


@pytest.mark.parametrize("micro", [1, 3])
def test_plan_beats_naive_on_a_skewed_mix(micro):
    counts = skewed_counts()
    world = 12
    base = naive_plan(counts, world, micro_batches_per_step=micro).stats()
    planned = plan_shards(counts, world, micro_batches_per_step=micro, seed=0).stats()
    assert planned.steps * 3 <= base.steps
    assert planned.utilisation > base.utilisation
    assert planned.utilisation > 0.9
    assert planned.token_fill > 2 * base.token_fill
    overhead = sample_work(Bucket(1, 144, 256))  # a fixed cost per step worth one image
    assert planned.epoch_time(overhead) < base.epoch_time(overhead)
    # Lower bound: no schedule beats all the work spread perfectly over the ranks.
    total = sum(sample_work(b) * n for b, n in counts.items())
    assert planned.epoch_work >= total / world * (1 - 1e-9)


def test_annealing_improves_a_random_deal_and_never_worsens_greedy():
    counts = skewed_counts()
    for micro in (1, 2):
        raw = plan_shards(counts, 12, micro_batches_per_step=micro, init="random", iterations=0, seed=3).stats()
        annealed = plan_shards(counts, 12, micro_batches_per_step=micro, init="random", iterations=20000, seed=3)
        assert annealed.counts() == counts
        assert annealed.stats().epoch_work < 0.9 * raw.epoch_work
        greedy = plan_shards(counts, 12, micro_batches_per_step=micro, iterations=0).stats()
        polished = plan_shards(counts, 12, micro_batches_per_step=micro, iterations=20000).stats()
        assert polished.epoch_work <= greedy.epoch_work


def test_impossible_plans_are_rejected():
    with pytest.raises(ConfigError, match="more than max_tokens_per_rank"):
        plan_shards({LONG: 3}, 2, max_tokens_per_rank=40)
    with pytest.raises(ConfigError, match="every bucket is empty"):
        plan_shards({LONG: 0}, 2)
    with pytest.raises(ConfigError, match="world size"):
        plan_shards({LONG: 3}, 0)
    with pytest.raises(ConfigError, match="micro_batches_per_step"):
        plan_shards({LONG: 3}, 2, micro_batches_per_step=0)
    with pytest.raises(ConfigError, match="non-negative"):
        naive_plan({LONG: -1}, 2)


def layout(counts, seed=0):
    bs = BucketSet(counts)
    bucket_of = np.concatenate([np.full(n, bs.index(b)) for b, n in counts.items()])
    return bs, np.random.default_rng(seed).permutation(bucket_of)


@pytest.mark.parametrize("micro", [1, 2])
def test_planned_sampler_trains_each_sample_once_per_epoch(micro, tmp_path):
    counts = skewed_counts()
    bs, bucket_of = layout(counts)
    world = 12
    plan = ShardPlan.load(plan_shards(counts, world, micro_batches_per_step=micro).save(tmp_path / "plan.json"))
    samplers = [PlannedBatchSampler(plan, bucket_of, bs, rank=r, seed=4) for r in range(world)]
    for epoch in range(2):
        steps = [s.steps(epoch) for s in samplers]
        assert len({len(st) for st in steps}) == 1
        seen = []
        for r, sampler in enumerate(samplers):
            batches = list(sampler)
            assert batches == [b for step in steps[r] for b in step]
            assert sum(sampler.step_sizes(epoch)) == len(batches)
            for batch in batches:
                assert len({int(bucket_of[i]) for i in batch}) == 1
            seen += [i for b in batches for i in b]
        assert sorted(seen) == list(range(len(bucket_of)))
    assert samplers[0].steps(0) != samplers[0].steps(1)  # reshuffled per epoch


def test_planned_sampler_resumes_and_checks_the_dataset():
    counts = skewed_counts()
    bs, bucket_of = layout(counts)
    plan = plan_shards(counts, 4, micro_batches_per_step=2, iterations=2000)
    ref = PlannedBatchSampler(plan, bucket_of, bs, rank=1, seed=2)
    stream = list(ref) + list(ref)
    first = PlannedBatchSampler(plan, bucket_of, bs, rank=1, seed=2)
    it = iter(first)
    got = [next(it) for _ in range(7)]
    resumed = PlannedBatchSampler(plan, bucket_of, bs, rank=1, seed=2)
    resumed.load_state_dict(first.state_dict())
    got += list(resumed) + list(resumed)
    assert got == stream
    with pytest.raises(ConfigError, match="different dataset"):
        PlannedBatchSampler(plan, bucket_of, bs, rank=2, seed=2).load_state_dict(first.state_dict())

    fewer = dict(counts)
    fewer[IMG] = 1
    bs2, bucket_of2 = layout(fewer)
    with pytest.raises(ConfigError, match="1x32x32"):
        PlannedBatchSampler(plan, bucket_of2, bs2)
    with pytest.raises(MotifVideoError, match="not a shard plan"):
        ShardPlan.from_dict({"buckets": ["9x64x64"]})


def test_fewer_samples_than_ranks_leaves_no_rank_without_work():
    counts = {IMG: 2, LONG: 1}
    bs, bucket_of = layout(counts)
    plan = plan_shards(counts, 5)
    assert plan.counts() == counts and len(plan.steps) == 1
    assert sum(1 for slot in plan.steps[0] if not slot) == 2  # two ranks the data cannot feed
    batches = [PlannedBatchSampler(plan, bucket_of, bs, rank=r).batches(0) for r in range(5)]
    assert all(len(b) == 1 and len(b[0]) >= 1 for b in batches)
    trained = [i for b in batches for i in b[0]]
    assert len(trained) == 5 and set(trained) == {0, 1, 2}  # every sample, plus one repeat on each idle rank
    repeated = [i for i in set(trained) if trained.count(i) > 1]
    assert repeated and all(bucket_of[i] == bs.index(IMG) for i in repeated)  # the lightest bucket
