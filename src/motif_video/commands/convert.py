"""`motif-video convert IN OUT --to diffusers|original`: rewrite a transformer checkpoint in another key layout."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from ..convert.layouts import TARGET_LAYOUTS

    p = subparsers.add_parser(
        "convert",
        help="convert a transformer checkpoint between the diffusers and original Motif layouts",
        description="Read a transformer folder (config.json + safetensors; or a model folder with transformer/) in "
                    "any layout (diffusers, original Motif, tied) and write it in the chosen layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", help="transformer folder, or model folder containing transformer/")
    p.add_argument("output", help="output transformer folder: a new path, an empty folder, an existing transformer "
                                  "folder (replaced as a whole once the new one is complete; may be the input "
                                  "itself) or a model folder (its transformer/ is replaced)")
    p.add_argument("--to", required=True, choices=list(TARGET_LAYOUTS), help="target layout")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..convert.checkpoint import convert_transformer

    source, folder, out, tensors = convert_transformer(args.input, args.output, args.to)
    print(f"converted {folder} ({source} layout) -> {out} ({args.to} layout, {tensors} tensors)")
    return 0
