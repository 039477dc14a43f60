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
    p.add_argument("output", help="output folder (created)")
    p.add_argument("--to", required=True, choices=list(TARGET_LAYOUTS), help="target layout")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..convert.checkpoint import load_config, read_state_dict, save_state_dict_folder
    from ..convert.layouts import detect_layout, to_layout
    from ..errors import CheckpointError
    from ..model_folder import transformer_folder

    folder = transformer_folder(args.input)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{args.input} is not a transformer folder: it has no config.json")
    config = load_config(folder)
    state_dict = read_state_dict(folder)
    source = detect_layout(state_dict)
    converted = to_layout(state_dict, args.to)
    config = config.replace(cross_attention_form="untied" if args.to == "diffusers" else "tied")
    out = save_state_dict_folder(converted, config.to_diffusers_json(), args.output, max_shard_size=5 * 1024**3)
    print(f"converted {folder} ({source} layout) -> {out} ({args.to} layout, {len(converted)} tensors)")
    return 0
