"""The sizes and budgets of one nano reproduction, importable without torch (the CLI reads its defaults here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NanoPlan:
    """Sizes and budgets of one reproduction; the defaults take about 58 minutes on 2 CPU cores (docs/nano.md)."""

    seed: int = 0
    clips: int = 2000
    images: int = 1000
    # A fixed step count, not a time budget: under a 600 s budget a machine at half speed trained the codec 1,211
    # steps instead of 2,350 and the whole model fell from 92 % to 50 % all correct (docs/nano.md).
    codec_steps: int = 2400  # the still-image phase is the first 60% of the schedule
    codec_budget_s: float | None = None  # an optional time cap (the schedule then ends at whichever comes first)
    # Weight of the term tying three latent channels to the pixel colour: without it the codec's colour geometry is
    # chance, and the palette pairs it happens to put close are the ones the model confuses; at 1 small triangles
    # came out as circles, at 0.1 (nano v11) neither happened (docs/nano.md).
    codec_colour_weight: float = 0.1
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
