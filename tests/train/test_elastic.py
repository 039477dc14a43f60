"""Elastic resume: a checkpoint written by N processes continues on M, equal to the uninterrupted one-process run.

Two processes are launched as a user would (`torchrun --nproc_per_node 2 -m motif_video.cli train ...`, gloo on CPU,
FSDP2 over both); the one-process runs go through `train()` in this process.
"""

import pytest
import torch
import yaml

from motif_video.train.checkpoint import list_checkpoints, read_optimizer_state, read_weights
from motif_video.train.loop import train
from tests.train.engine_helpers import base_config, build_config, make_cache, one_thread, read_log  # noqa: F401
from tests.train.test_distributed import run

STEPS = 30


def sections(cache):
    # A constant schedule after warmup, so that stopping at step 10 (optim.steps=10) and extending to 30 trains the
    # same steps as one run to 30; two buckets (images, 2-frame videos) and routing on.
    return dict(data={"cache_dirs": [str(cache)], "batch_size": 4},
                optim={"lr": 2e-3, "steps": STEPS, "warmup_steps": 3},
                objective={"text_dropout": 0.3},
                routing={"selection_ratio": 0.5, "start_layer": 1, "end_layer": 3},
                checkpointing={"every": 10, "keep_last": 3})


def assert_same(full, resumed_losses, a, b):
    for step in range(11, STEPS + 1):
        assert resumed_losses[step] == pytest.approx(full.losses[step], abs=1e-5, rel=0), step
    for which in ("model", "ema"):
        wa, wb = read_weights(a, which, lora=False), read_weights(b, which, lora=False)
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The cache and the uninterrupted one-process run to step 30."""
    tmp_path = tmp_path_factory.mktemp("reference")
    cache = make_cache(tmp_path / "cache", n_images=8, n_videos=8)
    return cache, train(build_config(tmp_path, cache, **sections(cache)))


def test_two_processes_resume_on_one(tmp_path, reference):
    cache, full = reference
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(base_config(tmp_path, cache, **sections(cache))))

    # 2 -> 1: two processes to step 10; one process (this one) from its checkpoint to step 30
    two = tmp_path / "two"
    run([str(config_file), "--override", f"output_dir={two}", "optim.steps=10"], 2, tmp_path)
    written = list_checkpoints(two / "checkpoints")[-1]
    assert sorted(p.name for p in (written / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resumed = train(build_config(tmp_path, cache, [f"output_dir={two}"], **sections(cache)), resume=True)
    assert sorted(resumed.losses) == list(range(11, STEPS + 1))
    assert_same(full, resumed.losses, full.checkpoint, resumed.checkpoint)
    # the AdamW moments went through the resharding too
    key = "transformer.x_embedder.proj.weight"
    sa, sb = read_optimizer_state(full.checkpoint)["state"][key], read_optimizer_state(resumed.checkpoint)["state"][key]
    assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-3, atol=1e-10)


def test_one_process_resumes_on_two(tmp_path, reference):
    """One process to step 10, two processes to step 30 (through the run folder, as after a preemption)."""
    cache, full = reference
    one = tmp_path / "one"
    train(build_config(tmp_path, cache, [f"output_dir={one}", "optim.steps=10"], **sections(cache)))
    run([str(one), "--override", f"optim.steps={STEPS}"], 2, tmp_path)
    log = read_log(one)
    assert sorted(log) == list(range(1, STEPS + 1))
    last = list_checkpoints(one / "checkpoints")[-1]
    assert_same(full, {s: r["loss"] for s, r in log.items()}, full.checkpoint, last)
