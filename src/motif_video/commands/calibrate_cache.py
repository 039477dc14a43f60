"""`motif-video calibrate-cache MODEL`: MagCache's per-step magnitude ratios for a model.

Samples a few generic prompts exactly and records how the magnitude of the transformer blocks' residual changes from
step to step (motif_video.pipeline.step_calibration). With --write the ratios go into MODEL/motif_video.json
(`magcache_ratios`), where `--cache magcache:THRESHOLD` and `MagCache()` take them; other step counts interpolate.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-cache",
        help="calibrate MagCache (per-step residual magnitude ratios) and store it in the model folder",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder (the released layout, or the shipped nano model's)")
    p.add_argument("--prompt", action="append", default=None, help="a calibration prompt (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds per prompt")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--write", action="store_true", help="store the ratios in MODEL/motif_video.json")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import MotifVideoError
    from ..pipeline.encoder_schedule import CALIBRATION_PROMPTS
    from ..pipeline.pipeline import MotifVideoPipeline
    from ..pipeline.step_calibration import calibrate_magnitudes, save_magnitudes

    if args.write and not Path(args.model).is_dir():
        raise MotifVideoError(f"--write needs a local model folder, got {args.model}")
    if args.steps is not None and args.steps < 2:
        raise MotifVideoError(f"--steps must be at least 2, got {args.steps}")
    pipe = MotifVideoPipeline.from_pretrained(args.model, device=args.device)
    ratios = calibrate_magnitudes(pipe, args.prompt or list(CALIBRATION_PROMPTS), args.seeds,
                                  num_inference_steps=args.steps)
    print(f"residual magnitude ratio per step: {' '.join(f'{r:.3f}' for r in ratios)}")
    if args.write:
        print(f"wrote the ratios into {save_magnitudes(args.model, ratios)}")
    return 0
