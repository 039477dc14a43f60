"""TREAD routing through the transformer, against a per-sample reference in which routed blocks update only the kept
tokens in place (python indexing, trimmed text instead of masks), and direct checks of the skip path."""

import pytest
import torch

from motif_video import MotifVideoTransformer
from motif_video.errors import ConfigError
from motif_video.model.layout import (DECODER, ENCODER, IMAGE, TEXT, VIDEO, AttentionInputs, AttentionLayout,
                                      Segment)
from motif_video.model.rope import rope_frequencies
from motif_video.routing import RouteConfig, TokenRoute, sample_route
from tests.conftest import randomize_

# blocks 0-1 dual, 2-4 single encoder (with Shared Cross-Attention), 5-7 DDT decoder
DECODER_START, NUM_BLOCKS = 5, 8
LATENT = (2, 6, 6)  # (T, H, W) -> token grid (2, 3, 3)
NUM_TOKENS = 18


@pytest.fixture(scope="module")
def model():
    m = MotifVideoTransformer.from_preset("motif-video-tiny", num_layers=2, num_single_layers=6, num_decoder_layers=3)
    assert (m.decoder_start, len(m.blocks)) == (DECODER_START, NUM_BLOCKS)
    return randomize_(m).eval()


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 33, *LATENT, generator=gen)
    timestep = torch.tensor([850.0, 40.0])
    text = torch.randn(2, 5, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # a padded prompt in the batch
    image = torch.randn(2, 3, 24, generator=gen)
    kept = torch.stack([torch.randperm(NUM_TOKENS, generator=gen)[:7].sort().values for _ in range(2)])
    return latents, timestep, text, mask, image, kept


def block_inputs(rope, grid, num_video, image_len=None, text_len=None):
    """A block's attention inputs without masks (the reference trims padded text instead)."""
    if image_len is None:  # decoder: [decoder stream; encoder tokens]
        streams = (Segment(DECODER, num_video), Segment(ENCODER, num_video))
        return AttentionInputs(AttentionLayout(streams, streams, grid), rope, None)
    tokens = (Segment(VIDEO, num_video), Segment(IMAGE, image_len), Segment(TEXT, text_len))
    cross = AttentionLayout(tokens[:1], tokens[2:], grid)
    return AttentionInputs(AttentionLayout(tokens, tokens, grid), rope, None, image_len, cross, None)


def reference_one(model, latents, timestep, text, image, kept, start, end, capture=None):
    """One sample; blocks in [start, end) read and write only the `kept` video tokens, the rest stay as they are."""
    c = model.config
    grid = (LATENT[0], LATENT[1] // 2, LATENT[2] // 2)
    cos, sin = rope_frequencies(grid, c.rope_axes_dim, c.rope_theta)
    temb = model.time_text_embed(timestep)
    video = skip = model.x_embedder(latents)
    image_tokens = model.image_embedder(image)
    context = torch.cat([image_tokens, model.context_embedder(text)], dim=1)
    everything = torch.arange(video.shape[1])
    encoder_out, captured = None, None
    for i, block in enumerate(model.blocks):
        if i == DECODER_START:
            encoder_out, video = video, skip
        active = kept if kept is not None and start <= i < end else everything
        rope = (cos[active], sin[active])
        if encoder_out is None:
            inputs = block_inputs(rope, grid, len(active), image_tokens.shape[1], text.shape[1])
            out, context = block(video[:, active], context, temb, inputs)
        else:
            out, enc = block(video[:, active], encoder_out[:, active], temb, block_inputs(rope, grid, len(active)))
            encoder_out = encoder_out.index_copy(1, active, enc)
        video = video.index_copy(1, active, out)
        if i == capture:
            captured = out
    out = model.proj_out(model.norm_out(video, temb))  # (1, T*h*w, C*2*2)
    t, h, w = grid
    out = out.reshape(1, t, h, w, c.out_channels, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(1, -1, *LATENT)
    return out, captured


def reference(model, batch, start, end, capture=None, routed=True):
    latents, timestep, text, mask, image, kept = batch
    outs = [reference_one(model, latents[b:b + 1], timestep[b:b + 1], text[b:b + 1, mask[b].bool()], image[b:b + 1],
                          kept[b] if routed else None, start, end, capture) for b in range(len(latents))]
    return torch.cat([o for o, _ in outs]), (torch.cat([c for _, c in outs]) if capture is not None else None)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_reference_matches_the_unrouted_model(model, batch):
    latents, timestep, text, mask, image, _ = batch
    with torch.no_grad():
        plain = model(latents, timestep, text, mask, image)
        assert rel_err(plain, reference(model, batch, 0, 0, routed=False)[0]) < 1e-5


def test_no_route_is_exactly_the_plain_forward(model, batch):
    latents, timestep, text, mask, image, _ = batch
    assert sample_route(RouteConfig(0.0, 2, 6), NUM_BLOCKS, 2, NUM_TOKENS) is None
    with torch.no_grad():
        plain = model(latents, timestep, text, mask, image)
        assert torch.equal(model(latents, timestep, text, mask, image, route=None), plain)
        every = torch.arange(NUM_TOKENS).expand(2, -1)
        torch.testing.assert_close(model(latents, timestep, text, mask, image, route=TokenRoute(1, 6, every)), plain,
                                   rtol=1e-6, atol=1e-6)


SPANS = {
    "dual": (0, 2),
    "dual_to_single": (1, 4),
    "ends_at_decoder_start": (2, 5),
    "into_decoder": (3, 7),
    "encoder_to_end": (3, 8),
    "inside_decoder": (6, 7),
    "decoder_to_end": (6, 8),
    "whole_model": (0, 8),
    "starts_at_decoder_start": (5, 7),
}


@pytest.mark.parametrize("span", list(SPANS))
def test_routed_forward_and_gradients_match_reference(model, batch, span):
    check_against_reference(model, batch, *SPANS[span])


def check_against_reference(model, batch, start, end):
    latents, timestep, text, mask, image, kept = batch
    capture = end - 1
    weight = torch.randn(2, 16, *LATENT, generator=torch.Generator().manual_seed(7))

    def grads(fn):
        model.zero_grad()
        x = latents.clone().requires_grad_(True)
        out, captured = fn(x)
        ((out * weight).sum() + captured.square().sum()).backward()
        return out.detach(), captured.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()
                                                          if p.grad is not None}

    got = grads(lambda x: model(x, timestep, text, mask, image, route=TokenRoute(start, end, kept),
                                capture_block=capture))
    want = grads(lambda x: reference(model, (x, timestep, text, mask, image, kept), start, end, capture))
    assert got[0].shape == want[0].shape and rel_err(got[0], want[0]) < 1e-5
    assert got[1].shape == (2, kept.shape[1], model.config.hidden_size)  # capture inside a route: kept, in order
    assert rel_err(got[1], want[1]) < 1e-5
    assert rel_err(got[2], want[2]) < 1e-4
    assert set(got[3]) == set(want[3])
    for name in want[3]:
        assert rel_err(got[3][name], want[3][name]) < 1e-4, name


@pytest.mark.parametrize("span", ["dual_to_single", "into_decoder", "inside_decoder"])
def test_routed_away_tokens_leave_with_their_pre_route_values(model, batch, span):
    """Tokens not kept cross the route by identity, in value and in gradient (both decoder streams included)."""
    latents, timestep, text, mask, image, kept = batch
    start, end = SPANS[span]
    dropped = torch.stack([torch.tensor([i for i in range(NUM_TOKENS) if i not in set(k.tolist())]) for k in kept])
    seen = {}

    def before(_module, _args, output):  # output of block start-1: the tensors the route stashes
        for tensor in output:
            tensor.retain_grad()
        seen["before"] = output

    def at_end(_module, args):  # input of block `end`: after the scatter
        for tensor in args[:2]:
            tensor.retain_grad()
        seen["after"] = args[:2]

    hooks = [model.blocks[start - 1].register_forward_hook(before), model.blocks[end].register_forward_pre_hook(at_end)]
    try:
        model.zero_grad()
        out = model(latents, timestep, text, mask, image, route=TokenRoute(start, end, kept))
        out.square().sum().backward()
    finally:
        for hook in hooks:
            hook.remove()

    def rows(tensor, index):
        return torch.stack([tensor[b, index[b]] for b in range(2)])

    if end <= DECODER_START:  # encoder route: the video stream is carried through
        pairs = [(seen["before"][0], seen["after"][0])]
    elif start < DECODER_START:  # into the decoder: encoder tokens become the decoder's context stream
        pairs = [(seen["before"][0], seen["after"][1])]
    else:  # inside the decoder: both streams are routed with the same indices
        pairs = [(seen["before"][0], seen["after"][0]), (seen["before"][1], seen["after"][1])]
    for pre, post in pairs:
        assert torch.equal(rows(post, dropped), rows(pre, dropped))
        assert torch.equal(rows(pre.grad, dropped), rows(post.grad, dropped))  # the skip is the only path
        assert not torch.allclose(rows(pre.grad, kept), rows(post.grad, kept))  # kept tokens went through blocks


@pytest.mark.parametrize("span", ["encoder_to_end", "decoder_to_end", "whole_model"])
def test_routed_blocks_learn_only_from_kept_tokens(model, batch, span):
    """A loss on the routed-away tokens' outputs gives routed blocks exactly zero gradient."""
    latents, timestep, text, mask, image, kept = batch
    start, end = SPANS[span]
    token_mask = torch.ones(2, NUM_TOKENS)
    token_mask.scatter_(1, kept, 0.0)  # 1 on tokens that skip the route
    pixel_mask = token_mask.reshape(2, 1, 2, 3, 3).repeat_interleave(2, 3).repeat_interleave(2, 4)  # (B, 1, T, H, W)
    model.zero_grad()
    x = latents.clone().requires_grad_(True)
    (model(x, timestep, text, mask, image, route=TokenRoute(start, end, kept)) * pixel_mask).sum().backward()
    for block in model.blocks[start:end]:
        assert all(p.grad is None or not p.grad.any() for p in block.parameters())
    if start >= DECODER_START + 1:
        assert model.blocks[start - 1].proj_out.weight.grad.any()  # reached through the decoder stream before
    if start < DECODER_START:  # skipped tokens leave from the patch embedding: their input patches alone matter
        assert not (x.grad * (1 - pixel_mask)).any() and (x.grad * pixel_mask).any()


# -- route configuration and sampling -----------------------------------------------------------------------------
def test_route_config_resolves_and_validates():
    assert RouteConfig().resolve(36) == (2, 32)
    assert RouteConfig(0.5, -10, -2).resolve(36) == (26, 34)
    assert RouteConfig(0.25, 0, 36).resolve(36) == (0, 36)
    for bad, match in [(dict(selection_ratio=1.0), "selection_ratio"), (dict(selection_ratio=-0.1), "selection_ratio"),
                       (dict(start_layer=5, end_layer=5), "start < end"), (dict(start_layer=6, end_layer=3), "start"),
                       (dict(start_layer=0, end_layer=37), "36"), (dict(start_layer=-40, end_layer=-1), "start")]:
        with pytest.raises(ConfigError, match=match):
            RouteConfig(**bad).resolve(36)


def test_sample_route_keeps_sorted_distinct_tokens_per_sample():
    gen = torch.Generator().manual_seed(0)
    route = sample_route(RouteConfig(0.75, 1, -1), 8, 3, 10, generator=gen)
    assert (route.start_layer, route.end_layer) == (1, 7)
    assert route.kept.shape == (3, 3)  # 10 - int(7.5) tokens stay on the route
    for row in route.kept:
        assert torch.equal(row, row.unique()) and 0 <= row.min() and row.max() < 10
    assert len({tuple(r.tolist()) for r in route.kept}) > 1  # per-sample sets
    again = sample_route(RouteConfig(0.75, 1, -1), 8, 3, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.kept, route.kept)
