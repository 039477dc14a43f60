"""`motif-video estimate --height 736 --width 1280 --frames 121`: what a generation costs, computed, not measured.

For one model config and video size: the latent and token counts, matmul FLOPs per denoising step (analytic, see
motif_video.flops), weight memory per dtype (GGUF sizes as `motif-video quantize` writes them), the peak activation
memory of inference, and the time per step and per video at a given accelerator throughput and utilisation.

Activation model (inference, no autograd): the tensors our forward keeps alive at its widest point, counted from
the code in model/blocks.py and model/transformer.py and checked against a live-tensor trace in
tests/test_estimate.py. It assumes a fused SDPA kernel (flash / memory-efficient) whose memory is O(sequence): the
math backend would add B x heads x S x S scores (over 1 TB at the release size). Not counted: kernel workspaces,
allocator fragmentation and the CUDA context (typically a few hundred MB to 1 GB).
"""

from __future__ import annotations

import argparse
import json
import math

# dtype name -> (bytes per activation value, GGML type name or None). GGUF models compute in bf16 on accelerators.
DTYPES = {
    "fp32": (4, None), "bf16": (2, None), "fp16": (2, None),
    "gguf-q8_0": (2, "Q8_0"), "gguf-q4_0": (2, "Q4_0"), "gguf-q4_k": (2, "Q4_K"),
}
# RoPE temporaries while rotating one (N, D) stream, in activation-dtype values per element: apply_rope upcasts to
# fp32 and holds the upcast, the rotated copy and both products plus their sum (5 fp32 tensors = 10 half-precision
# values); in fp32 the upcast is the input itself (4).
ROPE_TEMPORARIES = {4: 4, 2: 10}


# -- sizes --------------------------------------------------------------------------------------------------------
def latent_grid(config, height: int, width: int, frames: int) -> tuple[int, int, int]:
    """Latent (T, H, W) of a video, after checking the size is one the VAE and patch embedding accept."""
    from ..errors import MotifVideoError
    from ..latents import VAE_SPATIAL, VAE_TEMPORAL, check_video_size, latent_shape

    check_video_size(height, width, frames, VAE_TEMPORAL, VAE_SPATIAL * config.patch_size)
    latent = latent_shape(frames, height, width)
    if latent[0] % config.patch_size_t:
        raise MotifVideoError(f"{frames} frames give {latent[0]} latent frames, not a multiple of the temporal patch "
                              f"size {config.patch_size_t}")
    return latent


# -- weights ------------------------------------------------------------------------------------------------------
def _linear(name: str, fan_in: int, fan_out: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (fan_out, fan_in), **({f"{name}.bias": (fan_out,)} if bias else {})}


def _cross_attention_shapes(prefix: str, form: str, d: int, head_dim: int,
                            query_bias: bool = True) -> dict[str, tuple[int, ...]]:
    if form == "tied":  # K, V and the norms are the block's own; only the query path and the output are new
        return {**_linear(f"{prefix}.query_proj", d, d), f"{prefix}.query_norm.weight": (d,),
                **({f"{prefix}.query_norm.bias": (d,)} if query_bias else {}), **_linear(f"{prefix}.out_proj", d, d)}
    shapes = {}
    for proj in ("to_q", "to_k", "to_v"):
        shapes.update(_linear(f"{prefix}.{proj}", d, d))
    return {**shapes, f"{prefix}.norm_q.weight": (head_dim,), f"{prefix}.norm_k.weight": (head_dim,),
            **_linear(f"{prefix}.to_out.0", d, d)}


def parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter of MotifVideoTransformer(config), by state_dict name, derived from the architecture.

    Written out independently of the module code so that tests can hold one against the other. LayerNorms inside
    the blocks have no affine parameters (AdaLN supplies scale and shift).
    """
    c = config
    d, hd, m = c.hidden_size, c.attention_head_dim, int(c.hidden_size * c.mlp_ratio)
    patch = c.patch
    shapes = {"x_embedder.proj.weight": (d, c.in_channels, *patch), "x_embedder.proj.bias": (d,)}
    shapes.update(_linear("context_embedder.linear_1", c.text_embed_dim, d))
    shapes.update(_linear("context_embedder.linear_2", d, d))
    if c.image_embed_dim is not None:
        di = c.image_embed_dim
        shapes.update({"image_embedder.norm_in.weight": (di,), "image_embedder.norm_in.bias": (di,)})
        shapes.update(_linear("image_embedder.linear_1", di, di))
        shapes.update(_linear("image_embedder.linear_2", di, d))
        shapes.update({"image_embedder.norm_out.weight": (d,), "image_embedder.norm_out.bias": (d,)})
    shapes.update(_linear("time_text_embed.timestep_embedder.linear_1", 256, d))
    shapes.update(_linear("time_text_embed.timestep_embedder.linear_2", d, d))

    for i in range(c.num_layers):
        p = f"transformer_blocks.{i}"
        shapes.update(_linear(f"{p}.norm1.linear", d, 6 * d))
        shapes.update(_linear(f"{p}.norm1_context.linear", d, 6 * d))
        for proj in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            shapes.update(_linear(f"{p}.attn.{proj}", d, d))
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            shapes[f"{p}.attn.{norm}.weight"] = (hd,)
        if c.enable_text_cross_attention_dual:
            shapes.update(_cross_attention_shapes(f"{p}.cross_attn", c.cross_attention_form, d, hd,
                                                  c.cross_attention_query_bias))
        for ff in ("ff", "ff_context"):
            shapes.update(_linear(f"{p}.{ff}.net.0.proj", d, m))
            shapes.update(_linear(f"{p}.{ff}.net.2", m, d))
    for i in range(c.num_single_layers):
        p = f"single_transformer_blocks.{i}"
        for proj in ("to_q", "to_k", "to_v"):
            shapes.update(_linear(f"{p}.attn.{proj}", d, d))
        shapes.update({f"{p}.attn.norm_q.weight": (hd,), f"{p}.attn.norm_k.weight": (hd,)})
        if c.enable_text_cross_attention_single and i < c.num_encoder_single_layers:
            shapes.update(_cross_attention_shapes(f"{p}.cross_attn", c.cross_attention_form, d, hd,
                                                  c.cross_attention_query_bias))
        shapes.update(_linear(f"{p}.norm.linear", d, 3 * d))
        shapes.update(_linear(f"{p}.proj_mlp", d, m))
        shapes.update(_linear(f"{p}.proj_out", d + m, d))
    shapes.update(_linear("norm_out.linear", d, 2 * d))
    shapes.update(_linear("proj_out", d, math.prod(c.patch) * c.out_channels))
    return shapes


def part_of(name: str, config) -> str:
    """Which part of the network a parameter belongs to: dual, encoder, decoder, or embed+head."""
    if name.startswith("transformer_blocks."):
        return "dual"
    if name.startswith("single_transformer_blocks."):
        return "encoder" if int(name.split(".")[1]) < config.num_encoder_single_layers else "decoder"
    return "embed+head"


PARTS = ("dual", "encoder", "decoder", "embed+head")


def weight_bytes(config, dtype: str, *, quantize_modulation: bool = False) -> dict:
    """Bytes of the transformer's weights in `dtype`, per part of the network.

    GGUF: `file` is what `motif-video quantize` writes (motif_video.convert.gguf.plan_types: Linear weights in the
    block type, everything else F32); `resident` is what a loaded model holds when computing in bf16, since the
    loader keeps quantised weights as bytes and turns every other tensor into the compute dtype.
    """
    count = math.prod
    value_bytes, ggml = DTYPES[dtype]
    out = {"dtype": dtype}
    if ggml is None:
        shapes = parameter_shapes(config)
        size = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
        parts = dict.fromkeys(PARTS, 0)
        for name, shape in shapes.items():
            parts[part_of(name, config)] += count(shape) * size
        return {**out, "parts": parts, "resident": sum(parts.values()), "file": sum(parts.values())}

    from gguf import GGMLQuantizationType

    from ..convert.gguf import nbytes, plan_types

    qtype = GGMLQuantizationType[ggml]
    shapes = parameter_shapes(config.replace(cross_attention_form="untied"))  # GGUF files carry diffusers keys
    plan = plan_types(shapes, qtype, quantize_modulation=quantize_modulation)
    parts, file_parts = dict.fromkeys(PARTS, 0), dict.fromkeys(PARTS, 0)
    largest = 0  # biggest quantised weight: GGUFLinear dequantises it (in fp32, then bf16) in every forward
    for name, shape in shapes.items():
        part = part_of(name, config)
        file_parts[part] += nbytes(shape, plan[name])
        if plan[name] == qtype:
            parts[part] += nbytes(shape, qtype)
            largest = max(largest, count(shape))
        else:
            parts[part] += count(shape) * value_bytes
    return {**out, "parts": parts, "resident": sum(parts.values()), "file": sum(file_parts.values()),
            "file_parts": file_parts, "quantized_tensors": sum(t == qtype for t in plan.values()),
            "dequantized_weight_bytes": largest * (4 + value_bytes)}


# -- activations --------------------------------------------------------------------------------------------------
def block_peak_values(config, kind: str, num_x: int, num_context: int, value_bytes: int) -> int:
    """Activation values a block allocates at its widest point, for one sample (its inputs not included).

    kind "single" (encoder: x = video, context = text), "decoder" (context = encoder video tokens) or "dual".
    Moments (names from model/blocks.py and attention.py), in units of (tokens x width):
    - single, RoPE on k: residual, normed, both, q (normed), k (normed), v, q (roped) over S, mlp S x M, and the
      RoPE temporaries over the N_x roped tokens;
    - single, fused proj_out: residual, normed, attention out, [attn; mlp] (S x (D + M)), its product, mlp,
      and with cross-attention the new attn_x (N);
    - dual, RoPE on k: norm_x, norm_c, then q, k, v, roped q and the temporaries over N;
    - dual, q/k/v concatenation: norm_x, norm_c, both streams' q, k, v, and the three concatenations;
    - dual, video MLP: norms, attention outputs and updated streams (3 S), the modulated input (N), 2 N x M.
    """
    d, m = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    rope = ROPE_TEMPORARIES.get(value_bytes, 10)
    s = num_x + num_context
    if kind == "dual":
        return max(s * d + (4 + rope) * num_x * d, 7 * s * d, 3 * s * d + num_x * d + 2 * num_x * m)
    cross = num_x * d if kind == "single" and config.enable_text_cross_attention_single else 0
    return max(7 * s * d + s * m + rope * num_x * d, 5 * s * d + 2 * s * m + cross)


def activation_bytes(config, num_video: int, text_tokens: int, image_tokens: int = 0, batch: int = 1,
                     value_bytes: int = 2, encoder_reuse: bool = False) -> dict:
    """Peak activation bytes of one transformer forward (inference), and the stage where it occurs.

    Beyond the widest block: the model inputs (latents, text states), the RoPE table (fp32), the block's input
    streams, and what the forward holds across blocks: the patch embedding for the decoder (long skip) and, with
    encoder reuse, the cached encoder output. In the decoder the first block's inputs are exactly those; from the
    second block on, the long skip, the current streams and the cache are distinct tensors.
    """
    c = config
    d = c.hidden_size
    context = text_tokens + image_tokens
    patch_volume = math.prod(c.patch)
    inputs = num_video * c.in_channels * patch_volume + text_tokens * c.text_embed_dim
    if image_tokens:
        inputs += image_tokens * c.image_embed_dim
    rope_table = 2 * num_video * c.attention_head_dim * 4  # cos and sin, fp32, cached across steps
    stages = {}
    if c.num_layers:  # streams: video + context in, plus the long skip (the first block's input itself)
        stages["dual"] = (num_video + context) * d + block_peak_values(c, "dual", num_video, context, value_bytes)
        stages["dual"] += num_video * d if c.num_layers > 1 else 0
    if c.num_encoder_single_layers:
        stages["encoder"] = (2 * num_video + context) * d + block_peak_values(c, "single", num_video, context,
                                                                              value_bytes)
        if encoder_reuse:  # a refresh step still holds the previous step's encoder output until the decoder
            stages["encoder"] += num_video * d
    if c.num_decoder_layers:
        held = (3 if c.num_decoder_layers > 1 else 2) * num_video * d
        if encoder_reuse and c.num_decoder_layers > 1:
            held += num_video * d
        stages["decoder"] = held + block_peak_values(c, "decoder", num_video, num_video, value_bytes)
    stage = max(stages, key=stages.get)
    peak = batch * (stages[stage] + inputs) * value_bytes + rope_table
    return {"bytes": peak, "stage": stage, "stages": {k: batch * v * value_bytes for k, v in stages.items()},
            "value_bytes": value_bytes, "batch": batch}


def available_memory(device) -> int:
    """Bytes free for new allocations on `device` (a torch.device): the GPU's free memory, or the machine's
    available RAM (MemAvailable: free plus reclaimable cache)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# -- the whole estimate -------------------------------------------------------------------------------------------
def estimate(config, height: int, width: int, frames: int, *, dtypes=("bf16",), steps: int = 50,
             guidance: bool = True, text_tokens: int = 512, image_tokens: int = 0, prompts: int = 1,
             throughput_tflops: float = 989.0, mfu: float = 0.4, encoder_reuse: int = 1,
             quantize_modulation: bool = False, gpus: int = 1, ulysses: int | None = None, ring: int | None = None,
             link_gbps: float = 400.0) -> dict:
    """Everything `motif-video estimate` prints, as a dict (JSON-ready)."""
    from ..errors import MotifVideoError
    from ..flops import encoder_runs, forward_flops, sampling_flops, video_tokens
    from ..latents import LATENT_CHANNELS, token_grid

    for name, value, low in (("steps", steps, 1), ("text tokens", text_tokens, 0), ("image tokens", image_tokens, 0),
                             ("encoder reuse", encoder_reuse, 1), ("prompts", prompts, 1)):
        if value < low:
            raise MotifVideoError(f"{name} must be >= {low}, got {value}")
    if not throughput_tflops > 0:
        raise MotifVideoError(f"throughput must be > 0 TFLOPS, got {throughput_tflops}")
    if not 0 < mfu <= 1:
        raise MotifVideoError(f"MFU must be in (0, 1], got {mfu}")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise MotifVideoError(f"unknown dtype {unknown[0]!r}; choose from {', '.join(DTYPES)}")
    if image_tokens and config.image_embed_dim is None:
        raise MotifVideoError("this model has no image projection (image_embed_dim), so it takes no image tokens")
    if encoder_reuse > 1 and config.num_decoder_layers == 0:
        raise MotifVideoError("encoder reuse needs a model with decoder blocks (num_decoder_layers > 0)")

    latent = latent_grid(config, height, width, frames)
    tokens = video_tokens(config, latent)
    batch = prompts * (2 if guidance else 1)
    fwd = forward_flops(config, tokens, text_tokens, image_tokens, batch)
    per_video = sampling_flops(fwd, steps, encoder_reuse)
    effective = throughput_tflops * 1e12 * mfu
    params = sum(math.prod(s) for s in parameter_shapes(config).values())
    memory = {}
    for dtype in dtypes:
        weights = weight_bytes(config, dtype, quantize_modulation=quantize_modulation)
        acts = activation_bytes(config, tokens, text_tokens, image_tokens, batch, DTYPES[dtype][0],
                                encoder_reuse > 1)
        transient = weights.get("dequantized_weight_bytes", 0)
        memory[dtype] = {"weights": weights, "activations": acts,
                         "total_bytes": weights["resident"] + acts["bytes"] + transient}
    result = {
        "model": {"params": params, "hidden_size": config.hidden_size, "dual_blocks": config.num_layers,
                  "encoder_blocks": config.num_encoder_single_layers, "decoder_blocks": config.num_decoder_layers},
        "video": {"height": height, "width": width, "frames": frames,
                  "latent_shape": [LATENT_CHANNELS, *latent],
                  "token_grid": list(token_grid(latent, config.patch)),
                  "video_tokens": tokens, "text_tokens": text_tokens, "image_tokens": image_tokens,
                  "batch": batch, "guidance": guidance},
        "flops": {
            "forward": fwd.total, "embed": fwd.embed, "dual": fwd.dual.total, "encoder": fwd.encoder.total,
            "decoder": fwd.decoder.total, "head": fwd.head,
            "attention": fwd.dual.attention + fwd.encoder.attention + fwd.decoder.attention,
            "reuse_step": fwd.reuse_step, "steps": steps, "encoder_reuse": encoder_reuse,
            "encoder_runs": encoder_runs(steps, encoder_reuse),
            "per_step": per_video / steps, "per_video": per_video,
        },
        "time": {"throughput_tflops": throughput_tflops, "mfu": mfu, "seconds_per_step": per_video / steps / effective,
                 "seconds_per_video": per_video / effective},
        "memory": memory,
    }
    if gpus > 1:
        result["context_parallel"] = context_parallel_estimate(
            config, tokens, text_tokens, image_tokens, prompts, guidance, dtypes[0], gpus, ulysses, ring, link_gbps,
            per_video / steps, effective, steps, encoder_reuse)
    return result


def context_parallel_estimate(config, tokens: int, text_tokens: int, image_tokens: int, prompts: int,
                              guidance: bool, dtype: str, gpus: int, ulysses: int | None, ring: int | None,
                              link_gbps: float, step_flops: float, effective: float, steps: int,
                              encoder_reuse: int) -> dict:
    """One clip over `gpus` processes (docs/parallel.md): per-GPU activation memory, the bytes each GPU sends per
    step, and s/step = compute split evenly + communication at `link_gbps` with no overlap (an upper bound)."""
    from ..errors import MotifVideoError
    from ..flops import context_traffic, encoder_runs
    from ..parallel.grid import GridShape, check_grid, default_shape

    if not link_gbps > 0:
        raise MotifVideoError(f"link bandwidth must be > 0 GB/s, got {link_gbps}")
    heads = config.num_attention_heads
    if ulysses is None and ring is None:
        shape = default_shape(gpus, heads)
    else:
        u = ulysses or max(1, gpus // (ring or 1))
        shape = GridShape(ulysses=u, ring=ring or max(1, gpus // u))
    if shape.size != gpus and guidance and shape.size * 2 == gpus:
        shape = GridShape(shape.ulysses, shape.ring, cfg=2)  # the rest of the GPUs run the other branch
    check_grid(shape, gpus, heads)
    value_bytes = DTYPES[dtype][0]
    branches = (2 if guidance else 1) * prompts
    batch = branches // shape.cfg  # samples each GPU runs per step
    local = -(-tokens // shape.sequence)
    acts = activation_bytes(config, local, text_tokens, image_tokens, batch, value_bytes, encoder_reuse > 1)
    traffic = context_traffic(config, tokens, text_tokens + image_tokens, shape.ulysses, shape.ring, value_bytes)
    encoder_share = encoder_runs(steps, encoder_reuse) / steps
    per_step = batch * (traffic.encoder * encoder_share + traffic.decoder)
    compute = step_flops / gpus / effective
    comm = per_step / (link_gbps * 1e9)
    return {"gpus": gpus, "ulysses": shape.ulysses, "ring": shape.ring, "cfg": shape.cfg,
            "local_video_tokens": local, "activation_bytes_per_gpu": acts["bytes"],
            "comm_bytes_per_step": round(per_step), "link_gbps": link_gbps, "compute_seconds_per_step": compute,
            "comm_seconds_per_step": comm, "seconds_per_step": compute + comm}


# -- command line -------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "estimate",
        help="compute FLOPs, memory and time of a generation (no model is loaded)",
        description="Compute (not measure) the cost of generating one video: latent shape and tokens, matmul FLOPs "
                    "per denoising step, weight memory per dtype (GGUF as `motif-video quantize` writes it), peak "
                    "activation memory (fused flash/memory-efficient attention assumed) and time at the given "
                    "throughput x MFU. Text encoding and VAE decoding are not included. See docs/performance.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--height", type=int, default=736, help="pixels, multiple of 16")
    p.add_argument("--width", type=int, default=1280, help="pixels, multiple of 16")
    p.add_argument("--frames", type=int, default=121, help="frame count, 4k+1")
    p.add_argument("--model", default="motif-video-2b", help="preset name, or a model/transformer folder")
    p.add_argument("--dtype", nargs="+", default=["bf16"], metavar="DTYPE",
                   help=f"weight dtypes to cost: {', '.join(DTYPES)}")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance", action=argparse.BooleanOptionalAction, default=True,
                   help="classifier-free/APG guidance: cond and uncond run as one batch of 2")
    p.add_argument("--text-tokens", type=int, default=512,
                   help="text tokens per prompt (512 = padded; our pipeline trims to the prompt's length)")
    p.add_argument("--image-tokens", type=int, default=0, help="SigLIP image tokens (I2V)")
    p.add_argument("--prompts", type=int, default=1, help="prompts generated together")
    p.add_argument("--throughput-tflops", type=float, default=989.0,
                   help="accelerator peak dense TFLOPS in the compute dtype (H100/H200 SXM bf16: 989)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="model FLOPs utilisation: the fraction of peak the forward sustains")
    p.add_argument("--encoder-reuse", type=int, default=1, metavar="K",
                   help="the encoder runs on every K-th step only (as generate --encoder-reuse)")
    p.add_argument("--quantize-modulation", action="store_true",
                   help="GGUF: AdaLN modulation quantised too (quantize --quantize-modulation)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs sharing one clip (context parallelism)")
    p.add_argument("--ulysses", type=int, default=None, help="Ulysses degree (default as generate under torchrun)")
    p.add_argument("--ring", type=int, default=None, help="ring-attention degree")
    p.add_argument("--link-gbps", type=float, default=400.0,
                   help="per-GPU link bandwidth in GB/s for the communication time (NVLink 4: ~400 usable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _tflop(n: float) -> str:
    return f"{n / 1e12:,.1f} TFLOP"


def format_table(result: dict, model: str) -> str:
    v, f, t, m = result["video"], result["flops"], result["time"], result["model"]
    lines = [
        f"model            {model}: {m['params']:,} parameters, {m['dual_blocks']} dual + {m['encoder_blocks']} "
        f"encoder + {m['decoder_blocks']} decoder blocks, width {m['hidden_size']}",
        f"video            {v['width']}x{v['height']}, {v['frames']} frames -> latent "
        f"{'x'.join(map(str, v['latent_shape']))} -> tokens {'x'.join(map(str, v['token_grid']))}",
        f"tokens           {v['video_tokens']:,} video + {v['text_tokens']} text"
        + (f" + {v['image_tokens']} image" if v["image_tokens"] else "")
        + f"; batch {v['batch']}" + (" (cond + uncond)" if v["guidance"] else ""),
        "",
        "FLOPs (matmuls, multiply-add = 2)",
        f"  forward        {_tflop(f['forward'])}: dual {_tflop(f['dual'])}, encoder {_tflop(f['encoder'])}, "
        f"decoder {_tflop(f['decoder'])}, embed+head {_tflop(f['embed'] + f['head'])}; "
        f"attention products {f['attention'] / f['forward']:.0%}",
    ]
    if f["encoder_reuse"] > 1:
        lines.append(f"  encoder reuse  K={f['encoder_reuse']}: encoder on {f['encoder_runs']} of {f['steps']} steps; "
                     f"reuse step {_tflop(f['reuse_step'])}")
    lines += [
        f"  per step       {_tflop(f['per_step'])}  (mean over {f['steps']} steps)",
        f"  per video      {f['per_video'] / 1e15:,.2f} PFLOP",
        f"time             {t['seconds_per_step']:.2f} s/step, {t['seconds_per_video'] / 60:.1f} min/video at "
        f"{t['throughput_tflops']:g} TFLOPS x MFU {t['mfu']:g}",
        "",
        f"memory (transformer only)   {'weights':>11} {'activations':>12} {'total':>11}   weights by part: "
        f"{' / '.join(PARTS)}",
    ]
    for dtype, mem in result["memory"].items():
        w, a = mem["weights"], mem["activations"]
        parts = " / ".join(f"{w['parts'][p] / 2**30:.2f}" for p in PARTS)
        lines.append(f"  {dtype:<25} {_gib(w['resident']):>11} {_gib(a['bytes']):>12} {_gib(mem['total_bytes']):>11}"
                     f"   {parts} GiB")
        if "file_parts" in w:
            lines.append(f"  {'':<25} file {_gib(w['file'])}: {w['quantized_tensors']} Linear weights in "
                         f"{dtype.removeprefix('gguf-').upper()}, the rest F32 (bf16 once loaded)")
    first = next(iter(result["memory"].values()))["activations"]
    lines.append(f"  activations peak in the {first['stage']} blocks; fused (flash) attention assumed, no S x S "
                 f"scores; excludes CUDA context and allocator slack")
    cp = result.get("context_parallel")
    if cp:
        lines += [
            "",
            f"context parallel {cp['gpus']} GPUs: Ulysses {cp['ulysses']} x ring {cp['ring']}"
            + (" x CFG 2" if cp["cfg"] == 2 else "") + f", {cp['local_video_tokens']:,} video tokens per GPU",
            f"  per GPU        activations {_gib(cp['activation_bytes_per_gpu'])}, sends "
            f"{cp['comm_bytes_per_step'] / 2**30:.2f} GiB per step",
            f"  time           {cp['seconds_per_step']:.2f} s/step = compute {cp['compute_seconds_per_step']:.2f} + "
            f"communication {cp['comm_seconds_per_step']:.2f} at {cp['link_gbps']:g} GB/s (no overlap assumed)",
        ]
    return "\n".join(lines)


def run(args) -> int:
    from ..convert.checkpoint import load_any_config

    config = load_any_config(args.model)
    result = estimate(config, args.height, args.width, args.frames, dtypes=args.dtype, steps=args.steps,
                      guidance=args.guidance, text_tokens=args.text_tokens, image_tokens=args.image_tokens,
                      prompts=args.prompts, throughput_tflops=args.throughput_tflops, mfu=args.mfu,
                      encoder_reuse=args.encoder_reuse, quantize_modulation=args.quantize_modulation,
                      gpus=args.gpus, ulysses=args.ulysses, ring=args.ring, link_gbps=args.link_gbps)
    if args.json:
        result["model"]["name"] = args.model
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result, args.model))
    return 0
