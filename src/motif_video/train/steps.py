"""What each process trains in each optimizer step: its micro-batches, their place in the global batch, and the
global data position after the step.

Both sources describe a step globally first (every rank derives the same description from the seed) and then take
this rank's part, so the position is one global fact, (epoch, steps done), and a run resumes on any number of
processes:

- `BucketedSteps`: one bucket per step, a fixed global batch split evenly over the ranks, each rank's share cut
  into micro-batches of `micro_batch_size`. The global batches do not depend on the process count or the
  micro-batch size, and every sample keeps its position in the global batch (which keys its noise, timestep and
  dropout), so 1 process, N processes and any micro-batch size train the same step.
- `PlannedSteps`: the shard planner (`planner.plan_shards`) balances mixed buckets across ranks: each rank's
  micro-batches fill a token budget and the ranks of a step carry similar work. The plan depends on the process
  count, so it is made for the samples an epoch has left, from the global position: a resume on the same number of
  processes replays the same plan, one on another number re-plans the rest of the epoch.

Every rank runs the same number of micro-batches in a step (FSDP's collectives pair up across ranks): a rank with
fewer gets zero-weight micro-batches, real forwards and backwards whose loss is multiplied by 0.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..errors import ConfigError
from .buckets import Bucket, BucketBatchSampler, BucketSet

PLANNERS = ("greedy", "annealed")


@dataclass
class MicroBatch:
    indices: list[int]  # dataset indices
    sample_ids: list[int]  # positions in the step's global batch: they key the per-sample randomness
    weight: float  # this micro-batch's share of the step's loss (its samples / the step's samples; 0: padding)


@dataclass
class Step:
    micro_batches: list[MicroBatch]  # this rank's, as many as every other rank's
    position: dict  # the global data position after this step (what a checkpoint saves)


def _fingerprint(data) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _split(items: list[int], size: int | None) -> list[list[int]]:
    size = size or len(items)
    return [items[i:i + size] for i in range(0, len(items), size)]


class BucketedSteps:
    def __init__(self, bucket_of: Sequence[int], buckets: BucketSet, global_batch, *, interleave: str | None,
                 seed: int, rank: int, world: int, micro_batch_size: int | None):
        self.rank, self.world, self.micro_batch_size = rank, world, micro_batch_size
        self.global_batch = global_batch
        self.sampler = BucketBatchSampler(bucket_of, buckets, global_batch, interleave=interleave, seed=seed,
                                          shuffle=True, drop_last=True)
        for i, size in self.sampler.batch_sizes.items():
            if size % world:
                what = f"[{buckets[i].num_frames}]" if isinstance(global_batch, dict) else ""
                raise ConfigError(f"data.batch_size{what}={size} is not divisible by the {world} processes")
        self._bucket_of, self._buckets, self._interleave = bucket_of, buckets, interleave

    def state_dict(self) -> dict:
        return {"kind": "bucketed", **self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "legacy_sampler" in state:  # format 1: rank 0's slice sampler; its position counts global batches
            old = state["legacy_sampler"]
            world = int(state["world_size"])
            per_rank = {k: v // world for k, v in self.global_batch.items()} if isinstance(self.global_batch, dict) \
                else self.global_batch // world
            legacy = BucketBatchSampler(self._bucket_of, self._buckets, per_rank, interleave=self._interleave,
                                        seed=self.sampler.seed, shuffle=True, drop_last=True, rank=0,
                                        world_size=world)
            legacy.load_state_dict(old)  # checks dataset, batch size, seed and rank layout
            state = {**old, "fingerprint": self.sampler.fingerprint()}
        elif state.get("kind") != "bucketed":
            raise ConfigError("the checkpoint's data position was saved with the shard planner on "
                              f"(data.planner={state.get('planner')!r}); resume with the same data.planner")
        self.sampler.load_state_dict(state)

    def __iter__(self) -> Iterator[Step]:
        while True:  # epochs roll over inside the sampler
            for batch in self.sampler:
                share = len(batch) // self.world
                mine = batch[self.rank * share:(self.rank + 1) * share]
                ids = list(range(self.rank * share, (self.rank + 1) * share))
                micro = [MicroBatch(idx, sid, len(idx) / len(batch))
                         for idx, sid in zip(_split(mine, self.micro_batch_size), _split(ids, self.micro_batch_size))]
                yield Step(micro, self.state_dict())


class PlannedSteps:
    def __init__(self, bucket_of: Sequence[int], buckets: BucketSet, *, planner: str, seed: int, rank: int,
                 world: int, max_tokens: int | None, micro_batches: int):
        from .planner import sample_work

        if planner not in PLANNERS:
            raise ConfigError(f"data.planner={planner!r}: choose one of {', '.join(PLANNERS)} or null")
        self.planner, self.seed, self.rank, self.world = planner, int(seed), rank, world
        self.max_tokens, self.micro_batches = max_tokens, micro_batches
        self.bucket_of = np.asarray(bucket_of, dtype=np.int64)
        used = sorted(set(self.bucket_of.tolist()))
        self.buckets: list[Bucket] = [buckets[i] for i in used]  # ours: ids into this list
        self.members = [np.flatnonzero(self.bucket_of == i) for i in used]
        self._lightest = min(range(len(self.buckets)), key=lambda b: sample_work(self.buckets[b]))
        self.fingerprint = _fingerprint({"bucket_of": hashlib.sha1(self.bucket_of.tobytes()).hexdigest(),
                                         "buckets": [str(b) for b in self.buckets], "planner": planner,
                                         "max_tokens": max_tokens, "micro_batches": micro_batches, "seed": seed})
        self.epoch, self.segment_start, self.segment_world, self.steps_done = 0, [0] * len(self.buckets), world, 0
        self.consumed = list(self.segment_start)
        self._plans: dict = {}
        self.plan(0, self.segment_start)  # a config problem (token budget) shows at setup, not at the first step

    def plan(self, epoch: int, start: list[int]):
        """The plan for the samples left in `epoch` after `start[b]` of each bucket, for this process count."""
        from .planner import plan_shards

        key = (epoch, tuple(start), self.world)
        if key not in self._plans:
            left = {b: len(m) - s for b, m, s in zip(self.buckets, self.members, start) if len(m) > s}
            self._plans = {key: plan_shards(
                left, self.world, self.max_tokens, self.micro_batches, iterations=0 if self.planner == "greedy"
                else None, seed=int(_fingerprint([self.seed, epoch, start]), 16) % 2**31)}
        return self._plans[key]

    def state_dict(self) -> dict:
        return {"kind": "planned", "planner": self.planner, "fingerprint": self.fingerprint, "epoch": self.epoch,
                "segment_start": list(self.segment_start), "segment_world": self.segment_world,
                "steps_done": self.steps_done, "consumed": list(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "planned":
            raise ConfigError("the checkpoint's data position was saved without the shard planner; resume with "
                              "data.planner=null")
        if state["fingerprint"] != self.fingerprint:
            raise ConfigError("the checkpoint's data position was saved for a different dataset, bucket set, seed or "
                              "planner setting; resuming from it would not continue the same sequence")
        self.epoch = int(state["epoch"])
        self.consumed = [int(n) for n in state["consumed"]]
        if int(state["segment_world"]) == self.world:  # the same plan again, skipping the steps done
            self.segment_start, self.steps_done = [int(n) for n in state["segment_start"]], int(state["steps_done"])
        else:  # another process count: re-plan what the epoch has left
            self.segment_start, self.steps_done = list(self.consumed), 0
        self.segment_world = self.world

    def __iter__(self) -> Iterator[Step]:
        while True:
            if all(c >= len(m) for c, m in zip(self.segment_start, self.members)):
                self.epoch, self.segment_start, self.steps_done = self.epoch + 1, [0] * len(self.buckets), 0
            rng = np.random.default_rng([self.seed, self.epoch])
            pools = [rng.permutation(m) for m in self.members]
            plan = self.plan(self.epoch, self.segment_start)
            ours = [self.buckets.index(b) for b in plan.buckets]  # plan bucket id -> ours
            order = np.random.default_rng([self.seed, self.epoch, sum(self.segment_start)]).permutation(len(plan.steps))
            cursor = list(self.segment_start)
            skip = self.steps_done
            for j, s in enumerate(order):
                slots = []  # every rank's micro-batches: (indices, first sample id)
                sid = 0
                for slot in plan.steps[s]:
                    batches = []
                    for b, n in slot:
                        b = ours[b]
                        batches.append((pools[b][cursor[b]:cursor[b] + n].tolist(), sid))
                        cursor[b] += n
                        sid += n
                    slots.append(batches)
                if j < skip:
                    continue
                total = sid
                count = max(len(slot) for slot in slots)
                mine = [MicroBatch(idx, list(range(first, first + len(idx))), len(idx) / total)
                        for idx, first in slots[self.rank]]
                pad = mine[0].indices[:1] if mine else [int(pools[self._lightest][0])]
                mine += [MicroBatch(pad, [total], 0.0) for _ in range(count - len(mine))]
                self.steps_done, self.consumed = j + 1, list(cursor)
                yield Step(mine, self.state_dict())
            self.segment_start, self.steps_done = list(cursor), 0  # every sample of the epoch trained


def make_steps(data, bucket_of, buckets: BucketSet, *, seed: int, rank: int, world: int):
    """The step source the config's `data` section asks for."""
    if data.planner is None:
        return BucketedSteps(bucket_of, buckets, data.batch_size, interleave=data.interleave or None, seed=seed,
                             rank=rank, world=world, micro_batch_size=data.micro_batch_size)
    return PlannedSteps(bucket_of, buckets, planner=data.planner, seed=seed, rank=rank, world=world,
                        max_tokens=data.planner_max_tokens, micro_batches=data.planner_micro_batches)
