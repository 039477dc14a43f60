"""`motif-video cache DATA OUT --model DIR`: encode clips once (VAE latents, text states, REPA teacher features) so
training never runs the encoders."""

from __future__ import annotations

import argparse
import math


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache",
        help="precompute VAE latents, text states (and REPA teacher features) of a clip dataset",
        description="Encode a dataset (a folder of clips/images with same-name .txt captions, or a CSV/JSONL "
                    "metadata file) into sharded safetensors that `motif-video train` reads. Clips are resampled "
                    "to --fps and centre-cropped into frame-count x aspect buckets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", help="dataset folder, a .csv/.jsonl metadata file, or WebDataset tar shards (local or an "
                                "fsspec URL; brace ranges and globs: 'shards/{00000..00099}.tar')")
    p.add_argument("output", help="cache folder (created; clips it already holds are skipped, the rest appended)")
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
    p.add_argument("--batch-size", type=int, default=8, help="clips encoded together (per process)")
    p.add_argument("--limit", type=int, default=None, help="cache only the first this many clips of the dataset")
    p.add_argument("--shard-size", type=float, default=1024.0, help="size of each written shard, in MiB")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N (default: cuda if available; under torchrun each process takes its own GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError
    from ..train.buckets import BucketSet
    from ..train.encode import encode_dataset

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if not (math.isfinite(args.shard_size) and args.shard_size > 0):
        raise ConfigError(f"--shard-size must be a positive number of MiB, got {args.shard_size:g}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise ConfigError(f"--fps must be a positive number, got {args.fps:g}")
    buckets = BucketSet(args.buckets) if args.buckets else BucketSet.from_grid(args.frames, args.aspects,
                                                                                args.resolution)
    summary = encode_dataset(args.data, args.output, args.model, buckets, fps=args.fps, teacher=args.teacher,
                             batch_size=args.batch_size, limit=args.limit, device=args.device,
                             progress=not args.quiet, shard_bytes=max(1, int(args.shard_size * (1 << 20))))
    if _is_first_process():
        print(f"cached {summary.written} new samples into {summary.folder} (it now holds {summary.total}); "
              f"{summary.cached_before} already cached, {len(summary.skipped)} unreadable (skipped), "
              f"{summary.unplaced} fit no bucket")
    return 0


def _is_first_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
