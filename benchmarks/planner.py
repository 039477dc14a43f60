"""Shard planner vs the naive schedule on a realistic bucket mix (no GPU needed: it is a scheduling model).

Naive: buckets one after another, every rank on the same bucket, one fixed micro-batch size (the largest that the
biggest bucket fits). Planned: `train.planner.plan_shards` (greedy deal, then simulated annealing), and annealing
alone from a random deal. Both are scored with the planner's cost model (work = tokens + c * tokens^2 per sample):

  steps          optimizer steps per epoch
  utilisation    mean over steps of (mean rank work / busiest rank work)
  weighted       the same, weighted by step length (all work / (ranks x critical path))
  fill           mean micro-batch tokens / token budget (how full each GPU's micro-batch is)
  time           critical path (sum over steps of the busiest rank's work) + steps x step overhead, relative to
                 naive; the overhead models per-step costs that do not shrink with the batch (see docs/data.md)

    python benchmarks/planner.py
    python benchmarks/planner.py --clips 20000 --ranks 64 --resolution 480 --micro-batches 1 2 4 --json plan.json
    python benchmarks/planner.py --sweep 25     # greedy start vs annealed on random mixes and rank layouts
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from motif_video.train.buckets import BucketSet, parse_aspect
from motif_video.train.planner import naive_plan, plan_shards, sample_work

# Default mix: a stage-10-like joint image+video set (the paper gives no proportions; these are assumptions).
FRAME_MIX = {1: 0.40, 33: 0.20, 65: 0.15, 121: 0.25}
ASPECT_MIX = {"16:9": 0.70, "9:16": 0.20, "1:1": 0.10}
# Per-step cost that does not shrink with the batch, in work units (one unit = one token through the linear layers,
# forward + backward, ~6 x 2.04e9 FLOPs): FSDP all-gathers and the gradient reduce-scatter move ~3 x 4 GB of bf16
# parameters per GPU per step, ~0.3 s at ~40 GB/s, i.e. ~10k units at ~400 TFLOP/s. Hidden behind long steps,
# exposed on short ones.
STEP_OVERHEAD = 10_000


def bucket_counts(clips: int, resolution: int, seed: int) -> dict:
    bs = BucketSet.from_grid(FRAME_MIX, ASPECT_MIX, resolution)
    probs = []
    for b in bs:
        aspect = min(ASPECT_MIX, key=lambda a: abs(parse_aspect(a) - b.aspect))
        probs.append(FRAME_MIX[b.num_frames] * ASPECT_MIX[aspect])
    counts = np.random.default_rng(seed).multinomial(clips, np.array(probs) / sum(probs))
    return {b: int(n) for b, n in zip(bs, counts)}


def sweep(trials: int, seed: int) -> None:
    """Random mixes, rank counts, micro-batch counts and budgets: how far the greedy start and the annealed plan
    are above the perfect-balance bound (all work / ranks), and how often annealing improves on greedy."""
    rng = np.random.default_rng(seed)
    pool = list(BucketSet.from_grid(FRAME_MIX, ["16:9", "1:1", "9:16", "4:3"], 360))
    print(f"{'ranks':>5s} {'micro':>5s} {'budget':>7s} {'steps':>5s} {'greedy/bound':>12s} {'annealed/bound':>14s}")
    gains = []
    for _ in range(trials):
        world, micro = int(rng.integers(2, 24)), int(rng.integers(1, 5))
        counts = {b: int(rng.integers(0, 200)) for b in pool if rng.random() < 0.7}
        if not any(counts.values()):
            continue
        budget = int(max(b.latent_tokens for b, n in counts.items() if n) * rng.choice([1, 1.5, 2, 3]))
        bound = sum(sample_work(b) * n for b, n in counts.items()) / world
        greedy = plan_shards(counts, world, budget, micro, iterations=0).stats()
        annealed = plan_shards(counts, world, budget, micro, iterations=30_000, seed=seed).stats()
        gains.append(1 - annealed.epoch_work / greedy.epoch_work)
        print(f"{world:5d} {micro:5d} {budget:7d} {greedy.steps:5d} {greedy.epoch_work / bound:12.4f} "
              f"{annealed.epoch_work / bound:14.4f}")
    print(f"annealing shortened the greedy plan in {sum(g > 1e-9 for g in gains)} of {len(gains)} cases; "
          f"mean {np.mean(gains):.2%}, max {max(gains):.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=12_000)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=720, help="base resolution (16:9 height) of every bucket")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4],
                        help="micro-batches per rank per step (gradient accumulation)")
    parser.add_argument("--max-tokens", type=int, default=None, help="token budget per micro-batch "
                        "(default: one sample of the largest bucket)")
    parser.add_argument("--iterations", type=int, default=None, help="annealing iterations (default: the planner's)")
    parser.add_argument("--step-overhead", type=float, default=STEP_OVERHEAD)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--sweep", type=int, default=0, help="instead, compare greedy and annealed on N random cases")
    args = parser.parse_args()
    if args.sweep:
        sweep(args.sweep, args.seed)
        return

    counts = bucket_counts(args.clips, args.resolution, args.seed)
    print(f"{args.clips} clips, {args.ranks} ranks, buckets at {args.resolution}p (frames x height x width: clips):")
    print("  " + ", ".join(f"{b}: {n}" for b, n in counts.items()))
    results = []
    for micro in args.micro_batches:
        base = naive_plan(counts, args.ranks, max_tokens_per_rank=args.max_tokens, micro_batches_per_step=micro)
        rows = [("naive", base, 0.0)]
        for label, init, iterations in [("greedy, no annealing", "greedy", 0),
                                        ("greedy + annealing", "greedy", args.iterations),
                                        ("random + annealing", "random", args.iterations)]:
            start = time.perf_counter()
            plan = plan_shards(counts, args.ranks, max_tokens_per_rank=args.max_tokens, micro_batches_per_step=micro,
                               iterations=iterations, seed=args.seed, init=init)
            rows.append((label, plan, time.perf_counter() - start))
            assert plan.counts() == {b: n for b, n in counts.items() if n}  # every clip exactly once
        ref = base.stats()
        print(f"\nmicro-batches per step: {micro} (token budget {base.max_tokens_per_rank}; naive batch "
              f"{max(n for step in base.steps for slot in step for _, n in slot)})")
        print(f"  {'schedule':22s} {'steps':>6s} {'utilisation':>11s} {'weighted':>8s} {'fill':>6s} "
              f"{'time':>6s} {'time+oh':>7s} {'plan s':>6s}")
        for label, plan, seconds in rows:
            st = plan.stats()
            row = {"micro_batches_per_step": micro, "schedule": label, "steps": st.steps,
                   "utilisation": st.utilisation, "weighted_utilisation": st.weighted_utilisation,
                   "token_fill": st.token_fill, "time": st.epoch_time() / ref.epoch_time(),
                   "time_with_overhead": st.epoch_time(args.step_overhead) / ref.epoch_time(args.step_overhead),
                   "plan_seconds": seconds}
            results.append(row)
            print(f"  {label:22s} {st.steps:6d} {st.utilisation:11.1%} {st.weighted_utilisation:8.1%} "
                  f"{st.token_fill:6.1%} {row['time']:6.3f} {row['time_with_overhead']:7.3f} {seconds:6.1f}")
        best = rows[2][1].stats()
        print(f"  -> {ref.steps / best.steps:.2f}x fewer steps per epoch; utilisation {ref.utilisation:.1%} -> "
              f"{best.utilisation:.1%}; fill {ref.token_fill:.1%} -> {best.token_fill:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "counts": {str(b): n for b, n in counts.items()}, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
