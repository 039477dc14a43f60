"""CFG-parallel: the conditional and the unconditional pass of each sampling step on two process groups.

Processes with cfg rank 0 run the conditional branch, those with cfg rank 1 the unconditional one (each on its own
sequence group, so this composes with Ulysses and ring); one all-gather over the cfg group then gives every process
both velocities, and the pipeline's guider (CFG or APG, whose momentum state thus stays identical on every process)
combines them as in one process.
"""

from __future__ import annotations

from typing import Callable

import torch

from .collectives import all_gather
from .grid import ContextGrid


class ParallelGuidanceBranches:
    def __init__(self, grid: ContextGrid):
        self.grid = grid

    def run(self, branch: Callable[[int], torch.Tensor], count: int) -> list[torch.Tensor]:
        if count != self.grid.shape.cfg:  # no guidance (one branch): every process runs it
            return [branch(index) for index in range(count)]
        return all_gather(branch(self.grid.cfg_rank), self.grid.cfg_group)
