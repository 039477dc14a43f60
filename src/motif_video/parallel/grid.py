"""The process grid of context parallelism: which processes share one clip, and how they split it.

World = data x cfg x ring x ulysses, ulysses fastest: global rank = ((d * C + c) * R + r) * U + u. The U x R
processes of one (d, c) form the clip's sequence group; sequence chunk s = r * U + u, so each Ulysses group holds
neighbouring chunks and the ring passes blocks of U chunks. With CFG-parallel (C = 2) the conditional pass runs on
c = 0 and the unconditional one on c = 1. Every grid is checked before any group is made, so a bad grid fails on
every rank alike instead of hanging in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ..errors import MotifVideoError


@dataclass(frozen=True)
class GridShape:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1  # 2: the two guidance branches on two process groups
    data: int = 1

    @property
    def sequence(self) -> int:
        return self.ulysses * self.ring

    @property
    def size(self) -> int:
        return self.data * self.cfg * self.sequence


def check_grid(shape: GridShape, world: int, heads: int) -> None:
    """One-line errors for a grid that cannot run: every rank raises the same one."""
    for name in ("ulysses", "ring", "cfg", "data"):
        if getattr(shape, name) < 1:
            raise MotifVideoError(f"{name} degree must be at least 1, got {getattr(shape, name)}")
    if shape.cfg not in (1, 2):
        raise MotifVideoError(f"cfg-parallel splits two guidance branches: degree 1 or 2, got {shape.cfg}")
    if heads % shape.ulysses:
        raise MotifVideoError(f"Ulysses degree {shape.ulysses} must divide the model's {heads} attention heads; "
                              "use a smaller --ulysses and more --ring")
    if shape.size != world:
        raise MotifVideoError(
            f"the grid (data {shape.data} x cfg {shape.cfg} x ring {shape.ring} x ulysses {shape.ulysses} = "
            f"{shape.size}) does not match the {world} processes")


def default_shape(world: int, heads: int, cfg: bool = False, data: int = 1) -> GridShape:
    """All processes on one clip: Ulysses up to the largest degree dividing both the heads and the processes, the
    rest ring (12 heads on 8 GPUs: Ulysses 4 x ring 2)."""
    branches = 2 if cfg else 1
    if world % (branches * data):
        raise MotifVideoError(f"{world} processes cannot be split into {branches * data} equal groups")
    sequence = world // (branches * data)
    ulysses = max(u for u in range(1, sequence + 1) if sequence % u == 0 and heads % u == 0)
    return GridShape(ulysses, sequence // ulysses, branches, data)


class ContextGrid:
    """This process's place in the grid and its process groups (None where a dimension has degree 1)."""

    def __init__(self, shape: GridShape, heads: int):
        world = dist.get_world_size() if dist.is_initialized() else 1
        check_grid(shape, world, heads)
        self.shape = shape
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        u, rest = self.rank % shape.ulysses, self.rank // shape.ulysses
        r, rest = rest % shape.ring, rest // shape.ring
        c, d = rest % shape.cfg, rest // shape.cfg
        self.ulysses_rank, self.ring_rank, self.cfg_rank, self.data_rank = u, r, c, d
        self.sequence_rank = r * shape.ulysses + u
        self.ulysses_group = self.ring_group = self.sequence_group = self.cfg_group = None
        self.ring_ranks: list[int] = []
        if world == 1:
            return
        # new_group is collective over the world: every rank creates every group, in the same order
        U, R, C, D = shape.ulysses, shape.ring, shape.cfg, shape.data

        def rank_of(d, c, r, u):
            return ((d * C + c) * R + r) * U + u

        for d_ in range(D):
            for c_ in range(C):
                for r_ in range(R):
                    group = dist.new_group([rank_of(d_, c_, r_, x) for x in range(U)])
                    if (d_, c_, r_) == (d, c, r):
                        self.ulysses_group = group
                for u_ in range(U):
                    ranks = [rank_of(d_, c_, x, u_) for x in range(R)]
                    group = dist.new_group(ranks)
                    if (d_, c_, u_) == (d, c, u):
                        self.ring_group, self.ring_ranks = group, ranks
                group = dist.new_group([rank_of(d_, c_, r_, u_) for r_ in range(R) for u_ in range(U)])
                if (d_, c_) == (d, c):
                    self.sequence_group = group
        for d_ in range(D):
            for r_ in range(R):
                for u_ in range(U):
                    group = dist.new_group([rank_of(d_, c_, r_, u_) for c_ in range(C)])
                    if (d_, r_, u_) == (d, r, u):
                        self.cfg_group = group

    def __repr__(self) -> str:
        s = self.shape
        return f"ContextGrid(ulysses={s.ulysses}, ring={s.ring}, cfg={s.cfg}, data={s.data}, rank={self.rank})"
