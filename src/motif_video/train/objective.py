"""The training objective: rectified flow matching, plus TREAD routing and REPA alignment, from a batch to a loss.

    x_t = (1 - t) x0 + t eps,   target = eps - x0 (velocity),   model timestep = 1000 t
    t = shift(sigmoid(u)), u ~ N(logit_mean, logit_std),   shift(t) = s t / (1 + (s - 1) t)

Randomness is drawn per sample from a generator seeded by (seed, step, the sample's position in the GLOBAL batch),
never from a global RNG. So a sample gets the same noise, timestep, dropout and route whichever rank holds it and
however the run was split into restarts: two processes reproduce a one-process run, and a resumed run reproduces an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..latents import model_input, token_grid
from ..routing import RouteConfig, TokenRoute, sample_route
from ..pipeline.text import pad_text, text_length
from .config import AlignmentSection, ObjectiveSection


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = s t / (1 + (s - 1) t): s > 1 moves mass toward noise (t = 1), as larger frames need."""
    return shift * t / (1 + (shift - 1) * t)


def sample_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings; hashing keeps neighbouring steps' streams unrelated."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class TrainModule(nn.Module):
    """The transformer and the REPA projector as one module: FSDP2 shards them together, one optimizer covers
    both, and checkpoints name their parameters `transformer.*` and `aligner.*`."""

    def __init__(self, transformer: nn.Module, aligner: nn.Module | None = None, align_block: int | None = None):
        super().__init__()
        self.transformer = transformer
        self.aligner = aligner
        self.align_block = align_block

    def forward(self, hidden_states, timestep, text, text_mask=None, image_embeds=None, *,
                route: TokenRoute | None = None, teacher: torch.Tensor | None = None, teacher_grid=None,
                student_grid=None, encoder_from: tuple[torch.Tensor, torch.Tensor] | None = None):
        """(velocity (B, 16, T, H, W), REPA loss or None). The REPA term is computed only when `teacher` is given.
        `encoder_from` (hidden states, timestep): the encoder runs on these and the velocity reuses its output, as
        sampling with encoder reuse does (few-step distillation). Both passes run inside this one call: under FSDP2
        the root's parameters stay gathered until the backward through both has finished, and the encoder pass's
        output joins the result with weight 0 so that FSDP2's pre-backward hook of that call fires (the encoder's
        tokens alone leave it, and its gathered weights, out of backward)."""
        reuse, encoder_pass = {}, None
        if encoder_from is not None:
            from ..model.transformer import EncoderCache

            cache = EncoderCache()
            encoder_pass = self.transformer(*encoder_from, text, text_mask, image_embeds, encoder_cache=cache)
            cache.refresh = False
            reuse = {"encoder_cache": cache}
        if teacher is None or self.aligner is None:
            velocity = self.transformer(hidden_states, timestep, text, text_mask, image_embeds, route=route, **reuse)
            if encoder_pass is not None:
                velocity = velocity + 0.0 * encoder_pass
            return velocity, None
        velocity, tokens = self.transformer(hidden_states, timestep, text, text_mask, image_embeds, route=route,
                                            capture_block=self.align_block, **reuse)
        # Inside a route the captured block saw only the kept tokens (in kept order): align those.
        routed = route is not None and route.start_layer <= self.align_block < route.end_layer
        repa = self.aligner.loss(tokens, teacher, student_grid, teacher_grid, kept=route.kept if routed else None)
        return velocity, repa


@dataclass
class StepLoss:
    loss: torch.Tensor  # what backward runs on: flow + weight * repa
    flow: torch.Tensor  # detached
    repa: torch.Tensor | None  # detached
    tokens: int  # video tokens in this (local) batch


class FlowMatchingObjective:
    def __init__(self, config: ObjectiveSection, *, seed: int, patch_size: tuple[int, int, int],
                 num_blocks: int, route: RouteConfig | None = None, alignment: AlignmentSection | None = None,
                 empty_prompt: tuple[torch.Tensor, torch.Tensor] | None = None, text_dim: int | None = None):
        self.config = config
        self.seed = seed
        self.patch_size = patch_size
        self.num_blocks = num_blocks
        self.route = route
        if route is not None:
            route.resolve(num_blocks)  # fail now, not at the first step
        self.alignment = alignment
        if empty_prompt is None:
            if text_dim is None:
                raise ConfigError("the objective needs the empty prompt's states or the text dim")
            # No cached empty prompt: one zero token, kept. A fully masked prompt would leave the cross-attention
            # softmax with no key at all (NaN); a zero token projects to a fixed learned "null" embedding instead.
            empty_prompt = (torch.zeros(1, text_dim), torch.ones(1, dtype=torch.bool))
        self.empty_text, self.empty_mask = empty_prompt[0].float(), empty_prompt[1].bool()

    # -- pieces ------------------------------------------------------------------------------------------------------
    def sample_t(self, generator: torch.Generator) -> torch.Tensor:
        u = torch.randn((), generator=generator) * self.config.logit_std + self.config.logit_mean
        return shift_timesteps(torch.sigmoid(u), self.config.shift)

    def grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        return token_grid(tuple(latents.shape[2:]), self.patch_size)

    def repa_active(self, step: int) -> bool:
        a = self.alignment
        return a is not None and a.weight > 0 and (a.stop_step is None or step < a.stop_step)

    def model_inputs(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, *,
                     image_to_video: bool | list[bool] = False,
                     condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's input (B, 33, T, H, W) at noise level t, and its timestep 1000 t.

        Text-to-video: [x_t | zeros | zeros]. Image-to-video (all samples, or those flagged in a per-sample list):
        the clip's clean first latent frame conditions it (`latents.model_input`, exactly as generation builds it
        from the given image): the causal VAE encodes frame 0 on its own, so that latent frame is what encoding the
        first image alone gives. `condition` (B, 16, 1, H, W) replaces that latent (an augmented copy).
        """
        tb = t.view(-1, 1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * eps
        first = x0[:, :, :1] if condition is None else condition
        if isinstance(image_to_video, bool):
            return model_input(x_t, first if image_to_video else None), 1000.0 * t
        if not any(image_to_video):  # the text-to-video input, built as without the flags
            return model_input(x_t), 1000.0 * t
        rows = [model_input(x_t[i:i + 1], first[i:i + 1] if flag else None) for i, flag in enumerate(image_to_video)]
        return torch.cat(rows), 1000.0 * t

    def image_conditions(self, x0: torch.Tensor, step, sample_ids: list[int]
                         ) -> tuple[list[bool], torch.Tensor, list[bool | None], list[bool]]:
        """Which samples are conditioned on their first frame, the (augmented) condition latents (B, 16, 1, H, W),
        per sample whether the condition's own text dropout drops its caption (None: the objective's draw holds),
        and whether a kept caption is replaced by the clip's condition caption (where the batch has one).

        Each draw comes from its own (seed, step, sample, "image") stream, so switching image conditioning on or off
        leaves every sample's noise, timestep, dropout and route unchanged. Images (one latent frame) are never
        conditioned: their first frame is the whole target.
        """
        c = self.config.image_condition
        first = x0[:, :, :1]
        if c is None or c.probability == 0 or x0.shape[2] == 1:
            return [False] * x0.shape[0], first, [None] * x0.shape[0], [False] * x0.shape[0]
        flags, rows, drops, swaps = [], [], [], []
        for i, sid in enumerate(sample_ids):
            g = _generator(sample_seed(self.seed, step, sid, "image"), torch.device("cpu"))
            flags.append(bool(torch.rand((), generator=g) < c.probability))
            row = first[i]
            if flags[-1] and c.noise_std > 0 and bool(torch.rand((), generator=g) < c.noise_probability):
                row = row + c.noise_std * torch.randn(row.shape, generator=g).to(row.device)
            rows.append(row)
            own = flags[-1] and c.text_dropout is not None
            drops.append(bool(torch.rand((), generator=g) < c.text_dropout) if own else None)
            # Drawn last, so a config without condition captions keeps every earlier draw of the stream.
            swaps.append(flags[-1] and c.condition_caption > 0
                         and bool(torch.rand((), generator=g) < c.condition_caption))
        return flags, torch.stack(rows), drops, swaps

    def _texts(self, batch: dict, drop: list[bool], device, swap: list[bool] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's text states: the empty prompt where dropped, its condition caption where swapped and the
        cache holds one, else its caption; padded to (B, L, D) with the keep-mask (B, L)."""
        conditions = batch.get("condition_texts") or [None] * len(drop)
        texts, masks = [], []
        for i, dropped in enumerate(drop):
            if dropped:
                texts.append(self.empty_text)
                masks.append(self.empty_mask)
            elif swap is not None and swap[i] and conditions[i] is not None:
                texts.append(conditions[i].to(batch["text"].device))
                masks.append(None)
            else:
                keep = batch["text_mask"][i]
                length = text_length(keep)
                texts.append(batch["text"][i, :length])
                masks.append(keep[:length])
        text, mask = pad_text(texts, masks)
        return text.to(device), mask.to(device)

    # -- the loss ----------------------------------------------------------------------------------------------------
    def __call__(self, module: nn.Module, batch: dict, step: int, sample_ids: list[int],
                 device: torch.device) -> StepLoss:
        """Loss of one local batch at optimizer step `step`; `sample_ids`: positions in the global batch."""
        x0 = batch["latents"].to(device, torch.float32)  # (B, 16, T', H', W')
        eps, ts, drop, kept = [], [], [], []
        grid = self.grid(x0)
        num_tokens = grid[0] * grid[1] * grid[2]
        for sid in sample_ids:
            scalars = _generator(sample_seed(self.seed, step, sid, "scalars"), torch.device("cpu"))
            ts.append(self.sample_t(scalars))
            drop.append(bool(torch.rand((), generator=scalars) < self.config.text_dropout))
            noise = _generator(sample_seed(self.seed, step, sid, "noise"), device)
            eps.append(torch.randn(x0.shape[1:], generator=noise, device=device))
            if self.route is not None:
                # Its own stream, so switching routing on or off leaves noise, timesteps and dropout unchanged.
                r = sample_route(self.route, self.num_blocks, 1, num_tokens,
                                 generator=_generator(sample_seed(self.seed, step, sid, "route"), torch.device("cpu")))
                if r is not None:
                    kept.append(r)
        eps = torch.stack(eps)
        t = torch.stack(ts).to(device)
        conditioned, condition, condition_drop, swap = self.image_conditions(x0, step, sample_ids)
        drop = [d if own is None else own for d, own in zip(drop, condition_drop)]
        hidden, timestep = self.model_inputs(x0, eps, t, image_to_video=conditioned, condition=condition)
        text, mask = self._texts(batch, drop, device, swap)
        route = None
        if kept:
            route = TokenRoute(kept[0].start_layer, kept[0].end_layer, torch.cat([r.kept for r in kept]).to(device))

        teacher = None
        if self.repa_active(step):
            if "teacher" not in batch:
                raise ConfigError("alignment is on but the batch has no cached teacher features")
            teacher = batch["teacher"].to(device)
        forward = dict(hidden=hidden, timestep=timestep, text=text, mask=mask, route=route, teacher=teacher)
        image_tokens = batch.get("image_tokens") if any(conditioned) else None
        if image_tokens is None:
            velocity, repa = module(hidden, timestep, text, mask, route=route, teacher=teacher,
                                    teacher_grid=batch.get("teacher_grid"), student_grid=grid)
        else:
            velocity, repa = self._split_forward(module, forward, conditioned, image_tokens.to(device),
                                                 batch.get("teacher_grid"), grid)
        flow = F.mse_loss(velocity.float(), (eps - x0).float())
        loss = flow if repa is None else flow + self.alignment.weight * repa
        return StepLoss(loss, flow.detach(), None if repa is None else repa.detach(), x0.shape[0] * num_tokens)

    @staticmethod
    def _split_forward(module, inputs: dict, conditioned: list[bool], image_tokens: torch.Tensor, teacher_grid,
                       grid) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward for the conditioned samples with their image tokens and one for the rest without: image
        tokens are always attended (the model has no mask for them), so a text-to-video sample must not carry any,
        as at generation. Returns the velocity in batch order and the REPA loss averaged over samples."""
        velocity = None
        repa_sum, repa_any = 0.0, False
        for want in (False, True):
            rows = [i for i, flag in enumerate(conditioned) if flag == want]
            if not rows:
                continue
            index = torch.tensor(rows, device=inputs["hidden"].device)
            route = inputs["route"]
            if route is not None:
                route = TokenRoute(route.start_layer, route.end_layer, route.kept[index])
            teacher = inputs["teacher"][index] if inputs["teacher"] is not None else None
            part, repa = module(inputs["hidden"][index], inputs["timestep"][index], inputs["text"][index],
                                inputs["mask"][index], image_tokens[index] if want else None, route=route,
                                teacher=teacher, teacher_grid=teacher_grid, student_grid=grid)
            if velocity is None:
                velocity = part.new_empty((len(conditioned), *part.shape[1:]))
            velocity[index] = part
            if repa is not None:
                repa_sum, repa_any = repa_sum + repa * len(rows), True
        return velocity, (repa_sum / len(conditioned) if repa_any else None)

    @torch.no_grad()
    def evaluate(self, module: nn.Module, batch: dict, sample_ids: list[int], device: torch.device,
                 timesteps=(0.1, 0.3, 0.5, 0.7, 0.9)) -> torch.Tensor:
        """Validation: flow loss at fixed timesteps with fixed noise, full text, no routing. Mean over timesteps."""
        x0 = batch["latents"].to(device, torch.float32)
        text, mask = self._texts(batch, [False] * x0.shape[0], device)
        losses = []
        for j, value in enumerate(timesteps):
            eps = torch.stack([
                torch.randn(x0.shape[1:], generator=_generator(sample_seed(self.seed, "val", sid, j), device),
                            device=device) for sid in sample_ids])
            t = torch.full((x0.shape[0],), float(value), device=device)
            hidden, timestep = self.model_inputs(x0, eps, t)
            velocity, _ = module(hidden, timestep, text, mask)
            losses.append(F.mse_loss(velocity.float(), eps - x0))
        return torch.stack(losses).mean()
