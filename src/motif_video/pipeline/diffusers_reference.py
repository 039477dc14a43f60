"""diffusers' own MotifVideoPipeline around a model folder's weights: the reference that our pipeline and our step
caches are measured against (the anchor rows of benchmarks/fast_sampling.py).

The transformer is converted to the diffusers layout (`motif-video convert --to diffusers`; a tied model converts
exactly only when its query LayerNorm has no bias) and run by diffusers' `MotifVideoTransformer3DModel`. The text
encoder, tokenizer and VAE are the very modules of our loaded pipeline and the initial noise is drawn as ours draws
it, so the two differ only in the transformer's code, the sampling loop and the caches. What diffusers does its own
way, and so does here: it pads every prompt to `max_sequence_length` tokens with a mask (we trim the padding), runs
the two guidance branches as two forwards, and has no DDT encoder reuse (its encoder blocks run on every step, our
`encoder_reuse=1`).

diffusers' cache hooks (`diffusers.hooks`: FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig) go on its
transformer for one call: `reference(prompts, cache=config)`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MotifVideoError
from .pipeline import MotifVideoPipeline, check_sampling, initial_noise
from .sampler import make_scheduler
from .text import check_prompt


class DiffusersReference:
    """Generation by diffusers' pipeline with `pipe`'s conditioning components, defaults and noise, and the
    diffusers-layout transformer in `transformer_dir`. Called like `MotifVideoPipeline` (the subset the
    benchmarks use); `cache` is a diffusers cache config, applied for this call only."""

    def __init__(self, pipe: MotifVideoPipeline, transformer_dir: str | Path):
        from diffusers import MotifVideoPipeline as DiffusersPipeline
        from diffusers import MotifVideoTransformer3DModel
        from diffusers.guiders import ClassifierFreeGuidance

        d = pipe.defaults
        if d.guider != "cfg" or d.solver != "euler":
            raise MotifVideoError(f"the diffusers reference samples with Euler and classifier-free guidance; this "
                                  f"model's defaults are {d.solver} and {d.guider}")
        parameter = next(pipe.transformer.parameters())
        self.transformer = MotifVideoTransformer3DModel.from_pretrained(
            str(transformer_dir), torch_dtype=parameter.dtype).to(parameter.device).eval()
        self.pipeline = DiffusersPipeline(
            scheduler=make_scheduler("euler", d.shift, d.num_inference_steps),
            vae=pipe.codec.vae, text_encoder=pipe.prompts.text_encoder, tokenizer=pipe.prompts.tokenizer,
            transformer=self.transformer, guider=ClassifierFreeGuidance(guidance_scale=d.guidance_scale))
        self.codec = pipe.codec
        self.defaults = d

    @classmethod
    def from_model(cls, model_dir: str | Path, pipe: MotifVideoPipeline, work_dir: str | Path) -> "DiffusersReference":
        """Convert `model_dir`'s transformer into `work_dir`/transformer and build the reference around `pipe` (the
        same folder loaded by us). A model that does not convert raises the converter's CheckpointError."""
        from ..convert.checkpoint import convert_transformer

        _, _, out, _ = convert_transformer(model_dir, Path(work_dir) / "transformer", "diffusers")
        return cls(pipe, out)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_inference_steps: int | None = None, generator=None,
                 latents: torch.Tensor | None = None, output_type: str = "np", *, cache=None, progress: bool = True):
        """Frames as ours returns them ("np": (B, T, H, W, 3) in [0, 1]; "latent": the final latents), at the
        model's default size, scale and shift."""
        d = self.defaults
        prompts = check_prompt(prompt)
        steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        check_sampling(steps)
        if output_type not in ("np", "latent"):
            raise MotifVideoError(f"output_type must be np or latent, got {output_type!r}")
        shape = (len(prompts), self.codec.latent_channels, *self.codec.latent_shape(d.num_frames, d.height, d.width))
        if latents is None:
            latents = initial_noise(shape, generator)
        self.pipeline.set_progress_bar_config(disable=not progress)
        if cache is not None:
            self.transformer.enable_cache(cache)
        try:
            return self.pipeline(prompt=prompts, negative_prompt=d.negative_prompt, height=d.height, width=d.width,
                                 num_frames=d.num_frames, num_inference_steps=steps, latents=latents,
                                 output_type=output_type, max_sequence_length=d.max_sequence_length,
                                 return_dict=False)[0]
        finally:
            if cache is not None:
                self.transformer.disable_cache()  # the hooks and their per-branch state go with it


def diffusers_cache(kind: str, value: float, steps: int, magcache_ratios: list[float] | None = None):
    """diffusers' config for one of our cache settings, with the same knobs: `fbcache` threshold, `magcache`
    threshold (max_skip 3, retention 0.2, the model's calibrated ratios, as our MagCache), `taylorseer` interval
    (order 1, 3 warm-up steps, float32 factors, the attention outputs: diffusers' default targets), `taylorseer-lite`
    interval (diffusers' lite mode: the blocks skipped, the output projection predicted, like our TaylorSeer)."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if kind == "fbcache":
        return FirstBlockCacheConfig(threshold=value)
    if kind == "magcache":
        if magcache_ratios is None:
            raise MotifVideoError("MagCache needs calibrated magnitude ratios: run `motif-video calibrate-cache "
                                  "MODEL --write`")
        return MagCacheConfig(threshold=value, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=steps,
                              mag_ratios=list(magcache_ratios))
    if kind in ("taylorseer", "taylorseer-lite"):
        return TaylorSeerCacheConfig(cache_interval=int(value), disable_cache_before_step=3, max_order=1,
                                     taylor_factors_dtype=torch.float32, use_lite_mode=kind == "taylorseer-lite")
    raise MotifVideoError(f"unknown diffusers cache {kind!r}; choose fbcache, magcache, taylorseer or "
                          f"taylorseer-lite")
