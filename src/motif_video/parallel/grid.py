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


def check_grid(shape: GridShape, world: int, heads: int | None) -> None:
    """One-line errors for a grid that cannot run: every rank raises the same one (heads None: not checked)."""
    for name in ("ulysses", "ring", "cfg", "data"):
        if getattr(shape, name) < 1:
            raise MotifVideoError(f"{name} degree must be at least 1, got {getattr(shape, name)}")
    if shape.cfg not in (1, 2):
        raise MotifVideoError(f"cfg-parallel splits two guidance branches: degree 1 or 2, got {shape.cfg}")
    if heads is not None and heads % shape.ulysses:
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


MESH_DIMS = ("data", "cfg", "sequence")  # slowest to fastest; sequence = ring x ulysses


class ContextGrid:
    """This process's place in the grid and its process groups (all None in a single process).

    One device mesh over (data, cfg, sequence) is the source of every group and every coordinate: the cfg and
    sequence groups are its dimensions, the ring and Ulysses groups its sequence dimension unflattened into
    (ring, ulysses), and training shards its weights over its (data, sequence) view (`train.parallel.fsdp_mesh`),
    so the groups that exchange tokens and the groups that reduce gradients cannot disagree about who holds which
    samples. `heads` None skips the Ulysses-divides-heads check (`apply_context_parallel` makes it)."""

    def __init__(self, shape: GridShape, heads: int | None = None, device_type: str | None = None):
        world = dist.get_world_size() if dist.is_initialized() else 1
        check_grid(shape, world, heads)
        self.shape = shape
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.ulysses_rank = self.ring_rank = self.cfg_rank = self.data_rank = self.sequence_rank = 0
        self.ulysses_group = self.ring_group = self.sequence_group = self.cfg_group = None
        self.ring_ranks: list[int] = []
        self.mesh = None
        if world == 1:
            return
        from torch.distributed.device_mesh import init_device_mesh

        if device_type is None:
            device_type = "cuda" if dist.get_backend() == dist.Backend.NCCL else "cpu"
        # every rank creates every group, in the same order (new_group is collective over the world)
        self.mesh = init_device_mesh(device_type, (shape.data, shape.cfg, shape.sequence), mesh_dim_names=MESH_DIMS)
        split = self.mesh._unflatten("sequence", (shape.ring, shape.ulysses), ("ring", "ulysses"))  # r * U + u
        self.data_rank, self.cfg_rank, self.sequence_rank = (self.mesh.get_local_rank(n) for n in MESH_DIMS)
        self.ring_rank, self.ulysses_rank = (split.get_local_rank(n) for n in ("ring", "ulysses"))
        self.cfg_group, self.sequence_group = (self.mesh.get_group(n) for n in ("cfg", "sequence"))
        self.ring_group, self.ulysses_group = (split.get_group(n) for n in ("ring", "ulysses"))
        self.ring_ranks = dist.get_process_group_ranks(self.ring_group)

    def __repr__(self) -> str:
        s = self.shape
        return f"ContextGrid(ulysses={s.ulysses}, ring={s.ring}, cfg={s.cfg}, data={s.data}, rank={self.rank})"
