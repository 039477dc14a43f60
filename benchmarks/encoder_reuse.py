"""Encoder reuse (DDT-style): our pipeline with encoder_reuse = 1 (exact) vs 2 vs 3, in one run.

Same random weights, same initial latents, same prompt and guidance for every variant. Seconds per denoising step
come from runs of N and 1 steps to latents ((t_N - t_1) / (N - 1): text encoding and the first step, which always
runs the encoder, cancel out), repeated with the variants interleaved; the fastest N-step and 1-step runs are
used. With N - 1 a multiple of every K, the N-step run holds each K's steady-state share of encoder runs (1/K).
Reported: the speedup in wall time and in process CPU time; the steady state from the fastest transformer call of
each kind (full forward, encoder reused; timed by module hooks, the figure least disturbed by other jobs); the FLOP
ratio from motif_video.flops (the ceiling when matmuls dominate); and the max difference of the decoded frames
(values in [0, 1]) and of the final latents from the exact run. Random weights say nothing about visual quality;
the differences only show that reuse is approximate and how it grows with K.

    nice -n 10 python benchmarks/encoder_reuse.py --preset motif-video-small --height 128 --width 128 --frames 17
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="motif-video-small")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--reuse", type=int, nargs="+", default=[1, 2, 3], help="encoder_reuse values; 1 = exact")
    parser.add_argument("--steps", type=int, default=None,
                        help="N of the long run (default: 1 + the least common multiple of --reuse)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repetitions; the best is reported")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (1 avoids OpenMP barrier stalls when other jobs share the cores)")
    parser.add_argument("--prompt", default="a small red circle moving to the left")
    parser.add_argument("--json", default="benchmarks/results/encoder_reuse.json")
    args = parser.parse_args(argv)
    if 1 not in args.reuse:
        parser.error("--reuse must include 1, the exact reference")
    steps = args.steps or 1 + math.lcm(*args.reuse)
    if steps < 2:
        parser.error("--steps must be at least 2")

    from motif_video import MotifVideoPipeline
    from motif_video.flops import forward_flops, sampling_flops, video_tokens
    from motif_video.latents import LATENT_CHANNELS, latent_shape
    from motif_video.model_folder import default_dtype
    from motif_video.testing import save_tiny_pipeline

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = default_dtype(device)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_pipeline(Path(tmp) / "model", preset_name=args.preset, guidance_scale=args.guidance_scale)
        pipe = MotifVideoPipeline.from_pretrained(folder, device=str(device), dtype=dtype)
    latent_grid = latent_shape(args.frames, args.height, args.width)
    latents = torch.randn((1, LATENT_CHANNELS, *latent_grid), generator=torch.Generator().manual_seed(0))
    common = dict(prompt=args.prompt, negative_prompt="bad quality, blurry", height=args.height, width=args.width,
                  num_frames=args.frames, latents=latents, guider="cfg", guidance_scale=args.guidance_scale,
                  progress=False)

    def timed(reuse: int, n: int):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        out = pipe(num_inference_steps=n, encoder_reuse=reuse, output_type="latent", **common)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start, time.process_time() - cpu_start), out

    # Every transformer call is timed too, by kind: a full forward, or one that reuses the cached encoder output.
    calls = {"full": [], "reuse": []}

    def before(module, args_, kwargs):
        cache = kwargs.get("encoder_cache")
        module._timing = ("reuse" if cache is not None and not cache.refresh else "full", time.perf_counter())

    def after(module, args_, kwargs, output):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        kind, start = module._timing
        calls[kind].append(time.perf_counter() - start)

    pipe.transformer.register_forward_pre_hook(before, with_kwargs=True)
    pipe.transformer.register_forward_hook(after, with_kwargs=True)

    for k in args.reuse:
        timed(k, 1)  # warm-up
    runs = {k: {"full": [], "one": []} for k in args.reuse}  # (wall, cpu) seconds of N-step and 1-step runs
    final_latents = {}
    for rep in range(args.repeats):
        order = args.reuse if rep % 2 == 0 else args.reuse[::-1]  # alternate so drift hits every variant alike
        for k in order:
            t_full, final_latents[k] = timed(k, steps)
            t_one, _ = timed(k, 1)
            runs[k]["full"].append(t_full)
            runs[k]["one"].append(t_one)

    def per_step(k: int, clock: int) -> float:
        """(best N-step run - best 1-step run) / (N - 1): each minimum is the run other jobs disturbed least."""
        return (min(t[clock] for t in runs[k]["full"]) - min(t[clock] for t in runs[k]["one"])) / (steps - 1)
    # decoded as the pipeline does: [-1, 1] -> [0, 1]
    frames = {k: ((pipe.codec.decode(v) + 1) / 2).clamp(0, 1).float().cpu() for k, v in final_latents.items()}

    config = pipe.transformer.config
    text_len = max(pipe.prompts.encode([p])[0].shape[1] for p in (args.prompt, common["negative_prompt"]))
    fwd = forward_flops(config, video_tokens(config, latent_grid), text_len, 0, batch=2)
    exact, exact_cpu = per_step(1, 0), per_step(1, 1)
    call_full, call_reuse = min(calls["full"]), min(calls["reuse"] or [float("nan")])
    results = {}
    for k in args.reuse:
        # FLOPs of steps 1..N-1, the span the timing measures
        flops = sampling_flops(fwd, steps, k) - sampling_flops(fwd, 1, k)
        # steady state from the fastest transformer call of each kind: one full forward in K steps
        call_step = (call_full + (k - 1) * call_reuse) / k
        results[str(k)] = {
            "seconds_per_step": per_step(k, 0),
            "speedup": exact / per_step(k, 0),
            "cpu_seconds_per_step": per_step(k, 1),
            "cpu_speedup": exact_cpu / per_step(k, 1),
            "transformer_seconds_per_step": call_step,
            "transformer_speedup": call_full / call_step,
            "runs_wall_cpu_seconds": runs[k],
            "flops_per_step": flops / (steps - 1),
            "flops_speedup": (sampling_flops(fwd, steps, 1) - sampling_flops(fwd, 1, 1)) / flops,
            "max_abs_diff_frames": float((frames[k] - frames[1]).abs().max()),
            "max_abs_diff_latents": float((final_latents[k] - final_latents[1]).abs().max()),
            "latent_rms": float(final_latents[1].pow(2).mean().sqrt()),
        }
    tokens = video_tokens(config, latent_grid)
    report = {
        "results": results,
        "transformer_call_seconds": {"full_min": call_full, "reuse_min": call_reuse, "full": calls["full"],
                                     "reuse": calls["reuse"]},
        "config": {**vars(args), "steps": steps, "video_tokens": tokens, "text_tokens": text_len,
                   "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "machine": platform.machine(),
                   "date": time.strftime("%Y-%m-%d")},
    }

    print(f"{args.preset}, {args.width}x{args.height}x{args.frames} ({tokens} video tokens), CFG batch 2, runs of "
          f"{steps} and 1 steps, fastest of {args.repeats}, {device}, {torch.get_num_threads()} threads")
    print(f"fastest transformer call: full {call_full:.3f} s, reusing the encoder {call_reuse:.3f} s")
    print("| encoder_reuse | s/step | speedup | CPU s/step | CPU speedup | transformer s/step | speedup | "
          "FLOP speedup | max frame diff | max latent diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k, r in results.items():
        print(f"| {k} | {r['seconds_per_step']:.3f} | {r['speedup']:.2f}x | {r['cpu_seconds_per_step']:.3f} | "
              f"{r['cpu_speedup']:.2f}x | {r['transformer_seconds_per_step']:.3f} | {r['transformer_speedup']:.2f}x | "
              f"{r['flops_speedup']:.2f}x | {r['max_abs_diff_frames']:.2e} | {r['max_abs_diff_latents']:.2e} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
