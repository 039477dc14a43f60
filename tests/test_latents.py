"""The latent space's facts: VAE compression, token grid, and the 33-channel model input."""

import pytest
import torch

from motif_video.errors import MotifVideoError
from motif_video.latents import check_video_size, latent_shape, model_input, pixel_shape, token_grid
from motif_video.model.config import preset


def test_release_size_gives_the_papers_latent_and_tokens():
    latent = latent_shape(121, 736, 1280)
    assert latent == (31, 92, 160)
    assert pixel_shape(*latent) == (121, 736, 1280)
    assert token_grid(latent, preset("motif-video-2b").patch) == (31, 46, 80)


@pytest.mark.parametrize("size", [(736, 1280, 120), (728, 1280, 121), (0, 16, 1)])
def test_sizes_the_vae_or_the_patch_grid_reject(size):
    with pytest.raises(MotifVideoError):
        check_video_size(*size)


def test_text_to_video_input_has_zero_condition_and_mask():
    latents = torch.randn(2, 16, 3, 4, 4)
    x = model_input(latents)
    assert x.shape == (2, 33, 3, 4, 4)
    assert torch.equal(x[:, :16], latents)
    assert not x[:, 16:].any()


def test_image_to_video_input_conditions_frame_zero_only():
    latents = torch.randn(2, 16, 3, 4, 4)
    first = torch.randn(1, 16, 1, 4, 4)  # one image for the whole batch
    x = model_input(latents, first)
    assert torch.equal(x[:, :16], latents)
    for b in range(2):
        assert torch.equal(x[b, 16:32, 0], first[0, :, 0])
        assert torch.equal(x[b, 32, 0], torch.ones(4, 4))
    assert not x[:, 16:, 1:].any()  # later frames: no condition, mask 0
