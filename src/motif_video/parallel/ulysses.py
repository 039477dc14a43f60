"""Ulysses (DeepSpeed-Ulysses): trade the sequence split for a head split with one all-to-all, attend over the
whole sequence with H / U heads, and trade back. Autograd-aware, so training runs through it."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from .collectives import all_gather


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)  # of a contiguous x: empty_like keeps a permuted tensor's strides, which gloo ignores
    return dist_fn.all_to_all_single(out, x, group=group)


def sequence_to_heads(x: torch.Tensor, degree: int, group) -> torch.Tensor:
    """(B, H, n, hd) local tokens, all heads -> (B, H / U, U * n, hd): the group's tokens (in rank order), this rank's
    heads."""
    b, h, n, hd = x.shape
    x = x.reshape(b, degree, h // degree, n, hd).transpose(0, 1)  # (U, B, H/U, n, hd): piece j goes to rank j
    x = _all_to_all(x, group)  # (U, B, H/U, n, hd): piece j came from rank j
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // degree, degree * n, hd)


def heads_to_sequence(x: torch.Tensor, degree: int, group) -> torch.Tensor:
    """The inverse: (B, H / U, U * n, hd) -> (B, H, n, hd)."""
    b, hl, m, hd = x.shape
    x = x.reshape(b, hl, degree, m // degree, hd).permute(2, 0, 1, 3, 4)  # (U, B, H/U, n, hd)
    x = _all_to_all(x, group)  # (U, B, H/U, n, hd): piece j holds head group j
    return x.transpose(0, 1).reshape(b, degree * hl, m // degree, hd)


def head_slice(x: torch.Tensor, degree: int, index: int) -> torch.Tensor:
    """This rank's heads of a replicated tensor (B, H, n, hd): no communication needed."""
    h = x.shape[1] // degree
    return x[:, index * h:(index + 1) * h]


def gather_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H / U, n, hd) per rank -> (B, H, n, hd) on every rank."""
    return torch.cat(all_gather(x.contiguous(), group), dim=1)


def gather_mask(mask: torch.Tensor, group) -> list[torch.Tensor]:
    """A bool key mask (..., n) from every rank of `group`, in rank order (no gradient)."""
    size = dist.get_world_size(group)
    values = mask.to(torch.uint8).contiguous()
    parts = [torch.empty_like(values) for _ in range(size)]
    dist.all_gather(parts, values, group=group)
    return [p.bool() for p in parts]
