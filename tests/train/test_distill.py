"""Few-step distillation on cached teacher trajectories (train/distill.py).

The loss is checked against analytic values: a student whose own Euler sampling produced the trajectories has zero
loss, and an offset c added to the teacher's final state costs exactly (c / s_{K-1})^2 on the samples that train on
the last segment. The engine properties are checked as for flow matching: two processes equal one, kill + resume
reproduces the run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from motif_video.cli import main as cli_main
from motif_video.errors import ConfigError, MotifVideoError
from motif_video.pipeline.pipeline import MotifVideoPipeline
from motif_video.pipeline.sampler import make_scheduler
from motif_video.testing import save_tiny_pipeline
from motif_video.train.checkpoint import list_checkpoints, read_weights
from motif_video.train.config import load_config
from motif_video.train.distill import (DistillationObjective, TrajectoryDataset, TrajectoryWriter,
                                       teacher_trajectories, write_trajectories)
from motif_video.train.loop import train
from motif_video.train.objective import TrainModule
from tests.train.engine_helpers import base_config, one_thread, read_log  # noqa: F401
from tests.train.test_distributed import run as run_cli
from tests.train.test_resume import Crash, crash_after

SIZE = dict(height=32, width=32, num_frames=5)  # latent (16, 2, 4, 4): 8 tokens
PROMPTS = ["a red circle moving left", "a small blue square", "a large green triangle moving up",
           "a cat running", "a yellow square moving down", "a dog", "a white circle static", "a big cyan triangle"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    # No image projection: a T2V run never trains it (test_resume.py resumes a run with one).
    folder = save_tiny_pipeline(tmp_path_factory.mktemp("teacher") / "model", shift=3.0, image_embed_dim=None)
    torch.set_num_threads(1)
    return folder, MotifVideoPipeline.from_pretrained(folder, device="cpu")


def test_student_schedule_is_on_the_teachers():
    teacher = make_scheduler("euler", 3.0, 20).sigmas.tolist()
    student = make_scheduler("euler", 3.0, 4).sigmas.tolist()
    from motif_video.train.distill import student_sigmas

    assert student_sigmas(teacher, 4) == pytest.approx(student, abs=1e-6)
    with pytest.raises(Exception, match="must divide"):
        student_sigmas(teacher, 3)


def _loss(objective, module, dataset, step=1):
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    ids = list(range(len(dataset)))
    return objective(module, batch, step, ids, torch.device("cpu")), [objective.segment(step, i) for i in ids]


def test_teacher_trajectories_from_a_generator_end_where_the_pipeline_samples(teacher):
    """The batch's noise drawn from a generator, as the pipeline draws it: the last state is the pipeline's sample."""
    _, pipe = teacher
    sampling = dict(num_inference_steps=8, encoder_reuse=1, **SIZE)
    states, _ = teacher_trajectories(pipe, PROMPTS, student_steps=4, generator=torch.Generator().manual_seed(3),
                                     **sampling)
    sample = pipe(PROMPTS, generator=torch.Generator().manual_seed(3), output_type="latent", progress=False,
                  **sampling)
    assert torch.equal(states[:, -1], sample.float())
    with pytest.raises(MotifVideoError, match="one of them"):
        teacher_trajectories(pipe, PROMPTS, student_steps=4, seeds=[0] * len(PROMPTS),
                             generator=torch.Generator(), **sampling)


def test_loss_is_zero_on_the_students_own_trajectories_and_analytic_with_an_offset(teacher, tmp_path):
    folder, pipe = teacher
    # The "teacher" is the student itself sampling 4 unguided steps with the encoder on step 0 only: its own Euler
    # steps land exactly on the cached states, so its distillation loss is 0 (float rounding only).
    sampling = dict(num_inference_steps=4, guidance_scale=1.0, encoder_refresh=[0], **SIZE)
    states, sigmas = teacher_trajectories(pipe, PROMPTS, student_steps=4, seeds=list(range(len(PROMPTS))),
                                          **sampling)
    assert states.shape == (len(PROMPTS), 5, 16, 2, 4, 4)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    text, mask = pipe.prompts.encode(PROMPTS)
    offset = 0.25
    for name, shift_final in (("exact", 0.0), ("offset", offset)):
        writer = TrajectoryWriter(tmp_path / name, teacher="tiny", sigmas=sigmas, sampling=sampling, shard_samples=3)
        for i, prompt in enumerate(PROMPTS):
            moved = states[i].clone()
            moved[-1] += shift_final
            writer.add(moved, text[i], None if mask is None else mask[i], prompt)
        writer.close()
    module = TrainModule(pipe.transformer)
    objective = DistillationObjective(seed=0, sigmas=sigmas, encoder_refresh=[0])
    exact = TrajectoryDataset(tmp_path / "exact")
    assert len(exact) == len(PROMPTS) and exact.sigmas == sigmas
    for step in (1, 2, 3):
        out, _ = _loss(objective, module, exact, step)
        assert out.loss.item() < 1e-11
    batch = exact.collate([exact[i] for i in range(8)])
    every_segment = objective.evaluate(module, batch, list(range(8)), torch.device("cpu")).item()
    assert every_segment < 1e-11
    # Without the encoder reuse the student samples with, the same trajectories are no longer its own (the tiny
    # random model's encoder moves its output only a little, hence the small absolute value).
    fresh = DistillationObjective(seed=0, sigmas=sigmas, encoder_refresh=None)
    assert fresh.evaluate(module, batch, list(range(8)), torch.device("cpu")).item() > 100 * every_segment

    shifted = TrajectoryDataset(tmp_path / "offset")
    for step in range(1, 6):
        out, segments = _loss(objective, module, shifted, step)
        last = sum(k == 3 for k in segments)
        expected = last / len(PROMPTS) * (offset / sigmas[3]) ** 2
        assert out.loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert {k for step in range(1, 6) for k in _loss(objective, module, shifted, step)[1]} == {0, 1, 2, 3}


def test_distill_data_command_samples_the_guided_teacher(teacher, tmp_path):
    folder, pipe = teacher
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    out = tmp_path / "traj"
    assert cli_main(["distill-data", str(folder), str(out), "--prompts", str(prompts), "--student-steps", "2",
                     "--steps", "4", "--guidance-scale", "3", "--height", "32", "--width", "32", "--frames", "5",
                     "--batch", "2"]) == 0
    dataset = TrajectoryDataset(out)
    assert len(dataset) == 3 and len(dataset.sigmas) == 3
    # State 2 (the teacher's sample) equals the guided teacher's own 4-step output from the same noise.
    item = dataset[1]
    from motif_video.train.objective import sample_seed

    noise = torch.randn((1, 16, 2, 4, 4), generator=torch.Generator().manual_seed(sample_seed(0, "teacher-noise", 1)))
    assert torch.equal(item["trajectory"][0], noise[0])
    sample = pipe(PROMPTS[1], latents=noise, output_type="latent", num_inference_steps=4, guidance_scale=3.0,
                  encoder_reuse=1, progress=False, **SIZE)
    assert torch.allclose(item["trajectory"][-1], sample[0], atol=1e-5)
    assert cli_main(["distill-data", str(folder), str(out), "--nano-prompts", "2"]) == 2  # exists: one-line error
    assert cli_main(["distill-data", str(folder), str(tmp_path / "x"), "--prompts", str(prompts),
                     "--student-steps", "3", "--steps", "4"]) == 2


def test_config_checks():
    base = {"model": {"preset": "motif-video-tiny"}, "data": {"cache_dirs": ["c"]}}
    with pytest.raises(ConfigError, match="encoder_refresh applies"):
        load_config(data={**base, "objective": {"encoder_refresh": [0]}})
    with pytest.raises(ConfigError, match="rollout_fraction applies"):
        load_config(data={**base, "objective": {"rollout_fraction": 0.5}})
    with pytest.raises(ConfigError, match="segment_weights applies"):
        load_config(data={**base, "objective": {"segment_weights": [1, 1]}})
    with pytest.raises(ConfigError, match="positive sum"):
        load_config(data={**base, "objective": {"kind": "distill", "segment_weights": [0, 0]}})
    with pytest.raises(ConfigError, match="4 weights"):
        DistillationObjective(seed=0, sigmas=[1.0, 0.9, 0.75, 0.5, 0.0], segment_weights=[1, 1])
    with pytest.raises(ConfigError, match="REPA"):
        load_config(data={**base, "objective": {"kind": "distill"}, "alignment": {}})
    with pytest.raises(ConfigError, match="routing"):
        load_config(data={**base, "objective": {"kind": "distill", "encoder_refresh": [0]},
                          "routing": {"selection_ratio": 0.5, "start_layer": 1, "end_layer": 2}})


def test_segment_weights_set_how_often_each_step_is_trained():
    sigmas = [1.0, 0.9, 0.75, 0.5, 0.0]
    uniform = DistillationObjective(seed=0, sigmas=sigmas)
    assert uniform.segment_weights is None  # the default draw is unchanged: runs made before reproduce
    weighted = DistillationObjective(seed=0, sigmas=sigmas, segment_weights=[0, 1, 1, 2])
    draws = torch.tensor([weighted.segment(step, sid) for step in range(250) for sid in range(16)])
    frequency = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert frequency[0] == 0  # a zero weight is never drawn
    assert torch.allclose(frequency[1:], torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64), atol=0.03)
    assert weighted.segment(7, 3) == weighted.segment(7, 3)  # seeded per (step, sample)


def test_rollout_states_are_the_students_own_sampling(teacher, tmp_path):
    # Trajectories of the guided teacher; the rollout replaces x_1 .. x_k by the states the pipeline reaches when the
    # student samples 4 unguided steps with the encoder on step 0 from the same noise (the independent reference).
    folder, pipe = teacher
    seeds = list(range(len(PROMPTS)))
    guided, sigmas = teacher_trajectories(pipe, PROMPTS, student_steps=4, seeds=seeds, num_inference_steps=8,
                                          guidance_scale=3.0, guider="cfg", **SIZE)
    own, _ = teacher_trajectories(pipe, PROMPTS, student_steps=4, seeds=seeds, num_inference_steps=4,
                                  guidance_scale=1.0, encoder_refresh=[0], **SIZE)
    assert torch.equal(guided[:, 0], own[:, 0]) and (guided[:, 1:] - own[:, 1:]).abs().max() > 1e-3
    text, mask = pipe.prompts.encode(PROMPTS)
    objective = DistillationObjective(seed=0, sigmas=sigmas, encoder_refresh=[0], rollout_fraction=0.5)
    segments = torch.tensor([3, 3, 2, 1, 0, 3, 2, 1])
    rollout = torch.tensor([True, False, True, True, True, True, False, False])
    states = objective.student_states(TrainModule(pipe.transformer), guided, segments, rollout, text, mask)
    for i, (k, rolled) in enumerate(zip(segments.tolist(), rollout.tolist())):
        reached = k if rolled else 0
        torch.testing.assert_close(states[i, :reached + 1], own[i, :reached + 1], atol=1e-5, rtol=1e-5)
        assert torch.equal(states[i, reached + 1:], guided[i, reached + 1:])
    # Rows that roll out target the teacher's next state from their own: v = (x_{k+1} - x^_k) / ds.
    targets = objective.targets(guided, segments, states)
    i, k = 0, 3
    torch.testing.assert_close(targets[i], (guided[i, k + 1] - own[i, k]) / (sigmas[k + 1] - sigmas[k]),
                               atol=1e-4, rtol=1e-4)
    assert sum(objective.rolls_out(1, n) for n in range(400)) == pytest.approx(200, abs=30)
    with pytest.raises(ConfigError, match="rollout_fraction"):
        DistillationObjective(seed=0, sigmas=sigmas, rollout_fraction=1.5)


def _cache(teacher, folder):
    _, pipe = teacher
    return write_trajectories(pipe, PROMPTS, folder, teacher="tiny", student_steps=2, batch_size=4,
                              num_inference_steps=4, guidance_scale=2.0, guider="cfg", **SIZE)


def _config(tmp_path, teacher, cache, **sections):
    folder, _ = teacher
    raw = base_config(tmp_path, cache, **{
        "seed": 5, "model": {"pretrained": str(folder / "transformer")},
        "data": {"cache_dirs": [str(cache)], "batch_size": 4, "interleave": ""},
        "objective": {"kind": "distill", "encoder_refresh": [0], "rollout_fraction": 0.5},
        "optim": {"lr": 2e-3, "steps": 10, "warmup_steps": 2},
        "checkpointing": {"every": 3, "keep_last": 5}, **sections})
    return raw


def test_two_processes_match_one(teacher, tmp_path):
    cache = _cache(teacher, tmp_path / "traj")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, teacher, cache)))
    run_cli([str(path), "--override", f"output_dir={tmp_path / 'one'}"], 1, tmp_path)
    run_cli([str(path), "--override", f"output_dir={tmp_path / 'two'}"], 2, tmp_path)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 11))
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-4, rel=0), step
    a = list_checkpoints(tmp_path / "one" / "checkpoints")[-1]
    b = list_checkpoints(tmp_path / "two" / "checkpoints")[-1]
    for which in ("model", "ema"):
        wa, wb = read_weights(a, which, lora=False), read_weights(b, which, lora=False)
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


@pytest.mark.parametrize("routed", [False, True])
def test_kill_and_resume_reproduces_the_run(teacher, tmp_path, routed):
    cache = _cache(teacher, tmp_path / "traj")
    sections = {"optim": {"lr": 2e-3, "steps": 8, "warmup_steps": 2, "schedule": "cosine"}}
    if routed:  # TREAD applies to the student when it samples without encoder reuse
        sections.update(objective={"kind": "distill"},
                        routing={"selection_ratio": 0.5, "start_layer": 1, "end_layer": 3})
    full = train(load_config(data=_config(tmp_path / "full", teacher, cache, **sections)))
    config = load_config(data=_config(tmp_path / "cut", teacher, cache, **sections))
    with pytest.raises(Crash):
        train(config, callbacks=[crash_after(5)])
    resumed = train(config, resume=True)
    assert resumed.step == 8 and sorted(resumed.losses) == [4, 5, 6, 7, 8]
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(full.losses[step], abs=1e-6, rel=0)
    for which in ("model", "ema"):
        a, b = read_weights(full.checkpoint, which, lora=False), read_weights(resumed.checkpoint, which, lora=False)
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_the_distillation_configs_load():
    root = Path(__file__).resolve().parents[2] / "configs"
    nano = load_config(root / "nano" / "distill.yaml")
    assert nano.objective.kind == "distill" and nano.objective.encoder_refresh == [0] and nano.routing is None
    assert nano.objective.rollout_fraction == 0.5 and nano.optim.steps == 3000
    big = load_config(root / "motif-2b" / "distill.yaml")
    assert big.objective.kind == "distill" and big.model.pretrained and big.routing is not None


NANO = Path(__file__).resolve().parents[2] / "src" / "motif_video" / "assets" / "motif-video-nano"


def test_the_nano_students_defaults_cost_8x_fewer_transformer_flops_than_the_teachers():
    """Counted as the shipping bar counts them: a guided step's two rows twice, a reusing step only what it runs."""
    from motif_video.flops import encoder_runs, forward_flops
    from motif_video.model.config import TransformerConfig
    from motif_video.nano.distill import student_defaults
    from motif_video.model_folder import GenerationDefaults

    teacher = GenerationDefaults.from_folder(NANO)
    student = GenerationDefaults(**student_defaults(dataclasses.asdict(teacher)))
    assert (student.num_inference_steps, student.guidance_scale, student.encoder_refresh) == (4, 1.0, [0])
    assert teacher.magcache_ratios and student.magcache_ratios is None  # the teacher's calibration is not the student's
    config = TransformerConfig.from_dict(json.loads((NANO / "transformer" / "config.json").read_text()))
    cond, uncond = forward_flops(config, 80, 12), forward_flops(config, 80, 2)  # 17x64x64: 80 tokens

    def cost(d: GenerationDefaults, rows) -> int:
        runs = len(d.encoder_refresh) if d.encoder_refresh else encoder_runs(d.num_inference_steps, d.encoder_reuse)
        return sum(d.num_inference_steps * f.reuse_step + runs * f.encoder_total for f in rows)

    ratio = cost(teacher, [cond, uncond]) / cost(student, [cond])
    assert ratio >= 8, ratio


def test_built_in_model_names_and_the_students_pointers(tmp_path):
    from motif_video.errors import CheckpointError
    from motif_video.hub import resolve_model_dir
    from motif_video.model_folder import component_path
    from motif_video.nano.distill import component_pointer

    assert resolve_model_dir("motif-video-nano") == NANO
    from motif_video.model_folder import GenerationDefaults
    from motif_video.nano.distill import student_defaults

    fast = resolve_model_dir("motif-video-nano-fast")
    assert fast == NANO.parent / "motif-video-nano-fast" and (fast / "model_index.json").is_file()
    # The shipped student samples as the recipe writes its folder, and its codec is the teacher's.
    teacher_defaults = dataclasses.asdict(GenerationDefaults.from_folder(NANO))
    assert GenerationDefaults.from_folder(fast) == GenerationDefaults(**student_defaults(teacher_defaults))
    assert component_path(fast, "vae").resolve() == (NANO / "vae").resolve()
    with pytest.raises(CheckpointError, match="built-in models"):
        resolve_model_dir("motif-video-nano-slow")
    # The student's vae/ points into this package at the teacher's codec, which loads from there.
    pointer = component_pointer(NANO, "vae")
    assert pointer == {"package": "motif_video", "path": "assets/motif-video-nano/vae"}
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "source.json").write_text(json.dumps(pointer))
    assert component_path(tmp_path, "vae").resolve() == (NANO / "vae").resolve()
    assert component_pointer(NANO, "tokenizer") == json.loads((NANO / "tokenizer" / "source.json").read_text())


def test_the_student_folder_loads_with_the_students_defaults(teacher, tmp_path):
    """nano-distill's model folder: the student's EMA transformer, the teacher's other parts, 4 unguided steps."""
    from motif_video.nano.distill import write_student_folder

    folder, _ = teacher
    cache = _cache(teacher, tmp_path / "traj")
    result = train(load_config(data=_config(tmp_path, teacher, cache, optim={"lr": 1e-3, "steps": 2})))
    write_student_folder(folder, tmp_path / "run", tmp_path / "model")
    student = MotifVideoPipeline.from_pretrained(tmp_path / "model", device="cpu")
    d = student.defaults
    assert (d.num_inference_steps, d.guidance_scale, d.encoder_refresh, d.solver) == (4, 1.0, [0], "euler")
    ema = read_weights(result.checkpoint, "ema", lora=False)
    weights = student.transformer.state_dict()
    assert all(torch.equal(weights[k.removeprefix("transformer.")], v.half().float()) for k, v in ema.items())
    video = student("a red circle moving left", output_type="latent", generator=torch.Generator().manual_seed(0),
                    progress=False, **SIZE)
    assert video.shape == (1, 16, 2, 4, 4) and torch.isfinite(video).all()


def test_a_failed_student_folder_write_leaves_the_previous_one(teacher, tmp_path):
    """write_student_folder over an existing model folder, with a run that has no checkpoint to export: the error
    is one line and the previous folder is still there, whole."""
    from motif_video.errors import CheckpointError
    from motif_video.nano.distill import write_student_folder

    folder, _ = teacher
    previous = save_tiny_pipeline(tmp_path / "model", image_embed_dim=None)
    before = {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()}
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        write_student_folder(folder, tmp_path / "run", previous)
    assert {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "run"]


def test_nano_distill_trains_on_several_trajectory_caches(teacher, tmp_path):
    from motif_video.nano.distill import run_distill_recipe

    folder, _ = teacher
    caches = [_cache(teacher, tmp_path / "a"), _cache(teacher, tmp_path / "b")]
    log = run_distill_recipe(tmp_path / "out", folder, steps=2, eval_prompts=0, trajectories_from=caches,
                             progress=False, train_overrides=["data.batch_size=4", "optim.warmup_steps=1",
                                                              "checkpointing.every=2"])
    assert log["prompts"] == 2 * len(PROMPTS) and len(log["trajectories_from"]) == 2
    saved = yaml.safe_load((tmp_path / "out" / "run" / "config.yaml").read_text())
    assert saved["data"]["cache_dirs"] == [str(c) for c in caches]
    assert json.loads((tmp_path / "out" / "run" / "log.jsonl").read_text().splitlines()[-1])["step"] == 2
    assert (tmp_path / "out" / "model" / "transformer").is_dir()
