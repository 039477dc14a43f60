"""The diffusers folder layout for the transformer: config.json + safetensors, sharded with an index json.

Loading builds the model on the meta device and assigns the file's tensors, so a 2B model never exists twice in
memory. Every problem (missing file, corrupt shard, key or shape mismatch) is one CheckpointError line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError
from ..files import atomic_dir
from ..hub import resolve_model_dir
from .layouts import detect_layout, to_model_layout

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {str(e).splitlines()[0]}") from None


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: an index json naming shards, or one safetensors file."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"corrupt shard index {index}: {e}") from None
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"missing checkpoint shard {folder / shard} (named in {index.name})")
            state_dict.update(read_safetensors(folder / shard))
        missing = set(weight_map) - set(state_dict)
        if missing:
            raise CheckpointError(f"shards in {folder} lack {len(missing)} tensors named in the index, e.g. "
                                  f"{sorted(missing)[0]}")
        return state_dict
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {folder}")
    preferred = folder / WEIGHTS_NAME
    return read_safetensors(preferred if preferred.is_file() else files[0])


def check_state_dict(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"checkpoint {source} does not match its config: " + ", ".join(parts))
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != tuple(shape):
            raise CheckpointError(f"checkpoint {source} does not match its config: {key} has shape "
                                  f"{tuple(state_dict[key].shape)}, the config needs {tuple(shape)}")


def build_on_meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def load_config(folder: Path):
    from ..model.config import TransformerConfig

    return TransformerConfig.from_json_file(folder / "config.json")


def load_transformer_folder(cls, ref, subfolder=None, *, torch_dtype=None, device="cpu"):
    folder = resolve_model_dir(ref, subfolder)
    whole_model = not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file()
    if subfolder is None and whole_model:  # a model folder, or a built-in name such as motif-video-nano
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a transformer folder: it has no config.json")
    config = load_config(folder)
    state_dict = read_state_dict(folder)
    if detect_layout(state_dict) in ("original", "tied"):
        config = config.replace(cross_attention_form="tied")
    state_dict = to_model_layout(state_dict, config.cross_attention_form)
    return model_from_state_dict(cls, config, state_dict, str(folder), torch_dtype=torch_dtype, device=device)


def model_from_state_dict(cls, config, state_dict, source: str, *, torch_dtype=None, device="cpu"):
    model = build_on_meta(cls, config)
    check_state_dict(model, state_dict, source)
    if torch_dtype is not None:
        state_dict = {k: v.to(torch_dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, assign=True)
    return model.to(device)


def shard_state_dict(state_dict: dict, max_shard_size: int) -> list[dict]:
    shards, current, size = [], {}, 0
    for key, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    return shards


def save_state_dict_folder(state_dict: dict, config_json: dict, folder: str | Path, max_shard_size: int) -> Path:
    """Write config + weights as a new folder swapped in complete (`files.atomic_dir`): whatever interrupts the save,
    `folder` holds either all of the old model or all of the new one. Other files the folder had (a README, a model
    card) are kept; the old weights, their index and config.json are not."""
    folder = Path(folder)
    state_dict = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    shards = shard_state_dict(state_dict, max_shard_size)
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder, carry=lambda name: not _is_model_file(name)) as tmp:
        for shard, name in zip(shards, names):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state_dict.values())},
                "weight_map": {k: name for shard, name in zip(shards, names) for k in shard},
            }
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    return folder


def _is_model_file(name: str) -> bool:
    """What a save replaces: the weights in any sharding, their index, the config."""
    weights = name.startswith("diffusion_pytorch_model") and name.endswith((".safetensors", ".json"))
    return weights or name == "config.json"


def save_transformer_folder(model, folder, max_shard_size: int) -> Path:
    return save_state_dict_folder(model.state_dict(), model.config.to_diffusers_json(), folder, max_shard_size)


def load_any_config(config):
    """A TransformerConfig from a folder, hub id, dict, preset name or TransformerConfig."""
    from ..model.config import PRESETS, TransformerConfig, preset

    if isinstance(config, TransformerConfig):
        return config
    if isinstance(config, dict):
        return TransformerConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        if str(config) in PRESETS:
            return preset(str(config))
        from ..model_folder import transformer_folder

        return TransformerConfig.from_json_file(transformer_folder(config) / "config.json")
    raise ConfigError("config must be a folder, hub id, preset name, dict or TransformerConfig")


def convert_transformer(folder_in: str | Path, folder_out: str | Path, to: str) -> tuple[str, Path, Path, int]:
    """Write the transformer of `folder_in` (a transformer or model folder) in the `to` layout at `folder_out`
    (`motif-video convert`); returns (source layout, the folder read, the folder written, tensors written)."""
    from ..model_folder import transformer_folder
    from .layouts import to_layout

    if not Path(folder_in).exists():
        raise CheckpointError(f"input not found: {folder_in}")
    folder = transformer_folder(folder_in)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder_in} is not a transformer folder: it has no config.json")
    out = output_folder(Path(folder_out))
    config = load_config(folder)
    state_dict = read_state_dict(folder)
    source = detect_layout(state_dict)
    try:
        converted = to_layout(state_dict, to)
    except CheckpointError as e:
        if to != "diffusers":
            raise
        raise CheckpointError(f"{e}; `convert --to original` and `quantize --layout tied` work for it") from None
    config = config.replace(cross_attention_form="untied" if to == "diffusers" else "tied")
    # save_state_dict_folder writes beside the destination and swaps in complete: converting in place or onto an
    # existing model never leaves a folder without weights, whatever interrupts the write.
    save_state_dict_folder(converted, config.to_diffusers_json(), out, max_shard_size=5 * 1024**3)
    return source, folder, out, len(converted)


_WEIGHT_FILES = ("config.json", WEIGHTS_NAME, INDEX_NAME)


def output_folder(out: Path) -> Path:
    """Where the converted transformer goes, refusing anything but a new path, an empty folder or one of ours."""
    from ..errors import MotifVideoError
    from ..files import check_writable_dir

    if out.exists() and not out.is_dir():
        raise MotifVideoError(f"output {out} is an existing file; give a folder")
    if (out / "model_index.json").is_file() and (out / "transformer").is_dir():
        out = out / "transformer"  # a whole model folder: its transformer is what changes
    if out.is_dir():
        names = [p.name for p in out.iterdir()]
        ours = all(n in _WEIGHT_FILES or (n.startswith("diffusion_pytorch_model-") and n.endswith(".safetensors"))
                   for n in names)
        if names and not (ours and "config.json" in names):
            raise MotifVideoError(f"output {out} is a folder holding other files than a transformer checkpoint; give "
                                  "a new or empty folder")
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MotifVideoError(f"cannot create the folder for {out}: {e.strerror or e}") from None
    check_writable_dir(out.absolute().parent, "converted checkpoint")
    return out
