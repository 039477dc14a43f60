"""Ring attention: each rank's queries attend over every ring rank's key/value block while the blocks travel around
the ring with point-to-point sends, so a rank never holds more than its own block and two in transit (the one it
attends over, the next one arriving), whatever the ring degree.

Each block gives a partial output and its log-sum-exp, merged into a running pair by the online-softmax rule

    lse = log(exp(lse_a) + exp(lse_b)),    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b,

which equals softmax attention over all the blocks' keys at once. Blocks where every key is masked have
lse = -inf and weigh nothing.

The backward is the ring-flash-attention scheme: the blocks travel the ring again, each rank recomputes its queries'
attention over the block it holds from the saved output and log-sum-exp, adds into its local dQ, and adds the
block's dK/dV into accumulators that travel with the block and reach the block's owner after one more hop.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Nq, hd) over one key block k/v (B, H, Nk, hd), mask (B, 1, 1, Nk) bool or None -> out (B, H, Nq, hd)
    fp32, lse (B, H, Nq, 1) fp32. Materialises the fp32 scores one tile of hd queries at a time, so a tile's scores
    are no larger than the key block and memory stays O(block) whatever the query count (a fused kernel returning
    the lse, FlashAttention's, avoids materialising scores at all on GPU)."""
    q, k, v = q.float(), k.float(), v.float()
    scale = 1 / math.sqrt(q.shape[-1])
    outs, lses = [], []
    for q_tile in q.split(q.shape[-1], dim=2):
        scores = (q_tile @ k.transpose(-1, -2)).mul_(scale)  # (B, H, tile, Nk)
        if mask is not None:
            scores = scores.masked_fill_(~mask, float("-inf"))
        # the peak only keeps exp in range (lse is the same for any peak): no gradient through it
        peak = scores.detach().amax(dim=-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # a fully masked block: no NaN
        weights = scores.sub_(peak).exp_()
        total = weights.sum(dim=-1, keepdim=True)
        outs.append((weights @ v) / total.clamp_min(torch.finfo(torch.float32).tiny))
        lses.append(peak + torch.log(total))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def partial_attention_backward(q, k, v, mask, lse, dout, dlse, delta):
    """The gradients of one block's share of attention whose full output has log-sum-exp `lse` (B, H, Nq, 1):
    dout (B, H, Nq, hd) and dlse (B, H, Nq, 1) fp32 of that output, delta = rowsum(dout * out) -> dq (B, H, Nq, hd),
    dk, dv (B, H, Nk, hd), all fp32. Recomputes the probabilities one query tile at a time, as the forward."""
    q, k, v = q.float(), k.float(), v.float()
    scale = 1 / math.sqrt(q.shape[-1])
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    dqs, dk, dv = [], torch.zeros_like(k), torch.zeros_like(v)
    for q_tile, lse_tile, dout_tile, dlse_tile, delta_tile in zip(
            *(t.split(q.shape[-1], dim=2) for t in (q, lse, dout, dlse, delta)), strict=True):
        probs = (q_tile @ k.transpose(-1, -2)).mul_(scale)  # (B, H, tile, Nk)
        if mask is not None:
            probs = probs.masked_fill_(~mask, float("-inf"))
        probs = probs.sub_(lse_tile).exp_()
        dv += probs.transpose(-1, -2) @ dout_tile
        # d out_i / d s_ij = p_ij (v_j - out_i) and d lse_i / d s_ij = p_ij
        dscores = (dout_tile @ v.transpose(-1, -2)).sub_(delta_tile - dlse_tile).mul_(probs).mul_(scale)
        dqs.append(dscores @ k)
        dk += dscores.transpose(-1, -2) @ q_tile
    return torch.cat(dqs, dim=2), dk, dv


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
          lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial (out, lse) pairs over disjoint keys -> the pair over their union (differentiable)."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # both blocks fully masked: no NaN
    return out_a * torch.exp(lse_a - safe) + out_b * torch.exp(lse_b - safe), lse


class _Ring:
    """The ring group's neighbours: blocks go to the next rank and come from the previous one."""

    def __init__(self, group):
        ranks = dist.get_process_group_ranks(group)
        index = dist.get_rank(group)
        self.size, self.group = len(ranks), group
        self.next, self.previous = ranks[(index + 1) % self.size], ranks[(index - 1) % self.size]

    def shift(self, tensors, first_tag: int = 0):
        """Start sending `tensors` to the next rank and receiving the previous rank's into new buffers -> (works,
        buffers). Distinct tags keep transfers in flight at once (blocks, gradients) apart on gloo."""
        buffers = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, first_tag + i) for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, b, self.previous, self.group, first_tag + i) for i, b in enumerate(buffers)]
        return dist.batch_isend_irecv(ops), buffers


def _wait(works) -> None:
    for work in works:
        work.wait()


def _block(k, v, mask) -> list[torch.Tensor]:
    # the mask travels as uint8: byte buffers are what every backend sends
    return [k.contiguous(), v.contiguous()] + ([mask.to(torch.uint8).contiguous()] if mask is not None else [])


def _unpack(block):
    return block[0], block[1], block[2].bool() if len(block) == 3 else None


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, group):
        ring = _Ring(group)
        block = _block(k, v, mask)
        out = lse = None
        # rank r attends over blocks r, r - 1, ..., r + 1: a fixed order, so the result is deterministic
        for step in range(ring.size):
            if step + 1 < ring.size:  # the next block's transfer overlaps this block's attention
                works, incoming = ring.shift(block)
            block_out, block_lse = partial_attention(q, *_unpack(block))
            out, lse = (block_out, block_lse) if out is None else merge(out, lse, block_out, block_lse)
            if step + 1 < ring.size:
                _wait(works)
                block = incoming
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, mask, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        ring = ctx.ring
        dout, dlse = dout.float(), dlse.float()
        delta = (dout * out).sum(dim=-1, keepdim=True)  # (B, H, Nq, 1)
        dq = torch.zeros_like(q, dtype=torch.float32)
        block = _block(k, v, mask)
        grad_works = None
        for step in range(ring.size):
            if step + 1 < ring.size:
                works, incoming = ring.shift(block)
            dq_b, dk_b, dv_b = partial_attention_backward(q, *_unpack(block), lse, dout, dlse, delta)
            dq += dq_b
            if grad_works is not None:  # the held block's dK/dV from the ranks it visited before this one
                _wait(grad_works)
                dk_b += grads[0]
                dv_b += grads[1]
            # tags after the block's: this transfer is still in flight when the next block's starts
            grad_works, grads = ring.shift([dk_b, dv_b], first_tag=3)
            if step + 1 < ring.size:
                _wait(works)
                block = incoming
        _wait(grad_works)  # after the last hop every block's dK/dV, summed over the ring, is back at its owner
        return dq.to(q.dtype), grads[0].to(k.dtype), grads[1].to(v.dtype), None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   group) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, Nq, hd) over the key blocks k/v (B, H, Nk, hd) and masks (B, 1, 1, Nk) bool or None (None on every
    rank alike) of every rank of `group` -> out (B, H, Nq, hd) fp32, lse (B, H, Nq, 1) fp32. Differentiable."""
    return _RingAttention.apply(q, k, v, mask, group)
