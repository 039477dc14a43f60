"""Training-free step caches: exact at their exact setting, skipping (and close) above it, composing with encoder
reuse and guidance, MagCache's calibration against residuals read independently by module hooks."""

import json

import pytest
import torch

from motif_video import MotifVideoPipeline
from motif_video.cli import main as cli_main
from motif_video.errors import MotifVideoError
from motif_video.model.step_cache import (FirstBlockCache, MagCache, MagnitudeRecorder, TaylorSeer, parse_cache,
                                          resample_ratios)
from motif_video.pipeline.step_calibration import calibrate_magnitudes, save_magnitudes
from motif_video.testing import save_tiny_pipeline

SIZE = dict(height=32, width=32, num_frames=9)
STEPS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", shift=3.0, guidance_scale=3.0)


@pytest.fixture(scope="module")
def pipe(model_dir):
    torch.manual_seed(0)
    return MotifVideoPipeline.from_pretrained(model_dir, device="cpu")


def noise():
    return torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(3))


def run(pipe, **kwargs):
    common = dict(num_inference_steps=STEPS, latents=noise(), progress=False, output_type="latent",
                  guider="cfg", batch_guidance=False, encoder_reuse=1, **SIZE)
    return pipe("a red square moving left", **{**common, **kwargs})


def ratios_of(pipe):
    recorder = MagnitudeRecorder()
    run(pipe, cache=recorder)
    return recorder.ratios()


@pytest.mark.parametrize("reuse", [1, 2])
def test_exact_settings_equal_uncached(pipe, reuse):
    reference = run(pipe, encoder_reuse=reuse)
    for cache in (FirstBlockCache(threshold=0.0), MagCache(threshold=0.0, ratios=[1.0] * STEPS),
                  TaylorSeer(interval=1, order=2, warmup=0)):
        out = run(pipe, cache=cache, encoder_reuse=reuse)
        assert torch.equal(out, reference), cache
        assert cache.skipped == 0 and cache.computed == 2 * STEPS  # two guidance branches per step


def test_positive_settings_skip_and_stay_close(pipe):
    reference = run(pipe)
    decoder_calls = []
    hook = pipe.transformer.decoder_blocks[-1].register_forward_hook(lambda *a: decoder_calls.append(1))
    try:
        for cache in (FirstBlockCache(threshold=0.3), MagCache(threshold=0.5, ratios=ratios_of(pipe)),
                      TaylorSeer(interval=2, order=1, warmup=2)):
            decoder_calls.clear()
            out = run(pipe, cache=cache)
            assert cache.skipped > 0, cache
            assert len(decoder_calls) == cache.computed == 2 * STEPS - cache.skipped
            assert 0 < (out - reference).norm() / reference.norm() < 0.1, cache
    finally:
        hook.remove()


def test_taylorseer_schedule_and_each_branch_keeps_its_own_state(pipe):
    cache = TaylorSeer(interval=3, order=1, warmup=2)
    run(pipe, cache=cache)
    # steps 0, 1 (warm-up), 2, 5 run; 3, 4, 6, 7 are predicted: in both guidance branches
    assert [s.computed for s in cache.states] == [4, 4] and cache.skipped == 8
    unguided = TaylorSeer(interval=3, order=1, warmup=2)
    run(pipe, cache=unguided, guidance_scale=1.0)
    assert len(unguided.states) == 1 and unguided.computed == 4


def test_taylor_series_of_order_one_is_exact_on_a_linear_trajectory():
    state = TaylorSeer(interval=4, order=1, warmup=2).new_state(8, None)
    a, b = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    x = torch.zeros(2, 5, 3)
    for step in range(8):
        out = state.lookup(x, None)
        if out is None:
            state.store(x, None, a + step * b)
        else:
            torch.testing.assert_close(out, a + step * b, rtol=1e-5, atol=1e-5)
    assert state.skipped == 4  # steps 3, 4, 5 and 7, after runs at 0, 1, 2 and 6


def test_skipped_encoder_refresh_moves_to_the_next_run(pipe):
    encoder_runs = []
    hook = pipe.transformer.encoder_blocks[-1].register_forward_hook(lambda *a: encoder_runs.append(1))
    try:
        cache = TaylorSeer(interval=2, order=1, warmup=1)  # runs steps 0, 1, 3, 5, 7 per branch
        run(pipe, cache=cache, encoder_refresh=[0, 2, 4])  # 2 and 4 are skipped: the encoder runs at 3 and 5
    finally:
        hook.remove()
    assert len(encoder_runs) == 2 * 3


def test_magcache_calibration_matches_hooked_residuals(pipe, model_dir, tmp_path):
    embedded, head_inputs = [], []
    hooks = [pipe.transformer.x_embedder.register_forward_hook(lambda m, i, o: embedded.append(o)),
             pipe.transformer.norm_out.register_forward_pre_hook(lambda m, a: head_inputs.append(a[0]))]
    try:
        ratios = calibrate_magnitudes(pipe, ["a red square moving left"], num_inference_steps=STEPS,
                                      latents=noise(), guider="cfg", **SIZE)
    finally:
        for h in hooks:
            h.remove()
    norms = torch.stack([(o - e).flatten(1).norm(dim=1) for e, o in zip(embedded, head_inputs)])  # (2 * steps, B)
    norms = norms.view(STEPS, 2).double()  # calls alternate cond, uncond
    expected = [1.0] + (norms[1:] / norms[:-1]).mean(1).tolist()
    assert ratios == pytest.approx(expected, rel=1e-5)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "motif_video.json").write_text(json.dumps({"generation": {"fps": 8}}))
    save_magnitudes(folder, ratios)
    saved = json.loads((folder / "motif_video.json").read_text())["generation"]
    assert saved["fps"] == 8 and saved["magcache_ratios"] == pytest.approx(ratios, abs=1e-6)


def test_magcache_takes_the_model_folder_ratios(pipe):
    with pytest.raises(MotifVideoError, match="calibrate-cache"):
        run(pipe, cache=MagCache(threshold=0.1))
    pipe.defaults.magcache_ratios = [1.0] * 4  # resampled to the step count
    try:
        cache = MagCache(threshold=0.0)
        run(pipe, cache=cache)
        assert cache.computed == 2 * STEPS
    finally:
        pipe.defaults.magcache_ratios = None
    assert resample_ratios([1.0, 3.0], 5).tolist() == [1.0, 1.5, 2.0, 2.5, 3.0]


def test_parse_cache_and_cli_errors(model_dir, tmp_path, capsys):
    assert parse_cache("fbcache:0.05") == FirstBlockCache(threshold=0.05)
    assert parse_cache("magcache:0.1:2") == MagCache(threshold=0.1, max_skip=2)
    assert parse_cache("taylorseer:3:2:4") == TaylorSeer(interval=3, order=2, warmup=4)
    for bad in ("fbcache", "fbcache:x", "teacache:0.1", "taylorseer:0", "fbcache:-1", "magcache:0.1:2:0.2:9"):
        with pytest.raises(MotifVideoError):
            parse_cache(bad)
    assert cli_main(["generate", "a cat", "-o", str(tmp_path / "a.mp4"), "--model", str(model_dir),
                     "--cache", "nocache:1"]) == 2
    assert "error:" in capsys.readouterr().err
    out = tmp_path / "b.gif"
    assert cli_main(["generate", "a cat", "-o", str(out), "--model", str(model_dir), "--cache", "taylorseer:2:1:1",
                     "--steps", "4", "--height", "32", "--width", "32", "--frames", "9", "--quiet"]) == 0
    assert out.is_file() and "2 of 8 transformer calls skipped" in capsys.readouterr().out


def test_flop_meter_counts_what_a_cached_step_runs():
    from motif_video.flops import FlopMeter, dual_block_flops, forward_flops, video_tokens
    from motif_video.model.config import preset
    from motif_video.model.transformer import MotifVideoTransformer

    config = preset("motif-video-tiny")
    model = MotifVideoTransformer(config).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, 2, 4, 4, generator=gen)
    text = torch.randn(2, 6, config.text_embed_dim, generator=gen)
    t = torch.full((2,), 500.0)
    tokens = video_tokens(config, (2, 4, 4))
    fwd = forward_flops(config, tokens, 6, 0, batch=2)
    first_block = 2 * dual_block_flops(config, tokens, 6, 6).total
    for cache, runs, skipped_step in ((FirstBlockCache(threshold=1e9), 1, fwd.embed + first_block + fwd.head),
                                      (TaylorSeer(interval=2, order=1, warmup=1), 2, fwd.embed + fwd.head)):
        (state,) = cache.begin(3, 1)
        meter = FlopMeter(model)
        with torch.no_grad():
            model(x, t, text, step_cache=state)
            full = meter.flops
            model(x, t, text, step_cache=state)
            model(x, t, text, step_cache=state)
        meter.detach()
        assert full == fwd.total  # a step that runs everything runs the probed first block once
        assert state.computed == runs and state.skipped == 3 - runs
        assert meter.flops == runs * fwd.total + (3 - runs) * skipped_step
