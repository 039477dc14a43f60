"""Training checkpoints: atomic, complete, and loadable without flags.

    <output_dir>/checkpoints/step-00001000/
        transformer/          config.json + safetensors: the live weights, a diffusers-layout transformer folder
        ema/                  the EMA weights, same layout (the weights to sample with or start the next stage from)
        lora/, lora_ema/      instead of the two above in a LoRA run: pytorch_lora_weights.safetensors
        aligner.safetensors   REPA projector (when alignment is on)
        optimizer.pt          full (unsharded) AdamW state, keyed by parameter name
        trainer_state.pt      step, LR scheduler, world size
        rank-00000.pt ...     each rank's data sampler position and torch / CUDA / numpy / python RNG states
        config.yaml           the resolved training config

A checkpoint is written into `.tmp-step-...`, every file fsynced, then renamed: a crash mid-save leaves the previous
checkpoints intact and only a `.tmp-` folder, which readers ignore and the next save removes. State dicts are
gathered full on rank 0 (torch.distributed.checkpoint.state_dict), so a checkpoint does not depend on the number of
ranks that wrote it; on resume rank 0 reads the files and broadcasts.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..convert.checkpoint import read_state_dict, save_state_dict_folder
from ..errors import CheckpointError
from .config import TrainConfig
from .parallel import clean_name, is_distributed

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
MAX_SHARD_BYTES = 5 * 1024**3


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# -- finding checkpoints -------------------------------------------------------------------------------------------
def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else -1


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the latest one in a `checkpoints/` folder or a run's output_dir."""
    path = Path(path)
    if (path / "trainer_state.pt").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointError(f"no training checkpoint in {path}")


# -- RNG -----------------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- saving --------------------------------------------------------------------------------------------------------
def _fsync_tree(folder: Path) -> None:
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _split(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def save_checkpoint(root: str | Path, step: int, *, module: nn.Module, optimizer, scheduler, ema, sampler_state: dict,
                    config: TrainConfig, keep_last: int) -> Path:
    """Every rank calls this (the state dicts are gathered collectively); rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    rank, world = rank_and_world()
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(module, options=options)
    optim = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
    ema_weights = ema.full_state_dict() if ema is not None else None

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    torch.save({"sampler": sampler_state, "rng": rng_state()}, tmp / f"rank-{rank:05d}.pt")
    barrier()
    if rank == 0:
        transformer = module.transformer
        live = _split(weights, "transformer.")
        if config.lora is not None:
            from .lora import adapter_state_dict, save_lora_adapter

            save_lora_adapter(tmp / "lora", adapter_state_dict(live), config.lora)
            if ema_weights is not None:
                save_lora_adapter(tmp / "lora_ema", adapter_state_dict(ema_weights), config.lora)
        else:
            config_json = transformer.config.to_diffusers_json()
            save_state_dict_folder(live, config_json, tmp / "transformer", MAX_SHARD_BYTES)
            if ema_weights is not None:
                save_state_dict_folder({**live, **ema_weights}, config_json, tmp / "ema", MAX_SHARD_BYTES)
        aligner = _split(weights, "aligner.")
        if aligner:
            save_file({k: v.contiguous() for k, v in aligner.items()}, str(tmp / "aligner.safetensors"))
        torch.save(optim, tmp / "optimizer.pt")
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "world_size": world},
                   tmp / "trainer_state.pt")
        config.dump(tmp / "config.yaml")
        _fsync_tree(tmp)
        if final.exists():  # the same step saved twice (periodic + final): keep the first
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
            _fsync_dir(root)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


# -- loading -------------------------------------------------------------------------------------------------------
def read_weights(checkpoint: Path, which: str, lora: bool) -> dict[str, torch.Tensor]:
    """Transformer weights of a checkpoint: `which` = 'model' (live) or 'ema'; in a LoRA run only the adapter,
    keyed by peft layer names (`...lora_A.default.weight`)."""
    if lora:
        from .lora import read_lora_adapter

        folder = checkpoint / ("lora" if which == "model" else "lora_ema")
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint {checkpoint} has no {folder.name}/ adapter")
        tensors, _ = read_lora_adapter(folder)
        return {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                for k, v in tensors.items()}
    folder = checkpoint / ("transformer" if which == "model" else "ema")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} has no {folder.name}/ weights"
                              + (" (was EMA off in that run?)" if which == "ema" else ""))
    return read_state_dict(folder)


def _check_covers(module: nn.Module, state: dict, what: str) -> None:
    wanted = {clean_name(n) for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(wanted - set(state))
    if missing:
        raise CheckpointError(f"{what} lacks {len(missing)} trainable tensors, e.g. {missing[0]}")


def load_checkpoint(checkpoint: Path, *, module: nn.Module, optimizer, scheduler, ema, config: TrainConfig) -> dict:
    """Restore everything `save_checkpoint` wrote into already built (and sharded) objects; returns the trainer
    state with this rank's sampler state under "sampler"."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    rank, world = rank_and_world()
    distributed = is_distributed()
    lora = config.lora is not None
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=True)
    if state["world_size"] != world:
        # Each rank's data order is its slice of the global batch: another rank count would reshuffle the data.
        raise CheckpointError(f"checkpoint {checkpoint} was written by {state['world_size']} processes; resume it "
                              f"with the same number (this run has {world})")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=False)

    def weights(which: str) -> dict:
        if rank != 0 and distributed:
            return {}
        state = {f"transformer.{k}": v for k, v in read_weights(checkpoint, which, lora).items()}
        if (checkpoint / "aligner.safetensors").is_file():
            state.update({f"aligner.{k}": v for k, v in load_file(str(checkpoint / "aligner.safetensors")).items()})
        _check_covers(module, state, f"checkpoint {checkpoint}")
        return state

    if ema is not None:
        # Load the EMA weights into the (possibly sharded) module and copy them out: the shadows get exactly the
        # parameters' sharding without a second code path.
        set_model_state_dict(module, weights("ema"), options=options)
        ema.copy_from(module.transformer)
    set_model_state_dict(module, weights("model"), options=options)

    optim = {}
    if rank == 0 or not distributed:
        optim = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(module, optimizer, optim, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=distributed))

    scheduler.load_state_dict(state["scheduler"])
    own = torch.load(checkpoint / f"rank-{rank:05d}.pt", map_location="cpu", weights_only=True)
    set_rng_state(own["rng"])
    barrier()
    return {**state, "sampler": own["sampler"]}
