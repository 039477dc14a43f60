"""REPA (Yu et al., ICLR 2025): align one early block's video tokens with a frozen vision encoder's patch features.

A small per-token MLP projects the student's hidden state into the teacher's feature space; the loss is the mean
negative cosine similarity to the teacher's patch tokens, resampled onto the student's (t, h, w) token grid. Motif
used DINOv2 for the image-only stage 1 and V-JEPA for stages 2-3, then switched REPA off (HASTE: alignment helps
early and hurts late). The model only exposes `capture_block`; everything here belongs to training.

A teacher is any object with `dim` (feature width) and `encode(pixels (B, 3, T, H, W) in [-1, 1]) -> (tokens (B, N,
dim), grid (t, h, w))`, tokens in t-major grid order; the two below wrap transformers' DINOv2 and V-JEPA 2.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MotifVideoError
from .routing import TokenRoute, gather_tokens

Grid = tuple[int, int, int]

# Both teachers were trained on ImageNet-normalised RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Teacher(Protocol):
    dim: int

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Grid]: ...


# -- student side -------------------------------------------------------------------------------------------------
class RepaProjector(nn.Sequential):
    """Per-token MLP hidden -> projector_dim -> SiLU -> projector_dim -> SiLU -> teacher_dim (REPA's projector)."""

    def __init__(self, hidden_size: int, teacher_dim: int, projector_dim: int = 2048):
        super().__init__(
            nn.Linear(hidden_size, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, projector_dim), nn.SiLU(),
            nn.Linear(projector_dim, teacher_dim),
        )


def resample_tokens(tokens: torch.Tensor, grid: Grid, target_grid: Grid) -> torch.Tensor:
    """(B, t*h*w, D) on `grid` -> (B, t'*h'*w', D) on `target_grid`, trilinear; unchanged when the grids match."""
    grid, target_grid = tuple(int(n) for n in grid), tuple(int(n) for n in target_grid)
    if tokens.dim() != 3 or tokens.shape[1] != math.prod(grid):
        raise MotifVideoError(
            f"tokens {tuple(tokens.shape)} do not fill a {grid} grid (expected (B, {math.prod(grid)}, D))")
    if grid == target_grid:
        return tokens
    batch, _, dim = tokens.shape
    volume = tokens.reshape(batch, *grid, dim).permute(0, 4, 1, 2, 3)  # (B, D, t, h, w)
    # Trilinear with align_corners=False treats tokens as cell centres, so grids of different sizes cover the same
    # extent of the clip; an exact 2x downsample averages 2x2x2 neighbours.
    volume = F.interpolate(volume.float(), size=target_grid, mode="trilinear", align_corners=False)
    return volume.flatten(2).transpose(1, 2).to(tokens.dtype)  # (B, t'*h'*w', D)


def kept_at_block(route: TokenRoute | None, block: int) -> torch.Tensor | None:
    """The `kept` indices to pass to `RepaAligner.loss` for tokens captured after `block` under `route`.

    Inside [start_layer, end_layer) the model returns only the kept tokens; before or after the route, all of them.
    """
    if route is not None and route.start_layer <= block < route.end_layer:
        return route.kept
    return None


class RepaAligner(nn.Module):
    """The trainable half of REPA: the projector, and the loss against a teacher's tokens."""

    def __init__(self, hidden_size: int, teacher_dim: int, projector_dim: int = 2048):
        super().__init__()
        self.projector = RepaProjector(hidden_size, teacher_dim, projector_dim)

    def loss(self, student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, student_grid: Grid, teacher_grid: Grid,
             kept: torch.Tensor | None = None) -> torch.Tensor:
        """Mean negative cosine similarity (in [-1, 1]) between projected student tokens and teacher tokens.

        student_tokens (B, N_s, D): a block's video tokens (`capture_block`); inside a TREAD route only the kept
        tokens, in `kept` (B, N_kept) order. teacher_tokens (B, N_t, D_t) on `teacher_grid`, resampled to
        `student_grid` (the full token grid, before routing).
        """
        target = resample_tokens(teacher_tokens, teacher_grid, student_grid)  # (B, N_full, D_t)
        if kept is not None:
            target = gather_tokens(target, kept.to(target.device))  # (B, N_kept, D_t)
        if student_tokens.shape[:2] != target.shape[:2]:
            raise MotifVideoError(
                f"REPA: student tokens {tuple(student_tokens.shape)} do not match the teacher's "
                f"{tuple(target.shape)} after resampling to grid {tuple(student_grid)}"
                + (" and gathering the kept tokens" if kept is not None else ""))
        projected = self.projector(student_tokens)
        similarity = F.cosine_similarity(projected.float(), target.float().detach(), dim=-1)  # (B, N)
        return -similarity.mean()

    forward = loss


# -- teachers -----------------------------------------------------------------------------------------------------
def _hf_model(config_or_model, expected_types: dict[str, str], what: str) -> nn.Module:
    """A transformers model from a model instance or a config (random weights: tests and custom inits)."""
    import transformers

    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in expected_types:
        raise MotifVideoError(
            f"{what} teacher needs a config of type {' or '.join(expected_types)}, got {model_type!r}")
    if isinstance(config_or_model, nn.Module):
        if type(config_or_model).__name__ != expected_types[model_type]:
            raise MotifVideoError(f"{what} teacher wraps a {expected_types[model_type]}, got "
                                  f"{type(config_or_model).__name__}")
        return config_or_model
    return getattr(transformers, expected_types[model_type])(config)


def _load_pretrained(name_or_folder, expected_types: dict[str, str], what: str) -> nn.Module:
    import transformers

    from .hub import resolve_model_dir

    folder = resolve_model_dir(name_or_folder)
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise MotifVideoError(f"{folder} is not a transformers model folder: {e}") from None
    if config.model_type not in expected_types:
        raise MotifVideoError(f"{name_or_folder} is a {config.model_type!r} model; the {what} teacher needs "
                              f"{' or '.join(expected_types)}")
    return getattr(transformers, expected_types[config.model_type]).from_pretrained(folder)


def _patch(config) -> int:
    p = config.patch_size
    return int(p if isinstance(p, int) else p[0])


class _FrozenTeacher(nn.Module):
    """A frozen encoder: eval mode for good (no dropout, even after `.train()`), no parameter ever needs a grad."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.dim = int(model.config.hidden_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> "_FrozenTeacher":
        return super().train(False)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """[-1, 1] video (B, 3, T, H, W) -> ImageNet-normalised float32."""
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise MotifVideoError(f"teacher input must be RGB video (B, 3, T, H, W), got {tuple(pixels.shape)}")
        return ((pixels.float() + 1) / 2 - self.mean.float()) / self.std.float()

    def _model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


class Dinov2Teacher(_FrozenTeacher):
    """DINOv2 (with or without registers) on each frame: final-LayerNorm patch tokens, CLS/register tokens dropped.

    Frames are resized (bicubic, as DINOv2's processor) so the short side is `image_size`, both sides rounded to the
    patch size; DINOv2 interpolates its position embeddings to any grid, so the aspect ratio is kept.
    """

    _TYPES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}

    def __init__(self, config_or_model, image_size: int = 224):
        super().__init__(_hf_model(config_or_model, self._TYPES, "DINOv2"))
        self.image_size = int(image_size)
        self.patch = _patch(self.model.config)
        self.num_prefix = 1 + int(getattr(self.model.config, "num_register_tokens", 0))

    @classmethod
    def from_pretrained(cls, name_or_folder, **kwargs) -> "Dinov2Teacher":
        return cls(_load_pretrained(name_or_folder, cls._TYPES, "DINOv2"), **kwargs)

    def _size(self, height: int, width: int) -> tuple[int, int]:
        scale = self.image_size / min(height, width)
        return tuple(max(self.patch, round(n * scale / self.patch) * self.patch) for n in (height, width))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = self._normalise(pixels)
        batch, _, frames, height, width = x.shape
        x = x.transpose(1, 2).flatten(0, 1)  # (B*T, 3, H, W): DINOv2 sees frames independently
        size = self._size(height, width)
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        out = self.model(pixel_values=x.to(self._model_dtype())).last_hidden_state  # (B*T, prefix + h*w, D)
        tokens = out[:, self.num_prefix:]
        grid = (frames, size[0] // self.patch, size[1] // self.patch)
        if tokens.shape[1] != grid[1] * grid[2]:
            raise MotifVideoError(f"DINOv2 returned {tokens.shape[1]} patch tokens, expected {grid[1]}x{grid[2]}")
        return tokens.reshape(batch, frames * tokens.shape[1], -1), grid  # (B, T*h*w, D), t-major


class VJEPA2Teacher(_FrozenTeacher):
    """V-JEPA 2's encoder (transformers `VJEPA2Model`, predictor skipped): tubelet 2 x patch 16 tokens.

    Its 3D RoPE derives (h, w) positions from `crop_size`, so every clip it sees must be exactly crop_size square.
    A non-square frame is resized so its short side is `crop_size` and covered by the fewest square crops that
    span the long side (overlapping by whole patches); their tokens are stitched onto one grid, overlaps averaged.
    This keeps the aspect ratio and the whole frame, so the grid lines up with the student's after resampling.
    Odd frame counts are padded by repeating the last frame so no frame falls out of a tubelet.
    """

    _TYPES = {"vjepa2": "VJEPA2Model"}

    def __init__(self, config_or_model, crop_size: int | None = None):
        super().__init__(_hf_model(config_or_model, self._TYPES, "V-JEPA 2"))
        config = self.model.config
        self.patch = _patch(config)
        self.tubelet = int(config.tubelet_size)
        self.crop_size = int(crop_size or config.crop_size)
        if self.crop_size != config.crop_size:
            raise MotifVideoError(
                f"V-JEPA 2 crop_size {self.crop_size} differs from the model's {config.crop_size}: its RoPE grid is "
                f"fixed by the config")

    @classmethod
    def from_pretrained(cls, name_or_folder, **kwargs) -> "VJEPA2Teacher":
        return cls(_load_pretrained(name_or_folder, cls._TYPES, "V-JEPA 2"), **kwargs)

    def _layout(self, height: int, width: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """Resized (H, W) and the token offsets (row, col) of the square crops that cover it."""
        side, patch = self.crop_size, self.patch
        scale = side / min(height, width)
        size = tuple(max(side, round(n * scale / patch) * patch) for n in (height, width))
        crop_tokens = side // patch
        long_axis = 0 if size[0] > size[1] else 1
        long_tokens = size[long_axis] // patch
        count = math.ceil(long_tokens / crop_tokens)
        starts = [round(i * (long_tokens - crop_tokens) / (count - 1)) if count > 1 else 0 for i in range(count)]
        offsets = [(s, 0) if long_axis == 0 else (0, s) for s in starts]
        return size, offsets

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x = self._normalise(pixels)
        batch, _, frames, height, width = x.shape
        padded = math.ceil(frames / self.tubelet) * self.tubelet
        if padded != frames:
            x = torch.cat([x, x[:, :, -1:].expand(-1, -1, padded - frames, -1, -1)], dim=2)
        size, offsets = self._layout(height, width)
        if size != (height, width):
            x = F.interpolate(x.transpose(1, 2).flatten(0, 1), size=size, mode="bilinear", align_corners=False,
                              antialias=True)  # (B*T, 3, H', W')
            x = x.unflatten(0, (batch, padded)).transpose(1, 2)  # (B, 3, T, H', W')
        patch, crop_tokens = self.patch, self.crop_size // self.patch
        crops = [x[..., r * patch:r * patch + self.crop_size, c * patch:c * patch + self.crop_size]
                 for r, c in offsets]
        clips = torch.cat(crops, dim=0).transpose(1, 2)  # (n*B, T, 3, S, S): VJEPA2Model takes frames before channels
        out = self.model(pixel_values_videos=clips.to(self._model_dtype()), skip_predictor=True).last_hidden_state
        t = padded // self.tubelet
        out = out.reshape(len(offsets), batch, t, crop_tokens, crop_tokens, -1)  # (n, B, t, g, g, D)
        grid = (t, size[0] // patch, size[1] // patch)
        total = out.new_zeros(batch, *grid, out.shape[-1])
        count = out.new_zeros(1, 1, grid[1], grid[2], 1)
        for (r, c), tile in zip(offsets, out):
            total[:, :, r:r + crop_tokens, c:c + crop_tokens] += tile
            count[:, :, r:r + crop_tokens, c:c + crop_tokens] += 1
        return (total / count).flatten(1, 3), grid  # (B, t*h*w, D), t-major


def build_teacher(name_or_path, **kwargs) -> _FrozenTeacher:
    """A frozen REPA teacher from a folder or hub id, chosen by its config's model_type."""
    import transformers

    from .hub import resolve_model_dir

    folder = resolve_model_dir(name_or_path)
    try:
        model_type = transformers.AutoConfig.from_pretrained(folder).model_type
    except (OSError, ValueError) as e:
        raise MotifVideoError(f"{folder} is not a transformers model folder: {e}") from None
    for cls in (Dinov2Teacher, VJEPA2Teacher):
        if model_type in cls._TYPES:
            return cls.from_pretrained(folder, **kwargs)
    raise MotifVideoError(f"no REPA teacher for model_type {model_type!r}; use a DINOv2 or V-JEPA 2 model")
