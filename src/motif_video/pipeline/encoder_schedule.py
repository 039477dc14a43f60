"""Which sampling steps run the encoder when its output is reused across steps (DDT-style encoder sharing).

The encoder's output drifts unevenly over sampling: fast where the noise level falls fastest, slowly elsewhere.
Refreshing it every k-th step spends the refreshes evenly; DDT (Wang et al. 2025, "statistic dynamic programming")
instead measures the drift once per model and places a fixed number of refreshes where they remove the most error.

    drift[i, j]   relative distance between the encoder's output at step i and at an earlier step j, averaged over
                  calibration prompts (`measure_drift`, exact sampling)
    plan_refresh  the `budget` refresh steps (step 0 always) that minimise the summed drift of every step from the
                  output it reuses: an exact dynamic programme, O(budget * steps^2)

`motif-video calibrate-reuse MODEL --budget K` runs both and can write the schedule into the model folder's
`motif_video.json` (`encoder_refresh`), where the pipeline takes it as its default at the calibrated step count.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import MotifVideoError


# Generic prompts: the drift pattern over steps is a property of the model and the noise schedule, not the prompt.
CALIBRATION_PROMPTS = (
    "a small red circle moving to the left",
    "a large blue square moving up",
    "a dog running along a beach at sunset",
    "a city street at night with passing cars",
)


def uniform_refresh(steps: int, reuse: int) -> list[int]:
    """Every `reuse`-th step, starting at the first."""
    if reuse < 1:
        raise MotifVideoError(f"encoder_reuse must be >= 1, got {reuse}")
    return list(range(0, steps, reuse))


def fallback_reuse(steps: int, budget: int) -> int:
    """The largest uniform reuse factor with at least `budget` encoder runs over `steps` steps."""
    return max(1, steps // budget)


def check_refresh(refresh: Sequence[int], steps: int) -> list[int]:
    """Sorted, de-duplicated refresh steps; they must lie in [0, steps) and include step 0 (nothing to reuse yet)."""
    out = sorted({int(i) for i in refresh})
    if not out or out[0] != 0 or out[-1] >= steps:
        raise MotifVideoError(f"encoder refresh steps must include 0 and lie in [0, {steps}), got {list(refresh)}")
    return out


def reuse_error(drift: np.ndarray, refresh: Sequence[int]) -> float:
    """Summed drift of every step from the encoder output it reuses (0 for an exact schedule)."""
    steps = drift.shape[0]
    last, total = 0, 0.0
    marks = set(check_refresh(refresh, steps))
    for i in range(steps):
        if i in marks:
            last = i
        total += float(drift[i, last])
    return total


def plan_refresh(drift: np.ndarray, budget: int) -> list[int]:
    """The `budget` refresh steps minimising `reuse_error` (exact dynamic programme over the segment boundaries)."""
    drift = np.asarray(drift, dtype=np.float64)
    steps = drift.shape[0]
    if drift.shape != (steps, steps):
        raise MotifVideoError(f"drift must be a square (steps, steps) matrix, got {drift.shape}")
    if not 1 <= budget <= steps:
        raise MotifVideoError(f"the refresh budget must be in [1, {steps}], got {budget}")
    # segment[j, e]: error of steps j..e-1 all reusing step j's output (prefix sums down column j)
    column = np.vstack([np.zeros((1, steps)), np.cumsum(drift, axis=0)])  # column[e, j] = sum_{i<e} drift[i, j]
    segment = column.T - np.diagonal(column)[:, None]  # segment[j, e] = sum_{j <= i < e} drift[i, j]
    best = np.full((budget + 1, steps + 1), np.inf)  # best[k, j]: steps j.. with a refresh at j and k refreshes
    choice = np.zeros((budget + 1, steps + 1), dtype=np.int64)
    best[1, :steps] = segment[np.arange(steps), steps]
    for k in range(2, budget + 1):
        for j in range(steps):
            nexts = np.arange(j + 1, steps)
            if nexts.size == 0:
                continue
            costs = segment[j, nexts] + best[k - 1, nexts]
            pick = int(np.argmin(costs))
            best[k, j], choice[k, j] = costs[pick], nexts[pick]
    refresh, j = [0], 0
    for k in range(budget, 1, -1):
        j = int(choice[k, j])
        refresh.append(j)
    return refresh


def measure_drift(pipe, prompts: Sequence[str], seeds: Sequence[int] = (0,), **call_kwargs) -> np.ndarray:
    """drift[i, j] = mean over prompts, seeds and guidance branches of |e_i - e_j| / |e_i|, where e_i is the
    encoder's output at step i of exact sampling with the pipeline's defaults (overridable by `call_kwargs`)."""
    total = None
    for seed in seeds:
        trace: list[list[torch.Tensor]] = []
        pipe(list(prompts), generator=torch.Generator().manual_seed(seed), output_type="latent", progress=False,
             encoder_trace=trace, **call_kwargs)
        for branch in zip(*trace):  # one guidance branch (cond, uncond or both batched) over all steps
            e = torch.stack([t.float().flatten(1) for t in branch])  # (steps, B, N * D)
            diff = torch.cdist(e.transpose(0, 1), e.transpose(0, 1))  # (B, steps, steps): |e_i - e_j|
            rel = (diff / e.norm(dim=-1).T[:, :, None].clamp_min(1e-12)).mean(0).double().numpy()
            total = rel if total is None else total + rel
    count = len(seeds) * len(trace[0])
    return total / count


def save_schedule(folder: str | Path, refresh: Sequence[int], steps: int) -> Path:
    """Make `refresh` the default schedule of the model folder (its motif_video.json, other settings kept), with
    the largest uniform factor that runs the encoder at least as often as the fallback at other step counts."""
    from ..model_folder import update_generation_defaults

    refresh = check_refresh(refresh, steps)
    return update_generation_defaults(folder, encoder_refresh=refresh, encoder_reuse=fallback_reuse(steps, len(refresh)))
