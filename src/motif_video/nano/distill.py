"""The distilled nano student, end to end from a teacher model folder (by default the shipped nano model):

    trajectories  the teacher samples N training-wording prompts once, guided, 20 exact Euler steps;
                  its states at the student's 4-step schedule are cached          (`motif-video distill-data`)
    distill       the student starts as the teacher and learns each segment's Euler velocity, sampling as it will
                  be used: no guidance, the encoder on step 0 only                 (configs/nano/distill.yaml)
    model         the released folder layout; vae/, text_encoder/ and tokenizer/ point at the teacher's
                  (source.json), transformer/ is the student's EMA in fp16, motif_video.json its defaults
    eval          the benchmark's held-out prompts, as `nano-train` evaluates the teacher
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..files import atomic_write_text
from .recipe import CONFIG_DIR, _step, evaluate, export_transformer, write_scheduler

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # .../motif_video
STUDENT_STEPS = 4
ENCODER_REFRESH = [0]


def component_pointer(teacher_dir: Path, part: str) -> dict | None:
    """A source.json pointer for the teacher's `part`: its own pointer, or one into this package when the teacher
    ships inside it; None when the component has to be copied."""
    from ..model_folder import component_path, read_source_pointer

    own = read_source_pointer(teacher_dir, part)
    if own is not None:
        return own
    source = component_path(teacher_dir, part).resolve()
    if source.is_relative_to(PACKAGE_ROOT):
        return {"package": "motif_video", "path": source.relative_to(PACKAGE_ROOT).as_posix()}
    return None


def student_defaults(teacher_defaults: dict) -> dict:
    """The teacher's generation defaults with the student's sampling: 4 Euler steps, no guidance, encoder on step 0.
    The teacher's MagCache calibration describes the teacher's steps, not the student's: it is left out."""
    out = {k: v for k, v in teacher_defaults.items()
           if k not in ("encoder_refresh", "encoder_reuse", "magcache_ratios")}
    out.update(num_inference_steps=STUDENT_STEPS, guidance_scale=1.0, solver="euler",
               encoder_refresh=list(ENCODER_REFRESH), encoder_reuse=STUDENT_STEPS)
    return out


def write_student_folder(teacher_dir: Path, run_dir: Path, model_dir: Path) -> None:
    """The student's model folder: its transformer, the teacher's other components by pointer (or copy). Built
    beside `model_dir` and swapped in complete, so an interrupted write leaves the previous folder whole."""
    from ..files import atomic_dir
    from ..model_folder import write_generation_defaults, write_source_pointer

    settings = json.loads((teacher_dir / "motif_video.json").read_text()) \
        if (teacher_dir / "motif_video.json").is_file() else {}
    generation = student_defaults(settings.get("generation", settings))
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(model_dir) as tmp:
        for part in ("vae", "text_encoder", "tokenizer"):
            pointer = component_pointer(teacher_dir, part)
            if pointer is None:
                shutil.copytree(teacher_dir / part, tmp / part)
            else:
                write_source_pointer(tmp / part, pointer)
        shutil.copy(teacher_dir / "model_index.json", tmp / "model_index.json")
        write_scheduler(tmp, generation)
        write_generation_defaults(tmp, generation)
        export_transformer(run_dir, tmp)


def run_distill_recipe(out_dir: str | Path, teacher_dir: str | Path, *, prompts: int = 4096, steps: int = 3000,
                       seed: int = 0, eval_prompts: int = 105, trajectories_from=None,
                       batch: int = 64, progress: bool = True, train_overrides=()) -> dict:
    """Distil `teacher_dir` into `out_dir`/model; timings, losses and the evaluation go to nano_distill.json."""
    from ..nano.data import heldout_prompts, train_prompts
    from ..pipeline.pipeline import MotifVideoPipeline
    from ..train.config import load_config
    from ..train.distill import write_trajectories
    from ..train.loop import train

    out_dir, teacher_dir = Path(out_dir), Path(teacher_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log: dict = {"teacher": os.path.relpath(teacher_dir.resolve(), out_dir.resolve()), "prompts": prompts,
                 "steps": steps, "seed": seed, "seconds": {}}
    seconds = log["seconds"]
    started = time.perf_counter()
    trajectories = out_dir / "trajectories"
    with _step(seconds, "trajectories"):
        if trajectories_from:
            from ..train.distill import read_trajectory_index

            caches = [Path(f) for f in ([trajectories_from] if isinstance(trajectories_from, (str, Path))
                                        else trajectories_from)]
            log["trajectories_from"] = [os.path.relpath(f.resolve(), out_dir.resolve()) for f in caches]
            log["prompts"] = sum(len(read_trajectory_index(f)["samples"]) for f in caches)
        else:
            shutil.rmtree(trajectories, ignore_errors=True)
            from tqdm.auto import tqdm

            pipe = MotifVideoPipeline.from_pretrained(teacher_dir, device="cpu")
            with tqdm(total=prompts, desc="trajectories", unit="prompt", disable=not progress) as bar:
                write_trajectories(pipe, train_prompts(prompts, seed=seed), trajectories, teacher=log["teacher"],
                                   student_steps=STUDENT_STEPS, seed=seed, batch_size=batch, encoder_reuse=1,
                                   report=lambda done: bar.update(done - bar.n))
            caches = [trajectories]
    run_dir = out_dir / "run"
    with _step(seconds, "distill"):
        shutil.rmtree(run_dir, ignore_errors=True)
        config = load_config(CONFIG_DIR / "distill.yaml", [
            f"output_dir={run_dir}", f"seed={seed}", f"optim.steps={steps}",
            f"data.cache_dirs=[{', '.join(str(f) for f in caches)}]",
            f"model.pretrained={teacher_dir / 'transformer'}", f"logging.progress={'true' if progress else 'false'}",
            *train_overrides])
        result = train(config)
    log["loss"] = {"first": result.losses[min(result.losses)], "last": result.losses[max(result.losses)]}
    model_dir = out_dir / "model"
    write_student_folder(teacher_dir, run_dir, model_dir)
    seconds["total_training"] = round(time.perf_counter() - started, 1)
    if eval_prompts:
        with _step(seconds, "eval"):
            prompts_file = out_dir / "heldout_prompts.jsonl"
            rows = heldout_prompts(eval_prompts, seed=0)
            atomic_write_text(prompts_file, "".join(json.dumps(p) + "\n" for p in rows))
            log["eval"] = evaluate(model_dir, prompts_file, out_dir / "eval", eval_prompts, STUDENT_STEPS)
    log["model_bytes"] = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    atomic_write_text(out_dir / "nano_distill.json", json.dumps(log, indent=2, default=str) + "\n")
    return log

