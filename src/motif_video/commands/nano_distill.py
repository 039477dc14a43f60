"""`motif-video nano-distill OUT_DIR`: reproduce the distilled nano student (motif-video-nano-fast) from a teacher."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "nano-distill",
        help="distil the nano model into a 4-step guidance-free student on a CPU",
        description="Sample the teacher once on training-wording prompts and cache its trajectories, distil the "
                    "student (configs/nano/distill.yaml), assemble its model folder (OUT_DIR/model, usable with "
                    "`generate --model`) and evaluate it on the benchmark's held-out prompts. Timings, losses and "
                    "scores go to OUT_DIR/nano_distill.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out_dir", help="working folder (created)")
    p.add_argument("--teacher", default="motif-video-nano", help="teacher model folder or built-in name")
    p.add_argument("--prompts", type=int, default=4096, help="teacher trajectories to sample")
    p.add_argument("--steps", type=int, default=3000, help="distillation steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the teacher trajectories and the training run")
    p.add_argument("--eval-prompts", type=int, default=105, help="held-out prompts to evaluate (0: skip)")
    p.add_argument("--trajectories-from", action="append", default=None, metavar="FOLDER",
                   help="reuse a `motif-video distill-data` folder instead of sampling the teacher (repeatable: "
                        "the caches are trained on together)")
    p.add_argument("--override", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="a training config value, e.g. optim.lr=3e-4 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..hub import resolve_model_dir
    from ..nano.distill import run_distill_recipe
    from ..nano.recipe import CONFIG_DIR

    if not (CONFIG_DIR / "distill.yaml").is_file():
        raise ConfigError(f"the nano distillation config is missing ({CONFIG_DIR}); run from a source checkout "
                          "installed with `pip install -e .`")
    if min(args.prompts, args.steps) < 1 or args.eval_prompts < 0:
        raise ConfigError("--prompts and --steps must be >= 1, --eval-prompts >= 0")
    teacher = resolve_model_dir(args.teacher)
    log = run_distill_recipe(args.out_dir, teacher, prompts=args.prompts, steps=args.steps, seed=args.seed,
                             eval_prompts=args.eval_prompts, trajectories_from=args.trajectories_from,
                             progress=not args.quiet, train_overrides=args.override)
    summary = log.get("eval", {}).get("summary", {})
    print(f"distilled in {log['seconds']['total_training']:.0f} s; model: {args.out_dir}/model"
          + (f"; held-out all correct {100 * summary['all_correct']:.1f} %, subject consistency "
             f"{summary['subject_consistency']:.3f}" if summary else ""))
    return 0
