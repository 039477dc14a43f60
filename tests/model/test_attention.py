import importlib.util

import pytest
import torch
import torch.nn.functional as F

from motif_video.model.attention import attend, get_attention_backend, merge_heads, set_attention_backend


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        set_attention_backend("xformers")
    assert get_attention_backend() == "sdpa"


@pytest.mark.skipif(importlib.util.find_spec("sageattention") is not None, reason="sageattention is installed")
def test_missing_kernel_package_is_named():
    with pytest.raises(ValueError, match="pip install sageattention"):
        set_attention_backend("sage")
    assert get_attention_backend() == "sdpa"


def test_masked_keys_are_ignored():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen) for _ in range(3))
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]]).view(2, 1, 1, 5)
    out = attend(q, k, v, keep)
    trimmed = merge_heads(F.scaled_dot_product_attention(q[1:], k[1:, :, :3], v[1:, :, :3]))
    torch.testing.assert_close(out[1:], trimmed, rtol=1e-6, atol=1e-6)
