"""What an attention call sees besides Q, K and V: which tokens are which, and which module is calling.

Every attention call hands its backend an `AttentionLayout`: the segments of the query and of the key/value
sequence in order (video, image, text, or the DDT decoder's two streams), on this process, plus the video token
grid. A backend that shards the video sequence over processes (context parallelism) reads from it which tokens are
split across ranks and which are replicated; a backend that records attention maps reads from it where each frame's
tokens and the text lie. `AttentionSite` names the calling module (block index, self- or cross-attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (N, head_dim) or per-sample (B, N, head_dim)

# Segment kinds. Video-grid tokens (VIDEO, and in the DDT decoder DECODER and ENCODER) are the ones a sequence
# sharding splits across processes; TEXT and IMAGE tokens are few and replicated on every process.
VIDEO = "video"  # the video tokens of stages 2-3 (RoPE)
IMAGE = "image"  # SigLIP tokens of the first frame (I2V), in front of the text; never masked
TEXT = "text"  # text tokens; padded ones are masked out as keys
DECODER = "decoder"  # the DDT decoder's own stream: the patch embedding again (RoPE)
ENCODER = "encoder"  # the encoder's final video tokens, the decoder's context (no RoPE)
GRID_KINDS = (VIDEO, DECODER, ENCODER)


@dataclass(frozen=True)
class Segment:
    kind: str  # one of the kinds above
    length: int  # tokens of this kind on this process


@dataclass(frozen=True)
class AttentionLayout:
    """The token layout of one attention call: `query` and `key` (= value) segments in sequence order.

    `grid` is the whole clip's video token grid (T', H', W'), t-major: global video token i sits in frame
    i // (H' * W'). `kept` (B, N_kept): under a TREAD route, the global indices of the video tokens present (sorted);
    None when all of them are. Lengths count the tokens on this process (after any sequence sharding, padding
    included); the key mask the backend receives marks padding.
    """

    query: tuple[Segment, ...]
    key: tuple[Segment, ...]
    grid: tuple[int, int, int]
    kept: torch.Tensor | None = None

    def spans(self, side: str) -> dict[str, slice]:
        """Segment kind -> its slice of the query ("query") or key ("key") sequence."""
        spans, start = {}, 0
        for segment in getattr(self, side):
            spans[segment.kind] = slice(start, start + segment.length)
            start += segment.length
        return spans


@dataclass(frozen=True)
class AttentionSite:
    """Which attention module calls: `block` is its absolute index over `model.blocks` (dual -> single encoder ->
    decoder, the index space of TREAD routes and `capture_block`); `kind` is "self" (joint attention) or "cross"
    (Shared Cross-Attention to the text)."""

    block: int
    kind: str


@dataclass(frozen=True)
class AttentionInputs:
    """Everything the attention of one stage's blocks needs besides the hidden states; built once per stage (and
    again where a TREAD route changes the token set)."""

    layout: AttentionLayout  # joint self-attention over [x; context]
    rope: Rope | None  # for the x tokens (video or decoder stream), never for context
    key_mask: torch.Tensor | None  # (B, 1, 1, N_x + N_ctx) bool, True = attend; None: attend to all
    image_len: int = 0  # image tokens at the front of the context stream (excluded from cross-attention)
    cross_layout: AttentionLayout | None = None  # Shared Cross-Attention: x queries -> text keys
    cross_mask: torch.Tensor | None = None  # (B, 1, 1, N_text) bool
