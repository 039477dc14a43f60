"""The sequence sharding of context parallelism: each process of a clip's sequence group holds one contiguous chunk
of the video tokens, the last chunks padded with masked tokens where the count does not divide."""

from __future__ import annotations

import torch
from .collectives import all_gather
import torch.nn.functional as F

from ..model.layout import Rope
from ..model.sharding import SequenceSharding
from .grid import ContextGrid


def chunk_length(num_tokens: int, parts: int) -> int:
    return -(-num_tokens // parts)


class ContextSharding(SequenceSharding):
    def __init__(self, grid: ContextGrid):
        self.grid = grid
        self.parts = grid.shape.sequence
        self.index = grid.sequence_rank

    def _local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        n = x.shape[dim]
        length = chunk_length(n, self.parts)
        pad = length * self.parts - n
        if pad:  # padding rows repeat nothing real: zeros, masked as keys and dropped by gather
            pads = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [0, pad]
            x = F.pad(x, pads)
        return x.narrow(dim, self.index * length, length)

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._local(tokens, 1)

    def shard_rope(self, rope: Rope) -> Rope:
        return tuple(self._local(t, -2) for t in rope)

    def gather(self, tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
        # autograd-aware: the backward hands each chunk the sum of the gradients all ranks computed for it
        chunks = all_gather(tokens.contiguous(), self.grid.sequence_group)
        return torch.cat(chunks, dim=1)[:, :num_tokens]

    def keep_mask(self, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        length = chunk_length(num_tokens, self.parts)
        if length * self.parts == num_tokens:
            return None  # on every rank alike: the backends' collectives then match
        return torch.arange(self.index * length, (self.index + 1) * length, device=device) < num_tokens

    def __repr__(self) -> str:
        return f"ContextSharding(parts={self.parts}, index={self.index})"
