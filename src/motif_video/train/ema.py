"""Exponential moving average of the trainable parameters.

The shadow copies have the same type and placement as the parameters: under FSDP2 they are sharded DTensors, so the
EMA costs 1/world_size of a model copy per rank and its update is local (no communication).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .parallel import clean_name, full_tensor


class EMA:
    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            clean_name(name): p.detach().clone().float() for name, p in module.named_parameters() if p.requires_grad
        }

    def _pairs(self, module: nn.Module):
        for name, p in module.named_parameters():
            if p.requires_grad:
                yield self.shadow[clean_name(name)], p

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for shadow, p in self._pairs(module):
            shadow.lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_from(self, module: nn.Module) -> None:
        for shadow, p in self._pairs(module):
            shadow.copy_(p.detach().float())

    @contextmanager
    def applied(self, module: nn.Module):
        """Temporarily put the EMA weights into the module (validation, saving), restoring the live ones after."""
        saved = []
        with torch.no_grad():
            for shadow, p in self._pairs(module):
                saved.append(p.detach().clone())
                p.copy_(shadow.to(p.dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for (_, p), value in zip(self._pairs(module), saved):
                    p.copy_(value)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded CPU copies; under FSDP2 every rank must call this (it all-gathers)."""
        return {name: full_tensor(t).cpu() for name, t in self.shadow.items()}
