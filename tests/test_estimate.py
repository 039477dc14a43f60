"""`motif-video estimate` and motif_video.flops, each checked against something measured.

FLOPs: FlopCounterMode over real forwards (math SDPA backend, so attention's matmuls are visible), the meta device at
the release size, and the pipeline's own sampling loop with encoder reuse. Weights: the parameters and GGUF files of
real models. Activations: torch's MemTracker, which follows every tensor our forward allocates and frees.
"""

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from motif_video import MotifVideoTransformer, preset
from motif_video.cli import main
from motif_video.commands.estimate import activation_bytes, estimate, parameter_shapes, weight_bytes
from motif_video.errors import MotifVideoError
from motif_video.flops import (count_flops, forward_flops, meta_model_inputs, sampling_flops, video_tokens)
from motif_video.model.transformer import EncoderCache

RELEASE = dict(height=736, width=1280, frames=121)


def small(**overrides):
    """Every part present at a few thousand parameters: dual, single encoder with cross-attention, decoder."""
    return preset("motif-video-tiny", **overrides)


def measured_forward(config, latent, batch, text_len, image_tokens=0, cache=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = MotifVideoTransformer(config).eval()
    x = torch.randn(batch, config.in_channels, *latent, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    text = torch.randn(batch, text_len, config.text_embed_dim, generator=gen)
    image = torch.randn(batch, image_tokens, config.image_embed_dim, generator=gen) if image_tokens else None
    with torch.no_grad():
        if cache is not None:  # fill the cache first, then count a step that reuses it
            model(x, t, text, image_embeds=image, encoder_cache=cache)
            cache.refresh = False
        return count_flops(lambda: model(x, t, text, image_embeds=image, encoder_cache=cache))


# -- sizes ----------------------------------------------------------------------------------------------------------
def test_release_size_gives_114080_video_tokens():
    result = estimate(preset("motif-video-2b"), **RELEASE, text_tokens=512)
    assert result["video"]["latent_shape"] == [16, 31, 92, 160]
    assert result["video"]["token_grid"] == [31, 46, 80]
    assert result["video"]["video_tokens"] == 114_080
    assert result["video"]["batch"] == 2  # guidance: cond + uncond in one batch
    assert result["model"]["params"] == 2_037_809_600  # SPEC section 1


# -- FLOPs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, image_tokens", [
    ({}, 0),  # T2V with Shared Cross-Attention and a decoder
    ({"enable_text_cross_attention_single": False}, 0),
    ({"num_decoder_layers": 0}, 0),  # no decoder: single-stream encoder to the end
    ({"num_decoder_layers": 2, "num_single_layers": 4}, 5),  # I2V image tokens; decoder of 2
    ({"enable_text_cross_attention_dual": True, "cross_attention_form": "tied"}, 0),
])
def test_analytic_flops_match_flop_counter(overrides, image_tokens):
    config = small(**overrides)
    latent, batch, text_len = (3, 8, 12), 2, 7
    measured = measured_forward(config, latent, batch, text_len, image_tokens)
    analytic = forward_flops(config, video_tokens(config, latent), text_len, image_tokens, batch).total
    assert analytic == pytest.approx(measured, rel=0.02)


def test_reuse_step_flops_match_flop_counter():
    config = small()
    latent, batch, text_len = (3, 8, 12), 2, 7
    measured = measured_forward(config, latent, batch, text_len, cache=EncoderCache())
    analytic = forward_flops(config, video_tokens(config, latent), text_len, 0, batch)
    assert analytic.reuse_step == pytest.approx(measured, rel=0.02)
    assert analytic.reuse_step < analytic.total / 2  # the encoder is most of this model


def test_release_size_flops_match_meta_count():
    """The 2B at 1280x736x121 with guidance, counted on the meta device: no memory, no compute."""
    config = preset("motif-video-2b")
    model, latents, timestep, text, image = meta_model_inputs(config, (31, 92, 160), 2, 512, image_tokens=16)
    with torch.no_grad():
        measured = count_flops(lambda: model(latents, timestep, text, image_embeds=image))
    flops = estimate(config, **RELEASE, text_tokens=512, image_tokens=16)["flops"]
    assert flops["forward"] == pytest.approx(measured, rel=0.02)
    assert 0.9 < flops["attention"] / flops["forward"] < 0.97  # at 114k tokens the S^2 products dominate


def test_pipeline_sampling_flops_with_encoder_reuse(tmp_path):
    """The pipeline's transformer FLOPs over 3 steps with encoder_reuse=2: encoder on steps 0 and 2 only."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from motif_video import MotifVideoPipeline
    from motif_video.testing import save_tiny_pipeline

    pipe = MotifVideoPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "model"), device="cpu")
    prompt, negative = "a red circle", "blurry"
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        pipe(prompt, negative_prompt=negative, height=32, width=32, num_frames=5, num_inference_steps=3,
             encoder_reuse=2, guidance_scale=4.0, output_type="latent", progress=False)
    measured = sum(counter.get_flop_counts()["MotifVideoTransformer"].values())
    text_len = max(pipe.prompts.encode([p])[0].shape[1] for p in (prompt, negative))  # cond/uncond padded alike
    config = pipe.transformer.config
    fwd = forward_flops(config, video_tokens(config, (2, 4, 4)), text_len, 0, batch=2)
    assert sampling_flops(fwd, steps=3, reuse=2) == pytest.approx(measured, rel=0.02)
    assert sampling_flops(fwd, steps=3, reuse=1) > measured


# -- weights --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["motif-video-2b", "motif-video-small", "motif-video-nano", "motif-video-tiny"])
@pytest.mark.parametrize("form", ["untied", "tied", "tied-no-query-bias"])
def test_parameter_shapes_and_bytes_match_real_models(name, form):
    config = preset(name, cross_attention_form=form.removesuffix("-no-query-bias"),
                    cross_attention_query_bias=not form.endswith("-no-query-bias"))
    with torch.device("meta"):
        model = MotifVideoTransformer(config)
    real = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert parameter_shapes(config) == real
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        model.to(torch_dtype)
        expected = sum(p.numel() * p.element_size() for p in model.parameters())
        assert weight_bytes(config, dtype)["resident"] == expected


@pytest.mark.parametrize("dtype", ["gguf-q8_0", "gguf-q4_0"])
@pytest.mark.parametrize("quantize_modulation", [False, True])
def test_gguf_bytes_match_written_and_loaded_files(dtype, quantize_modulation, randomize):
    from gguf import GGUFReader

    from motif_video.convert.gguf import WRITE_TYPES, model_nbytes, write_gguf

    # widths that split into whole 32-value blocks, so most Linear weights are quantised
    config = small(num_attention_heads=2, attention_head_dim=16, image_embed_dim=None)
    model = randomize(MotifVideoTransformer(config))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_gguf(model.state_dict(), Path(tmp) / "t.gguf", WRITE_TYPES[dtype.removeprefix("gguf-")],
                          config_json=config.to_diffusers_json(), quantize_modulation=quantize_modulation,
                          progress=False)
        file_bytes = sum(int(t.n_bytes) for t in GGUFReader(path).tensors)
        loaded = MotifVideoTransformer.from_single_file(path, compute_dtype=torch.bfloat16)
        resident = model_nbytes(loaded)
    estimated = weight_bytes(config, dtype, quantize_modulation=quantize_modulation)
    assert estimated["file"] == file_bytes
    assert estimated["resident"] == resident
    assert estimated["quantized_tensors"] > 0


def test_gguf_q4_k_release_size_follows_the_quantize_plan():
    """Q4_K cannot be written by gguf's numpy quantiser; check the planned size from the real model's keys."""
    from gguf import GGMLQuantizationType as Q

    from motif_video.convert.gguf import plan_types, planned_nbytes

    config = preset("motif-video-2b")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MotifVideoTransformer(config).state_dict().items()}
    assert weight_bytes(config, "gguf-q4_k")["file"] == planned_nbytes(shapes, plan_types(shapes, Q.Q4_K))
    q4 = weight_bytes(config, "gguf-q4_0")
    assert q4["resident"] < weight_bytes(config, "bf16")["resident"] / 2


# -- activations ----------------------------------------------------------------------------------------------------
def tracked_peak(config, latent, batch, text_len, dtype, reuse=False) -> int:
    """Peak bytes of everything but parameters while one forward runs, from torch's MemTracker."""
    from torch.distributed._tools.mem_tracker import MemTracker

    gen = torch.Generator().manual_seed(0)
    model = MotifVideoTransformer(config).eval().to(dtype)
    x = torch.randn(batch, config.in_channels, *latent, generator=gen).to(dtype)
    t = torch.rand(batch, generator=gen) * 1000
    text = torch.randn(batch, text_len, config.text_embed_dim, generator=gen).to(dtype)
    cache = EncoderCache() if reuse else None
    with torch.no_grad():
        if reuse:  # a refresh step with a full cache: the previous encoder output is still held
            model(x, t, text, encoder_cache=cache)
            model._rope_cache.clear()
        tracker = MemTracker()
        tracker.track_external(model, x, text, t)
        with tracker:
            del_me = model(x, t, text, encoder_cache=cache)
            del del_me
    snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return snapshot["Total"] - snapshot["Parameter"] - snapshot["Buffer"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name, overrides, latent, text_len, reuse", [
    ("motif-video-tiny", {}, (5, 16, 16), 8, False),  # decoder-bound
    ("motif-video-tiny", {"num_decoder_layers": 2, "num_single_layers": 4}, (5, 16, 16), 8, True),
    ("motif-video-tiny", {"num_decoder_layers": 0}, (3, 16, 16), 40, False),  # encoder-bound
    ("motif-video-nano", {}, (3, 16, 16), 16, False),
])
def test_activation_peak_matches_memory_tracker(dtype, name, overrides, latent, text_len, reuse):
    config = preset(name, **overrides)
    measured = tracked_peak(config, latent, 2, text_len, dtype, reuse)
    estimated = activation_bytes(config, video_tokens(config, latent), text_len, 0, 2, dtype.itemsize, reuse)
    assert estimated["bytes"] == pytest.approx(measured, rel=0.05)


def test_release_memory_is_decoder_bound_and_halves_without_batched_guidance():
    config = preset("motif-video-2b")
    batched = estimate(config, **RELEASE)["memory"]["bf16"]["activations"]
    single = estimate(config, **RELEASE, guidance=False)["memory"]["bf16"]["activations"]
    assert batched["stage"] == "decoder"
    assert batched["bytes"] == pytest.approx(2 * single["bytes"], rel=0.01)


def test_time_is_flops_over_effective_throughput():
    config = preset("motif-video-2b")
    one = estimate(config, **RELEASE, throughput_tflops=1000, mfu=0.5)
    two = estimate(config, **RELEASE, throughput_tflops=1000, mfu=0.5, encoder_reuse=2)
    assert one["time"]["seconds_per_step"] == pytest.approx(one["flops"]["per_step"] / 5e14)
    assert one["time"]["seconds_per_video"] == pytest.approx(50 * one["time"]["seconds_per_step"])
    f = two["flops"]  # K=2 over 50 steps: the encoder runs 25 times
    assert f["encoder_runs"] == 25
    assert f["per_video"] == 50 * f["reuse_step"] + 25 * (f["dual"] + f["encoder"])


# -- command line ---------------------------------------------------------------------------------------------------
def test_cli_json_at_release_size(capsys):
    assert main(["estimate", "--json", "--dtype", "bf16", "gguf-q4_0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["video"]["video_tokens"] == 114_080
    assert set(result["memory"]) == {"bf16", "gguf-q4_0"}
    assert result["model"]["name"] == "motif-video-2b"


def test_cli_table_and_model_folder(capsys, tmp_path):
    config = preset("motif-video-small")
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config.to_diffusers_json()))
    assert main(["estimate", "--model", str(tmp_path), "--height", "128", "--width", "128", "--frames", "17",
                 "--no-guidance", "--encoder-reuse", "2"]) == 0
    out = capsys.readouterr().out
    params = sum(math.prod(s) for s in parameter_shapes(config).values())
    assert f"{params:,} parameters" in out
    assert "320 video" in out and "batch 1" in out and "K=2" in out


@pytest.mark.parametrize("argv, words", [
    (["--frames", "120"], "4k+1"),
    (["--height", "730"], "multiple of 16"),
    (["--width", "0"], "multiple of 16"),
    (["--dtype", "int8"], "unknown dtype"),
    (["--mfu", "1.5"], "MFU"),
    (["--encoder-reuse", "0"], "encoder reuse"),
    (["--steps", "0"], "steps"),
    (["--model", "no-such-model-folder"], "not found"),
    (["--model", "motif-video-nano", "--image-tokens", "4"], "image"),
])
def test_cli_errors_exit_2_with_one_line(capsys, argv, words):
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err


def test_estimate_rejects_bad_sizes_directly():
    with pytest.raises(MotifVideoError, match="4k\\+1"):
        estimate(preset("motif-video-2b"), 736, 1280, 122)
