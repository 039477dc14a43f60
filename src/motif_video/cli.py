"""`motif-video` command line. Each subcommand lives in its own module under `motif_video.commands` with
`register(subparsers)`; user errors print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import warnings

from .errors import GenerationInterrupted, MotifVideoError, MotifVideoWarning
from .files import Terminated, terminate_as_interrupt

# Subcommand modules, in the order `--help` lists them.
COMMANDS = [
    "generate",
    "convert",
    "convert_lora",
    "quantize",
    "train",
    "cache",
    "distill_data",
    "nano_data",
    "nano_train",
    "nano_distill",
    "eval",
    "estimate",
    "calibrate_reuse",
    "serve",
    "analyze",
    "calibrate_cache",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: not when its help already says what the default is, and not for unset
    (None) or off (False) defaults, which would only print "(default: None)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


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
    for command in sub.choices.values():
        if command.formatter_class is argparse.ArgumentDefaultsHelpFormatter:
            command.formatter_class = HelpFormatter
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    if issubclass(category, MotifVideoWarning):
        _say(f"warning: {message}")
    else:
        _default(message, category, filename, lineno, file, line)


def _say(line: str) -> None:
    """One line to stderr in a single write: under torchrun every rank prints its own, and separate writes of the
    text and its newline would interleave across processes."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        # SIGTERM unwinds like Ctrl-C, so half-written outputs are removed on the way out.
        with terminate_as_interrupt(), warnings.catch_warnings():
            warnings.simplefilter("always", MotifVideoWarning)
            warnings.showwarning = _show_warning
            return int(args.func(args) or 0)
    except MotifVideoError as e:
        message = " ".join(str(e).split())  # always one line, whatever a wrapped library message held
        _say(f"error: {message}")
        return 2
    except Terminated:
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except (KeyboardInterrupt, GenerationInterrupted):
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
