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
                    "transformer/) and write one GGUF file, loadable by MotifVideoTransformer.from_single_file and "
                    "`generate --gguf`. Key names are diffusers' (also loadable by diffusers) when the model's "
                    "cross-attention folds into that layout; a tied model whose query LayerNorm has a bias (the "
                    "shipped nano model) is written in the tied form instead. Linear weights take --type; norms, "
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
    p.add_argument("--layout", choices=["auto", "diffusers", "tied"], default="auto",
                   help="key layout of the file: diffusers (loadable by diffusers too), tied (our form; needed when "
                        "the query LayerNorm has a bias), auto: diffusers where possible, else tied")
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
    from ..convert.layouts import to_model_layout
    from ..errors import CheckpointError, MotifVideoError, warn
    from ..files import check_writable_dir
    from ..model.transformer import MotifVideoTransformer
    from ..model_folder import transformer_folder

    out = Path(args.output)
    if out.is_dir():
        raise MotifVideoError(f"output {out} is a folder; give a file name such as {out / 'transformer.gguf'}")
    if out.suffix != ".gguf":
        raise MotifVideoError(f"output {out} should end in .gguf")
    existing = next(p for p in (out.absolute().parent, *out.absolute().parents) if p.exists())
    check_writable_dir(existing, "GGUF file")  # before minutes of quantising, not after
    model = MotifVideoTransformer.from_pretrained(transformer_folder(args.input))
    state_dict, form = model.state_dict(), model.config.cross_attention_form
    if args.layout != "tied" and form == "tied":
        try:
            state_dict, form = to_model_layout(state_dict, "untied"), "untied"
        except CheckpointError as e:
            if args.layout == "diffusers":
                raise CheckpointError(f"{e}; `--layout tied` writes a GGUF of the tied form, which motif-video "
                                      "loads (not diffusers)") from None
            warn("this model's query LayerNorm has a bias, so it has no diffusers form; writing the tied layout "
                 "(loads with motif-video's from_single_file and `generate --gguf`, not with diffusers)")
    elif args.layout == "tied" and form == "untied":
        state_dict, form = to_model_layout(state_dict, "tied"), "tied"
    config = model.config.replace(cross_attention_form=form)
    qtype = WRITE_TYPES[args.type]
    keep = KEEP_TYPES[args.keep_dtype] if args.keep_dtype else None
    write_gguf(state_dict, out, qtype, config_json=config.to_diffusers_json(), keep_dtype=keep,
               quantize_modulation=args.quantize_modulation, progress=not args.no_progress)
    plan = plan_types({k: tuple(v.shape) for k, v in state_dict.items()}, qtype, keep_dtype=keep,
                      quantize_modulation=args.quantize_modulation)
    n_main = sum(t == qtype for t in plan.values())
    kept = sorted({t.name for t in plan.values() if t != qtype})
    kept_note = f", {len(plan) - n_main} kept in {'/'.join(kept)}" if kept else ""
    print(f"wrote {out} ({_size(out.stat().st_size)}, {'diffusers' if form == 'untied' else 'tied'} layout): {n_main} tensors in {qtype.name}{kept_note}")
    return 0
