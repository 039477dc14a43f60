"""LoRA at generation: every key style against hand-merged weights, several adapters, fuse/unfuse/unload, diffusers'
own loader on the files we write, GGUF bases, and errors."""

import copy

import pytest
import torch
from diffusers import MotifVideoTransformer3DModel
from safetensors.torch import save_file

from motif_video import MotifVideoTransformer, preset
from motif_video.cli import main as cli_main
from motif_video.errors import CheckpointError, MotifVideoError
from motif_video.lora import runtime
from motif_video.lora.formats import read_adapter, write_adapter
from motif_video.lora.loader import LoraLoaderMixin, parse_lora_spec
from motif_video.train.config import LoraSection
from motif_video.train.lora import save_lora_adapter
from tests.conftest import randomize_

# layers of every kind: joint attention, context stream, MLPs, modulation, untied cross-attention, the output head
UNTIED_TARGETS = {
    "transformer_blocks.0.attn.to_q": (4, 8.0),
    "transformer_blocks.0.attn.to_out.0": (4, 8.0),
    "transformer_blocks.0.attn.add_k_proj": (2, 1.0),
    "transformer_blocks.0.ff_context.net.0.proj": (3, 3.0),
    "transformer_blocks.0.norm1.linear": (4, 8.0),
    "single_transformer_blocks.0.proj_mlp": (4, 8.0),
    "single_transformer_blocks.1.cross_attn.to_q": (4, 8.0),
    "single_transformer_blocks.0.cross_attn.to_out.0": (5, 2.5),
    "proj_out": (4, 8.0),
}
TIED_TARGETS = {
    "single_transformer_blocks.0.cross_attn.query_proj": (4, 6.0),
    "single_transformer_blocks.1.cross_attn.out_proj": (4, 6.0),
    "single_transformer_blocks.1.attn.to_k": (4, 6.0),
}


class Holder(LoraLoaderMixin):
    """The pipeline's LoRA API on a bare transformer."""

    def __init__(self, transformer):
        self.transformer = transformer


def tiny(form="untied", seed=0):
    return randomize_(MotifVideoTransformer(preset("motif-video-tiny", cross_attention_form=form)), std=0.1,
                      seed=seed).eval()


def inputs(cfg, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 33, 2, 4, 6, generator=gen), torch.tensor([800.0, 30.0]),
            torch.randn(2, 5, cfg.text_embed_dim, generator=gen), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
            torch.randn(2, 3, cfg.image_embed_dim, generator=gen))


def run(model):
    with torch.no_grad():
        return model(*inputs(model.config))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def random_factors(model, targets, seed=0):
    """{module: (A (r, in), B (out, r), alpha)} with B far from zero, so every update shows."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (rank, alpha) in targets.items():
        layer = model.get_submodule(name)
        out[name] = (torch.randn(rank, layer.in_features, generator=gen) * 0.3,
                     torch.randn(layer.out_features, rank, generator=gen) * 0.3, alpha)
    return out


def hand_merged(model, *weighted):
    """A copy with W + w (alpha / r) B A in float64 for each (factors, w): the independent reference."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for factors, weight in weighted:
            for name, (a, b, alpha) in factors.items():
                w = merged.get_submodule(name).weight
                w.copy_((w.double() + weight * alpha / a.shape[0] * (b.double() @ a.double())).to(w.dtype))
    return merged


def underscored(name):
    return name.replace(".", "_")


def original_name(name):
    return name.replace("cross_attn.query_proj", "cross_attn_query_proj").replace("cross_attn.out_proj",
                                                                                   "cross_attn_out_proj")


def in_style(factors, style, tmp_path):
    """Write `factors` in a key style, by hand (not with our writer), and return the path to pass."""
    tensors, header = {}, None
    for name, (a, b, alpha) in factors.items():
        if style == "peft":  # PEFT's own names: prefix, adapter name inside the key, alpha in the header only
            tensors[f"base_model.model.{name}.lora_A.default.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.default.weight"] = b
        elif style == "diffusers_no_header":  # diffusers assumes alpha = rank; `.alpha` keys carry it here
            tensors[f"transformer.{name}.lora_A.weight"] = a
            tensors[f"transformer.{name}.lora_B.weight"] = b
            tensors[f"transformer.{name}.alpha"] = torch.tensor(alpha)
        elif style in ("comfyui", "comfyui_original"):
            module = original_name(name) if style == "comfyui_original" else name
            tensors[f"diffusion_model.{module}.lora_down.weight"] = a
            tensors[f"diffusion_model.{module}.lora_up.weight"] = b
            tensors[f"diffusion_model.{module}.alpha"] = torch.tensor(alpha)
        elif style in ("kohya", "kohya_original"):
            module = underscored(original_name(name) if style == "kohya_original" else name)
            tensors[f"lora_unet_{module}.lora_down.weight"] = a
            tensors[f"lora_unet_{module}.lora_up.weight"] = b
            tensors[f"lora_unet_{module}.alpha"] = torch.tensor(alpha)
    if style == "ours":  # what `motif-video train` writes: a checkpoint's lora/ folder
        (rank, alpha), = {(a.shape[0], alpha) for a, _, alpha in factors.values()}
        save_lora_adapter(tmp_path / "step-1" / "lora", {f"{n}.lora_A.weight": a for n, (a, _, _) in factors.items()}
                          | {f"{n}.lora_B.weight": b for n, (_, b, _) in factors.items()},
                          LoraSection(rank=rank, alpha=alpha, target_modules=sorted(factors)))
        return tmp_path / "step-1"
    if style == "peft":
        import json

        header = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8.0, "rank_pattern": {
            n: a.shape[0] for n, (a, _, _) in factors.items() if a.shape[0] != 4}, "alpha_pattern": {
            n: alpha for n, (_, _, alpha) in factors.items() if alpha != 8.0}})}
    path = tmp_path / f"{style}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    return path


UNIFORM = {k: (4, 8.0) for k in UNTIED_TARGETS}


@pytest.mark.parametrize("style, form, targets", [
    ("ours", "untied", UNIFORM),
    ("ours", "tied", {k: (4, 6.0) for k in TIED_TARGETS}),
    ("peft", "untied", UNTIED_TARGETS),
    ("diffusers_no_header", "untied", UNTIED_TARGETS),
    ("comfyui", "untied", UNTIED_TARGETS),
    ("kohya", "untied", UNTIED_TARGETS),
    ("comfyui_original", "tied", TIED_TARGETS),
    ("kohya_original", "tied", TIED_TARGETS),
])
def test_each_key_style_equals_the_hand_merged_weights(style, form, targets, tmp_path):
    model = tiny(form)
    factors = random_factors(model, targets)
    base = run(model)
    pipe = Holder(model)
    name = pipe.load_lora_weights(in_style(factors, style, tmp_path))
    assert name == "default_0" and pipe.get_active_adapters() == ["default_0"]
    assert set(runtime.lora_layers(model)) == set(targets)
    got = run(model)
    expected = run(hand_merged(model_copy_without_lora(model), (factors, 1.0)))
    assert rel_err(got, base) > 5e-4  # the adapter matters, far above the tolerance below
    assert rel_err(got, expected) < 1e-5


def model_copy_without_lora(model):
    plain = copy.deepcopy(model)
    runtime.unload(plain)
    return plain


def test_two_adapters_add_up_and_unload_restores_the_base_exactly(tmp_path):
    model = tiny()
    keys = list(model.state_dict())
    base_modules = {n: model.get_submodule(n) for n in UNTIED_TARGETS}
    base = run(model)
    first = random_factors(model, UNTIED_TARGETS, seed=1)
    second = random_factors(model, {k: v for k, v in list(UNTIED_TARGETS.items())[3:]}, seed=2)
    reference = copy.deepcopy(model)
    pipe = Holder(model)
    pipe.load_lora_weights(in_style(first, "comfyui", tmp_path), adapter_name="style")
    (tmp_path / "b").mkdir()
    pipe.load_lora_weights(in_style(second, "kohya", tmp_path / "b"), adapter_name="subject")
    assert pipe.get_list_adapters() == {"transformer": ["style", "subject"]}
    assert list(model.state_dict()) == keys  # the wrappers keep the model's keys

    pipe.set_adapters(["style", "subject"], [0.7, -1.3])
    assert rel_err(run(model), run(hand_merged(reference, (first, 0.7), (second, -1.3)))) < 1e-5
    pipe.set_adapters("subject", 0.5)
    assert pipe.get_active_adapters() == ["subject"]
    assert rel_err(run(model), run(hand_merged(reference, (second, 0.5)))) < 1e-5
    pipe.disable_lora()
    assert torch.equal(run(model), base)
    pipe.enable_lora()

    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {} and not runtime.lora_layers(model)
    assert all(model.get_submodule(n) is m for n, m in base_modules.items())  # the very same layer objects
    assert torch.equal(run(model), base)


def test_fuse_and_unfuse_round_trip(tmp_path):
    model = tiny()
    factors = random_factors(model, UNIFORM)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    reference = copy.deepcopy(model)
    pipe = Holder(model)
    pipe.load_lora_weights(in_style(factors, "ours", tmp_path), adapter_name="a")
    pipe.set_adapters("a", 0.8)
    unfused = run(model)
    pipe.fuse_lora(lora_scale=1.5)
    merged_weight = model.state_dict()["proj_out.weight"]
    assert not torch.equal(merged_weight, weights["proj_out.weight"])  # really merged into the weights
    assert rel_err(run(model), run(hand_merged(reference, (factors, 1.2)))) < 1e-5
    pipe.unfuse_lora()
    assert rel_err(run(model), unfused) < 1e-5
    assert all((model.state_dict()[k] - w).abs().max() < 1e-6 for k, w in weights.items())
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # unfuses first
    assert all((model.state_dict()[k] - w).abs().max() < 1e-6 for k, w in weights.items())


def test_lora_spec_parsing():
    assert parse_lora_spec("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_spec("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_spec("runs/x:y/lora:-1") == ("runs/x:y/lora", -1.0)
    assert parse_lora_spec("runs/x:y/lora") == ("runs/x:y/lora", 1.0)
