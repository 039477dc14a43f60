"""The quality cost of the approximate sampling speedups, measured on the nano benchmark with a trained model.

Every setting generates one clip per held-out prompt from the same seeds (a paired comparison), is timed over the
generation calls only, and is scored by the analytic evaluator. The alignment score is the mean of the colour, shape
and direction accuracies (percent); "all correct" needs all three right in one clip.

    python benchmarks/nano_sampling.py --model src/motif_video/assets/motif-video-nano \\
        --prompts runs/nano/data/heldout_prompts.jsonl --seeds 0 1

Settings: Euler at the model's default steps with encoder reuse K = 1 (exact), 2, 3 and 4; calibrated refresh
schedules with a budget of B encoder runs (`--budgets`; planned from the encoder's drift on the calibration prompts
of `motif-video calibrate-reuse`, never on the benchmark's prompts); DPM-Solver++ 2M at fewer steps.
Writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

EXACT = "euler, reuse 1 (exact)"
SETTINGS = {
    EXACT: dict(encoder_reuse=1),
    "euler, reuse 2": dict(encoder_reuse=2),
    "euler, reuse 3": dict(encoder_reuse=3),
    "euler, reuse 4": dict(encoder_reuse=4),
    "dpm++, half the steps": dict(solver="dpm++", steps_fraction=0.5),
    "dpm++, half the steps, reuse 2": dict(solver="dpm++", steps_fraction=0.5, encoder_reuse=2),
}


def alignment(summary: dict) -> float:
    return 100 * (summary["color_accuracy"] + summary["shape_accuracy"] + summary["direction_accuracy"]) / 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a trained nano model folder")
    parser.add_argument("--prompts", type=Path, required=True, help="heldout_prompts.jsonl of a nano dataset")
    parser.add_argument("--limit", type=int, default=105, help="prompts per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's)")
    parser.add_argument("--budgets", type=int, nargs="*", default=[5, 6],
                        help="encoder runs of the calibrated schedules")
    parser.add_argument("--only", nargs="*", default=None, help="run only these settings (names as in the table)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/nano_sampling"))
    args = parser.parse_args()

    from motif_video.nano.recipe import evaluate
    from motif_video.pipeline.encoder_schedule import CALIBRATION_PROMPTS, measure_drift, plan_refresh
    from motif_video.pipeline.pipeline import MotifVideoPipeline

    torch.set_grad_enabled(False)
    pipe = MotifVideoPipeline.from_pretrained(args.model, device="cpu")
    steps = args.steps or pipe.defaults.num_inference_steps
    settings = dict(SETTINGS)
    if args.budgets:
        drift = measure_drift(pipe, CALIBRATION_PROMPTS, num_inference_steps=steps)
        for budget in args.budgets:
            settings[f"euler, calibrated {budget} of {steps}"] = dict(encoder_refresh=plan_refresh(drift, budget))
    if args.only is not None:
        settings = {name: settings[name] for name in settings if name in args.only or name == EXACT}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, setting in settings.items():
            setting = dict(setting)
            n = max(1, round(steps * setting.pop("steps_fraction", 1.0)))
            runs = [evaluate(args.model, args.prompts, Path(tmp) / f"{len(results)}-{seed}", args.limit, n,
                             seed=seed, **setting) for seed in args.seeds]
            summaries = [r["summary"] for r in runs]
            row = {"steps": n, **setting, "clips": sum(s["clips"] for s in summaries),
                   "generation_seconds": sum(r["generation_seconds"] for r in runs)}
            for key in ("color_accuracy", "shape_accuracy", "direction_accuracy", "all_correct",
                        "subject_consistency"):
                row[key] = sum(s[key] * s["clips"] for s in summaries) / row["clips"]
            row["alignment"] = alignment(row)
            results[name] = row
            print(f"{name}: alignment {row['alignment']:.1f}, all correct {100 * row['all_correct']:.1f}%, "
                  f"{row['generation_seconds']:.1f} s", flush=True)

    base = results[EXACT]
    lines = ["| setting | steps | generation s | speedup | alignment | change | all correct | subject consistency |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        row["speedup"] = base["generation_seconds"] / row["generation_seconds"]
        row["alignment_change"] = row["alignment"] - base["alignment"]
        lines.append(f"| {name} | {row['steps']} | {row['generation_seconds']:.1f} | {row['speedup']:.2f}x "
                     f"| {row['alignment']:.1f} | {row['alignment_change']:+.1f} | {100 * row['all_correct']:.1f}% "
                     f"| {row['subject_consistency']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    config = {**{k: str(v) for k, v in vars(args).items()}, "threads": torch.get_num_threads()}
    (args.out / "results.json").write_text(json.dumps({"config": config, "settings": results}, indent=1) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
