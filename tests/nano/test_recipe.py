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
