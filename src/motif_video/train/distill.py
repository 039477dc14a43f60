"""Few-step distillation on cached teacher trajectories: a guided many-step teacher -> a guidance-free few-step student.

The teacher (guidance and all) samples each prompt once, from a fixed noise, at its own step count N; the states it
passes through at the student's K-step schedule are cached (`motif-video distill-data`). The student's step count
divides the teacher's, so the student's sigmas are a subset of the teacher's (the same shifted linspace(1, 1/N)) and
the cached states lie exactly on the teacher's ODE trajectory:

    states x_0 .. x_K at sigmas s_0 = 1 > s_1 > ... > s_K = 0      (x_0 = the noise, x_K = the teacher's sample)
    segment k:  input x_k at timestep 1000 s_k, text = the prompt's states (no dropout: guidance is baked in)
    target      v*_k = (x_{k+1} - x_k) / (s_{k+1} - s_k)          the velocity one Euler step needs to land on x_{k+1}
    loss        mean (student(x_k, s_k) - v*_k)^2

So the student's K Euler steps reproduce the teacher's N guided steps (2N transformer rows with CFG): trajectory
distillation (Luhman & Luhman 2021) on the segments of the student's schedule, with guidance distilled in (Meng et
al. 2023); docs/distill.md says why this method. The teacher never runs during training: one forward per sample per
step, like flow matching.

With `encoder_refresh`, the student is trained as it will sample with DDT encoder reuse: on segment k the encoder
runs on the state of the latest refresh step r <= k (x_r at s_r) and the decoder on x_k at s_k, reusing the encoder's
tokens (`EncoderCache`, exactly what the pipeline does), so the gradient reaches the encoder through every step that
reuses it.

With `rollout_fraction` > 0, that fraction of the samples starts its segment from the student's own state instead of
the teacher's (its own Euler steps from the same noise, without gradient) and still targets the teacher's next state:
the student learns to step back onto the teacher's trajectory from where its sampling actually lands (the exposure
bias of training on teacher states only; cf. DAgger, Ross et al. 2011, and the student-state inputs of
consistency-trajectory and on-policy distillation).

Randomness (which segment a sample trains on) comes from a generator seeded by (seed, step, the sample's position in
the GLOBAL batch), as in `objective.FlowMatchingObjective`: two processes reproduce one, a resumed run an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from ..errors import ConfigError, MotifVideoError
from ..files import atomic_write_text
from ..routing import RouteConfig, TokenRoute, sample_route
from .cached import ShardedSamples, collate, default_bucket, load_index_file
from .objective import StepLoss, _generator, sample_seed

FORMAT = "motif-video-teacher-trajectories"
VERSION = 1
INDEX_NAME = "index.json"


# -- the cache -----------------------------------------------------------------------------------------------------
def student_sigmas(teacher_sigmas: list[float], student_steps: int) -> list[float]:
    """The teacher's sigmas (N steps + the final 0) at the student's K step boundaries: every (N/K)-th one."""
    teacher_steps = len(teacher_sigmas) - 1
    if student_steps < 1 or teacher_steps % student_steps:
        raise MotifVideoError(f"the student's steps ({student_steps}) must divide the teacher's ({teacher_steps}), "
                              "so its schedule lies on the teacher's")
    stride = teacher_steps // student_steps
    return [float(teacher_sigmas[i]) for i in range(0, teacher_steps + 1, stride)]


class TrajectoryWriter:
    """Writes trajectory shards and, on `close()`, the index (atomically, last): a folder interrupted mid-write has
    no index and reads as not a cache, never as a partial one."""

    def __init__(self, folder: str | Path, *, teacher: str, sigmas: list[float], sampling: dict,
                 shard_samples: int = 512):
        self.folder = Path(folder)
        if (self.folder / INDEX_NAME).exists():
            raise ConfigError(f"{self.folder} already holds a trajectory cache; choose another folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_samples = shard_samples
        self.index = {"format": FORMAT, "version": VERSION, "teacher": teacher, "sigmas": [float(s) for s in sigmas],
                      "sampling": sampling, "latent_channels": None, "text_dim": None, "shards": [], "samples": []}
        self._pending: dict[str, torch.Tensor] = {}
        self._records: list[dict] = []

    def add(self, states: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None, caption: str) -> None:
        """states (K+1, C, T', H', W') at the index's sigmas; text (L, D) with keep-mask (L,) (padding trimmed)."""
        if states.dim() != 5 or states.shape[0] != len(self.index["sigmas"]):
            raise ConfigError(f"trajectory states must be ({len(self.index['sigmas'])}, C, T, H, W), "
                              f"got {tuple(states.shape)}")
        mask = torch.ones(text.shape[0], dtype=torch.bool) if text_mask is None else text_mask.bool()
        if mask.any():
            last = int(mask.nonzero().max()) + 1
            text, mask = text[:last], mask[:last]
        for name, value in (("latent_channels", states.shape[1]), ("text_dim", text.shape[1])):
            if self.index[name] is None:
                self.index[name] = int(value)
            elif self.index[name] != value:
                raise ConfigError(f"trajectory cache: {name} is {self.index[name]}, a new sample has {value}")
        key = f"s{len(self.index['samples']) + len(self._records):08d}"
        self._records.append({"key": key, "caption": caption, "bucket": default_bucket(states.shape[1:]),
                              "text_len": int(text.shape[0])})
        for name, tensor in (("states", states.float()), ("text", text.float()), ("text_mask", mask.to(torch.uint8))):
            self._pending[f"{key}.{name}"] = tensor.detach().cpu().contiguous()
        if len(self._records) >= self.shard_samples:
            self._flush()

    def _flush(self) -> None:
        if not self._records:
            return
        name = f"shard-{len(self.index['shards']):05d}.safetensors"
        tmp = self.folder / (name + ".tmp")
        save_file(self._pending, str(tmp))
        os.replace(tmp, self.folder / name)
        for record in self._records:
            record["shard"] = name
        self.index["shards"].append(name)
        self.index["samples"].extend(self._records)
        self._pending, self._records = {}, []

    def close(self) -> Path:
        self._flush()
        if not self.index["samples"]:
            raise ConfigError("no trajectories to write")
        atomic_write_text(self.folder / INDEX_NAME, json.dumps(self.index, indent=1))
        return self.folder


def read_trajectory_index(folder: Path) -> dict:
    path = folder / INDEX_NAME
    if not path.is_file():
        raise ConfigError(f"{folder} is not a trajectory cache: it has no {INDEX_NAME} "
                          "(write one with `motif-video distill-data`)")
    return load_index_file(path, FORMAT, VERSION, "trajectory", other_format=(
        f"{folder} is not a teacher-trajectory cache (objective.kind: distill needs one written by "
        "`motif-video distill-data`)"))


class TrajectoryDataset(ShardedSamples):
    """Samples of one or more trajectory caches (same sigmas), with the interface of `cached.CachedLatentDataset`:
    item i -> `latents` (the teacher's sample), `trajectory` (K+1, C, T', H', W'), text, mask, caption, bucket."""

    kind = "trajectory cache"
    teacher_dim = None  # no REPA features

    def __init__(self, folders: list[str | Path] | str | Path, *, buckets: list[str] | None = None):
        self.sigmas: list[float] | None = None
        self.text_dim = None
        super().__init__(folders, buckets)

    def _read_index(self, folder: Path) -> dict:
        index = read_trajectory_index(folder)
        if self.sigmas is not None and index["sigmas"] != self.sigmas:
            raise ConfigError(f"trajectory cache {folder} has sigmas {index['sigmas']}, others {self.sigmas}")
        if self.text_dim is not None and index["text_dim"] != self.text_dim:
            raise ConfigError(f"trajectory cache {folder} has text_dim={index['text_dim']}, others {self.text_dim}")
        self.sigmas, self.text_dim = index["sigmas"], index["text_dim"]
        return index

    def empty_prompt(self):
        return None  # the student never sees the empty prompt: guidance is in the targets

    def __getitem__(self, i: int) -> dict:
        record, shard, item = self._sample(i)
        states = shard.get_tensor(f"{record['key']}.states").float()
        return {**item, "latents": states[-1], "trajectory": states}

    @staticmethod
    def collate(items: list[dict]) -> dict:
        batch = collate(items)
        batch["trajectory"] = torch.stack([it["trajectory"] for it in items])  # (B, K+1, C, T', H', W')
        return batch


# -- building the cache: the teacher samples once --------------------------------------------------------------------
def teacher_trajectories(pipe, prompts: list[str], *, student_steps: int, seeds: list[int] | None = None,
                         generator: torch.Generator | None = None, **sampling) -> tuple[torch.Tensor, list[float]]:
    """Sample `prompts` with the teacher pipeline (its defaults unless `sampling` says otherwise; clip i from noise
    seeded by seeds[i], or the batch's noise drawn from `generator` as the pipeline draws it) and return its states at
    the student's schedule, (B, K+1, C, T', H', W'), and their sigmas."""
    from ..pipeline.pipeline import initial_noise
    from ..pipeline.sampler import make_scheduler

    d = pipe.defaults
    steps = sampling.get("num_inference_steps") or d.num_inference_steps
    solver = sampling.get("solver") or d.solver
    if solver != "euler":
        raise MotifVideoError("trajectory distillation follows the teacher's Euler ODE: use solver euler")
    scheduler = make_scheduler(solver, sampling.get("shift") or d.shift, steps)
    sigmas = student_sigmas(scheduler.sigmas.tolist(), student_steps)
    stride = steps // student_steps
    height, width = sampling.get("height") or d.height, sampling.get("width") or d.width
    frames = sampling.get("num_frames") or d.num_frames
    shape = (1, pipe.codec.latent_channels, *pipe.codec.latent_shape(frames, height, width))
    if (seeds is None) == (generator is None):
        raise MotifVideoError("teacher_trajectories takes seeds or a generator, one of them")
    noise = (initial_noise((len(prompts), *shape[1:]), generator) if seeds is None
             else torch.cat([initial_noise(shape, torch.Generator().manual_seed(s)) for s in seeds]))
    states = [noise.clone()]

    def record(info) -> None:
        if (info.step + 1) % stride == 0:
            states.append(info.latents.detach().float().cpu().clone())

    pipe(prompts, latents=noise, output_type="latent", callback=record, progress=False, **sampling)
    return torch.stack(states, dim=1), sigmas


def write_trajectories(pipe, prompts: Iterable[str], folder: str | Path, *, teacher: str, student_steps: int,
                       seed: int = 0, batch_size: int = 32, report: Callable[[int], None] | None = None,
                       **sampling) -> Path:
    """Teacher trajectories for every prompt into a new cache folder (prompt i's noise from seed (seed, i))."""
    prompts = list(prompts)
    if not prompts:
        raise MotifVideoError("no prompts to distil on")
    writer = None
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        seeds = [sample_seed(seed, "teacher-noise", start + i) for i in range(len(chunk))]
        states, sigmas = teacher_trajectories(pipe, chunk, student_steps=student_steps, seeds=seeds, **sampling)
        text, mask = pipe.prompts.encode(chunk)
        if writer is None:
            d = pipe.defaults
            described = {"num_inference_steps": sampling.get("num_inference_steps") or d.num_inference_steps,
                         "guidance_scale": d.guidance_scale if sampling.get("guidance_scale") is None
                         else sampling["guidance_scale"], "guider": sampling.get("guider") or d.guider,
                         "shift": sampling.get("shift") or d.shift,
                         **{k: v for k, v in sampling.items() if k not in ("num_inference_steps", "guidance_scale",
                                                                            "guider", "shift")},
                         "student_steps": student_steps, "seed": seed}
            writer = TrajectoryWriter(folder, teacher=teacher, sigmas=sigmas, sampling=described)
        for i, caption in enumerate(chunk):
            writer.add(states[i], text[i].float().cpu(), None if mask is None else mask[i].cpu(), caption)
        if report is not None:
            report(start + len(chunk))
    return writer.close()


# -- the objective ---------------------------------------------------------------------------------------------------
def refresh_step(segment: int, refresh: list[int] | None) -> int:
    """The sampling step whose encoder output segment `segment` uses: itself, or the latest refresh step before it."""
    if refresh is None:
        return segment
    return max(r for r in refresh if r <= segment)


class DistillationObjective:
    """Behind the same interface as `objective.FlowMatchingObjective`: `__call__` -> StepLoss, `evaluate`."""

    def __init__(self, *, seed: int, sigmas: list[float], encoder_refresh: list[int] | None = None,
                 rollout_fraction: float = 0.0, segment_weights: list[float] | None = None,
                 num_blocks: int | None = None, route: RouteConfig | None = None,
                 patch_size: tuple[int, int, int] = (1, 2, 2)):
        if len(sigmas) < 2 or any(a <= b for a, b in zip(sigmas, sigmas[1:])) or sigmas[-1] != 0:
            raise ConfigError(f"trajectory sigmas must fall strictly to 0, got {sigmas}")
        if not 0.0 <= rollout_fraction <= 1.0:
            raise ConfigError(f"objective.rollout_fraction must be in [0, 1], got {rollout_fraction}")
        self.seed = seed
        self.rollout_fraction = rollout_fraction
        self.sigmas = torch.tensor(sigmas, dtype=torch.float64)
        self.steps = len(sigmas) - 1
        if segment_weights is not None and (len(segment_weights) != self.steps or min(segment_weights) < 0
                                            or sum(segment_weights) <= 0):
            raise ConfigError(f"objective.segment_weights must hold {self.steps} weights >= 0 (one per step of the "
                              f"cache's schedule) with a positive sum, got {segment_weights}")
        self.segment_weights = None if segment_weights is None else torch.tensor(segment_weights, dtype=torch.float64)
        if encoder_refresh is not None:
            if not encoder_refresh or min(encoder_refresh) != 0 or max(encoder_refresh) >= self.steps:
                raise ConfigError(f"objective.encoder_refresh must include 0 and lie in [0, {self.steps}) for the "
                                  f"cache's {self.steps}-step schedule, got {encoder_refresh}")
            if route is not None:
                raise ConfigError("objective.encoder_refresh (encoder reuse) cannot be combined with routing")
        self.encoder_refresh = None if encoder_refresh is None else sorted(set(encoder_refresh))
        self.route, self.num_blocks, self.patch_size = route, num_blocks, patch_size
        if route is not None:
            route.resolve(num_blocks)

    def repa_active(self, step: int) -> bool:
        return False  # distillation trains without REPA (the config refuses the pair)

    def segment(self, step: int, sample_id: int) -> int:
        """The segment (student step) sample `sample_id` of the global batch trains on at optimizer step `step`."""
        generator = _generator(sample_seed(self.seed, step, sample_id, "segment"), torch.device("cpu"))
        if self.segment_weights is None:
            return int(torch.randint(self.steps, (), generator=generator))
        return int(torch.multinomial(self.segment_weights, 1, generator=generator))

    def rolls_out(self, step: int, sample_id: int) -> bool:
        """Whether sample `sample_id` starts its segment from the student's own state at optimizer step `step`."""
        if self.rollout_fraction == 0.0:
            return False
        generator = _generator(sample_seed(self.seed, step, sample_id, "rollout"), torch.device("cpu"))
        return bool(torch.rand((), generator=generator) < self.rollout_fraction)

    @staticmethod
    def model_input(x: torch.Tensor) -> torch.Tensor:
        """[x | zero condition latent | zero mask] (B, 33, T, H, W): text-to-video, as the pipeline feeds it."""
        return torch.cat([x, torch.zeros_like(x), torch.zeros_like(x[:, :1])], dim=1)

    def targets(self, trajectory: torch.Tensor, segments: torch.Tensor,
                inputs: torch.Tensor | None = None) -> torch.Tensor:
        """v*_k = (x_{k+1} - x_k) / (s_{k+1} - s_k) per sample, (B, C, T', H', W'), in float64 then float32; x_k
        from `inputs` when given (the student's own states), x_{k+1} always the teacher's."""
        rows = torch.arange(trajectory.shape[0], device=trajectory.device)
        inputs = trajectory if inputs is None else inputs
        start, end = inputs[rows, segments].double(), trajectory[rows, segments + 1].double()
        ds = (self.sigmas[segments.cpu() + 1] - self.sigmas[segments.cpu()]).to(trajectory.device)
        return ((end - start) / ds.view(-1, 1, 1, 1, 1)).float()

    @torch.no_grad()
    def student_states(self, module: nn.Module, trajectory: torch.Tensor, segments: torch.Tensor,
                       rollout: torch.Tensor, text, mask) -> torch.Tensor:
        """The trajectories with each `rollout` row's states x_1 .. x_k replaced by the student's own: its Euler
        steps (encoder reuse as it samples) from the same noise, without gradient. Every process runs K-1 forwards
        whatever its rows need (one row when none), so FSDP2's collectives stay in step across processes."""
        states = trajectory.clone()
        sigma = self.sigmas.float().to(trajectory.device)
        for j in range(self.steps - 1):
            active = (rollout & (segments > j)).nonzero().flatten()
            rows = active if active.numel() else torch.zeros(1, dtype=torch.long, device=trajectory.device)
            at = torch.full((rows.numel(),), j, device=trajectory.device)
            v = self.velocity(module, states[rows], at, text[rows], None if mask is None else mask[rows])
            states[active, j + 1] = (states[rows, j] + (sigma[j + 1] - sigma[j]) * v.float())[:active.numel()]
        return states

    def velocity(self, module: nn.Module, trajectory: torch.Tensor, segments: torch.Tensor, text, mask,
                 route: TokenRoute | None = None) -> torch.Tensor:
        """The student's velocity at each sample's segment start, sampled as the pipeline samples it."""
        rows = torch.arange(trajectory.shape[0], device=trajectory.device)
        sigma = self.sigmas.float().to(trajectory.device)
        x = trajectory[rows, segments]
        if self.encoder_refresh is None:
            return module(self.model_input(x), 1000.0 * sigma[segments], text, mask, route=route)[0]
        sources = torch.tensor([refresh_step(int(k), self.encoder_refresh) for k in segments], device=x.device)
        encoder_from = (self.model_input(trajectory[rows, sources]), 1000.0 * sigma[sources])
        return module(self.model_input(x), 1000.0 * sigma[segments], text, mask, encoder_from=encoder_from)[0]

    def __call__(self, module: nn.Module, batch: dict, step: int, sample_ids: list[int],
                 device: torch.device) -> StepLoss:
        trajectory = batch["trajectory"].to(device, torch.float32)  # (B, K+1, C, T', H', W')
        if trajectory.shape[1] != self.steps + 1:
            raise ConfigError(f"the batch's trajectories have {trajectory.shape[1]} states, the objective expects "
                              f"{self.steps + 1}")
        segments = torch.tensor([self.segment(step, sid) for sid in sample_ids], device=device)
        _, _, _, t, h, w = trajectory.shape
        pt, ph, pw = self.patch_size
        num_tokens = (t // pt) * (h // ph) * (w // pw)
        route = None
        if self.route is not None:
            kept = [sample_route(self.route, self.num_blocks, 1, num_tokens,
                                 generator=_generator(sample_seed(self.seed, step, sid, "route"), torch.device("cpu")))
                    for sid in sample_ids]
            if kept[0] is not None:
                route = TokenRoute(kept[0].start_layer, kept[0].end_layer,
                                   torch.cat([r.kept for r in kept]).to(device))
        text, mask = batch["text"].to(device), batch["text_mask"].to(device)
        inputs = trajectory
        if self.rollout_fraction > 0.0:
            rollout = torch.tensor([self.rolls_out(step, sid) for sid in sample_ids], device=device)
            # Exposure bias: the student also learns to step from where its own sampling lands back onto the
            # teacher's next state (the rows' targets start from their own states).
            inputs = self.student_states(module, trajectory, segments, rollout, text, mask)
        velocity = self.velocity(module, inputs, segments, text, mask, route)
        loss = F.mse_loss(velocity.float(), self.targets(trajectory, segments, inputs))
        return StepLoss(loss, loss.detach(), None, trajectory.shape[0] * num_tokens)

    @torch.no_grad()
    def evaluate(self, module: nn.Module, batch: dict, sample_ids: list[int], device: torch.device) -> torch.Tensor:
        """Validation: the loss on every segment of every sample (no randomness), mean over segments."""
        trajectory = batch["trajectory"].to(device, torch.float32)
        text, mask = batch["text"].to(device), batch["text_mask"].to(device)
        losses = []
        for k in range(self.steps):
            segments = torch.full((trajectory.shape[0],), k, device=device)
            velocity = self.velocity(module, trajectory, segments, text, mask)
            losses.append(F.mse_loss(velocity.float(), self.targets(trajectory, segments)))
        return torch.stack(losses).mean()

