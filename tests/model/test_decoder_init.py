"""The matched decoder init: decoder token i reads encoder token i from the first step."""

import pytest
import torch

from motif_video import MotifVideoTransformer
from motif_video.errors import MotifVideoError
from motif_video.model.backends import SDPABackend, set_attention_backend
from motif_video.train.surgery import init_matched_decoder

GRID = (3, 4, 4)  # latent T', H', W' tokens of the test clip (patch 1x2x2 over 3x8x8 latents)


class SoftmaxWeights(SDPABackend):
    """SDPA that also keeps the softmax weights it applies (one block only: set on that block)."""

    def __init__(self):
        self.weights = []

    def __call__(self, q, k, v, key_mask, layout, site):
        self.weights.append(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1))
        return super().__call__(q, k, v, key_mask, layout, site)


def decoder_attention(model: MotifVideoTransformer) -> torch.Tensor:
    """Softmax weights (heads, N, 2N) of the first decoder block for one noise input."""
    recorder = set_attention_backend(model.blocks[model.decoder_start], SoftmaxWeights())
    gen = torch.Generator().manual_seed(0)
    c = model.config
    with torch.no_grad():
        model(torch.randn(1, c.in_channels, 3, 8, 8, generator=gen), torch.tensor([800.0]),
              torch.randn(1, 5, c.text_embed_dim, generator=gen))
    (w,) = recorder.weights
    return w[0]


def matching_share(w: torch.Tensor) -> float:
    """Mean attention a decoder token puts on the encoder token at its own position."""
    n = w.shape[-1] // 2
    return w[:, :n, n:].diagonal(dim1=1, dim2=2).mean().item()


def test_matched_init_points_each_decoder_token_at_its_encoder_token():
    torch.manual_seed(0)
    model = MotifVideoTransformer.from_preset("motif-video-tiny", image_embed_dim=None).eval()
    tokens = GRID[0] * GRID[1] * GRID[2]
    random_share = matching_share(decoder_attention(model))
    assert random_share < 3 / (2 * tokens)  # about uniform over the 2N keys

    init_matched_decoder(model, GRID)
    w = decoder_attention(model)
    assert matching_share(w) > 0.25  # of 1.0, shared with the token's own key
    n = w.shape[-1] // 2
    assert (w[:, :n, n:].argmax(-1) == torch.arange(n)).float().mean() > 0.9

    decoder = model.single_transformer_blocks[-1]
    assert torch.equal(decoder.attn.to_q.weight, decoder.attn.to_k.weight)
    h = model.config.hidden_size
    gate = decoder.norm.linear(torch.nn.functional.silu(model.time_text_embed(torch.tensor([500.0]))))[:, 2 * h:]
    assert gate.mean().item() == pytest.approx(1.0, abs=0.1)
    encoder = model.single_transformer_blocks[0]
    assert not torch.equal(encoder.attn.to_q.weight, encoder.attn.to_k.weight)  # only the decoder changes


def test_matched_init_needs_a_channel_that_rope_leaves_still():
    model = MotifVideoTransformer.from_preset("motif-video-tiny")
    with pytest.raises(MotifVideoError, match="no RoPE channel stays within"):
        init_matched_decoder(model, (200, 200, 200), max_angle=1e-3)
