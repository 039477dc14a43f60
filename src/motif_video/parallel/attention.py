"""The context-parallel attention backend: Ulysses and ring attention over the sharded segments of any attention
call, wrapping a kernel backend.

The call's `AttentionLayout` says which query/key segments are sharded (video, and the DDT decoder's decoder and
encoder streams) and which are replicated (text, image tokens):
- keys with no sharded segment (Shared Cross-Attention: sharded queries over the text) need nothing from other
  ranks: the inner kernel runs on the local queries;
- otherwise Ulysses turns the sharded segments' sequence split into a head split (all-to-all), while the
  replicated segments, whole on every rank already, are only head-sliced; ring attention then runs the sharded
  queries over every ring rank's sharded key block as the blocks pass around the ring and, once, over the
  replicated keys, merging the partial results exactly (ring.py). Queries of replicated segments come back whole
  on every rank (their heads all-gathered).
"""

from __future__ import annotations

import torch

from ..model.backends import DEFAULT_BACKEND, AttentionBackend
from ..model.layout import GRID_KINDS, AttentionLayout, AttentionSite
from .collectives import all_gather
from .grid import ContextGrid
from .ring import merge, partial_attention, ring_attention
from .ulysses import gather_heads, gather_mask, head_slice, heads_to_sequence, sequence_to_heads


def _split(x: torch.Tensor, segments, dim: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """x's parts along `dim` per segment -> (sharded parts, replicated parts), each in sequence order."""
    sharded, replicated, start = [], [], 0
    for segment in segments:
        part = x.narrow(dim, start, segment.length)
        (sharded if segment.kind in GRID_KINDS else replicated).append(part)
        start += segment.length
    return sharded, replicated


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    return torch.cat(parts, dim=dim) if parts else None


class ContextParallelAttention(AttentionBackend):
    name = "context-parallel"

    def __init__(self, grid: ContextGrid, inner: AttentionBackend = DEFAULT_BACKEND):
        self.grid, self.inner = grid, inner
        self.ulysses, self.ring = grid.shape.ulysses, grid.shape.ring

    def __call__(self, q, k, v, key_mask, layout: AttentionLayout, site: AttentionSite):
        if not any(s.kind in GRID_KINDS for s in layout.key):
            return self.inner(q, k, v, key_mask, layout, site)
        q_sh, q_rep = (_cat(p, 2) for p in _split(q, layout.query, 2))
        k_sh, k_rep = (_cat(p, 2) for p in _split(k, layout.key, 2))
        v_sh, v_rep = (_cat(p, 2) for p in _split(v, layout.key, 2))
        m_sh = m_rep = None
        if key_mask is not None:
            m_sh, m_rep = (_cat(p, 3) for p in _split(key_mask, layout.key, 3))

        g = self.grid
        if self.ulysses > 1:
            u, group = g.ulysses_rank, g.ulysses_group
            q_sh = sequence_to_heads(q_sh, self.ulysses, group) if q_sh is not None else None
            k_sh, v_sh = sequence_to_heads(k_sh, self.ulysses, group), sequence_to_heads(v_sh, self.ulysses, group)
            q_rep, k_rep, v_rep = (head_slice(t, self.ulysses, u) if t is not None else None
                                   for t in (q_rep, k_rep, v_rep))
            if m_sh is not None:
                m_sh = torch.cat(gather_mask(m_sh, group), dim=3)
        queries = _cat([t for t in (q_sh, q_rep) if t is not None], 2)  # (B, H/U, n_sh + n_rep, hd)
        n_sh = q_sh.shape[2] if q_sh is not None else 0

        if self.ring == 1:
            keys = _cat([k_sh, k_rep] if k_rep is not None else [k_sh], 2)
            values = _cat([v_sh, v_rep] if v_rep is not None else [v_sh], 2)
            mask = None
            if key_mask is not None:
                mask = _cat([m_sh, m_rep] if m_rep is not None else [m_sh], 3)
            out = self.inner(queries, keys, values, mask, layout, site)
        else:
            out = self._ring(queries, n_sh, k_sh, v_sh, m_sh, k_rep, v_rep, m_rep).to(q.dtype)

        out_sh, out_rep = out[:, :, :n_sh], out[:, :, n_sh:]
        if self.ulysses > 1:
            out_sh = heads_to_sequence(out_sh, self.ulysses, g.ulysses_group) if n_sh else out_sh
            out_rep = gather_heads(out_rep, g.ulysses_group) if out_rep.shape[2] else out_rep
        return self._reassemble(out_sh, out_rep, layout.query)

    def _ring(self, q, n_sh, k_sh, v_sh, m_sh, k_rep, v_rep, m_rep):
        """Attention of q (its first n_sh queries sharded, the rest replicated) over every ring rank's sharded key
        block, then over the local replicated keys (once)."""
        group = self.grid.ring_group
        outputs = []
        if n_sh:
            q_sh = q[:, :, :n_sh]
            out, lse = ring_attention(q_sh, k_sh, v_sh, m_sh, group)
            if k_rep is not None:
                out, lse = merge(out, lse, *partial_attention(q_sh, k_rep, v_rep, m_rep))
            outputs.append(out)
        if q.shape[2] > n_sh:
            # The replicated queries must come out with the same bits on every rank (the text stream stays
            # replicated), which the ring's rank-dependent block order would not give: each rank attends them over
            # its own block only, and every rank merges the gathered partials in rank order. They are few, so the
            # gathered partials (B, H, n_rep, hd + 1) per rank are small.
            q_rep = q[:, :, n_sh:]
            out, lse = partial_attention(q_rep, k_sh, v_sh, m_sh)
            hd = out.shape[-1]
            partials = all_gather(torch.cat([out, lse], dim=-1), group)  # R x (B, H, n_rep, hd + 1)
            out, lse = partials[0][..., :hd], partials[0][..., hd:]
            for partial in partials[1:]:
                out, lse = merge(out, lse, partial[..., :hd], partial[..., hd:])
            if k_rep is not None:
                out, lse = merge(out, lse, *partial_attention(q_rep, k_rep, v_rep, m_rep))
            outputs.append(out)
        return torch.cat(outputs, dim=2)

    @staticmethod
    def _reassemble(out_sh: torch.Tensor, out_rep: torch.Tensor, segments) -> torch.Tensor:
        """Sharded and replicated outputs back into the query's segment order."""
        parts, i_sh, i_rep = [], 0, 0
        for segment in segments:
            if segment.kind in GRID_KINDS:
                parts.append(out_sh[:, :, i_sh:i_sh + segment.length])
                i_sh += segment.length
            else:
                parts.append(out_rep[:, :, i_rep:i_rep + segment.length])
                i_rep += segment.length
        return torch.cat(parts, dim=2)

    def __repr__(self) -> str:
        return f"ContextParallelAttention(ulysses={self.ulysses}, ring={self.ring}, inner={self.inner!r})"
