"""The model's sequence-sharding hook: where the video token sequence may be split across processes.

`MotifVideoTransformer.forward` calls its `sequence_sharding` at fixed points:
- entry: `shard(tokens)` on the patch embedding (which is also the DDT decoder's input) and `shard_rope(rope)` on
  the RoPE tables, so every block runs on this process's part of the video tokens (text and image tokens stay
  whole on every process);
- `keep_mask(num_tokens)`: which local video tokens are real, so padding added by `shard` is masked out as keys;
- TREAD routes (`routing.RouteSpan`): kept tokens are chosen by global index, so a sharded stream is gathered,
  routed, and sharded again where a route starts and ends;
- exit: `gather(tokens, num_tokens)` before the output head (and on a captured REPA block output).
The default keeps the whole sequence on this process: every method is the identity and the model runs exactly as
unsharded. A context-parallel implementation subclasses it and is installed with `set_sequence_sharding`, together
with an attention backend that exchanges the sharded segments (see `AttentionLayout`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .layout import Rope


class SequenceSharding:
    """Identity sharding: all video tokens on this process."""

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) video-grid tokens or per-sample tables -> this process's part (B, N_local, ...), padded where
        N does not divide evenly."""
        return tokens

    def shard_rope(self, rope: Rope) -> Rope:
        """cos/sin tables (N, head_dim), or per-sample (B, N, head_dim) under a route -> the rows of the local
        tokens (padding rows included)."""
        return rope

    def gather(self, tokens: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """The inverse of `shard`: (B, N_local, ...) -> (B, num_tokens, ...) on every process, padding dropped."""
        return tokens

    def keep_mask(self, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """(N_local,) bool, False at padding tokens, for a sequence of `num_tokens` video tokens; None: no padding."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


NO_SHARDING = SequenceSharding()


def set_sequence_sharding(model: nn.Module, sharding: SequenceSharding | None) -> None:
    """Install `sharding` on a MotifVideoTransformer (None: back to the identity)."""
    model.sequence_sharding = sharding if sharding is not None else NO_SHARDING
