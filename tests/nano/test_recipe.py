"""The nano recipe end to end at toy scale: every stage runs and the result is a loadable, generating model."""

import json

import numpy as np

from motif_video.cli import main as cli_main
from motif_video.nano.recipe import NanoPlan, run_recipe
from motif_video.pipeline.pipeline import MotifVideoPipeline


def test_recipe_produces_a_model_folder_that_generates(tmp_path):
    plan = NanoPlan(clips=6, images=4, codec_steps=2, codec_budget_s=None, teacher_steps=2, stage_steps=(2, 2, 2),
                    eval_prompts=2, eval_steps=2, i2v_eval_clips=2,
                    train_overrides=("data.batch_size=2", "optim.warmup_steps=0", "checkpointing.every=1000", "logging.tensorboard=null"))
    log = run_recipe(tmp_path / "nano", plan, progress=False)
    model = tmp_path / "nano" / "model"
    for part in ("model_index.json", "motif_video.json", "transformer/config.json", "vae/config.json",
                 "text_encoder/source.json", "tokenizer/source.json", "scheduler/scheduler_config.json"):
        assert (model / part).is_file(), part
    assert set(log["stages"]) == {1, 2, 3}
    logged = (tmp_path / "nano" / "nano_recipe.json").read_text()
    assert json.loads(logged)["model_bytes"] > 0 and str(tmp_path) not in logged  # no absolute paths
    assert (tmp_path / "nano" / "eval" / "report" / "results.json").is_file()
    assert log["eval_i2v"]["clips"] == plan.i2v_eval_clips  # held-out first frames scored for image-to-video

    pipe = MotifVideoPipeline.from_pretrained(model, device="cpu")
    assert pipe.transformer.config.cross_attention_form == "tied"
    assert pipe.transformer.config.cross_attention_query_bias is False  # converts to the diffusers layout
    assert pipe.defaults.encoder_refresh == log["encoder_refresh"]  # the calibrated reuse schedule is the default
    assert len(log["encoder_refresh"]) == plan.encoder_budget and log["encoder_refresh"][0] == 0
    frames = pipe("a red circle moving left", num_inference_steps=2, progress=False)
    assert frames.shape == (1, 17, 64, 64, 3) and np.isfinite(frames).all()
    assert cli_main(["convert", str(model / "transformer"), str(tmp_path / "diffusers"), "--to", "diffusers"]) == 0


def test_model_folder_files_are_replaced_not_rewritten_in_place(tmp_path):
    """Writing the skeleton into a folder that shares its files with another (a `cp -al` copy: hard links) replaces
    each file with a new one, so the other copy keeps its contents; nothing temporary is left behind."""
    import os

    from motif_video.model_folder import GenerationDefaults, component_path
    from motif_video.nano.recipe import write_model_skeleton

    original, copy = tmp_path / "original", tmp_path / "copy"
    write_model_skeleton(original, {"shift": 2.0, "num_inference_steps": 8})
    copy.mkdir()
    for path in sorted(original.rglob("*")):
        target = copy / path.relative_to(original)
        target.mkdir(parents=True) if path.is_dir() else os.link(path, target)
    before = {p.relative_to(original): p.read_bytes() for p in original.rglob("*") if p.is_file()}

    write_model_skeleton(copy, {"shift": 5.0, "num_inference_steps": 3})
    assert {p.relative_to(original): p.read_bytes() for p in original.rglob("*") if p.is_file()} == before
    assert GenerationDefaults.from_folder(original).shift == 2.0
    assert (GenerationDefaults.from_folder(copy).shift, GenerationDefaults.from_folder(copy).num_inference_steps) \
        == (5.0, 3)
    assert json.loads((copy / "scheduler" / "scheduler_config.json").read_text())["shift"] == 5.0
    assert component_path(copy, "text_encoder").is_dir()
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == sorted(p.relative_to(original)
                                                                          for p in original.rglob("*"))
