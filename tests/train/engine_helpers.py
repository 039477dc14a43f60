"""Shared pieces of the training-engine tests: tiny cached-latent sets and configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from motif_video.train.cached import CachedSample, write_cached_samples
from motif_video.train.config import load_config

TEXT_DIM = 32  # motif-video-tiny's text_embed_dim
# The tiny preset at 128 wide: wide enough to pass a 2x2x16 latent patch through (used where the model must learn).
WIDE_TINY = {"num_attention_heads": 4, "attention_head_dim": 32, "rope_axes_dim": [8, 12, 12]}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second OpenMP thread spin-waits and runs 10-40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_samples(n_images: int = 4, n_videos: int = 4, *, hw: int = 4, video_frames: int = 2, text_dim: int = TEXT_DIM,
                 seed: int = 0, teacher_dim: int | None = None) -> list[CachedSample]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n_images + n_videos):
        frames = 1 if i < n_images else video_frames
        length = 3 + i % 4  # captions of different lengths: padding and masks are exercised
        teacher = grid = None
        if teacher_dim is not None:
            grid = (frames, hw, hw)  # a teacher grid twice the student's (hw/2): resampling is exercised
            teacher = torch.randn(frames * hw * hw, teacher_dim, generator=gen)
        samples.append(CachedSample(
            latents=torch.randn(16, frames, hw, hw, generator=gen), text=torch.randn(length, text_dim, generator=gen),
            caption=f"clip {i}", teacher=teacher, teacher_grid=grid))
    return samples


def make_cache(folder: Path, *, teacher: str | None = None, empty_prompt: bool = True, **kwargs) -> Path:
    samples = make_samples(**kwargs)
    text_dim = samples[0].text.shape[1]
    empty = (torch.randn(2, text_dim, generator=torch.Generator().manual_seed(99)), torch.ones(2)) \
        if empty_prompt else None
    return write_cached_samples(folder, samples, empty_prompt=empty, teacher=teacher)


def base_config(tmp_path: Path, cache: Path, **sections) -> dict:
    """A fast tiny-model config as a dict; `sections` replace whole top-level keys."""
    raw = {
        "output_dir": str(tmp_path / "run"),
        "seed": 3,
        "model": {"preset": "motif-video-tiny", "overrides": {"image_embed_dim": None}},
        "data": {"cache_dirs": [str(cache)], "batch_size": 2},
        "optim": {"lr": 1e-3, "steps": 4, "warmup_steps": 1},
        "ema": {"enabled": True, "decay": 0.9},
        "logging": {"every": 1, "tensorboard": None, "progress": False},
        "checkpointing": {"every": 2, "keep_last": 5},
    }
    raw.update(sections)
    return raw


def build_config(tmp_path: Path, cache: Path, overrides: list[str] | None = None, **sections):
    return load_config(data=base_config(tmp_path, cache, **sections), overrides=overrides)


def read_log(run: Path) -> dict[int, dict]:
    """Training log lines (not validation) by step."""
    out = {}
    for line in (Path(run) / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record
    return out
