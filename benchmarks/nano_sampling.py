"""The quality cost of the approximate sampling speedups, measured on the nano benchmark with a trained model.

Every setting generates one clip per held-out prompt from the same seeds (a paired comparison), is timed over the
transformer's forward calls (the denoising work reuse changes) and over the whole generation calls (text encoding and
VAE decoding included), and is scored by the analytic evaluator. The alignment score is the mean of the colour, shape
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
import os
import tempfile
import time
from pathlib import Path

import torch

EXACT = "euler, reuse 1 (exact)"
# Every setting names its encoder schedule: a model's default may reuse the encoder (the shipped nano model does).
SETTINGS = {
    EXACT: dict(encoder_reuse=1),
    "euler, reuse 2": dict(encoder_reuse=2),
    "euler, reuse 3": dict(encoder_reuse=3),
    "euler, reuse 4": dict(encoder_reuse=4),
    "dpm++, half the steps": dict(solver="dpm++", steps_fraction=0.5, encoder_reuse=1),
    "dpm++, half the steps, reuse 2": dict(solver="dpm++", steps_fraction=0.5, encoder_reuse=2),
}


class TransformerClock:
    """Seconds inside the transformer's forward calls: the part of sampling that encoder reuse changes."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self._started = 0.0, 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, *_):
        self._started = time.perf_counter()

    def _stop(self, *_):
        self.seconds += time.perf_counter() - self._started


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
    parser.add_argument("--timing-repeats", type=int, default=5,
                        help="interleaved timed runs of one batch per setting; the fastest counts")
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
    clock = TransformerClock(pipe.transformer)
    plans = {name: (max(1, round(steps * setting.get("steps_fraction", 1.0))),
                    {k: v for k, v in setting.items() if k != "steps_fraction"}) for name, setting in settings.items()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (n, setting) in plans.items():
            runs = [evaluate(pipe, args.prompts, Path(tmp) / f"{len(results)}-{seed}", args.limit, n,
                             seed=seed, **setting) for seed in args.seeds]
            summaries = [r["summary"] for r in runs]
            row = {"steps": n, **setting, "clips": sum(s["clips"] for s in summaries)}
            for key in ("color_accuracy", "shape_accuracy", "direction_accuracy", "all_correct",
                        "subject_consistency"):
                row[key] = sum(s[key] * s["clips"] for s in summaries) / row["clips"]
            row["alignment"] = alignment(row)
            results[name] = row
            print(f"{name}: alignment {row['alignment']:.1f}, all correct {100 * row['all_correct']:.1f}%", flush=True)

    # Speed: one batch of 8 prompts per setting, settings interleaved, the fastest of the repeats (this machine's
    # speed drifts by tens of percent over minutes, so timing the long quality runs above would compare drifts).
    batch = [json.loads(line)["prompt"] for line in args.prompts.read_text().splitlines()[:8]]
    for repeat in range(args.timing_repeats + 1):  # the first pass warms up and is not counted
        for name, (n, setting) in plans.items():
            clock.seconds = 0.0
            started = time.perf_counter()
            pipe(batch, num_inference_steps=n, generator=torch.Generator().manual_seed(0), progress=False, **setting)
            elapsed = time.perf_counter() - started
            if repeat:
                row = results[name]
                row["transformer_seconds"] = min(row.get("transformer_seconds", float("inf")), clock.seconds)
                row["generation_seconds"] = min(row.get("generation_seconds", float("inf")), elapsed)

    base = results[EXACT]
    lines = ["| setting | steps | transformer s / batch | speedup | generation s / batch | speedup | alignment | change | all correct "
             "| subject consistency |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        row["transformer_speedup"] = base["transformer_seconds"] / row["transformer_seconds"]
        row["speedup"] = base["generation_seconds"] / row["generation_seconds"]
        row["alignment_change"] = row["alignment"] - base["alignment"]
        lines.append(f"| {name} | {row['steps']} | {row['transformer_seconds']:.2f} | {row['transformer_speedup']:.2f}x "
                     f"| {row['generation_seconds']:.2f} | {row['speedup']:.2f}x | {row['alignment']:.1f} "
                     f"| {row['alignment_change']:+.1f} | {100 * row['all_correct']:.1f}% "
                     f"| {row['subject_consistency']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    config = {**{k: os.path.relpath(v) if isinstance(v, Path) else str(v) for k, v in vars(args).items()},
              "threads": torch.get_num_threads()}  # paths relative to where it ran (the repository root)
    (args.out / "results.json").write_text(json.dumps({"config": config, "settings": results}, indent=1) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
