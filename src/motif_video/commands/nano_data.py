"""`motif-video nano-data OUT_DIR`: write the nano model's procedural dataset (clips, images, captions, metadata)."""

from __future__ import annotations

import argparse
import time


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "nano-data",
        help="generate the procedural shapes dataset for the nano model",
        description="Write clip_NNNNN.mp4 / image_NNNNN.png files, each with a same-name .txt caption, and "
                    "metadata.jsonl (path, caption, ground-truth attributes): one coloured shape on a dark "
                    "background, moving left/right/up/down or static (or diagonally, with --motion). The same seed "
                    "always gives the same files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("out_dir", help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--clips", type=int, default=2000, help="number of video clips")
    p.add_argument("--images", type=int, default=500, help="number of still images (1-frame samples)")
    p.add_argument("--frames", type=int, default=17, help="frames per clip (4k+1 matches the Wan VAE)")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    p.add_argument("--fps", type=float, default=24.0, help="frame rate written into the clips")
    p.add_argument("--seed", type=int, default=0, help="random seed of the shapes, colours and motions")
    p.add_argument("--eval-prompts", type=int, default=210,
                   help="also write heldout_prompts.jsonl with this many held-out-wording prompts (0: none); "
                        "210 covers every colour x shape x motion x size once")
    p.add_argument("--color", action="append", default=None, metavar="NAME[=R,G,B]",
                   help="draw only these colours (repeat for several): a palette name (red, green, blue, yellow, "
                        "cyan, magenta, white) or a new colour with its RGB, e.g. orange=240,140,30. Default: the "
                        "palette's 7 colours")
    p.add_argument("--motion", action="append", default=None, metavar="NAME",
                   help="draw only these clip motions (repeat for several): left, right, up, down, static, or the "
                        "diagonals the nano model never saw in training (up-left, up-right, down-left, down-right). "
                        "Default: the five nano motions")
    p.add_argument("--shape", action="append", default=None, metavar="NAME",
                   help="draw only these shapes (repeat for several): circle, square, triangle, or the diamond the "
                        "nano model never saw in training. Default: the three nano shapes")
    p.add_argument("--object-size", action="append", default=None, choices=["small", "large"],
                   help="draw only objects of this size class (repeat for both; default: both)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous nano dataset in OUT_DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm

    from ..errors import MotifVideoError
    from ..nano.data import COLORS, MOTIONS, SHAPES, SIZES, parse_palette, write_dataset

    if args.eval_prompts < 0:
        raise MotifVideoError(f"--eval-prompts must be >= 0, got {args.eval_prompts}")
    palette = parse_palette(args.color) if args.color else COLORS
    start = time.perf_counter()
    with tqdm(total=max(args.clips, 0) + max(args.images, 0), unit="sample", disable=None) as bar:
        summary = write_dataset(
            args.out_dir, clips=args.clips, images=args.images, frames=args.frames, size=args.size,
            seed=args.seed, fps=args.fps, eval_prompts=args.eval_prompts, overwrite=args.overwrite,
            progress=bar.update, palette=palette, motions=args.motion or MOTIONS,
            shapes=args.shape or SHAPES, sizes=args.object_size or SIZES,
        )
    seconds = time.perf_counter() - start
    extra = f", {summary['eval_prompts']} held-out prompts" if summary["eval_prompts"] else ""
    print(f"wrote {summary['clips']} clips and {summary['images']} images{extra} to {summary['out_dir']} "
          f"in {seconds:.1f}s (metadata.jsonl)")
    return 0
