"""The latent space the transformer works in: the VAE's compression, the patch grid, and the 33-channel input.

The Wan2.1 VAE (SPEC section 1) is causal in time: it encodes the first frame alone and every following group of
four frames into one latent frame, so 4k+1 frames become k+1 latent frames; each 8x8 pixel square becomes one
16-channel latent. The patch embedding then turns each patch_size_t x patch_size x patch_size block of latents into
one token (1 x 2 x 2 in every released config), so height and width must be multiples of 8 * 2 = 16 pixels.
"""

from __future__ import annotations

import torch

from .errors import MotifVideoError
from .model.config import TransformerConfig

VAE_TEMPORAL = 4  # 4k+1 frames -> k+1 latent frames
VAE_SPATIAL = 8  # 8x8 pixels -> one latent
LATENT_CHANNELS = 16
# Latents per token along (T, H, W) in every released config (a model's own is `TransformerConfig.patch`).
PATCH = (TransformerConfig.patch_size_t, TransformerConfig.patch_size, TransformerConfig.patch_size)
PIXELS_PER_TOKEN = VAE_SPATIAL * PATCH[1]  # one token per 16x16 pixels


def check_video_size(height: int, width: int, num_frames: int, temporal: int = VAE_TEMPORAL,
                     spatial: int = PIXELS_PER_TOKEN) -> None:
    """One-line errors for a size the VAE (`temporal`k+1 frames) and the patch grid (`spatial` pixels) reject."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise MotifVideoError(f"frames must be {temporal}k+1 (e.g. 17, 33, 121), got {num_frames}")
    for name, value in (("height", height), ("width", width)):
        if value < spatial or value % spatial:
            raise MotifVideoError(f"{name} must be a positive multiple of {spatial}, got {value}")


def latent_shape(num_frames: int, height: int, width: int, temporal: int = VAE_TEMPORAL,
                 spatial: int = VAE_SPATIAL) -> tuple[int, int, int]:
    """Latent (T', H', W') of a num_frames x height x width video."""
    return (num_frames - 1) // temporal + 1, height // spatial, width // spatial


def pixel_shape(latent_frames: int, latent_height: int, latent_width: int, temporal: int = VAE_TEMPORAL,
                spatial: int = VAE_SPATIAL) -> tuple[int, int, int]:
    """(frames, height, width) of the video a (T', H', W') latent decodes to; the inverse of `latent_shape`."""
    return (latent_frames - 1) * temporal + 1, latent_height * spatial, latent_width * spatial


def token_grid(latent: tuple[int, int, int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token (t, h, w) of a (T', H', W') latent after a (pt, ph, pw) patch embedding (`TransformerConfig.patch`)."""
    return tuple(size // p for size, p in zip(latent, patch))


def model_input(latents: torch.Tensor, first_frame: torch.Tensor | None = None) -> torch.Tensor:
    """The transformer's input (B, 33, T', H', W') = [latents | condition latents | mask].

    Text-to-video: condition and mask are zero. Image-to-video: the first frame's clean latent `first_frame`
    ((B or 1, 16, 1, H', W')) fills the condition channels of latent frame 0 and the mask is 1 on frame 0, the
    other frames stay zero. Generation and training build the input here alike, so a model trained on it sees at
    sampling time exactly what it learned on.
    """
    condition = torch.zeros_like(latents)  # (B, 16, T', H', W')
    mask = torch.zeros_like(latents[:, :1])  # (B, 1, T', H', W')
    if first_frame is not None:
        condition[:, :, :1] = first_frame.to(latents.device, latents.dtype)
        mask[:, :, 0] = 1.0
    return torch.cat([latents, condition, mask], dim=1)
