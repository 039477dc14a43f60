"""The training loop end to end on a CPU: learning, the LR schedule, activation checkpointing, divergence, logs,
validation."""

import math

import pytest
import torch

from motif_video.cli import main as cli_main
from motif_video.train.cached import write_cached_samples
from motif_video.train.checkpoint import list_checkpoints, read_weights
from motif_video.train.loop import Trainer, TrainingDiverged, lr_factor, train
from tests.train.engine_helpers import (WIDE_TINY, build_config, make_cache, make_samples, one_thread,  # noqa: F401
                                        read_log)


def test_a_tiny_model_overfits_a_handful_of_clips(tmp_path):
    """Four 5-frame clips (latent 2x4x4): the fixed-noise, fixed-timestep validation loss falls more than 5x."""
    cache = make_cache(tmp_path / "cache", n_images=0, n_videos=4)
    config = build_config(
        tmp_path, cache,
        model={"preset": "motif-video-tiny", "overrides": {**WIDE_TINY, "image_embed_dim": None}},
        data={"cache_dirs": [str(cache)], "batch_size": 4},
        objective={"text_dropout": 0.0},
        optim={"lr": 5e-3, "steps": 500, "warmup_steps": 20, "schedule": "cosine"},
        ema={"enabled": False},
        logging={"every": 50, "tensorboard": None, "progress": False},
        checkpointing={"every": 1000, "save_final": False},
        validation={"every": 500, "num_samples": 4})
    trainer = Trainer(config)
    trainer.setup()
    before = trainer.validate(0)["loss"]
    result = trainer.train()
    after = trainer.validate(result.step)["loss"]
    assert result.step == 500
    assert before / after >= 5.0, (before, after)
    first = sum(list(result.losses.values())[:20]) / 20
    last = sum(list(result.losses.values())[-20:]) / 20
    assert first / last >= 3.0  # the (noisy, random-timestep) training loss falls too


def test_lr_schedule():
    assert [lr_factor(s, 4, 10, "constant", 0.0) for s in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 2, 10, "cosine", 0.1) for s in range(10)]
    assert cosine[:3] == [0.5, 1.0, 1.0]
    assert cosine[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:]))


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    cache = make_cache(tmp_path / "cache")
    runs = []
    for name, flag in (("plain", False), ("ckpt", True)):
        config = build_config(tmp_path / name, cache, grad_checkpointing=flag, routing={"selection_ratio": 0.5,
                              "start_layer": 1, "end_layer": 3})
        runs.append(train(config))
    assert runs[0].losses == pytest.approx(runs[1].losses, rel=1e-5)
    a = read_weights(runs[0].checkpoint, "model", lora=False)
    b = read_weights(runs[1].checkpoint, "model", lora=False)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_logs_tensorboard_checkpoints_and_validation(tmp_path):
    cache = make_cache(tmp_path / "cache")
    config = build_config(tmp_path, cache, optim={"lr": 1e-3, "steps": 6},
                          logging={"every": 3, "tensorboard": "tb", "progress": False},
                          checkpointing={"every": 2, "keep_last": 2},
                          validation={"every": 3, "num_samples": 3})
    result = train(config)
    run = tmp_path / "run"
    log = read_log(run)
    assert sorted(log) == [3, 6]
    assert {"loss", "flow_loss", "grad_norm", "lr", "step_time", "tokens_per_s"} <= set(log[3])
    val = [line for line in (run / "log.jsonl").read_text().splitlines() if "val_loss" in line]
    assert len(val) == 2 and "val_loss_ema" in val[0]
    assert list((run / "tb").rglob("events.out.tfevents.*"))
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000004", "step-00000006"]
    assert result.checkpoint.name == "step-00000006"
    assert (run / "config.yaml").is_file() and (result.checkpoint / "config.yaml").is_file()
    # an existing run is not silently overwritten
    with pytest.raises(Exception, match="already holds checkpoints"):
        train(config)


def test_nan_loss_stops_keeping_the_last_good_checkpoint(tmp_path, capsys):
    """All video latents are NaN; with the I-V-V interleave step 1 is an image batch and step 2 the first video one."""
    samples = make_samples(n_images=4, n_videos=4)
    for s in samples[4:]:
        s.latents[:] = float("nan")
    cache = write_cached_samples(tmp_path / "cache", samples)
    config = build_config(tmp_path, cache, checkpointing={"every": 1, "keep_last": 3})
    with pytest.raises(TrainingDiverged) as e:
        train(config)
    message = str(e.value)
    assert "loss is nan at step 2" in message and "step-00000001" in message and "\n" not in message
    checkpoints = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-00000001"]
    weights = read_weights(checkpoints[0], "model", lora=False)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert sorted(read_log(tmp_path / "run")) == [1]
    # through the CLI: non-zero exit, one line
    config.dump(tmp_path / "nan.yaml")
    code = cli_main(["train", str(tmp_path / "nan.yaml"), "--override", f"output_dir={tmp_path / 'cli'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: training diverged")


def test_data_problems_are_clear(tmp_path):
    cache = make_cache(tmp_path / "cache", text_dim=16)
    with pytest.raises(Exception, match="cached text states are 16-d but the model's text_embed_dim is 32"):
        Trainer(build_config(tmp_path, cache)).setup()
    cache = make_cache(tmp_path / "cache2")
    with pytest.raises(Exception, match="batch_size=9 is larger|no batches"):
        Trainer(build_config(tmp_path, cache, data={"cache_dirs": [str(cache)], "batch_size": 9})).setup()
    with pytest.raises(Exception, match="is not a latent cache"):
        Trainer(build_config(tmp_path, tmp_path)).setup()


def test_validation_videos_through_the_pipeline(tmp_path):
    from motif_video.testing import save_tiny_pipeline

    pipeline = save_tiny_pipeline(tmp_path / "pipe")
    cache = make_cache(tmp_path / "cache")
    config = build_config(tmp_path, cache, optim={"lr": 1e-3, "steps": 2},
                          model={"preset": "motif-video-tiny", "overrides": {"image_embed_dim": 8}},
                          validation={"every": 2, "num_samples": 2, "prompts": ["a red circle moving left"],
                                      "pipeline": str(pipeline), "num_inference_steps": 2, "width": 32,
                                      "height": 32, "num_frames": 5})
    train(config)
    video = tmp_path / "run" / "samples" / "step-00000002" / "00.mp4"
    assert video.is_file() and video.stat().st_size > 0
