"""Process-group setup for commands launched by torchrun (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT set)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import MotifVideoError

# Every process group this package opens (generation, training, caching) gives up on a collective after this long: a
# rank hung rather than dead ends the job instead of holding the others forever. Long enough for the slowest rank's
# checkpoint write or cache shard at 2B scale, which the others wait for at the next barrier.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | None) -> torch.device:
    """Join the process group of a torchrun launch (NCCL on CUDA, gloo on CPU); returns this process's device."""
    cuda = device != "cpu" and (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return torch.device("cuda", local) if cuda else torch.device("cpu")


def agree_on_error(error: MotifVideoError | None) -> None:
    """Raise `error` on every rank together: all ranks reach this point first, so each prints its own one-line
    error before torchrun tears the group down."""
    dist.barrier()
    if error is not None:
        raise error


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
