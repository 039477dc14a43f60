"""Peak memory of a training step with and without gradient accumulation (`data.micro_batch_size`), on a CPU.

Each setting runs the real training loop (`train()`) for 2 steps in a fresh process on the nano architecture
(128-d, 7 blocks) with a global batch of 8 clips of 16 x 5 x 32 x 32 latents (1,280 tokens each) and reports the
process's peak resident memory (`ru_maxrss`), minus that of the same process after setup with a batch of 1 (model,
optimizer, data: the part that does not depend on the batch). What remains is the step's activation memory, which
micro-batches divide.

    python benchmarks/accumulation_memory.py --json benchmarks/results/accumulation_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = [None, 4, 2, 1]  # micro-batch size (None: the whole batch of 8)


def child(micro: int | None, folder: str, steps: int) -> None:
    import torch

    from motif_video.train.cached import CachedSample, write_cached_samples
    from motif_video.train.config import load_config
    from motif_video.train.loop import Trainer

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    samples = [CachedSample(torch.randn(16, 5, 32, 32, generator=gen), torch.randn(8, 384, generator=gen))
               for _ in range(8)]
    cache = write_cached_samples(Path(folder) / "cache", samples)
    config = load_config(data={
        "output_dir": str(Path(folder) / f"run-{micro}-{steps}"), "model": {"preset": "motif-video-nano"},
        "data": {"cache_dirs": [str(cache)], "batch_size": 8, "micro_batch_size": micro, "interleave": ""},
        "optim": {"lr": 1e-4, "steps": max(1, steps)}, "ema": {"enabled": False}, "grad_checkpointing": False,
        "logging": {"every": 1, "tensorboard": None, "progress": False},
        "checkpointing": {"every": 1000, "save_final": False}})
    trainer = Trainer(config)
    trainer.setup()
    if steps:
        trainer.train()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        micro, folder, steps = args.child
        child(None if micro == "none" else int(micro), folder, int(steps))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        def peak(micro, steps) -> int:
            out = subprocess.run([sys.executable, __file__, "--child", str(micro).lower(), folder, str(steps)],
                                 env=env, capture_output=True, text=True, check=True)
            return int(out.stdout.split()[-1])

        base = peak(None, 0)
        rows = {}
        for micro in SETTINGS:
            step = peak(micro, 2) - base
            rows[str(micro or 8)] = step
            print(f"micro-batch {micro or 8}: step peak above setup {step / 2**20:8.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"setup_bytes": base, "step_bytes_by_micro_batch": rows}, indent=1)
                                   + "\n")


if __name__ == "__main__":
    main()
