"""Sequence-parallel training: `parallel.ulysses: 2` and `parallel.ring: 2` on 2 gloo processes (one sample group,
FSDP2 over both) give the losses of one process with the same global batch, TREAD and REPA on, and a Ulysses run
stopped at step 10 and resumed by a fresh launch reproduces the uninterrupted one."""

import pytest
import yaml

from motif_video.train.checkpoint import list_checkpoints, read_weights
from tests.train.engine_helpers import base_config, make_cache, read_log
from tests.train.test_distributed import run


def test_ulysses_and_ring_two_match_one_process_and_resume(tmp_path):
    cache = make_cache(tmp_path / "cache", n_images=4, n_videos=4, teacher="dinov2", teacher_dim=8)
    config = base_config(tmp_path, cache,
                         data={"cache_dirs": [str(cache)], "batch_size": 4},
                         optim={"lr": 2e-3, "steps": 20, "warmup_steps": 2},
                         routing={"selection_ratio": 0.5, "start_layer": 1, "end_layer": 3},
                         alignment={"teacher": "dinov2", "block": 1, "weight": 0.5, "projector_dim": 16},
                         checkpointing={"every": 10, "keep_last": 3})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    run([str(path), "--override", f"output_dir={tmp_path / 'one'}"], 1, tmp_path)
    sp = ["parallel.ulysses=2"]
    run([str(path), "--override", f"output_dir={tmp_path / 'two'}", "optim.steps=10", *sp], 2, tmp_path)
    run([str(tmp_path / "two"), "--override", "optim.steps=20", *sp], 2, tmp_path)
    run([str(path), "--override", f"output_dir={tmp_path / 'ring'}", "optim.steps=10", "parallel.ring=2"], 2,
        tmp_path)

    assert yaml.safe_load((tmp_path / "two" / "config.yaml").read_text())["parallel"]["ulysses"] == 2
    one, two, ring = (read_log(tmp_path / name) for name in ("one", "two", "ring"))
    assert sorted(one) == sorted(two) == list(range(1, 21))
    assert sorted(ring) == list(range(1, 11))
    assert any(one[s].get("repa_loss", 0) > 0 for s in one)
    for run_log in (two, ring):
        for step in run_log:
            assert run_log[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-4, rel=0), step
            assert run_log[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-3), step
    a = list_checkpoints(tmp_path / "one" / "checkpoints")[-1]
    b = list_checkpoints(tmp_path / "two" / "checkpoints")[-1]
    wa, wb = read_weights(a, "model", lora=False), read_weights(b, "model", lora=False)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
