"""Server settings, what the server knows about its model, and the checks a video request passes before it is queued.

Every check here runs at submission, so a job that is accepted can run: sizes the model takes, frame counts 4k+1,
the configured limits, and the memory the estimator (motif_video.commands.estimate) says one generation needs
against what the device had free once the model was loaded. On CPU an out-of-memory kills the whole process, so
refusing up front is the only defence there.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
# Extensions of LoRA files offered from --lora-dir.
LORA_EXTENSIONS = (".safetensors",)
MAX_SEED = 2**31 - 1


@dataclass
class ServeSettings:
    data_dir: Path
    api_key: str | None = None
    max_queue: int = 32  # queued + running jobs
    max_batch: int = 1  # jobs generated together in one pipeline call
    max_frames: int | None = None
    max_pixels: int | None = None  # height x width
    max_steps: int = 100
    job_timeout_s: float = 3600.0
    keep_outputs: int | None = 200  # finished jobs kept (newest first)
    keep_age_s: float | None = None  # finished jobs older than this are deleted
    lora_dir: Path | None = None
    max_upload_bytes: int = 10 * 2**20
    memory_fraction: float = 0.9  # share of the free memory (after loading) a job may plan to use
    shutdown_grace_s: float = 10.0  # on SIGTERM, how long the running job may take to finish before re-queueing
    preview: bool = True  # decode a preview frame after every step


class ApiError(Exception):
    """An HTTP error with the OpenAI error body {error: {message, type, code}}."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": self.param}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code, param=param)


@dataclass
class ModelInfo:
    """The loaded model as the request checks and the UI see it."""

    name: str
    config: object  # TransformerConfig
    defaults: dict
    fps: int
    spatial_multiple: int  # sizes must be multiples of this (VAE factor x patch size)
    temporal_factor: int  # frames must be temporal_factor * k + 1
    dtype: str  # estimator dtype name: fp32 / bf16 / fp16
    device: str
    memory_budget_bytes: int  # activation memory one pipeline call may use
    image_tokens: int  # SigLIP tokens an input image adds (0: the model takes no image tokens)
    created: int = 0

    @classmethod
    def from_pipeline(cls, pipe, name: str, settings: ServeSettings) -> "ModelInfo":
        import time

        import torch

        config = pipe.transformer.config
        dtype = next(pipe.transformer.parameters()).dtype
        dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        device = pipe.execution_device
        vision = getattr(pipe.prompts.text_encoder, "vision_tower", None)
        image_tokens = 0
        if vision is not None and config.image_embed_dim is not None:
            image_tokens = (vision.config.image_size // vision.config.patch_size) ** 2
        return cls(name=name, config=config, defaults=asdict(pipe.defaults), fps=int(pipe.defaults.fps),
                   spatial_multiple=pipe.codec.spatial_factor * config.patch_size,
                   temporal_factor=pipe.codec.temporal_factor, dtype=dtype_name, device=str(device),
                   memory_budget_bytes=int(free_memory_bytes(device) * settings.memory_fraction),
                   image_tokens=image_tokens, created=int(time.time()))

    def activation_bytes(self, height: int, width: int, frames: int, steps: int, guidance: bool,
                         image: bool, prompts: int = 1) -> int:
        """Peak transformer activation memory of one call, from the estimator (text padded to the model's maximum
        prompt length, so an upper bound)."""
        from ..commands.estimate import estimate

        d = self.defaults
        reuse = 2 if (d["encoder_reuse"] > 1 or d["encoder_refresh"]) and self.config.num_decoder_layers else 1
        result = estimate(self.config, height, width, frames, dtypes=(self.dtype,), steps=steps, guidance=guidance,
                          text_tokens=d["max_sequence_length"], image_tokens=self.image_tokens if image else 0,
                          prompts=prompts, encoder_reuse=reuse)
        return int(result["memory"][self.dtype]["activations"]["bytes"])

    def fitting_batch(self, params: dict, limit: int) -> int:
        """How many jobs like `params` fit in one call (at least 1: the job itself was checked at submission)."""
        batch = 1
        while batch < limit and self.activation_bytes(params["height"], params["width"], params["num_frames"],
                                                      params["num_inference_steps"], params["guidance_scale"] != 1.0,
                                                      False, batch + 1) <= self.memory_budget_bytes:
            batch += 1
        return batch

    def public(self) -> dict:
        d = self.defaults
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "motif-video",
                "defaults": {"size": f"{d['width']}x{d['height']}", "num_frames": d["num_frames"],
                             "seconds": seconds_of(d["num_frames"], self.fps), "fps": self.fps,
                             "num_inference_steps": d["num_inference_steps"],
                             "guidance_scale": d["guidance_scale"], "negative_prompt": d["negative_prompt"]},
                "size_multiple": self.spatial_multiple, "frames_rule": f"{self.temporal_factor}k+1",
                "image_to_video": True, "device": self.device}


def free_memory_bytes(device) -> int:
    """Memory free for activations right now: the accelerator's free memory, or the host's available RAM."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def seconds_of(frames: int, fps: int) -> str:
    return f"{frames / fps:g}"


def frames_for_seconds(seconds: float, fps: int, temporal: int) -> int:
    """The valid frame count (temporal*k + 1) nearest to seconds x fps; ties go to the longer clip."""
    k = max(0, math.floor((seconds * fps - 1) / temporal + 0.5))
    return temporal * k + 1


def lora_files(lora_dir: Path | None) -> dict[str, Path]:
    """name -> file for every LoRA file directly inside lora_dir. Requests name LoRAs; paths never come from them."""
    if lora_dir is None or not lora_dir.is_dir():
        return {}
    return {p.stem: p for p in sorted(lora_dir.iterdir()) if p.is_file() and p.suffix in LORA_EXTENSIONS}


# -- request parsing ----------------------------------------------------------------------------------------------
def _number(fields: dict, name: str, kind, low=None, high=None):
    value = fields.get(name)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise bad_request(f"{name} must be a number", name)
    try:
        number = kind(value)
        if kind is int and isinstance(value, float) and value != number:
            raise ValueError
    except (TypeError, ValueError):
        raise bad_request(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}",
                          name) from None
    if isinstance(number, float) and not math.isfinite(number):
        raise bad_request(f"{name} must be finite", name)
    if low is not None and number < low:
        raise bad_request(f"{name} must be >= {low}, got {number}", name)
    if high is not None and number > high:
        raise bad_request(f"{name} must be <= {high}, got {number}", name)
    return number


def _loras(value, available: dict[str, Path], supported: bool) -> list[list]:
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise bad_request("loras must be a JSON list of {name, scale}", "loras") from None
    if not isinstance(value, list):
        raise bad_request("loras must be a list of {name, scale}", "loras")
    if not supported:
        raise bad_request("LoRA loading is unavailable: this pipeline has no load_lora_weights/set_adapters",
                          "loras", code="lora_unavailable")
    out = []
    for item in value:
        name, scale = (item, 1.0) if isinstance(item, str) else (
            (item.get("name"), item.get("scale", 1.0)) if isinstance(item, dict) else (None, None))
        if not isinstance(name, str) or not name:
            raise bad_request("each LoRA is a name or {name, scale}", "loras")
        if name not in available:
            offered = ", ".join(available) or "none (start the server with --lora-dir)"
            raise bad_request(f"unknown LoRA {name!r}; available: {offered}", "loras", code="lora_not_found")
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise bad_request(f"LoRA scale must be a number, got {scale!r}", "loras") from None
        if not math.isfinite(scale) or abs(scale) > 10:
            raise bad_request("LoRA scale must be finite and within [-10, 10]", "loras")
        if any(name == n for n, _ in out):
            raise bad_request(f"LoRA {name!r} is listed twice", "loras")
        out.append([name, scale])
    return sorted(out)


def parse_video_request(fields: dict, model: ModelInfo, settings: ServeSettings, *, has_image: bool,
                        loras_supported: bool) -> dict:
    """Validated, fully resolved job settings (model defaults filled in, seed drawn if unset)."""
    d = model.defaults
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("prompt is required and must be a non-empty string", "prompt", code="empty_prompt")
    if len(prompt) > 4000:
        raise bad_request("prompt is longer than 4000 characters", "prompt")
    requested_model = fields.get("model")
    if requested_model not in (None, "", model.name):
        raise ApiError(404, f"model {requested_model!r} is not served here; this server serves {model.name!r}",
                       "model_not_found", param="model")
    negative = fields.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise bad_request("negative_prompt must be a string", "negative_prompt")

    size = fields.get("size")
    if size in (None, ""):
        width, height = d["width"], d["height"]
    else:
        match = SIZE_PATTERN.match(str(size))
        if not match:
            raise bad_request(f"size must be WIDTHxHEIGHT, e.g. {d['width']}x{d['height']}; got {size!r}", "size")
        width, height = int(match[1]), int(match[2])
    m = model.spatial_multiple
    if width < m or height < m or width % m or height % m:
        raise bad_request(f"width and height must be positive multiples of {m}, got {width}x{height}", "size",
                          code="invalid_size")

    num_frames = _number(fields, "num_frames", int, low=1)
    seconds = _number(fields, "seconds", float, low=0)
    if num_frames is not None and seconds is not None:
        raise bad_request("give seconds or num_frames, not both", "seconds")
    t = model.temporal_factor
    if num_frames is None:
        num_frames = frames_for_seconds(seconds, model.fps, t) if seconds is not None else d["num_frames"]
    if (num_frames - 1) % t:
        raise bad_request(f"num_frames must be {t}k+1 (e.g. {t * 4 + 1}, {t * 8 + 1}), got {num_frames}", "num_frames",
                          code="invalid_frames")

    steps = _number(fields, "num_inference_steps", int, low=1) or d["num_inference_steps"]
    guidance = _number(fields, "guidance_scale", float, low=0, high=100)
    guidance = d["guidance_scale"] if guidance is None else guidance
    seed = _number(fields, "seed", int, low=0, high=MAX_SEED)
    seed = random.SystemRandom().randint(0, MAX_SEED) if seed is None else seed
    loras = _loras(fields.get("loras"), lora_files(settings.lora_dir), loras_supported)

    if settings.max_frames is not None and num_frames > settings.max_frames:
        raise bad_request(f"{num_frames} frames is over this server's limit of {settings.max_frames}", "num_frames",
                          code="limit_exceeded")
    if settings.max_pixels is not None and width * height > settings.max_pixels:
        raise bad_request(f"{width}x{height} is over this server's limit of {settings.max_pixels} pixels per frame",
                          "size", code="limit_exceeded")
    if steps > settings.max_steps:
        raise bad_request(f"{steps} steps is over this server's limit of {settings.max_steps}", "num_inference_steps",
                          code="limit_exceeded")
    from ..errors import MotifVideoError

    try:
        need = model.activation_bytes(height, width, num_frames, steps, guidance != 1.0, has_image)
    except MotifVideoError as e:
        raise bad_request(str(e), "size", code="invalid_size") from None
    if need > model.memory_budget_bytes:
        raise bad_request(f"{width}x{height} with {num_frames} frames needs about {need / 2**30:.1f} GiB of "
                          f"activations, more than the {model.memory_budget_bytes / 2**30:.1f} GiB this server "
                          f"has free; use a smaller size or fewer frames", "size", code="too_large")
    return {"prompt": prompt, "negative_prompt": negative, "width": width, "height": height,
            "num_frames": num_frames, "seconds": seconds_of(num_frames, model.fps), "num_inference_steps": steps,
            "guidance_scale": guidance, "seed": seed, "loras": loras, "has_image": has_image, "model": model.name}


def batch_key(params: dict) -> str | None:
    """Jobs with equal keys may run in one pipeline call: everything but the prompt and the seed agrees. Jobs with
    an image never batch (the pipeline takes one first frame per call)."""
    if params["has_image"]:
        return None
    keys = ("width", "height", "num_frames", "num_inference_steps", "guidance_scale", "negative_prompt", "loras")
    return json.dumps([params[k] for k in keys])


__all__ = ["ApiError", "ModelInfo", "ServeSettings", "batch_key", "parse_video_request"]
