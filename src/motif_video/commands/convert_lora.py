"""`motif-video convert-lora IN OUT --to diffusers|comfyui`: rewrite a LoRA adapter in another key style."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-lora",
        help="convert a LoRA adapter between the diffusers and ComfyUI key styles",
        description="Read a LoRA adapter in any supported style (ours / diffusers / PEFT, ComfyUI or kohya, the "
                    "original Motif module names) and write it for diffusers' load_lora_adapter or for ComfyUI. An "
                    "adapter trained on a tied-layout model (such as the shipped nano model) needs --model: its "
                    "update is carried over to the released (untied) layout through that model's weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", help="adapter file, or a folder holding one (e.g. a training checkpoint's lora/)")
    p.add_argument("output", help="output .safetensors file (diffusers: or a folder, which gets "
                                  "pytorch_lora_weights.safetensors)")
    p.add_argument("--to", required=True, choices=["diffusers", "comfyui"], help="target key style")
    p.add_argument("--model", default=None,
                   help="the model (folder with transformer/, or a transformer folder) the adapter was trained on")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..convert.checkpoint import read_state_dict
    from ..errors import CheckpointError
    from ..lora.formats import check_untied, read_adapter, tied_adapter_to_diffusers, write_adapter

    adapter = read_adapter(args.input)
    if args.model is not None:
        folder = Path(args.model)
        if (folder / "transformer" / "config.json").is_file():
            folder = folder / "transformer"
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{args.model} is not a transformer folder: it has no config.json")
        adapter = tied_adapter_to_diffusers(adapter, read_state_dict(folder))
    check_untied(adapter)
    out = write_adapter(adapter, args.output, args.to)
    ranks = sorted({f.rank for f in adapter.values()})
    print(f"converted {args.input} -> {out} ({args.to}, {len(adapter)} layers, rank {'/'.join(map(str, ranks))})")
    return 0
