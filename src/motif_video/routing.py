"""TREAD token routing (Krause et al., ICCV 2025): during training, a random subset of video tokens skips a span of
blocks unchanged and is scattered back at the span's end, so those blocks see fewer tokens and a step costs less.

The model only receives a `TokenRoute` (which tokens stay on the route, between which blocks); sampling the route is
the trainer's job. Block indices are absolute over dual -> single encoder -> decoder blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class RouteConfig:
    """A route over blocks [start_layer, end_layer) that lets `selection_ratio` of the video tokens skip them."""

    selection_ratio: float = 0.5
    start_layer: int = 2
    end_layer: int = -4  # negative: counted from the end (TREAD: end the route before the last few layers)

    def resolve(self, num_blocks: int) -> tuple[int, int]:
        start = self.start_layer if self.start_layer >= 0 else num_blocks + self.start_layer
        end = self.end_layer if self.end_layer >= 0 else num_blocks + self.end_layer
        if not 0.0 <= self.selection_ratio < 1.0:
            raise ConfigError(f"routing selection_ratio={self.selection_ratio} must be in [0, 1)")
        if not 0 <= start < end <= num_blocks:
            raise ConfigError(
                f"routing start_layer={self.start_layer}, end_layer={self.end_layer} must give 0 <= start < end <= "
                f"{num_blocks} (the model's block count)"
            )
        return start, end


@dataclass
class TokenRoute:
    """Which video tokens go THROUGH blocks [start_layer, end_layer): `kept` (B, N_kept), sorted indices."""

    start_layer: int
    end_layer: int
    kept: torch.Tensor


def sample_route(config: RouteConfig, num_blocks: int, batch_size: int, num_tokens: int,
                 generator: torch.Generator | None = None, device=None) -> TokenRoute | None:
    """A fresh per-sample random keep set; None when nothing would be routed."""
    start, end = config.resolve(num_blocks)
    num_kept = num_tokens - int(num_tokens * config.selection_ratio)
    if num_kept >= num_tokens:
        return None
    scores = torch.rand(batch_size, num_tokens, generator=generator, device=generator.device if generator else None)
    kept = scores.argsort(dim=1)[:, :num_kept].sort(dim=1).values  # sorted: keeps t-major token order
    return TokenRoute(start, end, kept.to(device))


def gather_tokens(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N_kept, D); also (N, D) per-position tables (RoPE) -> (B, N_kept, D)."""
    if x.dim() == 2:
        return x[kept]
    return torch.gather(x, 1, kept[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(full: torch.Tensor, routed: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Put the routed tokens back into a copy of `full`; tokens not kept keep their pre-route values."""
    return full.scatter(1, kept[..., None].expand(-1, -1, full.shape[-1]), routed)


class RouteSpan:
    """A `TokenRoute` inside one forward pass: which video tokens the current block runs on.

    Blocks inside [start_layer, end_layer) see only the kept tokens: where the route starts, `move` gathers them
    from each stream it is given (keeping the full streams); where it ends, `move` scatters the routed streams back
    over the full ones, so the tokens that skipped the route carry their pre-route values. Tokens are picked by
    global index, so a sequence-sharded stream (model/sharding.py) is gathered before and sharded again after.
    `rope` and `kept` always describe the tokens the current block sees; `num_tokens` is their global count.
    """

    def __init__(self, route: TokenRoute | None, rope: tuple[torch.Tensor, torch.Tensor], num_tokens: int,
                 sharding):
        self.route, self.sharding = route, sharding
        self.full_rope, self.num_video = rope, num_tokens
        self.saved: list[torch.Tensor] = []  # the full streams (local part) while the route is active
        self.active = False
        self._leave()

    def covers(self, index: int) -> bool:
        return self.route is not None and self.route.start_layer <= index < self.route.end_layer

    def moves_at(self, index: int) -> bool:
        """Whether the token set changes before block `index` (the route starts or ends there)."""
        return self.covers(index) != self.active

    def move(self, *streams: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Enter the route (full -> kept tokens of each stream) or leave it (kept tokens back into the full ones)."""
        return self.exit(*streams) if self.active else self.enter(*streams)

    def enter(self, *streams: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kept, shard, gather = self.route.kept, self.sharding.shard, self.sharding.gather
        self.saved = list(streams)
        self.active, self.kept, self.num_tokens = True, kept, kept.shape[1]
        self.rope = self.sharding.shard_rope(tuple(gather_tokens(r, kept) for r in self.full_rope))  # (B, N_kept, hd)
        return tuple(shard(gather_tokens(gather(s, self.num_video), kept)) for s in streams)  # (B, N_kept, D)

    def exit(self, *streams: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kept, shard, gather = self.route.kept, self.sharding.shard, self.sharding.gather
        full = [shard(scatter_tokens(gather(f, self.num_video), gather(s, kept.shape[1]), kept))
                for f, s in zip(self.saved, streams, strict=True)]  # (B, N, D)
        self._leave()
        return tuple(full)

    def _leave(self) -> None:
        self.saved, self.active, self.kept, self.num_tokens = [], False, None, self.num_video
        self.rope = self.sharding.shard_rope(self.full_rope)
