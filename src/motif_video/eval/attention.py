"""Per-block attention across frames: a recording attention backend and the numbers it yields.

`AttentionRecorder` wraps a kernel backend (installed with `set_attention_backend(model, recorder)`): the wrapped
kernel computes every output unchanged, and when armed the recorder also reduces one attention call to a
frame-level map: for the queries of each video frame, the attention mass (averaged over the frame's queries) that
lands on each key frame of every video-grid key segment and on each other key segment (text, image). It works
through the queries in chunks and sums probabilities into key bins by a one-hot matmul, so no N x N map is ever
held: at the release size (114,080 video tokens, 228,160 keys in a decoder block) one full map would be 12 heads x
114,080 x 228,160 fp32 = 1.25 TB.

Queries are the call's first query segment: the video tokens in stages 2-3, the decoder stream in the DDT decoder
(whose keys are [decoder tokens; encoder tokens], so both its self and its decoder-to-encoder frame structure
appear). Only self-attention is recorded by default: Shared Cross-Attention attends to text alone and has no frame
structure. Batch row 0 is recorded, from the first call of each site while armed: the pipeline runs the
conditional branch first (its rows first in a batched guidance pass, its pass first otherwise), so under
classifier-free guidance this is the conditional prediction of the first prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import MotifVideoError
from ..model.backends import AttentionBackend
from ..model.layout import GRID_KINDS, AttentionLayout, AttentionSite

DEFAULT_CHUNK_BYTES = 512 * 2**20


@dataclass
class FrameAttention:
    """One attention call reduced to frames. `mass[h, f, j]`: the attention of head h's queries in frame f on key
    bin j, averaged over those queries; each row sums to 1 over the bins. Bin j is `bins[j] = (kind, frame)`,
    frame None for a segment without a grid (text, image)."""

    site: AttentionSite
    step: int
    query_kind: str
    bins: list[tuple[str, int | None]]
    mass: torch.Tensor  # (heads, T', num_bins) float64
    queries_per_frame: list[int]

    @property
    def frames(self) -> int:
        return self.mass.shape[1]

    def mean_over_heads(self) -> torch.Tensor:
        return self.mass.mean(0)  # (T', num_bins)

    def shares(self, mass: torch.Tensor | None = None) -> dict[str, float]:
        """Scalars of a (T', bins) map (default: the head mean), each query weighted equally: per grid key kind
        `<kind>_same_frame` / `<kind>_other_frames`, per other kind `<kind>`, plus `same_frame` / `other_frames`
        (summed over the grid kinds),
        `frame_distance` (mass-weighted mean |key frame - query frame| over grid mass) and its value under
        attention spread evenly over the grid keys (`uniform_frame_distance`)."""
        mass = self.mean_over_heads() if mass is None else mass
        weights = torch.tensor(self.queries_per_frame, dtype=torch.float64)
        weights = weights / weights.sum()
        per_query = (mass * weights[:, None]).sum(0)  # (bins,): the mass of an average query
        frames = torch.arange(self.frames)
        out: dict[str, float] = {}
        grid_total, grid_distance, same_total, other = 0.0, 0.0, 0.0, 0.0
        for kind in dict.fromkeys(k for k, _ in self.bins):
            cols = [j for j, (k, _) in enumerate(self.bins) if k == kind]
            if self.bins[cols[0]][1] is None:
                out[kind] = float(per_query[cols].sum())
                continue
            key_frames = torch.tensor([self.bins[j][1] for j in cols])
            block = mass[:, cols]  # (T', T')
            same = (frames[:, None] == key_frames[None, :]).double()
            distance = (frames[:, None] - key_frames[None, :]).abs().double()
            out[f"{kind}_same_frame"] = float(((block * same).sum(1) * weights).sum())
            out[f"{kind}_other_frames"] = float(((block * (1 - same)).sum(1) * weights).sum())
            same_total += out[f"{kind}_same_frame"]
            other += out[f"{kind}_other_frames"]
            grid_total += float((block.sum(1) * weights).sum())
            grid_distance += float(((block * distance).sum(1) * weights).sum())
        out["same_frame"], out["other_frames"] = same_total, other
        out["frame_distance"] = grid_distance / grid_total if grid_total > 0 else float("nan")
        t = self.frames
        out["uniform_frame_distance"] = sum(abs(a - b) for a in range(t) for b in range(t)) / (t * t)
        return out


def key_bins(layout: AttentionLayout, kept: torch.Tensor | None) -> tuple[torch.Tensor, list]:
    """Bin index of every key (N_k,) and the bins' (kind, frame) labels: one bin per frame of each grid segment,
    one per other segment."""
    frames = layout.grid[0]
    index, bins = [], []
    for segment in layout.key:
        if segment.kind in GRID_KINDS:
            index.append(len(bins) + token_frames(segment.length, layout, kept))
            bins += [(segment.kind, f) for f in range(frames)]
        else:
            index.append(torch.full((segment.length,), len(bins), dtype=torch.long))
            bins.append((segment.kind, None))
    return torch.cat(index), bins


def token_frames(length: int, layout: AttentionLayout, kept: torch.Tensor | None) -> torch.Tensor:
    """The frame of each of a grid segment's tokens (length,) from the t-major grid and the TREAD keep set."""
    t, h, w = layout.grid
    if kept is not None:
        if kept.shape[0] != length:
            raise MotifVideoError(f"a grid segment of {length} tokens under a route keeping {kept.shape[0]}")
        return (kept.cpu() // (h * w)).long()
    if length != t * h * w:
        raise MotifVideoError(f"attention recording needs the whole video sequence on one process: a grid segment "
                              f"holds {length} of {t * h * w} tokens")
    return torch.arange(length) // (h * w)


def frame_attention(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, layout: AttentionLayout,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[torch.Tensor, list, list[int]]:
    """Frame-level attention of batch row 0: q (B, heads, N_q, d), k (B, heads, N_k, d) -> (mass (heads, T',
    bins) float64, bins, queries per frame). Exact softmax in fp32, queries in chunks of at most `chunk_bytes` of
    scores."""
    kept = layout.kept[0] if layout.kept is not None else None
    query = layout.query[0]
    if query.kind not in GRID_KINDS:
        raise MotifVideoError(f"the first query segment is {query.kind!r}, not a video-grid segment")
    heads, num_keys = q.shape[1], k.shape[2]
    bin_index, bins = key_bins(layout, kept)
    if bin_index.shape[0] != num_keys:
        raise MotifVideoError(f"the layout lists {bin_index.shape[0]} keys, the call has {num_keys}")
    query_frame = token_frames(query.length, layout, kept).to(q.device)
    frames = layout.grid[0]
    one_hot = F.one_hot(bin_index, len(bins)).to(q.device, torch.float32)  # (N_k, bins)
    keys = k[0].float()  # (heads, N_k, d)
    keep = key_mask[0, 0, 0] if key_mask is not None else None  # (N_k,)
    scale = 1.0 / math.sqrt(q.shape[-1])
    # scores and probabilities of a chunk are alive together: 2 fp32 values per (head, query, key)
    chunk = max(1, chunk_bytes // (2 * 4 * heads * num_keys))
    total = torch.zeros(heads, frames, len(bins), dtype=torch.float64, device=q.device)
    for start in range(0, query.length, chunk):
        stop = min(start + chunk, query.length)
        scores = (q[0, :, start:stop].float() @ keys.transpose(-1, -2)) * scale  # (heads, C, N_k)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        binned = scores.softmax(dim=-1) @ one_hot  # (heads, C, bins)
        total.index_add_(1, query_frame[start:stop], binned.double())
    counts = torch.bincount(query_frame.cpu(), minlength=frames)
    mass = total.cpu() / counts.clamp_min(1).double()[None, :, None]
    return mass, bins, counts.tolist()


@dataclass
class AttentionRecorder(AttentionBackend):
    """A backend that computes attention with `inner` and, while armed, records each site's first call once as a
    `FrameAttention` in `records`. The output is always `inner`'s, untouched."""

    inner: AttentionBackend
    kinds: tuple[str, ...] = ("self",)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    records: list[FrameAttention] = field(default_factory=list)
    step: int | None = None  # armed for this sampling step; None: not recording
    name = "recorder"

    def arm(self, step: int | None) -> None:
        self.step = step

    def __call__(self, q, k, v, key_mask, layout, site):
        out = self.inner(q, k, v, key_mask, layout, site)
        if self.step is not None and site.kind in self.kinds and not self._seen(site):
            with torch.no_grad():
                mass, bins, counts = frame_attention(q.detach(), k.detach(), key_mask, layout, self.chunk_bytes)
            self.records.append(FrameAttention(site, self.step, layout.query[0].kind, bins, mass, counts))
        return out

    def _seen(self, site: AttentionSite) -> bool:
        return any(r.step == self.step and r.site == site for r in self.records)

    def __repr__(self) -> str:
        return f"AttentionRecorder({self.inner!r})"
