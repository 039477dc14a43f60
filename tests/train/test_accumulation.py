"""Gradient accumulation: a step split into micro-batches equals the unsplit step."""

import pytest
import torch

from motif_video.errors import ConfigError
from motif_video.train.checkpoint import read_optimizer_state, read_weights
from motif_video.train.loop import train
from tests.train.engine_helpers import build_config, make_cache, one_thread, read_log  # noqa: F401


def test_micro_batches_of_one_equal_the_whole_batch(tmp_path):
    cache = make_cache(tmp_path / "cache", n_images=8, n_videos=8)
    runs = {}
    for name, micro in (("whole", None), ("split", 1), ("uneven", 3)):  # 3: micro-batches of 3 and 1
        config = build_config(tmp_path / name, cache, data={"cache_dirs": [str(cache)], "batch_size": 4,
                                                              "micro_batch_size": micro},
                              # AdamW divides by sqrt(v): where a gradient is ~0, its fp32 summation-order noise
                              # becomes a step of up to lr, so the weights' tolerance scales with lr.
                              optim={"lr": 1e-4, "steps": 10, "warmup_steps": 2},
                              objective={"text_dropout": 0.3},
                              routing={"selection_ratio": 0.5, "start_layer": 1, "end_layer": 3},
                              checkpointing={"every": 10, "keep_last": 1})
        runs[name] = train(config)
    whole = runs["whole"]
    for name in ("split", "uneven"):
        run = runs[name]
        assert sorted(run.losses) == list(range(1, 11))
        for step in run.losses:
            assert run.losses[step] == pytest.approx(whole.losses[step], abs=1e-5, rel=0), (name, step)
        assert [r["grad_norm"] for r in read_log(tmp_path / name / "run").values()] == pytest.approx(
            [r["grad_norm"] for r in read_log(tmp_path / "whole" / "run").values()], rel=1e-5)
        for which in ("model", "ema"):
            a = read_weights(whole.checkpoint, which, lora=False)
            b = read_weights(run.checkpoint, which, lora=False)
            assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5, (name, which)
        sa, sb = read_optimizer_state(whole.checkpoint)["state"], read_optimizer_state(run.checkpoint)["state"]
        key = "transformer.proj_out.weight"
        assert torch.allclose(sa[key]["exp_avg"], sb[key]["exp_avg"], atol=1e-7, rtol=1e-4)


def test_micro_batch_size_is_checked(tmp_path):
    cache = make_cache(tmp_path / "cache")
    with pytest.raises(ConfigError, match="micro_batch_size must be >= 1"):
        build_config(tmp_path, cache, data={"cache_dirs": [str(cache)], "micro_batch_size": 0})
    with pytest.raises(ConfigError, match="does not apply with data.planner"):
        build_config(tmp_path, cache, data={"cache_dirs": [str(cache)], "micro_batch_size": 1, "planner": "greedy"})
