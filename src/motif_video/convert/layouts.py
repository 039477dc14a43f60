"""Converting Shared Cross-Attention between its three key layouts.

- original (Motif's training layout): block-level `cross_attn_query_proj`, `cross_attn_query_norm` (LayerNorm),
  `cross_attn_out_proj`; K/V/norms are the block's own `attn.*` weights.
- tied (ours, the paper's form): the same parameters under `cross_attn.query_proj/query_norm/out_proj`.
- diffusers (the public checkpoints and GGUF files): `cross_attn.to_q/to_k/to_v/norm_q/norm_k/to_out.0`, untied
  copies and no LayerNorm on the query.

original <-> tied is a rename (exact both ways). tied -> diffusers copies K/V/norms and folds the query LayerNorm into
to_q: per-head RMSNorm is scale-invariant, so LN(y) = g * (y - mean y) / std(y) reduces to the linear map
diag(g) (I - 11^T/n) when the LN bias is zero. diffusers -> tied is possible only where that holds backwards: the
copies equal the block's own weights and the query projection's output is already mean-free.
"""

from __future__ import annotations

import re

import torch

from ..errors import CheckpointError

_ORIGINAL_TO_TIED = {
    "cross_attn_query_proj.": "cross_attn.query_proj.",
    "cross_attn_query_norm.": "cross_attn.query_norm.",
    "cross_attn_out_proj.": "cross_attn.out_proj.",
}
_CROSS_BLOCK = re.compile(r"^((?:single_)?transformer_blocks\.\d+\.)cross_attn\.")


def detect_layout(state_dict: dict) -> str:
    """'original', 'tied', 'diffusers' (also for models without cross-attention)."""
    keys = state_dict.keys()
    if any(".cross_attn_query_proj." in k for k in keys):
        return "original"
    if any(".cross_attn.query_proj." in k for k in keys):
        return "tied"
    return "diffusers"


def _rename(state_dict: dict, mapping: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        for old, new in mapping.items():
            if old in key:
                key = key.replace(old, new)
                break
        out[key] = value
    return out


def original_to_tied(state_dict: dict) -> dict:
    return _rename(state_dict, _ORIGINAL_TO_TIED)


def tied_to_original(state_dict: dict) -> dict:
    return _rename(state_dict, {v: k for k, v in _ORIGINAL_TO_TIED.items()})


def _cross_blocks(state_dict: dict, marker: str) -> list[str]:
    return sorted({m.group(1) for k in state_dict if marker in k and (m := _CROSS_BLOCK.match(k))})


def tied_cross_blocks(state_dict: dict) -> list[str]:
    """The block prefixes (`single_transformer_blocks.3.`) that hold a tied cross-attention."""
    return _cross_blocks(state_dict, ".cross_attn.query_proj.")


def query_fold(state_dict: dict, block: str, bias_tolerance: float = 1e-6) -> torch.Tensor:
    """diag(g) (I - 11^T / n) in float64: the map that takes a tied block's query projection to diffusers' to_q."""
    g = state_dict[f"{block}cross_attn.query_norm.weight"].double()
    beta = state_dict.get(f"{block}cross_attn.query_norm.bias", torch.zeros_like(g))  # bias-free: exact
    beta = beta.double()
    if beta.abs().max() > bias_tolerance:
        raise CheckpointError(
            f"{block}cross_attn.query_norm has a non-zero bias (max |b| = {beta.abs().max():.3g}); the query "
            f"LayerNorm cannot be folded into the diffusers layout exactly. Keep this model in the tied/original "
            f"layout")
    n = g.shape[0]
    return g[:, None] * (torch.eye(n, dtype=torch.float64) - 1.0 / n)


def tied_to_diffusers(state_dict: dict, bias_tolerance: float = 1e-6) -> dict:
    out = {k: v for k, v in state_dict.items() if ".cross_attn." not in k}
    for block in tied_cross_blocks(state_dict):
        fold = query_fold(state_dict, block, bias_tolerance)
        weight = state_dict[f"{block}cross_attn.query_proj.weight"]
        bias = state_dict[f"{block}cross_attn.query_proj.bias"]
        out[f"{block}cross_attn.to_q.weight"] = (fold @ weight.double()).to(weight.dtype)
        out[f"{block}cross_attn.to_q.bias"] = (fold @ bias.double()).to(bias.dtype)
        for name in ("to_k.weight", "to_k.bias", "to_v.weight", "to_v.bias", "norm_q.weight", "norm_k.weight"):
            out[f"{block}cross_attn.{name}"] = state_dict[f"{block}attn.{name}"].clone()
        out[f"{block}cross_attn.to_out.0.weight"] = state_dict[f"{block}cross_attn.out_proj.weight"]
        out[f"{block}cross_attn.to_out.0.bias"] = state_dict[f"{block}cross_attn.out_proj.bias"]
    return out


def diffusers_to_tied(state_dict: dict, tolerance: float = 1e-6) -> dict:
    out = {k: v for k, v in state_dict.items() if ".cross_attn." not in k}
    for block in _cross_blocks(state_dict, ".cross_attn.to_q."):
        for name in ("to_k.weight", "to_k.bias", "to_v.weight", "to_v.bias", "norm_q.weight", "norm_k.weight"):
            copy, own = state_dict[f"{block}cross_attn.{name}"], state_dict[f"{block}attn.{name}"]
            if copy.shape != own.shape or not torch.allclose(copy.float(), own.float(), atol=tolerance, rtol=0):
                raise CheckpointError(
                    f"{block}cross_attn.{name} differs from {block}attn.{name}: this diffusers checkpoint's "
                    f"cross-attention is untied and has no tied (original-layout) form")
        weight = state_dict[f"{block}cross_attn.to_q.weight"]
        bias = state_dict[f"{block}cross_attn.to_q.bias"]
        scale = weight.float().abs().max().clamp_min(1e-12)
        if weight.float().sum(0).abs().max() > tolerance * weight.shape[0] * scale or \
                bias.float().sum().abs() > tolerance * bias.shape[0] * scale:
            raise CheckpointError(
                f"{block}cross_attn.to_q produces a query that is not mean-free, which the original layout's "
                f"LayerNorm query cannot express; keep this model in the diffusers layout")
        out[f"{block}cross_attn.query_proj.weight"] = weight
        out[f"{block}cross_attn.query_proj.bias"] = bias
        out[f"{block}cross_attn.query_norm.weight"] = torch.ones_like(bias)
        out[f"{block}cross_attn.query_norm.bias"] = torch.zeros_like(bias)
        out[f"{block}cross_attn.out_proj.weight"] = state_dict[f"{block}cross_attn.to_out.0.weight"]
        out[f"{block}cross_attn.out_proj.bias"] = state_dict[f"{block}cross_attn.to_out.0.bias"]
    return out


def to_model_layout(state_dict: dict, form: str) -> dict:
    """Any layout -> the key layout of a model built with `cross_attention_form=form`."""
    layout = detect_layout(state_dict)
    if layout == "original":
        state_dict, layout = original_to_tied(state_dict), "tied"
    if form == "tied" and layout == "diffusers":
        return diffusers_to_tied(state_dict)
    if form == "untied" and layout == "tied":
        return tied_to_diffusers(state_dict)
    return state_dict


# Target layout name -> conversion from any layout; `convert --to` offers these names.
TARGET_LAYOUTS = {
    "diffusers": lambda state_dict: to_model_layout(state_dict, "untied"),
    "original": lambda state_dict: tied_to_original(to_model_layout(state_dict, "tied")),
}


def to_layout(state_dict: dict, target: str) -> dict:
    """Any layout -> one of TARGET_LAYOUTS."""
    if target not in TARGET_LAYOUTS:
        raise CheckpointError(f"unknown layout {target!r}; use one of: {', '.join(TARGET_LAYOUTS)}")
    return TARGET_LAYOUTS[target](state_dict)
