"""`motif-video distill-data TEACHER OUT --prompts FILE --student-steps 4`: the teacher's trajectories, sampled once.

The teacher samples every prompt with its own guidance and step count (its defaults unless overridden), each from
its own seeded noise, and the states it passes through at the student's schedule are written to OUT (a cache for
`objective.kind: distill`, train/distill.py), with the prompts' text states. The index is written last, so an
interrupted run leaves no cache that reads as complete.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill-data",
        help="sample a teacher once and cache its trajectories for few-step distillation",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("teacher", help="teacher model folder (or built-in name / hub id)")
    p.add_argument("output", help="new folder for the trajectory cache")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", type=Path, default=None,
                        help="prompts: a .jsonl file (a 'prompt' or 'caption' per line) or a text file, one per line")
    source.add_argument("--nano-prompts", type=int, default=None, metavar="N",
                        help="N prompts in the nano model's training wording (nano-data's captions)")
    p.add_argument("--student-steps", type=int, default=4, help="the student's Euler steps (divides the teacher's)")
    p.add_argument("--steps", type=int, default=None, help="the teacher's steps (default: its own)")
    p.add_argument("--guidance-scale", type=float, default=None, help="the teacher's guidance (default: its own)")
    p.add_argument("--encoder-reuse", type=int, default=1, metavar="K",
                   help="the teacher's encoder reuse (1: exact, the most accurate trajectories)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the teacher's)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the teacher's)")
    p.add_argument("--frames", type=int, default=None, help="frame count, 4k+1 (default: the teacher's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (clip i: its own stream) and nano prompts")
    p.add_argument("--batch", type=int, default=32, help="prompts sampled together")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.set_defaults(func=run)


def read_prompts(path: Path) -> list[str]:
    from ..errors import MotifVideoError

    if not path.is_file():
        raise MotifVideoError(f"prompt file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise MotifVideoError(f"{path}:{number} is not JSON") from None
            text = row.get("prompt") or row.get("caption") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise MotifVideoError(f"{path}:{number} has no 'prompt' or 'caption'")
            prompts.append(text)
        else:
            prompts.append(line.strip())
    if not prompts:
        raise MotifVideoError(f"{path} holds no prompts")
    return prompts


def run(args) -> int:
    from ..errors import MotifVideoError
    from ..pipeline.pipeline import MotifVideoPipeline
    from ..train.distill import read_trajectory_index, write_trajectories

    if args.nano_prompts is not None and args.nano_prompts < 1:
        raise MotifVideoError("--nano-prompts must be >= 1")
    if args.batch < 1 or args.student_steps < 1:
        raise MotifVideoError("--batch and --student-steps must be >= 1")
    if args.encoder_reuse < 1:
        raise MotifVideoError("--encoder-reuse must be >= 1")
    out = Path(args.output)
    if (out / "index.json").exists():
        raise MotifVideoError(f"{out} already holds a trajectory cache; choose another folder")
    if args.prompts is not None:
        prompts = read_prompts(args.prompts)
    else:
        from ..nano.data import train_prompts

        prompts = train_prompts(args.nano_prompts, seed=args.seed)
    pipe = MotifVideoPipeline.from_pretrained(args.teacher, device=args.device)
    sampling = {k: v for k, v in dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                                      height=args.height, width=args.width, num_frames=args.frames,
                                      encoder_reuse=args.encoder_reuse).items() if v is not None}

    def report(done: int) -> None:
        print(f"[distill-data] {done}/{len(prompts)} prompts", flush=True)

    write_trajectories(pipe, prompts, out, teacher=str(args.teacher), student_steps=args.student_steps,
                       seed=args.seed, batch_size=args.batch, report=report, **sampling)
    index = read_trajectory_index(out)
    print(f"wrote {len(index['samples'])} trajectories at sigmas "
          f"{', '.join(f'{s:.3f}' for s in index['sigmas'])} to {out}")
    return 0
