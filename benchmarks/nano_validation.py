"""A second held-out check of a nano model, beyond the 105-prompt benchmark `motif-video nano-train` runs.

Prompts in the held-out wording from another seed than the benchmark's (so the run never saw them), one clip each,
sampled at the model's defaults and exactly (the encoder on every step), scored by the analytic evaluator; and
image-to-video from first frames drawn afresh for the same kind of prompts (`motif-video eval --image-to-video`).

    python benchmarks/nano_validation.py src/motif_video/assets/motif-video-nano --prompts 210 --seed 2 --i2v-clips 105

Writes the clips, the reports and results.md under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SAMPLINGS = {"the model's defaults": {}, "exact (--encoder-reuse 1)": {"encoder_reuse": 1}}
COLUMNS = ("color_accuracy", "shape_accuracy", "direction_accuracy", "all_correct", "subject_consistency")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a nano model folder")
    parser.add_argument("--prompts", type=int, default=210, help="held-out-wording prompts")
    parser.add_argument("--seed", type=int, default=2, help="prompt seed (the benchmark's is 0)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's)")
    parser.add_argument("--i2v-clips", type=int, default=0,
                        help="image-to-video clips to score too (half with the held-out prompt, half direction-only)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/nano_validation"))
    args = parser.parse_args()

    from motif_video.eval.i2v import CHECKS
    from motif_video.nano.data import heldout_prompts
    from motif_video.nano.recipe import evaluate, evaluate_image_to_video
    from motif_video.pipeline.pipeline import MotifVideoPipeline

    torch.set_grad_enabled(False)
    pipe = MotifVideoPipeline.from_pretrained(args.model, device="cpu")  # loaded once for both samplings
    steps = args.steps or pipe.defaults.num_inference_steps
    args.out.mkdir(parents=True, exist_ok=True)
    prompts_file = args.out / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(p) + "\n" for p in heldout_prompts(args.prompts, seed=args.seed)))
    lines = ["| sampling | colour | shape | direction | all correct | subject consistency |",
             "|---|---:|---:|---:|---:|---:|"]
    for index, (name, setting) in enumerate(SAMPLINGS.items()):
        summary = evaluate(pipe, prompts_file, args.out / f"sampling_{index}", args.prompts, steps,
                           seed=0, **setting)["summary"]
        cells = [f"{100 * summary[key]:.1f} %" for key in COLUMNS[:-1]] + [f"{summary[COLUMNS[-1]]:.3f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if args.i2v_clips:
        i2v = evaluate_image_to_video(pipe, args.out / "image_to_video", args.i2v_clips, steps, seed=args.seed)
        lines += ["", "| image-to-video | keeps colour | keeps shape | direction | frame 0 close | all correct |",
                  "|---|---:|---:|---:|---:|---:|",
                  f"| {args.i2v_clips} first frames | " + " | ".join(
                      f"{100 * i2v[key]:.1f} %" for key in (*CHECKS, "all_correct")) + " |"]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
