"""Running a function on several gloo processes (torch.multiprocessing spawn) and collecting its results."""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, folder: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(folder, f"result-{rank}.pt"))
    except BaseException:
        with open(os.path.join(folder, f"error-{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, folder, *args) -> list:
    """fn(rank, world, *args) on `world` processes; the list of their return values, by rank."""
    folder = str(folder)
    try:
        mp.spawn(_worker, args=(world, folder, fn, args), nprocs=world, join=True)
    except Exception as error:
        errors = [open(os.path.join(folder, f)).read() for f in sorted(os.listdir(folder)) if f.startswith("error")]
        raise AssertionError("\n".join(errors) or str(error)) from None
    return [torch.load(os.path.join(folder, f"result-{r}.pt"), weights_only=False) for r in range(world)]
