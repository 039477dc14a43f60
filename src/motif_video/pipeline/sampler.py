"""Flow-matching sampling schedules: static shift, Euler or DPM-Solver++ 2M (diffusers' schedulers)."""

from __future__ import annotations

import numpy as np

from ..errors import MotifVideoError


def _euler(shift: float, num_steps: int, device):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), device=device)
    return scheduler


def _dpm_solver_2m(shift: float, num_steps: int, device):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction", use_flow_sigmas=True,
        flow_shift=shift, final_sigmas_type="zero", lower_order_final=True,
    )
    scheduler.set_timesteps(num_steps, device=device)
    return scheduler


# Solver name -> scheduler factory (shift, steps, device); `generate --solver` offers these names.
SOLVERS = {"euler": _euler, "dpm++": _dpm_solver_2m}


def make_scheduler(solver: str, shift: float, num_steps: int, device=None):
    """A scheduler with its timesteps set; sigmas run 1 -> 1/N before the shift, as in the release pipeline."""
    if num_steps < 1:
        raise MotifVideoError(f"steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise MotifVideoError(f"shift must be > 0, got {shift}")
    if solver not in SOLVERS:
        raise MotifVideoError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    return SOLVERS[solver](shift, num_steps, device)
