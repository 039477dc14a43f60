"""LoRA fine-tuning: only adapters train, and the saved adapter loads into diffusers and into our model alike."""

import pytest
import torch
from diffusers import MotifVideoTransformer3DModel
from safetensors import safe_open

from motif_video import MotifVideoTransformer
from motif_video.errors import CheckpointError
from motif_video.train.checkpoint import list_checkpoints, read_optimizer_state
from motif_video.train.lora import load_lora_adapter, read_lora_adapter
from motif_video.train.loop import train
from tests.conftest import randomize_
from tests.train.engine_helpers import build_config, make_cache, one_thread  # noqa: F401
from tests.train.test_resume import Crash, crash_after

RANK, ALPHA = 4, 12.0  # alpha != rank: the scale alpha/rank = 3 must survive the trip to diffusers


def base_folder(tmp_path):
    model = randomize_(MotifVideoTransformer.from_preset("motif-video-tiny"), std=0.1)
    return model.save_pretrained(tmp_path / "base")


def lora_config(tmp_path, base, cache, steps=3, **sections):
    return build_config(tmp_path, cache, model={"pretrained": str(base)},
                        lora={"rank": RANK, "alpha": ALPHA}, optim={"lr": 2e-2, "steps": steps},
                        checkpointing={"every": 2, "keep_last": 5}, **sections)


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 33, 2, 4, 6, generator=gen), torch.tensor([800.0, 100.0]),
            torch.randn(2, 5, 32, generator=gen), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))


def test_lora_adapter_loads_into_diffusers_and_ours(tmp_path):
    base = base_folder(tmp_path)
    cache = make_cache(tmp_path / "cache")
    result = train(lora_config(tmp_path, base, cache))
    adapter_dir = result.checkpoint / "lora"
    assert not (result.checkpoint / "transformer").exists()  # a LoRA checkpoint holds only the adapters
    assert (result.checkpoint / "lora_ema").is_dir()

    # the file: diffusers' names, prefix and header
    with safe_open(str(adapter_dir / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        header = f.metadata()
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in keys
    assert "transformer.single_transformer_blocks.0.cross_attn.to_q.lora_B.weight" in keys
    assert '"transformer.lora_alpha": 12.0' in header["lora_adapter_metadata"]
    tensors, _ = read_lora_adapter(adapter_dir)
    assert any(v.abs().max() > 0 for k, v in tensors.items() if "lora_B" in k)  # trained away from zero

    x, t, text, mask = inputs()
    reference = MotifVideoTransformer3DModel.from_pretrained(base).eval()
    with torch.no_grad():
        plain = reference(x, t, text, mask, return_dict=False)[0]
    reference.load_lora_adapter(str(adapter_dir), weight_name="pytorch_lora_weights.safetensors")
    ours = load_lora_adapter(MotifVideoTransformer.from_pretrained(base), adapter_dir).eval()
    with torch.no_grad():
        expected = reference(x, t, text, mask, return_dict=False)[0]
        got = ours(x, t, text, mask)
    assert (expected - plain).abs().max() > 1e-3  # the adapter changes the output
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5

    # independent reference for the scale: merge W + (alpha / r) B A by hand into a plain copy
    merged = MotifVideoTransformer.from_pretrained(base).eval()
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." in key:
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                params[key.replace(".lora_A.weight", ".weight")] += (ALPHA / RANK) * b @ a
        assert ((merged(x, t, text, mask) - got).abs().max() / got.abs().max()).item() < 1e-5


def test_lora_trains_only_adapters_and_resumes_exactly(tmp_path):
    base = base_folder(tmp_path)
    cache = make_cache(tmp_path / "cache")
    full = train(lora_config(tmp_path / "full", base, cache, steps=4))
    config = lora_config(tmp_path / "cut", base, cache, steps=4)
    with pytest.raises(Crash):
        train(config, callbacks=[crash_after(3)])
    resumed = train(config, resume=True)
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(full.losses[step], abs=1e-6, rel=0)
    a, _ = read_lora_adapter(full.checkpoint / "lora")
    b, _ = read_lora_adapter(resumed.checkpoint / "lora")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the optimizer only ever saw adapter parameters
    optim = read_optimizer_state(full.checkpoint)
    assert optim["state"] and all(".lora_" in name for name in optim["state"])
    assert len(list_checkpoints(tmp_path / "full" / "run" / "checkpoints")) == 2


def test_bad_adapters_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no LoRA adapter"):
        read_lora_adapter(tmp_path)
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt LoRA adapter"):
        read_lora_adapter(tmp_path)


def _linear_names(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_target_presets_select_their_layers(tmp_path):
    from motif_video.train.config import LoraSection
    from motif_video.train.lora import add_lora

    def injected(targets):
        model = add_lora(MotifVideoTransformer.from_preset("motif-video-tiny"), LoraSection(target_modules=targets))
        return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_modules() if name.endswith(".lora_A")}

    model = MotifVideoTransformer.from_preset("motif-video-tiny")
    linear = _linear_names(model)
    head = {"proj_out", "norm_out.linear"}
    text = {n for n in linear if n.startswith(("context_embedder.", "image_embedder."))}
    modulation = {n for n in linear if n.startswith("time_text_embed.") or n.endswith(("norm1.linear",
                                                                                         "norm1_context.linear",
                                                                                         ".norm.linear"))}
    assert injected("all-linear") == linear
    assert injected("attention+mlp") == linear - head - text - modulation
    assert injected("attention") == injected(list(LoraSection().target_modules))
    assert "single_transformer_blocks.0.proj_out" in injected("attention+mlp") and "proj_out" not in injected(
        "attention+mlp")
    from motif_video.errors import ConfigError

    with pytest.raises(ConfigError, match="presets"):
        LoraSection(target_modules="everything").validate("lora")


def test_preset_adapter_loads_into_diffusers_and_ours(tmp_path):
    base = base_folder(tmp_path)
    cache = make_cache(tmp_path / "cache")
    config = build_config(tmp_path, cache, model={"pretrained": str(base)},
                          lora={"rank": RANK, "alpha": ALPHA, "target_modules": "all-linear"},
                          optim={"lr": 2e-2, "steps": 2}, checkpointing={"every": 2, "keep_last": 1})
    adapter_dir = train(config).checkpoint / "lora"
    tensors, header = read_lora_adapter(adapter_dir)
    assert {k.rsplit(".lora_", 1)[0] for k in tensors} == _linear_names(MotifVideoTransformer.from_pretrained(base))
    x, t, text, mask = inputs()
    reference = MotifVideoTransformer3DModel.from_pretrained(base).eval()
    reference.load_lora_adapter(str(adapter_dir), weight_name="pytorch_lora_weights.safetensors")
    ours = load_lora_adapter(MotifVideoTransformer.from_pretrained(base), adapter_dir).eval()
    merged = MotifVideoTransformer.from_pretrained(base).eval()
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." in key:
                params[key.replace(".lora_A.weight", ".weight")] += (ALPHA / RANK) * tensors[
                    key.replace(".lora_A.", ".lora_B.")] @ a
        expected = merged(x, t, text, mask)
        for got in (reference(x, t, text, mask, return_dict=False)[0], ours(x, t, text, mask)):
            assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
