"""Training-free step caches: skip the transformer's blocks on some sampling steps and reuse what earlier steps did.

The blocks (dual-stream, single-stream encoder, DDT decoder) turn the patch embedding `x` (B, N, D) into the tokens
the output head reads, `out` (B, N, D). Neighbouring sampling steps change `out - x` slowly, so a step can often take
it from earlier steps instead of running the blocks. Each cache is a configuration; `begin` gives one state per
guidance branch (cond and uncond run as separate forwards, each with its own history), and the transformer's
forward consults that state once per call:

    FirstBlockCache  runs the first dual-stream block; when its residual moved less than `threshold` (relative mean
                     absolute change) since the last step that ran everything, the rest is skipped and the cached
                     residual of the remaining blocks is added to the first block's output
    MagCache         skips on a schedule read from calibrated per-step magnitude ratios of the residual
                     (`calibrate_magnitudes`): while the accumulated |1 - product of ratios| stays under `threshold`
                     (and at most `max_skip` steps in a row, never in the first `retention` share of steps), the last
                     residual is reused
    TaylorSeer       runs the blocks every `interval`-th step and in between predicts `out` by a Taylor series
                     built from finite differences of the steps that ran

Each is exact at one setting (threshold 0, interval 1): the state then asks for every step to run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import MotifVideoError


class StepCacheState:
    """One guidance branch's history; `lookup` is asked before the blocks run, `store` after they did."""

    needs_first_block = False

    def __init__(self, steps: int):
        self.steps = steps
        self.step = -1  # index of the current call (one call per sampling step)
        self.computed = 0
        self.skipped = 0

    def lookup(self, x: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor | None:
        """The blocks' output for this step from earlier steps, or None to run them. `x`: the patch embedding
        (B, N, D); `first`: the video tokens after the first dual-stream block when `needs_first_block`."""
        self.step += 1
        if self.step >= self.steps:
            raise MotifVideoError(f"a step cache made for {self.steps} steps was called a {self.step + 1}th time")
        out = self.reuse(x, first)
        if out is None:
            self.computed += 1
        else:
            self.skipped += 1
        return out

    def reuse(self, x: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor | None:
        raise NotImplementedError

    def store(self, x: torch.Tensor, first: torch.Tensor | None, out: torch.Tensor) -> None:
        raise NotImplementedError


@dataclass
class StepCache:
    """Base of the cache configurations: `begin` makes the states of one generation, kept in `states` afterwards
    so callers can count what ran (`computed`, `skipped`: transformer calls over all branches)."""

    states: list = field(default_factory=list, init=False, repr=False, compare=False)

    def begin(self, steps: int, branches: int, defaults=None) -> list[StepCacheState]:
        self.states = [self.new_state(steps, defaults) for _ in range(branches)]
        return self.states

    def new_state(self, steps: int, defaults) -> StepCacheState:
        raise NotImplementedError

    @property
    def computed(self) -> int:
        return sum(s.computed for s in self.states)

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.states)


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean|new - old| / mean|old|, in float32 whatever the compute dtype."""
    return float((new.float() - old.float()).abs().mean() / old.float().abs().mean().clamp_min(1e-12))


# -- first-block cache ---------------------------------------------------------------------------------------------
class _FirstBlockState(StepCacheState):
    needs_first_block = True

    def __init__(self, steps: int, threshold: float):
        super().__init__(steps)
        self.threshold = threshold
        self.first_residual = None  # first block's residual at the last step that ran everything
        self.tail_residual = None  # out - first block's output at that step

    def reuse(self, x, first):
        if self.first_residual is None or self.first_residual.shape != first.shape:
            return None
        # against the last full step, not the previous call: drift over skipped steps adds up and forces a run
        if relative_change(first - x, self.first_residual) < self.threshold:
            return first + self.tail_residual
        return None

    def store(self, x, first, out):
        self.first_residual, self.tail_residual = first - x, out - first


@dataclass
class FirstBlockCache(StepCache):
    """Skip all blocks after the first while the first block's residual changes by less than `threshold`
    (0: exact; diffusers' FirstBlockCacheConfig takes the same threshold)."""

    threshold: float = 0.05

    def __post_init__(self):
        if not self.threshold >= 0:
            raise MotifVideoError(f"the first-block cache threshold must be >= 0, got {self.threshold}")

    def new_state(self, steps, defaults):
        return _FirstBlockState(steps, self.threshold)


# -- MagCache ------------------------------------------------------------------------------------------------------
def resample_ratios(ratios: list[float], steps: int) -> np.ndarray:
    """Calibrated per-step ratios at another step count: linear interpolation over the fraction of sampling done."""
    ratios = np.asarray(ratios, dtype=np.float64)
    if len(ratios) == steps:
        return ratios
    return np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(ratios)), ratios)


class _MagState(StepCacheState):
    def __init__(self, steps: int, threshold: float, max_skip: int, retention: float, ratios: np.ndarray):
        super().__init__(steps)
        self.threshold, self.max_skip = threshold, max_skip
        self.first_skippable = math.ceil(retention * steps)
        self.ratios = ratios
        self.residual = None
        self._reset()

    def _reset(self):
        self.ratio, self.error, self.run = 1.0, 0.0, 0

    def reuse(self, x, first):
        if self.residual is None or self.step < self.first_skippable or self.residual.shape != x.shape:
            self._reset()
            return None
        # the ratio of |residual| at this step to the last computed one, as calibrated, and how far the reused
        # residual is off accumulated over the steps skipped since
        self.ratio *= float(self.ratios[self.step])
        self.error += abs(1.0 - self.ratio)
        self.run += 1
        if self.error < self.threshold and self.run <= self.max_skip:
            return x + self.residual
        self._reset()
        return None

    def store(self, x, first, out):
        self.residual = out - x


@dataclass
class MagCache(StepCache):
    """MagCache (Ma et al. 2025): skip while the calibrated magnitude ratios say the residual barely changed.

    `ratios`: per-step ratios |r_t| / |r_{t-1}| (`calibrate_magnitudes`); None takes the model folder's
    (`magcache_ratios` in motif_video.json, written by `motif-video calibrate-cache --write`). threshold 0 is exact.
    """

    threshold: float = 0.06
    max_skip: int = 3
    retention: float = 0.2
    ratios: list[float] | None = None

    def __post_init__(self):
        if not self.threshold >= 0:
            raise MotifVideoError(f"the MagCache threshold must be >= 0, got {self.threshold}")
        if self.max_skip < 1:
            raise MotifVideoError(f"MagCache max_skip must be >= 1, got {self.max_skip}")
        if not 0 <= self.retention <= 1:
            raise MotifVideoError(f"MagCache retention must be in [0, 1], got {self.retention}")

    def new_state(self, steps, defaults):
        ratios = self.ratios if self.ratios is not None else getattr(defaults, "magcache_ratios", None)
        if ratios is None:
            raise MotifVideoError("MagCache needs calibrated magnitude ratios: run `motif-video calibrate-cache "
                                  "MODEL --write` or pass ratios")
        return _MagState(steps, self.threshold, self.max_skip, self.retention, resample_ratios(ratios, steps))


class _MagnitudeRecorder(StepCacheState):
    def __init__(self, steps: int):
        super().__init__(steps)
        self.norms: list[torch.Tensor] = []  # per step: |out - x| per batch row

    def reuse(self, x, first):
        return None

    def store(self, x, first, out):
        self.norms.append((out.float() - x.float()).flatten(1).norm(dim=1).cpu())


@dataclass
class MagnitudeRecorder(StepCache):
    """Exact sampling that records each step's residual magnitude: the calibration of MagCache."""

    def new_state(self, steps, defaults):
        return _MagnitudeRecorder(steps)

    def ratios(self) -> list[float]:
        """Mean over branches and batch rows of |r_t| / |r_{t-1}|; the first step's ratio is 1."""
        per_branch = [torch.stack(s.norms) for s in self.states]  # each (steps, B)
        norms = torch.cat(per_branch, dim=1).double()  # (steps, rows)
        ratios = (norms[1:] / norms[:-1].clamp_min(1e-12)).mean(1)
        return [1.0] + [round(float(r), 6) for r in ratios]


# -- TaylorSeer ----------------------------------------------------------------------------------------------------
class _TaylorState(StepCacheState):
    def __init__(self, steps: int, interval: int, order: int, warmup: int):
        super().__init__(steps)
        self.interval, self.order, self.warmup = interval, order, warmup
        self.derivatives: list[torch.Tensor] = []  # d^k out / dstep^k at `updated`, k = 0..order
        self.updated = -1

    def reuse(self, x, first):
        if not self.derivatives or self.step < self.warmup or (self.step - self.warmup) % self.interval == 0 \
                or self.derivatives[0].shape != x.shape:
            return None
        distance = self.step - self.updated
        out = self.derivatives[0].clone()
        for k, d in enumerate(self.derivatives[1:], start=1):
            out += d * (distance**k / math.factorial(k))
        return out.to(x.dtype)

    def store(self, x, first, out):
        new = [out.float()]
        if self.derivatives:
            distance = self.step - self.updated
            for k in range(min(self.order, len(self.derivatives))):  # finite differences, one order per run
                new.append((new[k] - self.derivatives[k]) / distance)
        self.derivatives, self.updated = new, self.step


@dataclass
class TaylorSeer(StepCache):
    """TaylorSeer (Liu et al. 2025): run the blocks every `interval`-th step after `warmup` full steps and predict
    their output in between by a Taylor series of order `order` (interval 1: exact)."""

    interval: int = 3
    order: int = 1
    warmup: int = 3

    def __post_init__(self):
        if self.interval < 1 or self.order < 0 or self.warmup < 0:
            raise MotifVideoError(f"TaylorSeer needs interval >= 1, order >= 0 and warmup >= 0, got interval "
                                  f"{self.interval}, order {self.order}, warmup {self.warmup}")

    def new_state(self, steps, defaults):
        return _TaylorState(steps, self.interval, self.order, self.warmup)


# -- names for the command line ------------------------------------------------------------------------------------
def parse_cache(text: str) -> StepCache:
    """`fbcache:0.05`, `magcache:0.06[:max_skip[:retention]]`, `taylorseer:3[:order[:warmup]]`."""
    name, *values = text.strip().split(":")
    kinds = {"fbcache": (FirstBlockCache, (float,), "threshold"),
             "magcache": (MagCache, (float, int, float), "threshold[:max_skip[:retention]]"),
             "taylorseer": (TaylorSeer, (int, int, int), "interval[:order[:warmup]]")}
    if name not in kinds:
        raise MotifVideoError(f"unknown cache {name!r}; choose fbcache:THRESHOLD, magcache:THRESHOLD or "
                              f"taylorseer:INTERVAL")
    cls, types, usage = kinds[name]
    if not 1 <= len(values) <= len(types):
        raise MotifVideoError(f"--cache {name} takes {name}:{usage}, got {text!r}")
    try:
        args = [t(v) for t, v in zip(types, values)]
    except ValueError:
        raise MotifVideoError(f"--cache {name} takes {name}:{usage}, got {text!r}") from None
    return cls(*args)
