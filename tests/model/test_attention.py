import importlib.util

import pytest
import torch
import torch.nn.functional as F

from motif_video import MotifVideoTransformer
from motif_video.cli import build_parser
from motif_video.errors import MotifVideoError
from motif_video.model.backends import (ATTENTION_BACKENDS, ReferenceBackend, SDPABackend, attention_backend,
                                        attention_backends, set_attention_backend)
from motif_video.model.layout import TEXT, VIDEO, AttentionLayout, AttentionSite, Segment
from tests.conftest import randomize_

LAYOUT = AttentionLayout((Segment(VIDEO, 3), Segment(TEXT, 2)), (Segment(VIDEO, 3), Segment(TEXT, 2)), (1, 1, 3))
SITE = AttentionSite(0, "self")


def test_unknown_backend_is_rejected():
    with pytest.raises(MotifVideoError, match="unknown attention backend 'xformers'"):
        attention_backend("xformers")


@pytest.mark.skipif(importlib.util.find_spec("sageattention") is not None, reason="sageattention is installed")
def test_missing_kernel_package_is_named():
    with pytest.raises(MotifVideoError, match="pip install sageattention"):
        attention_backend("sage")


def test_cli_offers_every_registered_backend():
    parser = build_parser()
    for name in ATTENTION_BACKENDS:
        assert parser.parse_args(["generate", "a cat", "-o", "x.mp4", "--attention", name]).attention == name


def test_masked_keys_are_ignored():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen) for _ in range(3))
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]]).view(2, 1, 1, 5)
    for backend in (SDPABackend(), ReferenceBackend()):
        out = backend(q, k, v, keep, LAYOUT, SITE)
        trimmed = F.scaled_dot_product_attention(q[1:], k[1:, :, :3], v[1:, :, :3])
        torch.testing.assert_close(out[1:], trimmed, rtol=1e-6, atol=1e-6)


def test_reference_backend_equals_sdpa():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=gen) for _ in range(3))
    keep = torch.rand(2, 1, 1, 37, generator=gen) > 0.3
    for mask in (None, keep):
        torch.testing.assert_close(ReferenceBackend()(q, k, v, mask, LAYOUT, SITE),
                                   SDPABackend()(q, k, v, mask, LAYOUT, SITE), rtol=1e-6, atol=1e-6)


class Counting:
    """Wraps a backend and counts its calls per (block, kind) site."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {}

    def __call__(self, q, k, v, key_mask, layout, site):
        self.calls[site] = self.calls.get(site, 0) + 1
        return self.inner(q, k, v, key_mask, layout, site)


def test_two_models_in_one_process_use_their_own_backends():
    torch.manual_seed(0)
    config = MotifVideoTransformer.from_preset("motif-video-tiny", image_embed_dim=None,
                                               enable_text_cross_attention_single=True).config
    first = randomize_(MotifVideoTransformer(config)).eval()
    second = MotifVideoTransformer(config).eval()
    second.load_state_dict(first.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.in_channels, 3, 8, 8, generator=gen)
    t, text = torch.tensor([700.0, 30.0]), torch.randn(2, 5, config.text_embed_dim, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        expected = first(x, t, text, mask)  # the default backend, before any is set

        sdpa = set_attention_backend(first, Counting(SDPABackend()))
        reference = set_attention_backend(second, Counting(ReferenceBackend()))
        assert attention_backends(first) == [sdpa] and attention_backends(second) == [reference]
        out_sdpa, out_reference = first(x, t, text, mask), second(x, t, text, mask)

    assert torch.equal(out_sdpa, expected)
    torch.testing.assert_close(out_reference, expected, rtol=1e-5, atol=1e-5)
    # each model called its own backend, once per attention module: every block's self-attention, and the
    # Shared Cross-Attention of the single-stream encoder blocks
    sites = {AttentionSite(i, "self") for i in range(len(first.blocks))}
    sites |= {AttentionSite(config.num_layers + i, "cross") for i in range(config.num_encoder_single_layers)}
    assert sdpa.calls == reference.calls == {site: 1 for site in sites}
