"""diffusers' pipeline LoRA methods, with diffusers' names and semantics, acting on `self.transformer`."""

from __future__ import annotations

from pathlib import Path

from ..errors import MotifVideoError
from . import runtime
from .formats import LoraAdapter, read_adapter


class LoraLoaderMixin:
    """For a pipeline with a `transformer` attribute.

    `load_lora_weights(path, adapter_name=None)` reads any supported style (see `formats`) and activates the
    adapter at weight 1 alongside those already active; `set_adapters(names, weights)` chooses the active ones;
    `fuse_lora` / `unfuse_lora` merge into and out of the base weights; `unload_lora_weights` removes all.
    """

    _lora_loadable_modules = ["transformer"]

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, *,
                          weight_name: str | None = None) -> str:
        """Load an adapter (a file, a folder, a training `lora/` folder, or a {key: tensor} dict); returns its
        name (`default_<n>` when none is given, as in diffusers)."""
        source = pretrained_model_name_or_path_or_dict
        if weight_name is not None and not isinstance(source, dict):
            source = Path(source) / weight_name
        if adapter_name is None:
            loaded = set(runtime.adapter_names(self.transformer))
            adapter_name = next(f"default_{i}" for i in range(len(loaded) + 1) if f"default_{i}" not in loaded)
        runtime.add_adapter(self.transformer, read_adapter(source), adapter_name)
        return adapter_name

    def set_adapters(self, adapter_names: str | list[str], adapter_weights: float | list[float] | None = None):
        runtime.set_adapters(self.transformer, adapter_names, adapter_weights)

    def get_list_adapters(self) -> dict[str, list[str]]:
        names = runtime.adapter_names(self.transformer)
        return {"transformer": names} if names else {}

    def get_active_adapters(self) -> list[str]:
        return runtime.active_adapters(self.transformer)

    def disable_lora(self) -> None:
        runtime.set_enabled(self.transformer, False)

    def enable_lora(self) -> None:
        runtime.set_enabled(self.transformer, True)

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        runtime.delete_adapters(self.transformer, adapter_names)

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None) -> None:
        """Merge the active adapters (or `adapter_names`), times `lora_scale`, into the transformer's weights."""
        self._check_components(components)
        runtime.fuse(self.transformer, lora_scale, adapter_names)
        if safe_fusing:
            for parameter in self.transformer.parameters():
                if not parameter.isfinite().all():
                    self.unfuse_lora()
                    raise MotifVideoError("fusing the LoRA produced non-finite weights; the fuse was undone")

    def unfuse_lora(self, components: list[str] | None = None) -> None:
        self._check_components(components)
        runtime.unfuse(self.transformer)

    def unload_lora_weights(self) -> None:
        """Remove every adapter, unfusing first; the transformer gets back its original layers."""
        runtime.unload(self.transformer)

    def _check_components(self, components) -> None:
        for component in components or []:
            if component not in self._lora_loadable_modules:
                raise MotifVideoError(f"LoRA applies to {self._lora_loadable_modules}, not {component!r}")


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale); a tail after the last ':' that is not a number belongs to the path."""
    path, colon, tail = spec.rpartition(":")
    if colon and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def read_lora_specs(specs: list[str]) -> list[tuple[LoraAdapter, float]]:
    """Read every `--lora PATH[:SCALE]` before any model loads, so a bad file fails fast."""
    return [(read_adapter(path), scale) for path, scale in map(parse_lora_spec, specs)]


def apply_lora_specs(pipe: LoraLoaderMixin, adapters: list[tuple[LoraAdapter, float]]) -> None:
    """Attach the adapters as `lora_0`, `lora_1`, ... and activate them all with their scales."""
    if not adapters:
        return
    names = [f"lora_{i}" for i in range(len(adapters))]
    for name, (adapter, _) in zip(names, adapters):
        runtime.add_adapter(pipe.transformer, adapter, name)
    pipe.set_adapters(names, [scale for _, scale in adapters])


def check_adapters_fit(model_dir, adapters: list[tuple[LoraAdapter, float]], *, gguf: bool = False) -> None:
    """Bind the adapters to the model folder's transformer built on the meta device (config and key names only),
    so an adapter that does not fit fails before any weights load. Folders without a local transformer/ are
    checked later, at loading."""
    from safetensors import SafetensorError, safe_open

    from ..convert.checkpoint import build_on_meta, load_config
    from ..convert.layouts import detect_layout
    from ..model.transformer import MotifVideoTransformer

    folder = Path(model_dir) / "transformer"
    if not adapters or not (folder / "config.json").is_file():
        return
    keys: dict[str, None] = {}
    try:
        config = load_config(folder)
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as f:
                keys.update(dict.fromkeys(f.keys()))
    except (SafetensorError, OSError, ValueError, MotifVideoError):
        return  # a damaged folder is reported by the loader, with its own message
    tied = not gguf and detect_layout(keys) in ("original", "tied")
    model = build_on_meta(MotifVideoTransformer,
                          config.replace(cross_attention_form="tied" if tied else "untied"))
    for adapter, _ in adapters:
        runtime.bind(model, adapter)
