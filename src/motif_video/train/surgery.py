"""Architecture changes the training curriculum makes to a model between stages, and the matched decoder init.

Each function changes a `MotifVideoTransformer` in place (and its config where the architecture changes) and returns
it. They live with the training side that uses them: the model class itself only describes a fixed architecture.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..model.attention import make_cross_attention
from ..model.embeddings import text_projection
from ..model.rope import rope_frequencies
from ..model.transformer import MotifVideoTransformer


def insert_shared_cross_attention(model: MotifVideoTransformer, form: str = "tied",
                                  query_bias: bool = True) -> MotifVideoTransformer:
    """Add zero-initialised Shared Cross-Attention to every single-stream encoder block (paper, stage 9).

    The output projection starts at zero, so the model's output is bit-identical until training moves it. The new
    layers use the attention backend of their block's self-attention.
    """
    c = model.config
    if c.enable_text_cross_attention_single:
        raise ConfigError("this model already has Shared Cross-Attention in its single-stream blocks")
    ref = next(model.parameters())
    for index, block in enumerate(model.encoder_blocks, start=c.num_layers):
        cross = make_cross_attention(form, c.hidden_size, c.num_attention_heads, c.attention_head_dim, block=index,
                                     query_bias=query_bias)
        out = cross.out_proj if form == "tied" else cross.to_out[0]
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        cross.backend = block.attn.backend
        block.cross_attn = cross.to(device=ref.device, dtype=ref.dtype)
    model.config = c.replace(enable_text_cross_attention_single=True, cross_attention_form=form,
                             cross_attention_query_bias=query_bias)
    return model


def replace_text_projection(model: MotifVideoTransformer, text_embed_dim: int) -> MotifVideoTransformer:
    """A freshly initialised text projection for a text encoder of another width (paper, stage 4: the
    sentence-embedding model is replaced by T5Gemma2); everything downstream keeps its weights."""
    if model.config.text_embed_dim == text_embed_dim:
        raise ConfigError(f"the model already takes text_embed_dim={text_embed_dim}")
    ref = next(model.context_embedder.parameters())
    model.context_embedder = text_projection(text_embed_dim, model.config.hidden_size).to(ref.device, ref.dtype)
    model.config = model.config.replace(text_embed_dim=text_embed_dim)
    return model


def init_matched_decoder(model: MotifVideoTransformer, grid: tuple[int, int, int], max_angle: float = 0.5,
                         sharpness: float = 2.0, gate: float = 1.0) -> MotifVideoTransformer:
    """Initialise the decoder so that decoder token i reads encoder token i, at full strength, from step 0.

    The encoder's tokens sit in the decoder's context slot without RoPE, so attention sees them as an unordered
    set: the decoder can find "its" encoder token only by content. Both streams start from the same patch
    embedding, so tied query/key weights (W_q = W_k) match them, once the channels that RoPE rotates by more
    than `max_angle` over `grid` (T', H', W' tokens) are left out of the query and key; `sharpness` scales the
    Q/K RMSNorm weights. The AdaLN gate starts at `gate` instead of ~0.05, so the encoder reaches the output at
    first order. With the default init a small model reads the encoder as a near-uniform average and stalls
    (docs/nano.md, "the decoder stall").
    """
    c = model.config
    cos, _ = rope_frequencies(grid, c.rope_axes_dim, c.rope_theta)
    steady = cos.min(dim=0).values >= math.cos(max_angle)  # (head_dim,) channels that barely rotate
    if not steady.any():
        raise ConfigError(f"no RoPE channel stays within {max_angle} rad over a {list(grid)} token grid")
    rows = steady.repeat(c.num_attention_heads).to(model.x_embedder.proj.weight)[:, None]
    with torch.no_grad():
        for block in model.decoder_blocks:
            attn = block.attn
            attn.to_q.weight.mul_(rows)
            attn.to_k.weight.copy_(attn.to_q.weight)
            attn.to_q.bias.zero_()
            attn.to_k.bias.zero_()
            attn.norm_q.weight.fill_(sharpness)
            attn.norm_k.weight.fill_(sharpness)
            block.norm.linear.bias[2 * c.hidden_size:].fill_(gate)  # (shift, scale, gate) chunks
    return model
