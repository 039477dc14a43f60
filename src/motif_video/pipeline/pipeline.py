"""MotifVideoPipeline: text-to-video and image-to-video generation with our transformer and the release's components.

`from_pretrained` reads a model folder through `motif_video.model_folder`; the constructor takes the components
themselves, so a transformer held in memory (the one being trained, a fine-tuned one) generates the same way.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..errors import MotifVideoError
from ..latents import check_video_size, model_input
from ..lora.loader import LoraLoaderMixin
from ..model.step_cache import StepCache
from ..model.transformer import EncoderCache, MotifVideoTransformer
from ..model_folder import GenerationDefaults, ModelFolder, default_device_dtype
from .encoder_schedule import check_refresh, uniform_refresh
from .guidance import make_guidance
from .hooks import StepCallback, StepHooks
from .sampler import make_scheduler
from .text import PromptEncoder, check_prompt, pad_and_stack
from .vae import LatentCodec


def first_frame_tokens(text_encoder, image_processor, first_frame: torch.Tensor) -> torch.Tensor | None:
    """SigLIP tokens (B, N, D) of first frames (B, 3, 1, H, W) in [-1, 1] from the text encoder's vision tower, or
    None when it has none. Generation and the training cache (`motif-video cache`) compute them here alike."""
    vision = getattr(text_encoder, "vision_tower", None)
    if vision is None:
        return None
    rgb01 = ((first_frame[:, :, 0] + 1) / 2).clamp(0, 1)  # (B, 3, H, W)
    if image_processor is not None:
        pixels = image_processor.preprocess(images=rgb01, do_resize=True, do_rescale=False, do_normalize=True,
                                            do_convert_rgb=True, return_tensors="pt")["pixel_values"]
    else:
        size = vision.config.image_size
        pixels = torch.nn.functional.interpolate(rgb01, size=(size, size), mode="bicubic", antialias=True)
        pixels = (pixels - 0.5) / 0.5
    param = next(vision.parameters())
    with torch.no_grad():
        return vision(pixel_values=pixels.to(param.device, param.dtype)).last_hidden_state


def check_sampling(steps: int, guidance_scale: float | None = None, shift: float | None = None) -> None:
    """Step count and the float knobs of sampling; NaN or infinity would only surface as a black video."""
    if not isinstance(steps, int) or steps < 1:
        raise MotifVideoError(f"steps must be >= 1, got {steps}")
    if guidance_scale is not None and not np.isfinite(guidance_scale):
        raise MotifVideoError(f"guidance scale must be a finite number, got {guidance_scale}")
    if shift is not None and not (np.isfinite(shift) and shift > 0):
        raise MotifVideoError(f"shift must be a finite number > 0, got {shift}")


def initial_noise(shape: tuple[int, ...], generator) -> torch.Tensor:
    """Standard normal latents; with a list of generators, clip i draws from generator i alone."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise MotifVideoError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([initial_noise((1, *shape[1:]), g) for g in generator])
    return torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")


class MotifVideoPipeline(LoraLoaderMixin):
    """Generation around a transformer and the folder's conditioning components.

    The transformer may be any `MotifVideoTransformer` in memory, placed where it should run: generation runs on
    the device of its parameters until `to()` or `enable_model_cpu_offload()` says otherwise. The trainer builds one
    around the model it trains (under FSDP2 the transformer is a sharding unit of its own, so calling it directly
    gathers its weights).
    """

    def __init__(self, transformer: MotifVideoTransformer, vae, text_encoder, tokenizer, image_processor=None,
                 defaults: GenerationDefaults | None = None):
        self.transformer = transformer
        self.codec = LatentCodec(vae)
        self.prompts = PromptEncoder(tokenizer, text_encoder)
        self.image_processor = image_processor
        self.defaults = defaults or GenerationDefaults()
        self.prompts.max_length = self.defaults.max_sequence_length
        self.execution_device = next(transformer.parameters()).device
        self.offload = False
        # Where the guidance branches run: None here, one after the other (or batched); an object with
        # `run(branch, count) -> [velocity of each branch]` runs them elsewhere (parallel.guidance: CFG-parallel)
        self.guidance_branches = None

    # -- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, ref: str | Path, *, gguf: str | Path | None = None, device: str | None = None,
                        dtype: torch.dtype | None = None, offload: bool = False) -> "MotifVideoPipeline":
        """Load a model folder (or hub id); `gguf` replaces the transformer by a quantised file."""
        folder = ModelFolder(ref)
        device, dtype = default_device_dtype(device, dtype)
        pipe = cls(folder.transformer(dtype, gguf=gguf), folder.vae(device, dtype), folder.text_encoder(dtype),
                   folder.tokenizer(), folder.image_processor(), folder.defaults)
        if offload:
            pipe.enable_model_cpu_offload(device)
        else:
            pipe.to(device)
        return pipe

    def to(self, device) -> "MotifVideoPipeline":
        self.execution_device = torch.device(device)
        for module in self._modules():
            module.to(self.execution_device)
        return self

    def enable_model_cpu_offload(self, device) -> None:
        """Keep components on the CPU and move only the active one to `device` (text encoder -> transformer -> VAE)."""
        self.execution_device = torch.device(device)
        self.offload = True
        for module in self._modules():
            module.to("cpu")

    def enable_vae_tiling(self) -> None:
        self.codec.enable_tiling()

    def compile_transformer(self, mode: str | None = None) -> None:
        """torch.compile each transformer block in place (regional compilation: one graph per block kind, compiled
        once and reused by every block, so warm-up stays short). Pays off on CUDA; on CPU it needs a C++ compiler."""
        for block in self.transformer.blocks:
            block.compile(mode=mode, dynamic=False)

    def _modules(self):
        return [self.transformer, self.codec.vae, self.prompts.text_encoder]

    def _activate(self, module):
        if self.offload:
            for other in self._modules():
                if other is not module:
                    other.to("cpu")
            module.to(self.execution_device)
            if self.execution_device.type == "cuda":
                torch.cuda.empty_cache()

    # -- conditioning ----------------------------------------------------------------------------------------------
    def _image_tensor(self, image, height: int, width: int) -> torch.Tensor:
        """A first frame (path, PIL image, or array) -> (1, 3, 1, H, W) in [-1, 1], resized like diffusers."""
        from PIL import Image, UnidentifiedImageError

        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise MotifVideoError(f"image file not found: {path}")
            try:
                image = Image.open(path)
                image.load()
            except (UnidentifiedImageError, OSError):
                raise MotifVideoError(f"cannot read image file {path}") from None
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image.astype(np.uint8) if image.dtype != np.uint8 else image)
        if not isinstance(image, Image.Image):
            raise MotifVideoError("image must be a file path, a PIL image or an HxWx3 uint8 array")
        image = image.convert("RGB").resize((width, height), resample=Image.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3)
        return pixels.permute(2, 0, 1)[None, :, None]

    def _image_tokens(self, first_frame: torch.Tensor) -> torch.Tensor | None:
        """SigLIP tokens of the first frame from the text encoder's vision tower (None if the model has none)."""
        if self.transformer.config.image_embed_dim is None:
            return None
        return first_frame_tokens(self.prompts.text_encoder, self.image_processor, first_frame)

    # -- generation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        image=None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        *,
        guider: str | None = None,
        shift: float | None = None,
        solver: str | None = None,
        encoder_reuse: int | None = None,
        encoder_refresh: list[int] | None = None,
        cache: StepCache | None = None,
        batch_guidance: bool | None = None,
        progress: bool = True,
        encoder_trace: list | None = None,
        callback: StepCallback | None = None,
        preview: bool = False,
        interrupt=None,
    ):
        """Generate videos. Returns frames: "np" float (B, T, H, W, 3) in [0, 1], "pt" (B, T, 3, H, W), "pil" lists.

        `negative_prompt=None` uses the release's default negative prompt; pass "" for an empty one. `latents`
        (B, 16, T', H', W') fixes the initial noise, so runs are comparable across implementations.
        `encoder_reuse=k` runs the encoder blocks on every k-th step only and reuses their output in between
        (DDT-style; approximate, about k-fold less encoder compute); `encoder_refresh` lists the steps that run it
        instead; `encoder_reuse=1` is exact. Unset, both come from the model's defaults (`encoder_refresh` applies
        at the default step count only). `encoder_trace`: a list that receives, per step, the encoder's output of
        each guidance branch (exact sampling; for `encoder_schedule.measure_drift`).

        `cache`: a training-free step cache (`FirstBlockCache`, `MagCache`, `TaylorSeer` from
        motif_video.model.step_cache) that skips the transformer's blocks on some steps; exact at threshold 0 /
        interval 1. Each guidance branch then runs as its own forward with its own cache history (so guidance is
        never batched), and afterwards `cache.computed` / `cache.skipped` count the transformer calls. It composes
        with encoder reuse: a step the cache skips runs nothing, and an encoder refresh that falls on it moves to
        the next step that runs the blocks.

        `callback(StepInfo)` runs after every step (`hooks.StepInfo`: step, timestep, latents, and with
        `preview=True` the predicted clean first frame as uint8). Returning True from it, or setting `interrupt`
        (a threading.Event), stops before the next step with `hooks.GenerationInterrupted`; nothing is decoded.
        `generator` may be a list with one generator per prompt: each clip's noise then depends on its own seed only,
        so a clip comes out the same whatever it is batched with.
        """
        d = self.defaults
        prompts = check_prompt(prompt)
        height = d.height if height is None else height
        width = d.width if width is None else width
        num_frames = d.num_frames if num_frames is None else num_frames
        steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = d.guidance_scale if guidance_scale is None else guidance_scale
        check_sampling(steps, scale, shift)
        check_video_size(height, width, num_frames, self.codec.temporal_factor,
                         self.codec.spatial_factor * self.transformer.config.patch_size)
        if output_type not in ("np", "pt", "pil", "latent"):
            raise MotifVideoError(f"output_type must be np, pt, pil or latent, got {output_type!r}")
        negative = d.negative_prompt if negative_prompt is None else negative_prompt
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negatives) != len(prompts):
            raise MotifVideoError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        batch = len(prompts)
        device = self.execution_device
        use_guidance = scale != 1.0

        # 1. First frame (I2V) and text
        first_frame = self._image_tensor(image, height, width) if image is not None else None
        self._activate(self.prompts.text_encoder)
        image_tokens = self._image_tokens(first_frame) if first_frame is not None else None
        # a step cache keeps one history per guidance branch, so the branches run as separate forwards
        batched = use_guidance and cache is None and self.guidance_branches is None \
            and (d.batch_guidance if batch_guidance is None else batch_guidance)
        dtype = next(self.transformer.parameters()).dtype
        conditions = [self.prompts.encode(prompts)] + ([self.prompts.encode(negatives)] if use_guidance else [])
        if batched:  # cond and uncond run as one batch through the transformer
            conditions = [pad_and_stack(conditions)]
        conditions = [(s.to(device, dtype), m.to(device) if m is not None else None) for s, m in conditions]
        if image_tokens is not None:
            image_tokens = image_tokens.to(device, dtype)

        # 2. Initial noise and the first frame's latent (I2V)
        latent_frames, latent_h, latent_w = self.codec.latent_shape(num_frames, height, width)
        shape = (batch, self.codec.latent_channels, latent_frames, latent_h, latent_w)
        if latents is None:
            latents = initial_noise(shape, generator)
        elif tuple(latents.shape) != shape:
            raise MotifVideoError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device, torch.float32)
        first_latent = None
        if first_frame is not None:
            self._activate(self.codec.vae)
            first_latent = self.codec.encode(first_frame).to(device)  # (1, 16, 1, H', W')

        # 3. Denoise
        shift = shift if shift is not None else (d.image_shift if first_frame is not None else d.shift)
        scheduler = make_scheduler(solver or d.solver, shift, steps, device=device)
        guidance = make_guidance(guider or d.guider, scale, norm_threshold=d.apg_norm_threshold,
                                 momentum=d.apg_momentum, eta=d.apg_eta) if use_guidance else None
        tracing = encoder_trace is not None  # exact sampling, with caches that expose every step's encoder output
        refresh = set(range(steps)) if tracing else self._encoder_refresh(steps, encoder_reuse, encoder_refresh)
        caches = [EncoderCache() if tracing or len(refresh) < steps else None for _ in conditions]
        step_caches = cache.begin(steps, len(conditions), d) if cache is not None else [None] * len(conditions)
        missed_refresh = [False] * len(conditions)  # an encoder refresh that fell on a step the step cache skipped
        self._activate(self.transformer)
        hooks = StepHooks(steps, callback, interrupt, progress, self._preview if preview else None)
        for i, t in enumerate(scheduler.timesteps):
            hooks.check(i)

            def branch(index: int, t=t, i=i, latents=latents) -> torch.Tensor:
                (text, text_mask), encoder_cache, step_cache = conditions[index], caches[index], step_caches[index]
                if encoder_cache is not None:
                    encoder_cache.refresh = i in refresh or missed_refresh[index]
                skipped_before = step_cache.skipped if step_cache is not None else 0
                copies = text.shape[0] // batch
                hidden = model_input(latents, first_latent).repeat(copies, 1, 1, 1, 1).to(dtype)
                images = image_tokens.expand(text.shape[0], -1, -1) if image_tokens is not None else None
                velocity = self.transformer(hidden, t.expand(hidden.shape[0]).to(device), text, text_mask, images,
                                            encoder_cache=encoder_cache, step_cache=step_cache).float()
                if encoder_cache is not None and step_cache is not None:
                    missed_refresh[index] = encoder_cache.refresh and step_cache.skipped > skipped_before
                return velocity

            if self.guidance_branches is not None:
                velocities = self.guidance_branches.run(branch, len(conditions))
            else:
                velocities = [branch(index) for index in range(len(conditions))]
            if encoder_trace is not None:
                encoder_trace.append([c.tokens.detach().cpu() for c in caches])
            velocity = torch.cat(velocities)
            if guidance is not None:
                velocity = guidance(*velocity.chunk(2))
            before, latents = latents, scheduler.step(velocity, t, latents, return_dict=False)[0]
            if not torch.isfinite(latents).all():  # NaN weights or an overflowing guidance: never a black video
                raise MotifVideoError(f"sampling produced NaN or infinite values at step {i + 1} of {steps} (broken "
                                      "weights, or a guidance scale / shift / dtype that overflows)")
            hooks.step_end(i, t, latents, before, velocity)
        hooks.close()

        if output_type == "latent":
            return latents
        # 4. Decode
        self._activate(self.codec.vae)
        video = self.codec.decode(latents)  # (B, 3, T, H, W) in [-1, 1]
        video = ((video + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4).cpu()  # (B, T, 3, H, W)
        if output_type == "pt":
            return video
        frames = video.permute(0, 1, 3, 4, 2).numpy()  # (B, T, H, W, 3)
        if output_type == "np":
            return frames
        from PIL import Image

        return [[Image.fromarray((f * 255).round().astype(np.uint8)) for f in clip] for clip in frames]

    def _preview(self, latents: torch.Tensor, velocity: torch.Tensor, sigma: float) -> np.ndarray:
        """The first frame of the predicted clean video, x0 = x_t - sigma * v, decoded alone (the causal VAE decodes
        its first latent frame on its own, so this costs one frame of decoding)."""
        self._activate(self.codec.vae)
        first = (latents[:, :, :1] - sigma * velocity[:, :, :1]).to(self.execution_device)
        frame = ((self.codec.decode(first)[:, :, 0] + 1) * 127.5).round().clamp(0, 255)  # (B, 3, H, W)
        self._activate(self.transformer)
        return frame.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()

    def _encoder_refresh(self, steps: int, reuse: int | None, refresh: list[int] | None) -> set[int]:
        """The steps that run the encoder: explicit steps, else an explicit reuse factor, else the model's
        calibrated schedule (at its step count), else its reuse factor."""
        d = self.defaults
        if refresh is not None:
            return set(check_refresh(refresh, steps))
        if reuse is None and d.encoder_refresh is not None and steps == d.num_inference_steps:
            return set(check_refresh(d.encoder_refresh, steps))
        return set(uniform_refresh(steps, d.encoder_reuse if reuse is None else reuse))

    def describe(self) -> dict:
        return {"defaults": asdict(self.defaults), "transformer": self.transformer.config.to_dict()}


def generate_to_file(pipe: MotifVideoPipeline, path: str | Path, fps: int | None = None, overwrite: bool = False,
                     **kwargs) -> dict:
    """Generate one clip and write it (mp4/gif/PNG folder); returns timing facts. No partial file on failure."""
    from .video_io import write_video

    start = time.perf_counter()
    frames = pipe(output_type="np", **kwargs)[0]
    write_video((frames * 255).round().astype(np.uint8), path, fps=pipe.defaults.fps if fps is None else fps,
                overwrite=overwrite)
    return {"seconds": time.perf_counter() - start, "frames": frames.shape[0], "height": frames.shape[1],
            "width": frames.shape[2]}
