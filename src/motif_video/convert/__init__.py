"""Checkpoint formats: the diffusers folder layout, the original Motif layout, and GGUF."""
