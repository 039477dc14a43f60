"""`motif-video quantize IN OUT.gguf --type q8_0`: write a transformer as a GGUF file (diffusers key names)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    from ..convert.gguf import KEEP_TYPES, WRITE_TYPES

    p = subparsers.add_parser(
        "quantize",
        help="write a transformer as a quantised GGUF file",
        description="Read a transformer folder (config.json + safetensors, any key layout; or a model folder with "
                    "transformer/) and write one GGUF file with diffusers key names, loadable by "
                    "MotifVideoTransformer.from_single_file and by diffusers. Linear weights take --type; norms, "
                    "biases, AdaLN modulation, the patch/timestep embedders, the output head and rows that do not "
                    "split into whole blocks stay in --keep-dtype. See docs/gguf.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("input", help="transformer folder, or model folder containing transformer/")
    p.add_argument("output", help="output .gguf file")
    p.add_argument("--type", required=True, choices=list(WRITE_TYPES), help="GGML type of the Linear weights")
    p.add_argument("--keep-dtype", choices=list(KEEP_TYPES), default=None,
                   help="type of the tensors kept out of quantisation (default: f32, or f16 for --type f16/bf16)")
    p.add_argument("--quantize-modulation", action="store_true",
                   help="quantise the AdaLN modulation layers too (a quarter of the 2B model's weights; smaller "
                        "file, more error in every block's scale/shift/gate)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def run(args) -> int:
    from ..convert.gguf import KEEP_TYPES, WRITE_TYPES, plan_types, write_gguf
    from ..convert.layouts import to_layout
    from ..errors import MotifVideoError
    from ..model.transformer import MotifVideoTransformer
    from ..model_folder import transformer_folder

    out = Path(args.output)
    if out.is_dir():
        raise MotifVideoError(f"output {out} is a folder; give a file name such as {out / 'transformer.gguf'}")
    if out.suffix != ".gguf":
        raise MotifVideoError(f"output {out} should end in .gguf")
    model = MotifVideoTransformer.from_pretrained(transformer_folder(args.input))
    # GGUF files carry diffusers key names; a tied (original-layout) model is unfolded into them
    state_dict = to_layout(model.state_dict(), "diffusers")
    config = model.config.replace(cross_attention_form="untied")
    qtype = WRITE_TYPES[args.type]
    keep = KEEP_TYPES[args.keep_dtype] if args.keep_dtype else None
    write_gguf(state_dict, out, qtype, config_json=config.to_diffusers_json(), keep_dtype=keep,
               quantize_modulation=args.quantize_modulation, progress=not args.no_progress)
    plan = plan_types({k: tuple(v.shape) for k, v in state_dict.items()}, qtype, keep_dtype=keep,
                      quantize_modulation=args.quantize_modulation)
    n_main = sum(t == qtype for t in plan.values())
    kept = sorted({t.name for t in plan.values() if t != qtype})
    kept_note = f", {len(plan) - n_main} kept in {'/'.join(kept)}" if kept else ""
    print(f"wrote {out} ({_size(out.stat().st_size)}): {n_main} tensors in {qtype.name}{kept_note}")
    return 0
