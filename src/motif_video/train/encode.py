"""Encoding a clip dataset once into the cached-latent format (`motif-video cache`, and the nano recipe)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..model_folder import CONDITIONING_PARTS, ModelFolder, default_device_dtype
from ..pipeline.text import PromptEncoder, text_length
from ..pipeline.vae import LatentCodec
from .buckets import BucketSet
from .cached import CachedLatentWriter, CachedSample
from .data import ClipDataset


def encode_dataset(data, output, model, buckets: BucketSet, *, fps: float | None = None, teacher=None,
                   batch_size: int = 8, limit: int | None = None, device: str | None = None,
                   progress: bool = True) -> tuple[int, int, Path]:
    """Encode `data` (folder or CSV/JSONL) with `model`'s VAE and text encoder (+ a REPA teacher folder) into
    `output`. Returns (samples written, unreadable clips skipped, cache folder)."""
    folder = ModelFolder(model, required=CONDITIONING_PARTS)
    device, dtype = default_device_dtype(device, None)
    codec = LatentCodec(folder.load("vae", torch_dtype=torch.float32).eval().to(device))
    prompts = PromptEncoder(folder.tokenizer(), folder.text_encoder(dtype).to(device),
                            max_length=folder.defaults.max_sequence_length)
    teacher_model = None
    if teacher:
        from ..alignment import build_teacher

        teacher_model = build_teacher(teacher).to(device)

    data = Path(data)
    make = ClipDataset.from_metadata if data.suffix.lower() in (".csv", ".jsonl") else ClipDataset.from_folder
    dataset = make(data, buckets, fps=fps, random_start=False)

    # Batches of one bucket each, so pixels stack.
    by_bucket: dict[int, list[int]] = {}
    for i, b in enumerate(dataset.bucket_of):
        by_bucket.setdefault(b, []).append(i)
    batches, total = [], 0
    for members in by_bucket.values():
        members = members[: max(0, limit - total)] if limit is not None else members
        total += len(members)
        batches += [members[k:k + batch_size] for k in range(0, len(members), batch_size)]

    writer = CachedLatentWriter(output, text_encoder=str(folder.component_path("text_encoder")),
                                teacher=str(teacher) if teacher else None)
    written = 0
    with torch.no_grad(), tqdm(total=total, desc="caching", disable=not progress) as bar:
        for batch in batches:
            items = [dataset[i] for i in batch]
            pixels = torch.stack([item["pixels"] for item in items]).to(device)  # (B, 3, T, H, W)
            latents = codec.encode(pixels).cpu()
            states, mask = prompts.encode([item["caption"] for item in items])
            lengths = [text_length(m) for m in mask] if mask is not None else [states.shape[1]] * len(items)
            features = grid = None
            if teacher_model is not None:
                features, grid = teacher_model.encode(pixels)
            for j, item in enumerate(items):
                writer.add(CachedSample(
                    latents=latents[j], text=states[j, : int(lengths[j])].float().cpu(), caption=item["caption"],
                    bucket=str(item["bucket"]),
                    teacher=features[j].float().cpu() if features is not None else None,
                    teacher_grid=tuple(grid) if grid is not None else None,
                ))
                written += 1
            bar.update(len(items))
        empty, _ = prompts.encode([""])
        writer.set_empty_prompt(empty[0].float().cpu())
    return written, dataset.num_skipped, writer.close()
