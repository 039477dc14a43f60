"""The training loop: cached latents in, checkpoints out.

One process per device (launched by `accelerate launch` or `torchrun`; plain `python` for one CPU/GPU). Accelerate
sets up the process group, the device, autocast and TensorBoard; the model is sharded from outside by
`parallel.parallelize` (FSDP2 over ranks, activation checkpointing), and the loss comes from `objective`.

A step: global batch from the bucket sampler (each rank takes its slice) -> flow-matching loss (+ REPA) ->
backward -> clip -> AdamW -> LR schedule -> EMA. A non-finite loss or gradient norm stops the run before the
optimizer touches the weights, leaving the last checkpoint as the last good state.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, MotifVideoError
from .buckets import Bucket, BucketBatchSampler, BucketSet
from .cached import CachedLatentDataset, collate
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .ema import EMA
from .objective import FlowMatchingObjective, TrainModule
from .distill import DistillationObjective, TrajectoryDataset
from .parallel import full_tensor, mean_across_ranks, parallelize
from .stages import build_transformer


class TrainingDiverged(MotifVideoError):
    """The loss or the gradient norm became NaN/inf; the last checkpoint is the last good state."""


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- data plumbing -------------------------------------------------------------------------------------------------
class _Positioned(Dataset):
    """Carries the sampler position along with each index, so a consumed batch knows where the sampler stood after
    it, even when DataLoader workers prefetch batches ahead of training."""

    def __init__(self, dataset: CachedLatentDataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, position = item
        sample = self.dataset[index]
        sample["position"] = position
        return sample


class _PositionedBatches:
    def __init__(self, sampler: BucketBatchSampler):
        self.sampler = sampler

    def __iter__(self):
        while True:  # epochs roll over inside the sampler
            for batch in self.sampler:
                position = (self.sampler.epoch, self.sampler.batches_done)
                yield [(i, position) for i in batch]


def _collate(items: list[dict], collate=collate) -> dict:
    batch = collate(items)
    batch["position"] = items[0]["position"]
    return batch


@dataclass
class TrainResult:
    step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (all ranks' mean), every step
    checkpoint: Path | None = None


# -- the trainer ---------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: TrainConfig, *, resume: bool = False,
                 callbacks: list[Callable[[int, dict], None]] | None = None):
        self.config = config
        self.resume = resume
        self.callbacks = list(callbacks or [])
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"

    # -- setup ---------------------------------------------------------------------------------------------------------
    def _precision(self) -> torch.dtype:
        p = self.config.precision
        if p == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return torch.bfloat16 if p == "bf16" else torch.float32

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        c = self.config
        cuda = torch.cuda.is_available()
        self.compute_dtype = self._precision()
        self.tensorboard_dir = None
        if c.logging.tensorboard is not None:
            self.tensorboard_dir = self.output_dir / c.logging.tensorboard  # an absolute path replaces output_dir
        self.accelerator = Accelerator(
            cpu=not cuda, mixed_precision="bf16" if self.compute_dtype == torch.bfloat16 else "no",
            log_with="tensorboard" if self.tensorboard_dir else None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir),
                logging_dir=str(self.tensorboard_dir.parent) if self.tensorboard_dir else None))
        acc = self.accelerator
        self.device, self.rank, self.world = acc.device, acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process

        existing = list_checkpoints(self.checkpoint_dir)
        if existing and not self.resume:
            raise ConfigError(f"{self.output_dir} already holds checkpoints: pass --resume to continue that run, "
                              "or choose another output_dir")

        # 1. Data (first: its problems are the cheapest to report)
        align = c.alignment
        if c.objective.kind == "distill":  # few-step distillation: cached teacher trajectories (train/distill.py)
            self.dataset = TrajectoryDataset(c.data.cache_dirs, buckets=c.data.buckets)
        else:
            self.dataset = CachedLatentDataset(c.data.cache_dirs, buckets=c.data.buckets,
                                               text_encoder=c.data.text_encoder,
                                               teacher=align.teacher if align is not None else None)
        # 2. Model: same seed on every rank, so random inits agree before sharding
        seed_everything(c.seed)
        transformer = build_transformer(c)
        if transformer.config.text_embed_dim != self.dataset.text_dim:
            raise ConfigError(f"the cached text states are {self.dataset.text_dim}-d but the model's text_embed_dim "
                              f"is {transformer.config.text_embed_dim} (wrong text encoder for this stage?)")
        if c.lora is not None:
            from .lora import add_lora

            add_lora(transformer, c.lora)
        num_blocks = transformer.config.num_blocks
        aligner = None
        if align is not None:
            if align.block >= num_blocks:
                raise ConfigError(f"alignment.block={align.block} but the model has {num_blocks} blocks")
            from ..alignment import RepaAligner

            aligner = RepaAligner(transformer.config.hidden_size, self.dataset.teacher_dim, align.projector_dim)
        module = TrainModule(transformer, aligner, align.block if align is not None else None)
        self.module = parallelize(module, transformer, device=self.device, compute_dtype=self.compute_dtype,
                                  grad_checkpointing=c.grad_checkpointing,
                                  reshard_after_forward=c.parallel.reshard_after_forward)
        self.ema = EMA(self.module.transformer, c.ema.decay) if c.ema.enabled else None

        # 3. Optimizer and schedule
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("nothing to train: every parameter is frozen")
        o = c.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay,
                                           eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, o.warmup_steps, o.steps, o.schedule, o.min_lr_ratio))

        # 4. Sampler: the global batch split over ranks
        buckets = [Bucket.parse(k) for k in self.dataset.bucket_keys]
        bucket_set = BucketSet(buckets)
        self.sampler = BucketBatchSampler(
            [bucket_set.index(b) for b in buckets], bucket_set, self._per_rank_batch(c.data.batch_size),
            interleave=c.data.interleave or None, seed=c.seed, shuffle=True, drop_last=True,
            rank=self.rank, world_size=self.world)

        self.objective = FlowMatchingObjective(
            c.objective, seed=c.seed, patch_size=(transformer.config.patch_size_t, transformer.config.patch_size,
                                                  transformer.config.patch_size),
            num_blocks=num_blocks, route=c.route_config(), alignment=align,
            empty_prompt=self.dataset.empty_prompt(), text_dim=self.dataset.text_dim)
        if c.objective.kind == "distill":
            self.objective = DistillationObjective(
                seed=c.seed, sigmas=self.dataset.sigmas, encoder_refresh=c.objective.encoder_refresh,
                num_blocks=num_blocks, route=c.route_config(), patch_size=self.objective.patch_size)

        # 5. Resume
        self.step = 0
        if self.resume and existing:
            state = load_checkpoint(existing[-1], module=self.module, optimizer=self.optimizer,
                                    scheduler=self.scheduler, ema=self.ema, config=c)
            self.step = int(state["step"])
            self.sampler.load_state_dict(state["sampler"])
            self._print(f"resumed from {existing[-1]} at step {self.step}")
        elif self.resume:
            self._print(f"nothing to resume in {self.checkpoint_dir}; starting from step 0")
        self.sampler_state = self.sampler.state_dict()
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.step == 0:
                (self.output_dir / "log.jsonl").unlink(missing_ok=True)
        self.loader = DataLoader(_Positioned(self.dataset), batch_sampler=_PositionedBatches(self.sampler),
                                 collate_fn=partial(_collate, collate=getattr(self.dataset, "collate", collate)),
                                 num_workers=c.data.num_workers,
                                 pin_memory=self.device.type == "cuda")

    def _per_rank_batch(self, global_batch):
        def split(n, what):
            if n % self.world:
                raise ConfigError(f"data.batch_size {what}={n} is not divisible by the {self.world} processes")
            return n // self.world

        if isinstance(global_batch, dict):
            return {int(k): split(v, f"[{k}]") for k, v in global_batch.items()}
        return split(global_batch, "")

    def _print(self, message: str) -> None:
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(message)

    # -- the loop ------------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        if not hasattr(self, "module"):
            self.setup()
        c = self.config
        acc = self.accelerator
        if self.is_main:
            c.dump(self.output_dir / "config.yaml")
            if self.tensorboard_dir is not None:
                acc.init_trackers(self.tensorboard_dir.name)
        from tqdm import tqdm

        progress = tqdm(total=c.optim.steps, initial=self.step, disable=not (self.is_main and c.logging.progress),
                        desc="train", dynamic_ncols=True)
        result = TrainResult(self.step)
        window: dict[str, list[float]] = {}
        last_checkpoint = list_checkpoints(self.checkpoint_dir)[-1] if list_checkpoints(self.checkpoint_dir) else None
        self.module.train()
        data = iter(self.loader)
        try:
            while self.step < c.optim.steps:
                step = self.step + 1
                started = time.perf_counter()
                batch = next(data)
                sample_ids = [self.rank * len(batch["indices"]) + i for i in range(len(batch["indices"]))]
                with acc.autocast():
                    out = self.objective(self.module, batch, step, sample_ids, self.device)
                loss = mean_across_ranks(out.loss).item()
                if not math.isfinite(loss):
                    raise TrainingDiverged(self._diverged("loss", loss, step, last_checkpoint))
                out.loss.backward()
                clip = c.optim.grad_clip if c.optim.grad_clip is not None else float("inf")
                grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, clip)).item()
                if not math.isfinite(grad_norm):
                    raise TrainingDiverged(self._diverged("gradient norm", grad_norm, step, last_checkpoint))
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.module.transformer)
                self.step = step
                self.sampler_state = {**self.sampler.state_dict(), "epoch": batch["position"][0],
                                      "batches_done": batch["position"][1]}
                elapsed = time.perf_counter() - started

                metrics = {"loss": loss, "flow_loss": mean_across_ranks(out.flow).item(), "grad_norm": grad_norm,
                           "lr": lr, "step_time": elapsed, "tokens_per_s": out.tokens * self.world / elapsed}
                if out.repa is not None:
                    metrics["repa_loss"] = mean_across_ranks(out.repa).item()
                result.losses[step] = loss
                for k, v in metrics.items():
                    window.setdefault(k, []).append(v)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if step % c.logging.every == 0 or step == c.optim.steps:
                    self._log(step, {k: sum(v) / len(v) for k, v in window.items()})
                    window.clear()
                for callback in self.callbacks:
                    callback(step, metrics)
                if c.validation is not None and step % c.validation.every == 0:
                    self.validate(step)
                if step % c.checkpointing.every == 0 or (step == c.optim.steps and c.checkpointing.save_final):
                    last_checkpoint = self.save()
        finally:
            progress.close()
            if self.is_main and self.tensorboard_dir is not None:
                acc.end_training()
        result.step = self.step
        result.checkpoint = last_checkpoint
        return result

    def _diverged(self, what: str, value: float, step: int, checkpoint: Path | None) -> str:
        where = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
        return (f"training diverged: {what} is {value} at step {step}; stopped before the update, {where} "
                "(lower optim.lr or raise optim.warmup_steps, then resume)")

    def _log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        with open(self.output_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tensorboard_dir is not None:
            self.accelerator.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def save(self) -> Path:
        c = self.config
        path = save_checkpoint(self.checkpoint_dir, self.step, module=self.module, optimizer=self.optimizer,
                               scheduler=self.scheduler, ema=self.ema, sampler_state=self.sampler_state, config=c,
                               keep_last=c.checkpointing.keep_last)
        return path

    # -- validation ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, step: int) -> dict:
        """Fixed-noise loss on held-out clips (live and EMA weights); sample videos when a pipeline is configured.
        Every rank runs the same forwards (FSDP needs all of them); only the main process writes."""
        v = self.config.validation
        if not hasattr(self, "_val_dataset"):
            held_out = TrajectoryDataset if self.config.objective.kind == "distill" else CachedLatentDataset
            self._val_dataset = held_out(v.cache_dir) if v.cache_dir else self.dataset
        count = min(v.num_samples, len(self._val_dataset))
        groups: dict[str, list[int]] = {}
        for i in range(count):
            groups.setdefault(self._val_dataset.records[i][1]["bucket"], []).append(i)
        self.module.eval()

        def loss() -> float:
            total = 0.0
            for indices in groups.values():
                batch = getattr(self._val_dataset, "collate", collate)([self._val_dataset[i] for i in indices])
                with self.accelerator.autocast():
                    total += self.objective.evaluate(self.module, batch, indices, self.device).item() * len(indices)
            return total / count

        metrics = {"loss": loss()}
        if self.ema is not None:
            with self.ema.applied(self.module.transformer):
                metrics["loss_ema"] = loss()
                if v.prompts:
                    self._sample_videos(step)
        elif v.prompts:
            self._sample_videos(step)
        self.module.train()
        if self.is_main:
            with open(self.output_dir / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **{f"val_{k}": x for k, x in metrics.items()}}) + "\n")
            if self.tensorboard_dir is not None:
                self.accelerator.log({f"val/{k}": x for k, x in metrics.items()}, step=step)
        return metrics

    def _sample_videos(self, step: int) -> None:
        """Videos of the validation prompts with the current (EMA) weights, through the generation pipeline."""
        from ..pipeline.pipeline import GenerationDefaults, MotifVideoPipeline, load_component, read_model_index
        from ..pipeline.video_io import write_video

        v = self.config.validation
        if not hasattr(self, "_pipeline"):
            # Only the folder's text encoder, tokenizer and VAE: the transformer is the one being trained.
            folder, index = read_model_index(v.pipeline, required=("vae", "text_encoder", "tokenizer"))
            dtype = self.compute_dtype
            vae = load_component(folder, index, "vae", torch_dtype=torch.float32 if self.device.type == "cpu"
                                 else dtype).eval().to(self.device)
            text_encoder = load_component(folder, index, "text_encoder", torch_dtype=dtype).eval().to(self.device)
            tokenizer = load_component(folder, index, "tokenizer")
            self._pipeline = MotifVideoPipeline(_ThroughRoot(self.module), vae, text_encoder, tokenizer,
                                                defaults=GenerationDefaults.from_folder(folder))
            self._pipeline.execution_device = self.device
        pipe = self._pipeline
        folder = self.output_dir / "samples" / f"step-{step:08d}"
        for i, prompt in enumerate(v.prompts):
            generator = torch.Generator(device="cpu").manual_seed(self.config.seed + i)
            with self.accelerator.autocast():
                frames = pipe(prompt, height=v.height, width=v.width, num_frames=v.num_frames,
                              num_inference_steps=v.num_inference_steps, generator=generator, output_type="np",
                              progress=False)[0]
            if self.is_main:
                folder.mkdir(parents=True, exist_ok=True)
                write_video((frames * 255).round().astype(np.uint8), folder / f"{i:02d}.mp4",
                            fps=pipe.defaults.fps)


class _ThroughRoot:
    """The generation pipeline's transformer during validation. Calls enter through the training module: under
    FSDP2 that is the root whose hooks gather the embedders' and output head's weights, which calling the inner
    transformer directly would skip."""

    def __init__(self, module: TrainModule):
        self.module = module
        self.config = module.transformer.config

    def parameters(self):
        return self.module.parameters()

    def to(self, *args, **kwargs):  # already placed (and maybe sharded) by the trainer
        return self

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)[0]


def train(config: TrainConfig, *, resume: bool = False, callbacks=None) -> TrainResult:
    return Trainer(config, resume=resume, callbacks=callbacks).train()
