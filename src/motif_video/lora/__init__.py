"""LoRA adapters at generation: reading every common key style (formats), applying them to a model from outside
(runtime), and diffusers' pipeline API on top (loader)."""
