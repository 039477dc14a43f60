"""A picture of what the nano model draws: frames 0, 4, 8, 12, 16 of the first clips of a `motif-video eval` clip
folder (the held-out prompts of `motif-video nano-train`), one row per prompt, the prompt written beside it.

    python benchmarks/nano_samples.py runs/nano/eval/clips --rows 8 --out docs/images/nano_samples.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from motif_video.pipeline.video_io import read_video


def sample_grid(clips: Path, rows: int, frames: list[int], scale: int = 2) -> Image.Image:
    items = [json.loads(line) for line in (clips / "metadata.jsonl").read_text().splitlines() if line.strip()]
    items = items[:rows]
    videos = [read_video(clips / item["path"]) for item in items]
    height, width = videos[0].shape[1] * scale, videos[0].shape[2] * scale
    text_width, gap = 330, 4
    grid = Image.new("RGB", (text_width + len(frames) * (width + gap), len(items) * (height + gap)), "white")
    draw = ImageDraw.Draw(grid)
    for row, (item, video) in enumerate(zip(items, videos)):
        top = row * (height + gap)
        draw.text((6, top + height // 2 - 6), item["caption"][:56], fill="black")
        for col, index in enumerate(frames):
            frame = Image.fromarray(video[min(index, len(video) - 1)]).resize((width, height), Image.NEAREST)
            grid.paste(frame, (text_width + col * (width + gap), top))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("clips", type=Path, help="a clip folder with metadata.jsonl (OUT/eval/clips of nano-train)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--frames", type=int, nargs="+", default=[0, 4, 8, 12, 16])
    parser.add_argument("--out", type=Path, default=Path("docs/images/nano_samples.png"))
    args = parser.parse_args()
    sample_grid(args.clips, args.rows, args.frames).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
