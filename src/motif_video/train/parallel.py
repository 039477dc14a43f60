"""Parallelism and memory savings applied to the model from outside, block by block (the model knows none of it).

- Activation checkpointing: torch's composable `checkpoint` on each block. Unlike `checkpoint_wrapper` it adds no
  `_checkpoint_wrapped_module` level, so parameter names (checkpoints, LoRA adapters, EMA) stay diffusers' names.
- Regional compilation: each block compiled in place (`nn.Module.compile`: the module keeps its class and its
  parameter names, so checkpoints and EMA do not see it). Blocks of one kind share one graph, so warm-up is one
  compile per block kind; FSDP2's hooks stay outside the graphs (dynamo skips them), so the all-gathers and
  reduce-scatters are the same with and without it.
- FSDP2: `fully_shard` on every block, then on the transformer (embedders, output head), then on the root module
  (REPA projector), over the data x sequence mesh of the run's `ContextGrid` (`fsdp_mesh`). The transformer being a
  unit of its own lets validation sampling call it directly, through the generation pipeline, and still have its
  weights gathered. Parameters stay fp32 (the optimizer's master copy); with bf16 compute each block's weights are
  all-gathered in bf16 and gradients reduce-scattered in fp32 (the paper: bf16 compute, fp32 reductions and
  optimizer state). Forward inputs are not cast: the timestep (0..1000) and the RoPE tables lose too much in bf16;
  autocast casts each matmul instead.
Single process (CPU, or one GPU): nothing is wrapped.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import ConfigError
from ..parallel import ContextGrid, GridShape, apply_context_parallel

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor; a collective under FSDP2, so every rank must call it."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def sum_across_ranks(value: torch.Tensor) -> torch.Tensor:
    value = full_tensor(value.detach()).float().clone()
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def weight_norm(params: list[torch.Tensor]) -> float:
    """L2 norm of all (possibly sharded) parameters together; a collective under FSDP2."""
    from torch.distributed.tensor import DTensor

    local = torch.zeros((), dtype=torch.float64)
    for p in params:
        shard = p.to_local() if isinstance(p, DTensor) else p
        local += shard.detach().double().pow(2).sum().cpu()
    if is_distributed():
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
    return float(local.sqrt())


def apply_compile(transformer: nn.Module, backend: str = "inductor") -> None:
    """torch.compile every block in place; shapes are static per bucket, so each bucket compiles once."""
    for block in transformer.blocks:
        block.compile(backend=backend, dynamic=False)


def apply_activation_checkpointing(transformer: nn.Module) -> None:
    """Recompute each block's activations in backward: memory per block drops to its inputs."""
    from torch.distributed._composable import checkpoint

    for block in transformer.blocks:
        checkpoint(block)


def training_grid(ulysses: int, ring: int) -> ContextGrid:
    """The process grid of a training run: `ulysses x ring` processes per sample group (they hold the same samples),
    data-parallel over the groups; every rank raises the same one-line error for a grid that does not fit."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    sequence = ulysses * ring
    if world % sequence:
        raise ConfigError(f"parallel.ulysses x parallel.ring = {sequence} does not divide the {world} processes")
    return ContextGrid(GridShape(ulysses=ulysses, ring=ring, data=world // sequence))


def fsdp_mesh(grid: ContextGrid):
    """The 1-D mesh FSDP2 shards over: the grid's (data, sequence) mesh flattened, i.e. every process of a
    training run (whose cfg dimension is 1).

    Why not HSDP (shard over data, replicate over sequence): the processes of a sequence group hold the same weights
    and must add up their gradients anyway (each computed the part of its group's gradient that flows through its
    tokens), so one reduce-scatter over data x sequence gives the same sum as a reduce-scatter over data followed by
    an all-reduce over sequence, while dividing weight, gradient and AdamW memory by D x S instead of D. With D = 1
    (one clip over all GPUs, the case context parallelism exists for) HSDP would not shard at all: 32 GB per GPU
    of fp32 weights, gradients and moments for the 2B model. torchtitan shards over the flattened (dp_shard, cp)
    dimensions for the same reason. The price is all-gathers that span the sequence group, whose Ulysses part is
    inside a node."""
    return grid.mesh["data", "sequence"]._flatten("data_sequence")


def apply_fsdp(module: nn.Module, transformer: nn.Module, mesh, compute_dtype: torch.dtype,
               reshard_after_forward: bool = True) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Single-stream blocks return two slices of one tensor ([x; context] split), which FSDP2 flags because an
    # in-place op on such a view would skip its backward hook. The model never modifies block outputs in place
    # (and the two-process test compares gradients with a one-process run), so the warning is only noise.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mp = None
    if compute_dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for block in transformer.blocks:
        fully_shard(block, **kwargs)
    # The embedders' and output head's parameters are used again right after forward's end (output head) and in
    # backward's start: keeping them gathered saves one all-gather per step.
    fully_shard(transformer, **{**kwargs, "reshard_after_forward": False})
    fully_shard(module, **{**kwargs, "reshard_after_forward": False})
    return module


def reshard(module: nn.Module) -> None:
    """Free the weights FSDP2 keeps gathered after a forward that no backward follows (validation): units built
    with reshard_after_forward=False otherwise hold plain gathered tensors where EMA and the optimizer expect their
    sharded parameters. A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def parallelize(module: nn.Module, transformer: nn.Module, *, device: torch.device, compute_dtype: torch.dtype,
                grad_checkpointing: bool, grid: ContextGrid, reshard_after_forward: bool = True,
                compile_backend: str | None = None) -> nn.Module:
    """`module` (the TrainModule holding `transformer`) made ready for training on this process's device: its video
    sequence sharded over `grid`'s sequence groups, its weights over all of `grid`'s processes."""
    module.to(device)
    apply_context_parallel(transformer, grid)
    if grad_checkpointing:
        apply_activation_checkpointing(transformer)
    if compile_backend is not None:
        apply_compile(transformer, compile_backend)
    if grid.mesh is not None:
        apply_fsdp(module, transformer, fsdp_mesh(grid), compute_dtype, reshard_after_forward)
    return module
