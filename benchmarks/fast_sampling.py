"""Fast sampling side by side: training-free step caches, encoder reuse and fewer DPM++ steps against the nano
teacher at its defaults, diffusers' own cache hooks on diffusers' pipeline with the same weights (the anchor), and a
distilled student folder when given, on the held-out validation prompts.

Every setting generates one clip per prompt from the same seeds (a paired comparison) and is scored by the analytic
evaluator. The prompts and noise are benchmarks/nano_validation.py's (held-out wording, prompt seed 2; batches of 8
with noise seed 0 + the batch's first index), so the teacher's rows at its defaults and exact reproduce that
benchmark's. The settings take turns batch by batch, so the machine's drifting speed hits them alike; the
transformer time (its forward calls, timed by module hooks) and the whole generation time (text encoding and VAE
decoding included) are summed over the batches. Per clip: transformer evaluations (rows through the last decoder
block: a guided step counts twice, a skipped step not at all) and transformer FLOPs, counted by
motif_video.flops.FlopMeter (the estimator's counter) on a separate pass over the first --flop-prompts prompts (a
step that reuses the encoder or skips blocks counts what it runs).

    python benchmarks/fast_sampling.py
    python benchmarks/fast_sampling.py --student src/motif_video/assets/motif-video-nano-fast

Caches run on top of the teacher's defaults (its calibrated encoder-reuse schedule included); MagCache reads the
model folder's calibration (`motif-video calibrate-cache MODEL --write`; the shipped nano model has it). The anchor
rows convert the teacher to the diffusers layout (`motif-video convert --to diffusers`) and run diffusers'
MotifVideoPipeline with our text encoder, VAE, defaults and initial noise (motif_video.pipeline.diffusers_reference);
a model that does not convert, or a hook that fails on Motif's blocks, gives its row the reason instead of numbers.
Writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nano_sampling import TransformerClock, alignment  # noqa: E402  (shared benchmark helpers)
from nano_validation import COLUMNS  # noqa: E402

DEFAULTS = "teacher, defaults"


def teacher_settings() -> dict:
    """name -> (generation kwargs, cache factory or None); a fresh cache object per batch."""
    from motif_video.model.step_cache import FirstBlockCache, MagCache, TaylorSeer

    return {
        DEFAULTS: ({}, None),
        "teacher, exact (encoder every step)": ({"encoder_reuse": 1}, None),
        "teacher, encoder reuse every 4th": ({"encoder_reuse": 4}, None),
        "fbcache 0.05": ({}, lambda: FirstBlockCache(0.05)),
        "fbcache 0.1": ({}, lambda: FirstBlockCache(0.1)),
        "fbcache 0.2": ({}, lambda: FirstBlockCache(0.2)),
        "magcache 0.05": ({}, lambda: MagCache(0.05)),
        "magcache 0.1": ({}, lambda: MagCache(0.1)),
        "magcache 0.25": ({}, lambda: MagCache(0.25)),
        "taylorseer interval 2": ({}, lambda: TaylorSeer(interval=2)),
        "taylorseer interval 3": ({}, lambda: TaylorSeer(interval=3)),
        "dpm++, 10 steps": ({"solver": "dpm++", "num_inference_steps": 10}, None),
        "dpm++, 6 steps": ({"solver": "dpm++", "num_inference_steps": 6}, None),
    }


def student_settings() -> dict:
    from motif_video.model.step_cache import FirstBlockCache

    return {f"student, {n} step{'s' * (n > 1)}": ({"num_inference_steps": n}, None) for n in (1, 2, 4)} | {
        "student, 4 steps + fbcache 0.1": ({"num_inference_steps": 4}, lambda: FirstBlockCache(0.1))}


def anchor_settings(defaults) -> dict:
    """name -> (generation kwargs, diffusers cache config factory or None) for diffusers' pipeline, at the same
    thresholds as our caches' rows (diffusers has no encoder reuse: compare with the teacher's exact row)."""
    from motif_video.pipeline.diffusers_reference import diffusers_cache

    def cache(kind, value):
        return lambda: diffusers_cache(kind, value, defaults.num_inference_steps, defaults.magcache_ratios)

    return {
        "diffusers, no cache": ({}, None),
        "diffusers fbcache 0.1": ({}, cache("fbcache", 0.1)),
        "diffusers magcache 0.25": ({}, cache("magcache", 0.25)),
        "diffusers taylorseer interval 2": ({}, cache("taylorseer", 2)),
        "diffusers taylorseer-lite interval 2": ({}, cache("taylorseer-lite", 2)),
    }


NO_STUDENT = ("student, 1 / 2 / 4 steps (+ a cache)",
              "not measured: the distilled student is trained separately; pass --student FOLDER")
ANCHOR = "diffusers' cache hooks on diffusers' model"


class RowCounter:
    """Rows of the batch that pass the last decoder block: transformer evaluations that ran the blocks. (diffusers'
    cache hooks replace a skipped block's forward, so there it counts at a layer inside the block.)"""

    def __init__(self, module: torch.nn.Module):
        self.rows = 0
        module.register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.rows += args[0].shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="the teacher folder (default: the shipped nano)")
    parser.add_argument("--student", type=Path, default=None, help="a distilled student folder to add rows for")
    parser.add_argument("--prompts", type=int, default=210, help="held-out validation prompts (a subset: fewer)")
    parser.add_argument("--prompt-seed", type=int, default=2, help="as benchmarks/nano_validation.py")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--batch", type=int, default=8, help="prompts per generation call (8: nano_validation's)")
    parser.add_argument("--flop-prompts", type=int, default=2, help="prompts of the FLOP-counting pass")
    parser.add_argument("--only", nargs="*", default=None, help="run only these settings (names as in the table)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fast_sampling"))
    args = parser.parse_args()

    from motif_video.commands.generate import DEFAULT_MODEL_DIR
    from motif_video.errors import MotifVideoError
    from motif_video.flops import FlopMeter
    from motif_video.nano.data import heldout_prompts
    from motif_video.nano.recipe import evaluate
    from motif_video.pipeline.diffusers_reference import DiffusersReference
    from motif_video.pipeline.pipeline import MotifVideoPipeline

    torch.set_grad_enabled(False)
    teacher_dir = args.model or DEFAULT_MODEL_DIR
    models = {"teacher": MotifVideoPipeline.from_pretrained(teacher_dir, device="cpu")}
    plans = {name: ("teacher", *setting) for name, setting in teacher_settings().items()}
    if args.student is not None:
        models["student"] = MotifVideoPipeline.from_pretrained(args.student, device="cpu")
        plans |= {name: ("student", *setting) for name, setting in student_settings().items()}
    if args.only is not None:
        plans = {name: plan for name, plan in plans.items() if name in args.only or name == DEFAULTS}
    anchor_dir = tempfile.TemporaryDirectory()  # the converted transformer, for the length of the run
    anchors = {name: setting for name, setting in anchor_settings(models["teacher"].defaults).items()
               if args.only is None or name in args.only}
    failed = {}  # name -> why the row has no numbers
    if anchors:
        try:
            models["diffusers"] = DiffusersReference.from_model(teacher_dir, models["teacher"], anchor_dir.name)
        except MotifVideoError as e:
            failed[ANCHOR] = f"not measured: the teacher does not convert to the diffusers layout ({e})"
        else:
            plans |= {name: ("diffusers", *setting) for name, setting in anchors.items()}
    clocks = {key: TransformerClock(pipe.transformer) for key, pipe in models.items()}
    rows = {key: RowCounter(pipe.transformer.decoder_blocks[-1]) for key, pipe in models.items() if key != "diffusers"}
    if "diffusers" in models:
        rows["diffusers"] = RowCounter(models["diffusers"].transformer.single_transformer_blocks[-1].proj_out)
    prompts = heldout_prompts(args.prompts, seed=args.prompt_seed)
    results = {name: {"clips": 0, "transformer_seconds": 0.0, "generation_seconds": 0.0, "evaluations": 0,
                      "skipped_calls": 0, **{key: 0.0 for key in COLUMNS}} for name in plans}

    # FLOPs: a separate pass (the counter runs attention on the math backend and slows every call)
    flop_prompts = [p["prompt"] for p in prompts[:args.flop_prompts]]
    for name, (model, setting, make_cache) in plans.items():
        pipe = models[model]
        meter = FlopMeter(pipe.transformer)
        try:
            pipe(flop_prompts, generator=torch.Generator().manual_seed(args.seed), progress=False,
                 output_type="latent", cache=make_cache() if make_cache else None, **setting)
        except Exception as e:  # noqa: BLE001  diffusers' hook failing on Motif's blocks is that row's result
            if model != "diffusers":
                raise
            failed[name] = f"cannot run: {type(e).__name__}: {' '.join(str(e).split())}"
            del results[name]
            continue
        finally:
            meter.detach()
        results[name]["flops_per_clip"] = meter.flops / len(flop_prompts)
    plans = {name: plan for name, plan in plans.items() if name not in failed}

    with tempfile.TemporaryDirectory() as tmp:
        for start in range(0, len(prompts), args.batch):
            chunk_file = Path(tmp) / f"prompts_{start}.jsonl"
            chunk_file.write_text("".join(json.dumps(p) + "\n" for p in prompts[start:start + args.batch]))
            for index, (name, (model, setting, make_cache)) in enumerate(plans.items()):
                pipe, row = models[model], results[name]
                steps = setting.get("num_inference_steps", pipe.defaults.num_inference_steps)
                kwargs = {k: v for k, v in setting.items() if k != "num_inference_steps"}
                cache = make_cache() if make_cache else None
                clocks[model].seconds, rows[model].rows = 0.0, 0
                # evaluate() seeds batch k of a file with seed + k; one file per batch keeps the full run's noise
                run = evaluate(pipe, chunk_file, Path(tmp) / f"{index}_{start}", args.batch, steps,
                               seed=args.seed + start, batch=args.batch, cache=cache, **kwargs)
                summary = run["summary"]
                row["clips"] += summary["clips"]
                row["steps"] = steps
                for key in COLUMNS:
                    # None: no clip of the batch showed an object, which the evaluator's convention scores 0
                    row[key] += (summary[key] or 0.0) * summary["clips"]
                row["transformer_seconds"] += clocks[model].seconds
                row["generation_seconds"] += run["generation_seconds"]
                row["evaluations"] += rows[model].rows
                row["skipped_calls"] += getattr(cache, "skipped", 0)
            done = min(start + args.batch, len(prompts))
            print(f"{done} of {len(prompts)} prompts", flush=True)
            write_results(args, results, failed, done)  # after every batch: a run cut short still leaves its table
    anchor_dir.cleanup()


def write_results(args, totals: dict, failed: dict, done: int) -> None:
    """Per-clip means of the batches so far -> results.json and results.md under --out; a row in `failed` gets its
    reason instead of numbers."""
    results = {name: dict(row) for name, row in totals.items()}
    base = results[DEFAULTS]
    for row in results.values():
        clips = row["clips"]
        for key in COLUMNS:
            row[key] /= clips
        row["alignment"] = alignment(row)
        for key in ("transformer_seconds", "generation_seconds", "evaluations"):
            row[f"{key}_per_clip"] = row.pop(key) / clips
    lines = [f"{done} of {args.prompts} held-out validation prompts (prompt seed {args.prompt_seed}), noise seed "
             f"{args.seed}, batches of {args.batch}, {torch.get_num_threads()} CPU threads; FLOPs over the first "
             f"{args.flop_prompts} prompts.", "",
             "| setting | steps | evaluations / clip | GFLOPs / clip | FLOP ratio | transformer s / clip | "
             "generation s / clip | speedup | all correct | colour | shape | direction | subject consistency |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in results.items():
        row["flop_ratio"] = base["flops_per_clip"] / row["flops_per_clip"]
        row["speedup"] = base["generation_seconds_per_clip"] / row["generation_seconds_per_clip"]
        lines.append(
            f"| {name} | {row['steps']} | {row['evaluations_per_clip']:.1f} | {row['flops_per_clip'] / 1e9:.1f} "
            f"| {row['flop_ratio']:.2f}x | {row['transformer_seconds_per_clip']:.2f} "
            f"| {row['generation_seconds_per_clip']:.2f} | {row['speedup']:.2f}x "
            f"| {100 * row['all_correct']:.1f} % | {100 * row['color_accuracy']:.1f} % "
            f"| {100 * row['shape_accuracy']:.1f} % | {100 * row['direction_accuracy']:.1f} % "
            f"| {row['subject_consistency']:.3f} |")
    reasons = ([NO_STUDENT] if args.student is None else []) + list(failed.items())
    for name, reason in reasons:
        lines.append(f"| {name} | " + " | ".join(["-"] * 11) + f" | {reason} |")
    args.out.mkdir(parents=True, exist_ok=True)
    config = {**{k: os.path.relpath(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    (args.out / "results.json").write_text(json.dumps({"config": config, "settings": results,
                                                       "not_measured": dict(reasons)}, indent=1) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
