"""The paper's design claims at micro scale: each variant of the nano transformer trained from scratch at equal
compute on the caches of one `motif-video nano-train` run, then compared on held-out loss and the nano benchmark.

    three-part      the nano recipe: 2 dual + 3 single (Shared Cross-Attention) + 1 decoder (matched init),
                    TREAD, early REPA
    single-stream   a plain stack of 6 single-stream blocks (same per-token compute), no cross-attention, no decoder
    no-cross-attn   three-part without Shared Cross-Attention
    no-tread        three-part without token routing
    no-repa         three-part without the REPA loss

The cross-attention pair also runs on the 17-frame caches (more tokens), to see whether its effect grows with length.
Every run: same seed, data order, optimiser and step count; validation loss is the flow loss at fixed noise on
held-out clips (EMA weights), logged against steps and wall-clock.

    python benchmarks/nano_ablation.py /path/to/nano-train-out --steps 300 --eval-prompts 42

Writes results.json, results.md and loss plots (PNG) under --out (default benchmarks/results/nano_ablation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from motif_video.eval.plots import line_chart

VARIANTS = {
    "three-part": [],
    "single-stream": ["model.overrides.num_layers=0", "model.overrides.num_single_layers=6",
                      "model.overrides.num_decoder_layers=0",
                      "model.overrides.enable_text_cross_attention_single=false"],
    "no-cross-attn": ["model.overrides.enable_text_cross_attention_single=false"],
    "no-tread": ["routing=null"],
    "no-repa": ["alignment=null"],
    # Diagnostics of the decoder stall (not in the default set):
    "previous-recipe": ["model.decoder_init=random", "routing.selection_ratio=0.5", "routing.end_layer=-1"],
    "random-decoder": ["model.decoder_init=random"],
    "long-route": ["routing.selection_ratio=0.5", "routing.end_layer=-1"],  # half the tokens skip up to the decoder
    "no-decoder": ["model.overrides.num_decoder_layers=0"],
}
DEFAULT_VARIANTS = ["three-part", "single-stream", "no-cross-attn", "no-tread", "no-repa"]
LONG_VARIANTS = ["three-part", "no-cross-attn"]  # also trained on images + 17-frame clips


def validation_cache(recipe: Path, work: Path, buckets: list[str], clips: int, seed: int) -> Path:
    """Held-out clips (a different seed from the training data) encoded like the training caches."""
    from motif_video.nano.data import write_dataset
    from motif_video.train.buckets import BucketSet
    from motif_video.train.encode import encode_dataset

    name = "val-" + "-".join(b.split("x")[0] for b in buckets)
    cache = work / name
    if not (cache / "index.json").is_file():
        data = work / "val-data"
        if not (data / "metadata.jsonl").exists():
            write_dataset(data, clips=clips, images=clips // 4, frames=17, size=64, seed=seed, overwrite=True)
        shutil.rmtree(cache, ignore_errors=True)
        encode_dataset(data, cache, recipe / "model", BucketSet(buckets), batch_size=16, progress=False)
    return cache


def teacher_path(recipe: Path) -> str:
    log = json.loads((recipe / "nano_recipe.json").read_text())
    return str(recipe / (log["plan"].get("teacher_from") or "teacher"))  # logged relative to the run folder


def train_variant(recipe: Path, work: Path, name: str, stage: int, steps: int, val_cache: Path, val_every: int):
    from motif_video.nano.recipe import stage_config
    from motif_video.train.loop import train

    run_dir = work / f"{name}-stage{stage}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*VARIANTS[name], f"output_dir={run_dir}", "stage.init_from=null", "checkpointing.every=100000",
                 "logging.tensorboard=null", "logging.every=10", "optim.warmup_steps=50",
                 "ema.decay=0.99",  # the recipe's 0.998 would still hold a third of the init after 500 steps
                 f"validation.cache_dir={val_cache}", f"validation.every={val_every}", "validation.num_samples=48"]
    config = stage_config(stage, recipe, steps, Path(teacher_path(recipe)), progress=True, extra=overrides)
    started = time.perf_counter()
    train(config)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    val = [(r["step"], r["val_loss_ema"], r["val_loss"]) for r in rows if "val_loss_ema" in r]
    train_rows = [r for r in rows if "flow_loss" in r]
    step_seconds = sum(r["step_time"] for r in train_rows[1:]) / max(1, len(train_rows) - 1)
    params = sum(p.numel() for p in _transformer_params(run_dir))
    return {"variant": name, "stage": stage, "steps": steps, "seconds": round(seconds, 1),
            "seconds_per_step": round(step_seconds, 4), "parameters": params,
            "val": [{"step": s, "loss_ema": e, "loss": l} for s, e, l in val],
            "flow_loss": [(r["step"], r["flow_loss"]) for r in train_rows],
            "run_dir": run_dir.relative_to(work).as_posix()}  # relative to --work


def _transformer_params(run_dir: Path):
    from motif_video.convert.checkpoint import read_state_dict
    from motif_video.train.checkpoint import resolve_checkpoint

    return read_state_dict(resolve_checkpoint(run_dir) / "ema").values()


def benchmark(recipe: Path, work: Path, result: dict, prompts: int, steps: int) -> dict:
    """The nano benchmark on held-out wording with the run's EMA weights."""
    from motif_video.nano.recipe import evaluate, export_transformer

    model_dir = work / f"model-{result['variant']}-stage{result['stage']}"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(recipe / "model", model_dir, ignore=shutil.ignore_patterns("transformer"))
    export_transformer(work / result["run_dir"], model_dir)
    # Sampled exactly: the recipe's encoder-reuse schedule was calibrated on its own model, and a variant without
    # decoder blocks has no encoder output to reuse.
    report = evaluate(model_dir, recipe / "data" / "heldout_prompts.jsonl", model_dir / "eval", prompts, steps,
                      encoder_reuse=1)
    return {"summary": {k: v for k, v in report["summary"].items() if not isinstance(v, dict)}}


def seconds_to_loss(result: dict, target: float) -> float | None:
    """Wall-clock until the EMA validation loss reaches `target`: the step found by linear interpolation between
    the validations around the crossing, scaled by the run's step time."""
    previous = None
    for row in result["val"]:
        if row["loss_ema"] <= target:
            step = row["step"]
            if previous is not None and previous["loss_ema"] > row["loss_ema"]:
                share = (previous["loss_ema"] - target) / (previous["loss_ema"] - row["loss_ema"])
                step = previous["step"] + share * (row["step"] - previous["step"])
            return round(step * result["seconds_per_step"], 1)
        previous = row
    return None


def plot(results: list[dict], out: Path) -> None:
    def label(r):
        return f"{r['variant']} ({'17f' if r['stage'] == 3 else '9f'})"

    by_step = {label(r): [(v["step"], v["loss"]) for v in r["val"]] for r in results}
    by_time = {label(r): [(v["step"] * r["seconds_per_step"], v["loss"]) for v in r["val"]] for r in results}
    line_chart(by_step, "training step", "held-out flow loss (live weights)", out / "validation_loss_steps.png")
    line_chart(by_time, "training seconds (2 CPU cores)", "held-out flow loss (live weights)",
               out / "validation_loss_seconds.png")


def markdown(results: list[dict], tread_target: float | None) -> str:
    lines = ["| variant | clips | params | s/step | val loss (live) | val loss (EMA) | all-correct | colour | shape "
             "| direction | subject consistency |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = r.get("benchmark", {}).get("summary", {})

        def pct(key):
            return f"{100 * b[key]:.1f}%" if key in b else "-"

        consistency = f"{b['subject_consistency']:.3f}" if "subject_consistency" in b else "-"
        lines.append(f"| {r['variant']} | {'17f' if r['stage'] == 3 else '9f'} | {r['parameters'] / 1e6:.2f}M "
                     f"| {r['seconds_per_step']:.3f} | {r['val'][-1]['loss']:.4f} | {r['val'][-1]['loss_ema']:.4f} "
                     f"| {pct('all_correct')} "
                     f"| {pct('color_accuracy')} | {pct('shape_accuracy')} | {pct('direction_accuracy')} "
                     f"| {consistency} |")
    if tread_target is not None:
        by = {r["variant"]: r for r in results if r["stage"] == 2}
        lines += ["", f"Wall-clock to held-out loss {tread_target:.4f}: TREAD "
                      f"{seconds_to_loss(by['three-part'], tread_target)} s, no routing "
                      f"{seconds_to_loss(by['no-tread'], tread_target)} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path, help="a finished `motif-video nano-train` output folder")
    parser.add_argument("--steps", type=int, default=300, help="training steps per variant")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--eval-prompts", type=int, default=42, help="held-out prompts per benchmark (0: skip)")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--no-long", action="store_true", help="skip the 17-frame cross-attention pair")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: RECIPE/ablation)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/nano_ablation"))
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md and the plot from results.json")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads((args.out / "results.json").read_text())
        write_report(results, args.out)
        return

    torch.manual_seed(0)
    work = args.work or args.recipe / "ablation"
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = [(name, 2) for name in args.variants]
    if not args.no_long:
        plan += [(name, 3) for name in LONG_VARIANTS if name in args.variants]
    results = []
    for name, stage in plan:
        buckets = ["1x64x64", "17x64x64"] if stage == 3 else ["1x64x64", "9x64x64"]
        val_cache = validation_cache(args.recipe, work, buckets, clips=96, seed=1000)
        print(f"[ablation] {name} (stage {stage}) ...", flush=True)
        result = train_variant(args.recipe, work, name, stage, args.steps, val_cache, args.val_every)
        if args.eval_prompts:
            result["benchmark"] = benchmark(args.recipe, work, result, args.eval_prompts, args.eval_steps)
        results.append(result)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"[ablation] {name}: {result['seconds']} s, val loss {result['val'][-1]['loss_ema']:.4f}", flush=True)

    write_report(results, args.out)


def write_report(results: list[dict], out: Path) -> None:
    names = {r["variant"] for r in results if r["stage"] == 2}
    target = None
    if {"three-part", "no-tread"} <= names:
        finals = [r["val"][-1]["loss_ema"] for r in results if r["stage"] == 2 and r["variant"] in
                  ("three-part", "no-tread")]
        target = max(finals)  # the loss both runs reach
    (out / "results.md").write_text(markdown(results, target))
    plot(results, out)
    print(markdown(results, target))


if __name__ == "__main__":
    main()
