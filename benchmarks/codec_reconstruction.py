"""Latent codecs side by side on the same clips: encode -> mode -> decode, PSNR over whole frames and over the
object's pixels, and the worst error of an object's mean colour (`nano.codec.reconstruction_metrics`), overall and
per colour. The clips are a seeded sample of a `motif-video nano-data` folder's 17-frame clips.

    python benchmarks/codec_reconstruction.py runs/nano/data src/motif_video/assets/motif-video-nano/vae \
        runs/nano/model/vae --clips 28 --colors cyan white blue
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from diffusers import AutoencoderKLWan

from motif_video.nano.codec import load_items, reconstruction_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a nano-data folder")
    p.add_argument("codecs", nargs="+", help="codec folders (diffusers AutoencoderKLWan layout)")
    p.add_argument("--clips", type=int, default=28, help="clips sampled from the folder")
    p.add_argument("--frames", type=int, default=17, help="frames of the clips to use")
    p.add_argument("--colors", nargs="*", default=[], help="colours also scored on their own")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(1)
    clips = [it for it in load_items(args.data) if it.num_frames == args.frames]
    random.Random(args.seed).shuffle(clips)
    clips = clips[:args.clips]
    results = {}
    for folder in args.codecs:
        vae = AutoencoderKLWan.from_pretrained(folder).eval()
        with torch.no_grad():
            row = {"all": reconstruction_metrics(vae, clips)}
            for color in args.colors:
                subset = [c for c in clips if c.attributes.color == color]
                if subset:
                    row[color] = reconstruction_metrics(vae, subset)
        results[folder] = row
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
