"""Training checkpoints: atomic, complete, resumable on any number of processes, and loadable without flags.

    <output_dir>/checkpoints/step-00001000/
        transformer/          config.json + safetensors: the live weights, a diffusers-layout transformer folder
        ema/                  the EMA weights, same layout (the weights to sample with or start the next stage from)
        lora/, lora_ema/      instead of the two above in a LoRA run: pytorch_lora_weights.safetensors
        aligner.safetensors   REPA projector (when alignment is on)
        optimizer/            torch.distributed.checkpoint folder: the AdamW state as it is sharded in training
                              (.metadata + one __<rank>_0.distcp file per writing rank)
        trainer_state.json    format, step, world size, the GLOBAL data position, health (loss, weight norm)
        rng/rank-00000.pt ... each rank's torch / CUDA / numpy / python RNG states
        config.yaml           the resolved training config

The weights are gathered whole on rank 0 (a 2B model is 8 GB in fp32) so that `transformer/` and `ema/` stay plain
model folders; the optimizer state (twice the weights, and the part that does not fit one host at scale) is written
by every rank in parallel, each its own shards, and resharded by torch.distributed.checkpoint for whatever number of
processes resumes it. The data position is global (which global batch of which epoch comes next), so a run written
by N processes resumes on M. The learning rate and the schedule are not stored: they are recomputed from the config
and the step, so a resumed run with a new `optim.lr` uses it.

Checkpoints written before this format (`optimizer.pt` with the whole AdamW state, `trainer_state.pt`, per-rank
`rank-*.pt` sampler positions) still resume, on any number of processes, with no conversion.

A checkpoint is written into `.tmp-step-...`, every file fsynced, then renamed: a crash mid-save leaves the previous
checkpoints intact and only a `.tmp-` folder, which readers ignore and the next save removes. A checkpoint damaged
afterwards (a truncated optimizer shard, a missing trainer state) is detected before anything is loaded, and resume
falls back to the previous one with a warning.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..convert.checkpoint import read_state_dict, save_state_dict_folder
from ..errors import CheckpointError
from ..files import fsync_dir, fsync_tree
from .config import TrainConfig
from .parallel import clean_name, is_distributed

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
MAX_SHARD_BYTES = 5 * 1024**3
FORMAT = 2
STATE_NAME = "trainer_state.json"
OPTIMIZER_DIR = "optimizer"
LEGACY_STATE_NAME = "trainer_state.pt"  # format 1
LEGACY_OPTIMIZER_NAME = "optimizer.pt"


@contextmanager
def _quiet_single_process():
    """One process saving or loading with torch.distributed.checkpoint is intended, not a mistake worth a warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent is to")
        yield


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_from_main(value):
    """Rank 0's `value` on every rank (any picklable object)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- finding checkpoints -------------------------------------------------------------------------------------------
def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root` (renamed into place, so complete when written), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else -1


def is_checkpoint(path: Path) -> bool:
    return (path / STATE_NAME).is_file() or (path / LEGACY_STATE_NAME).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the latest one (holding its trainer state and config) in a `checkpoints/`
    folder or a run's output_dir."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    for root in (path / "checkpoints", path):
        found = [p for p in list_checkpoints(root) if is_checkpoint(p) and (p / "config.yaml").is_file()]
        if found:
            return found[-1]
    raise CheckpointError(f"no training checkpoint in {path}")


def run_folder(path: str | Path) -> Path:
    """The run folder (output_dir) that `path` names: the folder itself, or the run a checkpoint belongs to."""
    path = Path(path)
    if _STEP_DIR.match(path.name) and path.parent.name == "checkpoints":
        return path.parent.parent
    if path.name == "checkpoints" and not is_checkpoint(path):
        return path.parent
    return path


def set_aside(checkpoints: list[Path], label: str) -> list[Path]:
    """Rename checkpoints to `<label>-step-...` beside them: never resumed from, never pruned, never deleted."""
    moved = []
    for path in checkpoints:
        target = path.with_name(f"{label}-{path.name}")
        n = 1
        while target.exists():
            target = path.with_name(f"{label}{n}-{path.name}")
            n += 1
        os.rename(path, target)
        moved.append(target)
    return moved


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
def _split(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def save_checkpoint(root: str | Path, step: int, *, module: nn.Module, optimizer, ema, data_state: dict,
                    config: TrainConfig, keep_last: int, health: dict | None = None) -> Path:
    """Every rank calls this (weights are gathered collectively, optimizer shards written by each rank).

    `data_state` is the global data position after `step`; `health` = {"healthy", "loss", "weight_norm"} marks
    whether this checkpoint may be named as the last good state (the newest healthy one is never pruned)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    rank, world = rank_and_world()
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}"

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(module, options=options)
    ema_weights = ema.full_state_dict() if ema is not None else None

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / "rng" / f"rank-{rank:05d}.pt")
    # Sharded as in training: each rank writes its own shards of the AdamW moments, rank 0 the metadata.
    with _quiet_single_process():
        dcp.save({"optimizer": get_optimizer_state_dict(module, optimizer)}, checkpoint_id=str(tmp / OPTIMIZER_DIR),
                 no_dist=not is_distributed())
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
        state = {"format": FORMAT, "step": step, "world_size": world, "data": data_state,
                 "health": health or {"healthy": True}}
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1) + "\n")
        config.dump(tmp / "config.yaml")
        fsync_tree(tmp)
        if final.exists():  # the same step saved twice (periodic + final): keep the first
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
            fsync_dir(root)
        prune(root, keep_last)
    barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints, and the newest healthy one however old."""
    found = list_checkpoints(root)
    healthy = [p for p in found if checkpoint_health(p).get("healthy", True)]
    keep = set(found[-keep_last:]) | set(healthy[-1:])
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)


# -- reading -------------------------------------------------------------------------------------------------------
def read_trainer_state(checkpoint: Path) -> dict:
    """The trainer state of either format: {"format", "step", "world_size", "data", "health"}; format 1's data
    position is its rank 0 sampler state under data["legacy_sampler"]."""
    checkpoint = Path(checkpoint)
    path = checkpoint / STATE_NAME
    try:
        if path.is_file():
            state = json.loads(path.read_text())
            return {"format": int(state["format"]), "step": int(state["step"]),
                    "world_size": int(state["world_size"]), "data": state["data"],
                    "health": state.get("health", {"healthy": True})}
        legacy = checkpoint / LEGACY_STATE_NAME
        if legacy.is_file():
            state = torch.load(legacy, map_location="cpu", weights_only=True)
            own = torch.load(checkpoint / "rank-00000.pt", map_location="cpu", weights_only=True)
            return {"format": 1, "step": int(state["step"]), "world_size": int(state["world_size"]),
                    "data": {"legacy_sampler": own["sampler"]}, "health": {"healthy": True}}
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable trainer state in {checkpoint}: {str(e).splitlines()[0]}") from None
    raise CheckpointError(f"checkpoint {checkpoint} has no {STATE_NAME}")


def checkpoint_health(checkpoint: Path) -> dict:
    try:
        return read_trainer_state(checkpoint)["health"]
    except CheckpointError:
        return {"healthy": False}


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


def read_optimizer_state(checkpoint: Path) -> dict:
    """The whole AdamW state of a checkpoint (either format) in one process: {"state": {name: {...}},
    "param_groups": [...]}, tensors unsharded."""
    checkpoint = Path(checkpoint)
    if (checkpoint / OPTIMIZER_DIR).is_dir():
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with _quiet_single_process():
            return _load_state_dict_from_keys(checkpoint_id=str(checkpoint / OPTIMIZER_DIR))["optimizer"]
    return torch.load(checkpoint / LEGACY_OPTIMIZER_NAME, map_location="cpu", weights_only=True)


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file whose header does not parse or whose data ends past the file: truncated or corrupt."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                return f"{path.name} is truncated"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return f"{path.name} is truncated" if 8 + n + end > size else None
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        return f"{path.name} is unreadable ({str(e).splitlines()[0]})"


def _optimizer_problem(folder: Path) -> str | None:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to read the metadata means the same thing
        return f"the optimizer state is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in ends.items():
        path = folder / name
        if not path.is_file():
            return f"optimizer shard {name} is missing"
        if path.stat().st_size < end:
            return f"optimizer shard {name} is truncated ({path.stat().st_size} of {end} bytes)"
    return None


def checkpoint_problem(checkpoint: Path, *, lora: bool, ema: bool) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None; reads headers and sizes, not the tensors (format 1's
    optimizer.pt has no header to check and is read whole)."""
    try:
        state = read_trainer_state(checkpoint)
    except CheckpointError as e:
        return str(e)
    folders = ["lora", "lora_ema"] if lora else ["transformer", "ema"]
    for folder in folders if ema else folders[:1]:
        if not (checkpoint / folder).is_dir():
            return f"it has no {folder}/"
        files = sorted((checkpoint / folder).glob("*.safetensors"))
        if not files:
            return f"{folder}/ holds no weights"
        for file in files:
            problem = _safetensors_problem(file)
            if problem:
                return f"{folder}/{problem}"
    if (checkpoint / "aligner.safetensors").is_file():
        problem = _safetensors_problem(checkpoint / "aligner.safetensors")
        if problem:
            return problem
    if state["format"] >= 2:
        return _optimizer_problem(checkpoint / OPTIMIZER_DIR)
    try:
        torch.load(checkpoint / LEGACY_OPTIMIZER_NAME, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load of a damaged file raises many kinds
        return f"{LEGACY_OPTIMIZER_NAME} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def _params_without_saved_state(state: dict, folder: Path) -> list[str]:
    """The parameter names in an optimizer state_dict's `state` of which the checkpoint's optimizer folder holds
    nothing (torch.distributed.checkpoint flattens `{"optimizer": {"state": {name: {...}}}}` to dotted keys)."""
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return [name for name, values in state.items()
            if not any(f"optimizer.state.{name}.{key}" in saved for key in values)]


def _check_covers(module: nn.Module, state: dict, what: str) -> None:
    wanted = {clean_name(n) for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(wanted - set(state))
    if missing:
        raise CheckpointError(f"{what} lacks {len(missing)} trainable tensors, e.g. {missing[0]}")


# -- loading -------------------------------------------------------------------------------------------------------
def load_checkpoint(checkpoint: Path, *, module: nn.Module, optimizer, ema, config: TrainConfig) -> dict:
    """Restore weights, EMA, optimizer state and (same process count only) RNG states into already built and
    sharded objects; returns `read_trainer_state`'s dict. The optimizer's hyperparameters (lr, betas, ...) are
    the config's, not the checkpoint's: the caller sets the learning rate for the step."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    rank, world = rank_and_world()
    distributed = is_distributed()
    lora = config.lora is not None
    state = read_trainer_state(checkpoint)
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

    # AdamW keeps no state for a parameter that never had a gradient (an image projector in text-to-video training,
    # an adapter's untouched layers), and the checkpoint has none for it; loading fills in placeholders (a zero-grad
    # step) for every parameter. Those are dropped again, so such a parameter's first update is AdamW's first
    # step, as in the run that wrote the checkpoint.
    if state["format"] >= 2:
        import torch.distributed.checkpoint as dcp

        # The target's own (sharded) layout; torch.distributed.checkpoint reads the overlapping pieces of whatever
        # shards the writing ranks saved.
        target = {"optimizer": get_optimizer_state_dict(module, optimizer)}
        stateless = _params_without_saved_state(target["optimizer"]["state"], checkpoint / OPTIMIZER_DIR)
        for name in stateless:
            del target["optimizer"]["state"][name]
        with _quiet_single_process():
            dcp.load(target, checkpoint_id=str(checkpoint / OPTIMIZER_DIR), no_dist=not distributed)
        set_optimizer_state_dict(module, optimizer, target["optimizer"], options=StateDictOptions(strict=False))
    else:
        optim, stateless = {}, []
        if rank == 0 or not distributed:
            optim = torch.load(checkpoint / LEGACY_OPTIMIZER_NAME, map_location="cpu", weights_only=True)
            stateless = [n for g in optim["param_groups"] for n in g["params"] if n not in optim["state"]]
        stateless = broadcast_from_main(stateless)
        set_optimizer_state_dict(module, optimizer, optim, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=distributed, strict=False))
    params = {clean_name(n): p for n, p in module.named_parameters()}
    for name in stateless:
        optimizer.state.pop(params[name], None)

    own = checkpoint / "rng" / f"rank-{rank:05d}.pt" if state["format"] >= 2 else checkpoint / f"rank-{rank:05d}.pt"
    if state["world_size"] == world and own.is_file():
        # Training randomness is keyed by (seed, step, sample) and does not depend on these; they keep anything
        # else that draws from the global generators (e.g. dropout) on the same stream.
        loaded = torch.load(own, map_location="cpu", weights_only=True)
        set_rng_state(loaded["rng"] if state["format"] == 1 else loaded)
    barrier()
    return state


def load_latest(root: Path, *, module: nn.Module, optimizer, ema, config: TrainConfig, log=print) -> dict | None:
    """Resume from the newest usable checkpoint under `root`, falling back past damaged ones with a warning;
    None when there is none. Rank 0 inspects the files and every rank follows its verdict."""
    rank, _ = rank_and_world()
    lora = config.lora is not None
    for checkpoint in reversed(list_checkpoints(root)):
        problem = None
        if rank == 0:
            problem = checkpoint_problem(checkpoint, lora=lora, ema=ema is not None)
        problem = broadcast_from_main(problem)
        if problem is not None:
            message = f"checkpoint {checkpoint} cannot be resumed from ({problem}); trying the one before it"
            if rank == 0:
                warnings.warn(message, stacklevel=2)
                log(f"warning: {message}")
            continue
        state = load_checkpoint(checkpoint, module=module, optimizer=optimizer, ema=ema, config=config)
        state["path"] = checkpoint
        return state
    return None
