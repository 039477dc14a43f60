"""The two block kinds: dual-stream (MMDiT) and single-stream (FLUX-style, also used as the DDT decoder).

Both are driven by AdaLN-Zero from the one global timestep embedding. A block's attention inputs (RoPE, masks, the
token layout) come in one `AttentionInputs`, built by the model once per stage. `block` is the block's absolute
index over `model.blocks`, handed to its attention modules so that a backend knows who calls.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention, make_cross_attention
from .layout import AttentionInputs


class AdaLayerNormZero(nn.Module):
    """LayerNorm (no affine) modulated by `num_params` chunks of Linear(SiLU(temb)): (shift, scale, *rest)."""

    def __init__(self, hidden_size: int, num_params: int):
        super().__init__()
        self.num_params = num_params
        self.linear = nn.Linear(hidden_size, num_params * hidden_size)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        shift, scale, *rest = self.linear(F.silu(temb)).chunk(self.num_params, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], tuple(r[:, None] for r in rest)


class GELUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear -> GELU(tanh) -> Linear; indexed `net.0.proj` / `net.2` like diffusers' FeedForward."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.net = nn.ModuleList([GELUProjection(hidden_size, inner), nn.Identity(), nn.Linear(inner, hidden_size)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class DualStreamBlock(nn.Module):
    """MMDiT block: video and text keep separate weights and meet in one joint attention."""

    def __init__(self, hidden_size: int, heads: int, head_dim: int, mlp_ratio: float, cross_attention: str | None,
                 block: int = 0, query_bias: bool = True):
        super().__init__()
        self.norm1 = AdaLayerNormZero(hidden_size, 6)
        self.norm1_context = AdaLayerNormZero(hidden_size, 6)
        self.attn = Attention(hidden_size, heads, head_dim, context_projections=True, output_projection=True,
                              block=block)
        self.cross_attn = (make_cross_attention(cross_attention, hidden_size, heads, head_dim, block, query_bias)
                           if cross_attention else None)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.norm2_context = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(hidden_size, mlp_ratio)
        self.ff_context = FeedForward(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, inputs: AttentionInputs):
        norm_x, (gate_msa, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, temb)
        norm_c, (c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(context, temb)

        attn_x, attn_c = self.attn.joint(norm_x, norm_c, inputs)
        x = x + gate_msa * attn_x
        if self.cross_attn is not None:  # ungated residual, as in the release
            x = x + self.cross_attn(attn_x, norm_c[:, inputs.image_len:], inputs, self.attn)
        context = context + c_gate_msa * attn_c

        x = x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        context = context + c_gate_mlp * self.ff_context(self.norm2_context(context) * (1 + c_scale_mlp) + c_shift_mlp)
        return x, context


class SingleStreamBlock(nn.Module):
    """FLUX-style block over the concatenation [x; context]: parallel attention + MLP, one fused output projection.

    In the encoder, context is the text (and the block may carry Shared Cross-Attention). In the DDT decoder, x is
    the decoder stream (with RoPE) and context is the encoder's final video tokens (no RoPE, no text).
    """

    def __init__(self, hidden_size: int, heads: int, head_dim: int, mlp_ratio: float, cross_attention: str | None,
                 block: int = 0, query_bias: bool = True):
        super().__init__()
        mlp_dim = int(hidden_size * mlp_ratio)
        self.attn = Attention(hidden_size, heads, head_dim, context_projections=False, output_projection=False,
                              block=block)
        self.cross_attn = (make_cross_attention(cross_attention, hidden_size, heads, head_dim, block, query_bias)
                           if cross_attention else None)
        self.norm = AdaLayerNormZero(hidden_size, 3)
        self.proj_mlp = nn.Linear(hidden_size, mlp_dim)
        self.proj_out = nn.Linear(hidden_size + mlp_dim, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, inputs: AttentionInputs):
        num_x = x.shape[1]
        residual = torch.cat([x, context], dim=1)  # (B, N_x + N_ctx, D)
        normed, (gate,) = self.norm(residual, temb)
        mlp = F.gelu(self.proj_mlp(normed), approximate="tanh")

        attn_x, attn_c = self.attn.joint(normed[:, :num_x], normed[:, num_x:], inputs)
        if self.cross_attn is not None:  # added before the fused projection and gate (paper, sec. 3.3)
            text = normed[:, num_x + inputs.image_len:]
            attn_x = attn_x + self.cross_attn(attn_x, text, inputs, self.attn)

        out = residual + gate * self.proj_out(torch.cat([torch.cat([attn_x, attn_c], dim=1), mlp], dim=2))
        return out[:, :num_x], out[:, num_x:]
