"""Encoder-reuse schedules: the dynamic programme against brute force, and the calibrated schedule end to end."""

import itertools
import json

import numpy as np
import pytest
import torch

from motif_video import MotifVideoPipeline
from motif_video.cli import main as cli_main
from motif_video.errors import MotifVideoError
from motif_video.pipeline.encoder_schedule import (check_refresh, measure_drift, plan_refresh, reuse_error,
                                                   uniform_refresh)
from motif_video.testing import save_tiny_pipeline

SIZE = dict(height=32, width=32, num_frames=9)


def random_drift(steps, seed):
    rng = np.random.default_rng(seed)
    return np.tril(rng.uniform(0.0, 1.0, (steps, steps)), k=-1)  # step i reusing an earlier step j costs drift[i, j]


@pytest.mark.parametrize("steps, budget, seed", [(6, 1, 0), (7, 3, 1), (8, 4, 2), (9, 2, 3), (5, 5, 4)])
def test_plan_is_the_brute_force_optimum(steps, budget, seed):
    drift = random_drift(steps, seed)
    best = min(reuse_error(drift, (0, *rest)) for rest in itertools.combinations(range(1, steps), budget - 1))
    plan = plan_refresh(drift, budget)
    assert len(plan) == budget and plan[0] == 0 and plan == sorted(plan)
    assert reuse_error(drift, plan) == pytest.approx(best, abs=1e-12)


def test_plan_follows_the_drift():
    # Drift concentrated late (as when the noise level falls fastest at the end): the refreshes go there.
    steps = 10
    rate = np.array([0.01] * 6 + [1.0] * 4)
    cumulative = np.concatenate([[0.0], np.cumsum(rate)])
    drift = np.array([[abs(cumulative[i] - cumulative[j]) for j in range(steps)] for i in range(steps)])
    assert plan_refresh(drift, 4) == [0, 7, 8, 9]
    assert reuse_error(drift, plan_refresh(drift, 4)) < reuse_error(drift, uniform_refresh(steps, 3))


def test_schedule_validation():
    assert uniform_refresh(7, 3) == [0, 3, 6]
    assert check_refresh([4, 0, 2, 2], 5) == [0, 2, 4]
    for bad in ([1, 2], [0, 5], []):
        with pytest.raises(MotifVideoError, match="refresh steps"):
            check_refresh(bad, 5)
    with pytest.raises(MotifVideoError, match="budget"):
        plan_refresh(np.zeros((4, 4)), 5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", shift=15.0, guidance_scale=4.0)


def test_refresh_steps_match_uniform_reuse_and_exact(model_dir):
    pipe = MotifVideoPipeline.from_pretrained(model_dir, device="cpu")
    latents = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    common = dict(num_inference_steps=5, latents=latents, progress=False, **SIZE)
    exact = pipe("a red square", **common)
    assert np.array_equal(pipe("a red square", encoder_refresh=[0, 1, 2, 3, 4], **common), exact)
    assert np.array_equal(pipe("a red square", encoder_refresh=[0, 2, 4], **common),
                          pipe("a red square", encoder_reuse=2, **common))
    assert not np.array_equal(pipe("a red square", encoder_refresh=[0, 1, 4], **common), exact)
    with pytest.raises(MotifVideoError, match="refresh steps"):
        pipe("a red square", encoder_refresh=[1, 3], **common)


def test_measured_drift_is_relative_distance_of_traced_encoder_outputs(model_dir):
    pipe = MotifVideoPipeline.from_pretrained(model_dir, device="cpu")
    kwargs = dict(num_inference_steps=4, guidance_scale=4.0, **SIZE)
    trace = []
    pipe(["a red square"], generator=torch.Generator().manual_seed(0), output_type="latent", progress=False,
         encoder_trace=trace, **kwargs)
    e = [step[0][0].flatten() for step in trace]  # cond + uncond batched: one branch, first sample
    e2 = [step[0][1].flatten() for step in trace]
    expected = np.array([[0.5 * (float((e[i] - e[j]).norm() / e[i].norm()) + float((e2[i] - e2[j]).norm() / e2[i].norm()))
                          for j in range(4)] for i in range(4)])
    drift = measure_drift(pipe, ["a red square"], seeds=[0], **kwargs)
    np.testing.assert_allclose(drift, expected, rtol=1e-5, atol=1e-7)
    assert np.all(np.diag(drift) == 0) and drift[3, 0] > 0


def test_calibrate_writes_the_default_schedule(model_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    steps = 6
    (folder / "motif_video.json").write_text(json.dumps({"generation": {"num_inference_steps": steps, **SIZE}}))
    assert cli_main(["calibrate-reuse", str(folder), "--budget", "2", "--prompt", "a red square", "--steps", "4",
                     "--device", "cpu"]) == 0
    assert torch.is_grad_enabled()  # the command leaves the process's autograd state alone
    assert "planned refresh steps (2 of 4)" in capsys.readouterr().out
    assert cli_main(["calibrate-reuse", str(folder), "--budget", "9", "--device", "cpu"]) == 2  # over the steps
    assert cli_main(["calibrate-reuse", str(folder), "--budget", "2", "--prompt", "a red square", "--write",
                     "--device", "cpu"]) == 0
    generation = json.loads((folder / "motif_video.json").read_text())["generation"]
    assert generation["num_inference_steps"] == steps and generation["height"] == 32  # the rest is kept
    assert len(generation["encoder_refresh"]) == 2 and generation["encoder_refresh"][0] == 0
    assert generation["encoder_reuse"] == 3  # every 3rd step (2 runs of 6) at other step counts
    pipe = MotifVideoPipeline.from_pretrained(folder, device="cpu")
    calls = []
    hook = pipe.transformer.transformer_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe("a red square", progress=False, **SIZE)
        assert len(calls) == 2  # the calibrated schedule at the default step count
        calls.clear()
        pipe("a red square", num_inference_steps=steps + 1, progress=False, **SIZE)
        assert len(calls) == len(uniform_refresh(steps + 1, generation["encoder_reuse"]))
        calls.clear()
        pipe("a red square", encoder_reuse=1, progress=False, **SIZE)
        assert len(calls) == steps  # an explicit factor overrides the schedule
    finally:
        hook.remove()
