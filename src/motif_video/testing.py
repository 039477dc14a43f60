"""Small random Motif-Video pipelines saved in the released folder layout by diffusers' own classes.

Tests and benchmarks use these instead of downloaded weights (model hubs are unreachable in CI): the folder has the
same model_index.json, transformer/, text_encoder/ (T5Gemma2Encoder with a SigLIP vision tower), tokenizer/,
vae/ (AutoencoderKLWan), scheduler/ and guider/ as the release, only tiny.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Words enough for test prompts; anything else maps to <unk>.
_VOCAB = ["<pad>", "</s>", "<unk>", "<s>"] + (
    "a an the of and with on in to is red green blue yellow cyan magenta white black small large big tiny circle "
    "square triangle moving move moves left right up down upward downward static still drifting sliding video "
    "test cat dog running bad quality text overlay watermark logo blurry , ."
).split()


def build_tokenizer(model_max_length: int = 512):
    """A word-level tokenizer that appends </s>, like T5-style tokenizers (built locally, no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def build_text_encoder(hidden_size: int = 32, vision_hidden_size: int = 8, seed: int = 0):
    from transformers import SiglipVisionConfig, T5Gemma2Encoder, T5Gemma2EncoderConfig, T5Gemma2TextConfig

    torch.manual_seed(seed)
    text = T5Gemma2TextConfig(hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=2 * hidden_size, vocab_size=len(_VOCAB) + 8,
                              max_position_embeddings=600, head_dim=16, num_key_value_heads=2, dropout_rate=0.0)
    vision = SiglipVisionConfig(hidden_size=vision_hidden_size, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, image_size=16, patch_size=4, num_channels=3)
    return T5Gemma2Encoder(T5Gemma2EncoderConfig(text_config=text, vision_config=vision)).eval()


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    # Non-trivial latent statistics, so normalisation bugs show.
    vae.register_to_config(latents_mean=[0.1 * i for i in range(-8, 8)], latents_std=[1.0 + 0.05 * i for i in range(16)])
    return vae.eval()


def build_transformer(seed: int = 0, std: float = 0.05, preset_name: str = "motif-video-tiny", **overrides):
    """A random diffusers transformer (every parameter filled, so zero-inits hide nothing)."""
    from diffusers import MotifVideoTransformer3DModel

    from .model.config import preset

    overrides = {"text_embed_dim": 32, "image_embed_dim": 8, **overrides}
    config = preset(preset_name, **overrides).to_dict()
    config.pop("cross_attention_form")
    config.pop("cross_attention_query_bias")
    model = MotifVideoTransformer3DModel(**config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def build_diffusers_pipeline(shift: float = 15.0, guidance_scale: float = 4.0, seed: int = 0,
                             preset_name: str = "motif-video-tiny", **transformer_overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler, MotifVideoPipeline
    from diffusers.guiders import ClassifierFreeGuidance

    return MotifVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=build_vae(seed),
        text_encoder=build_text_encoder(seed=seed),
        tokenizer=build_tokenizer(),
        transformer=build_transformer(seed, preset_name=preset_name, **transformer_overrides),
        guider=ClassifierFreeGuidance(guidance_scale=guidance_scale),
    )


def save_tiny_pipeline(folder: str | Path, **kwargs) -> Path:
    """Build a tiny random pipeline with diffusers and save it in the release layout; returns the folder."""
    pipe = build_diffusers_pipeline(**kwargs)
    pipe.save_pretrained(str(folder))
    return Path(folder)


def save_tied_transformer(folder: str | Path, query_bias: bool, seed: int = 1, scale: float = 0.2) -> Path:
    """Replace the transformer of a tiny pipeline folder (`save_tiny_pipeline`) with one in our tied layout, as the
    nano model is trained, with a query-LayerNorm bias or without. Every parameter is random (a zero-initialised
    projection or a unit LayerNorm would hide a bug), `scale` large enough that the blocks move the output."""
    import shutil

    from .model.config import preset
    from .model.transformer import MotifVideoTransformer

    folder = Path(folder)
    config = preset("motif-video-tiny", text_embed_dim=32, image_embed_dim=None, cross_attention_form="tied",
                    cross_attention_query_bias=query_bias)
    model = MotifVideoTransformer(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    shutil.rmtree(folder / "transformer")
    model.save_pretrained(folder / "transformer")
    return folder
