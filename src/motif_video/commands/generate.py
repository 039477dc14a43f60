"""`motif-video generate "PROMPT" -o out.mp4`: text-to-video (or image-to-video with --image)."""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from ..model.backends import ATTENTION_BACKENDS

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "motif-video-nano"  # hub.BUILTIN_MODELS[0]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def register(subparsers) -> None:
    from ..pipeline.guidance import GUIDERS
    from ..pipeline.sampler import SOLVERS

    p = subparsers.add_parser(
        "generate",
        help="generate a video from a prompt (and optionally a first frame)",
        description="Generate a video. Without --model, uses the small model shipped with the package; pass a "
                    "folder in the released layout (e.g. a download of Motif-Technologies/Motif-Video-2B) or a hub "
                    "id for the 2B model. Unset options take the model's defaults (release: 1280x736, 121 frames, "
                    "50 steps, APG scale 8, shift 15 for T2V / 8 for I2V).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", default=None, help="what the video shows (or give --prompts)")
    p.add_argument("-o", "--output", required=True,
                   help="output file: .mp4 (H.264), .gif, or a folder for PNG frames. An existing file is replaced "
                        "once the new one is complete; an existing folder only if it is empty or holds a previous "
                        "frame output (see --overwrite). With --prompts: the folder of the clips")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="one clip per prompt of FILE (.txt, one per line, or .jsonl with 'prompt' or 'caption'), "
                        "written to the folder -o as 0000.mp4 with its prompt in 0000.txt (what `motif-video eval` "
                        "reads); clip i has seed --seed + i, so it equals `generate PROMPT_i --seed SEED+i`")
    p.add_argument("--batch-size", type=int, default=8, help="with --prompts: clips generated together")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing frame folder that holds our video.json even when other files are in it")
    p.add_argument("--model", default=None,
                   help="model folder, hub id, or a built-in name: motif-video-nano (the default) or "
                        "motif-video-nano-fast (its 4-step guidance-free distilled student: ~10x fewer transformer FLOPs, "
                        "lower quality; docs/distill.md)")
    p.add_argument("--gguf", default=None, help="GGUF transformer file to use instead of the folder's transformer")
    p.add_argument("--image", default=None, help="first frame (PNG/JPEG) for image-to-video")
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                   help="LoRA adapter (a file, or the lora/ folder training writes; diffusers, ComfyUI/kohya or "
                        "original-layout keys) with an optional scale, default 1; repeat for several adapters")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16")
    p.add_argument("--frames", type=int, default=None, help="frame count, 4k+1 (e.g. 17, 33, 121)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=None, help="guidance scale (1 disables guidance)")
    p.add_argument("--guider", choices=list(GUIDERS), default=None, help="guidance method")
    p.add_argument("--shift", type=float, default=None, help="flow-matching schedule shift")
    p.add_argument("--solver", choices=list(SOLVERS), default=None, help="sampler")
    p.add_argument("--encoder-reuse", type=int, default=None, metavar="K",
                   help="run the encoder on every K-th step only and reuse its output (faster, approximate; 1: "
                        "exact). Default: the model's (a calibrated schedule for the shipped nano model, exact for the "
                        "release)")
    p.add_argument("--encoder-refresh", type=_step_list, default=None, metavar="I,J,...",
                   help="the 0-based steps that run the encoder (must include 0); overrides --encoder-reuse")
    p.add_argument("--cache", default=None, metavar="KIND:SETTING",
                   help="training-free step cache (approximate, skips the transformer's blocks on some steps): "
                        "fbcache:THRESHOLD (first-block cache, e.g. 0.05), magcache:THRESHOLD[:MAX_SKIP[:RETENTION]] "
                        "(needs `motif-video calibrate-cache MODEL --write` once), taylorseer:INTERVAL[:ORDER[:WARMUP]];"
                        " threshold 0 / interval 1 is exact")
    p.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: the release's)")
    p.add_argument("--fps", type=int, default=None, help="frames per second of the written video")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="compute dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--offload", action="store_true", help="keep only the active component on the GPU")
    p.add_argument("--sequential-guidance", action="store_true",
                   help="run the conditional and unconditional passes one after the other (half the activations)")
    p.add_argument("--vae-tiling", action="store_true", help="decode the VAE in tiles to save memory")
    p.add_argument("--attention", choices=list(ATTENTION_BACKENDS), default="sdpa",
                   help="attention kernel: PyTorch SDPA, the plain reference formula, flash-attn on CUDA (exact) or "
                        "SageAttention on CUDA (int8, approximate); flash and sage need their package installed")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks (CUDA; the first step pays the compile time)")
    p.add_argument("--ulysses", type=int, default=None, metavar="U",
                   help="under torchrun: Ulysses degree (must divide the heads; default: the largest that divides "
                        "the heads and the processes)")
    p.add_argument("--ring", type=int, default=None, metavar="R",
                   help="under torchrun: ring-attention degree (default: the processes Ulysses leaves)")
    p.add_argument("--cfg-parallel", action="store_true",
                   help="under torchrun: the conditional and unconditional passes on two halves of the processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _step_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step numbers, got {text!r}") from None


def run(args) -> int:
    import torch

    from ..errors import MotifVideoError, warn
    from ..latents import check_video_size
    from ..lora.loader import apply_lora_specs, check_adapters_fit, read_lora_specs
    from ..model.backends import attention_backend, set_attention_backend
    from ..model_folder import default_device_dtype
    from ..pipeline.pipeline import MotifVideoPipeline, check_sampling, generate_to_file
    from ..model.step_cache import parse_cache
    from ..pipeline.text import check_prompt
    from ..pipeline.video_io import check_output

    # Cheap checks first, so bad input fails before any model loads and before minutes of work.
    batch = _check_batch(args) if args.prompts is not None else None
    if batch is None:
        if args.prompt is None:
            raise MotifVideoError("give a prompt, or --prompts FILE for one clip per line of FILE")
        check_prompt(args.prompt)
    _check_given_size(args, check_video_size)
    if args.steps is not None or args.guidance_scale is not None or args.shift is not None:
        check_sampling(1 if args.steps is None else args.steps, args.guidance_scale, args.shift)
    if args.fps is not None and args.fps < 1:
        raise MotifVideoError(f"--fps must be >= 1, got {args.fps}")
    if args.encoder_reuse is not None and args.encoder_reuse < 1:
        raise MotifVideoError(f"--encoder-reuse must be >= 1, got {args.encoder_reuse}")
    if not 0 <= args.seed <= 2**64 - len(batch or [None]):
        raise MotifVideoError("--seed must be in [0, 2^64)" + (" less the number of prompts" if batch else "")
                              + f", got {args.seed}")
    for flag, value, what in (("--image", args.image, "image"), ("--gguf", args.gguf, "GGUF")):
        if value is not None and Path(value).is_dir():
            raise MotifVideoError(f"{flag} {value} is a folder; give the {what} file")
        if value is not None and not Path(value).is_file():
            raise MotifVideoError(f"{what} file not found: {value}")
    loras = read_lora_specs(args.lora or [])
    cache = parse_cache(args.cache) if args.cache is not None else None
    out = Path(args.output)
    if batch is None:
        check_output(args.output, overwrite=args.overwrite)
    model = args.model
    if model is None:
        if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
            raise MotifVideoError("no default model is shipped in this installation; pass --model FOLDER")
        model = DEFAULT_MODEL_DIR
    check_adapters_fit(model, loras, gguf=args.gguf is not None)
    device, dtype = default_device_dtype(args.device, getattr(torch, DTYPES[args.dtype]) if args.dtype else None)
    if device.type == "cpu" and dtype != torch.float32:
        warn(f"{args.dtype} on the CPU runs many times slower than fp32 (no fast half-precision matmuls there)")
    if args.compile and device.type == "cpu":
        warn("--compile on the CPU needs a C++ compiler and usually runs slower than without it; it pays off on CUDA")
    check_memory(model, device, dtype, args)

    backend = attention_backend(args.attention)  # a missing kernel package fails before any model loads
    grid = _context_grid(args, model)

    started = time.perf_counter()
    pipe = MotifVideoPipeline.from_pretrained(model, gguf=args.gguf, device=str(device), dtype=dtype,
                                              offload=args.offload)
    set_attention_backend(pipe.transformer, backend)
    apply_lora_specs(pipe, loras)
    if grid is not None:
        from ..parallel import apply_context_parallel
        from ..parallel.guidance import ParallelGuidanceBranches

        apply_context_parallel(pipe.transformer, grid)
        if grid.shape.cfg == 2:
            pipe.guidance_branches = ParallelGuidanceBranches(grid)
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    if args.compile:
        pipe.compile_transformer()
    generator = torch.Generator().manual_seed(args.seed)  # the same noise on every rank
    options = dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt, image=args.image,
        height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, guider=args.guider, shift=args.shift, solver=args.solver,
        encoder_reuse=args.encoder_reuse, encoder_refresh=args.encoder_refresh, cache=cache,
        batch_guidance=False if args.sequential_guidance else None, generator=generator, progress=not args.quiet,
    )
    if batch is not None:
        return _generate_batch(pipe, batch, out, args, options, started)
    if grid is not None and grid.rank != 0:  # every rank denoises; rank 0 alone decodes and writes
        pipe(output_type="latent", **{**options, "progress": False})
        return 0
    facts = generate_to_file(pipe, out, fps=args.fps, overwrite=args.overwrite, **options)
    total = time.perf_counter() - started
    print(f"wrote {out} ({facts['frames']} frames, {facts['width']}x{facts['height']}) in {total:.1f} s "
          f"({facts['seconds']:.2f} s generating)")
    if cache is not None:
        print(f"{cache.skipped} of {cache.computed + cache.skipped} transformer calls skipped by the cache")
    return 0


_BATCH_FILE = re.compile(r"^\d{4,}\.(mp4|txt)$")


def _check_batch(args) -> list[str]:
    """The prompts of --prompts, after the checks that need no model: the options it rules out and the folder."""
    from ..errors import MotifVideoError
    from ..eval.prompts import load_prompt_file
    from ..files import check_writable_dir
    from ..parallel.launch import launched_world

    if args.prompt is not None:
        raise MotifVideoError("give either a prompt or --prompts FILE, not both")
    if args.image is not None:
        raise MotifVideoError("--image makes one clip from one first frame; it does not combine with --prompts")
    if launched_world() > 1:
        raise MotifVideoError("--prompts runs in one process; launch it without torchrun")
    if args.batch_size < 1:
        raise MotifVideoError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = [row["prompt"].strip() for row in load_prompt_file(args.prompts)]
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise MotifVideoError(f"with --prompts, -o is the folder of the clips; {out} is a file")
    if out.is_dir():
        names = [e.name for e in os.scandir(out)]
        if names and not args.overwrite:
            raise MotifVideoError(f"{out} is not empty; pass --overwrite to replace the clips of an earlier "
                                  "--prompts run there, or give a new folder")
        if any(not _BATCH_FILE.match(n) for n in names):
            raise MotifVideoError(f"{out} holds files that --prompts did not write; give a new or empty folder")
    check_writable_dir(next(p for p in (out.absolute(), *out.absolute().parents) if p.exists()), "clips")
    return prompts


def _generate_batch(pipe, prompts: list[str], out: Path, args, options: dict, started: float) -> int:
    """One clip per prompt, `--batch-size` at a time; clip i draws its noise from seed + i alone."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from ..files import atomic_write_text
    from ..pipeline.video_io import write_video

    out.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(out):  # stale clips of a longer earlier run would otherwise join the evaluation
        if _BATCH_FILE.match(entry.name):
            os.unlink(entry.path)
    digits = max(4, len(str(len(prompts) - 1)))
    fps = pipe.defaults.fps if args.fps is None else args.fps
    generating = 0.0
    with tqdm(total=len(prompts), unit="clip", disable=True if args.quiet else None) as bar:
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            generators = [torch.Generator().manual_seed(args.seed + start + k) for k in range(len(chunk))]
            began = time.perf_counter()
            clips = pipe(output_type="np", **{**options, "prompt": chunk, "generator": generators, "progress": False})
            generating += time.perf_counter() - began
            for k, (prompt, clip) in enumerate(zip(chunk, clips)):
                name = f"{start + k:0{digits}d}"
                write_video((clip * 255).round().astype(np.uint8), out / f"{name}.mp4", fps=fps)
                atomic_write_text(out / f"{name}.txt", prompt + "\n")
            bar.update(len(chunk))
    print(f"wrote {len(prompts)} clips with their prompts to {out} in {time.perf_counter() - started:.1f} s "
          f"({generating:.1f} s generating)")
    return 0


def _check_given_size(args, check_video_size) -> None:
    """The sizes the user gave, each on its own: a missing one takes the model's default later, so it must not be
    filled with a placeholder here (that once made `--height 60` report "got 60x16")."""
    from ..errors import MotifVideoError

    for name, value in (("--height", args.height), ("--width", args.width), ("--frames", args.frames)):
        if value is not None and value < 1:
            raise MotifVideoError(f"{name} must be >= 1, got {value}")
    if args.frames is not None:
        check_video_size(16, 16, args.frames)
    for name, value in (("height", args.height), ("width", args.width)):
        if value is not None and value % 16:
            raise MotifVideoError(f"{name} must be a positive multiple of 16, got {value}")


def required_memory(config, defaults, dtype, height: int, width: int, frames: int, guidance: bool,
                    vae_channels: int = 96) -> int:
    """Bytes a generation needs at its peak, roughly: the transformer's weights and activations as `motif-video
    estimate` computes them, plus the VAE decoder's widest activations (its first stage holds about three
    `vae_channels`-wide fp32 tensors over a 4-frame chunk at full resolution) and the decoded video (float32, held
    about four times over while it is scaled, clamped and permuted to frames)."""
    import torch

    from .estimate import estimate

    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    result = estimate(config, height, width, frames, dtypes=(name,), steps=1, guidance=guidance,
                      text_tokens=defaults.max_sequence_length)
    pixels = height * width
    return result["memory"][name]["total_bytes"] + 3 * vae_channels * 4 * pixels * 4 + 4 * frames * pixels * 3 * 4


def check_memory(model, device, dtype, args) -> None:
    """Refuse at once a size whose generation cannot fit in memory (instead of failing after minutes of work)."""
    from ..convert.checkpoint import load_any_config
    from ..errors import MotifVideoError
    from ..model_folder import ModelFolder
    from .estimate import available_memory

    model_folder = ModelFolder(model)
    folder, defaults = model_folder.path, model_folder.defaults
    config = load_any_config(folder)
    height = defaults.height if args.height is None else args.height
    width = defaults.width if args.width is None else args.width
    frames = defaults.num_frames if args.frames is None else args.frames
    scale = defaults.guidance_scale if args.guidance_scale is None else args.guidance_scale
    try:
        vae_channels = int(json.loads((folder / "vae" / "config.json").read_text()).get("base_dim", 96))
    except (OSError, ValueError, TypeError, AttributeError):
        vae_channels = 96  # an unreadable VAE config fails with its own message when the model loads
    need = required_memory(config, defaults, dtype, height, width, frames, scale != 1.0, vae_channels)
    have = available_memory(device)
    if need > have:
        raise MotifVideoError(f"{width}x{height} with {frames} frames needs about {need / 2**30:.1f} GiB of memory "
                              f"on {device}, but only {have / 2**30:.1f} GiB is available; lower the size or frames")
def _context_grid(args, model):
    """Under torchrun (WORLD_SIZE > 1): join the process group and build the grid, every rank failing alike on a
    bad one; None in a single process."""
    import json

    from ..errors import MotifVideoError
    from ..model_folder import transformer_folder
    from ..parallel.launch import agree_on_error, init_distributed, launched_world

    asked = args.ulysses is not None or args.ring is not None or args.cfg_parallel
    if launched_world() == 1:
        if asked and (args.ulysses or 1) * (args.ring or 1) * (2 if args.cfg_parallel else 1) > 1:
            raise MotifVideoError("--ulysses, --ring and --cfg-parallel need several processes: launch with "
                                  "torchrun --nproc_per_node N -m motif_video.cli generate ...")
        return None
    from ..parallel.grid import ContextGrid, GridShape, check_grid, default_shape

    device = init_distributed(args.device)
    args.device = str(device)
    error = None
    try:
        heads = json.loads((transformer_folder(model) / "config.json").read_text())["num_attention_heads"]
        world = launched_world()
        if args.ulysses is None and args.ring is None:
            shape = default_shape(world, heads, cfg=args.cfg_parallel)
        else:
            branches = 2 if args.cfg_parallel else 1
            u = args.ulysses or max(1, world // (branches * (args.ring or 1)))
            r = args.ring or max(1, world // (branches * u))
            shape = GridShape(ulysses=u, ring=r, cfg=branches)
        check_grid(shape, world, heads)
    except MotifVideoError as e:
        error = e
    agree_on_error(error)
    return ContextGrid(shape, heads)
