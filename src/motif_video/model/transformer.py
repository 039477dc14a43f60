"""MotifVideoTransformer: the Motif-Video diffusion transformer, read top to bottom in `forward`.

    patch embed ──┬─> [dual-stream x num_layers] -> [single-stream encoder (+ Shared Cross-Attention)] ─┐
                  │                                                                                   │ video tokens
                  └─(long skip)──────────────────> [DDT decoder: single-stream over [decoder; encoder]] <┘
                                                                    -> AdaLN-continuous -> linear -> unpatchify

The model predicts flow-matching velocity and knows nothing of training: TREAD arrives as a `TokenRoute`, REPA as a
request for one block's output (`capture_block`). Parameter names equal diffusers' `MotifVideoTransformer3DModel`.
See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MotifVideoError
from ..routing import RouteSpan, TokenRoute
from .blocks import DualStreamBlock, SingleStreamBlock
from .config import TransformerConfig, preset
from .embeddings import ImageProjection, PatchEmbed, TimestepEmbedding, text_projection
from .layout import DECODER, ENCODER, IMAGE, TEXT, VIDEO, AttentionInputs, AttentionLayout, Segment
from .rope import rope_frequencies
from .sharding import NO_SHARDING, SequenceSharding
from .step_cache import StepCacheState


class OutputNorm(nn.Module):
    """AdaLN-continuous: LayerNorm (no affine) * (1 + scale) + shift, from Linear(SiLU(temb)) = [scale | shift]."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 2 * hidden_size)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


@dataclass
class EncoderCache:
    """Inference option (DDT-style): reuse the encoder's output across neighbouring sampling steps.

    The encoder (dual + single-encoder blocks) changes slowly from one step to the next while the decoder re-reads
    the current patch embedding every step, so running the encoder on only some steps keeps most of the quality for
    a large share of the compute. Set `refresh=True` on the steps that must recompute; the first use always does.
    """

    refresh: bool = True
    tokens: torch.Tensor | None = None  # the encoder's final video tokens (B, N, D)


@dataclass(frozen=True)
class ContextTokens:
    """The context stream of the encoder: `image_len` image tokens, then `text_len` text tokens."""

    keep: torch.Tensor | None  # (B, N_img + L) bool, True = attend; None: no padding
    image_len: int
    text_len: int


def joint_key_mask(video_keep: torch.Tensor | None, context_keep: torch.Tensor | None, batch: int,
                   num_video: int, num_context: int) -> torch.Tensor | None:
    """Keep-mask (B, 1, 1, num_video + num_context) of joint attention over [video; context]: video keys attend
    unless they are sharding padding (`video_keep` (num_video,)), context keys unless text padding (B, num_context).
    None when every key attends, which lets fused kernels run."""
    if video_keep is None and context_keep is None:
        return None
    device = (video_keep if video_keep is not None else context_keep).device
    if video_keep is None:
        video_keep = torch.ones(num_video, dtype=torch.bool, device=device)
    if context_keep is None:
        context_keep = torch.ones(batch, num_context, dtype=torch.bool, device=device)
    return torch.cat([video_keep.expand(batch, -1), context_keep], dim=1)[:, None, None, :]


class MotifVideoTransformer(nn.Module):
    def __init__(self, config: TransformerConfig | None = None, **config_kwargs):
        """Build from a `TransformerConfig`, or from diffusers' config keys (`MotifVideoTransformer(**config_json)`)."""
        super().__init__()
        if config is None:
            config = TransformerConfig.from_dict(config_kwargs)
        elif config_kwargs:
            config = config.replace(**config_kwargs)
        self.config = config
        c = config
        hidden, heads, head_dim = c.hidden_size, c.num_attention_heads, c.attention_head_dim

        # 1. Embedders
        self.x_embedder = PatchEmbed((c.patch_size_t, c.patch_size, c.patch_size), c.in_channels, hidden)
        self.context_embedder = text_projection(c.text_embed_dim, hidden)
        if c.image_embed_dim is not None:
            self.image_embedder = ImageProjection(c.image_embed_dim, hidden)
        self.time_text_embed = TimestepEmbedding(hidden)

        # 2. Early fusion: dual-stream blocks
        dual_cross = c.cross_attention_form if c.enable_text_cross_attention_dual else None
        self.transformer_blocks = nn.ModuleList(
            [DualStreamBlock(hidden, heads, head_dim, c.mlp_ratio, dual_cross, block=i,
                             query_bias=c.cross_attention_query_bias) for i in range(c.num_layers)]
        )
        # 3. Joint representation (single-stream encoder, with Shared Cross-Attention) and 4. the DDT decoder:
        # both are single-stream blocks in one list, as in the released checkpoint; the decoder never has
        # cross-attention (it sees no text).
        single_cross = c.cross_attention_form if c.enable_text_cross_attention_single else None
        self.single_transformer_blocks = nn.ModuleList(
            [
                SingleStreamBlock(hidden, heads, head_dim, c.mlp_ratio,
                                  single_cross if i < c.num_encoder_single_layers else None, block=c.num_layers + i,
                                  query_bias=c.cross_attention_query_bias)
                for i in range(c.num_single_layers)
            ]
        )
        # 5. Output head
        self.norm_out = OutputNorm(hidden)
        self.proj_out = nn.Linear(hidden, c.patch_size_t * c.patch_size * c.patch_size * c.out_channels)

        self._rope_cache: dict = {}
        # A runtime choice set from outside (model/sharding.py): where the video token sequence lives
        self.sequence_sharding: SequenceSharding = NO_SHARDING

    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MotifVideoTransformer":
        return cls(preset(name, **overrides))

    @property
    def blocks(self) -> list[nn.Module]:
        """All blocks in forward order: dual -> single encoder -> decoder (the index space of TREAD routes)."""
        return [*self.transformer_blocks, *self.single_transformer_blocks]

    @property
    def decoder_start(self) -> int:
        return self.config.num_layers + self.config.num_encoder_single_layers

    @property
    def encoder_blocks(self) -> list[nn.Module]:
        """The single-stream encoder blocks (stage 3)."""
        return list(self.single_transformer_blocks)[: self.config.num_encoder_single_layers]

    @property
    def decoder_blocks(self) -> list[nn.Module]:
        """The DDT decoder blocks (stage 4)."""
        return list(self.single_transformer_blocks)[self.config.num_encoder_single_layers:]

    def rope(self, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for a token grid, computed once per (grid, device) and reused across sampling steps."""
        key = (grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_frequencies(grid, self.config.rope_axes_dim, self.config.rope_theta, device)
        return self._rope_cache[key]

    def _check_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, image_embeds):
        c = self.config
        if hidden_states.dim() != 5 or hidden_states.shape[1] != c.in_channels:
            raise MotifVideoError(
                f"hidden_states must be (B, {c.in_channels}, T, H, W), got {tuple(hidden_states.shape)}")
        b, _, t, h, w = hidden_states.shape
        if t % c.patch_size_t or h % c.patch_size or w % c.patch_size:
            raise MotifVideoError(
                f"latent size (T={t}, H={h}, W={w}) must be divisible by the patch size "
                f"({c.patch_size_t}, {c.patch_size}, {c.patch_size})")
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != b \
                or encoder_hidden_states.shape[2] != c.text_embed_dim:
            raise MotifVideoError(
                f"encoder_hidden_states must be ({b}, L, {c.text_embed_dim}), got {tuple(encoder_hidden_states.shape)}")
        if timestep.dim() != 1 or timestep.shape[0] != b:
            raise MotifVideoError(f"timestep must have shape ({b},), got {tuple(timestep.shape)}")
        if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) != encoder_hidden_states.shape[:2]:
            raise MotifVideoError(
                f"encoder_attention_mask must be {tuple(encoder_hidden_states.shape[:2])}, "
                f"got {tuple(encoder_attention_mask.shape)}")
        if image_embeds is not None:
            if c.image_embed_dim is None:
                raise MotifVideoError("image_embeds given, but this model has no image projection (image_embed_dim)")
            if image_embeds.dim() != 3 or image_embeds.shape[0] != b or image_embeds.shape[2] != c.image_embed_dim:
                raise MotifVideoError(
                    f"image_embeds must be ({b}, N, {c.image_embed_dim}), got {tuple(image_embeds.shape)}")

    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        *,
        route: TokenRoute | None = None,
        capture_block: int | None = None,
        encoder_cache: EncoderCache | None = None,
        step_cache: StepCacheState | None = None,
    ):
        """Velocity (B, out_channels, T, H, W) for latents (B, in_channels, T, H, W) at `timestep` (B,) in [0, 1000].

        encoder_hidden_states (B, L, text_embed_dim) with optional keep-mask (B, L); image_embeds (B, N_img, D_img)
        for I2V. `route`: TREAD keep set (training). `capture_block`: also return the video tokens after that block
        (B, N, D) for REPA; inside a route these are only the kept tokens, in `route.kept` order.
        `encoder_cache`: reuse the encoder's output across sampling steps (inference; see EncoderCache).
        `step_cache`: one guidance branch's state of a training-free cache (model/step_cache.py) that may stand in
        for all blocks with what earlier steps computed (inference).
        """
        c = self.config
        if timestep.dim() == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, image_embeds)
        batch, _, frames, height, width = hidden_states.shape
        grid = (frames // c.patch_size_t, height // c.patch_size, width // c.patch_size)
        sharding = self.sequence_sharding

        # 1. Embeddings: video tokens (split over processes by the sequence sharding, identity by default) with
        # their RoPE, one timestep vector, projected text with any image tokens in front
        temb = self.time_text_embed(timestep)
        x = self.x_embedder(hidden_states)  # (B, N, D), N = T'*H'*W' in t-major order
        num_video = x.shape[1]
        context, text = self._embed_context(encoder_hidden_states, encoder_attention_mask, image_embeds)
        x = sharding.shard(x)  # (B, N_local, D)
        decoder_input = x  # long skip: the decoder re-reads the patch embedding
        span = RouteSpan(route, self.rope(grid, hidden_states.device), num_video, sharding)

        # A training-free step cache may stand in for every block (model/step_cache.py). When it ran the first
        # block as its probe and still asks for the rest, the rest runs as usual, the encoder cache included.
        first, reused = self._consult_step_cache(step_cache, x, context, temb, span, text, grid, route,
                                                 capture_block)
        if reused is not None:
            x = reused
        else:
            x, captured = self._stages(x, context, temb, span, text, grid, capture_block, encoder_cache, route,
                                       first)
            if step_cache is not None:
                step_cache.store(decoder_input, first[0] if first is not None else None, x)
        # 5. Output head: AdaLN-continuous -> linear -> unpatchify
        x = sharding.gather(x, num_video)  # (B, N, D)
        x = self.proj_out(self.norm_out(x, temb))  # (B, N, C_out * pt * p * p)
        p, pt = c.patch_size, c.patch_size_t
        x = x.reshape(batch, *grid, -1, pt, p, p)  # (B, T', H', W', C, pt, p, p)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, -1, frames, height, width)
        return (x, captured) if capture_block is not None else x

    def _stages(self, x, context, temb, span: RouteSpan, text: "ContextTokens", grid, capture_block,
                encoder_cache: EncoderCache | None, route: TokenRoute | None, first=None):
        """Stages 2-4: the patch embedding `x` (B, N_local, D) -> the tokens the output head reads, and the captured
        block output (or None). `first`: the (video, context) output of the first dual-stream block when a step
        cache's probe ran it already."""
        c, sharding = self.config, self.sequence_sharding
        decoder_input = x  # long skip: the decoder re-reads the patch embedding
        captured = None
        if self._reuse_encoder(encoder_cache, x, route):
            x = encoder_cache.tokens  # the encoder's output from an earlier sampling step
        else:
            # 2. Early fusion: dual-stream blocks, video and text with separate weights, one joint attention
            inputs = self._encoder_inputs(x, span, text, grid)
            start = 0
            if first is not None:  # a step cache's probe ran block 0 already
                x, context = first
                start = 1
            for index, block in enumerate(self.transformer_blocks[start:], start=start):
                if span.moves_at(index):  # TREAD: the route's blocks see only the kept video tokens
                    (x,) = span.move(x)
                    inputs = self._encoder_inputs(x, span, text, grid)
                x, context = block(x, context, temb, inputs)
                if index == capture_block:
                    captured = sharding.gather(x, span.num_tokens)

            # 3. Joint representation: single-stream encoder blocks over [video; text] (+ Shared Cross-Attention)
            for index, block in enumerate(self.encoder_blocks, start=c.num_layers):
                if span.moves_at(index):
                    (x,) = span.move(x)
                    inputs = self._encoder_inputs(x, span, text, grid)
                x, context = block(x, context, temb, inputs)
                if index == capture_block:
                    captured = sharding.gather(x, span.num_tokens)
            if encoder_cache is not None:
                encoder_cache.tokens = x

        # 4. DDT decoder: single-stream blocks over [decoder stream (RoPE); the encoder's video tokens (no RoPE)],
        # the decoder stream being the patch embedding again; no text
        if span.active:  # a route running on into the decoder: leave it here and re-enter with both streams
            (x,) = span.exit(x)
        x, context = decoder_input, x
        inputs = self._decoder_inputs(x, span, grid)
        for index, block in enumerate(self.decoder_blocks, start=self.decoder_start):
            if span.moves_at(index):  # inside the decoder both streams take the same kept tokens
                x, context = span.move(x, context)
                inputs = self._decoder_inputs(x, span, grid)
            x, context = block(x, context, temb, inputs)
            if index == capture_block:
                captured = sharding.gather(x, span.num_tokens)
        if span.active:  # a route that runs to the last block
            x, context = span.exit(x, context)

        return x, captured

    def _consult_step_cache(self, cache: StepCacheState | None, x, context, temb, span: RouteSpan,
                            text: "ContextTokens", grid, route: TokenRoute | None, capture_block):
        """(the first block's (video, context) output if the cache probes it, else None; the blocks' output taken
        from earlier steps, or None to run them)."""
        if cache is None:
            return None, None
        if route is not None or capture_block is not None:
            raise MotifVideoError("a step cache is an inference option; it cannot be combined with token routing or "
                                  "block capture")
        if self.sequence_sharding is not NO_SHARDING:  # each process would judge its own shard and could disagree
            raise MotifVideoError("a step cache cannot be combined with sequence sharding")
        first = None
        if cache.needs_first_block:
            first = self.transformer_blocks[0](x, context, temb, self._encoder_inputs(x, span, text, grid))
        return first, cache.lookup(x, first[0] if first is not None else None)

    def _embed_context(self, encoder_hidden_states, encoder_attention_mask, image_embeds):
        """Context tokens (B, N_img + L, D) and what attention needs to know of them."""
        context = self.context_embedder(encoder_hidden_states)  # (B, L, D)
        keep = encoder_attention_mask.bool() if encoder_attention_mask is not None else None
        image_len = 0
        if image_embeds is not None:
            image_tokens = self.image_embedder(image_embeds)  # (B, N_img, D), always attended
            image_len = image_tokens.shape[1]
            context = torch.cat([image_tokens, context], dim=1)
            if keep is not None:
                keep = F.pad(keep, (image_len, 0), value=True)
        return context, ContextTokens(keep, image_len, encoder_hidden_states.shape[1])

    def _encoder_inputs(self, x: torch.Tensor, span: RouteSpan, text: "ContextTokens",
                        grid: tuple[int, int, int]) -> AttentionInputs:
        """Attention inputs of the encoder blocks (stages 2-3) for the video tokens `x` now flowing."""
        video = Segment(VIDEO, x.shape[1])
        context = (Segment(IMAGE, text.image_len),) if text.image_len else ()
        context += (Segment(TEXT, text.text_len),)
        video_keep = self.sequence_sharding.keep_mask(span.num_tokens, x.device)
        return AttentionInputs(
            layout=AttentionLayout((video, *context), (video, *context), grid, span.kept),
            rope=span.rope,
            key_mask=joint_key_mask(video_keep, text.keep, x.shape[0], x.shape[1], text.image_len + text.text_len),
            image_len=text.image_len,
            cross_layout=AttentionLayout((video,), (Segment(TEXT, text.text_len),), grid, span.kept),
            cross_mask=text.keep[:, None, None, text.image_len:] if text.keep is not None else None,
        )

    def _decoder_inputs(self, x: torch.Tensor, span: RouteSpan, grid: tuple[int, int, int]) -> AttentionInputs:
        """Attention inputs of the DDT decoder blocks: [decoder stream; encoder tokens], the same token set twice."""
        segments = (Segment(DECODER, x.shape[1]), Segment(ENCODER, x.shape[1]))
        keep = self.sequence_sharding.keep_mask(span.num_tokens, x.device)
        key_mask = None if keep is None else keep.repeat(2).expand(x.shape[0], -1)[:, None, None, :]
        return AttentionInputs(layout=AttentionLayout(segments, segments, grid, span.kept), rope=span.rope,
                               key_mask=key_mask)

    def _reuse_encoder(self, cache: EncoderCache | None, x: torch.Tensor, route: TokenRoute | None) -> bool:
        if cache is None:
            return False
        if route is not None:
            raise MotifVideoError("encoder reuse is an inference option and cannot be combined with token routing")
        if self.config.num_decoder_layers == 0:
            raise MotifVideoError("encoder reuse needs a model with decoder blocks (num_decoder_layers > 0)")
        if cache.refresh or cache.tokens is None:
            return False
        if cache.tokens.shape != x.shape:
            raise MotifVideoError(f"cached encoder tokens {tuple(cache.tokens.shape)} do not match this input "
                                  f"{tuple(x.shape)}; refresh the cache when the batch or size changes")
        return True

    # -- checkpoints ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder_or_hub_id: str | Path, subfolder: str | None = None, *,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        """Load a diffusers-layout folder (config.json + safetensors, sharded or not), a hub id, or our own folder."""
        from ..convert.checkpoint import load_transformer_folder

        return load_transformer_folder(cls, folder_or_hub_id, subfolder, torch_dtype=torch_dtype, device=device)

    def save_pretrained(self, folder: str | Path, max_shard_size: int = 5 * 1024**3) -> Path:
        """Write config.json + safetensors (sharded with an index json above `max_shard_size` bytes)."""
        from ..convert.checkpoint import save_transformer_folder

        return save_transformer_folder(self, folder, max_shard_size=max_shard_size)

    @classmethod
    def from_single_file(cls, path: str | Path, config=None, *, compute_dtype: torch.dtype | None = None,
                         device: str | torch.device = "cpu"):
        """Load a GGUF transformer file, keeping weights quantised; `config`: folder, hub id, dict or preset name."""
        from ..convert.gguf import load_gguf_transformer

        return load_gguf_transformer(cls, path, config, compute_dtype=compute_dtype, device=device)
