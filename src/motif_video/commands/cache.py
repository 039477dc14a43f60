"""`motif-video cache DATA OUT --model DIR`: encode clips once (VAE latents, text states, REPA teacher features) so
training never runs the encoders."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "cache",
        help="precompute VAE latents, text states (and REPA teacher features) of a clip dataset",
        description="Encode a dataset (a folder of clips/images with same-name .txt captions, or a CSV/JSONL "
                    "metadata file) into sharded safetensors that `motif-video train` reads. Clips are resampled "
                    "to --fps and centre-cropped into frame-count x aspect buckets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("data", help="dataset folder, or a .csv/.jsonl metadata file")
    p.add_argument("output", help="cache folder (created; appended to if it exists)")
    p.add_argument("--model", required=True, help="model folder whose vae/, text_encoder/ and tokenizer/ encode")
    p.add_argument("--frames", type=int, nargs="+", default=[1, 17], help="frame-count buckets (4k+1; 1 = images)")
    p.add_argument("--aspects", nargs="+", default=["1:1"], help="aspect-ratio buckets, e.g. 16:9 1:1 9:16")
    p.add_argument("--resolution", type=int, default=360,
                   help="bucket area: that of a 16:9 frame this many pixels tall (360 = 360p)")
    p.add_argument("--buckets", nargs="+", default=None,
                   help="explicit buckets FRAMESxHEIGHTxWIDTH (e.g. 1x64x64 17x64x64); replaces --frames/--aspects/"
                        "--resolution")
    p.add_argument("--fps", type=float, default=None, help="training frame rate (default: consecutive frames)")
    p.add_argument("--teacher", default=None, help="REPA teacher folder (DINOv2 or V-JEPA 2) to cache features of")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="encode at most this many samples")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import torch
    from tqdm.auto import tqdm

    from ..errors import ConfigError
    from ..pipeline.pipeline import (GenerationDefaults, component_path, default_device_dtype, load_component,
                                     read_model_index)
    from ..pipeline.text import PromptEncoder
    from ..pipeline.vae import LatentCodec
    from ..train.buckets import BucketSet
    from ..train.cached import CachedLatentWriter, CachedSample
    from ..train.data import ClipDataset

    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    folder, index = read_model_index(args.model, required=("vae", "text_encoder", "tokenizer"))
    device, dtype = default_device_dtype(args.device, None)
    codec = LatentCodec(load_component(folder, index, "vae", torch_dtype=torch.float32).eval().to(device))
    defaults = GenerationDefaults.from_folder(folder)
    prompts = PromptEncoder(load_component(folder, index, "tokenizer"),
                            load_component(folder, index, "text_encoder", torch_dtype=dtype).eval().to(device),
                            max_length=defaults.max_sequence_length)
    teacher = None
    if args.teacher:
        from ..alignment import build_teacher

        teacher = build_teacher(args.teacher).to(device)

    buckets = BucketSet(args.buckets) if args.buckets else BucketSet.from_grid(args.frames, args.aspects,
                                                                                args.resolution)
    data = Path(args.data)
    if data.suffix.lower() in (".csv", ".jsonl"):
        dataset = ClipDataset.from_metadata(data, buckets, fps=args.fps, random_start=False)
    else:
        dataset = ClipDataset.from_folder(data, buckets, fps=args.fps, random_start=False)

    # Batches of one bucket each, so pixels stack.
    by_bucket: dict[int, list[int]] = {}
    for i, b in enumerate(dataset.bucket_of):
        by_bucket.setdefault(b, []).append(i)
    batches, total = [], 0
    for members in by_bucket.values():
        members = members[: max(0, args.limit - total)] if args.limit is not None else members
        total += len(members)
        batches += [members[k:k + args.batch_size] for k in range(0, len(members), args.batch_size)]

    writer = CachedLatentWriter(args.output, text_encoder=str(component_path(folder, "text_encoder")),
                                teacher=str(args.teacher) if args.teacher else None)
    written = 0
    with torch.no_grad(), tqdm(total=total, desc="caching", disable=args.quiet) as bar:
        for batch in batches:
            items = [dataset[i] for i in batch]
            pixels = torch.stack([item["pixels"] for item in items]).to(device)  # (B, 3, T, H, W)
            latents = codec.encode(pixels).cpu()
            states, mask = prompts.encode([item["caption"] for item in items])
            lengths = mask.sum(1).tolist() if mask is not None else [states.shape[1]] * len(items)
            features = grid = None
            if teacher is not None:
                features, grid = teacher.encode(pixels)
            for j, item in enumerate(items):
                writer.add(CachedSample(
                    latents=latents[j], text=states[j, : int(lengths[j])].float().cpu(), caption=item["caption"],
                    bucket=str(item["bucket"]),
                    teacher=features[j].float().cpu() if features is not None else None,
                    teacher_grid=tuple(grid) if grid is not None else None,
                ))
                written += 1
            bar.update(len(items))
        empty, _ = prompts.encode([""])
        writer.set_empty_prompt(empty[0].float().cpu())
    out = writer.close()
    print(f"cached {written} samples into {out} ({dataset.num_skipped} unreadable clips skipped)")
    return 0
