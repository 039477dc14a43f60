"""The transformer's typed config and its named presets.

Field names and defaults are exactly those of diffusers' `MotifVideoTransformer3DModel.__init__`, so a released
`transformer/config.json` builds the same network here. One field is ours (`cross_attention_form`). Presets give
the release values, which differ from the class defaults (e.g. rope_theta 10000, not 256).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, MotifVideoWarning

# Keys diffusers writes into config.json that are bookkeeping, not architecture.
_BOOKKEEPING_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}
DIFFUSERS_CLASS_NAME = "MotifVideoTransformer3DModel"


@dataclass
class TransformerConfig:
    in_channels: int = 33  # 16 noisy latent + 16 first-frame condition latent + 1 mask
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20  # dual-stream (MMDiT) blocks
    num_single_layers: int = 40  # single-stream blocks, the last `num_decoder_layers` of them form the decoder
    num_decoder_layers: int = 0
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    norm_type: str = "layer_norm"
    text_embed_dim: int = 4096
    image_embed_dim: int | None = None  # set: the model accepts I2V image tokens
    rope_theta: float = 256.0  # diffusers' class default; the release uses 10000
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)
    enable_text_cross_attention_dual: bool = False
    enable_text_cross_attention_single: bool = False
    # Ours: "untied" is the diffusers layout (cross-attention owns copies of Q/K/V/norms); "tied" is the paper's
    # Shared Cross-Attention whose K/V/norms ARE the block's self-attention weights, with a LayerNorm on the query.
    cross_attention_form: str = "untied"
    # Ours, tied form only: whether the query LayerNorm has a bias. Without one the tied model converts to the
    # diffusers layout exactly; the released checkpoint and models trained before this option have one.
    cross_attention_query_bias: bool = True

    def __post_init__(self):
        self._check_types()
        self.rope_axes_dim = tuple(int(d) for d in self.rope_axes_dim)
        self.validate()

    def _check_types(self) -> None:
        # A config.json with `"num_attention_heads": "four"` must fail here, naming the key, not deep in a layer.
        def whole(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = {"int": (whole, "a whole number"), "float": (number, "a finite number"),
                    "str": (lambda v: isinstance(v, str), "a string"),
                    "bool": (lambda v: isinstance(v, bool), "true or false"),
                    "int | None": (lambda v: v is None or whole(v), "a whole number or null"),
                    "tuple[int, int, int]": (lambda v: isinstance(v, (list, tuple)) and all(whole(d) for d in v),
                                             "a list of whole numbers")}.get(str(f.type))
            if want is not None and not want[0](value):
                raise ConfigError(f"invalid transformer config: {f.name} = {json.dumps(value, default=str)} "
                                  f"must be {want[1]}")

    # -- derived sizes -------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_encoder_single_layers(self) -> int:
        return self.num_single_layers - self.num_decoder_layers

    @property
    def patch(self) -> tuple[int, int, int]:
        """Latents per token along (T, H, W)."""
        return self.patch_size_t, self.patch_size, self.patch_size

    @property
    def num_blocks(self) -> int:
        """Blocks in forward order (dual -> single encoder -> decoder); TREAD routes index this range."""
        return self.num_layers + self.num_single_layers

    # -- checks --------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        problems = []
        if self.qk_norm != "rms_norm":
            problems.append(f"qk_norm={self.qk_norm!r} (only 'rms_norm' is supported)")
        if self.norm_type != "layer_norm":
            problems.append(f"norm_type={self.norm_type!r} (only 'layer_norm' is supported)")
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.attention_head_dim:
            problems.append(
                f"rope_axes_dim={list(self.rope_axes_dim)} must be 3 even sizes summing to "
                f"attention_head_dim={self.attention_head_dim}"
            )
        elif any(d % 2 for d in self.rope_axes_dim):
            problems.append(f"rope_axes_dim={list(self.rope_axes_dim)} must all be even")
        if not 0 <= self.num_decoder_layers <= self.num_single_layers:
            problems.append(f"num_decoder_layers={self.num_decoder_layers} must be in [0, num_single_layers]")
        for name in ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "patch_size",
                     "patch_size_t", "text_embed_dim"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be positive")
        if self.num_layers < 0 or self.num_single_layers < 0:
            problems.append("num_layers and num_single_layers must be >= 0")
        if self.cross_attention_form not in ("untied", "tied"):
            problems.append(f"cross_attention_form={self.cross_attention_form!r} (use 'untied' or 'tied')")
        if problems:
            raise ConfigError("invalid transformer config: " + "; ".join(problems))

    # -- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_axes_dim"] = list(self.rope_axes_dim)
        return d

    def to_diffusers_json(self) -> dict:
        """config.json content; diffusers ignores `cross_attention_form` (only untied checkpoints load there)."""
        d = {"_class_name": DIFFUSERS_CLASS_NAME, **self.to_dict()}
        if self.cross_attention_form == "untied":
            d.pop("cross_attention_form")
            d.pop("cross_attention_query_bias")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in known and k not in _BOOKKEEPING_KEYS)
        if unknown:
            # diffusers ignores such keys with a warning; so do we, since the architecture is fully described.
            warnings.warn(f"ignoring unknown transformer config keys: {', '.join(unknown)}", MotifVideoWarning,
                          stacklevel=2)
        kwargs = {k: v for k, v in d.items() if k in known}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"invalid transformer config: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "TransformerConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"missing transformer config: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"transformer config {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"transformer config {path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


# -- presets ----------------------------------------------------------------------------------------------------
# The release: 1536 wide, 12 dual + 16 single encoder + 8 decoder blocks, T5Gemma2 text (2560), SigLIP image tokens
# (1152), theta 10000, Shared Cross-Attention in the single encoder blocks. 2,037,809,600 parameters.
PRESETS: dict[str, dict] = {
    "motif-video-2b": dict(
        in_channels=33, out_channels=16, num_attention_heads=12, attention_head_dim=128, num_layers=12,
        num_single_layers=24, num_decoder_layers=8, text_embed_dim=2560, image_embed_dim=1152, rope_theta=10000.0,
        rope_axes_dim=(16, 56, 56), enable_text_cross_attention_single=True,
    ),
    # Same three-part shape at a fraction of the width/depth: for experiments on one GPU.
    "motif-video-small": dict(
        in_channels=33, out_channels=16, num_attention_heads=8, attention_head_dim=64, num_layers=4,
        num_single_layers=8, num_decoder_layers=2, text_embed_dim=2560, image_embed_dim=1152, rope_theta=10000.0,
        rope_axes_dim=(16, 24, 24), enable_text_cross_attention_single=True,
    ),
    # The nano model's shape: 384-d MiniLM text, runs on a laptop CPU.
    "motif-video-nano": dict(
        in_channels=33, out_channels=16, num_attention_heads=4, attention_head_dim=32, num_layers=2,
        num_single_layers=4, num_decoder_layers=1, text_embed_dim=384, image_embed_dim=None, rope_theta=10000.0,
        rope_axes_dim=(8, 12, 12), enable_text_cross_attention_single=True,
    ),
    # Seconds-fast tests: every part present (dual, single with cross-attention, decoder, image projection).
    "motif-video-tiny": dict(
        in_channels=33, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=3, num_decoder_layers=1, text_embed_dim=32, image_embed_dim=24, rope_theta=10000.0,
        rope_axes_dim=(4, 6, 6), enable_text_cross_attention_single=True,
    ),
}


def preset(name: str, **overrides) -> TransformerConfig:
    """A named config, with optional field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return TransformerConfig(**{**PRESETS[name], **overrides})
