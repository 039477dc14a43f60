"""`motif-video analyze "PROMPT" --out DIR`: per-block attention across frames (heatmaps, JSON, summary page)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..model.backends import ATTENTION_BACKENDS
from .generate import DEFAULT_MODEL_DIR, _step_list


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="per-block attention across frames while sampling a prompt",
        description="Sample PROMPT (exactly: no encoder reuse) with a recording attention backend and write, for "
                    "each block's self-attention at the chosen steps, the share of each video frame's attention "
                    "that goes to every frame and to the text: a heatmap per block (heatmaps/), attention.json, "
                    "summary.md and summary.png. Under guidance the conditional branch is recorded; maps are "
                    "averaged over heads. Queries are processed in chunks, so no full attention map is held.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("prompt", help="what the video shows")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None, help="model folder or hub id (default: the shipped nano model)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--at-steps", type=_step_list, default=None, metavar="I,J,...",
                   help="0-based steps to record (default: the first, middle and last)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="frame count, 4k+1 (default: the model's)")
    p.add_argument("--per-head", action="store_true", help="also store every head's map in attention.json")
    p.add_argument("--chunk-mib", type=int, default=512,
                   help="memory for one chunk of attention scores (more: fewer, larger matmuls)")
    p.add_argument("--attention", choices=list(ATTENTION_BACKENDS), default="sdpa",
                   help="the kernel that computes the model's outputs (the recording is exact fp32 regardless)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import MotifVideoError
    from ..eval.attention_report import analyze, check_out_dir, check_steps
    from ..latents import PIXELS_PER_TOKEN, check_video_size
    from ..model.backends import attention_backend
    from ..model_folder import ModelFolder
    from ..pipeline.pipeline import MotifVideoPipeline
    from ..pipeline.text import check_prompt

    # Cheap checks first, so bad input fails before any model loads.
    check_prompt(args.prompt)
    if args.frames is not None or args.height is not None or args.width is not None:
        check_video_size(args.height or PIXELS_PER_TOKEN, args.width or PIXELS_PER_TOKEN, args.frames or 1)
    if args.chunk_mib < 1:
        raise MotifVideoError(f"--chunk-mib must be at least 1, got {args.chunk_mib}")
    if args.model is None and not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise MotifVideoError("no default model is shipped in this installation; pass --model FOLDER")
    folder = ModelFolder(args.model or DEFAULT_MODEL_DIR)
    steps = args.steps if args.steps is not None else folder.defaults.num_inference_steps
    at_steps = check_steps(args.at_steps, steps)
    out = check_out_dir(args.out)
    inner = attention_backend(args.attention)

    started = time.perf_counter()
    pipe = MotifVideoPipeline.from_pretrained(folder.path, device=args.device)
    report = analyze(pipe, args.prompt, out, model_name=Path(args.model).name if args.model else DEFAULT_MODEL_DIR.name,
                     steps=steps, at_steps=at_steps, seed=args.seed, per_head=args.per_head,
                     chunk_bytes=args.chunk_mib * 2**20, inner=inner, progress=not args.quiet,
                     height=args.height, width=args.width, num_frames=args.frames)
    print(report["files"]["markdown"].read_text(), end="")
    print(f"wrote {out} ({len(report['files']['heatmaps'])} block heatmaps, attention.json, summary.md, summary.png) "
          f"in {time.perf_counter() - started:.1f} s")
    return 0
