"""The sequence-sharding hook, exercised in one process: a sharding that pads the video sequence with masked tokens
(what a context-parallel sharding does when the token count does not divide the ranks) must leave every output and
gradient unchanged, with and without TREAD routes, REPA capture and encoder reuse."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from motif_video import MotifVideoTransformer
from motif_video.model.layout import DECODER, ENCODER, IMAGE, TEXT, VIDEO
from motif_video.model.sharding import NO_SHARDING, SequenceSharding, set_sequence_sharding
from motif_video.model.transformer import EncoderCache
from motif_video.routing import TokenRoute
from tests.conftest import randomize_

LATENT = (2, 6, 6)  # token grid (2, 3, 3): 18 video tokens, padded to 24


class PaddedSharding(SequenceSharding):
    """All tokens on this process, padded with zero tokens to a multiple of `multiple`; padding is masked as keys."""

    def __init__(self, multiple: int):
        self.multiple, self.calls = multiple, Counter()

    def padded(self, n: int) -> int:
        return -(-n // self.multiple) * self.multiple

    def shard(self, tokens):
        self.calls["shard"] += 1
        n = tokens.shape[1]
        return F.pad(tokens, (0, 0, 0, self.padded(n) - n))  # (B, N_pad, D)

    def shard_rope(self, rope):
        self.calls["shard_rope"] += 1
        n = rope[0].shape[-2]
        return tuple(F.pad(t, (0, 0, 0, self.padded(n) - n)) for t in rope)

    def gather(self, tokens, num_tokens):
        self.calls["gather"] += 1
        assert tokens.shape[1] == self.padded(num_tokens)
        return tokens[:, :num_tokens]

    def keep_mask(self, num_tokens, device):
        return torch.arange(self.padded(num_tokens), device=device) < num_tokens


class LayoutLog:
    """An SDPA backend that checks each call's layout against the tensors it receives."""

    def __init__(self):
        self.layouts = []

    def __call__(self, q, k, v, key_mask, layout, site):
        assert sum(s.length for s in layout.query) == q.shape[2]
        assert sum(s.length for s in layout.key) == k.shape[2]
        self.layouts.append((site, layout))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


@pytest.fixture(scope="module")
def model():
    m = MotifVideoTransformer.from_preset("motif-video-tiny", num_layers=2, num_single_layers=6, num_decoder_layers=3)
    return randomize_(m).eval()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 33, *LATENT, generator=gen)
    timestep = torch.tensor([850.0, 40.0])
    text = torch.randn(2, 5, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    image = torch.randn(2, 3, 24, generator=gen)
    kept = torch.stack([torch.randperm(18, generator=gen)[:7].sort().values for _ in range(2)])
    return latents, timestep, text, mask, image, kept


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def run(model, sharding, batch, route=None, capture=None):
    latents, timestep, text, mask, image, kept = batch
    set_sequence_sharding(model, sharding)
    try:
        model.zero_grad()
        x = latents.clone().requires_grad_(True)
        route = TokenRoute(*route, kept) if route else None
        out = model(x, timestep, text, mask, image, route=route, capture_block=capture)
        out, captured = out if capture is not None else (out, None)
        (out.square().sum() + (captured.square().sum() if captured is not None else 0)).backward()
        return out.detach(), captured, x.grad
    finally:
        set_sequence_sharding(model, None)


@pytest.mark.parametrize("route", [None, (1, 4), (3, 7), (6, 8), (0, 8)])
def test_padded_sequence_gives_the_unsharded_result(model, batch, route):
    capture = None if route is None else route[1] - 1
    plain = run(model, NO_SHARDING, batch, route, capture)
    sharding = PaddedSharding(8)
    padded = run(model, sharding, batch, route, capture)
    for got, want in zip(padded, plain):  # output, capture, input gradient
        if want is not None:
            assert got.shape == want.shape and rel_err(got, want) < 1e-5
    # the patch embedding and RoPE are sharded at entry; each route move (entering or leaving) reshards RoPE and
    # every stream it moves: the video stream in the encoder, both streams in the decoder, and a route running on
    # into the decoder leaves at the decoder's start and re-enters with both streams
    moved_streams = {None: 0, (1, 4): 1 + 1, (3, 7): 1 + 1 + 2 + 2, (6, 8): 2 + 2, (0, 8): 1 + 1 + 2 + 2}[route]
    moves = {None: 0, (1, 4): 2, (3, 7): 4, (6, 8): 2, (0, 8): 4}[route]
    assert sharding.calls["shard"] == 1 + moved_streams
    assert sharding.calls["shard_rope"] == 1 + moves


def test_encoder_reuse_with_padding(model, batch):
    latents, timestep, text, mask, image, _ = batch
    set_sequence_sharding(model, PaddedSharding(5))
    cache = EncoderCache()
    with torch.no_grad():
        try:
            first = model(latents, timestep, text, mask, image, encoder_cache=cache)
            assert cache.tokens.shape[1] == 20  # the local, padded encoder output is what is cached
            cache.refresh = False
            reused = model(latents, timestep - 5, text, mask, image, encoder_cache=cache)
        finally:
            set_sequence_sharding(model, None)
        cache = EncoderCache()
        torch.testing.assert_close(first, model(latents, timestep, text, mask, image, encoder_cache=cache))
        cache.refresh = False
        torch.testing.assert_close(reused, model(latents, timestep - 5, text, mask, image, encoder_cache=cache))


def test_every_attention_call_describes_its_tokens(model, batch):
    from motif_video.model.backends import set_attention_backend

    latents, timestep, text, mask, image, kept = batch
    log = set_attention_backend(model, LayoutLog())
    set_sequence_sharding(model, PaddedSharding(8))
    try:
        with torch.no_grad():
            model(latents, timestep, text, mask, image, route=TokenRoute(1, 3, kept))
    finally:
        set_sequence_sharding(model, None)
        set_attention_backend(model, "sdpa")
    by_site = {(site.block, site.kind): layout for site, layout in log.layouts}
    assert sorted(by_site) == sorted([(i, "self") for i in range(8)] + [(i, "cross") for i in (2, 3, 4)])
    for (block, kind), layout in by_site.items():
        assert layout.grid == (2, 3, 3)
        routed = 1 <= block < 3
        assert (layout.kept is kept) if routed else layout.kept is None
        video = 8 if routed else 24  # 7 kept tokens, or 18, padded to a multiple of 8
        if kind == "cross":
            assert [(s.kind, s.length) for s in layout.query] == [(VIDEO, video)]
            assert [(s.kind, s.length) for s in layout.key] == [(TEXT, 5)]
        elif block < 5:
            assert [(s.kind, s.length) for s in layout.key] == [(VIDEO, video), (IMAGE, 3), (TEXT, 5)]
            assert layout.spans("key")[TEXT] == slice(video + 3, video + 8)
        else:
            assert [(s.kind, s.length) for s in layout.query] == [(DECODER, 24), (ENCODER, 24)]
