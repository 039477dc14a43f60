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
    assert list(model.state_dict()) == keys  # the wrappers keep the model's keys, both ways
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, strict=True)

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
    pipe.disable_lora()  # the base model's output, fused or not (PEFT unmerges on disable too)
    assert rel_err(run(model), run(reference)) < 1e-6
    pipe.enable_lora()
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # unfuses first
    assert all((model.state_dict()[k] - w).abs().max() < 1e-6 for k, w in weights.items())


def test_lora_spec_parsing():
    assert parse_lora_spec("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_spec("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_spec("runs/x:y/lora:-1") == ("runs/x:y/lora", -1.0)
    assert parse_lora_spec("runs/x:y/lora") == ("runs/x:y/lora", 1.0)


def test_compiled_blocks_follow_loads_and_weight_changes_without_retracing(tmp_path):
    from torch._dynamo.testing import CompileCounter

    model = tiny()
    reference = copy.deepcopy(model)
    targets = {k: v for k, v in UNIFORM.items() if k.startswith("transformer_blocks.0.")}
    factors = random_factors(model, targets)
    counter = CompileCounter()
    model.transformer_blocks[0].compile(backend=counter, dynamic=False)  # what compile_transformer does per block
    base = run(model)
    pipe = Holder(model)
    pipe.load_lora_weights(in_style(factors, "comfyui", tmp_path), adapter_name="a")
    assert rel_err(run(model), run(hand_merged(reference, (factors, 1.0)))) < 1e-5
    traced = counter.frame_count
    pipe.set_adapters("a", 0.3)  # the scale is a tensor buffer: no new trace
    assert rel_err(run(model), run(hand_merged(reference, (factors, 0.3)))) < 1e-5
    assert counter.frame_count == traced
    pipe.unload_lora_weights()
    assert torch.equal(run(model), base)


def test_diffusers_loads_what_convert_lora_writes(tmp_path, capsys):
    model = tiny()
    model.save_pretrained(tmp_path / "base")
    factors = random_factors(model, UNTIED_TARGETS)  # mixed ranks and alphas: rank_pattern / alpha_pattern
    source = in_style(factors, "kohya", tmp_path)
    Holder(model).load_lora_weights(source)
    expected = run(model)

    assert cli_main(["convert-lora", str(source), str(tmp_path / "out"), "--to", "diffusers"]) == 0
    assert "9 layers" in capsys.readouterr().out
    reference = MotifVideoTransformer3DModel.from_pretrained(tmp_path / "base").eval()
    reference.load_lora_adapter(str(tmp_path / "out"), weight_name="pytorch_lora_weights.safetensors",
                                prefix="transformer")
    with torch.no_grad():
        got = reference(*inputs(model.config), return_dict=False)[0]
    assert rel_err(got, expected) < 1e-5

    # ComfyUI style and back: the same factors and alphas
    assert cli_main(["convert-lora", str(tmp_path / "out"), str(tmp_path / "c.safetensors"), "--to", "comfyui"]) == 0
    back = read_adapter(tmp_path / "c.safetensors")
    assert set(back) == set(factors)
    for name, (a, b, alpha) in factors.items():  # alpha / rank is folded into B in the diffusers file
        assert torch.equal(back[name].down, a) and back[name].alpha == back[name].rank
        assert torch.allclose(back[name].up, alpha / a.shape[0] * b, rtol=1e-6, atol=0)


def test_tied_adapter_carries_over_to_the_diffusers_layout(tmp_path, capsys):
    model = tiny("tied")
    with torch.no_grad():  # a foldable query LayerNorm (zero bias), as `convert --to diffusers` requires
        for block in model.single_transformer_blocks:
            if block.cross_attn is not None:
                block.cross_attn.query_norm.bias.zero_()
    model.save_pretrained(tmp_path / "tied")
    targets = {**{k: (4, 6.0) for k in TIED_TARGETS}, "single_transformer_blocks.0.attn.to_v": (4, 6.0)}
    factors = random_factors(model, targets)
    source = in_style(factors, "ours", tmp_path)
    Holder(model).load_lora_weights(source)
    expected = run(model)

    out = tmp_path / "lora.safetensors"
    assert cli_main(["convert-lora", str(source), str(out), "--to", "diffusers"]) == 2  # tied names need --model
    assert "--model" in capsys.readouterr().err
    tied = str(tmp_path / "tied")
    assert cli_main(["convert-lora", str(source), str(out), "--to", "diffusers", "--model", tied]) == 0
    assert cli_main(["convert", str(tmp_path / "tied"), str(tmp_path / "untied"), "--to", "diffusers"]) == 0
    reference = MotifVideoTransformer3DModel.from_pretrained(tmp_path / "untied").eval()
    reference.load_lora_adapter(str(out), prefix="transformer")
    with torch.no_grad():
        got = reference(*inputs(model.config), return_dict=False)[0]
    assert rel_err(got, expected) < 1e-5
    # and our own untied model refuses the tied file with a hint instead of dropping the query update
    with pytest.raises(CheckpointError, match="tied-layout model"):
        Holder(MotifVideoTransformer.from_pretrained(tmp_path / "untied")).load_lora_weights(source)


def test_gguf_base_applies_the_update_on_the_fly(tmp_path):
    from gguf import GGMLQuantizationType as Q

    from motif_video.convert.gguf import GGUFLinear, model_nbytes, write_gguf
    from tests.convert.test_gguf import tiny_config, tiny_model

    cfg = tiny_config()
    path = write_gguf(tiny_model(cfg).state_dict(), tmp_path / "t.gguf", Q.Q8_0, config_json=cfg.to_diffusers_json(),
                      progress=False)
    quantised = MotifVideoTransformer.from_single_file(path).eval()
    alone = model_nbytes(quantised)
    dequantised = copy.deepcopy(quantised)  # the reference: every quantised layer as a plain nn.Linear
    for name, layer in list(dequantised.named_modules()):
        if isinstance(layer, GGUFLinear):
            plain = torch.nn.Linear(layer.in_features, layer.out_features)
            with torch.no_grad():
                plain.weight.copy_(layer.dequantized_weight())
                plain.bias.copy_(layer.bias)
            parent, _, child = name.rpartition(".")
            setattr(dequantised.get_submodule(parent), child, plain)
    layers = {n: type(m) for n, m in quantised.named_modules()}
    targets = {n: (8, 16.0) for n in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.net.2",
                                      "single_transformer_blocks.0.proj_out",
                                      "single_transformer_blocks.1.cross_attn.to_v")}
    assert all(layers[n] is GGUFLinear for n in targets)
    factors = random_factors(quantised, targets)
    source = in_style(factors, "comfyui", tmp_path)

    pipe = Holder(quantised)
    pipe.load_lora_weights(source)
    Holder(dequantised).load_lora_weights(source)
    assert rel_err(run(quantised), run(dequantised)) < 1e-4
    assert all(isinstance(quantised.get_submodule(n).base, GGUFLinear) for n in targets)  # still the bytes
    adapter_bytes = sum((a.numel() + b.numel()) * 4 for a, b, _ in factors.values())
    assert model_nbytes(quantised) <= 1.1 * (alone + adapter_bytes)
    with pytest.raises(MotifVideoError, match="quantised layer"):
        pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert {n: type(m) for n, m in quantised.named_modules()} == layers and model_nbytes(quantised) == alone


BAD = {
    "nothing": ({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(2, 32),
                 "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(32, 2)},
                "transformer.transformer_blocks.7.attn.to_q.lora_A.weight matches no layer"),
    "shape": ({"diffusion_model.transformer_blocks.0.attn.to_q.lora_down.weight": torch.zeros(2, 31),
               "diffusion_model.transformer_blocks.0.attn.to_q.lora_up.weight": torch.zeros(32, 2)},
              "to_q.lora_down.weight: rank-2 factors (2, 31) and (32, 2) do not fit"),
    "rank": ({"lora_unet_proj_out.lora_down.weight": torch.zeros(3, 32),
              "lora_unet_proj_out.lora_up.weight": torch.zeros(16, 2)},
             "lora_unet_proj_out.lora_down.weight: factors of shapes (3, 32) and (16, 2)"),
    "half": ({"transformer.proj_out.lora_B.weight": torch.zeros(16, 2)},
             "transformer.proj_out.lora_B.weight has no matching lora_A"),
    "norm": ({"transformer.transformer_blocks.0.attn.norm_q.lora_A.weight": torch.zeros(2, 16),
              "transformer.transformer_blocks.0.attn.norm_q.lora_B.weight": torch.zeros(16, 2)},
             "norm_q is a RMSNorm, not a linear layer"),
    "foreign": ({"transformer.proj_out.weight": torch.zeros(16, 32)},
                "transformer.proj_out.weight is not a LoRA factor"),
    "kohya": ({"lora_unet_down_blocks_0_to_q.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_down_blocks_0_to_q.lora_up.weight": torch.zeros(32, 2)},
              "lora_unet_down_blocks_0_to_q.lora_down.weight names no module"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_name_the_first_bad_key_and_change_nothing(case, tmp_path):
    tensors, message = BAD[case]
    model = tiny()
    before = run(model)
    with pytest.raises(CheckpointError) as error:
        Holder(model).load_lora_weights({**tensors})
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not runtime.lora_layers(model) and torch.equal(run(model), before)


def test_api_misuse_is_a_clear_error(tmp_path):
    model = tiny()
    pipe = Holder(model)
    source = in_style(random_factors(model, UNIFORM), "ours", tmp_path)
    pipe.load_lora_weights(source, adapter_name="a")
    with pytest.raises(MotifVideoError, match="already loaded"):
        pipe.load_lora_weights(source, adapter_name="a")
    with pytest.raises(MotifVideoError, match="no adapter named 'b'"):
        pipe.set_adapters(["a", "b"])
    with pytest.raises(MotifVideoError, match="one number per adapter"):
        pipe.set_adapters(["a"], [1.0, 2.0])
    with pytest.raises(CheckpointError, match="no LoRA adapter at"):
        pipe.load_lora_weights(tmp_path / "missing")


def test_bf16_model_keeps_its_dtype_with_adapters(tmp_path):
    model = tiny()
    factors = random_factors(model, UNIFORM)
    expected = run(hand_merged(model, (factors, 0.8)))
    model = model.to(torch.bfloat16)
    pipe = Holder(model)
    pipe.load_lora_weights(in_style(factors, "comfyui", tmp_path), adapter_name="a")
    pipe.set_adapters("a", 0.8)
    layer = model.get_submodule("proj_out")
    assert layer.adapters["a"].down.dtype == torch.bfloat16 and layer.adapters["a"].scale.dtype == torch.float32
    x, t, text, mask, image = inputs(model.config)
    with torch.no_grad():
        got = model(x.bfloat16(), t, text.bfloat16(), mask, image.bfloat16())
    assert got.dtype == torch.bfloat16 and rel_err(got.float(), expected) < 3e-2


@pytest.mark.parametrize("args, message", [
    (["MISSING", "OUT/x.safetensors", "--to", "diffusers"], "no LoRA adapter at"),
    (["SOURCE", "OUT/folder", "--to", "comfyui"], "a ComfyUI LoRA is one .safetensors file"),
    (["SOURCE", "OUT/x.safetensors", "--to", "diffusers", "--model", "OUT"], "has no config.json"),
])
def test_convert_lora_bad_input_is_one_line(args, message, tmp_path, capsys):
    model = tiny()
    source = in_style(random_factors(model, UNIFORM), "comfyui", tmp_path)
    args = [a.replace("MISSING", str(tmp_path / "missing")).replace("SOURCE", str(source)).replace(
        "OUT", str(tmp_path / "out")) for a in args]
    assert cli_main(["convert-lora", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
