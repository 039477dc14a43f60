"""Matmul FLOPs of the transformer: an analytic count per block, and a measured count to check it against.

Only matrix products are counted (Linear, the patch Conv3d, the two attention products QK^T and AV); norms,
RoPE, softmax, GELU and gating are elementwise and memory-bound, and `torch.utils.flop_counter.FlopCounterMode`
skips them too, so the two counts agree exactly. A multiply-add is 2 FLOPs. Bias additions are not counted.

Notation: B batch (2x the prompts with guidance: cond and uncond run as one batch), N video tokens, L context
tokens (text + I2V image tokens), L_t text tokens, D hidden size (= heads x head_dim), M MLP width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import MotifVideoError
from .latents import token_grid
from .model.config import TransformerConfig

TIMESTEP_FEATURES = 256  # sinusoidal features fed to the timestep MLP (embeddings.TimestepEmbedding)


def video_tokens(config: TransformerConfig, latent: tuple[int, int, int]) -> int:
    """Tokens of a (T, H, W) latent after the patch embedding."""
    return math.prod(token_grid(latent, config.patch))


def _linear(tokens: int, fan_in: int, fan_out: int) -> int:
    return 2 * tokens * fan_in * fan_out


def _attention(queries: int, keys: int, hidden: int) -> int:
    """QK^T and AV summed over heads: 2 products of queries x keys x head_dim per head."""
    return 2 * 2 * queries * keys * hidden


@dataclass(frozen=True)
class BlockFlops:
    """Forward FLOPs of one block, by kind of work (for one batch element unless scaled)."""

    projections: int  # Q/K/V and attention output projections (incl. the cross-attention's)
    attention: int  # QK^T and AV, self and cross
    mlp: int  # MLP in and out (single-stream: proj_mlp and the MLP part of the fused proj_out)
    modulation: int  # AdaLN-Zero Linear(SiLU(temb))

    @property
    def total(self) -> int:
        return self.projections + self.attention + self.mlp + self.modulation

    def scaled(self, factor: int) -> "BlockFlops":
        return BlockFlops(*(factor * getattr(self, f) for f in ("projections", "attention", "mlp", "modulation")))


def _cross_attention(c: TransformerConfig, num_video: int, text_tokens: int) -> tuple[int, int]:
    """(projections, attention) of Shared Cross-Attention; tied and untied forms do the same products.

    Queries come from the N video tokens, keys/values from the text only (I2V image tokens are excluded).
    """
    d = c.hidden_size
    projections = 2 * _linear(num_video, d, d) + 2 * _linear(text_tokens, d, d)  # q, out; k, v
    return projections, _attention(num_video, text_tokens, d)


def dual_block_flops(c: TransformerConfig, num_video: int, context: int, text_tokens: int) -> BlockFlops:
    """MMDiT block: separate weights per stream, joint attention over N + L tokens."""
    d, m, s = c.hidden_size, int(c.hidden_size * c.mlp_ratio), num_video + context
    projections = 4 * _linear(s, d, d)  # q, k, v, out for each stream: together 4 products over all S tokens
    attention = _attention(s, s, d)
    if c.enable_text_cross_attention_dual:
        cross_proj, cross_attn = _cross_attention(c, num_video, text_tokens)
        projections, attention = projections + cross_proj, attention + cross_attn
    return BlockFlops(projections, attention, 2 * _linear(s, d, m), 2 * _linear(1, d, 6 * d))


def single_block_flops(c: TransformerConfig, num_x: int, num_context: int, cross_text_tokens: int = 0) -> BlockFlops:
    """FLUX-style block over [x; context]: fused output projection over [attention (D); MLP (M)].

    Encoder: x = video, context = text (+ image), cross-attention to `cross_text_tokens` text tokens.
    Decoder: x = decoder tokens, context = the encoder's video tokens (2N in all), no cross-attention.
    """
    d, m, s = c.hidden_size, int(c.hidden_size * c.mlp_ratio), num_x + num_context
    projections = 3 * _linear(s, d, d) + _linear(s, d, d)  # q, k, v; the attention columns of proj_out
    attention = _attention(s, s, d)
    if cross_text_tokens:
        cross_proj, cross_attn = _cross_attention(c, num_x, cross_text_tokens)
        projections, attention = projections + cross_proj, attention + cross_attn
    mlp = _linear(s, d, m) + _linear(s, m, d)  # proj_mlp; the MLP columns of proj_out
    return BlockFlops(projections, attention, mlp, _linear(1, d, 3 * d))


@dataclass(frozen=True)
class ForwardFlops:
    """One transformer forward, split into the parts encoder reuse treats differently."""

    embed: int  # patch conv, timestep MLP, text (and image) projection: run on every step
    dual: BlockFlops  # all dual-stream blocks together
    encoder: BlockFlops  # all single-stream encoder blocks together
    decoder: BlockFlops  # all decoder blocks together
    head: int  # AdaLN-continuous modulation and the output projection

    @property
    def encoder_total(self) -> int:
        """What a reused encoder output saves: the dual and single-stream encoder blocks."""
        return self.dual.total + self.encoder.total

    @property
    def total(self) -> int:
        return self.embed + self.encoder_total + self.decoder.total + self.head

    @property
    def reuse_step(self) -> int:
        """A step that takes the encoder's output from an earlier step (EncoderCache with refresh=False)."""
        return self.total - self.encoder_total


def forward_flops(c: TransformerConfig, num_video: int, text_tokens: int, image_tokens: int = 0,
                  batch: int = 1) -> ForwardFlops:
    """Analytic matmul FLOPs of `MotifVideoTransformer.forward` for `batch` samples of `num_video` tokens."""
    d = c.hidden_size
    if image_tokens and c.image_embed_dim is None:
        raise MotifVideoError("image tokens given for a model without an image projection (image_embed_dim)")
    context = text_tokens + image_tokens
    patch_volume = math.prod(c.patch)
    embed = (
        _linear(num_video, c.in_channels * patch_volume, d)  # Conv3d with stride = kernel: one product per token
        + _linear(1, TIMESTEP_FEATURES, d) + _linear(1, d, d)
        + _linear(text_tokens, c.text_embed_dim, d) + _linear(text_tokens, d, d)
    )
    if image_tokens:
        di = c.image_embed_dim
        embed += _linear(image_tokens, di, di) + _linear(image_tokens, di, d)
    cross = text_tokens if c.enable_text_cross_attention_single else 0
    head = _linear(1, d, 2 * d) + _linear(num_video, d, patch_volume * c.out_channels)
    return ForwardFlops(
        embed=batch * embed,
        dual=dual_block_flops(c, num_video, context, text_tokens).scaled(batch * c.num_layers),
        encoder=single_block_flops(c, num_video, context, cross).scaled(batch * c.num_encoder_single_layers),
        decoder=single_block_flops(c, num_video, num_video).scaled(batch * c.num_decoder_layers),
        head=batch * head,
    )


def encoder_runs(steps: int, reuse: int) -> int:
    """Steps on which the encoder runs with `encoder_reuse=reuse`: len(pipeline.encoder_schedule.uniform_refresh)."""
    return math.ceil(steps / reuse)


def sampling_flops(flops: ForwardFlops, steps: int, reuse: int = 1) -> int:
    """All transformer FLOPs of one video: every step runs embed + decoder + head, the encoder only on refreshes."""
    return steps * flops.reuse_step + encoder_runs(steps, reuse) * flops.encoder_total


# -- measured counts -------------------------------------------------------------------------------------------
def count_flops(run: Callable[[], object]) -> int:
    """FLOPs that `FlopCounterMode` counts while `run()` executes, with SDPA forced to the math backend.

    The math backend decomposes attention into matmuls that the counter sees on every device; PyTorch's fused CPU
    kernel is not registered with the counter and would count as zero.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def meta_model_inputs(config: TransformerConfig, latent: tuple[int, int, int], batch: int, text_len: int,
                      image_tokens: int = 0):
    """A model and zero inputs on the meta device: shapes without memory or compute, for counting at full size."""
    from .model.transformer import MotifVideoTransformer

    with torch.device("meta"):
        model = MotifVideoTransformer(config)
        latents = torch.zeros(batch, config.in_channels, *latent)
        text = torch.zeros(batch, text_len, config.text_embed_dim)
        timestep = torch.zeros(batch)
        image = torch.zeros(batch, image_tokens, config.image_embed_dim) if image_tokens else None
    return model, latents, timestep, text, image


# -- context parallelism: communication ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ContextTraffic:
    """Bytes one process sends in one forward of one sample under a Ulysses x ring grid (parallel/attention.py).

    Per attention over sharded keys, with n = ceil(N / (U R)) local video tokens (2n in the DDT decoder: its
    decoder and encoder streams are both sharded) and width D:
    - Ulysses: all-to-all of q, k, v and the output, each n x D values, of which (U - 1) / U leave the process;
      replicated text/image tokens are only head-sliced (their attention output is all-gathered over heads:
      (U - 1) / U x L x D);
    - ring: every process receives the other R - 1 ring ranks' key and value blocks, each (U n) tokens x D / U
      (passed around the ring), and their partial attention outputs for the replicated queries, each L x (D + H) / U
      (output and log-sum-exp, all-gathered);
    - at the output head, the final video tokens are gathered: (U R - 1) x n x D received.
    Shared Cross-Attention (sharded queries, replicated text keys) sends nothing.
    """

    ulysses: int
    ring: int
    encoder: int  # bytes in the dual + single-encoder blocks (skipped on encoder-reuse steps)
    decoder: int  # bytes in the DDT decoder and the output gather

    @property
    def total(self) -> int:
        return self.encoder + self.decoder


def context_traffic(c: TransformerConfig, num_video: int, context_tokens: int, ulysses: int, ring: int,
                    value_bytes: int) -> ContextTraffic:
    d, heads, parts = c.hidden_size, c.num_attention_heads, ulysses * ring
    n = -(-num_video // parts)

    def attention(local: int, replicated: int) -> float:
        sent = 4 * local * d * (ulysses - 1) / ulysses + replicated * d * (ulysses - 1) / ulysses
        return sent + (ring - 1) * (2 * local * d + replicated * (d + heads) / ulysses)

    encoder_blocks = c.num_layers + c.num_encoder_single_layers
    encoder = encoder_blocks * attention(n, context_tokens)
    decoder = c.num_decoder_layers * attention(2 * n, 0) + (parts - 1) * n * d
    return ContextTraffic(ulysses, ring, round(encoder * value_bytes), round(decoder * value_bytes))


class FlopMeter:
    """FLOPs counted (as `count_flops` does) inside every forward call of `module`, added up in `flops`; the
    calls made while a meter is attached run SDPA on the math backend. `detach()` removes it."""

    def __init__(self, module: torch.nn.Module):
        self.flops = 0
        self._active = None
        self._hooks = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _start(self, *_):
        from contextlib import ExitStack

        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        stack = ExitStack()
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        self._active = (stack, stack.enter_context(FlopCounterMode(display=False)))

    def _stop(self, *_):
        stack, counter = self._active
        stack.close()
        self.flops += counter.get_total_flops()
        self._active = None

    def detach(self) -> None:
        if self._active is not None:  # a forward that raised never reached the hook that closes its counter
            self._active[0].close()
            self._active = None
        for hook in self._hooks:
            hook.remove()
