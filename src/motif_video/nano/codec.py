"""The nano model's latent codec: a small diffusers `AutoencoderKLWan` trained from scratch on the nano shapes.

Same structure as the Wan 2.1 VAE the release uses (z = 16, causal 3D convolutions, 4x temporal and 8x spatial
compression, frame 0 encoded alone), so the pipeline, `LatentCodec` and the cached-latent tools treat it exactly
like the real one; only the widths are cut down (base 16 channels instead of 96, one residual block per level),
which is plenty for one flat-coloured shape on a dark background.

Training sees short clip windows (`window` frames, 4k+1) rather than whole 17-frame clips: the encoder is causal and
works in chunks of 1 + 4 + 4 + ... frames, so a 9-frame window already exercises every kind of chunk (the lone first
frame, a chunk whose cache comes from the first frame, one whose cache comes from a full chunk) at half the cost.
Every window starts with a frame encoded alone, as images are, and 1-frame images are trained in the same step.
After training, the per-channel mean and std of the posterior mode over a sample of the data go into the config
(`latents_mean` / `latents_std`), which is what `LatentCodec` normalises with.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import MotifVideoError
from ..files import atomic_dir
from ..latents import LATENT_CHANNELS, VAE_SPATIAL, VAE_TEMPORAL
from .data import BACKGROUND, Attributes, Sample

# Measured on the nano data (docs/nano_components.md): 2.6 M parameters, 5.2 MB as fp16 safetensors.
COLOUR_CHANNELS = 3  # latent channels the colour alignment term ties to the cell's RGB (`colour_alignment_loss`)
CODEC_CONFIG = {
    "base_dim": 8,
    "z_dim": LATENT_CHANNELS,
    "dim_mult": [1, 2, 4, 8],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}


# ----------------------------------------------------------------------------------------------------------------
# Data: a nano folder (metadata.jsonl) or in-memory samples, shared with the teacher
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NanoItem:
    """One clip or image: its ground-truth attributes and where its frames come from (a file or an array)."""

    attributes: Attributes
    num_frames: int
    path: Path | None = None
    frames: np.ndarray | None = None  # (T, H, W, 3) uint8

    @property
    def is_image(self) -> bool:
        return self.num_frames == 1

    def load(self) -> np.ndarray:
        if self.frames is not None:
            return self.frames
        from ..pipeline.video_io import read_video

        frames = read_video(self.path)
        return frames[:1] if self.is_image else frames


def load_items(data_dir_or_samples) -> list[NanoItem]:
    """Items from a `motif-video nano-data` folder (its metadata.jsonl) or from `Sample`s (`make_clip`,
    `make_image`). Frames of a folder are decoded when used, so a large dataset costs no memory up front."""
    if isinstance(data_dir_or_samples, (str, Path)):
        return _items_from_folder(Path(data_dir_or_samples))
    items = []
    for sample in data_dir_or_samples:
        if not isinstance(sample, Sample):
            raise MotifVideoError(f"expected a nano data folder or nano Samples, got a {type(sample).__name__}")
        frames = np.ascontiguousarray(sample.frames, dtype=np.uint8)
        items.append(NanoItem(sample.attributes, int(frames.shape[0]), frames=frames))
    if not items:
        raise MotifVideoError("no nano samples given")
    return items


def _items_from_folder(folder: Path) -> list[NanoItem]:
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise MotifVideoError(f"{folder} has no metadata.jsonl; write one with `motif-video nano-data {folder}`")
    items = []
    for line_no, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            a = row["attributes"]
            attrs = Attributes(a["color"], a["shape"], a["size"], a.get("motion"))
            frames = int(row.get("num_frames") or 1)
            path = folder / row["path"]
        except (ValueError, KeyError, TypeError) as e:
            raise MotifVideoError(f"{meta}:{line_no}: not a nano metadata row ({e})") from None
        items.append(NanoItem(attrs, 1 if attrs.motion is None else frames, path=path))
    if not items:
        raise MotifVideoError(f"{meta} lists no samples")
    return items


def to_pixels(frames: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 clips, each (T, H, W, 3), -> float (B, 3, T, H, W) in [-1, 1] (the VAE's and the teachers' range)."""
    x = torch.from_numpy(np.stack(frames)).permute(0, 4, 1, 2, 3)  # (B, 3, T, H, W)
    return x.float() / 127.5 - 1.0


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (B, 3, T, H, W) -> uint8 (B, T, H, W, 3), rounded as a video writer would."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


class _Cycler:
    """Indices in a fresh seeded permutation each epoch, so every sample is seen once before any repeats."""

    def __init__(self, indices: Sequence[int], rng: np.random.Generator):
        self.indices, self.rng, self.order = list(indices), rng, []

    def take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = [self.indices[i] for i in self.rng.permutation(len(self.indices))]
            out.append(self.order.pop())
        return out


def split_heldout(items: list[NanoItem], heldout_clips: int) -> tuple[list[NanoItem], list[NanoItem]]:
    """(train, held-out): the last `heldout_clips` clips are held out; images all train. Balanced blocks in the
    nano data make the tail as varied as the rest."""
    clip_idx = [i for i, it in enumerate(items) if not it.is_image]
    if heldout_clips < 0 or (heldout_clips and heldout_clips >= len(clip_idx)):
        raise MotifVideoError(f"cannot hold out {heldout_clips} of {len(clip_idx)} clips")
    held = set(clip_idx[len(clip_idx) - heldout_clips:]) if heldout_clips else set()
    return [it for i, it in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def lr_factor(progress: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to `floor`; `progress` in [0, 1] is steps or time, whichever is further."""
    if progress < warmup:
        return (progress + 1e-3) / (warmup + 1e-3)
    t = min(1.0, (progress - warmup) / max(1e-8, 1 - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------------------------------
# Codec
# ----------------------------------------------------------------------------------------------------------------


def build_codec(seed: int = 0, **overrides):
    """A freshly initialised nano `AutoencoderKLWan`; the same seed gives the same weights."""
    from diffusers import AutoencoderKLWan

    config = {**CODEC_CONFIG, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKLWan(**config)


@torch.no_grad()
def per_frame_init_(vae) -> None:
    """Make a fresh codec start out as a per-frame (image) codec, the 2D -> 3D inflation of video VAEs.

    Every causal 3D convolution keeps only its current-frame slice (earlier frames weigh zero); each temporal
    downsampling keeps the newest frame of its window and each temporal upsampling repeats its frame. Stills never
    reach those earlier slices or the temporal resamplers (zero padding, and frame 0 skips them), so an image phase
    cannot train them; starting them here means that when clips arrive the codec already reconstructs every frame
    as well as a still, and only has to learn motion within a latent frame (measured in docs/nano_components.md).
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    resamplers = set()
    for module in vae.modules():
        if isinstance(module, WanResample) and hasattr(module, "time_conv"):
            conv = module.time_conv  # (copies * dim, dim, 3, 1, 1): copies = 2 for upsampling, 1 for downsampling
            conv.weight.zero_()
            conv.bias.zero_()
            eye = torch.eye(module.dim)
            for k in range(conv.out_channels // module.dim):
                conv.weight[k * module.dim:(k + 1) * module.dim, :, -1, 0, 0] = eye
            resamplers.add(conv)
    for module in vae.modules():
        if isinstance(module, WanCausalConv3d) and module not in resamplers and module.kernel_size[0] > 1:
            module.weight[:, :, :-1].zero_()


def _check_frames(items: list[NanoItem], window: int) -> None:
    height, width = items[0].load().shape[1:3]
    if height % VAE_SPATIAL or width % VAE_SPATIAL:
        raise MotifVideoError(f"frames must be multiples of {VAE_SPATIAL} pixels for the VAE, got {height}x{width}")
    shortest = min((it.num_frames for it in items if not it.is_image), default=window)
    if shortest < window:
        raise MotifVideoError(f"clips have {shortest} frames, fewer than the {window}-frame training window")


def object_mask(pixels: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(B, 1, T, H, W) 1.0 where a pixel differs from its frame's median colour (the background, in the nano data)."""
    background = pixels.flatten(3).median(dim=3).values[..., None, None]  # (B, 3, T, 1, 1)
    return ((pixels - background).abs().amax(1, keepdim=True) > threshold).float()


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z)` before its final clamp to [-1, 1], for training.

    The clamp has no gradient outside [-1, 1], so a channel that starts out below -1 over the object (the red of a
    magenta square, say) would never be pulled up; measured, training on the clamped output is slower. The decoder
    runs once per latent frame, so the hook collects the chunks and they are joined along time.
    """
    chunks = []
    handle = vae.decoder.register_forward_hook(lambda module, args, out: chunks.append(out))
    try:
        clamped = vae.decode(z).sample
    finally:
        handle.remove()
    raw = torch.cat(chunks, dim=2)  # (B, 3, T, H, W)
    if raw.shape != clamped.shape:
        raise MotifVideoError(f"decoder chunks {tuple(raw.shape)} do not make the decoded clip {tuple(clamped.shape)}")
    return raw


def cell_colours(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, t, h, w): the mean pixel colour of each latent cell of pixels (B, 3, T, H, W), T = 1 + 4k: frame 0
    alone, then each following group of VAE_TEMPORAL frames (the codec's causal chunks), over 8x8-pixel squares."""
    first, rest = pixels[:, :, :1], pixels[:, :, 1:]
    b, c, t, h, w = rest.shape
    rest = rest.reshape(b, c, t // VAE_TEMPORAL, VAE_TEMPORAL, h, w).mean(3)  # (B, 3, k, H, W)
    frames = torch.cat([first, rest], 2)  # (B, 3, 1 + k, H, W)
    return torch.nn.functional.avg_pool3d(frames, (1, VAE_SPATIAL, VAE_SPATIAL))


def colour_alignment_loss(latent_mean: torch.Tensor, pixels: torch.Tensor, object_weight: float = 0.0) -> torch.Tensor:
    """Mean squared distance between the posterior mean's first COLOUR_CHANNELS channels and each cell's pixel colour.

    A reconstruction loss alone leaves the latent geometry to chance: measured, codecs of equal PSNR put some
    palette pairs 3-6x closer than others (white and yellow 0.25 of the median pair distance in one, red and green
    0.15 in another), and the transformer trained on them confuses exactly those pairs. Tying three channels to the
    cell's colour gives every colour the text names a latent distance proportional to its pixel distance: the
    alignment-regularised latents of VA-VAE (Yao et al. 2025, arXiv 2501.01423), with the pixel colour as the
    target instead of a vision foundation model's features. Object cells weigh `1 + object_weight` as in the
    reconstruction loss."""
    target = cell_colours(pixels)
    err = (latent_mean[:, :COLOUR_CHANNELS] - target).square()
    if object_weight:
        err = err * (1 + object_weight * cell_colours(object_mask(pixels)))
    return err.mean()


def reconstruction_loss(vae, pixels: torch.Tensor, kl_weight: float = 1e-6, object_weight: float = 0.0,
                        generator: torch.Generator | None = None, sample: bool = True,
                        colour_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pixel L1 + L2 + kl_weight * KL + colour_weight * colour alignment, reconstruction) for pixels
    (B, 3, T, H, W) in [-1, 1].

    The decoder sees a posterior sample (reparameterised) so it learns to tolerate the latent noise the KL term
    keeps. `kl_weight` is relative to the per-sample *sum* of pixel errors, as in Stable Diffusion's VAE recipe
    (so 1e-6 means the same there and here), although the pixel term is reported as a mean.
    Pixels of the object weigh `1 + object_weight`: the shape covers a few percent of the frame, and without the
    weight the codec spends hundreds of steps drawing grey blobs on a perfect background before colours and edges
    come (measured in docs/nano_components.md).
    """
    posterior = vae.encode(pixels).latent_dist
    z = posterior.sample(generator=generator) if sample else posterior.mode()
    recon = decode_unclamped(vae, z)
    err = (recon - pixels).abs() + (recon - pixels).square()
    if object_weight:
        err = err * (1 + object_weight * object_mask(pixels))
    loss = err.mean()
    if kl_weight:
        loss = loss + kl_weight * posterior.kl().mean() / pixels[0].numel()
    if colour_weight:
        loss = loss + colour_weight * colour_alignment_loss(posterior.mean, pixels, object_weight)
    return loss, recon


@torch.no_grad()
def latent_statistics(vae, items: list[NanoItem], batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior mode over `items` (every latent position of every item)."""
    total = total_sq = None
    count = 0
    for kind in (False, True):  # clips and images stack separately (different frame counts)
        group = [it for it in items if it.is_image == kind]
        for k in range(0, len(group), batch_size):
            z = vae.encode(to_pixels([it.load() for it in group[k:k + batch_size]])).latent_dist.mode()
            z = z.double().transpose(0, 1).flatten(1)  # (C, B*t*h*w)
            total = z.sum(1) if total is None else total + z.sum(1)
            total_sq = z.square().sum(1) if total_sq is None else total_sq + z.square().sum(1)
            count += z.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


@torch.no_grad()
def reconstruction_metrics(vae, items: list[NanoItem], batch_size: int = 4) -> dict:
    """PSNR (dB, 8-bit frames, mean over clips) of encode -> mode -> decode, over whole frames and over the object's
    pixels only (the background is most of the frame and easy), plus the worst per-channel error of the object's
    mean colour (0..255) as a check that colours come back right."""
    psnr, obj_psnr, colour_err = [], [], []
    background = torch.tensor(BACKGROUND, dtype=torch.int16)
    for k in range(0, len(items), batch_size):
        frames = [it.load() for it in items[k:k + batch_size]]
        pixels = to_pixels(frames)
        recon = to_uint8(vae.decode(vae.encode(pixels).latent_dist.mode()).sample).to(torch.int16)
        target = torch.from_numpy(np.stack(frames)).to(torch.int16)  # (B, T, H, W, 3)
        err = (recon - target).float().square()
        for b in range(target.shape[0]):
            psnr.append(10 * math.log10(255**2 / max(err[b].mean().item(), 1e-10)))
            # Pixels far from the background colour: the shape's interior and most of its anti-aliased edge.
            mask = (target[b] - background).abs().amax(-1) > 24  # (T, H, W)
            if mask.any():
                obj_psnr.append(10 * math.log10(255**2 / max(err[b][mask].mean().item(), 1e-10)))
                colour_err.append((recon[b][mask].float().mean(0) - target[b][mask].float().mean(0)).abs().max().item())
    return {
        "psnr": float(np.mean(psnr)),
        "object_psnr": float(np.mean(obj_psnr)) if obj_psnr else None,
        "max_colour_error": float(max(colour_err)) if colour_err else None,
        "clips": len(psnr),
    }


def train_codec(
    data_dir_or_samples,
    out_dir,
    steps: int = 3000,
    batch_size: int = 2,
    seed: int = 0,
    lr: float = 1e-3,
    progress: bool = True,
    time_budget_s: float | None = None,
    *,
    window: int = 9,
    image_batch_size: int | None = None,
    image_phase: float = 0.6,
    still_batch_size: int = 4,
    kl_weight: float = 1e-6,
    object_weight: float = 9.0,
    colour_weight: float = 0.0,
    weight_decay: float = 0.0,
    heldout_clips: int = 0,
    eval_every: int | None = None,
    stats_samples: int = 256,
    save_dtype: torch.dtype = torch.float16,
    log_every: int = 50,
) -> dict:
    """Train the nano codec and save it with `save_pretrained(out_dir)`; returns a summary (losses, timings,
    held-out reconstruction metrics when `heldout_clips` > 0, their curve every `eval_every` steps).

    Two phases over one schedule. For the first `image_phase` of it, each step trains `still_batch_size` stills
    (images and single frames of clips): spatial coding is most of the work and a still is the cheapest thing to
    learn it from. After that, each step trains `batch_size` random `window`-frame clip windows plus
    `image_batch_size` (default: batch_size) images, so the first-frame path keeps seeing images. The codec starts
    as a per-frame codec (`per_frame_init_`), so the clip phase only has to learn motion. `colour_weight` > 0 ties
    the first three latent channels to each cell's pixel colour (`colour_alignment_loss`).

    The schedule (phase switch, warm-up, cosine decay of the learning rate) runs over `steps` or `time_budget_s`,
    whichever runs out first, so a time-capped run still ends at a low rate; evaluation time does not count.
    Given the seed (and the same thread count) the weights are deterministic unless the time budget cuts in.
    """
    if steps < 1 or batch_size < 1:
        raise MotifVideoError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if window < 1 or (window - 1) % VAE_TEMPORAL:
        raise MotifVideoError(f"window must be {VAE_TEMPORAL}k+1 frames (the VAE's chunking), got {window}")
    if lr <= 0:
        raise MotifVideoError(f"lr must be positive, got {lr}")
    start = time.perf_counter()
    items = load_items(data_dir_or_samples)
    train_items, held = split_heldout(items, heldout_clips)
    clips = [i for i, it in enumerate(train_items) if not it.is_image]
    images = [i for i, it in enumerate(train_items) if it.is_image]
    _check_frames(train_items, window if clips else 1)
    image_batch_size = batch_size if image_batch_size is None else image_batch_size

    rng = np.random.default_rng(seed)
    clip_cycle, image_cycle = _Cycler(clips, rng), _Cycler(images, rng)
    still_cycle = _Cycler(range(len(train_items)), rng)
    gen = torch.Generator().manual_seed(seed)
    vae = build_codec(seed).train()
    per_frame_init_(vae)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)

    from tqdm.auto import tqdm

    history, curve, done = [], [], 0
    train_start = time.perf_counter()
    bar = tqdm(total=steps, desc="codec", disable=not progress, unit="step")
    for step in range(steps):
        elapsed = time.perf_counter() - train_start
        if time_budget_s is not None and elapsed >= time_budget_s:
            break
        frac = max(step / steps, elapsed / time_budget_s if time_budget_s else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(frac)
        loss_value = 0.0
        opt.zero_grad(set_to_none=True)
        batches = []
        if frac < image_phase or not clips:
            # Stills: images and single frames of clips, each encoded alone like the first frame of a clip.
            stills = [train_items[i].load() for i in still_cycle.take(still_batch_size)]
            batches.append(to_pixels([f[int(rng.integers(f.shape[0]))][None] for f in stills]))  # (B, 3, 1, H, W)
        else:
            windows = []
            for i in clip_cycle.take(batch_size):
                frames = train_items[i].load()
                t0 = int(rng.integers(frames.shape[0] - window + 1))
                windows.append(frames[t0:t0 + window])
            batches.append(to_pixels(windows))  # (B, 3, window, H, W)
            if images and image_batch_size:
                batches.append(to_pixels([train_items[i].load() for i in image_cycle.take(image_batch_size)]))
        for pixels in batches:
            loss, _ = reconstruction_loss(vae, pixels, kl_weight, object_weight, gen, colour_weight=colour_weight)
            (loss / len(batches)).backward()
            loss_value += loss.item() / len(batches)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if not math.isfinite(loss_value):
            raise MotifVideoError(f"codec training diverged at step {step} (loss {loss_value}); lower lr")
        history.append(loss_value)
        done = step + 1
        bar.update(1)
        if done % log_every == 0 or done == 1:
            bar.set_postfix(loss=f"{np.mean(history[-log_every:]):.4f}")
        if eval_every and held and done % eval_every == 0:
            eval_start = time.perf_counter()
            vae.eval()
            curve.append({"step": done, "seconds": round(eval_start - train_start, 1),
                          **reconstruction_metrics(vae, held)})
            vae.train()
            train_start += time.perf_counter() - eval_start  # evaluation time does not count against the budget
            if progress:
                bar.write(f"step {done}: held-out PSNR {curve[-1]['psnr']:.2f} dB "
                          f"(object {curve[-1]['object_psnr']:.2f} dB)")
    bar.close()
    train_seconds = time.perf_counter() - train_start

    # Statistics and metrics of the weights as shipped (rounded to save_dtype), so they describe what loads back.
    vae.eval().to(save_dtype).float()
    stats_items = _stats_sample(train_items, stats_samples, seed)
    mean, std = latent_statistics(vae, stats_items)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    metrics = reconstruction_metrics(vae, held) if held else None

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        vae.to(save_dtype).save_pretrained(tmp, safe_serialization=True)
    summary = {
        "steps": done, "steps_requested": steps, "batch_size": batch_size, "window": window,
        "image_batch_size": image_batch_size, "lr": lr, "kl_weight": kl_weight, "colour_weight": colour_weight,
        "seed": seed,
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.perf_counter() - start, 1),
        "first_loss": history[0] if history else None,
        "final_loss": float(np.mean(history[-min(len(history), log_every):])) if history else None,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "heldout": metrics, "heldout_curve": curve, "latents_mean": mean, "latents_std": std,
        "losses": [round(v, 5) for v in history],
    }
    return summary


def _stats_sample(items: list[NanoItem], n: int, seed: int) -> list[NanoItem]:
    """Up to `n` items, clips and images in their dataset proportion, chosen by seed."""
    if n >= len(items):
        return items
    order = np.random.default_rng(seed + 1).permutation(len(items))[:n]
    return [items[i] for i in sorted(order)]
