"""How far apart a codec puts the nano palette's colours in latent space: for each colour, the mean normalised
latent of the cells lying wholly inside a large static square (6 seeded positions), then every pair's distance
divided by the median pair distance. Pairs near 0 are colours the transformer can only tell apart by small latent
differences.

    python benchmarks/codec_colour_separation.py src/motif_video/assets/motif-video-nano runs/nano/model/vae

Each argument is a model folder (its vae/ is read) or a codec folder itself (a run's model/vae while it trains).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from motif_video.nano.data import BACKGROUND, COLORS, Attributes, render
from motif_video.pipeline.vae import LatentCodec


def colour_latents(model: str, positions: int, size: int = 64) -> dict[str, torch.Tensor]:
    folder = Path(model) / "vae" if (Path(model) / "vae" / "config.json").is_file() else Path(model)
    codec = LatentCodec(AutoencoderKLWan.from_pretrained(folder, torch_dtype=torch.float32).eval())
    means = {}
    for colour in COLORS:
        rows = []
        for seed in range(positions):
            frames = render(Attributes(colour, "square", "large", "static"), 1, size,
                            np.random.default_rng(seed)).frames  # (1, S, S, 3)
            inside = torch.from_numpy(np.any(frames[0] != np.array(BACKGROUND, np.uint8), -1)).float()
            cells = F.avg_pool2d(inside[None, None], 8)[0, 0] == 1  # latent cells (8x8 pixels) wholly inside
            pixels = torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] / 127.5 - 1  # (1, 3, 1, S, S)
            with torch.no_grad():
                latent = codec.encode(pixels)[0, :, 0]  # (16, S/8, S/8)
            rows.append(latent[:, cells].mean(1))
        means[colour] = torch.stack(rows).mean(0)
    return means


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model folders (their vae/) or codec folders")
    p.add_argument("--positions", type=int, default=6, help="seeded square positions per colour")
    p.add_argument("--closest", type=int, default=5, help="closest pairs listed per model")
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {}
    for model in args.models:
        means = colour_latents(model, args.positions)
        pairs = {f"{a}-{b}": float((means[a] - means[b]).norm()) for a, b in itertools.combinations(COLORS, 2)}
        median = float(np.median(list(pairs.values())))
        relative = {k: round(v / median, 3) for k, v in sorted(pairs.items(), key=lambda kv: kv[1])}
        results[model] = {"median_distance": round(median, 3), "relative": relative}
        closest = ", ".join(f"{k} {v:.2f}" for k, v in list(relative.items())[:args.closest])
        print(f"{model}: median distance {median:.2f}; closest pairs (relative): {closest}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
