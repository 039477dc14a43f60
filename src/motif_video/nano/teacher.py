"""The nano model's REPA teacher: a tiny transformers `VJEPA2Model` trained to recognise the nano attributes.

Motif aligns an early block with a frozen V-JEPA 2 encoder (`motif_video.alignment.VJEPA2Teacher`). No pretrained
V-JEPA 2 fits a CPU-only, offline nano build, so the nano recipe trains its own: the same architecture (3D RoPE,
tubelet 2), cut down to a few layers at patch 8 and crop 64, trained as a supervised classifier of colour, shape,
motion and size from its max-pooled patch tokens. The heads are thrown away; what is kept is an encoder whose patch
tokens separate exactly the semantics the nano captions name, which is what REPA should pull the student toward.

Inputs during training go through the same preprocessing as `VJEPA2Teacher.encode` (ImageNet normalisation of
[0, 1] RGB, odd frame counts padded by repeating the last frame), so the saved folder works unchanged with
`build_teacher(folder)`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..alignment import IMAGENET_MEAN, IMAGENET_STD
from ..errors import MotifVideoError
from ..files import atomic_dir
from .codec import _Cycler, load_items, lr_factor, split_heldout, to_pixels
from .data import COLORS, MOTIONS, SHAPES, SIZES

# Measured on the nano data (docs/nano_components.md). The predictor is never run (REPA uses the encoder) but is
# part of VJEPA2Model, so it is kept as small as the class allows.
TEACHER_CONFIG = {
    "crop_size": 64,
    "patch_size": 8,
    "tubelet_size": 2,
    "frames_per_clip": 18,
    "hidden_size": 96,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "mlp_ratio": 2.0,
    "pred_hidden_size": 32,
    "pred_num_attention_heads": 2,
    "pred_num_hidden_layers": 1,
    "pred_num_mask_tokens": 1,
    "pred_mlp_ratio": 2.0,
    "num_pooler_layers": 1,
}

# Attribute name -> class names; the order fixes the label ids.
ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "motion": MOTIONS, "size": SIZES}


def build_teacher_model(seed: int = 0, **overrides):
    """A freshly initialised nano `VJEPA2Model`; the same seed gives the same weights."""
    from transformers import VJEPA2Config, VJEPA2Model

    config = VJEPA2Config(**{**TEACHER_CONFIG, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VJEPA2Model(config)


def teacher_inputs(pixels: torch.Tensor, tubelet: int) -> torch.Tensor:
    """[-1, 1] (B, 3, T, H, W) -> the model's `pixel_values_videos` (B, T', 3, H, W), exactly as `VJEPA2Teacher`
    prepares them: ImageNet-normalised, T padded up to a multiple of the tubelet with copies of the last frame."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    x = ((pixels.float() + 1) / 2 - mean) / std
    frames = x.shape[2]
    padded = math.ceil(frames / tubelet) * tubelet
    if padded != frames:
        x = torch.cat([x, x[:, :, -1:].expand(-1, -1, padded - frames, -1, -1)], dim=2)
    return x.transpose(1, 2)  # (B, T', 3, H, W): VJEPA2Model takes frames before channels


class AttributeHeads(nn.Module):
    """One linear classifier per attribute on the pooled patch tokens (discarded after training).

    Max pooling by default: the shape covers a few of the 576 tokens, so a mean is nearly all background and the
    heads learn shape and motion far too slowly (measured: chance level after 3 minutes, against 95-100% with max
    pooling; docs/nano_components.md). With max pooling the gradient lands on the tokens that hold the object, which
    is where REPA wants the semantics.
    """

    def __init__(self, dim: int, pool: str = "max"):
        super().__init__()
        if pool not in ("max", "mean"):
            raise MotifVideoError(f"pool must be 'max' or 'mean', got {pool!r}")
        self.pool = pool
        self.heads = nn.ModuleDict({name: nn.Linear(dim, len(classes)) for name, classes in ATTRIBUTES.items()})

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = tokens.amax(1) if self.pool == "max" else tokens.mean(1)  # (B, D)
        return {name: head(pooled) for name, head in self.heads.items()}


def _labels(items) -> dict[str, torch.Tensor]:
    """Label ids per attribute; -100 (ignored by cross-entropy) for the motion of still images."""
    out = {}
    for name, classes in ATTRIBUTES.items():
        values = [getattr(it.attributes, name) for it in items]
        out[name] = torch.tensor([classes.index(v) if v is not None else -100 for v in values])
    return out


def _logits(model, heads, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs = teacher_inputs(pixels, model.config.tubelet_size)
    tokens = model(pixel_values_videos=inputs, skip_predictor=True).last_hidden_state  # (B, N, D)
    return heads(tokens)


def _loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    losses = [F.cross_entropy(logits[k], labels[k], ignore_index=-100) for k in ATTRIBUTES
              if (labels[k] != -100).any()]
    return torch.stack(losses).sum()


@torch.no_grad()
def attribute_accuracy(model, heads, items, batch_size: int = 16) -> dict[str, float]:
    """Fraction of `items` whose attribute the heads get right, per attribute (motion over clips only)."""
    model.eval()
    heads.eval()
    right = {k: 0 for k in ATTRIBUTES}
    count = {k: 0 for k in ATTRIBUTES}
    for kind in (False, True):  # clips and images stack separately (different frame counts)
        group = [it for it in items if it.is_image == kind]
        for k in range(0, len(group), batch_size):
            batch = group[k:k + batch_size]
            logits = _logits(model, heads, to_pixels([it.load() for it in batch]))
            labels = _labels(batch)
            for name in ATTRIBUTES:
                valid = labels[name] != -100
                right[name] += int((logits[name].argmax(-1)[valid] == labels[name][valid]).sum())
                count[name] += int(valid.sum())
    return {k: right[k] / count[k] for k in ATTRIBUTES if count[k]}


def train_teacher(
    data_dir_or_samples,
    out_dir,
    steps: int = 600,
    batch_size: int = 8,
    seed: int = 0,
    lr: float = 3e-3,
    progress: bool = True,
    time_budget_s: float | None = None,
    *,
    image_batch_size: int | None = None,
    weight_decay: float = 0.05,
    heldout_clips: int = 0,
    pool: str = "max",
    model_config: dict | None = None,
    log_every: int = 10,
) -> dict:
    """Train the nano teacher as an attribute classifier and save its `VJEPA2Model` (heads dropped) with
    `save_pretrained(out_dir)`; returns a summary (losses, timings, held-out accuracy when `heldout_clips` > 0).

    Each step sees `batch_size` whole clips and `image_batch_size` (default: batch_size // 4) still images, the
    kinds of input REPA will ask it to encode. `model_config` overrides entries of TEACHER_CONFIG. Learning rate: warm-up then cosine over `steps` or `time_budget_s`,
    whichever runs out first. Deterministic given the seed (and thread count) unless the time budget cuts it short.
    """
    if steps < 1 or batch_size < 1:
        raise MotifVideoError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if lr <= 0:
        raise MotifVideoError(f"lr must be positive, got {lr}")
    start = time.perf_counter()
    items = load_items(data_dir_or_samples)
    train_items, held = split_heldout(items, heldout_clips)
    clips = [i for i, it in enumerate(train_items) if not it.is_image]
    images = [i for i, it in enumerate(train_items) if it.is_image]
    crop = TEACHER_CONFIG["crop_size"]
    shape = train_items[0].load().shape[1:3]
    if tuple(shape) != (crop, crop):
        raise MotifVideoError(f"the nano teacher sees {crop}x{crop} frames (its RoPE grid is fixed), got "
                              f"{shape[0]}x{shape[1]}")
    image_batch_size = max(1, batch_size // 4) if image_batch_size is None else image_batch_size

    rng = np.random.default_rng(seed)
    clip_cycle, image_cycle = _Cycler(clips, rng), _Cycler(images, rng)
    model = build_teacher_model(seed, **(model_config or {})).train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        heads = AttributeHeads(model.config.hidden_size, pool).train()
    # The predictor never runs: leave it out of the optimiser so its (unused) weights stay as initialised.
    params = list(model.encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    from tqdm.auto import tqdm

    history, done = [], 0
    train_start = time.perf_counter()
    bar = tqdm(total=steps, desc="teacher", disable=not progress, unit="step")
    for step in range(steps):
        elapsed = time.perf_counter() - train_start
        if time_budget_s is not None and elapsed >= time_budget_s:
            break
        frac = max(step / steps, elapsed / time_budget_s if time_budget_s else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(frac, warmup=0.05, floor=0.05)
        opt.zero_grad(set_to_none=True)
        groups = []
        if clips:
            groups.append([train_items[i] for i in clip_cycle.take(batch_size)])
        if images and image_batch_size:
            groups.append([train_items[i] for i in image_cycle.take(image_batch_size)])
        total = sum(len(g) for g in groups)
        loss_value = 0.0
        for group_items in groups:
            loss = _loss(_logits(model, heads, to_pixels([it.load() for it in group_items])), _labels(group_items))
            (loss * len(group_items) / total).backward()
            loss_value += loss.item() * len(group_items) / total
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if not math.isfinite(loss_value):
            raise MotifVideoError(f"teacher training diverged at step {step} (loss {loss_value}); lower lr")
        history.append(loss_value)
        done = step + 1
        bar.update(1)
        if done % log_every == 0 or done == 1:
            bar.set_postfix(loss=f"{np.mean(history[-log_every:]):.3f}")
    bar.close()
    train_seconds = time.perf_counter() - train_start

    accuracy = attribute_accuracy(model, heads, held) if held else None
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        model.eval().save_pretrained(tmp, safe_serialization=True)
    return {
        "steps": done, "steps_requested": steps, "batch_size": batch_size, "image_batch_size": image_batch_size,
        "lr": lr, "seed": seed, "pool": pool, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "first_loss": history[0] if history else None,
        "final_loss": float(np.mean(history[-min(len(history), log_every):])) if history else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_accuracy": accuracy, "losses": [round(v, 4) for v in history],
    }
