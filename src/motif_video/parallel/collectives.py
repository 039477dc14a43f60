"""Autograd-aware collectives over a process group (gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)  # (P, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # every rank's copy of the gathered tensor fed its own computation: the chunk's gradient is their sum
        grad = grad.contiguous()
        rank = dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty_like(grad[rank])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter
        return grad[rank], None


def all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    """x from every rank of `group`, in rank order."""
    return list(_AllGather.apply(x, group).unbind(0))
