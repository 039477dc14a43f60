"""Guidance: classifier-free (CFG) and adaptive projected guidance (APG, Sadat et al. 2024), the release default.

APG splits the guidance direction (cond - uncond) into a part parallel to the conditional prediction, which mostly
raises saturation at high scales, and an orthogonal part; it keeps the orthogonal part (eta=0 drops the parallel
one), caps the direction's norm and smooths it with momentum across steps. For video the norm is taken per frame over
(C, H, W), so one frame's large update does not shrink the others.
"""

from __future__ import annotations

import torch

from ..errors import MotifVideoError


class ClassifierFreeGuidance:
    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return uncond + self.scale * (cond - uncond)


class AdaptiveProjectedGuidance:
    def __init__(self, scale: float = 8.0, norm_threshold: float = 12.0, momentum: float = 0.1, eta: float = 0.0,
                 norm_dims: tuple[int, ...] = (1, 3, 4)):
        self.scale, self.norm_threshold, self.momentum, self.eta = scale, norm_threshold, momentum, eta
        self.norm_dims = list(norm_dims)  # (C, H, W) of (B, C, T, H, W): per frame
        self.running = None

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        diff = cond - uncond
        if self.momentum:
            self.running = diff if self.running is None else diff + self.momentum * self.running
            diff = self.running
        if self.norm_threshold > 0:
            norm = diff.norm(p=2, dim=self.norm_dims, keepdim=True)
            diff = diff * torch.clamp(self.norm_threshold / norm, max=1.0)
        v0, v1 = diff.double(), torch.nn.functional.normalize(cond.double(), dim=self.norm_dims)
        parallel = (v0 * v1).sum(dim=self.norm_dims, keepdim=True) * v1
        update = (v0 - parallel) + self.eta * parallel
        return uncond + self.scale * update.to(diff.dtype)


def _cfg(scale: float, **apg_options) -> ClassifierFreeGuidance:
    return ClassifierFreeGuidance(scale)  # the APG options do not apply


# Guider name -> factory (scale, APG options); `generate --guider` offers these names.
GUIDERS = {"apg": AdaptiveProjectedGuidance, "cfg": _cfg}


def make_guidance(name: str, scale: float, **apg_options):
    if name not in GUIDERS:
        raise MotifVideoError(f"unknown guider {name!r}; choose one of: {', '.join(GUIDERS)}")
    return GUIDERS[name](scale, **apg_options)
