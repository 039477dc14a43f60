"""Ours vs diffusers' MotifVideoPipeline, side by side in one run, same random weights and initial latents.

Reports seconds per denoising step (from runs of N and 1 steps, so text encoding and VAE decoding cancel out), peak
memory, and the max difference of the decoded frames. Prints a table and writes JSON.

    python benchmarks/vs_diffusers.py --preset motif-video-small --height 128 --width 128 --frames 17 --steps 4
    python benchmarks/vs_diffusers.py --preset motif-video-2b --height 736 --width 1280 --frames 121 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from motif_video.model.backends import ATTENTION_BACKENDS


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-wide high-water mark on CPU


def timed(run, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="motif-video-small")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="alternating repetitions; the best is reported")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt", default="a small red circle moving to the left")
    parser.add_argument("--attention", choices=list(ATTENTION_BACKENDS), default="sdpa",
                        help="our attention kernel (CUDA only; diffusers keeps its default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our transformer blocks")
    parser.add_argument("--json", default="benchmarks/results/vs_diffusers.json")
    args = parser.parse_args()

    from diffusers import MotifVideoPipeline as DiffusersPipeline

    from motif_video import MotifVideoPipeline
    from motif_video.model.backends import set_attention_backend
    from motif_video.testing import save_tiny_pipeline

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_pipeline(Path(tmp) / "model", preset_name=args.preset, text_embed_dim=32,
                                    guidance_scale=args.guidance_scale)
        reference = DiffusersPipeline.from_pretrained(str(folder), torch_dtype=dtype).to(device)
        reference.set_progress_bar_config(disable=True)
        ours = MotifVideoPipeline.from_pretrained(folder, device=str(device), dtype=dtype)
    set_attention_backend(ours.transformer, args.attention)
    if args.compile:
        ours.compile_transformer()

    latent_shape = (1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0))
    common = dict(prompt=args.prompt, negative_prompt="bad quality, blurry", height=args.height, width=args.width,
                  num_frames=args.frames, latents=latents)

    def run_reference(steps):
        return reference(num_inference_steps=steps, output_type="np", **common).frames

    def run_ours(steps):
        return ours(num_inference_steps=steps, guider="cfg", guidance_scale=args.guidance_scale, output_type="np",
                    progress=False, **common)

    results = {}
    for name, run in [("diffusers", run_reference), ("ours", run_ours)]:
        run(1)  # warm-up
    best = {"diffusers": [], "ours": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, run in [("diffusers", run_reference), ("ours", run_ours)]:
            t_full, outputs[name] = timed(lambda: run(args.steps), device)
            t_one, _ = timed(lambda: run(1), device)
            best[name].append((t_full - t_one) / (args.steps - 1))
    for name in best:
        results[name] = {"seconds_per_step": min(best[name])}
    results["max_abs_diff_frames"] = float(np.abs(outputs["ours"] - outputs["diffusers"]).max())
    results["ratio_ours_over_diffusers"] = results["ours"]["seconds_per_step"] / results["diffusers"]["seconds_per_step"]
    results["peak_memory_mb_process"] = peak_memory_mb(device)
    tokens = latent_shape[2] * (latent_shape[3] // 2) * (latent_shape[4] // 2)
    results["config"] = {**vars(args), "video_tokens": tokens, "dtype": str(dtype), "torch": torch.__version__,
                         "threads": torch.get_num_threads()}

    print(f"{'':12s} {'s/step':>10s}")
    for name in ("diffusers", "ours"):
        print(f"{name:12s} {results[name]['seconds_per_step']:10.4f}")
    print(f"ratio ours/diffusers: {results['ratio_ours_over_diffusers']:.3f}   "
          f"max |frames diff|: {results['max_abs_diff_frames']:.2e}   video tokens: {tokens}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
