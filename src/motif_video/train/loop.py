"""The training loop: cached latents in, checkpoints out.

One process per device (launched by `accelerate launch` or `torchrun`; plain `python` for one CPU/GPU). Accelerate
sets up the process group, the device, autocast and TensorBoard; the model is sharded from outside by
`parallel.parallelize` (FSDP2 over ranks, activation checkpointing), and the loss comes from `objective`.

A step: this rank's micro-batches of the global batch (`steps`: bucketed batches or the shard planner) -> for each,
flow-matching loss (+ REPA) weighted by its share of the step's samples -> backward (gradients accumulate) -> clip ->
AdamW -> LR schedule -> EMA. A non-finite loss or gradient norm stops the run before the optimizer touches the
weights; checkpoints whose weights or losses left their recent history are set aside, so that the last healthy one
is what a resume continues from. One run at a time per output_dir (a lock file).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, MotifVideoError
from ..files import atomic_write_text, lock_holder, try_exclusive_lock
from ..model_folder import default_device_dtype
from .buckets import Bucket, BucketSet
from .cached import CachedLatentDataset, collate
from .checkpoint import (broadcast_from_main, checkpoint_health, list_checkpoints, load_latest, save_checkpoint,
                         set_aside)
from .config import TrainConfig
from .ema import EMA
from .objective import FlowMatchingObjective, TrainModule
from .distill import DistillationObjective, TrajectoryDataset
from .parallel import full_tensor, parallelize, reshard, sum_across_ranks, training_grid, weight_norm
from .stages import build_transformer
from .steps import make_steps

# A checkpoint counts as healthy (may be named as the last good state, is never pruned while it is the newest
# such) when its weight norm is within this factor of the previous healthy one's (or the initial weights') and
# the mean loss of the steps before it is within LOSS_BOUND of the median of the recent losses. A blow-up moves
# weights by orders of magnitude; normal training changes the norm by percents between checkpoints.
WEIGHT_NORM_BOUND = 4.0
LOSS_BOUND = 10.0
LOSS_HISTORY = 200


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
class _Tagged(Dataset):
    """Carries each micro-batch's place in its step along with each index, so a consumed micro-batch knows its
    sample ids, loss weight and the data position after its step, even when DataLoader workers prefetch ahead."""

    def __init__(self, dataset: CachedLatentDataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, tag = item
        sample = self.dataset[index]
        sample["tag"] = tag
        return sample


class _MicroBatches:
    """The step source as a DataLoader batch sampler: one micro-batch at a time."""

    def __init__(self, steps):
        self.steps = steps

    def __iter__(self):
        for step in self.steps:
            count = len(step.micro_batches)
            for k, mb in enumerate(step.micro_batches):
                tag = {"k": k, "count": count, "sample_ids": mb.sample_ids, "weight": mb.weight,
                       "position": step.position}
                yield [(i, tag) for i in mb.indices]


def _collate(items: list[dict], collate=collate) -> dict:
    batch = collate(items)
    batch["tag"] = items[0]["tag"]
    return batch


class RunLock:
    """An exclusive lock on a run folder for the lifetime of a training run (released by the OS if the process
    dies): two runs writing one folder would interleave their logs and checkpoints."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.handle = None

    def acquire(self) -> str | None:
        """None when taken; otherwise why not."""
        self.handle = try_exclusive_lock(self.path)
        if self.handle is None:
            return (f"{self.path.parent} is in use by another training run ({lock_holder(self.path)}); wait for it "
                    "to finish or choose another output_dir")
        return None

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


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
        self.lock = RunLock(self.output_dir)

    # -- setup ---------------------------------------------------------------------------------------------------------
    def _precision(self) -> torch.dtype:
        p = self.config.precision
        if p == "auto":
            return default_device_dtype()[1]
        return torch.bfloat16 if p == "bf16" else torch.float32

    def setup(self) -> None:
        try:
            self._setup()
        except BaseException:
            self.lock.release()
            raise

    def _setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

        from ..parallel.launch import COLLECTIVE_TIMEOUT

        c = self.config
        cuda = torch.cuda.is_available()
        self.compute_dtype = self._precision()
        self.tensorboard_dir = None
        if c.logging.tensorboard is not None:
            self.tensorboard_dir = self.output_dir / c.logging.tensorboard  # an absolute path replaces output_dir
        self.accelerator = Accelerator(
            cpu=not cuda, mixed_precision="bf16" if self.compute_dtype == torch.bfloat16 else "no",
            kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
            log_with="tensorboard" if self.tensorboard_dir else None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir),
                logging_dir=str(self.tensorboard_dir.parent) if self.tensorboard_dir else None))
        acc = self.accelerator
        self.device, self.rank, self.world = acc.device, acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        # Sequence parallelism (parallel/): each sample's video tokens over ulysses x ring processes, which all see
        # the same samples; data-parallel rank and size count those groups. The grid's mesh also carries FSDP.
        self.grid = training_grid(c.parallel.ulysses, c.parallel.ring)
        self.sequence = self.grid.shape.sequence
        self.data_rank, self.data_world = self.grid.data_rank, self.grid.shape.data

        # 0. The run folder: ours alone for this run (rank 0 holds the lock; every rank learns the verdict)
        busy = self.lock.acquire() if self.is_main else None
        busy = broadcast_from_main(busy)
        if busy is not None:
            raise ConfigError(busy)
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
        buckets = [Bucket.parse(k) for k in self.dataset.bucket_keys]
        bucket_set = BucketSet(buckets)
        self.steps = make_steps(c.data, [bucket_set.index(b) for b in buckets], bucket_set, seed=c.seed,
                                rank=self.data_rank, world=self.data_world)
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
                                  grad_checkpointing=c.grad_checkpointing, grid=self.grid,
                                  reshard_after_forward=c.parallel.reshard_after_forward,
                                  compile_backend=c.compile_backend if c.compile else None)
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

        self.objective = FlowMatchingObjective(
            c.objective, seed=c.seed, patch_size=transformer.config.patch, num_blocks=num_blocks, route=c.route_config(), alignment=align,
            empty_prompt=self.dataset.empty_prompt(), text_dim=self.dataset.text_dim)
        if c.objective.kind == "distill":
            self.objective = DistillationObjective(
                seed=c.seed, sigmas=self.dataset.sigmas, encoder_refresh=c.objective.encoder_refresh,
                rollout_fraction=c.objective.rollout_fraction, segment_weights=c.objective.segment_weights,
                num_blocks=num_blocks, route=c.route_config(), patch_size=self.objective.patch_size)

        # 4. Resume: the newest usable checkpoint (damaged ones are passed over with a warning)
        self.step = 0
        self.reference = {"weight_norm": weight_norm(self.params), "loss": None}  # health reference
        if self.resume and existing:
            state = load_latest(self.checkpoint_dir, module=self.module, optimizer=self.optimizer, ema=self.ema,
                                config=c, log=self._print)
            if state is None:
                raise ConfigError(f"no checkpoint in {self.checkpoint_dir} can be resumed from (see the warnings); "
                                  "move them away to start afresh")
            self.step = int(state["step"])
            self.steps.load_state_dict({**state["data"], "world_size": state["world_size"]})
            health = state["health"]
            if health.get("healthy", True) and health.get("weight_norm") is not None:
                self.reference = {"weight_norm": health["weight_norm"], "loss": health.get("loss")}
            self._print(f"resumed from {state['path']} at step {self.step}"
                        + (f" (written by {state['world_size']} processes, now {self.world})"
                           if state["world_size"] != self.world else ""))
        elif self.resume:
            self._print(f"nothing to resume in {self.checkpoint_dir}; starting from step 0")
        self._set_schedule(self.step)
        self.data_position = self.steps.state_dict()
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.step == 0:
                (self.output_dir / "log.jsonl").unlink(missing_ok=True)
            else:
                self._trim_log(self.step)
        self.loader = DataLoader(_Tagged(self.dataset), batch_sampler=_MicroBatches(self.steps),
                                 collate_fn=partial(_collate, collate=getattr(self.dataset, "collate", collate)),
                                 num_workers=c.data.num_workers,
                                 pin_memory=self.device.type == "cuda")

    def _set_schedule(self, step: int) -> None:
        """The optimizer's hyperparameters from the config and its learning rate for `step`: after a resume the
        config's lr and schedule apply, not the ones the checkpoint was trained with."""
        o = self.config.optim
        for group in self.optimizer.param_groups:
            group.update(initial_lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        self.scheduler.base_lrs = [o.lr] * len(self.optimizer.param_groups)
        self.scheduler.last_epoch = step
        lrs = [o.lr * lr_factor(step, o.warmup_steps, o.steps, o.schedule, o.min_lr_ratio)
               for _ in self.optimizer.param_groups]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs

    def _trim_log(self, step: int) -> None:
        """Drop the log lines of steps after `step`, written by a run that stopped after its last checkpoint (and a
        line cut short by a kill): the resumed run logs those steps again, each then appears once."""
        path = self.output_dir / "log.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def _print(self, message: str) -> None:
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(message)

    # -- the loop ------------------------------------------------------------------------------------------------------
    def _micro_batches(self, data) -> list[dict]:
        first = next(data)
        return [first] + [next(data) for _ in range(first["tag"]["count"] - 1)]

    def train(self) -> TrainResult:
        try:
            if not hasattr(self, "module"):
                self.setup()
            return self._train()
        finally:
            self.lock.release()

    def _train(self) -> TrainResult:
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
        self.losses: deque[float] = deque(maxlen=LOSS_HISTORY)
        self.since_checkpoint: list[float] = []
        last_checkpoint = list_checkpoints(self.checkpoint_dir)[-1] if list_checkpoints(self.checkpoint_dir) else None
        self.module.train()
        data = iter(self.loader)
        try:
            while self.step < c.optim.steps:
                step = self.step + 1
                started = time.perf_counter()
                micro = self._micro_batches(data)
                # Each micro-batch's mean loss weighted by its share of the step's samples: the gradients sum to
                # those of the whole global batch's mean. FSDP averages gradients over ranks, hence x world; the
                # ranks of one sample's sequence group each hold its whole loss and their gradients add up, hence
                # x data-parallel world only (totals below count each group's loss that many times).
                local = torch.zeros(3, dtype=torch.float64)  # weighted loss, flow loss, REPA loss
                tokens = 0
                for batch in micro:
                    tag = batch["tag"]
                    with acc.autocast():
                        out = self.objective(self.module, batch, step, tag["sample_ids"], self.device)
                    (out.loss * (tag["weight"] * self.data_world)).backward()
                    local += torch.tensor([out.loss.item(), out.flow.item(),
                                           out.repa.item() if out.repa is not None else 0.0],
                                          dtype=torch.float64) * tag["weight"]
                    tokens += out.tokens if tag["weight"] > 0 else 0
                totals = sum_across_ranks(torch.cat([local, torch.tensor([float(tokens)], dtype=torch.float64)]))
                totals /= self.sequence
                loss = totals[0].item()
                if not math.isfinite(loss):
                    raise TrainingDiverged(self._diverged("loss", loss, step))
                clip = c.optim.grad_clip if c.optim.grad_clip is not None else float("inf")
                grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.params, clip)).item()
                if not math.isfinite(grad_norm):
                    raise TrainingDiverged(self._diverged("gradient norm", grad_norm, step))
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.module.transformer)
                self.step = step
                self.data_position = micro[-1]["tag"]["position"]
                self.losses.append(loss)
                self.since_checkpoint.append(loss)
                elapsed = time.perf_counter() - started

                metrics = {"loss": loss, "flow_loss": totals[1].item(), "grad_norm": grad_norm,
                           "lr": lr, "step_time": elapsed, "tokens_per_s": totals[3].item() / elapsed}
                if self.objective.repa_active(step):
                    metrics["repa_loss"] = totals[2].item()
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

    def _health(self) -> dict:
        """Whether the weights about to be saved look like the run's recent history (see WEIGHT_NORM_BOUND)."""
        norm = weight_norm(self.params)
        recent = self.since_checkpoint[-10:]
        loss = sum(recent) / len(recent) if recent else None
        typical = statistics.median(self.losses) if self.losses else None
        ok_norm = math.isfinite(norm) and norm <= WEIGHT_NORM_BOUND * self.reference["weight_norm"]
        ok_loss = loss is None or (math.isfinite(loss) and (typical is None or loss <= LOSS_BOUND * typical))
        return {"healthy": bool(ok_norm and ok_loss), "loss": loss, "weight_norm": norm}

    def _diverged(self, what: str, value: float, step: int) -> str:
        """The error message, after setting aside the checkpoints written since the last healthy one (so that a
        plain --resume continues from the last good state)."""
        found = list_checkpoints(self.checkpoint_dir)
        healthy = [p for p in found if checkpoint_health(p).get("healthy", True)]
        good = healthy[-1] if healthy else None
        bad = [p for p in found if good is None or p.name > good.name]
        moved = []
        if self.is_main and bad:
            moved = set_aside(bad, "diverged")
        moved_names = broadcast_from_main([p.name for p in moved])
        where = (f"the last good checkpoint is {good}" if good else
                 "no checkpoint from before the blow-up exists")
        if moved_names:
            where += f" ({len(moved_names)} later one(s) with blown-up weights renamed to {moved_names[0]}...)"
        return (f"training diverged: {what} is {value} at step {step}; stopped before the update, {where}; "
                f"lower optim.lr (now {self.config.optim.lr:g}) or raise optim.warmup_steps and resume: "
                f"motif-video train {self.output_dir} --override optim.lr=...")

    def _log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        with open(self.output_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tensorboard_dir is not None:
            self.accelerator.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def save(self) -> Path:
        c = self.config
        health = self._health()
        path = save_checkpoint(self.checkpoint_dir, self.step, module=self.module, optimizer=self.optimizer,
                               ema=self.ema, data_state=self.data_position, config=c,
                               keep_last=c.checkpointing.keep_last, health=health)
        if health["healthy"]:
            self.reference = health
        self.since_checkpoint = []
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
            reshard(self.module)
            return total / count

        metrics = {"loss": loss()}
        videos = bool(v.prompts or v.image) or (v.pipeline is not None and self.config.objective.image_condition)
        if self.ema is not None:
            with self.ema.applied(self.module.transformer):
                metrics["loss_ema"] = loss()
                if videos:
                    self._sample_videos(step)
        elif videos:
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
        from ..model_folder import CONDITIONING_PARTS, ModelFolder
        from ..pipeline.pipeline import MotifVideoPipeline
        from ..pipeline.video_io import write_video

        v = self.config.validation
        if not hasattr(self, "_pipeline"):
            # Only the folder's text encoder, tokenizer and VAE: the transformer is the one being trained.
            folder = ModelFolder(v.pipeline, required=CONDITIONING_PARTS)
            self._pipeline = MotifVideoPipeline(
                self.module.transformer, folder.vae(self.device, self.compute_dtype).to(self.device),
                folder.text_encoder(self.compute_dtype).to(self.device), folder.tokenizer(),
                image_processor=folder.image_processor(), defaults=folder.defaults)
        pipe = self._pipeline
        folder = self.output_dir / "samples" / f"step-{step:08d}"
        samples = [(f"{i:02d}", prompt, None) for i, prompt in enumerate(v.prompts)]
        if v.image is not None or self.config.objective.image_condition is not None:
            samples.append(("i2v", *self._validation_image(pipe)))
        for i, (name, prompt, image) in enumerate(samples):
            generator = torch.Generator(device="cpu").manual_seed(self.config.seed + i)
            with self.accelerator.autocast():
                frames = pipe(prompt, image=image, height=v.height, width=v.width, num_frames=v.num_frames,
                              num_inference_steps=v.num_inference_steps, generator=generator, output_type="np",
                              progress=False)[0]
            if self.is_main:
                folder.mkdir(parents=True, exist_ok=True)
                write_video((frames * 255).round().astype(np.uint8), folder / f"{name}.mp4",
                            fps=pipe.defaults.fps)
                if image is not None:
                    write_video(np.asarray(image)[None], folder / f"{name}.image.png")
        reshard(self.module)

    def _validation_image(self, pipe) -> tuple[str, np.ndarray]:
        """(prompt, first frame (H, W, 3) uint8) of the image-to-video sample video: `validation.image` with the
        first prompt, or the first validation clip's caption and its own first frame, decoded from its latent."""
        from PIL import Image

        v = self.config.validation
        if v.image is not None:
            try:
                return v.prompts[0], np.asarray(Image.open(v.image).convert("RGB"))
            except OSError:
                raise ConfigError(f"validation.image: cannot read {v.image}") from None
        dataset = getattr(self, "_val_dataset", self.dataset)
        clip = next((dataset[i] for i in range(len(dataset)) if dataset[i]["latents"].shape[1] > 1), dataset[0])
        with torch.no_grad():
            first = pipe.codec.decode(clip["latents"][None, :, :1].to(self.device))  # (1, 3, 1, H, W) in [-1, 1]
        rgb = ((first[0, :, 0].float().permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
        return clip["caption"], rgb.to(torch.uint8).cpu().numpy()


def train(config: TrainConfig, *, resume: bool = False, callbacks=None) -> TrainResult:
    return Trainer(config, resume=resume, callbacks=callbacks).train()
