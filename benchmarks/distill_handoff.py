"""Where a distilled student loses quality: the teacher samples up to the student's step j, the student does the rest.

For each clip the teacher samples exactly (its guidance, its N Euler steps, the encoder on every step) from the noise
the pipeline would draw, and its states at the student's K-step schedule are kept, as `motif-video distill-data`
keeps them. From the teacher's state at step j the student then takes its own steps j .. K-1 (its encoder on its
refresh steps, fed the teacher's state there, as it is trained). j = 0 is the student alone, j = K the teacher
alone; the rise from one j to the next is what the student's step j costs. Scored by the analytic evaluator on the
held-out validation prompts of benchmarks/nano_validation.py.

    python benchmarks/distill_handoff.py --student src/motif_video/assets/motif-video-nano-fast --prompts 210
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

COLUMNS = ("all_correct", "color_accuracy", "shape_accuracy", "direction_accuracy", "subject_consistency")


class Handoff:
    """Called like MotifVideoPipeline (prompts, generator) -> frames (B, T, H, W, 3): the teacher to step j, then
    the student."""

    def __init__(self, teacher, student, handoff: int):
        from motif_video.train.objective import TrainModule

        self.teacher, self.student, self.handoff = teacher, student, handoff
        self.defaults = student.defaults
        self.module = TrainModule(student.transformer)

    def __call__(self, prompts: list[str], generator=None, **_) -> "torch.Tensor":
        from motif_video.train.distill import DistillationObjective, teacher_trajectories

        trajectory, sigmas = teacher_trajectories(self.teacher, prompts, generator=generator, encoder_reuse=1,
                                                  student_steps=self.defaults.num_inference_steps)
        objective = DistillationObjective(seed=0, sigmas=sigmas, encoder_refresh=self.defaults.encoder_refresh)
        text, mask = self.student.prompts.encode(prompts)
        for k in range(self.handoff, objective.steps):
            segment = torch.full((len(prompts),), k)
            v = objective.velocity(self.module, trajectory, segment, text, mask).float()
            trajectory[:, k + 1] = trajectory[:, k] + (sigmas[k + 1] - sigmas[k]) * v
        video = self.student.codec.decode(trajectory[:, -1])  # (B, 3, T, H, W) in [-1, 1]
        return ((video + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="motif-video-nano", help="teacher model (folder or built-in name)")
    parser.add_argument("--student", default="motif-video-nano-fast", help="student model (folder or built-in name)")
    parser.add_argument("--prompts", type=int, default=210, help="held-out validation prompts")
    parser.add_argument("--prompt-seed", type=int, default=2, help="as benchmarks/nano_validation.py")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_handoff"))
    args = parser.parse_args()

    from motif_video.hub import resolve_model_dir
    from motif_video.nano.data import heldout_prompts
    from motif_video.nano.recipe import evaluate
    from motif_video.pipeline.pipeline import MotifVideoPipeline

    torch.set_grad_enabled(False)
    teacher = MotifVideoPipeline.from_pretrained(resolve_model_dir(args.teacher), device="cpu")
    student = MotifVideoPipeline.from_pretrained(resolve_model_dir(args.student), device="cpu")
    lines = ["| teacher to step | student steps | all correct | colour | shape | direction | subject consistency |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    rows = {}
    k = student.defaults.num_inference_steps
    with tempfile.TemporaryDirectory() as work:  # the clips and their reports
        prompts_file = Path(work) / "prompts.jsonl"
        prompts_file.write_text("".join(json.dumps(p) + "\n"
                                        for p in heldout_prompts(args.prompts, seed=args.prompt_seed)))
        for j in range(k + 1):
            summary = evaluate(Handoff(teacher, student, j), prompts_file, Path(work) / f"from_{j}", args.prompts, k,
                               seed=0)["summary"]
            rows[j] = {c: summary[c] for c in COLUMNS}
            cells = [f"{100 * summary[c]:.1f} %" for c in COLUMNS[:-1]] + [f"{summary[COLUMNS[-1]]:.3f}"]
            lines.append(f"| {j} | {k - j} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {**vars(args), "out": str(args.out)}
    (args.out / "results.json").write_text(json.dumps({"config": config, "handoff": rows}, indent=2) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
