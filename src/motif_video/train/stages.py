"""The curriculum: building a stage's starting model and the architecture changes between stages.

A stage starts from the previous stage's checkpoint (`stage.init_from`, EMA weights by default) and may change the
architecture in the two ways the paper does, each listed explicitly in `stage.transitions`:

- `switch_text_encoder` (stage 4: sentence-embedding model -> T5Gemma2): the text projection `context_embedder` is
  re-initialised for the new text width; everything downstream of it keeps its weights.
- `insert_shared_cross_attention` (stage 9): zero-initialised Shared Cross-Attention in every single-stream encoder
  block, so the network's output is unchanged at the first step.

After the transitions the model must equal the architecture the config's `model` section describes; any other
difference is a config mistake and stops the run before it starts.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..model.config import TransformerConfig
from ..model.transformer import MotifVideoTransformer
from .checkpoint import resolve_checkpoint
from .config import TrainConfig
from .surgery import init_matched_decoder, insert_shared_cross_attention, replace_text_projection


def _comparable(config: TransformerConfig) -> dict:
    d = config.to_dict()
    if not (config.enable_text_cross_attention_single or config.enable_text_cross_attention_dual):
        d.pop("cross_attention_form")  # meaningless without cross-attention
        d.pop("cross_attention_query_bias")
    return d


def check_architecture(model: MotifVideoTransformer, target: TransformerConfig, where: str) -> None:
    have, want = _comparable(model.config), _comparable(target)
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            hint = ""
            if key == "text_embed_dim":
                hint = " (add switch_text_encoder to stage.transitions)"
            elif key == "enable_text_cross_attention_single":
                hint = " (add insert_shared_cross_attention to stage.transitions)"
            raise ConfigError(f"{where}: the model has {key}={have.get(key)!r} but the config's model section says "
                              f"{want.get(key)!r}{hint}")


def apply_transitions(model: MotifVideoTransformer, transitions: list[str], target: TransformerConfig,
                      where: str = "stage") -> MotifVideoTransformer:
    """The listed architecture changes, in order; the result must match `target` exactly."""
    for op in transitions:
        if op == "switch_text_encoder":
            replace_text_projection(model, target.text_embed_dim)
        elif op == "insert_shared_cross_attention":
            if not target.enable_text_cross_attention_single:
                raise ConfigError("insert_shared_cross_attention: set model.overrides."
                                  "enable_text_cross_attention_single: true for this stage")
            insert_shared_cross_attention(model, target.cross_attention_form, target.cross_attention_query_bias)
        else:
            raise ConfigError(f"unknown stage transition {op!r}")
    check_architecture(model, target, where)
    return model


def build_transformer(config: TrainConfig) -> MotifVideoTransformer:
    """The model a run starts from: a preset (random init from the seed), a pretrained folder, or the previous
    stage's checkpoint with the stage's transitions applied."""
    stage, section = config.stage, config.model
    if stage is not None and stage.init_from is not None:
        target = section.architecture()
        if target is None:
            raise ConfigError("stage.init_from needs model.preset (+ overrides) to describe the stage's architecture; "
                              "model.pretrained gives weights of its own")
        checkpoint = resolve_checkpoint(stage.init_from)
        folder = checkpoint / ("ema" if stage.init_weights == "ema" else "transformer")
        if not folder.is_dir():
            raise ConfigError(f"stage.init_from: {checkpoint} has no {folder.name}/ weights "
                              + ("(set stage.init_weights: model)" if stage.init_weights == "ema" else ""))
        model = MotifVideoTransformer.from_pretrained(folder)
        return apply_transitions(model, stage.transitions, target, f"stage {stage.name} from {checkpoint}")
    if section.pretrained is not None:
        model = MotifVideoTransformer.from_pretrained(section.pretrained, torch_dtype=torch.float32)
        if section.overrides:
            changed = model.config.replace(**section.overrides)
            with torch.device("meta"):
                shapes = {k: v.shape for k, v in MotifVideoTransformer(changed).state_dict().items()}
            if shapes != {k: v.shape for k, v in model.state_dict().items()}:
                raise ConfigError(f"model.overrides {sorted(section.overrides)} change the layout of the pretrained "
                                  "weights; architecture changes go through stage.transitions")
            model.config = changed
        return model
    model = MotifVideoTransformer(section.architecture())
    if section.decoder_init == "matched":
        init_matched_decoder(model, tuple(section.matched_grid))
    return model
