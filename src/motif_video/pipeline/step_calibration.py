"""MagCache's calibration: the per-step magnitude ratios |r_t| / |r_{t-1}| of the transformer blocks' residual
r = out - x (model/step_cache.py), measured once per model by exact sampling of a few generic prompts.

The ratios follow the noise schedule and the model, not the prompt (MagCache's observation: they stay near 1 for
most of sampling and fall off in the last steps), so `motif-video calibrate-cache MODEL --write` stores them in the
model folder's motif_video.json (`magcache_ratios`), where `MagCache()` finds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..model.step_cache import MagnitudeRecorder
from .encoder_schedule import CALIBRATION_PROMPTS


def calibrate_magnitudes(pipe, prompts: Sequence[str] = CALIBRATION_PROMPTS, seeds: Sequence[int] = (0,),
                         **call_kwargs) -> list[float]:
    """Mean over prompts, seeds and guidance branches of each step's residual magnitude ratio, sampled exactly
    (the encoder on every step) with the pipeline's defaults overridden by `call_kwargs`."""
    per_seed = []
    for seed in seeds:
        recorder = MagnitudeRecorder()
        pipe(list(prompts), generator=torch.Generator().manual_seed(seed), output_type="latent", progress=False,
             cache=recorder, **{"encoder_reuse": 1, **call_kwargs})
        per_seed.append(recorder.ratios())
    return [round(sum(r[i] for r in per_seed) / len(per_seed), 6) for i in range(len(per_seed[0]))]


def save_magnitudes(folder: str | Path, ratios: Sequence[float]) -> Path:
    """Make `ratios` the model folder's MagCache calibration."""
    from ..model_folder import update_generation_defaults

    return update_generation_defaults(folder, magcache_ratios=[float(r) for r in ratios])
