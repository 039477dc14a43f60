"""Ring attention on 2 and 4 gloo processes (ring 2, ring 4, Ulysses 2 x ring 2) gives one process's output and
q/k/v gradients (float64 reference, 1e-5 of each gradient's largest entry), with a padded video token count (ring 4:
a rank holding padding only), a padded text batch, and a replicated text segment whose output is bit-identical on
every rank."""

import math

import torch
import torch.nn.functional as F

from motif_video.model.layout import TEXT, VIDEO, AttentionLayout, AttentionSite, Segment
from tests.parallel.helpers import spawn

B, HEADS, HEAD_DIM = 2, 4, 8
N_VIDEO, N_TEXT = 9, 5  # 9 video tokens over 4 processes: chunks of 3, the last one all padding
GRIDS = {2: [(1, 2)], 4: [(1, 4), (2, 2)]}  # processes -> (ulysses, ring) grids


def tensors():
    gen = torch.Generator().manual_seed(0)
    q, k, v, weight = (torch.randn(B, HEADS, N_VIDEO + N_TEXT, HEAD_DIM, generator=gen) for _ in range(4))
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return q, k, v, weight, text_mask


def reference():
    """One process, float64: output and the gradients of sum(out * weight)."""
    q, k, v, weight, text_mask = tensors()
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    mask = torch.cat([torch.ones(B, N_VIDEO, dtype=torch.bool), text_mask], dim=1)[:, None, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (out * weight.double()).sum().backward()
    return {"out": out.detach(), "q": q.grad, "k": k.grad, "v": v.grad}


def run_grids(rank, world):
    from motif_video.parallel import ContextGrid, ContextParallelAttention, GridShape

    results = {}
    for ulysses, ring in GRIDS[world]:
        grid = ContextGrid(GridShape(ulysses=ulysses, ring=ring), heads=HEADS)
        parts, index = ulysses * ring, grid.sequence_rank
        length = math.ceil(N_VIDEO / parts)
        q, k, v, weight, text_mask = tensors()

        def local(t):  # this process's padded video chunk, then the replicated text
            video = F.pad(t[:, :, :N_VIDEO], (0, 0, 0, length * parts - N_VIDEO))
            return torch.cat([video[:, :, index * length:(index + 1) * length], t[:, :, N_VIDEO:]], dim=2)

        q, k, v = (local(t).requires_grad_() for t in (q, k, v))
        keep = torch.arange(index * length, (index + 1) * length) < N_VIDEO
        mask = torch.cat([keep.expand(B, length), text_mask], dim=1)[:, None, None]  # (B, 1, 1, length + text)
        segments = (Segment(VIDEO, length), Segment(TEXT, N_TEXT))
        layout = AttentionLayout(query=segments, key=segments, grid=(1, 1, N_VIDEO))
        out = ContextParallelAttention(grid)(q, k, v, mask, layout, AttentionSite(0, "self"))
        # the processes' losses sum to the one-process loss: padding weighs nothing, and the text output, present
        # on every process, counts once
        weight = local(weight)
        weight = torch.cat([weight[:, :, :length] * keep[:, None], weight[:, :, length:] / parts], dim=2)
        (out * weight).sum().backward()
        results[(ulysses, ring)] = {"index": index, "length": length, "out": out.detach(),
                                    "q": q.grad, "k": k.grad, "v": v.grad}
    return results


def check(ranks, want):
    for grid in GRIDS[len(ranks)]:
        results = sorted((r[grid] for r in ranks), key=lambda r: r["index"])
        length = results[0]["length"]
        for key in ("out", "q", "k", "v"):
            video = torch.cat([r[key][:, :, :length] for r in results], dim=2)[:, :, :N_VIDEO]
            text = [r[key][:, :, length:] for r in results]
            # a replicated input's gradient is split over the processes (each computes a part): their sum is it
            text = text[0] if key == "out" else sum(text)
            got = torch.cat([video, text], dim=2).double()
            scale = want[key].abs().max()
            assert (got - want[key]).abs().max() <= 1e-5 * scale, (grid, key, ((got - want[key]).abs().max() / scale))
        assert all(torch.equal(r["out"][:, :, length:], results[0]["out"][:, :, length:]) for r in results), grid


def test_ring_two_processes_equals_one(tmp_path):
    check(spawn(run_grids, 2, tmp_path), reference())


def test_ring_four_processes_equals_one(tmp_path):
    check(spawn(run_grids, 4, tmp_path), reference())
