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

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MotifVideoError
from ..routing import TokenRoute, gather_tokens, scatter_tokens
from .blocks import DualStreamBlock, SingleStreamBlock
from .config import TransformerConfig, preset
from .embeddings import ImageProjection, PatchEmbed, TimestepEmbedding, text_projection
from .rope import rope_frequencies


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


def joint_key_mask(text_keep: torch.Tensor | None, num_video: int) -> torch.Tensor | None:
    """(B, N_ctx) bool keep-mask of the context -> (B, 1, 1, num_video + N_ctx); video keys always attend."""
    if text_keep is None:
        return None
    return F.pad(text_keep, (num_video, 0), value=True)[:, None, None, :]


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
            [DualStreamBlock(hidden, heads, head_dim, c.mlp_ratio, dual_cross) for _ in range(c.num_layers)]
        )
        # 3. Joint representation (single-stream encoder, with Shared Cross-Attention) and 4. the DDT decoder:
        # both are single-stream blocks in one list, as in the released checkpoint; the decoder never has
        # cross-attention (it sees no text).
        single_cross = c.cross_attention_form if c.enable_text_cross_attention_single else None
        self.single_transformer_blocks = nn.ModuleList(
            [
                SingleStreamBlock(hidden, heads, head_dim, c.mlp_ratio,
                                  single_cross if i < c.num_encoder_single_layers else None)
                for i in range(c.num_single_layers)
            ]
        )
        # 5. Output head
        self.norm_out = OutputNorm(hidden)
        self.proj_out = nn.Linear(hidden, c.patch_size_t * c.patch_size * c.patch_size * c.out_channels)

        self._rope_cache: dict = {}

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
    ):
        """Velocity (B, out_channels, T, H, W) for latents (B, in_channels, T, H, W) at `timestep` (B,) in [0, 1000].

        encoder_hidden_states (B, L, text_embed_dim) with optional keep-mask (B, L); image_embeds (B, N_img, D_img)
        for I2V. `route`: TREAD keep set (training). `capture_block`: also return the video tokens after that block
        (B, N, D) for REPA; inside a route these are only the kept tokens, in `route.kept` order.
        `encoder_cache`: reuse the encoder's output across sampling steps (inference; see EncoderCache).
        """
        c = self.config
        if timestep.dim() == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, image_embeds)
        batch, _, frames, height, width = hidden_states.shape
        grid = (frames // c.patch_size_t, height // c.patch_size, width // c.patch_size)

        # 1. Embeddings: RoPE for video tokens, one timestep vector, projected text (+ image tokens in front)
        full_rope = self.rope(grid, hidden_states.device)
        temb = self.time_text_embed(timestep)
        x = self.x_embedder(hidden_states)  # (B, N, D), N = T'*H'*W'
        context = self.context_embedder(encoder_hidden_states)  # (B, L, D)
        text_keep = encoder_attention_mask.bool() if encoder_attention_mask is not None else None
        image_len = 0
        if image_embeds is not None:
            image_tokens = self.image_embedder(image_embeds)  # (B, N_img, D), always attended
            image_len = image_tokens.shape[1]
            context = torch.cat([image_tokens, context], dim=1)
            if text_keep is not None:
                text_keep = F.pad(text_keep, (image_len, 0), value=True)
        cross_mask = text_keep[:, None, None, image_len:] if text_keep is not None else None
        decoder_input = x  # long skip: the decoder re-reads the patch embedding

        # 2-4. Blocks in order; a route gathers kept video tokens at its start and scatters them back at its end
        rope, key_mask = full_rope, joint_key_mask(text_keep, x.shape[1])
        stash: dict[str, torch.Tensor] = {}
        captured = None
        reuse = self._reuse_encoder(encoder_cache, x, route)
        for index, block in enumerate(self.blocks):
            if reuse and index < self.decoder_start:
                continue  # the encoder's output comes from an earlier step
            if route is not None and index == route.start_layer:
                stash["x"], x = x, gather_tokens(x, route.kept)
                rope = tuple(gather_tokens(r, route.kept) for r in full_rope)
                if index > self.decoder_start:  # inside the decoder both streams take the same indices
                    stash["context"], context = context, gather_tokens(context, route.kept)
                else:
                    key_mask = joint_key_mask(text_keep, x.shape[1])
            if route is not None and index == route.end_layer:
                x, context, rope, key_mask = self._unroute(stash, x, context, route, full_rope, text_keep, index)
            if index == self.decoder_start:
                # 4. DDT decoder: the encoder's video tokens become the context; no text, no mask
                if encoder_cache is not None:
                    if reuse:
                        x = encoder_cache.tokens
                    else:
                        encoder_cache.tokens = x
                context, key_mask = x, None
                if "x" in stash:  # routed: the decoder stream takes the same kept tokens
                    stash["context"], stash["x"] = stash["x"], decoder_input
                    x = gather_tokens(decoder_input, route.kept)
                else:
                    x = decoder_input
            x, context = block(x, context, temb, key_mask, rope, cross_mask, image_len)
            if index == capture_block:
                captured = x
        if "x" in stash:  # a route that runs to the last block
            x, context, rope, key_mask = self._unroute(stash, x, context, route, full_rope, text_keep, len(self.blocks))

        # 5. Output head: AdaLN-continuous -> linear -> unpatchify
        x = self.proj_out(self.norm_out(x, temb))  # (B, N, C_out * pt * p * p)
        p, pt = c.patch_size, c.patch_size_t
        x = x.reshape(batch, *grid, -1, pt, p, p)  # (B, T', H', W', C, pt, p, p)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, -1, frames, height, width)
        return (x, captured) if capture_block is not None else x

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

    def _unroute(self, stash, x, context, route, full_rope, text_keep, index):
        x = scatter_tokens(stash.pop("x"), x, route.kept)
        if "context" in stash:  # decoder context was routed too
            context = scatter_tokens(stash.pop("context"), context, route.kept)
        in_decoder = index > self.decoder_start
        return x, context, full_rope, None if in_decoder else joint_key_mask(text_keep, x.shape[1])

    # ------------------------------------------------------------------------------------------------------------
    def insert_shared_cross_attention(self, form: str = "tied") -> "MotifVideoTransformer":
        """Add zero-initialised Shared Cross-Attention to every single-stream encoder block (paper, stage 9).

        The output projection starts at zero, so the model's output is bit-identical until training moves it.
        """
        from .attention import make_cross_attention

        c = self.config
        if c.enable_text_cross_attention_single:
            raise MotifVideoError("this model already has Shared Cross-Attention in its single-stream blocks")
        ref = next(self.parameters())
        for block in self.single_transformer_blocks[: c.num_encoder_single_layers]:
            cross = make_cross_attention(form, c.hidden_size, c.num_attention_heads, c.attention_head_dim)
            out = cross.out_proj if form == "tied" else cross.to_out[0]
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            block.cross_attn = cross.to(device=ref.device, dtype=ref.dtype)
        self.config = c.replace(enable_text_cross_attention_single=True, cross_attention_form=form)
        return self

    def init_matched_decoder(self, grid: tuple[int, int, int], max_angle: float = 0.5, sharpness: float = 2.0,
                             gate: float = 1.0) -> "MotifVideoTransformer":
        """Initialise the decoder so that decoder token i reads encoder token i, at full strength, from step 0.

        The encoder's tokens sit in the decoder's context slot without RoPE, so attention sees them as an unordered
        set: the decoder can find "its" encoder token only by content. Both streams start from the same patch
        embedding, so tied query/key weights (W_q = W_k) match them, once the channels that RoPE rotates by more
        than `max_angle` over `grid` (T', H', W' tokens) are left out of the query and key; `sharpness` scales the
        Q/K RMSNorm weights. The AdaLN gate starts at `gate` instead of ~0.05, so the encoder reaches the output at
        first order. With the default init a small model reads the encoder as a near-uniform average and stalls
        (docs/nano.md, "the decoder stall").
        """
        c = self.config
        cos, _ = rope_frequencies(grid, c.rope_axes_dim, c.rope_theta)
        steady = cos.min(dim=0).values >= math.cos(max_angle)  # (head_dim,) channels that barely rotate
        if not steady.any():
            raise MotifVideoError(f"no RoPE channel stays within {max_angle} rad over a {list(grid)} token grid")
        rows = steady.repeat(c.num_attention_heads).to(self.x_embedder.proj.weight)[:, None]
        with torch.no_grad():
            for block in self.single_transformer_blocks[c.num_encoder_single_layers:]:
                attn = block.attn
                attn.to_q.weight.mul_(rows)
                attn.to_k.weight.copy_(attn.to_q.weight)
                attn.to_q.bias.zero_()
                attn.to_k.bias.zero_()
                attn.norm_q.weight.fill_(sharpness)
                attn.norm_k.weight.fill_(sharpness)
                block.norm.linear.bias[2 * c.hidden_size:].fill_(gate)  # (shift, scale, gate) chunks
        return self

    def replace_text_projection(self, text_embed_dim: int) -> "MotifVideoTransformer":
        """A freshly initialised text projection for a text encoder of another width (paper, stage 4: the
        sentence-embedding model is replaced by T5Gemma2); everything downstream keeps its weights."""
        if self.config.text_embed_dim == text_embed_dim:
            raise MotifVideoError(f"the model already takes text_embed_dim={text_embed_dim}")
        ref = next(self.context_embedder.parameters())
        self.context_embedder = text_projection(text_embed_dim, self.config.hidden_size).to(ref.device, ref.dtype)
        self.config = self.config.replace(text_embed_dim=text_embed_dim)
        return self

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
