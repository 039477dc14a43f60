"""`motif-video nano-train OUT_DIR`: reproduce the nano model from scratch (data, codec, teacher, transformer)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..nano.plan import NanoPlan


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "nano-train",
        help="reproduce the shipped nano model from scratch on a CPU (about an hour on 2 cores)",
        description="Generate the procedural dataset, train the latent codec and the REPA teacher, cache latents, "
                    "train the transformer through the 3-stage nano curriculum (TREAD, early REPA), assemble the "
                    "model folder (OUT_DIR/model, usable with `generate --model`) and evaluate it on held-out "
                    "prompts. Timings and scores go to OUT_DIR/nano_recipe.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out_dir", help="working folder (created)")
    plan = NanoPlan()
    p.add_argument("--seed", type=int, default=plan.seed, help="seed of the data, initialisations and sampling")
    p.add_argument("--clips", type=int, default=plan.clips, help="training clips to generate")
    p.add_argument("--images", type=int, default=plan.images, help="training images to generate")
    p.add_argument("--codec-steps", type=int, default=plan.codec_steps, help="latent codec training steps")
    p.add_argument("--codec-budget", type=float, default=plan.codec_budget_s,
                   help="codec training time cap in seconds (default: none, so the codec, and everything trained on it, "
                        "does not depend on the machine's speed)")
    p.add_argument("--codec-colour-weight", type=float, default=plan.codec_colour_weight,
                   help="weight of the codec term tying three latent channels to each cell's pixel colour, so the "
                        "palette's colours lie apart in latent space (0: reconstruction only)")
    p.add_argument("--teacher-steps", type=int, default=plan.teacher_steps,
                   help="REPA teacher training steps")
    p.add_argument("--stage-steps", type=int, nargs=3, default=list(plan.stage_steps), metavar=("S1", "S2", "S3"),
                   help="transformer steps of the three curriculum stages")
    p.add_argument("--eval-prompts", type=int, default=plan.eval_prompts,
                   help="held-out prompts to evaluate (0: skip)")
    p.add_argument("--eval-steps", type=int, default=plan.eval_steps, help="sampling steps during evaluation")
    p.add_argument("--i2v-eval-clips", type=int, default=plan.i2v_eval_clips,
                   help="held-out first frames to evaluate image-to-video on (0: skip)")
    p.add_argument("--encoder-budget", type=int, default=plan.encoder_budget,
                   help="encoder runs per video of the calibrated encoder-reuse schedule saved with the model "
                        "(0: exact sampling)")
    p.add_argument("--codec-from", default=None, help="reuse a trained codec folder instead of training one")
    p.add_argument("--teacher-from", default=None, help="reuse a trained teacher folder instead of training one")
    p.add_argument("--override", "-o", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="set a value in every curriculum stage's training config, as `motif-video train -o` does, "
                        "e.g. objective.image_condition.probability=0 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..nano.recipe import CONFIG_DIR, run_recipe, stage_config

    if not (CONFIG_DIR / "stage1.yaml").is_file():
        raise ConfigError(f"the nano curriculum configs are missing ({CONFIG_DIR}); run from a source checkout "
                          "installed with `pip install -e .`")
    if min(args.clips, args.images, args.codec_steps, args.teacher_steps, *args.stage_steps) < 1:
        raise ConfigError("clip/image counts and step counts must be >= 1")
    if not args.codec_colour_weight >= 0:
        raise ConfigError(f"--codec-colour-weight must be >= 0, got {args.codec_colour_weight}")
    # Reused parts are checked before the dataset is made, not after.
    for flag, folder in (("--codec-from", args.codec_from), ("--teacher-from", args.teacher_from)):
        if folder is not None and not (Path(folder) / "config.json").is_file():
            what = "not found" if not Path(folder).exists() else "is not a trained folder (no config.json)"
            raise ConfigError(f"{flag} {folder} {what}")
    for stage, steps in enumerate(args.stage_steps, 1):  # a bad --override fails now, not after the codec
        stage_config(stage, Path(args.out_dir), steps, Path(args.out_dir) / "teacher", False, args.override)
    sampling_steps = NanoPlan().generation["num_inference_steps"]
    if not 0 <= args.encoder_budget <= sampling_steps:
        raise ConfigError(f"--encoder-budget must be in [0, {sampling_steps}] (the model's sampling steps)")
    plan = NanoPlan(seed=args.seed, clips=args.clips, images=args.images, codec_steps=args.codec_steps,
                    codec_budget_s=args.codec_budget, codec_colour_weight=args.codec_colour_weight,
                    teacher_steps=args.teacher_steps,
                    stage_steps=tuple(args.stage_steps), eval_prompts=args.eval_prompts, eval_steps=args.eval_steps,
                    encoder_budget=args.encoder_budget or None, codec_from=args.codec_from,
                    teacher_from=args.teacher_from, i2v_eval_clips=args.i2v_eval_clips,
                    train_overrides=tuple(args.override))
    log = run_recipe(args.out_dir, plan, progress=not args.quiet)
    summary = log.get("eval", {}).get("summary", {})
    scores = ", ".join(f"{key} {summary[key]:.3f}" for key in ("all_correct", "color_accuracy", "shape_accuracy",
                                                                "direction_accuracy", "subject_consistency")
                       if isinstance(summary.get(key), float))
    print(f"nano model in {args.out_dir}/model ({log['model_bytes'] / 2**20:.1f} MiB), trained in "
          f"{log['seconds']['total_training'] / 60:.1f} min; held-out eval: {scores or 'skipped'}")
    i2v = log.get("eval_i2v", {}).get("all_correct")
    if i2v is not None:
        print(f"image-to-video on {log['eval_i2v']['clips']} held-out first frames: all checks right {i2v:.3f}")
    return 0
