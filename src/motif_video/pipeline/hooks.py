"""Generation hooks: a per-step callback, a cheap preview frame, and cooperative interruption.

`MotifVideoPipeline.__call__(..., callback=fn, preview=True)` calls `fn(StepInfo)` after every denoising step. The
callback returns True (or `interrupt`, a `threading.Event`, is set) to stop: the pipeline then raises
`GenerationInterrupted` before the next step and decodes nothing. A CLI turns that into exit code 130; a server marks
the job cancelled. Callbacks run on the generating thread, so they should be quick (copy what they need, return).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import GenerationInterrupted

__all__ = ["GenerationInterrupted", "StepCallback", "StepHooks", "StepInfo"]


@dataclass
class StepInfo:
    step: int  # 0-based index of the step that just finished
    num_steps: int
    timestep: float  # the step's timestep in [0, 1000]
    latents: torch.Tensor  # (B, C, T', H', W') after this step (the sampler's state; do not modify)
    preview: np.ndarray | None = None  # (B, H, W, 3) uint8: the first frame of the predicted clean video


StepCallback = Callable[[StepInfo], "bool | None"]


class StepHooks:
    """What the denoising loop calls between steps: the user's callback, the progress bar and the stop checks."""

    def __init__(self, num_steps: int, callback: StepCallback | None = None,
                 interrupt: threading.Event | None = None, progress: bool = False, preview=None):
        self.num_steps = num_steps
        self.callback = callback
        self.interrupt = interrupt
        self.preview = preview  # None, or a function (latents, velocity, sigma) -> (B, H, W, 3) uint8
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=num_steps, desc="denoising", leave=False)

    def check(self, completed: int) -> None:
        """Raise GenerationInterrupted if the interrupt event is set (checked before each step)."""
        if self.interrupt is not None and self.interrupt.is_set():
            self.close()
            raise GenerationInterrupted(completed)

    def step_end(self, step: int, timestep: torch.Tensor, latents: torch.Tensor, before: torch.Tensor,
                 velocity: torch.Tensor) -> None:
        """After step `step`: `before` and `velocity` are the step's input latents and (guided) velocity."""
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is None:
            return
        preview = self.preview(before, velocity, float(timestep) / 1000) if self.preview is not None else None
        info = StepInfo(step, self.num_steps, float(timestep), latents, preview)
        if self.callback(info) is True:
            self.close()
            raise GenerationInterrupted(step + 1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
