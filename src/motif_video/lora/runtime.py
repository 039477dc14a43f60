"""LoRA at inference, applied from outside the model: each targeted linear layer is replaced by a `LoraLinear`
that holds the original layer and adds the low-rank updates, y = base(x) + sum_i s_i (x A_i^T) B_i^T.

The base layer is untouched (an nn.Linear or a quantised `GGUFLinear`), so a GGUF model never dequantises more
than the one weight its own forward already does, and removing the wrapper gives back the original module object.
Several adapters live side by side; `set_adapters` chooses the active ones and their weights. The effective scale
of each adapter is a tensor buffer, so changing weights does not retrace a compiled block.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..convert.gguf import GGUFLinear
from ..errors import CheckpointError, MotifVideoError
from .formats import TIED_ONLY, LoraAdapter, LoraFactors

_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# The same layer under the two cross-attention forms' names (the untied form's to_q/to_k/to_v have no tied
# counterpart: there K/V are the self-attention's own layers and the query goes through a LayerNorm).
_ALIASES = {".cross_attn.to_out.0": ".cross_attn.out_proj", ".cross_attn.out_proj": ".cross_attn.to_out.0"}


class LowRankUpdate(nn.Module):
    """One adapter's factors at one layer. Buffers (not parameters): they follow `.to()` and offloading but stay out
    of optimisers and of the model's state_dict."""

    def __init__(self, factors: LoraFactors, device, dtype):
        super().__init__()
        self.register_buffer("down", factors.down.to(device, dtype), persistent=False)  # (rank, in)
        self.register_buffer("up", factors.up.to(device, dtype), persistent=False)  # (out, rank)
        self.alpha = factors.alpha
        # float32 even for 16-bit factors: a weight like 0.8 would otherwise round to bf16's 0.80078
        self.register_buffer("scale", torch.tensor(factors.scale, device=device), persistent=False)
        self.active = True
        self.fused_scale: float | None = None  # the scale merged into the base weight, subtracted again on unfuse

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def set_weight(self, weight: float) -> None:
        self.scale.fill_(weight * self.alpha / self.rank)

    def delta(self, scale: float) -> torch.Tensor:
        """scale * B A in float32 (out, in)."""
        return scale * (self.up.float() @ self.down.float())


def _drop_base_prefix(module, state_dict, prefix, local_metadata):
    # keeps the model's state_dict keys those of the plain model (`to_q.weight`, not `to_q.base.weight`)
    inner = prefix + "base."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_base_prefix(module, state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
        state_dict[prefix + "base." + key[len(prefix):]] = state_dict.pop(key)


class LoraLinear(nn.Module):
    """A linear layer (nn.Linear or GGUFLinear) plus the low-rank updates of the loaded adapters."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.enabled = True
        self.register_state_dict_post_hook(_drop_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        for update in self.adapters.values():
            if update.active and update.fused_scale is None:
                low = F.linear(x.to(update.down.dtype), update.down) * update.scale  # (..., rank)
                y = y + F.linear(low, update.up).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return ", ".join(f"{name}: rank {u.rank}" for name, u in self.adapters.items())


# -- binding an adapter to a model -----------------------------------------------------------------------------
def _factor_dtype(layer: nn.Module) -> torch.dtype:
    base = layer.base if isinstance(layer, LoraLinear) else layer
    return base.compute_dtype if isinstance(base, GGUFLinear) else base.weight.dtype


def bind(model: nn.Module, adapter: LoraAdapter) -> dict[str, LoraFactors]:
    """{model module name: factors}, after checking every module exists, is linear and fits; the first key that
    does not is a one-line error (nothing is changed on the model then)."""
    if not adapter:
        raise CheckpointError("the LoRA adapter holds no LoRA factors")
    modules = dict(model.named_modules())
    bound = {}
    for name, factors in adapter.items():
        target = name
        if target not in modules:
            for old, new in _ALIASES.items():
                if target.endswith(old) and target[:-len(old)] + new in modules:
                    target = target[:-len(old)] + new
                    break
        layer = modules.get(target)
        if layer is None:
            hint = ("; it was trained on a tied-layout model: carry it over with `motif-video convert-lora IN OUT "
                    "--to diffusers --model THAT_MODEL`") if name.endswith(TIED_ONLY) else ""
            raise CheckpointError(f"LoRA key {factors.key} matches no layer of this model (no module {name}){hint}")
        if not isinstance(layer, (nn.Linear, GGUFLinear, LoraLinear)):
            raise CheckpointError(f"LoRA key {factors.key}: {name} is a {type(layer).__name__}, not a linear layer")
        if factors.down.shape[1] != layer.in_features or factors.up.shape[0] != layer.out_features:
            raise CheckpointError(
                f"LoRA key {factors.key}: rank-{factors.rank} factors {tuple(factors.down.shape)} and "
                f"{tuple(factors.up.shape)} do not fit {name} ({layer.in_features} -> {layer.out_features})")
        bound[target] = factors
    return bound


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """Loaded adapters, in load order."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def active_adapters(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(n for n, u in layer.adapters.items() if u.active))
    return list(names)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_adapter(model: nn.Module, adapter: LoraAdapter, adapter_name: str) -> list[str]:
    """Attach `adapter` under `adapter_name` (active, weight 1); returns the module names it reaches."""
    if not _ADAPTER_NAME.match(adapter_name or ""):
        raise MotifVideoError(f"adapter name {adapter_name!r} must be letters, digits, '_' or '-'")
    if adapter_name in adapter_names(model):
        raise MotifVideoError(f"an adapter named {adapter_name!r} is already loaded; pick another name or "
                              f"unload it first")
    bound = bind(model, adapter)
    for name, factors in bound.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer)
            _replace(model, name, layer)
        device = layer.base.weight.device
        layer.adapters[adapter_name] = LowRankUpdate(factors, device, _factor_dtype(layer))
    return list(bound)


def _check_names(model: nn.Module, names: list[str]) -> None:
    loaded = adapter_names(model)
    for name in names:
        if name not in loaded:
            raise MotifVideoError(f"no adapter named {name!r} is loaded (loaded: {', '.join(loaded) or 'none'})")


def set_adapters(model: nn.Module, names: str | list[str], weights: float | list[float] | None = None) -> None:
    """Make exactly `names` active, with `weights` (one per name, a single number for all, or None for 1.0)."""
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    if weights is None or isinstance(weights, (int, float)):
        weights = [1.0 if weights is None else float(weights)] * len(names)
    weights = list(weights)
    if len(weights) != len(names) or not all(isinstance(w, (int, float)) for w in weights):
        raise MotifVideoError(f"set_adapters needs one number per adapter: {len(names)} names, weights {weights}")
    chosen = dict(zip(names, weights))
    for layer in lora_layers(model).values():
        for name, update in layer.adapters.items():
            update.active = name in chosen
            if update.active:
                update.set_weight(chosen[name])


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter off (the base model's output: merged ones are unfused first, as PEFT does) or on."""
    if not enabled:
        unfuse(model)
    for layer in lora_layers(model).values():
        layer.enabled = enabled


def fuse(model: nn.Module, lora_scale: float = 1.0, names: list[str] | None = None) -> None:
    """Merge the active adapters (or `names`) into the base weights, W += lora_scale * s * B A, so generation runs
    at the base model's speed. Quantised layers cannot take a merged weight without re-quantising."""
    names = active_adapters(model) if names is None else list(names)
    _check_names(model, names)
    layers = lora_layers(model)
    for name, layer in layers.items():
        if isinstance(layer.base, GGUFLinear) and any(n in layer.adapters for n in names):
            raise MotifVideoError(f"cannot fuse a LoRA into the quantised layer {name}; on a GGUF model the adapter "
                                  f"is applied on the fly, which costs no extra memory")
    with torch.no_grad():
        for layer in layers.values():
            for name in names:
                update = layer.adapters[name] if name in layer.adapters else None
                if update is None or update.fused_scale is not None:
                    continue
                scale = lora_scale * float(update.scale)
                weight = layer.base.weight
                weight.copy_((weight.float() + update.delta(scale)).to(weight.dtype))
                update.fused_scale = scale


@torch.no_grad()
def _unmerge(layer: LoraLinear, update: LowRankUpdate) -> None:
    if update.fused_scale is not None:
        weight = layer.base.weight
        weight.copy_((weight.float() - update.delta(update.fused_scale)).to(weight.dtype))
        update.fused_scale = None


def unfuse(model: nn.Module) -> None:
    """Subtract every merged update again (the base weights come back up to float rounding)."""
    for layer in lora_layers(model).values():
        for update in layer.adapters.values():
            _unmerge(layer, update)


def fused_adapters(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(n for n, u in layer.adapters.items() if u.fused_scale is not None))
    return list(names)


def delete_adapters(model: nn.Module, names: str | list[str]) -> None:
    """Remove adapters (unfusing them first); a layer left without adapters gets its original module back."""
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    for layer_name, layer in lora_layers(model).items():
        for name in names:
            if name in layer.adapters:
                _unmerge(layer, layer.adapters[name])
                del layer.adapters[name]
        if not layer.adapters:
            _replace(model, layer_name, layer.base)


def unload(model: nn.Module) -> None:
    """Remove every adapter; unfused layers get back their original module objects, bit for bit."""
    names = adapter_names(model)
    if names:
        delete_adapters(model, names)
