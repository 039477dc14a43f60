"""Attention backends: the kernel that computes softmax(Q K^T / sqrt(d)) V, chosen per model from outside.

Each attention module holds a backend object; `set_attention_backend(model, "flash")` sets it on every attention
module of a model (or of one block), so two models in one process can use different kernels. A backend is any
object with the `AttentionBackend` call signature: it receives Q/K/V (B, heads, N, head_dim), the boolean key mask,
the call's `AttentionLayout` (which tokens are video, text, decoder...) and the calling module's `AttentionSite`.
Context parallelism and attention recording plug in here as backends (wrapping a kernel backend), without touching
the blocks. A new kernel: subclass `AttentionBackend`, add it to `ATTENTION_BACKENDS`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MotifVideoError
from .layout import AttentionLayout, AttentionSite


class AttentionBackend:
    """The interface: a backend is called with one attention's Q, K, V and what the call is about."""

    name: str
    package: str | None = None  # the pip package the kernel comes from (None: PyTorch itself)
    modules: tuple[str, ...] = ()  # the importable modules, any one of which provides the kernel

    @classmethod
    def available(cls) -> bool:
        return not cls.modules or any(importlib.util.find_spec(m) is not None for m in cls.modules)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                 layout: AttentionLayout, site: AttentionSite) -> torch.Tensor:
        """q (B, heads, N_q, head_dim), k/v (B, heads, N_k, head_dim), key_mask (B, 1, 1, N_k) bool (True = attend)
        or None -> (B, heads, N_q, head_dim)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SDPABackend(AttentionBackend):
    """The default: PyTorch's fused SDPA (on CUDA it dispatches to its own FlashAttention-2 / cuDNN /
    memory-efficient kernels when there is no mask)."""

    name = "sdpa"

    def __call__(self, q, k, v, key_mask, layout, site):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)


class ReferenceBackend(AttentionBackend):
    """The plain formula, softmax(Q K^T / sqrt(d)) V materialised in fp32: runs on any device and dtype, and is the
    yardstick fused kernels are checked against. Memory grows with N_q x N_k: for tests and small models."""

    name = "reference"

    def __call__(self, q, k, v, key_mask, layout, site):
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, heads, N_q, N_k)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


class FusedKernelBackend(SDPABackend):
    """A third-party fused kernel for unmasked attention on CUDA in fp16/bf16; everything else (a padded text
    batch, fp32, CPU) goes through SDPA, so choosing one is always safe."""

    def __call__(self, q, k, v, key_mask, layout, site):
        if key_mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return self.kernel(q, k, v)
        return super().__call__(q, k, v, key_mask, layout, site)

    def kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FlashAttentionBackend(FusedKernelBackend):
    """FlashAttention 3 (`flash_attn_interface`, Hopper) if installed, else FlashAttention 2 (`flash_attn`): exact
    up to kernel rounding."""

    name = "flash"
    package = "flash-attn"
    modules = ("flash_attn_interface", "flash_attn")

    def __init__(self):
        module = next(m for m in self.modules if importlib.util.find_spec(m) is not None)
        self.version = 3 if module == "flash_attn_interface" else 2
        self.flash_attn_func = importlib.import_module(module).flash_attn_func

    def kernel(self, q, k, v):
        out = self.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, N, heads, hd)
        out = out[0] if isinstance(out, tuple) else out  # FA3 also returns the log-sum-exp
        return out.transpose(1, 2)

    def __repr__(self) -> str:
        return f"FlashAttentionBackend(version={self.version})"


class SageAttentionBackend(FusedKernelBackend):
    """SageAttention: quantises Q and K to int8, so it is approximate; measure its quality cost before use."""

    name = "sage"
    package = "sageattention"
    modules = ("sageattention",)

    def __init__(self):
        from sageattention import sageattn

        self.sageattn = sageattn

    def kernel(self, q, k, v):
        return self.sageattn(q, k, v, tensor_layout="HND", is_causal=False)


# The names the CLI offers (`--attention`).
ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    "sdpa": SDPABackend, "reference": ReferenceBackend, "flash": FlashAttentionBackend,
    "sage": SageAttentionBackend,
}
DEFAULT_BACKEND = SDPABackend()


def attention_backend(name: str) -> AttentionBackend:
    """A backend by registry name; a one-line error for an unknown name or a missing kernel package."""
    if name not in ATTENTION_BACKENDS:
        raise MotifVideoError(f"unknown attention backend {name!r}; choose from {', '.join(ATTENTION_BACKENDS)}")
    cls = ATTENTION_BACKENDS[name]
    if not cls.available():
        raise MotifVideoError(f"attention backend {name!r} needs the {cls.package} package (pip install {cls.package})")
    return cls()


def set_attention_backend(module: nn.Module, backend: str | AttentionBackend) -> AttentionBackend:
    """Use `backend` (a registry name or a backend object) in every attention module inside `module`: a whole
    model, or one block. Returns the backend object, shared by those modules."""
    from .attention import AttentionModule

    if isinstance(backend, str):
        backend = attention_backend(backend)
    for sub in module.modules():
        if isinstance(sub, AttentionModule):
            sub.backend = backend
    return backend


def attention_backends(module: nn.Module) -> list[AttentionBackend]:
    """The distinct backends the attention modules inside `module` use, in module order."""
    from .attention import AttentionModule

    found: list[AttentionBackend] = []
    for sub in module.modules():
        if isinstance(sub, AttentionModule) and not any(sub.backend is b for b in found):
            found.append(sub.backend)
    return found
