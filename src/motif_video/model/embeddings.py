"""Input embedders: video patches, the timestep, text tokens and (I2V) image tokens."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class PatchEmbed(nn.Module):
    """Conv3d patchify: (B, C, T, H, W) -> (B, T' * H' * W', hidden), t-major token order."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, T', H', W') -> (B, N, D)


def sinusoidal_timestep_embedding(timestep: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] features of the (0..1000) timestep, float32, shape (B, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TwoLayerMLP(nn.Module):
    """linear_1 -> activation -> linear_2 (the layout of diffusers' TimestepEmbedding and PixArt text projection)."""

    def __init__(self, in_features: int, hidden_size: int, activation: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act = activation
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TimestepEmbedding(nn.Module):
    """The one global conditioning vector: sinusoidal(256) -> MLP -> hidden. No pooled text vector in Motif."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.timestep_embedder = TwoLayerMLP(frequency_dim, hidden_size, nn.SiLU())

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_timestep_embedding(timestep, self.frequency_dim)
        # the bias, not the weight: a quantised (GGUF) weight is stored as bytes
        return self.timestep_embedder(features.to(self.timestep_embedder.linear_1.bias.dtype))


class ImageProjection(nn.Module):
    """I2V: SigLIP patch tokens -> LN -> Linear -> GELU -> Linear -> LN, prepended to the text tokens."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(in_features)
        self.linear_1 = nn.Linear(in_features, in_features)
        self.act_fn = nn.GELU()
        self.linear_2 = nn.Linear(in_features, hidden_size)
        self.norm_out = nn.LayerNorm(hidden_size)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.linear_2(self.act_fn(self.linear_1(self.norm_in(image_embeds)))))


def text_projection(text_embed_dim: int, hidden_size: int) -> TwoLayerMLP:
    """Text encoder states -> hidden: Linear -> GELU(tanh) -> Linear."""
    return TwoLayerMLP(text_embed_dim, hidden_size, nn.GELU(approximate="tanh"))
