"""diffusers' own pipeline on our weights converted to its layout (the anchor of benchmarks/fast_sampling.py): with no
cache it samples the latents ours samples; its cache hooks run, or fail, on Motif's blocks as the table reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from motif_video import MotifVideoPipeline
from motif_video.convert.checkpoint import read_state_dict
from motif_video.convert.layouts import detect_layout
from motif_video.errors import CheckpointError
from motif_video.model_folder import update_generation_defaults
from motif_video.pipeline.diffusers_reference import DiffusersReference, diffusers_cache
from motif_video.pipeline.pipeline import initial_noise
from motif_video.testing import save_tied_transformer, save_tiny_pipeline

STEPS = 6
PROMPTS = ["a red circle moving to the left", "a large blue square moving up"]  # two lengths: a padded batch


def save_tied_model(folder: Path, query_bias: bool) -> Path:
    """A tiny model folder whose transformer is in our tied layout (as the nano model is trained), random weights,
    with nano-like defaults at a tiny size (Euler, CFG 2, an empty negative prompt)."""
    save_tied_transformer(save_tiny_pipeline(folder), query_bias)
    update_generation_defaults(folder, height=32, width=32, num_frames=9, num_inference_steps=STEPS,
                               guidance_scale=2.0, guider="cfg", shift=3.0, solver="euler", negative_prompt="",
                               max_sequence_length=16, encoder_reuse=1, fps=8, magcache_ratios=[1.0] * STEPS)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tied_model(tmp_path_factory.mktemp("tied") / "model", query_bias=False)


@pytest.fixture(scope="module")
def pipe(model_dir):
    return MotifVideoPipeline.from_pretrained(model_dir, device="cpu")


@pytest.fixture(scope="module")
def reference(model_dir, pipe, tmp_path_factory):
    return DiffusersReference.from_model(model_dir, pipe, tmp_path_factory.mktemp("converted"))


def seeds():
    return [torch.Generator().manual_seed(s) for s in (3, 4)]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def test_without_a_cache_diffusers_samples_our_latents(model_dir, pipe, reference):
    assert detect_layout(read_state_dict(model_dir / "transformer")) == "tied"  # the converter really folded it
    noise = initial_noise((2, 16, 3, 4, 4), seeds())
    ours = pipe(PROMPTS, generator=seeds(), output_type="latent", progress=False) - noise
    theirs = reference(PROMPTS, generator=seeds(), output_type="latent", progress=False) - noise
    # compared: what sampling moved the noise by. fp32; the two differ in operation order, text padding (diffusers
    # pads to 16 tokens with a mask) and guidance batching (two forwards there, one here), which moves the last
    # bits: 1e-5 of the largest move
    assert relative_error(theirs, ours) <= 1e-5
    # the tolerance separates a real change: our encoder reuse (the encoder's output of step 0 kept for step 1, ...)
    reused = pipe(PROMPTS, generator=seeds(), output_type="latent", progress=False, encoder_reuse=2) - noise
    assert relative_error(reused, ours) > 1e-3


def test_a_model_with_a_query_bias_is_refused_with_the_converters_reason(tmp_path, pipe):
    folder = save_tied_model(tmp_path / "biased", query_bias=True)
    with pytest.raises(CheckpointError, match="non-zero bias"):
        DiffusersReference.from_model(folder, MotifVideoPipeline.from_pretrained(folder, device="cpu"), tmp_path)


def test_first_block_cache_cannot_run_on_the_ddt_decoder(reference):
    # diffusers' first-block cache chains every block of transformer_blocks + single_transformer_blocks and stores
    # the tail's "encoder_hidden_states" output minus the head's: in Motif's last (decoder) block that is the
    # encoder's video tokens (12 here), in the head block the text tokens (16, padded): no common shape
    config = diffusers_cache("fbcache", 0.1, STEPS)
    with pytest.raises(RuntimeError, match="size of tensor"):
        reference(PROMPTS, generator=seeds(), output_type="latent", progress=False, cache=config)
    assert not reference.transformer.is_cache_enabled  # the failed call took its hooks with it


def test_magcache_skips_hand_the_output_head_the_patch_embedding(reference):
    # On a step diffusers' MagCache skips, the head block returns its input plus the cached residual and every
    # other block passes its inputs through; but Motif's DDT decoder does not read the previous block's output: its
    # stream starts again from the patch embedding, so the output head gets that embedding unchanged
    transformer = reference.transformer
    embedded, head_input, decoder_ran = [], [], []
    hooks = [transformer.x_embedder.register_forward_hook(lambda m, a, out: embedded.append(out)),
             transformer.norm_out.register_forward_hook(lambda m, a, out: head_input.append(a[0])),
             transformer.single_transformer_blocks[-1].proj_out.register_forward_hook(
                 lambda m, a, out: decoder_ran.append(len(embedded)))]
    try:
        reference(PROMPTS, generator=seeds(), output_type="latent", progress=False,
                  cache=diffusers_cache("magcache", 0.5, STEPS, [1.0] * STEPS))
    finally:
        for hook in hooks:
            hook.remove()
    skipped = [i for i in range(len(embedded)) if i + 1 not in decoder_ran]
    assert skipped and len(embedded) == 2 * STEPS  # some calls skipped, of cond + uncond per step
    for i in skipped:
        assert torch.equal(head_input[i], embedded[i])
    for i in sorted(set(range(len(embedded))) - set(skipped)):
        assert not torch.equal(head_input[i], embedded[i])


@pytest.mark.parametrize("kind", ["taylorseer", "taylorseer-lite"])
def test_taylorseer_runs_and_is_exact_at_interval_one(reference, kind):
    exact = reference(PROMPTS, generator=seeds(), output_type="latent", progress=False)
    same = reference(PROMPTS, generator=seeds(), output_type="latent", progress=False,
                     cache=diffusers_cache(kind, 1, STEPS))
    assert torch.equal(same, exact)
    cached = reference(PROMPTS, generator=seeds(), output_type="latent", progress=False,
                       cache=diffusers_cache(kind, 2, STEPS))
    assert torch.isfinite(cached).all() and not torch.equal(cached, exact)


def test_the_benchmark_puts_the_anchor_rows_in_its_table(model_dir, tmp_path):
    rows = ["teacher, exact (encoder every step)", "diffusers, no cache", "diffusers fbcache 0.1",
            "diffusers magcache 0.25", "diffusers taylorseer-lite interval 2"]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(root / "benchmarks" / "fast_sampling.py"), "--model", str(model_dir),
                    "--prompts", "2", "--batch", "2", "--flop-prompts", "1", "--only", *rows,
                    "--out", str(tmp_path / "out")], check=True, env=env, cwd=tmp_path, capture_output=True)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    settings, missing = results["settings"], results["not_measured"]
    assert set(settings) == {"teacher, defaults", *rows} - {"diffusers fbcache 0.1"}
    assert missing["diffusers fbcache 0.1"].startswith("cannot run: RuntimeError: The size of tensor")
    # no cache: the same clips as our exact sampling, so the same scores; FLOPs counted in diffusers' model
    ours, theirs = settings["teacher, exact (encoder every step)"], settings["diffusers, no cache"]
    for key in ("all_correct", "color_accuracy", "shape_accuracy", "direction_accuracy"):
        assert theirs[key] == ours[key]
    assert theirs["subject_consistency"] == pytest.approx(ours["subject_consistency"], abs=1e-3)
    assert theirs["evaluations_per_clip"] == ours["evaluations_per_clip"] == 2 * STEPS
    assert theirs["flops_per_clip"] > ours["flops_per_clip"]  # the same blocks, over 16 padded text tokens
    assert settings["diffusers taylorseer-lite interval 2"]["evaluations_per_clip"] < 2 * STEPS
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| diffusers fbcache 0.1 |" in table and "| diffusers, no cache | 6 |" in table
