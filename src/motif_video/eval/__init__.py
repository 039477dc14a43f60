"""Analytic video metrics for the nano world: colour, shape and motion direction against the prompt, subject and
background consistency, temporal flickering; no learned weights."""

from .metrics import ClipMeasurement, measure_clip, score_clip
from .prompts import PromptAttributes, parse_prompt
from .report import evaluate, load_items, write_report

__all__ = ["ClipMeasurement", "PromptAttributes", "evaluate", "load_items", "measure_clip", "parse_prompt",
           "score_clip", "write_report"]
