"""GGUF: our torch dequantisers against gguf's numpy reference, loading against diffusers' own GGUF loader,
writing (quantize command), memory, and errors."""

import json

import gguf
import numpy as np
import pytest
import torch
from diffusers import GGUFQuantizationConfig, MotifVideoTransformer3DModel
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from motif_video import MotifVideoTransformer, preset
from motif_video.cli import main as cli_main
from motif_video.convert.gguf import (GGUFLinear, dequantize, model_nbytes, plan_types, planned_nbytes, read_gguf,
                                      write_gguf)
from motif_video.errors import CheckpointError, MotifVideoError
from tests.conftest import randomize_

# Byte offsets of the fp16 scale fields in each block type (gguf/quants.py layouts); random bytes there could be
# inf/NaN, everything else may be arbitrary.
F16_FIELDS = {
    Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}
K_QUANTS = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}


def random_blocks(qtype, rows=3, blocks_per_row=4, scale=1.0, seed=0) -> np.ndarray:
    """(rows, bytes) uint8 of random blocks with finite fp16 scales."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, blocks_per_row * type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    for offset in F16_FIELDS[qtype]:
        d = (rng.uniform(0.5, 2.0, (blocks.shape[0], 1)) * rng.choice([-1, 1], (blocks.shape[0], 1)) * scale)
        blocks[:, offset:offset + 2] = d.astype(np.float16).view(np.uint8)
    return raw


def tiny_config(**overrides):
    # hidden 64: every block Linear has rows that split into 32-value blocks
    return preset("motif-video-tiny", num_attention_heads=2, attention_head_dim=32, rope_axes_dim=(8, 12, 12),
                  text_embed_dim=64, **overrides)


def tiny_model(cfg, seed=0):
    return randomize_(MotifVideoTransformer(cfg), std=0.1, seed=seed).eval()


def tiny_inputs(cfg, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 2, 4, 6, generator=gen)
    t = torch.tensor([800.0, 30.0])
    text = torch.randn(2, 5, cfg.text_embed_dim, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    image = torch.randn(2, 3, cfg.image_embed_dim, generator=gen)
    return x, t, text, mask, image


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def save_config_folder(cfg, folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_diffusers_json()))
    return folder


# -- dequantisers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda t: t.name)
def test_dequantizer_matches_gguf_on_random_blocks(qtype):
    raw = random_blocks(qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    got = dequantize(torch.from_numpy(raw), qtype)
    assert got.shape == expected.shape and got.dtype == torch.float32
    if qtype in K_QUANTS:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16, Q.F16, Q.F32],
                         ids=lambda t: t.name)
def test_dequantizer_matches_gguf_on_quantized_data(qtype):
    data = np.random.default_rng(3).standard_normal((5, 96)).astype(np.float32)
    quantized = gguf.quants.quantize(data, qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(quantized, qtype))
    raw = np.ascontiguousarray(quantized).view(np.uint8)  # F16/F32 come back as floats: our input is always bytes
    got = dequantize(torch.from_numpy(raw), qtype)
    assert torch.equal(got, expected)
    assert (got - torch.from_numpy(data)).abs().max() < 0.5  # and it is the data, up to quantisation error


def test_dequantize_output_dtype_and_rows():
    raw = random_blocks(Q.Q6_K, rows=2, blocks_per_row=2)
    out = dequantize(torch.from_numpy(raw), Q.Q6_K, torch.bfloat16)
    assert out.shape == (2, 512) and out.dtype == torch.bfloat16


def test_unsupported_type_names_the_type():
    with pytest.raises(MotifVideoError, match="IQ4_XS.*supported: F32"):
        dequantize(torch.zeros(4, 136, dtype=torch.uint8), Q.IQ4_XS)


def test_file_with_unsupported_type_names_tensor_and_type(tmp_path):
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(path, "motif_video")
    writer.add_tensor("proj_out.weight", np.zeros((4, 136), np.uint8), raw_dtype=Q.IQ4_XS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MotifVideoError, match=r"proj_out\.weight uses GGML type IQ4_XS"):
        MotifVideoTransformer.from_single_file(path, tiny_config())


# -- the quantised linear ----------------------------------------------------------------------------------------
def test_gguf_linear_matches_dense_linear():
    raw = random_blocks(Q.Q4_K, rows=8, blocks_per_row=1, scale=1e-3)
    weight = torch.from_numpy(gguf.quants.dequantize(raw, Q.Q4_K))
    layer = GGUFLinear(256, 8, Q.Q4_K)
    layer.weight.copy_(torch.from_numpy(raw))
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, layer.bias), rtol=1e-5, atol=1e-6)
    assert list(layer.state_dict()) == ["weight", "bias"]
    layer.compute_dtype = torch.bfloat16
    assert layer(x).dtype == torch.bfloat16


# -- writing and loading -----------------------------------------------------------------------------------------
def test_q8_0_model_matches_fp32_model(tmp_path):
    cfg = tiny_config()
    model = tiny_model(cfg)
    path = write_gguf(model.state_dict(), tmp_path / "t.gguf", Q.Q8_0, config_json=cfg.to_diffusers_json(),
                      progress=False)
    loaded = MotifVideoTransformer.from_single_file(path, cfg).eval()
    quantised = {n for n, m in loaded.named_modules() if isinstance(m, GGUFLinear)}
    assert "transformer_blocks.0.attn.to_q" in quantised and "single_transformer_blocks.0.cross_attn.to_q" in quantised
    assert not any(n.startswith(("time_text_embed", "proj_out")) or ".norm" in n for n in quantised)
    assert list(loaded.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        expected = model(*tiny_inputs(cfg))
        got = loaded(*tiny_inputs(cfg))
    assert 0 < rel_err(got, expected) < 0.01


def test_f16_model_matches_the_fp32_model_to_fp16_rounding(tmp_path):
    """An F16 file (kept tensors F16 too) loaded for fp32 compute: its Linear weights stay 16-bit bytes and widen
    exactly, so it computes what the fp16-rounded model computes in fp32, within fp16 rounding of the fp32 model;
    every parameter is fp32 (docs/gguf.md). With compute_dtype fp16 it is a plain fp16 model."""
    cfg = tiny_config()
    model = tiny_model(cfg)
    path = write_gguf(model.state_dict(), tmp_path / "t.gguf", Q.F16, config_json=cfg.to_diffusers_json(),
                      progress=False)
    assert {t.qtype for t in read_gguf(path)[0].values()} == {Q.F16}
    rounded = tiny_model(cfg)
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    loaded = MotifVideoTransformer.from_single_file(path).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert {b.dtype for b in loaded.buffers()} == {torch.uint8}
    linears = [m for m in loaded.modules() if isinstance(m, (GGUFLinear, torch.nn.Linear))]
    assert linears and all(isinstance(m, GGUFLinear) and m.qtype == Q.F16 for m in linears)
    with torch.no_grad():
        got = loaded(*tiny_inputs(cfg))
        assert got.dtype == torch.float32
        assert torch.equal(got, rounded(*tiny_inputs(cfg)))
        assert 0 < rel_err(got, model(*tiny_inputs(cfg))) < 2e-3  # fp16 keeps 11 significant bits

    half = MotifVideoTransformer.from_single_file(path, compute_dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert not any(isinstance(m, GGUFLinear) for m in half.modules())
    assert all(torch.equal(half.state_dict()[k], v.half()) for k, v in model.state_dict().items())


def test_config_is_read_from_the_file(tmp_path):
    cfg = tiny_config()
    model = tiny_model(cfg)
    path = write_gguf(model.state_dict(), tmp_path / "t.gguf", Q.Q4_0, config_json=cfg.to_diffusers_json(),
                      progress=False)
    loaded = MotifVideoTransformer.from_single_file(path)
    assert loaded.config == cfg
    save_config_folder(cfg, tmp_path / "cfg")
    for config in (tmp_path / "cfg", cfg.to_dict()):  # a folder and a dict give the same model
        other = MotifVideoTransformer.from_single_file(path, config)
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), loaded.state_dict().values()))
    bare = write_gguf(model.state_dict(), tmp_path / "bare.gguf", Q.Q4_0, progress=False)
    with pytest.raises(CheckpointError, match="carries no transformer config"):
        MotifVideoTransformer.from_single_file(bare)


def mixed_gguf(cfg, model, path):
    """A file like the released ones: Q8_0 Linear weights, F32 elsewhere, and K-quant blocks (random bytes) in the
    layers whose rows hold 256 values; written with gguf's own writer, independent of ours."""
    k_types = iter([Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.Q2_K])
    writer = gguf.GGUFWriter(path, "motif_video")
    for i, (name, tensor) in enumerate(model.state_dict().items()):
        data = tensor.numpy()
        if name.endswith("ff.net.2.weight") or name.endswith("ff_context.net.2.weight"):
            qtype = next(k_types)
            raw = random_blocks(qtype, rows=data.shape[0], blocks_per_row=data.shape[1] // 256, scale=2e-4, seed=i)
            writer.add_tensor(name, raw, raw_dtype=qtype)
        elif data.ndim == 2 and data.shape[1] % 32 == 0 and ".norm" not in name:
            writer.add_tensor(name, gguf.quants.quantize(data, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def diffusers_from_numpy_dequant(cfg, path):
    """diffusers' model holding the file's weights as dequantised by gguf's numpy reference (float32 arithmetic)."""
    ours_only = ("cross_attention_form", "cross_attention_query_bias")
    ref = MotifVideoTransformer3DModel(**{k: v for k, v in cfg.to_dict().items() if k not in ours_only})
    state_dict = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        state_dict[t.name] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).copy())
    ref.load_state_dict(state_dict, strict=True)
    return ref.eval()


def assert_matches_diffusers(cfg, path, folder):
    """Ours vs diffusers' model on gguf's float32 dequantisation (1e-4) and vs diffusers' own GGUF loader.

    diffusers' loader dequantises in fp16 arithmetic (scale * quant, + min, rounded to 11 bits before the cast to
    compute_dtype), which puts it ~2.5e-4 from the float32 reference that ours reproduces exactly; hence 1e-3 there.
    """
    ours = MotifVideoTransformer.from_single_file(path, folder).eval()
    exact = diffusers_from_numpy_dequant(cfg, path)
    loader = MotifVideoTransformer3DModel.from_single_file(
        str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=str(folder)).eval()
    assert any(type(m).__name__ == "GGUFLinear" for m in loader.modules())  # diffusers really kept it quantised
    x, t, text, mask, image = tiny_inputs(cfg)
    with torch.no_grad():
        got = ours(x, t, text, mask, image)
        assert rel_err(got, exact(x, t, text, mask, image, return_dict=False)[0]) < 1e-4
        assert rel_err(got, loader(x, t, text, mask, image, return_dict=False)[0]) < 1e-3


def test_matches_diffusers_on_k_quant_file(tmp_path):
    # mlp hidden 4 * 64 = 256: the feed-forward output layers can hold K-quant blocks
    cfg = tiny_config(num_layers=2)
    path = mixed_gguf(cfg, tiny_model(cfg), tmp_path / "mixed.gguf")
    types = {t.qtype for t in read_gguf(path)[0].values()}
    assert {Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.F32} <= types
    assert_matches_diffusers(cfg, path, save_config_folder(cfg, tmp_path / "cfg"))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_1, Q.Q4_0, Q.BF16], ids=lambda t: t.name)
def test_matches_diffusers_on_our_files(tmp_path, qtype):
    cfg = tiny_config()
    path = write_gguf(tiny_model(cfg).state_dict(), tmp_path / "t.gguf", qtype, config_json=cfg.to_diffusers_json(),
                      quantize_modulation=True, keep_dtype=Q.F32, progress=False)
    assert_matches_diffusers(cfg, path, save_config_folder(cfg, tmp_path / "cfg"))


def test_memory_is_the_quantised_size(tmp_path):
    cfg = tiny_config()
    model = tiny_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fp32 = model_nbytes(model)
    for qtype, modulation in [(Q.Q4_0, True), (Q.Q8_0, False), (Q.F16, False)]:
        path = write_gguf(model.state_dict(), tmp_path / f"{qtype.name}.gguf", qtype, progress=False,
                          config_json=cfg.to_diffusers_json(), quantize_modulation=modulation)
        loaded = MotifVideoTransformer.from_single_file(path)
        plan = plan_types(shapes, qtype, quantize_modulation=modulation)
        # F16 tensors outside the quantised linears (norms, biases, the patch conv, the timestep MLP's first layer)
        # are widened to the fp32 compute dtype; everything else stays as the file's bytes
        in_blocks = {f"{n}.weight" for n, m in loaded.named_modules() if isinstance(m, GGUFLinear)}
        widened = sum(int(np.prod(s)) * 2 for k, s in shapes.items() if plan[k] == Q.F16 and k not in in_blocks)
        file_bytes = planned_nbytes(shapes, plan)
        assert file_bytes == sum(t.raw.numel() for t in read_gguf(path)[0].values())
        assert model_nbytes(loaded) == file_bytes + widened
    q4 = MotifVideoTransformer.from_single_file(tmp_path / "Q4_0.gguf")
    block = q4.transformer_blocks[0].ff.net[2]
    assert block.weight.dtype == torch.uint8 and block.weight.numel() == 64 * 256 // 32 * 18
    assert model_nbytes(q4) < 0.35 * fp32


def test_plan_keeps_sensitive_tensors():
    with torch.device("meta"):
        model = MotifVideoTransformer(preset("motif-video-2b"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = plan_types(shapes, Q.Q8_0)
    assert plan["transformer_blocks.0.attn.to_q.weight"] == Q.Q8_0
    assert plan["single_transformer_blocks.3.proj_out.weight"] == Q.Q8_0
    for kept in ("transformer_blocks.0.norm1.linear.weight", "single_transformer_blocks.0.norm.linear.weight",
                 "norm_out.linear.weight", "x_embedder.proj.weight", "proj_out.weight",
                 "time_text_embed.timestep_embedder.linear_1.weight", "transformer_blocks.0.attn.to_q.bias",
                 "transformer_blocks.0.attn.norm_q.weight"):
        assert plan[kept] == Q.F32, kept
    assert plan_types(shapes, Q.Q8_0, quantize_modulation=True)["norm_out.linear.weight"] == Q.Q8_0
    assert plan_types(shapes, Q.BF16)["transformer_blocks.0.attn.to_q.bias"] == Q.F16
    # the odd-row rule: an image projection of width 24 cannot be cut into 32-value blocks
    assert plan_types({"image_embedder.linear_1.weight": (24, 24)}, Q.Q4_0)["image_embedder.linear_1.weight"] == Q.F32


# -- errors --------------------------------------------------------------------------------------------------------
@pytest.fixture
def q8_file(tmp_path):
    cfg = tiny_config()
    return write_gguf(tiny_model(cfg).state_dict(), tmp_path / "t.gguf", Q.Q8_0,
                      config_json=cfg.to_diffusers_json(), progress=False), cfg


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_file_is_one_checkpoint_error(q8_file, keep, tmp_path):
    path, cfg = q8_file
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="corrupt or truncated GGUF file .*cut.gguf") as e:
        MotifVideoTransformer.from_single_file(cut, cfg)
    assert "\n" not in str(e.value)


def test_not_a_gguf_file_and_missing_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file" * 10)
    with pytest.raises(CheckpointError, match="bad.gguf"):
        MotifVideoTransformer.from_single_file(bad, "motif-video-tiny")
    with pytest.raises(CheckpointError, match="not found"):
        MotifVideoTransformer.from_single_file(tmp_path / "none.gguf", "motif-video-tiny")


def test_config_mismatch_is_checkpoint_error(q8_file):
    path, cfg = q8_file
    with pytest.raises(CheckpointError, match="missing"):  # one more dual block than the file has
        MotifVideoTransformer.from_single_file(path, cfg.replace(num_layers=2))
    with pytest.raises(CheckpointError, match="unexpected"):
        MotifVideoTransformer.from_single_file(path, cfg.replace(image_embed_dim=None))
    with pytest.raises(CheckpointError, match="context_embedder.linear_1.weight has shape"):
        MotifVideoTransformer.from_single_file(path, cfg.replace(text_embed_dim=96))


# -- the quantize command ----------------------------------------------------------------------------------------
def test_quantize_command(tmp_path, capsys):
    cfg = tiny_config()
    model = tiny_model(cfg)
    model.save_pretrained(tmp_path / "model" / "transformer")
    out = tmp_path / "out.gguf"
    assert cli_main(["quantize", str(tmp_path / "model"), str(out), "--type", "q8_0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "KiB" in printed and "Q8_0" in printed
    tensors, metadata = read_gguf(out)
    assert metadata["general.architecture"] == "motif_video"
    assert tensors["transformer_blocks.0.attn.to_q.weight"].qtype == Q.Q8_0
    assert tensors["transformer_blocks.0.norm1.linear.weight"].qtype == Q.F32
    with torch.no_grad():
        got = MotifVideoTransformer.from_single_file(out).eval()(*tiny_inputs(cfg))
        assert rel_err(got, model(*tiny_inputs(cfg))) < 0.01
    # the transformer folder itself, and f16 with its kept tensors in F16
    assert cli_main(["quantize", str(tmp_path / "model" / "transformer"), str(tmp_path / "h.gguf"), "--type", "bf16",
                     "--no-progress"]) == 0
    tensors, _ = read_gguf(tmp_path / "h.gguf")
    assert tensors["transformer_blocks.0.attn.to_q.weight"].qtype == Q.BF16
    assert tensors["transformer_blocks.0.attn.to_q.bias"].qtype == Q.F16


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/missing", "{tmp}/o.gguf", "--type", "q4_0"], "model folder not found"),
    (["{tmp}", "{tmp}/o.gguf", "--type", "q4_0"], "no config.json"),
    (["{model}", "{tmp}", "--type", "q4_0"], "is a folder"),
    (["{model}", "{tmp}/o.bin", "--type", "q4_0"], "should end in .gguf"),
])
def test_quantize_command_bad_input(tmp_path, capsys, argv, message):
    tiny_model(tiny_config()).save_pretrained(tmp_path / "model")
    argv = [a.format(tmp=tmp_path, model=tmp_path / "model") for a in argv]
    assert cli_main(["quantize", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
