from .config import PRESETS, TransformerConfig, preset
from .transformer import MotifVideoTransformer

__all__ = ["MotifVideoTransformer", "TransformerConfig", "PRESETS", "preset"]
