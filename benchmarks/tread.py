"""TREAD training-step speed: routed vs unrouted, same model, same run, interleaved repetitions.

A step is forward + flow-matching MSE + backward + AdamW, on random latents and text (speed does not depend on
the data). The routed step samples a fresh route each time, as training does. Reported: median step times and
their ratio (unrouted / routed: > 1 means routing is faster), next to the ratio of the step's matmul FLOPs (counted
on the meta device: the ceiling the measured ratio approaches when matmuls dominate). `--flops-only` skips timing,
so the full-size model can be costed at full resolution on any machine.

    python benchmarks/tread.py --preset motif-video-small --latent 9 18 32 --steps 3 --json tread.json
    python benchmarks/tread.py --preset motif-video-2b --latent 31 92 160 --text-len 512 --flops-only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from motif_video import MotifVideoTransformer, preset
from motif_video.flops import count_flops, meta_model_inputs, video_tokens
from motif_video.routing import RouteConfig, sample_route


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` config overrides; values are JSON where they parse (numbers, lists), strings otherwise."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def step_flops(config, latent: tuple[int, int, int], batch: int, text_len: int, route_config: RouteConfig) -> dict:
    """Forward + backward FLOPs, unrouted and routed, counted on the meta device (no memory, no compute)."""
    model, latents, timestep, text, _ = meta_model_inputs(config, latent, batch, text_len)
    tokens = video_tokens(config, latent)
    flops = {}
    for name, routed in (("unrouted", False), ("routed", True)):
        route = sample_route(route_config, config.num_blocks, batch, tokens, device="meta") if routed else None
        loss = lambda: model(latents, timestep, text, route=route).float().square().mean()  # noqa: E731
        flops[name] = count_flops(lambda: loss().backward())
    return flops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="motif-video-small")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set num_attention_heads=4 --set rope_axes_dim=[16,24,24]")
    parser.add_argument("--latent", type=int, nargs=3, default=(9, 18, 32), metavar=("T", "H", "W"),
                        help="latent frames, height, width; default: 144p x 33 frames (1296 tokens)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--selection-ratio", type=float, default=0.5)
    parser.add_argument("--start", type=int, default=2)
    parser.add_argument("--end", type=int, default=-4, help="negative: counted from the last block")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs on the meta device, time nothing")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    config = preset(args.preset, **parse_overrides(args.overrides))
    route_config = RouteConfig(args.selection_ratio, args.start, args.end)
    start, end = route_config.resolve(config.num_blocks)
    frames, height, width = args.latent
    num_tokens = (frames // config.patch_size_t) * (height // config.patch_size) * (width // config.patch_size)
    flops = step_flops(config, tuple(args.latent), args.batch, args.text_len, route_config)
    result = {
        "preset": args.preset,
        "overrides": parse_overrides(args.overrides),
        "blocks": config.num_blocks,
        "decoder_start": config.num_layers + config.num_encoder_single_layers,
        "route": {"selection_ratio": args.selection_ratio, "start_layer": start, "end_layer": end},
        "latent": list(args.latent),
        "video_tokens": num_tokens,
        "batch": args.batch,
        "text_len": args.text_len,
        "step_tflops": {k: v / 1e12 for k, v in flops.items()},
        "flops_ratio": flops["unrouted"] / flops["routed"],
    }
    print(f"{args.preset} {result['overrides'] or ''}: {config.num_blocks} blocks, {num_tokens} video tokens x batch "
          f"{args.batch}, {args.text_len} text tokens")
    print(f"route: {args.selection_ratio:.0%} of video tokens skip blocks [{start}, {end})")
    print(f"forward+backward TFLOPs: unrouted {flops['unrouted'] / 1e12:.3f}, routed {flops['routed'] / 1e12:.3f}, "
          f"ratio {result['flops_ratio']:.2f}x")
    if not args.flops_only:
        result.update(time_steps(args, config, route_config, num_tokens))
        print(f"{'variant':<10} {'median s/step':>14} {'min':>8} {'max':>8}   ({result['device']}, {result['dtype']}, "
              f"{result['threads']} threads, {result['params'] / 1e6:.1f}M params)")
        for name, values in result["step_s"].items():
            print(f"{name:<10} {result['median_step_s'][name]:>14.3f} {min(values):>8.3f} {max(values):>8.3f}")
        print(f"speedup (unrouted / routed): {result['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def time_steps(args, config, route_config: RouteConfig, num_tokens: int) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(args.seed)
    model = MotifVideoTransformer(config).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    shape = tuple(args.latent)

    def step(routed: bool) -> float:
        latents = torch.randn(args.batch, config.in_channels, *shape, generator=gen)
        target = torch.randn(args.batch, config.out_channels, *shape, generator=gen)
        text = torch.randn(args.batch, args.text_len, config.text_embed_dim, generator=gen)
        timestep = torch.rand(args.batch, generator=gen) * 1000
        latents, target, text = (t.to(device=device, dtype=dtype) for t in (latents, target, text))
        timestep = timestep.to(device)
        synchronize(device)
        begin = time.perf_counter()
        route = sample_route(route_config, config.num_blocks, args.batch, num_tokens, generator=gen,
                             device=device) if routed else None
        loss = F.mse_loss(model(latents, timestep, text, route=route).float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - begin

    for _ in range(args.warmup):
        step(False), step(True)
    times = {"unrouted": [], "routed": []}
    for i in range(args.steps):
        order = (False, True) if i % 2 == 0 else (True, False)  # alternate so drift hits both variants alike
        for routed in order:
            times["routed" if routed else "unrouted"].append(step(routed))
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": args.steps,
        "warmup": args.warmup,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "step_s": times,
        "median_step_s": median,
        "speedup": median["unrouted"] / median["routed"],
    }


if __name__ == "__main__":
    main()
