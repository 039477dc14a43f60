"""The shard planner in training: per-rank step time and utilisation, planned vs plain bucketed global batches.

1. Simulated 64-rank run (`--simulate`): a stage-10-like mix (benchmarks/planner.py's assumed proportions) cut into
   the steps each schedule makes, every sample costed with the estimator's analytic FLOPs (motif_video.flops:
   forward_flops of Motif-Video 2B with 512 text tokens, x3 for forward + backward) at an assumed 40% MFU of an
   H200's 989 bf16 TFLOP/s, plus a fixed per-step cost for FSDP's parameter all-gathers and gradient
   reduce-scatter (0.3 s: ~12 GB of bf16 traffic per GPU per step at ~40 GB/s). Schedules:
     bucketed, one batch       what `data.batch_size: N` gives: one bucket per step, one batch size for all buckets
                               (the largest that one micro-batch of the biggest bucket allows), short tails dropped
     bucketed, batch per frames `data.batch_size: {frames: n}`: each frame count's batch filled to the token budget
     greedy / annealed          `data.planner: greedy | annealed`
   Per step: rank time = sum of its micro-batches; step time = the busiest rank + the fixed cost. Reported: steps
   per epoch, spread (mean over steps of (slowest - fastest rank) / slowest), utilisation (mean rank time / step
   time), fill (FLOPs a rank does / FLOPs of full micro-batches), epoch time, samples trained.
2. Real two-process CPU run (`--real`): `torchrun --nproc_per_node 2 ... train` on a tiny model over a cache of
   three bucket shapes, one epoch per schedule; measured wall time per step and per epoch from the run's log.

    python benchmarks/planner_in_training.py --simulate --json benchmarks/results/planner_in_training_sim.json
    python benchmarks/planner_in_training.py --real --json benchmarks/results/planner_in_training_real.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAK_FLOPS = 989e12 * 0.4  # H200 bf16 dense at an assumed 40% MFU
STEP_OVERHEAD_S = 0.3
TEXT_TOKENS = 512


def sample_seconds(bucket, config) -> float:
    from motif_video.flops import forward_flops

    tokens = bucket.latent_tokens
    return 3 * forward_flops(config, tokens, TEXT_TOKENS).total / PEAK_FLOPS


def bucketed_per_frames(counts: dict, world: int, budget: int):
    """What the loop's plain mode does with a per-frame-count batch map filled to the token budget: each bucket in
    global batches of n x world (n = budget // the frame count's largest bucket's tokens), short tails dropped."""
    from motif_video.train.planner import ShardPlan

    buckets = tuple(sorted(b for b, n in counts.items() if n))
    per_frames: dict[int, int] = {}
    for b in buckets:
        per_frames[b.num_frames] = min(per_frames.get(b.num_frames, 10**9), max(1, budget // b.latent_tokens))
    steps = []
    for i, b in enumerate(buckets):
        n = per_frames[b.num_frames]
        steps += [[[(i, n)] for _ in range(world)] for _ in range(counts[b] // (n * world))]
    return ShardPlan(buckets, world, steps, budget, 1)


def score(plan, seconds: dict) -> dict:
    cost = [seconds[b] for b in plan.buckets]
    loads = np.array([[sum(cost[b] * n for b, n in slot) for slot in step] for step in plan.steps])  # (S, W)
    busiest = loads.max(axis=1)
    full = plan.micro_batches_per_step * max(seconds[b] * (plan.max_tokens_per_rank // b.latent_tokens)
                                             for b in plan.buckets)
    step_time = busiest + STEP_OVERHEAD_S
    return {"steps": len(plan.steps), "spread": float(((busiest - loads.min(axis=1)) / busiest).mean()),
            "utilisation": float(loads.mean(axis=1).sum() / step_time.sum()),
            "fill": float(loads.mean() / full), "epoch_hours": float(step_time.sum() / 3600),
            "samples": int(sum(n for step in plan.steps for slot in step for _, n in slot))}


def simulate(args) -> dict:
    from planner import bucket_counts  # benchmarks/planner.py: the assumed stage-10 mix

    from motif_video.model.config import preset
    from motif_video.train.planner import naive_plan, plan_shards

    config = preset("motif-video-2b")
    counts = bucket_counts(args.clips, args.resolution, args.seed)
    seconds = {b: sample_seconds(b, config) for b in counts}
    budget = max(b.latent_tokens for b in counts)
    rows = {}
    for micro in args.micro_batches:
        schedules = {
            "bucketed, one batch": naive_plan(counts, args.ranks, micro_batches_per_step=micro),
            "bucketed, batch per frames": bucketed_per_frames(counts, args.ranks, budget * micro),
            "greedy": plan_shards(counts, args.ranks, budget, micro, iterations=0, seed=args.seed),
            "annealed": plan_shards(counts, args.ranks, budget, micro, seed=args.seed),
        }
        print(f"\n{args.ranks} ranks, {args.clips} clips at {args.resolution}p, {micro} micro-batch(es) per step, "
              f"budget {budget} tokens")
        print(f"  {'schedule':28s} {'steps':>6s} {'spread':>7s} {'util':>6s} {'fill':>6s} {'epoch h':>8s} "
              f"{'samples':>8s}")
        for name, plan in schedules.items():
            r = score(plan, seconds)
            rows[f"{name} x{micro}"] = r
            print(f"  {name:28s} {r['steps']:6d} {r['spread']:7.1%} {r['utilisation']:6.1%} {r['fill']:6.1%} "
                  f"{r['epoch_hours']:8.3f} {r['samples']:8d}")
    return {"clips": args.clips, "ranks": args.ranks, "resolution": args.resolution,
            "counts": {str(b): n for b, n in counts.items()}, "results": rows}


def real(args) -> dict:
    import torch
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from motif_video.train.cached import CachedSample, write_cached_samples

    work = Path(tempfile.mkdtemp(prefix="planner-real-"))
    gen = torch.Generator().manual_seed(0)
    samples = []
    # 1-frame 8x8, 3-frame 8x8 and 5-frame 8x16 latents: 16, 48 and 160 tokens after the 2x2 patch
    for frames, h, w, n in ((1, 8, 8, 48), (3, 8, 8, 24), (5, 8, 16, 12)):
        for i in range(n):
            samples.append(CachedSample(torch.randn(16, frames, h, w, generator=gen),
                                        torch.randn(4, 32, generator=gen), caption=f"{frames}-{i}"))
    cache = write_cached_samples(work / "cache", samples, empty_prompt=(torch.randn(2, 32), torch.ones(2)))
    base = {"seed": 0, "model": {"preset": "motif-video-tiny", "overrides": {"image_embed_dim": None}},
            "optim": {"lr": 1e-4, "steps": 1}, "ema": {"enabled": False},
            "logging": {"every": 1, "tensorboard": None, "progress": False},
            "checkpointing": {"every": 10**6, "save_final": False}}
    budget = 160  # one 5-frame 8x16 sample
    schedules = {
        "bucketed, one batch": {"batch_size": 2},  # 1 per rank: what one budget holds of the largest bucket
        "bucketed, batch per frames": {"batch_size": {1: 20, 9: 6, 17: 2}},  # filled to the budget per frame count
        "greedy": {"planner": "greedy", "planner_max_tokens": budget},
        "annealed": {"planner": "annealed", "planner_max_tokens": budget},
    }
    epoch_samples = len(samples)
    out = {}
    for name, data in schedules.items():
        from motif_video.train.steps import make_steps
        from motif_video.train.config import load_config
        from motif_video.train.cached import CachedLatentDataset
        from motif_video.train.buckets import Bucket, BucketSet

        cfg = load_config(data={**base, "data": {"cache_dirs": [str(cache)], "interleave": "", **data},
                                "output_dir": str(work / "x")})
        ds = CachedLatentDataset([cache])
        buckets = [Bucket.parse(k) for k in ds.bucket_keys]
        bs = BucketSet(buckets)
        source = make_steps(cfg.data, [bs.index(b) for b in buckets], bs, seed=0, rank=0, world=2)
        # steps in one epoch: the planner's plan, or the bucketed sampler's global batches
        steps = len(source.plan(0, [0] * len(source.buckets)).steps) if data.get("planner") else \
            len(source.sampler.batches(0))
        config = {**base, "output_dir": str(work / name.replace(" ", "_").replace(",", "")),
                  "data": {"cache_dirs": [str(cache)], "interleave": "", **data},
                  "optim": {"lr": 1e-4, "steps": steps}}
        path = work / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={port}", "-m", "motif_video.cli", "train", str(path)],
                                env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode:
            raise SystemExit(result.stderr[-3000:])
        log = [json.loads(line) for line in (Path(config["output_dir"]) / "log.jsonl").read_text().splitlines()]
        times = [r["step_time"] for r in log if "step_time" in r]
        trained = epoch_samples if data.get("planner") else sum(
            len(b) for b in source.sampler.batches(0))
        out[name] = {"steps": steps, "epoch_s": float(sum(times[1:]) * steps / max(1, len(times) - 1)),
                     "median_step_s": float(np.median(times[1:])), "samples": trained, "process_s": wall}
        r = out[name]
        print(f"  {name:28s} steps {steps:3d}  epoch {r['epoch_s']:6.2f} s  step {r['median_step_s']:.3f} s  "
              f"samples {trained}/{epoch_samples}")
    return {"samples": epoch_samples, "results": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", action="store_true")
    parser.add_argument("--real", action="store_true")
    parser.add_argument("--clips", type=int, default=12_000)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--resolution", type=int, default=480)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = simulate(args) if args.simulate else real(args) if args.real else parser.error("--simulate or --real")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
