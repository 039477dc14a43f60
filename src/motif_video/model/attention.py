"""Attention: joint self-attention over [video; context] and the two forms of Shared Cross-Attention.

Parameter names follow diffusers (`to_q`, `norm_k`, `to_out.0`, `add_q_proj`, ...) so checkpoints and PEFT adapters
load into either implementation. Heads are laid out (B, heads, N, head_dim) for PyTorch's fused SDPA kernels. The
softmax(QK^T)V itself is the module's `backend` (backends.py), set from outside with `set_attention_backend`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .backends import DEFAULT_BACKEND, AttentionBackend
from .layout import AttentionInputs, AttentionLayout, AttentionSite, Rope
from .rope import apply_rope


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, N, D) -> (B, heads, N, head_dim)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)  # (B, heads, N, head_dim) -> (B, N, D)


def rope_prefix(x: torch.Tensor, rope: Rope | None, num_video: int) -> torch.Tensor:
    """RoPE on the first `num_video` tokens of x (B, heads, N, head_dim); the rest (text, or decoder context) stays."""
    if rope is None:
        return x
    if num_video == x.shape[2]:  # all video tokens (cross-attention queries)
        return apply_rope(x, *rope)
    return torch.cat([apply_rope(x[:, :, :num_video], *rope), x[:, :, num_video:]], dim=2)


class AttentionModule(nn.Module):
    """An attention layer: knows where it sits (`site`) and which kernel computes it (`backend`, a plain object,
    not a submodule: it holds no parameters and never appears in the state dict)."""

    def __init__(self, site: AttentionSite):
        super().__init__()
        self.site = site
        self.backend: AttentionBackend = DEFAULT_BACKEND

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
               layout: AttentionLayout) -> torch.Tensor:
        """(B, heads, N_q, head_dim) queries over keys/values -> (B, N_q, heads * head_dim)."""
        return merge_heads(self.backend(q, k, v, key_mask, layout, self.site))


class Attention(AttentionModule):
    """Self-attention projections with per-head RMSNorm on Q and K (eps 1e-6).

    `context_projections`: the dual-stream (MMDiT) form, where the context stream has its own Q/K/V/out weights.
    `output_projection=False`: the single-stream form, whose output projection is fused with the MLP's.
    """

    def __init__(self, hidden_size: int, heads: int, head_dim: int, *, context_projections: bool,
                 output_projection: bool, block: int = 0):
        super().__init__(AttentionSite(block, "self"))
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(hidden_size, inner)
        self.to_k = nn.Linear(hidden_size, inner)
        self.to_v = nn.Linear(hidden_size, inner)
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        if output_projection:
            self.to_out = nn.ModuleList([nn.Linear(inner, hidden_size)])
        if context_projections:
            self.add_q_proj = nn.Linear(hidden_size, inner)
            self.add_k_proj = nn.Linear(hidden_size, inner)
            self.add_v_proj = nn.Linear(hidden_size, inner)
            self.norm_added_q = nn.RMSNorm(head_dim, eps=1e-6)
            self.norm_added_k = nn.RMSNorm(head_dim, eps=1e-6)
            self.to_add_out = nn.Linear(inner, hidden_size)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised keys and values of x with this block's own weights (shared with tied cross-attention)."""
        return self.norm_k(split_heads(self.to_k(x), self.heads)), split_heads(self.to_v(x), self.heads)

    def joint(self, x: torch.Tensor, context: torch.Tensor,
              inputs: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over [x; context] with RoPE on x only. Returns the (unprojected, for single blocks) outputs."""
        num_x, rope = x.shape[1], inputs.rope
        if hasattr(self, "add_q_proj"):  # dual stream: separate projections per stream
            q = self.norm_q(split_heads(self.to_q(x), self.heads))
            k, v = self.keys_values(x)
            q, k = rope_prefix(q, rope, num_x), rope_prefix(k, rope, num_x)
            cq = self.norm_added_q(split_heads(self.add_q_proj(context), self.heads))
            ck = self.norm_added_k(split_heads(self.add_k_proj(context), self.heads))
            cv = split_heads(self.add_v_proj(context), self.heads)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        else:  # single stream: one set of projections over the concatenated sequence
            both = torch.cat([x, context], dim=1)
            q = self.norm_q(split_heads(self.to_q(both), self.heads))
            k, v = self.keys_values(both)
            q, k = rope_prefix(q, rope, num_x), rope_prefix(k, rope, num_x)
        out = self.attend(q, k, v, inputs.key_mask, inputs.layout)  # (B, N_x + N_ctx, D)
        x_out, context_out = out[:, :num_x], out[:, num_x:]
        if hasattr(self, "to_out"):
            x_out = self.to_out[0](x_out)
        if hasattr(self, "to_add_out"):
            context_out = self.to_add_out(context_out)
        return x_out, context_out


class CrossAttention(Attention):
    """Shared Cross-Attention, diffusers layout: its own copies of every projection, no query LayerNorm."""

    def __init__(self, hidden_size: int, heads: int, head_dim: int, block: int = 0):
        super().__init__(hidden_size, heads, head_dim, context_projections=False, output_projection=True,
                         block=block)
        self.site = AttentionSite(block, "cross")

    def forward(self, query_source: torch.Tensor, text: torch.Tensor, inputs: AttentionInputs,
                self_attention: Attention) -> torch.Tensor:
        q = self.norm_q(split_heads(self.to_q(query_source), self.heads))
        q = rope_prefix(q, inputs.rope, q.shape[2])
        k, v = self.keys_values(text)
        return self.to_out[0](self.attend(q, k, v, inputs.cross_mask, inputs.cross_layout))


class TiedCrossAttention(AttentionModule):
    """Shared Cross-Attention as in the paper: K, V, norm_k and norm_q ARE the block's self-attention weights.

    query = norm_q(heads(LayerNorm(W'_q a))) with RoPE, where `a` is the block's self-attention output; only the
    query projection, its LayerNorm and the zero-initialised output projection are new parameters, so inserting the
    layer into a trained model leaves its output unchanged.
    """

    def __init__(self, hidden_size: int, heads: int, head_dim: int, block: int = 0, query_bias: bool = True):
        super().__init__(AttentionSite(block, "cross"))
        self.heads = heads
        self.query_proj = nn.Linear(hidden_size, heads * head_dim)
        # Without a bias the LayerNorm is the linear map diag(g)(I - 11^T/n) after W'_q, which folds into diffusers'
        # to_q exactly (convert/layouts.py); a learned bias adds a constant query the untied layout cannot express.
        self.query_norm = nn.LayerNorm(heads * head_dim, eps=1e-6, bias=query_bias)
        self.out_proj = nn.Linear(heads * head_dim, hidden_size)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query_source: torch.Tensor, text: torch.Tensor, inputs: AttentionInputs,
                self_attention: Attention) -> torch.Tensor:
        q = split_heads(self.query_norm(self.query_proj(query_source)), self.heads)
        q = self_attention.norm_q(q)
        q = rope_prefix(q, inputs.rope, q.shape[2])
        k, v = self_attention.keys_values(text)
        return self.out_proj(self.attend(q, k, v, inputs.cross_mask, inputs.cross_layout))


def make_cross_attention(form: str, hidden_size: int, heads: int, head_dim: int, block: int = 0,
                         query_bias: bool = True) -> AttentionModule:
    if form == "tied":
        return TiedCrossAttention(hidden_size, heads, head_dim, block, query_bias)
    return CrossAttention(hidden_size, heads, head_dim, block)
