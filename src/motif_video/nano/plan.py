"""The sizes and budgets of one nano reproduction, importable without torch (the CLI reads its defaults here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NanoPlan:
    """Sizes and budgets of one reproduction; the defaults take about 58 minutes on 2 CPU cores (docs/nano.md)."""

    seed: int = 0
    clips: int = 2000
    images: int = 1000
    codec_steps: int = 3000  # the budget ends it; the still-image phase is the first 60% of the schedule
    codec_budget_s: float | None = 600.0
    teacher_steps: int = 600
    stage_steps: tuple[int, int, int] = (600, 1200, 3600)
    eval_prompts: int = 105
    eval_steps: int = 20
    i2v_eval_clips: int = 24  # held-out first frames scored for image-to-video (0: skip)
    encoder_budget: int | None = 6  # encoder runs of the calibrated reuse schedule written as the default (None: exact)
    train_overrides: tuple[str, ...] = ()  # extra `key=value` overrides for every stage config
    codec_from: str | None = None  # a trained codec folder to reuse instead of training one
    teacher_from: str | None = None  # a trained teacher folder to reuse instead of training one
    generation: dict = field(default_factory=lambda: {
        "height": 64, "width": 64, "num_frames": 17, "num_inference_steps": 20, "guidance_scale": 2.0,
        "guider": "cfg", "shift": 3.0, "image_shift": 3.0, "solver": "euler", "fps": 8, "negative_prompt": "",
        "max_sequence_length": 64,
    })
