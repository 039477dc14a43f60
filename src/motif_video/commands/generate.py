"""`motif-video generate "PROMPT" -o out.mp4`: text-to-video (or image-to-video with --image)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..model.backends import ATTENTION_BACKENDS

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "motif-video-nano"
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
    p.add_argument("prompt", help="what the video shows")
    p.add_argument("-o", "--output", required=True, help="output file: .mp4 (H.264), .gif, or a folder for PNG frames")
    p.add_argument("--model", default=None, help="model folder or hub id (default: the shipped nano model)")
    p.add_argument("--gguf", default=None, help="GGUF transformer file to use instead of the folder's transformer")
    p.add_argument("--image", default=None, help="first frame (PNG/JPEG) for image-to-video")
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

    from ..errors import MotifVideoError
    from ..latents import PIXELS_PER_TOKEN, check_video_size
    from ..model.backends import attention_backend, set_attention_backend
    from ..pipeline.pipeline import MotifVideoPipeline, generate_to_file
    from ..pipeline.text import check_prompt

    # Cheap checks first, so bad input fails before any model loads.
    check_prompt(args.prompt)
    if args.frames is not None or args.height is not None or args.width is not None:
        check_video_size(args.height or PIXELS_PER_TOKEN, args.width or PIXELS_PER_TOKEN, args.frames or 1)
    if args.image is not None and not Path(args.image).is_file():
        raise MotifVideoError(f"image file not found: {args.image}")
    if args.gguf is not None and not Path(args.gguf).is_file():
        raise MotifVideoError(f"GGUF file not found: {args.gguf}")
    out = Path(args.output)
    if out.suffix.lower() not in (".mp4", ".gif", ""):
        raise MotifVideoError(f"unsupported output {out.name}: use .mp4, .gif, or a folder name for PNG frames")
    model = args.model
    if model is None:
        if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
            raise MotifVideoError("no default model is shipped in this installation; pass --model FOLDER")
        model = DEFAULT_MODEL_DIR

    backend = attention_backend(args.attention)  # a missing kernel package fails before any model loads
    grid = _context_grid(args, model)

    started = time.perf_counter()
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    pipe = MotifVideoPipeline.from_pretrained(model, gguf=args.gguf, device=args.device, dtype=dtype,
                                              offload=args.offload)
    set_attention_backend(pipe.transformer, backend)
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
        encoder_reuse=args.encoder_reuse, encoder_refresh=args.encoder_refresh, batch_guidance=False if args.sequential_guidance else None,
        generator=generator, progress=not args.quiet,
    )
    if grid is not None and grid.rank != 0:  # every rank denoises; rank 0 alone decodes and writes
        pipe(output_type="latent", **{**options, "progress": False})
        return 0
    facts = generate_to_file(pipe, out, fps=args.fps, **options)
    total = time.perf_counter() - started
    print(f"wrote {out} ({facts['frames']} frames, {facts['width']}x{facts['height']}) in {total:.1f} s "
          f"({facts['seconds']:.1f} s generating)")
    return 0


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
