"""`motif-video convert IN OUT --to diffusers|original`: rewrite a transformer checkpoint in another key layout."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    from ..convert.checkpoint import load_config, read_state_dict, save_state_dict_folder
    from ..convert.layouts import detect_layout, to_layout
    from ..errors import CheckpointError
    from ..files import atomic_dir
    from ..model_folder import transformer_folder

    if not Path(args.input).exists():
        raise CheckpointError(f"input not found: {args.input}")
    folder = transformer_folder(args.input)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{args.input} is not a transformer folder: it has no config.json")
    out = output_folder(Path(args.output))
    config = load_config(folder)
    state_dict = read_state_dict(folder)
    source = detect_layout(state_dict)
    try:
        converted = to_layout(state_dict, args.to)
    except CheckpointError as e:
        if args.to != "diffusers":
            raise
        raise CheckpointError(f"{e}; `convert --to original` and `quantize --layout tied` work for it") from None
    config = config.replace(cross_attention_form="untied" if args.to == "diffusers" else "tied")
    # Written beside the destination and swapped in complete: converting in place or onto an existing model never
    # leaves a folder without weights, whatever interrupts the write.
    with atomic_dir(out) as tmp:
        save_state_dict_folder(converted, config.to_diffusers_json(), tmp, max_shard_size=5 * 1024**3)
    print(f"converted {folder} ({source} layout) -> {out} ({args.to} layout, {len(converted)} tensors)")
    return 0


_WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


def output_folder(out: Path) -> Path:
    """Where the converted transformer goes, refusing anything but a new path, an empty folder or one of ours."""
    from ..errors import MotifVideoError
    from ..files import check_writable_dir

    if out.exists() and not out.is_dir():
        raise MotifVideoError(f"output {out} is an existing file; give a folder")
    if (out / "model_index.json").is_file() and (out / "transformer").is_dir():
        out = out / "transformer"  # a whole model folder: its transformer is what changes
    if out.is_dir():
        names = [p.name for p in out.iterdir()]
        ours = all(n in _WEIGHT_FILES or (n.startswith("diffusion_pytorch_model-") and n.endswith(".safetensors"))
                   for n in names)
        if names and not (ours and "config.json" in names):
            raise MotifVideoError(f"output {out} is a folder holding other files than a transformer checkpoint; give "
                                  "a new or empty folder")
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MotifVideoError(f"cannot create the folder for {out}: {e.strerror or e}") from None
    check_writable_dir(out.absolute().parent, "converted checkpoint")
    return out
