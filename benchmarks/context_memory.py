"""Per-process activation memory of one transformer forward under context parallelism, on CPU with gloo.

The nano architecture (4 heads) at a fixed clip of 8 x 32 x 32 latents (2,048 video tokens) and 16 text tokens, batch
2, fp32, no gradient: for 1, 2 and 4 processes under Ulysses alone, ring alone and Ulysses 2 x ring 2, each process
measures the peak bytes of everything but parameters and buffers while the forward runs, with torch's MemTracker
(the same tracker tests/test_estimate.py holds the activation model to). Beside it: `estimate`'s activation model
at the per-process token count.

    python benchmarks/context_memory.py --json benchmarks/results/context_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LATENT = (8, 32, 32)
TEXT = 16
BATCH = 2
GRIDS = [(1, 1), (2, 1), (1, 2), (4, 1), (2, 2), (1, 4)]  # (ulysses, ring)


def tracked_peak(rank: int, world: int, ulysses: int, ring: int) -> int:
    from torch.distributed._tools.mem_tracker import MemTracker

    from motif_video.model.transformer import MotifVideoTransformer
    from motif_video.parallel import ContextGrid, GridShape, apply_context_parallel

    torch.manual_seed(0)
    model = MotifVideoTransformer.from_preset("motif-video-nano").eval()
    if world > 1:
        grid = ContextGrid(GridShape(ulysses=ulysses, ring=ring), model.config.num_attention_heads)
        apply_context_parallel(model, grid)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, model.config.in_channels, *LATENT, generator=gen)
    t = torch.rand(BATCH, generator=gen) * 1000
    text = torch.randn(BATCH, TEXT, model.config.text_embed_dim, generator=gen)
    with torch.no_grad():
        model(x, t, text)  # warm: RoPE table cached, as on every sampling step after the first
        tracker = MemTracker()
        tracker.track_external(model, x, text, t)
        with tracker:
            out = model(x, t, text)
            del out
    snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return snapshot["Total"] - snapshot["Parameter"] - snapshot["Buffer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from motif_video.commands.estimate import activation_bytes
    from motif_video.model.config import preset
    from tests.parallel.helpers import spawn

    config = preset("motif-video-nano")
    tokens = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
    rows = []
    for ulysses, ring in GRIDS:
        world = ulysses * ring
        if world == 1:
            peaks = [tracked_peak(0, 1, 1, 1)]
        else:
            with tempfile.TemporaryDirectory() as folder:
                peaks = spawn(tracked_peak, world, folder, ulysses, ring)
        local = -(-tokens // world)
        rows.append({"processes": world, "ulysses": ulysses, "ring": ring, "video_tokens": tokens,
                     "local_video_tokens": local, "measured_peak_bytes": max(peaks),
                     "estimated_bytes": activation_bytes(config, local, TEXT, 0, BATCH, 4)["bytes"]})
        print(f"{world} processes (Ulysses {ulysses} x ring {ring}): {max(peaks) / 2**20:.1f} MiB measured, "
              f"{rows[-1]['estimated_bytes'] / 2**20:.1f} MiB estimated", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"latent": LATENT, "text_tokens": TEXT, "batch": BATCH,
                                               "dtype": "fp32", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
