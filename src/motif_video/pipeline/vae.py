"""The latent codec: diffusers' AutoencoderKLWan (4x temporal, 8x spatial, z=16) with the model's normalisation."""

from __future__ import annotations

import torch

from ..latents import VAE_SPATIAL, VAE_TEMPORAL, latent_shape


class LatentCodec:
    """Pixels in [-1, 1] (B, 3, T, H, W) <-> normalised latents (B, 16, (T-1)/4+1, H/8, W/8).

    The transformer was trained on (z - mean) / std with the VAE config's per-channel `latents_mean/std`.
    """

    def __init__(self, vae):
        self.vae = vae
        cfg = vae.config
        self.temporal_factor = int(getattr(cfg, "scale_factor_temporal", VAE_TEMPORAL))
        self.spatial_factor = int(getattr(cfg, "scale_factor_spatial", VAE_SPATIAL))
        self.latent_channels = int(cfg.z_dim)
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        return latent_shape(num_frames, height, width, self.temporal_factor, self.spatial_factor)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Posterior mode (deterministic), normalised."""
        z = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mode()
        return (z.float() - self._mean.to(z.device)) / self._std.to(z.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() * self._std.to(latents.device) + self._mean.to(latents.device)
        return self.vae.decode(z.to(self.device, self.dtype), return_dict=False)[0].float()

    def enable_tiling(self) -> None:
        self.vae.enable_tiling()
