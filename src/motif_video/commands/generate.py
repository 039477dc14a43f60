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
    from ..lora.loader import apply_lora_specs, check_adapters_fit, read_lora_specs
    from ..model.backends import attention_backend, set_attention_backend
    from ..model.step_cache import parse_cache
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
    loras = read_lora_specs(args.lora or [])
    cache = parse_cache(args.cache) if args.cache is not None else None
    out = Path(args.output)
    if out.suffix.lower() not in (".mp4", ".gif", ""):
        raise MotifVideoError(f"unsupported output {out.name}: use .mp4, .gif, or a folder name for PNG frames")
    model = args.model
    if model is None:
        if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
            raise MotifVideoError("no default model is shipped in this installation; pass --model FOLDER")
        model = DEFAULT_MODEL_DIR
    check_adapters_fit(model, loras, gguf=args.gguf is not None)

    backend = attention_backend(args.attention)  # a missing kernel package fails before any model loads

    started = time.perf_counter()
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    pipe = MotifVideoPipeline.from_pretrained(model, gguf=args.gguf, device=args.device, dtype=dtype,
                                              offload=args.offload)
    set_attention_backend(pipe.transformer, backend)
    apply_lora_specs(pipe, loras)
    if args.vae_tiling:
        pipe.enable_vae_tiling()
    if args.compile:
        pipe.compile_transformer()
    generator = torch.Generator().manual_seed(args.seed)
    facts = generate_to_file(
        pipe, out, fps=args.fps, prompt=args.prompt, negative_prompt=args.negative_prompt, image=args.image,
        height=args.height, width=args.width, num_frames=args.frames, num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale, guider=args.guider, shift=args.shift, solver=args.solver,
        encoder_reuse=args.encoder_reuse, encoder_refresh=args.encoder_refresh, cache=cache,
        batch_guidance=False if args.sequential_guidance else None,
        generator=generator, progress=not args.quiet,
    )
    total = time.perf_counter() - started
    print(f"wrote {out} ({facts['frames']} frames, {facts['width']}x{facts['height']}) in {total:.1f} s "
          f"({facts['seconds']:.1f} s generating)")
    if cache is not None:
        print(f"{cache.skipped} of {cache.computed + cache.skipped} transformer calls skipped by the cache")
    return 0
