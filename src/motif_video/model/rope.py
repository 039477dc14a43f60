"""3-axis rotary position embedding for video tokens (never applied to text).

Each head's channels are split (t, h, w) = rope_axes_dim; every axis rotates channel pairs (2i, 2i+1) by
position * theta^(-2i/dim). Frequencies are computed in float64 and stored as float32, as the release does.
"""

from __future__ import annotations

import torch


def rope_frequencies(
    grid: tuple[int, int, int], axes_dim: tuple[int, int, int], theta: float, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T*H*W, head_dim) for a (T, H, W) token grid, in t-major token order."""
    positions = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid], indexing="ij")
    cos_parts, sin_parts = [], []
    for pos, dim in zip(positions, axes_dim):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (dim/2,)
        angles = torch.outer(pos.reshape(-1), inv_freq)  # (N, dim/2)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    cos = torch.cat(cos_parts, dim=1).float().to(device)
    sin = torch.cat(sin_parts, dim=1).float().to(device)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, N, head_dim) by cos/sin of shape (N, head_dim) or per-sample (B, N, head_dim).

    Per-sample frequencies arise when TREAD keeps a different token subset in each sample.
    """
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, N, head_dim)
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # pairs (2i, 2i+1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)
