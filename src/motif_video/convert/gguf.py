"""GGUF transformer files: read them keeping the weights quantised, and write them.

GGUF files for Motif-Video carry diffusers key names (like Motif-Technologies/Motif-Video-2B-GGUF). A quantised
nn.Linear becomes a `GGUFLinear` that keeps the file's block bytes as its `weight` buffer and dequantises them in
every forward, so a loaded model occupies the file's size, not fp32 size, while the state_dict keys stay the same.

GGUF lists dimensions innermost first (ggml's ne[0] is the row length), the reverse of torch; `gguf.GGUFReader`
returns `shape` in that order and `data` already in torch order (bytes per row for block types).

Block layouts follow the `gguf` package's numpy reference (gguf/quants.py); the torch code below is ours, works on
(n_blocks, type_size) uint8 tensors on any device, and reproduces the reference's float32 arithmetic order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, QK_K, GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType

from ..errors import CheckpointError, MotifVideoError
from ..model_folder import default_dtype
from ..files import atomic_file
from .checkpoint import build_on_meta, check_state_dict, load_any_config
from .layouts import detect_layout

Q = GGMLQuantizationType
ARCHITECTURE = "motif_video"
CONFIG_KEY = "motif_video.config"  # the transformer config.json, so a file can load without a separate config
COMFY_SHAPE_KEY = "comfy.gguf.orig_shape."  # ComfyUI-GGUF flattens >4-D tensors and records the shape here


# -- dequantisers: (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 ---------------------------------
def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 fields (n, 2) -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _shifts(values, device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.uint8, device=device)


def _unpack(b: torch.Tensor, groups: int, shifts: list[int], mask: int) -> torch.Tensor:
    """Bit fields packed across bytes: (n, groups * k) bytes -> (n, groups, len(shifts), k) fields.

    ggml packs sub-blocks side by side, one field width per byte position: element i of field s of group g is
    (byte[g * k + i] >> shifts[s]) & mask.
    """
    n = b.shape[0]
    b = b.reshape(n, groups, 1, -1)  # (n, groups, 1, k)
    return (b >> _shifts(shifts, b.device).reshape(1, 1, -1, 1)) & mask


def _low_high_nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    return _unpack(qs, groups, [0, 4], 0x0F)


def _bits(qh: torch.Tensor, groups: int) -> torch.Tensor:
    return _unpack(qh, groups, list(range(8)), 0x01)


def _dq_f32(b):
    return b.contiguous().view(torch.float32)


def _dq_bf16(b):
    return b.contiguous().view(torch.bfloat16).float()


def _dq_q8_0(b):
    d = _f16(b[:, :2])
    return b[:, 2:].view(torch.int8).float() * d


def _dq_q4_0(b):
    n = b.shape[0]
    d = _f16(b[:, :2])
    q = _low_high_nibbles(b[:, 2:], 1).reshape(n, 32)  # elements 0..15 low nibbles, 16..31 high
    return (q.to(torch.int8) - 8).float() * d


def _dq_q4_1(b):
    n = b.shape[0]
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _low_high_nibbles(b[:, 4:], 1).reshape(n, 32).float()
    return d * q + m


def _q5_fields(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """5-bit values: 4 low bits as in Q4_0, the 5th bit j of element j from the little-endian uint32 `qh`."""
    n = qs.shape[0]
    low = _low_high_nibbles(qs, 1).reshape(n, 32)
    high = (qh.reshape(n, 4, 1) >> _shifts(range(8), qh.device)) & 0x01  # (n, byte, bit): element 8 * byte + bit
    high = high.reshape(n, 32)
    return low | (high << 4)


def _dq_q5_0(b):
    d = _f16(b[:, :2])
    q = _q5_fields(b[:, 2:6], b[:, 6:])
    return (q.to(torch.int8) - 16).float() * d


def _dq_q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _q5_fields(b[:, 4:8], b[:, 8:]).float()
    return d * q + m


def _dq_q2_k(b):
    # scales(16) | qs(64) | d | dmin: 16 sub-blocks of 16, 4-bit scale and 4-bit min each
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _unpack(qs, 2, [0, 2, 4, 6], 0x03).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q3_k(b):
    # hmask(32) | qs(64) | scales(12) | d: 16 sub-blocks of 16, 6-bit signed scales
    n = b.shape[0]
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _low_high_nibbles(scales[:, :8], 1).reshape(n, 16)
    high = _unpack(scales[:, 8:], 1, [0, 2, 4, 6], 0x03).reshape(n, 16)
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * sc).reshape(n, 16, 1)
    ql = _unpack(qs, 2, [0, 2, 4, 6], 0x03).reshape(n, 16, 16).to(torch.int8)
    qh = _bits(hmask, 1).reshape(n, 16, 16)
    # a set hmask bit means "no offset": q = ql - 4 * (1 - bit)
    q = (ql - ((qh ^ 1) << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 8 six-bit scales and mins packed in 12 bytes -> two (n, 8) uint8 tensors.

    bytes 0-3: scales 0-3 (low 6 bits), top 2 bits feed scales 4-7; bytes 4-7: mins 0-3 likewise;
    bytes 8-11: low nibble = low 4 bits of scales 4-7, high nibble = low 4 bits of mins 4-7.
    """
    s, m, sm = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([s & 0x3F, (sm & 0x0F) | ((s >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (sm >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _dq_q4_k(b):
    # d | dmin | scales(12) | qs(128): 8 sub-blocks of 32
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    ml = (dmin * mn.float()).reshape(n, 8, 1)
    q = _low_high_nibbles(b[:, 16:], 4).reshape(n, 8, 32).float()  # 32 bytes carry sub-blocks 2g (low), 2g+1 (high)
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q5_k(b):
    # d | dmin | scales(12) | qh(32) | qs(128)
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    dl = (d * sc.float()).reshape(n, 8, 1)
    ml = (dmin * mn.float()).reshape(n, 8, 1)
    low = _low_high_nibbles(b[:, 48:], 4).reshape(n, 8, 32)
    high = _bits(b[:, 16:48], 1).reshape(n, 8, 32)  # bit s of qh[i]: 5th bit of element i of sub-block s
    q = (low | (high << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q6_k(b):
    # ql(128) | qh(64) | scales(16, int8) | d: 16 sub-blocks of 16
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    dl = (d * scales.view(torch.int8).float()).reshape(n, 16, 1)
    low = _low_high_nibbles(ql, 2).reshape(n, 8, 32)  # two halves of 128 elements, 64 bytes each
    high = _unpack(qh, 2, [0, 2, 4, 6], 0x03).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


DEQUANTIZERS = {
    Q.F32: _dq_f32, Q.F16: _f16, Q.BF16: _dq_bf16,
    Q.Q8_0: _dq_q8_0, Q.Q4_0: _dq_q4_0, Q.Q4_1: _dq_q4_1, Q.Q5_0: _dq_q5_0, Q.Q5_1: _dq_q5_1,
    Q.Q2_K: _dq_q2_k, Q.Q3_K: _dq_q3_k, Q.Q4_K: _dq_q4_k, Q.Q5_K: _dq_q5_k, Q.Q6_K: _dq_q6_k,
}
SUPPORTED_TYPES = tuple(DEQUANTIZERS)
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def _type_name(qtype) -> str:
    return qtype.name if isinstance(qtype, Q) else str(qtype)


def check_supported(qtype, what: str = "tensor") -> Q:
    if qtype not in DEQUANTIZERS:
        raise MotifVideoError(
            f"{what} uses GGML type {_type_name(qtype)}, which motif-video cannot dequantise; supported: "
            f"{', '.join(t.name for t in SUPPORTED_TYPES)}")
    return Q(qtype)


def dequantize(raw: torch.Tensor, qtype: Q, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw GGUF bytes (..., row_bytes) uint8 -> (..., row_elements) in `dtype`, computed in float32."""
    qtype = check_supported(qtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if raw.dtype != torch.uint8 or raw.shape[-1] % type_size:
        raise MotifVideoError(f"{qtype.name} data must be uint8 with a multiple of {type_size} bytes per row, got "
                              f"{raw.dtype} {tuple(raw.shape)}")
    row = raw.shape[-1] // type_size * block_size
    blocks = raw.reshape(-1, type_size)  # (n_blocks, type_size)
    return DEQUANTIZERS[qtype](blocks).reshape(*raw.shape[:-1], row).to(dtype)


def byte_shape(shape: tuple[int, ...], qtype: Q) -> tuple[int, ...]:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block_size * type_size)


def nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    return int(np.prod(byte_shape(tuple(shape), qtype), dtype=np.int64))


# -- the quantised linear layer ----------------------------------------------------------------------------------
class GGUFLinear(nn.Module):
    """nn.Linear whose `weight` buffer holds GGUF block bytes (out_features, row_bytes), dequantised per forward.

    Keeping the bytes as a buffer (not a Parameter) keeps them out of optimisers and away from `.to(dtype)`, which
    would otherwise cast the uint8 blocks; the key stays `<name>.weight` so state_dicts line up with nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, qtype: Q, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qtype = check_supported(qtype)
        self.compute_dtype = compute_dtype
        self.register_buffer(
            "weight", torch.empty(byte_shape((out_features, in_features), self.qtype), dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device)) if bias else None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # nn.Linear's key order (weight, then bias), which a buffer-then-parameter module would otherwise reverse
        for name in ("weight", "bias"):
            tensor = getattr(self, name)
            if tensor is not None:
                destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize(self.weight, self.qtype, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight()
        bias = self.bias.to(w.dtype) if self.bias is not None else None
        return F.linear(x.to(w.dtype), w, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, type={self.qtype.name}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}")


# -- reading ------------------------------------------------------------------------------------------------------
@dataclass
class GGUFTensor:
    name: str
    qtype: Q
    shape: tuple[int, ...]  # torch order
    raw: torch.Tensor  # uint8, (*shape[:-1], row_bytes)

    @property
    def quantized(self) -> bool:
        return self.qtype not in FLOAT_TYPES

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, dtype).reshape(self.shape)


def _open_reader(path: Path) -> GGUFReader:
    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, OSError ... on damaged files
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"corrupt or truncated GGUF file {path}: {detail}") from None


def _field_value(reader: GGUFReader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_gguf(path: str | Path) -> tuple[dict[str, GGUFTensor], dict]:
    """All tensors of a GGUF file as raw bytes (copied out of the memory map) and its metadata key/values."""
    path = Path(path)
    reader = _open_reader(path)
    metadata = {key: _field_value(reader, key) for key in reader.fields if not key.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        qtype = check_supported(t.tensor_type, f"GGUF file {path}: tensor {t.name}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        orig = metadata.get(COMFY_SHAPE_KEY + t.name)
        if orig is not None:
            orig = tuple(int(d) for d in orig)
            if int(np.prod(orig)) != int(np.prod(shape)):
                raise CheckpointError(f"GGUF file {path}: {t.name} has {int(np.prod(shape))} values but its recorded "
                                      f"shape {orig} needs {int(np.prod(orig))}")
            if qtype not in FLOAT_TYPES and orig[-1] != shape[-1]:
                raise CheckpointError(f"GGUF file {path}: {t.name} is quantised with a flattened shape; cannot "
                                      f"restore {orig}")
            shape = orig
        data = np.ascontiguousarray(t.data).view(np.uint8)
        if data.size != nbytes(shape, qtype):
            raise CheckpointError(f"corrupt GGUF file {path}: tensor {t.name} holds {data.size} bytes, "
                                  f"{qtype.name} {shape} needs {nbytes(shape, qtype)}")
        raw = torch.from_numpy(data.copy()).reshape(byte_shape(shape, qtype))
        tensors[t.name] = GGUFTensor(t.name, qtype, shape, raw)
    del reader  # releases the memory map
    return tensors, metadata


# -- loading into the model ---------------------------------------------------------------------------------------
def _config_from_metadata(metadata: dict, path: Path):
    text = metadata.get(CONFIG_KEY)
    if text is None:
        raise CheckpointError(
            f"GGUF file {path} carries no transformer config ({CONFIG_KEY}); pass config= a folder with "
            f"config.json, a hub id, a preset name or a dict")
    try:
        return load_any_config(json.loads(text))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"GGUF file {path}: {CONFIG_KEY} is not valid JSON: {e}") from None


def load_gguf_transformer(cls, path, config=None, *, compute_dtype: torch.dtype | None = None, device="cpu"):
    """A model from a GGUF file; quantised (and 16-bit, if compute differs) Linear weights stay in their bytes.

    `config`: folder, hub id, dict, preset name or TransformerConfig; None reads the config stored in the file.
    Other tensors (norms, biases, the patch conv, F32 weights) are dequantised into `compute_dtype`.
    """
    path = Path(path)
    compute_dtype = compute_dtype or default_dtype(device)
    tensors, metadata = read_gguf(path)
    cfg = load_any_config(config) if config is not None else _config_from_metadata(metadata, path)
    # GGUF files carry diffusers key names, or the tied form's where the query LayerNorm cannot fold into diffusers'
    form = "tied" if detect_layout(tensors) == "tied" else "untied"
    if cfg.cross_attention_form != form:
        cfg = cfg.replace(cross_attention_form=form)
    model = build_on_meta(cls, cfg)
    check_state_dict(model, tensors, f"GGUF file {path}")

    state_dict = {}
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, module in linears.items():
        t = tensors[f"{name}.weight"]
        if FLOAT_TYPES.get(t.qtype) in (torch.float32, compute_dtype):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device("meta"):
            q = GGUFLinear(module.in_features, module.out_features, t.qtype, module.bias is not None, compute_dtype)
        setattr(parent, child, q)
        state_dict[f"{name}.weight"] = t.raw
    for key, t in tensors.items():
        if key not in state_dict:
            state_dict[key] = t.dequantize(compute_dtype)
    model.load_state_dict(state_dict, assign=True)
    return model.to(device)


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (what a loaded model costs in memory)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


# -- writing ------------------------------------------------------------------------------------------------------
# `quantize --type` names: the Linear weights' type (F32 only keeps everything as it is).
WRITE_TYPES = {"q8_0": Q.Q8_0, "q5_1": Q.Q5_1, "q5_0": Q.Q5_0, "q4_1": Q.Q4_1, "q4_0": Q.Q4_0,
               "bf16": Q.BF16, "f16": Q.F16, "f32": Q.F32}
# `quantize --keep-dtype` names: the type of the tensors kept out of quantisation.
KEEP_TYPES = {"f32": Q.F32, "f16": Q.F16}
_FILE_TYPES = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
               Q.Q8_0: LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1,
               Q.Q5_0: LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: LlamaFileType.MOSTLY_Q5_1}
# AdaLN modulation (norm1, norm1_context, single-block norm, norm_out): its outputs scale, shift and gate every
# block, so errors there reach every token.
MODULATION = re.compile(r"(^|\.)norm[^.]*\.linear\.weight$")
# Embedders and the output head that stay in high precision: the patch conv (5-D, rows of 2), the timestep MLP that
# drives all modulation, and the final projection (a few hundred thousand values that write the velocity directly).
KEEP_PREFIXES = ("x_embedder.", "time_text_embed.", "proj_out.")


def plan_types(shapes: dict[str, tuple[int, ...]], qtype: Q, *, keep_dtype: Q | None = None,
               quantize_modulation: bool = False) -> dict[str, Q]:
    """The GGML type of each tensor when writing `qtype`.

    Only 2-D Linear weights whose rows split into whole blocks take `qtype`; norms, biases, modulation (unless
    `quantize_modulation`), the embedders in KEEP_PREFIXES and odd-sized rows take `keep_dtype` (F32 for block
    types, F16 for f16/bf16).
    """
    if keep_dtype is None:
        keep_dtype = Q.F16 if qtype in (Q.F16, Q.BF16) else Q.F32
    block_size = GGML_QUANT_SIZES[qtype][0]
    plan = {}
    for name, shape in shapes.items():
        quantizable = (
            name.endswith(".weight") and len(shape) == 2 and shape[-1] % block_size == 0
            and not name.startswith(KEEP_PREFIXES)
            and (quantize_modulation or not MODULATION.search(name))
        )
        plan[name] = qtype if quantizable else keep_dtype
    return plan


def planned_nbytes(shapes: dict[str, tuple[int, ...]], plan: dict[str, Q]) -> int:
    return sum(nbytes(tuple(shapes[k]), plan[k]) for k in shapes)


def _encode(tensor: torch.Tensor, qtype: Q) -> np.ndarray:
    from gguf.quants import quantize

    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return data
    return quantize(data, qtype)


def write_gguf(state_dict: dict[str, torch.Tensor], path: str | Path, qtype: Q, *, config_json: dict | None = None,
               keep_dtype: Q | None = None, quantize_modulation: bool = False, progress: bool = True) -> Path:
    """Write a diffusers-layout state_dict as GGUF, quantising one tensor at a time (never the whole model at once).

    The file appears under its final name only when complete.
    """
    from tqdm import tqdm

    path = Path(path)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    plan = plan_types(shapes, qtype, keep_dtype=keep_dtype, quantize_modulation=quantize_modulation)
    writer = GGUFWriter(None, ARCHITECTURE)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_file_type(int(_FILE_TYPES.get(qtype, LlamaFileType.GUESSED)))
    if config_json is not None:
        writer.add_string(CONFIG_KEY, json.dumps(config_json))
    for name, shape in shapes.items():
        # dtype float32 tells the writer `shape` is in elements (for uint8 it would read bytes)
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, plan[name]), raw_dtype=plan[name])

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        try:
            writer.open_output_file(tmp)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name in tqdm(shapes, desc=f"quantising to {qtype.name}", unit="tensor", disable=not progress):
                writer.write_tensor_data(_encode(state_dict[name], plan[name]))
        finally:
            writer.close()
    return path
