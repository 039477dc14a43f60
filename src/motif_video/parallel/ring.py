"""Ring attention's exact merge: attention over key blocks computed one block at a time, each giving a partial
output and its log-sum-exp, combined by the online-softmax rule

    lse = log sum_j exp(lse_j),    out = sum_j exp(lse_j - lse) * out_j,

which equals softmax attention over all the blocks' keys at once. Blocks where every key is masked have
lse_j = -inf and weigh nothing.
"""

from __future__ import annotations

import math

import torch


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Nq, hd) over one key block k/v (B, H, Nk, hd), mask (B, 1, 1, Nk) bool or None -> out (B, H, Nq, hd)
    fp32, lse (B, H, Nq, 1) fp32. Materialises Nq x Nk scores (a fused kernel returning the lse avoids this on GPU)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, Nq, Nk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # a fully masked block: no NaN
    weights = torch.exp(scores - peak)
    total = weights.sum(dim=-1, keepdim=True)
    out = (weights @ v.float()) / total.clamp_min(torch.finfo(torch.float32).tiny)
    return out, peak + torch.log(total)


def merge_partials(partials: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The exact softmax attention over all blocks, from their partial outputs and log-sum-exps (fixed order, so
    every rank merging the same blocks gets the same bits)."""
    lse = torch.logsumexp(torch.cat([p[1] for p in partials], dim=-1), dim=-1, keepdim=True)  # (B, H, Nq, 1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return sum(out * torch.exp(block_lse - lse) for out, block_lse in partials)
