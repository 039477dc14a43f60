"""LoRA through peft on the attention projections, saved in the format diffusers loads.

Our parameter names equal diffusers' `MotifVideoTransformer3DModel`, so one adapter file serves both:
`pytorch_lora_weights.safetensors` with keys `transformer.<module>.lora_A.weight` / `.lora_B.weight` (the
`transformer.` prefix is what `load_lora_adapter(..., prefix="transformer")` filters on) and the LoraConfig in the
file's `lora_adapter_metadata` header, keys prefixed the same way. Without that header diffusers would assume
alpha = rank (scale 1), so the header is what carries a different alpha across.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from .config import LoraSection

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer"


def lora_config(section: LoraSection):
    from peft import LoraConfig

    return LoraConfig(r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=section.peft_targets(), init_lora_weights=True)


def add_lora(transformer: nn.Module, section: LoraSection, adapter_name: str = "default") -> nn.Module:
    """Inject LoRA layers; every base weight is frozen, only the adapters train."""
    from peft import inject_adapter_in_model

    transformer.requires_grad_(False)
    try:
        inject_adapter_in_model(lora_config(section), transformer, adapter_name=adapter_name)
    except ValueError as e:  # peft: target modules not found
        raise CheckpointError(f"lora.target_modules: {str(e).splitlines()[0]}") from None
    return transformer


def adapter_state_dict(transformer_state: dict[str, torch.Tensor], adapter_name: str = "default") -> dict:
    """peft layer names (`...to_q.lora_A.default.weight`) -> adapter file names (`...to_q.lora_A.weight`)."""
    out = {}
    for key, value in transformer_state.items():
        if ".lora_" not in key:
            continue
        out[key.replace(f".{adapter_name}.", ".")] = value
    return out


def save_lora_adapter(folder: str | Path, adapter: dict[str, torch.Tensor], section: LoraSection) -> Path:
    """Write `pytorch_lora_weights.safetensors` (adapter keys without the `transformer.` prefix given)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # the modules the adapter holds, as one regex of full names (what the loaders re-inject; a name list would let
    # `proj_out` match every block's proj_out as well)
    modules = sorted({k.split(".lora_")[0] for k in adapter})
    config = {"r": section.rank, "lora_alpha": section.alpha, "lora_dropout": section.dropout,
              "target_modules": "(" + "|".join(re.escape(m) for m in modules) + ")", "use_dora": False,
              "lora_bias": False}
    metadata = {"format": "pt",
                METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()}, sort_keys=True)}
    tensors = {f"{PREFIX}.{k}": v.detach().cpu().contiguous() for k, v in adapter.items()}
    path = folder / WEIGHT_NAME
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_lora_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(adapter tensors without the prefix, LoraConfig kwargs or None) from a file or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.is_file():
        raise CheckpointError(f"no LoRA adapter at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt LoRA adapter {path}: {str(e).splitlines()[0]}") from None
    prefix = f"{PREFIX}."
    tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    config = None
    if METADATA_KEY in header:
        raw = json.loads(header[METADATA_KEY])
        config = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in raw.items()}
    return tensors, config


def load_lora_adapter(transformer: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Inject and load an adapter written by `save_lora_adapter` (or by diffusers) into our transformer."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    tensors, config = read_lora_adapter(path)
    if not tensors:
        raise CheckpointError(f"LoRA adapter {path} holds no tensors")
    if config is None:  # the diffusers convention for adapters without a header: alpha = rank
        rank = next(v.shape[0] for k, v in tensors.items() if "lora_A" in k)
        config = {"r": rank, "lora_alpha": rank,
                  "target_modules": sorted({k.split(".lora_")[0] for k in tensors})}
    inject_adapter_in_model(LoraConfig(**config), transformer, adapter_name=adapter_name)
    result = set_peft_model_state_dict(transformer, tensors, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
    if unexpected:
        raise CheckpointError(f"LoRA adapter {path} does not fit this model: e.g. {unexpected[0]}")
    return transformer
