"""Context parallelism: one clip's video tokens spread over processes (Ulysses x ring), the guidance branches over
two process groups (CFG-parallel), applied to a model from outside (see docs/parallel.md).

    grid = ContextGrid(GridShape(ulysses=2, ring=2), heads)   # after torch.distributed.init_process_group
    apply_context_parallel(transformer, grid)                  # sharding hook + attention backend

- grid.py: the process grid and its groups; sharding.py: the `SequenceSharding` hook (chunks + padding);
  ulysses.py: the all-to-alls; ring.py: ring attention (K/V blocks passed point to point, exact log-sum-exp
  merge); attention.py: the backend that uses both;
  guidance.py: CFG-parallel branches for the pipeline; launch.py: process-group setup for the CLI.
"""

from __future__ import annotations

import torch.nn as nn

from ..model.backends import DEFAULT_BACKEND, attention_backends, set_attention_backend
from ..model.sharding import set_sequence_sharding
from .attention import ContextParallelAttention
from .grid import ContextGrid, GridShape, check_grid, default_shape
from .sharding import ContextSharding


def apply_context_parallel(model: nn.Module, grid: ContextGrid) -> nn.Module:
    """Shard `model`'s (a MotifVideoTransformer) video sequence over `grid`'s sequence group: installs the sharding
    hook and wraps the model's current attention kernel. A no-op for a sequence group of one process."""
    if grid.shape.sequence == 1:
        return model
    check_grid(grid.shape, grid.shape.size, model.config.num_attention_heads)
    # the kernel the model uses now (the first attention module's: a per-block choice is not kept)
    backends = attention_backends(model)
    inner = backends[0] if backends else DEFAULT_BACKEND
    if isinstance(inner, ContextParallelAttention):
        inner = inner.inner
    set_attention_backend(model, ContextParallelAttention(grid, inner))
    set_sequence_sharding(model, ContextSharding(grid))
    return model


__all__ = ["ContextGrid", "ContextParallelAttention", "ContextSharding", "GridShape", "apply_context_parallel",
           "check_grid", "default_shape"]
