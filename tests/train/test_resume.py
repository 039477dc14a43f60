"""Checkpoints: a run killed mid-way and resumed continues exactly like an uninterrupted one."""

import pytest
import torch

from motif_video.cli import main as cli_main
from motif_video.errors import CheckpointError
from motif_video.train.checkpoint import list_checkpoints, read_weights, resolve_checkpoint
from motif_video.train.loop import train
from tests.train.engine_helpers import build_config, make_cache, one_thread, read_log  # noqa: F401


class Crash(RuntimeError):
    pass


def crash_after(step_to_die: int):
    def callback(step, metrics):
        if step == step_to_die:
            raise Crash(f"killed after step {step}")
    return callback


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, workers):
    """Checkpoints every 3 steps; the crash at step 5 loses steps 4-5, which the resumed run redoes. With a
    DataLoader worker, batches are prefetched past the crash point: the saved sampler position must still be the
    consumed one."""
    cache = make_cache(tmp_path / "cache", n_images=4, n_videos=6)
    sections = dict(optim={"lr": 2e-3, "steps": 9, "warmup_steps": 2, "schedule": "cosine"},
                    data={"cache_dirs": [str(cache)], "batch_size": 2, "num_workers": workers},
                    objective={"text_dropout": 0.3},
                    routing={"selection_ratio": 0.5, "start_layer": 1, "end_layer": 3},
                    checkpointing={"every": 3, "keep_last": 2})
    full = train(build_config(tmp_path / "full", cache, **sections))

    config = build_config(tmp_path / "cut", cache, **sections)
    with pytest.raises(Crash):
        train(config, callbacks=[crash_after(5)])
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "run" / "checkpoints")] == ["step-00000003"]
    resumed = train(config, resume=True)

    assert resumed.step == 9 and sorted(resumed.losses) == list(range(4, 10))
    for step in range(4, 10):
        assert resumed.losses[step] == pytest.approx(full.losses[step], abs=1e-6, rel=0)
    for which in ("model", "ema"):
        a = read_weights(full.checkpoint, which, lora=False)
        b = read_weights(resumed.checkpoint, which, lora=False)
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "run" / "checkpoints")] == \
        ["step-00000006", "step-00000009"]  # keep_last 2
    log = read_log(tmp_path / "cut" / "run")
    assert sorted(log) == list(range(1, 10))  # the log continues after the steps lost in the crash


def test_a_crash_while_saving_leaves_the_last_checkpoint_usable(tmp_path):
    cache = make_cache(tmp_path / "cache")
    config = build_config(tmp_path, cache, optim={"lr": 1e-3, "steps": 4})
    first = train(config)
    root = tmp_path / "run" / "checkpoints"
    # what a kill mid-save leaves: a half-written temporary folder
    (root / ".tmp-step-00000006" / "transformer").mkdir(parents=True)
    (root / ".tmp-step-00000006" / "optimizer.pt").write_bytes(b"trunc")
    assert resolve_checkpoint(tmp_path / "run") == first.checkpoint
    resumed = train(build_config(tmp_path, cache, overrides=["optim.steps=6"]), resume=True)
    assert sorted(resumed.losses) == [5, 6]
    assert not (root / ".tmp-step-00000006").exists()  # cleaned by the next save
    assert resolve_checkpoint(tmp_path / "run").name == "step-00000006"


def test_resume_through_the_cli_needs_only_the_run_folder(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache")
    train(build_config(tmp_path, cache, optim={"lr": 1e-3, "steps": 2}))
    # the run folder's checkpoint carries the config; raise the step budget with an override
    assert cli_main(["train", str(tmp_path / "run"), "--override", "optim.steps=4"]) == 0
    assert "trained to step 4" in capsys.readouterr().out
    assert sorted(read_log(tmp_path / "run")) == [1, 2, 3, 4]
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        resolve_checkpoint(tmp_path / "cache")
