"""LoRA adapter files in the key styles in circulation, read into one form and written back out.

One adapter is a dict {module name: LoraFactors}, module names as in our transformer (diffusers' parameter names,
or the tied cross-attention's `cross_attn.query_proj/out_proj`). Styles read:

- ours and diffusers/PEFT: `transformer.<module>.lora_A.weight` / `.lora_B.weight`, alpha in the
  `lora_adapter_metadata` header (`lora_alpha`, `alpha_pattern`); PEFT's own `base_model.model.` prefix and
  `.lora_A.<adapter>.weight` names too. Without alpha anywhere, alpha = rank (diffusers' convention).
- ComfyUI / kohya: `diffusion_model.<module>.lora_down.weight` / `.lora_up.weight` + `.alpha`, and the flattened
  `lora_unet_<module_with_underscores>` names, whose underscores are resolved against the architecture's module
  names.
- the original Motif layout's module names (`cross_attn_query_proj`, ...), renamed with `convert.layouts`.

The update a module receives is `scale * B A` with scale = alpha / rank (A: (rank, in), B: (out, rank)).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..convert.layouts import (detect_layout, original_to_tied, query_fold, tied_cross_blocks, tied_to_original,
                               to_model_layout)
from ..errors import CheckpointError
from ..train.lora import METADATA_KEY, PREFIX, WEIGHT_NAME

COMFY_PREFIX = "diffusion_model"
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_KEY_PREFIXES = ("base_model.model.", f"{PREFIX}.", f"model.{COMFY_PREFIX}.", f"{COMFY_PREFIX}.")
# (suffix pattern, role); PEFT writes the adapter name between the factor and `.weight`
_SUFFIXES = [
    (re.compile(r"\.lora_A(?:\.[^.]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"\.lora_down\.weight$"), "down"),
    (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
]


@dataclass
class LoraFactors:
    """One module's low-rank update: scale * up @ down, scale = alpha / rank."""

    down: torch.Tensor  # A: (rank, in_features)
    up: torch.Tensor  # B: (out_features, rank)
    alpha: float
    key: str  # the file's key for `down`, named in errors

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


LoraAdapter = dict[str, LoraFactors]


# -- finding and reading the file -------------------------------------------------------------------------------
def adapter_file(path: str | Path) -> Path:
    """The safetensors file of PATH: a file, a folder holding `pytorch_lora_weights.safetensors` (what training
    writes in `lora/`), a training checkpoint folder holding `lora/`, or a folder with a single .safetensors file."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / WEIGHT_NAME, path / "lora" / WEIGHT_NAME):
            if candidate.is_file():
                return candidate
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        if files:
            raise CheckpointError(f"{path} holds {len(files)} .safetensors files; name the LoRA file itself")
    raise CheckpointError(f"no LoRA adapter at {path}")


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors header) of an adapter file or folder."""
    file = adapter_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt LoRA adapter {file}: {str(e).splitlines()[0]}") from None
    if not tensors:
        raise CheckpointError(f"LoRA adapter {file} holds no tensors")
    return tensors, header


# -- module names ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _name_parts() -> tuple[str, ...]:
    """Every non-numeric component of the architecture's module names (all options on, both cross-attention
    forms, and the original layout's names), longest first: the vocabulary for undoing kohya's underscores."""
    from ..model.config import preset
    from ..model.transformer import MotifVideoTransformer

    names = set()
    for form in ("tied", "untied"):
        cfg = preset("motif-video-tiny", enable_text_cross_attention_dual=True, cross_attention_form=form)
        with torch.device("meta"):
            model = MotifVideoTransformer(cfg)
        state = {f"{n}.weight": None for n, _ in model.named_modules() if n}
        names.update(state)
        names.update(tied_to_original(state))
    parts = {p for n in names for p in n.removesuffix(".weight").split(".") if not p.isdigit()}
    return tuple(sorted(parts, key=len, reverse=True))


def _dotted(flat: str) -> str | None:
    """`transformer_blocks_0_attn_to_out_0` -> `transformer_blocks.0.attn.to_out.0` (None if it does not parse)."""
    if not flat:
        return ""
    digits = re.match(r"\d+", flat)
    heads = [digits.group()] if digits else [p for p in _name_parts() if flat.startswith(p)]
    for head in heads:
        rest = flat[len(head):]
        if rest and not rest.startswith("_"):
            continue
        tail = _dotted(rest[1:]) if rest else ""
        if tail is not None:
            return f"{head}.{tail}" if tail else head
    return None


def _module_and_role(key: str) -> tuple[str, str]:
    for pattern, role in _SUFFIXES:
        match = pattern.search(key)
        if match:
            module = key[:match.start()]
            break
    else:
        raise CheckpointError(f"LoRA key {key} is not a LoRA factor (lora_A/lora_B, lora_down/lora_up or alpha)")
    for prefix in KOHYA_PREFIXES:
        if module.startswith(prefix):
            dotted = _dotted(module[len(prefix):])
            if dotted is None:
                raise CheckpointError(f"LoRA key {key} names no module of the Motif-Video transformer")
            return dotted, role
    for prefix in _KEY_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    return module, role


def _pattern_value(patterns: dict, module: str):
    """A PEFT rank/alpha pattern's value for `module` (PEFT's rule: the pattern matches a dotted suffix)."""
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error as e:
            raise CheckpointError(f"LoRA header: alpha_pattern {pattern!r} is not a valid pattern ({e})") from None
    return None


def parse_adapter(tensors: dict[str, torch.Tensor], header: dict[str, str] | None = None) -> LoraAdapter:
    """Tensors of any supported style -> {module name: LoraFactors}; a key that fits no style is an error."""
    config = {}
    if header and METADATA_KEY in header:
        try:
            raw = json.loads(header[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"LoRA header {METADATA_KEY} is not valid JSON: {e}") from None
        config = {k.removeprefix(f"{PREFIX}."): v for k, v in raw.items()}
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        module, role = _module_and_role(key)
        parts.setdefault(module, {})[role] = (key, value)

    adapter: LoraAdapter = {}
    for module, roles in parts.items():
        if "down" not in roles or "up" not in roles:
            missing = "lora_A/lora_down" if "down" not in roles else "lora_B/lora_up"
            raise CheckpointError(f"LoRA key {next(iter(roles.values()))[0]} has no matching {missing}")
        (down_key, down), (up_key, up) = roles["down"], roles["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise CheckpointError(f"LoRA key {down_key}: factors of shapes {tuple(down.shape)} and "
                                  f"{tuple(up.shape)} do not form a rank-r update")
        if "alpha" in roles:
            alpha = float(roles["alpha"][1].float().reshape(-1)[0])
        else:
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module)
            alpha = float(alpha if alpha is not None else config.get("lora_alpha", down.shape[0]))
        adapter[module] = LoraFactors(down, up, alpha, down_key)
    # The original layout's block-level cross-attention names -> the tied module names (one mapping, in layouts).
    renamed = original_to_tied({f"{m}.weight": f for m, f in adapter.items()})
    return {k.removesuffix(".weight"): f for k, f in renamed.items()}


def read_adapter(path_or_tensors) -> LoraAdapter:
    """An adapter from a file/folder path or from an in-memory {key: tensor} dict."""
    if isinstance(path_or_tensors, dict):
        if not path_or_tensors:
            raise CheckpointError("the LoRA state dict is empty")
        return parse_adapter(path_or_tensors)
    return parse_adapter(*read_adapter_file(path_or_tensors))


# -- cross-attention forms -------------------------------------------------------------------------------------
TIED_ONLY = (".cross_attn.query_proj", ".cross_attn.out_proj")


def tied_adapter_to_diffusers(adapter: LoraAdapter, base_state_dict: dict) -> LoraAdapter:
    """An adapter trained on a tied-form model -> the same update on that model's diffusers (untied) layout.

    The tied cross-attention reads K/V through the block's own attn.to_k/to_v, which the diffusers layout copies
    into cross_attn.to_k/to_v: those copies get the same factors. out_proj is to_out.0. The query update passes
    through the LayerNorm fold like the weight itself: to_q = F (W + s B A) = F W + s (F B) A.
    """
    if detect_layout(base_state_dict) == "diffusers":
        return adapter
    base = to_model_layout(base_state_dict, "tied")
    blocks = tied_cross_blocks(base)
    out: LoraAdapter = {}
    for name, f in adapter.items():
        block = next((b for b in blocks if name.startswith(b)), None)
        rest = name[len(block):] if block else None
        if rest == "cross_attn.query_proj":
            up = (query_fold(base, block) @ f.up.double()).to(f.up.dtype)
            out[f"{block}cross_attn.to_q"] = LoraFactors(f.down, up, f.alpha, f.key)
        elif rest == "cross_attn.out_proj":
            out[f"{block}cross_attn.to_out.0"] = f
        else:
            out[name] = f
            if rest in ("attn.to_k", "attn.to_v"):
                out[f"{block}cross_attn.{rest[len('attn.'):]}"] = f
    return out


def check_untied(adapter: LoraAdapter) -> None:
    for name, f in adapter.items():
        if name.endswith(TIED_ONLY):
            raise CheckpointError(
                f"LoRA key {f.key} targets the tied cross-attention ({name}), which the diffusers layout does not "
                f"have; pass the model it was trained on (--model) so the update can be carried over exactly")


# -- writing -----------------------------------------------------------------------------------------------------
def _write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # clone: a factor may serve two layers (tied K/V carried over to both copies), and safetensors refuses shared memory
    save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def diffusers_tensors(adapter: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers' `load_lora_adapter` format: `transformer.` keys, lora_A/lora_B, the LoraConfig in the header.

    alpha / rank is folded into lora_B (alpha = rank everywhere), because diffusers reads the header only when given
    `weight_name`; without it, it assumes alpha = rank, which this file then satisfies. Ranks other than the most
    common one go in rank_pattern, with diffusers' own `^<module>` keys."""
    if not adapter:
        raise CheckpointError("the LoRA adapter is empty")
    ranks = [f.rank for f in adapter.values()]
    common = max(set(ranks), key=ranks.count)
    others = {f"^{m}": f.rank for m, f in adapter.items() if f.rank != common}
    # target_modules as one regex of the full names: a list entry `proj_out` would also match every block's proj_out
    targets = "(" + "|".join(re.escape(m) for m in sorted(adapter)) + ")"
    config = {"r": common, "lora_alpha": common, "target_modules": targets, "lora_dropout": 0.0, "use_dora": False,
              "lora_bias": False, "rank_pattern": others, "alpha_pattern": others}
    tensors = {}
    for module, f in adapter.items():
        tensors[f"{PREFIX}.{module}.lora_A.weight"] = f.down
        tensors[f"{PREFIX}.{module}.lora_B.weight"] = (f.up.float() * f.scale).to(f.up.dtype)
    header = {"format": "pt", METADATA_KEY: json.dumps({f"{PREFIX}.{k}": v for k, v in config.items()},
                                                       sort_keys=True)}
    return tensors, header


def comfyui_tensors(adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """ComfyUI's format: `diffusion_model.<module>.lora_down/lora_up.weight` and a scalar `.alpha` per module."""
    if not adapter:
        raise CheckpointError("the LoRA adapter is empty")
    tensors = {}
    for module, f in adapter.items():
        tensors[f"{COMFY_PREFIX}.{module}.lora_down.weight"] = f.down
        tensors[f"{COMFY_PREFIX}.{module}.lora_up.weight"] = f.up
        tensors[f"{COMFY_PREFIX}.{module}.alpha"] = torch.tensor(f.alpha, dtype=torch.float32)
    return tensors


def write_adapter(adapter: LoraAdapter, out: str | Path, style: str) -> Path:
    """Write `style` ('diffusers' or 'comfyui') to OUT: a .safetensors file, or for diffusers a folder that gets
    `pytorch_lora_weights.safetensors`. Atomic: the file appears only when complete."""
    out = Path(out)
    if style == "diffusers":
        path = out if out.suffix == ".safetensors" else out / WEIGHT_NAME
        tensors, header = diffusers_tensors(adapter)
        return _write(tensors, path, header)
    if style == "comfyui":
        if out.suffix != ".safetensors":
            raise CheckpointError(f"a ComfyUI LoRA is one .safetensors file; got {out}")
        return _write(comfyui_tensors(adapter), out, {"format": "pt"})
    raise CheckpointError(f"unknown LoRA format {style!r}; use 'diffusers' or 'comfyui'")
