import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from motif_video.errors import MotifVideoError
from motif_video.nano.codec import (
    CODEC_CONFIG,
    build_codec,
    cell_colours,
    colour_alignment_loss,
    load_items,
    object_mask,
    per_frame_init_,
    reconstruction_metrics,
    to_pixels,
    train_codec,
)
from motif_video.nano.data import BACKGROUND, make_clip, make_image, write_dataset
from motif_video.pipeline.vae import LatentCodec

# 32x32 frames and 9-frame clips keep every training step well under a second on one CPU core.
SIZE, FRAMES = 32, 9


def _samples(clips=4, images=4, seed=0):
    return ([make_clip(i, seed, frames=FRAMES, size=SIZE) for i in range(clips)]
            + [make_image(i, seed, size=SIZE) for i in range(images)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("codec")
    samples = _samples()
    summary = train_codec(samples, out, steps=12, batch_size=2, image_batch_size=2, window=5, seed=0, lr=3e-3,
                          progress=False)
    return out, samples, summary


def test_loss_decreases(trained):
    _, _, summary = trained
    losses = summary["losses"]
    assert summary["steps"] == 12 and len(losses) == 12
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_saved_folder_loads_with_diffusers_and_matches_the_config(trained):
    out, _, summary = trained
    vae = AutoencoderKLWan.from_pretrained(out, torch_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in vae.parameters())
    for key, value in CODEC_CONFIG.items():
        assert list(vae.config[key]) == list(value) if isinstance(value, list) else vae.config[key] == value
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == 16
    assert vae.config.latents_mean == summary["latents_mean"]
    assert min(vae.config.latents_std) > 0
    # Shipped as fp16: the file holds half the bytes of the fp32 weights.
    size = (out / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size < 2.2 * sum(p.numel() for p in vae.parameters())


def test_latent_codec_round_trip_shapes(trained):
    out, _, _ = trained
    codec = LatentCodec(AutoencoderKLWan.from_pretrained(out, torch_dtype=torch.float32).eval())
    for frames in (1, 17):
        pixels = torch.rand(2, 3, frames, SIZE, SIZE) * 2 - 1
        latents = codec.encode(pixels)
        assert latents.shape == (2, 16, (frames - 1) // 4 + 1, SIZE // 8, SIZE // 8)
        assert latents.shape[2:] == codec.latent_shape(frames, SIZE, SIZE)
        assert codec.decode(latents).shape == pixels.shape


def test_normalised_latents_are_standardised_on_the_training_sample(trained):
    out, samples, _ = trained
    codec = LatentCodec(AutoencoderKLWan.from_pretrained(out, torch_dtype=torch.float32).eval())
    clips = codec.encode(to_pixels([s.frames for s in samples if s.frames.shape[0] > 1]))
    images = codec.encode(to_pixels([s.frames for s in samples if s.frames.shape[0] == 1]))
    # Every latent position of every sample, per channel, computed independently in numpy (float64).
    flat = np.concatenate([t.transpose(0, 1).flatten(1).double().numpy() for t in (clips, images)], axis=1)
    np.testing.assert_allclose(flat.mean(1), 0.0, atol=2e-3)
    np.testing.assert_allclose(flat.std(1), 1.0, rtol=2e-3)


def test_deterministic_given_the_seed(tmp_path):
    samples = _samples(clips=2, images=2)
    kwargs = dict(steps=2, batch_size=1, image_batch_size=1, window=5, lr=1e-3, progress=False)
    a = train_codec(samples, tmp_path / "a", seed=3, **kwargs)
    b = train_codec(samples, tmp_path / "b", seed=3, **kwargs)
    c = train_codec(samples, tmp_path / "c", seed=4, **kwargs)
    assert a["losses"] == b["losses"] and a["latents_mean"] == b["latents_mean"]
    assert a["losses"] != c["losses"]
    wa = AutoencoderKLWan.from_pretrained(tmp_path / "a").state_dict()
    wb = AutoencoderKLWan.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_build_codec_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = build_codec(0), build_codec(0)
    assert torch.equal(torch.rand(1), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_per_frame_init_makes_a_clip_codec_of_the_still_codec():
    """Inflated, the clip latent is the latents of frames 0, 4, 8 encoded alone, and each decoded latent frame
    repeats the still that latent decodes to."""
    vae = build_codec(0).eval()
    per_frame_init_(vae)
    x = to_pixels([make_clip(i, 0, frames=FRAMES, size=SIZE).frames for i in range(2)])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        stills = torch.cat([vae.encode(x[:, :, f:f + 1]).latent_dist.mode() for f in (0, 4, 8)], dim=2)
        torch.testing.assert_close(z, stills, atol=1e-5, rtol=1e-5)
        video = vae.decode(z).sample
        for k in range(3):
            still = vae.decode(stills[:, :, k:k + 1]).sample  # (B, 3, 1, H, W)
            frames = range(1) if k == 0 else range(4 * k - 3, 4 * k + 1)
            for f in frames:
                torch.testing.assert_close(video[:, :, f:f + 1], still, atol=1e-5, rtol=1e-5)


def test_reconstruction_metrics_match_numpy(trained):
    out, samples, _ = trained
    vae = AutoencoderKLWan.from_pretrained(out, torch_dtype=torch.float32).eval()
    clips = [s for s in samples if s.frames.shape[0] > 1][:2]
    metrics = reconstruction_metrics(vae, load_items(clips))
    psnrs, obj = [], []
    for s in clips:
        x = to_pixels([s.frames])
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        recon = np.round((y[0].permute(1, 2, 3, 0).numpy() + 1) * 127.5).clip(0, 255)
        err = (recon - s.frames.astype(np.float64)) ** 2
        psnrs.append(10 * math.log10(255**2 / err.mean()))
        mask = np.abs(s.frames.astype(int) - np.array(BACKGROUND)).max(-1) > 24
        obj.append(10 * math.log10(255**2 / err[mask].mean()))
    assert metrics["clips"] == 2
    assert metrics["psnr"] == pytest.approx(np.mean(psnrs), abs=1e-3)
    assert metrics["object_psnr"] == pytest.approx(np.mean(obj), abs=1e-3)


def test_object_mask_marks_the_shape():
    sample = make_clip(5, 0, frames=5, size=SIZE)
    mask = object_mask(to_pixels([sample.frames]))[0, 0].numpy()  # (T, H, W)
    reference = np.abs(sample.frames.astype(int) - np.array(BACKGROUND)).max(-1) > 0.1 * 127.5
    np.testing.assert_array_equal(mask.astype(bool), reference)


def test_cell_colours_average_each_latent_cell_of_pixels():
    pixels = torch.rand(2, 3, 9, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cells = cell_colours(pixels).numpy()
    assert cells.shape == (2, 3, 3, 2, 3)
    x = pixels.numpy()
    groups = [x[:, :, :1], x[:, :, 1:5], x[:, :, 5:9]]  # frame 0 alone, then chunks of 4 (the causal encoder's)
    for t, frames in enumerate(groups):
        for i in range(2):
            for j in range(3):
                expected = frames[:, :, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8].mean(axis=(2, 3, 4))
                np.testing.assert_allclose(cells[:, :, t, i, j], expected, atol=1e-6)


def test_colour_alignment_is_zero_on_the_cell_colours_and_counts_only_three_channels():
    pixels = to_pixels([make_clip(3, 0, frames=FRAMES, size=SIZE).frames])
    latent = torch.randn(1, 16, 3, SIZE // 8, SIZE // 8)
    latent[:, :3] = cell_colours(pixels)
    assert colour_alignment_loss(latent, pixels, object_weight=9.0).item() == 0.0
    latent[:, :3] += 0.5
    assert colour_alignment_loss(latent, pixels).item() == pytest.approx(0.25)


def test_colour_weight_ties_three_latent_channels_to_the_pixel_colour(tmp_path):
    samples = _samples()
    errors = {}
    for weight in (0.0, 1.0):
        train_codec(samples, tmp_path / str(weight), steps=12, batch_size=2, image_batch_size=2, window=5, seed=0,
                    lr=3e-3, progress=False, colour_weight=weight)
        vae = AutoencoderKLWan.from_pretrained(tmp_path / str(weight)).float().eval()
        pixels = to_pixels([s.frames[:5] for s in samples[:4]])
        with torch.no_grad():
            errors[weight] = colour_alignment_loss(vae.encode(pixels).latent_dist.mean, pixels).item()
    assert errors[1.0] < 0.25 * errors[0.0]


def test_trains_from_a_nano_data_folder_with_heldout_metrics(tmp_path):
    write_dataset(tmp_path / "data", clips=3, images=2, frames=FRAMES, size=SIZE, seed=0)
    items = load_items(tmp_path / "data")
    assert [it.is_image for it in items] == [False] * 3 + [True] * 2
    np.testing.assert_array_equal(items[3].load(), make_image(0, 0, size=SIZE).frames)  # PNG is lossless
    assert items[0].load().shape == (FRAMES, SIZE, SIZE, 3)
    summary = train_codec(tmp_path / "data", tmp_path / "vae", steps=1, batch_size=1, window=5, heldout_clips=1,
                          progress=False)
    assert summary["heldout"]["clips"] == 1 and math.isfinite(summary["heldout"]["psnr"])
    assert (tmp_path / "vae" / "config.json").is_file()


def test_bad_input(tmp_path):
    samples = _samples(clips=1, images=1)
    with pytest.raises(MotifVideoError, match="4k\\+1"):
        train_codec(samples, tmp_path / "x", steps=1, window=4, progress=False)
    with pytest.raises(MotifVideoError, match="fewer than"):
        train_codec(samples, tmp_path / "x", steps=1, window=13, progress=False)
    with pytest.raises(MotifVideoError, match="metadata.jsonl"):
        train_codec(tmp_path, tmp_path / "x", steps=1, progress=False)
    with pytest.raises(MotifVideoError, match="hold out"):
        train_codec(samples, tmp_path / "x", steps=1, window=5, heldout_clips=1, progress=False)
    with pytest.raises(MotifVideoError, match="Samples"):
        load_items([np.zeros((1, 8, 8, 3), np.uint8)])
