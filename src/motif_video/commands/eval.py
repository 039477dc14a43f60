"""`motif-video eval CLIPS_DIR_OR_JSONL --out DIR`: analytic scores of generated clips against their prompts."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score clips against their prompts: colour, shape, motion direction, consistency, flicker",
        description="Measure each clip analytically (no learned weights): the object's colour, shape and motion "
                    "direction against what its prompt asks for, subject and background consistency, and temporal "
                    "flickering. Input: a folder of clips (.mp4/.gif/.png/...) each with a same-name .txt prompt, "
                    "or a JSONL file with 'path' and 'prompt' (or 'caption'). Writes results.json, report.md "
                    "(VBench-style table) and PNG charts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", metavar="CLIPS_DIR_OR_JSONL", help="folder of clip + .txt pairs, or a .jsonl file")
    p.add_argument("--out", default="report", help="output folder")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N clips")
    p.add_argument("--shuffle-prompts", type=int, default=None, metavar="SEED",
                   help="pair each clip with another clip's prompt: the chance-level baseline")
    p.add_argument("--title", default=None, help="report title (default: the source name)")
    p.add_argument("--color", action="append", default=None, metavar="NAME=R,G,B",
                   help="teach the evaluator a colour beyond the nano palette (repeatable), e.g. orange=240,140,30: "
                        "prompts naming it are scored on it, and clips are classified among the palette and it")
    p.add_argument("--diagonal", action="store_true",
                   help="teach the evaluator diagonal motion: prompts asking for up-left, up-right, down-left or "
                        "down-right (e.g. 'up and to the right', 'toward the lower left', 'northeast') are scored on "
                        "it, and clip motions are classified among eight directions instead of four")
    p.add_argument("--shape", action="append", default=[], metavar="NAME",
                   help="teach the evaluator a shape beyond circle, square and triangle (repeatable; known: diamond, "
                        "which `nano-data --shape` draws): prompts naming "
                        "it are scored on it, and clips are classified among the nano shapes and it")
    p.add_argument("--image-to-video", action="store_true",
                   help="score clips made from a first image: keeps the image's colour and shape, follows the "
                        "prompt's direction, frame 0 close to the image (each clip's image: <name>.image.png in a "
                        "folder, or 'image' in the JSONL)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from ..errors import MotifVideoError
    from ..eval.report import evaluate, load_items, markdown_table, shuffle_prompts, write_report

    from ..files import check_writable_dir

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MotifVideoError(f"--out {out} is an existing file; give a folder")
    check_writable_dir(next(p for p in (out.absolute(), *out.absolute().parents) if p.exists()), "report")
    palette = _palette(args.color)
    from ..eval.metrics import NEW_SHAPE_PROTOTYPES

    unknown = [name for name in args.shape if name not in NEW_SHAPE_PROTOTYPES]
    if unknown:
        raise MotifVideoError(f"--shape {unknown[0]!r}: the evaluator can be taught {', '.join(NEW_SHAPE_PROTOTYPES)}")
    if args.image_to_video:
        return _run_image_to_video(args, palette)
    items = load_items(args.source)
    if args.limit is not None:
        if args.limit < 1:
            raise MotifVideoError(f"--limit must be >= 1, got {args.limit}")
        items = items[: args.limit]
    if args.shuffle_prompts is not None:
        items = shuffle_prompts(items, args.shuffle_prompts)
    title = args.title or f"motif-video eval: {Path(args.source).name}" + (
        " (shuffled prompts)" if args.shuffle_prompts is not None else "")
    with tqdm(total=len(items), unit="clip", disable=None) as bar:
        results = evaluate(items, progress=bar.update, palette=palette, diagonals=args.diagonal,
                           shapes=args.shape)
    written = write_report(results, args.out, title)
    print(markdown_table(results, title, max_rows=0).rstrip())
    print(f"\nwrote {written['results']}, {written['markdown']} and {len(written['plots'])} plots")
    return 0


def _palette(specs):
    """The nano palette, plus the colours given with --color."""
    from ..eval.metrics import evaluation_palette
    from ..nano.data import COLORS, parse_palette

    return evaluation_palette(parse_palette(specs)) if specs else COLORS


def _run_image_to_video(args, palette) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from ..errors import MotifVideoError
    from ..eval.i2v import evaluate_i2v, load_i2v_items, markdown_i2v, write_i2v_report

    if args.shuffle_prompts is not None:
        raise MotifVideoError("--shuffle-prompts applies to text-to-video scoring only")
    items = load_i2v_items(args.source)
    if args.limit is not None:
        if args.limit < 1:
            raise MotifVideoError(f"--limit must be >= 1, got {args.limit}")
        items = items[: args.limit]
    title = args.title or f"motif-video eval (image-to-video): {Path(args.source).name}"
    with tqdm(total=len(items), unit="clip", disable=None) as bar:
        results = evaluate_i2v(items, progress=bar.update, palette=palette, diagonals=args.diagonal,
                           shapes=args.shape)
    written = write_i2v_report(results, args.out, title)
    print(markdown_i2v(results, title).rstrip())
    print(f"\nwrote {written['results']} and {written['markdown']}")
    return 0
