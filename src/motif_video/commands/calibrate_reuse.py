"""`motif-video calibrate-reuse MODEL --budget K`: where to run the encoder when its output is reused across steps.

Samples a few prompts exactly, measures how far the encoder's output drifts between every pair of steps, and
places K encoder runs where they leave the least drift (motif_video.pipeline.encoder_schedule). With --write the
schedule becomes the model's default (`encoder_refresh` in MODEL/motif_video.json) at its default step count.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-reuse",
        help="choose the steps that run the encoder under encoder reuse (and make them the model's default)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder (the released layout, or the shipped nano model's)")
    p.add_argument("--budget", type=int, required=True, metavar="K", help="encoder runs per video (step 0 included)")
    p.add_argument("--prompt", action="append", default=None, help="a calibration prompt (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds per prompt")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="frame count, 4k+1 (default: the model's)")
    p.add_argument("--write", action="store_true", help="store the schedule in MODEL/motif_video.json")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import MotifVideoError
    from ..pipeline.encoder_schedule import (CALIBRATION_PROMPTS, fallback_reuse, measure_drift, plan_refresh,
                                             reuse_error, save_schedule, uniform_refresh)
    from ..files import check_writable_dir
    from ..pipeline.pipeline import MotifVideoPipeline, check_sampling

    if args.steps is not None:
        check_sampling(args.steps)
    for name, value in (("--height", args.height), ("--width", args.width), ("--frames", args.frames)):
        if value is not None and value < 1:
            raise MotifVideoError(f"{name} must be >= 1, got {value}")
    if args.budget < 1:
        raise MotifVideoError(f"--budget must be >= 1, got {args.budget}")
    if args.write:
        if not Path(args.model).is_dir():
            raise MotifVideoError(f"--write needs a local model folder, got {args.model}")
        check_writable_dir(args.model, "schedule")  # before minutes of sampling, not after
    pipe = MotifVideoPipeline.from_pretrained(args.model, device=args.device)
    steps = pipe.defaults.num_inference_steps if args.steps is None else args.steps
    if not 1 <= args.budget <= steps:
        raise MotifVideoError(f"--budget must be in [1, {steps}], got {args.budget}")
    if args.write and steps != pipe.defaults.num_inference_steps:
        raise MotifVideoError(f"--write stores a schedule for the default step count "
                              f"({pipe.defaults.num_inference_steps}); drop --steps")
    prompts = args.prompt or list(CALIBRATION_PROMPTS)
    drift = measure_drift(pipe, prompts, args.seeds, num_inference_steps=steps, height=args.height,
                          width=args.width, num_frames=args.frames)
    refresh = plan_refresh(drift, args.budget)
    uniform_reuse = fallback_reuse(steps, args.budget)
    uniform = uniform_refresh(steps, uniform_reuse)
    print(f"encoder drift between neighbouring steps: {' '.join(f'{drift[i, i - 1]:.3f}' for i in range(1, steps))}")
    print(f"planned refresh steps ({args.budget} of {steps}): {','.join(map(str, refresh))}  "
          f"reuse error {reuse_error(drift, refresh):.3f}")
    print(f"uniform, every {uniform_reuse} ({len(uniform)} of {steps}): {','.join(map(str, uniform))}  "
          f"reuse error {reuse_error(drift, uniform):.3f}")
    if args.write:
        print(f"wrote the schedule into {save_schedule(args.model, refresh, steps)}")
    return 0
