"""`motif-video` command line. Each subcommand lives in its own module under `motif_video.commands` with
`register(subparsers)`; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import GenerationInterrupted, MotifVideoError

# Subcommand modules, in the order `--help` lists them.
COMMANDS = [
    "generate",
    "convert",
    "convert_lora",
    "quantize",
    "train",
    "cache",
    "nano_data",
    "nano_train",
    "eval",
    "estimate",
    "calibrate_reuse",
    "calibrate_cache",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="motif-video",
        description="Motif-Video 2B: text/image-to-video generation, checkpoint conversion and training.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"motif_video.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"motif_video.commands.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MotifVideoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, GenerationInterrupted):
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
