"""`motif-video cache DATA OUT --model DIR`: encode clips once (VAE latents, text states, REPA teacher features) so
training never runs the encoders."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache",
        help="precompute VAE latents, text states (and REPA teacher features) of a clip dataset",
        description="Encode a dataset (a folder of clips/images with same-name .txt captions, or a CSV/JSONL "
                    "metadata file) into sharded safetensors that `motif-video train` reads. Clips are resampled "
                    "to --fps and centre-cropped into frame-count x aspect buckets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", help="dataset folder, or a .csv/.jsonl metadata file")
    p.add_argument("output", help="cache folder (created; appended to if it exists)")
    p.add_argument("--model", required=True, help="model folder whose vae/, text_encoder/ and tokenizer/ encode")
    p.add_argument("--frames", type=int, nargs="+", default=[1, 17], help="frame-count buckets (4k+1; 1 = images)")
    p.add_argument("--aspects", nargs="+", default=["1:1"], help="aspect-ratio buckets, e.g. 16:9 1:1 9:16")
    p.add_argument("--resolution", type=int, default=360,
                   help="bucket area: that of a 16:9 frame this many pixels tall (360 = 360p)")
    p.add_argument("--buckets", nargs="+", default=None,
                   help="explicit buckets FRAMESxHEIGHTxWIDTH (e.g. 1x64x64 17x64x64); replaces --frames/--aspects/"
                        "--resolution")
    p.add_argument("--fps", type=float, default=None, help="training frame rate (default: consecutive frames)")
    p.add_argument("--teacher", default=None, help="REPA teacher folder (DINOv2 or V-JEPA 2) to cache features of")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="encode at most this many samples")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..train.buckets import BucketSet
    from ..train.encode import encode_dataset

    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    buckets = BucketSet(args.buckets) if args.buckets else BucketSet.from_grid(args.frames, args.aspects,
                                                                                args.resolution)
    written, skipped, out = encode_dataset(args.data, args.output, args.model, buckets, fps=args.fps,
                                           teacher=args.teacher, batch_size=args.batch_size, limit=args.limit,
                                           device=args.device, progress=not args.quiet)
    print(f"cached {written} samples into {out} ({skipped} unreadable clips skipped)")
    return 0
