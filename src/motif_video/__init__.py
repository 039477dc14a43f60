"""motif-video: an open implementation of Motif-Video 2B (model, generation and training recipe)."""

from .errors import CheckpointError, ConfigError, MotifVideoError
from .model.config import PRESETS, TransformerConfig, preset
from .model.transformer import MotifVideoTransformer

__version__ = "0.1.0"


def __getattr__(name):  # heavy components load on first use
    if name == "MotifVideoPipeline":
        from .pipeline.pipeline import MotifVideoPipeline

        return MotifVideoPipeline
    raise AttributeError(name)


__all__ = ["MotifVideoTransformer", "MotifVideoPipeline", "TransformerConfig", "PRESETS", "preset",
           "MotifVideoError", "CheckpointError", "ConfigError"]
