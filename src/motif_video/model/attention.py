"""Attention: joint self-attention over [video; context] and the two forms of Shared Cross-Attention.

Parameter names follow diffusers (`to_q`, `norm_k`, `to_out.0`, `add_q_proj`, ...) so checkpoints and PEFT adapters
load into either implementation. Heads are laid out (B, heads, N, head_dim) for PyTorch's fused SDPA kernels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (N, head_dim) or (B, N, head_dim)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, N, D) -> (B, heads, N, head_dim)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(2)  # (B, heads, N, head_dim) -> (B, N, D)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    try:  # FlashAttention 3 (Hopper) first, then FlashAttention 2
        from flash_attn_interface import flash_attn_func
    except ImportError:
        from flash_attn import flash_attn_func
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # takes (B, N, heads, head_dim)
    out = out[0] if isinstance(out, tuple) else out  # FA3 also returns the log-sum-exp
    return out.transpose(1, 2)


def _sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False)


# Fused kernels used for unmasked attention on CUDA in fp16/bf16; everything else goes through PyTorch's SDPA.
# flash-attn is exact up to kernel rounding; SageAttention quantises Q and K to int8 (approximate).
ATTENTION_BACKENDS = {"sdpa": None, "flash": _flash_attention, "sage": _sage_attention}
# backend -> (the pip package to install, the modules any one of which provides the kernel)
BACKEND_PACKAGES = {"flash": ("flash-attn", ("flash_attn_interface", "flash_attn")),
                    "sage": ("sageattention", ("sageattention",))}
_active_backend = "sdpa"


def set_attention_backend(name: str) -> None:
    """Select the attention kernel for every model in this process ("sdpa", "flash" or "sage")."""
    global _active_backend
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(ATTENTION_BACKENDS)}")
    if name != "sdpa":
        import importlib.util

        package, modules = BACKEND_PACKAGES[name]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise ValueError(f"attention backend {name!r} needs the {package} package (pip install {package})")
    _active_backend = name


def get_attention_backend() -> str:
    return _active_backend


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention with an optional boolean key mask (B, 1, 1, N_k), True = attend. Returns (B, N_q, D)."""
    kernel = ATTENTION_BACKENDS[_active_backend]
    if kernel is not None and key_mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return merge_heads(kernel(q, k, v))
    return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask))


def rope_prefix(x: torch.Tensor, rope: Rope | None, num_video: int) -> torch.Tensor:
    """RoPE on the first `num_video` tokens of x (B, heads, N, head_dim); the rest (text, or decoder context) stays."""
    if rope is None:
        return x
    if num_video == x.shape[2]:  # all video tokens (cross-attention queries)
        return apply_rope(x, *rope)
    return torch.cat([apply_rope(x[:, :, :num_video], *rope), x[:, :, num_video:]], dim=2)


class Attention(nn.Module):
    """Self-attention projections with per-head RMSNorm on Q and K (eps 1e-6).

    `context_projections`: the dual-stream (MMDiT) form, where the context stream has its own Q/K/V/out weights.
    `output_projection=False`: the single-stream form, whose output projection is fused with the MLP's.
    """

    def __init__(self, hidden_size: int, heads: int, head_dim: int, *, context_projections: bool,
                 output_projection: bool):
        super().__init__()
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

    def joint(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None,
              rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over [x; context] with RoPE on x only. Returns the (unprojected, for single blocks) outputs."""
        num_x = x.shape[1]
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
        out = attend(q, k, v, key_mask)  # (B, N_x + N_ctx, D)
        x_out, context_out = out[:, :num_x], out[:, num_x:]
        if hasattr(self, "to_out"):
            x_out = self.to_out[0](x_out)
        if hasattr(self, "to_add_out"):
            context_out = self.to_add_out(context_out)
        return x_out, context_out


class CrossAttention(Attention):
    """Shared Cross-Attention, diffusers layout: its own copies of every projection, no query LayerNorm."""

    def __init__(self, hidden_size: int, heads: int, head_dim: int):
        super().__init__(hidden_size, heads, head_dim, context_projections=False, output_projection=True)

    def forward(self, query_source: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
                rope: Rope | None, self_attention: Attention) -> torch.Tensor:
        q = self.norm_q(split_heads(self.to_q(query_source), self.heads))
        q = rope_prefix(q, rope, q.shape[2])
        k, v = self.keys_values(text)
        return self.to_out[0](attend(q, k, v, text_mask))


class TiedCrossAttention(nn.Module):
    """Shared Cross-Attention as in the paper: K, V, norm_k and norm_q ARE the block's self-attention weights.

    query = norm_q(heads(LayerNorm(W'_q a))) with RoPE, where `a` is the block's self-attention output; only the
    query projection, its LayerNorm and the zero-initialised output projection are new parameters, so inserting the
    layer into a trained model leaves its output unchanged.
    """

    def __init__(self, hidden_size: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        self.query_proj = nn.Linear(hidden_size, heads * head_dim)
        self.query_norm = nn.LayerNorm(heads * head_dim, eps=1e-6)
        self.out_proj = nn.Linear(heads * head_dim, hidden_size)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query_source: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
                rope: Rope | None, self_attention: Attention) -> torch.Tensor:
        q = split_heads(self.query_norm(self.query_proj(query_source)), self.heads)
        q = self_attention.norm_q(q)
        q = rope_prefix(q, rope, q.shape[2])
        k, v = self_attention.keys_values(text)
        return self.out_proj(attend(q, k, v, text_mask))


def make_cross_attention(form: str, hidden_size: int, heads: int, head_dim: int) -> nn.Module:
    return (TiedCrossAttention if form == "tied" else CrossAttention)(hidden_size, heads, head_dim)
