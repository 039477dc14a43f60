"""Checkpoints: a run killed mid-way and resumed continues exactly like an uninterrupted one."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from motif_video.cli import main as cli_main
from motif_video.errors import CheckpointError, ConfigError
from motif_video.train.checkpoint import list_checkpoints, read_weights, resolve_checkpoint
from motif_video.train.loop import Trainer, TrainingDiverged, train
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


# -- resuming after faults ------------------------------------------------------------------------------------------
def test_divergence_keeps_a_checkpoint_from_before_the_blow_up_and_its_advice_works(tmp_path):
    """lr 1e6 from step 5 on: the step-5 checkpoint holds blown-up weights (its norm far above step 4's) and step 6's
    loss is NaN. The stop names step 4, sets step 5 aside, and a resume with a lower lr continues from step 4 with
    that lr (not the checkpoint's)."""
    cache = make_cache(tmp_path / "cache")
    sections = dict(optim={"lr": 1e-3, "steps": 4}, checkpointing={"every": 2, "keep_last": 2})
    train(build_config(tmp_path, cache, **sections))
    blown = build_config(tmp_path, cache, ["optim.lr=1e6", "optim.steps=20", "checkpointing.every=1"], **sections)
    with pytest.raises(TrainingDiverged) as e:
        train(blown, resume=True)
    message = str(e.value)
    root = tmp_path / "run" / "checkpoints"
    assert f"the last good checkpoint is {root / 'step-00000004'}" in message and "\n" not in message
    assert "diverged-step-00000005" in message and "optim.lr" in message
    assert [p.name for p in list_checkpoints(root)] == ["step-00000004"]
    assert (root / "diverged-step-00000005").is_dir()  # kept for inspection, never resumed from
    assert read_log(tmp_path / "run")[5]["lr"] == 1e6  # the resumed run used the new lr
    good = read_weights(root / "step-00000004", "model", lora=False)
    bad = read_weights(root / "diverged-step-00000005", "model", lora=False)
    assert max(w.abs().max().item() for w in good.values()) < 10 < max(w.abs().max().item() for w in bad.values())

    resumed = train(build_config(tmp_path, cache, ["optim.lr=5e-4", "optim.steps=8"], **sections), resume=True)
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    assert all(math.isfinite(v) and v < 10 for v in resumed.losses.values())
    assert read_log(tmp_path / "run")[8]["lr"] == pytest.approx(5e-4)


def test_resume_falls_back_past_damaged_checkpoints(tmp_path):
    cache = make_cache(tmp_path / "cache")
    sections = dict(optim={"lr": 1e-3, "steps": 8}, checkpointing={"every": 2, "keep_last": 3})
    full = train(build_config(tmp_path / "full", cache, **sections))
    config = build_config(tmp_path / "cut", cache, **sections)
    with pytest.raises(Crash):
        train(config, callbacks=[crash_after(7)])
    root = tmp_path / "cut" / "run" / "checkpoints"
    shard = root / "step-00000006" / "optimizer" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated optimizer state
    (root / "step-00000004" / "trainer_state.json").unlink()  # missing trainer state
    with pytest.warns(UserWarning) as caught:
        resumed = train(config, resume=True)
    messages = [str(w.message) for w in caught if "cannot be resumed from" in str(w.message)]
    assert len(messages) == 2 and "optimizer shard __0_0.distcp is truncated" in messages[0]
    assert "has no trainer_state.json" in messages[1]
    assert sorted(resumed.losses) == [3, 4, 5, 6, 7, 8]  # from step 2
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(full.losses[step], abs=1e-6, rel=0)


def to_format_1(checkpoint, global_batch: int):
    """Rewrite a checkpoint of this format into the previous one (one process): optimizer.pt, trainer_state.pt,
    rank-00000.pt, as that format's writer laid them out."""
    import json

    from motif_video.train.checkpoint import read_optimizer_state, rng_state

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    torch.save(read_optimizer_state(checkpoint), checkpoint / "optimizer.pt")
    torch.save({"step": state["step"], "scheduler": {"last_epoch": state["step"], "base_lrs": [1.0]},
                "world_size": 1}, checkpoint / "trainer_state.pt")
    sampler = {k: state["data"][k] for k in ("epoch", "batches_done", "seed", "fingerprint")}
    torch.save({"sampler": sampler, "rng": rng_state()}, checkpoint / "rank-00000.pt")
    shutil.rmtree(checkpoint / "optimizer")
    shutil.rmtree(checkpoint / "rng")
    (checkpoint / "trainer_state.json").unlink()


def test_checkpoints_of_the_previous_format_resume(tmp_path):
    """Two format-1 checkpoints, the newer with a truncated optimizer.pt: resume falls back to the older one and
    continues exactly."""
    cache = make_cache(tmp_path / "cache", n_images=4, n_videos=6)
    sections = dict(optim={"lr": 1e-3, "steps": 8}, checkpointing={"every": 3, "keep_last": 2})
    full = train(build_config(tmp_path / "full", cache, **sections))
    config = build_config(tmp_path / "cut", cache, **sections)
    with pytest.raises(Crash):
        train(config, callbacks=[crash_after(7)])
    root = tmp_path / "cut" / "run" / "checkpoints"
    for name in ("step-00000003", "step-00000006"):
        to_format_1(root / name, 2)
    optimizer = root / "step-00000006" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:200])
    with pytest.warns(UserWarning, match="optimizer.pt is unreadable"):
        resumed = train(config, resume=True)
    assert sorted(resumed.losses) == [4, 5, 6, 7, 8]
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(full.losses[step], abs=1e-6, rel=0)


@pytest.mark.parametrize("checkpoint_format", [2, 1])
def test_resume_when_some_parameters_never_had_a_gradient(tmp_path, checkpoint_format):
    """Text-to-video training of a model with an image projector: no batch carries image tokens, so the projector
    never gets a gradient and AdamW holds no state for it. Resuming restores exactly that: the run continues like the
    uninterrupted one, and the projector still has no optimizer state afterwards."""
    from motif_video.train.checkpoint import read_optimizer_state

    cache = make_cache(tmp_path / "cache")
    sections = dict(model={"preset": "motif-video-tiny"},  # image_embed_dim 24: an image projector
                    optim={"lr": 1e-3, "steps": 4, "warmup_steps": 1}, checkpointing={"every": 2, "keep_last": 5})
    full = train(build_config(tmp_path / "full", cache, **sections))
    saved = read_optimizer_state(full.checkpoint)["state"]
    assert any(k.startswith("image_embedder.") for k in read_weights(full.checkpoint, "model", lora=False))
    assert not any(".image_embedder." in k for k in saved) and any(k.startswith("transformer.") for k in saved)

    config = build_config(tmp_path / "cut", cache, **sections)
    with pytest.raises(Crash):
        train(config, callbacks=[crash_after(3)])
    if checkpoint_format == 1:
        to_format_1(tmp_path / "cut" / "run" / "checkpoints" / "step-00000002", 2)
    resumed = train(config, resume=True)
    assert sorted(resumed.losses) == [3, 4]
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(full.losses[step], abs=1e-6, rel=0)
    assert sorted(read_optimizer_state(resumed.checkpoint)["state"]) == sorted(saved)
    a, b = read_weights(full.checkpoint, "model", lora=False), read_weights(resumed.checkpoint, "model", lora=False)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_the_run_folder_given_is_the_run(tmp_path, capsys):
    """A moved run continues where it now is; the path saved in its config is not recreated."""
    cache = make_cache(tmp_path / "cache")
    train(build_config(tmp_path, cache, optim={"lr": 1e-3, "steps": 2}))
    shutil.move(tmp_path / "run", tmp_path / "moved")
    assert cli_main(["train", str(tmp_path / "moved"), "--override", "optim.steps=4"]) == 0
    assert not (tmp_path / "run").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "moved" / "checkpoints")] == ["step-00000002",
                                                                                       "step-00000004"]
    # a checkpoint that is not the latest is refused rather than silently replaced by the latest
    code = cli_main(["train", str(tmp_path / "moved" / "checkpoints" / "step-00000002")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not the run's latest checkpoint" in err[0]
    # a checkpoint copied out of its run is not trained into
    shutil.copytree(tmp_path / "moved" / "checkpoints" / "step-00000004", tmp_path / "lone")
    code = cli_main(["train", str(tmp_path / "lone")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "outside a run folder" in err[0]
    assert sorted(p.name for p in (tmp_path / "lone").iterdir()) == sorted(
        p.name for p in (tmp_path / "moved" / "checkpoints" / "step-00000004").iterdir())


def test_one_training_run_per_output_dir(tmp_path, capsys):
    cache = make_cache(tmp_path / "cache")
    config = build_config(tmp_path, cache, optim={"lr": 1e-3, "steps": 2})
    first = Trainer(config)
    first.setup()  # holds the run folder from here until its train() ends
    config.dump(tmp_path / "config.yaml")
    assert cli_main(["train", str(tmp_path / "config.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is in use by another training run (pid" in err[0]
    assert first.train().step == 2  # the first run is unaffected
    assert sorted(read_log(tmp_path / "run")) == [1, 2]
    # another process holding the lock (a real second run would): refused the same way
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match="is in use by another training run"):
            train(config, resume=True)
    finally:
        holder.kill()
        holder.wait()
    assert train(build_config(tmp_path, cache, ["optim.steps=3"], optim={"lr": 1e-3, "steps": 2}),
                 resume=True).step == 3  # released when its holder dies


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from motif_video.train.loop import RunLock
lock = RunLock(Path(sys.argv[1]))  # held while the object lives
assert lock.acquire() is None
print("locked", flush=True)
time.sleep(60)
"""
