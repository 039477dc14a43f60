"""LoRA through the pipeline and `generate --lora`: the same video as a pipeline whose transformer weights were
merged by hand, with offloading and encoder reuse on; bad adapters fail as one line before anything is written."""

import numpy as np
import pytest
import torch
from PIL import Image

from motif_video.cli import main as cli_main
from motif_video.pipeline.pipeline import MotifVideoPipeline
from motif_video.testing import save_tiny_pipeline
from tests.lora.test_lora import hand_merged, in_style, random_factors

SIZE = dict(height=32, width=32, num_frames=9)
FIRST = {"transformer_blocks.0.attn.to_q": (4, 8.0), "transformer_blocks.0.attn.add_v_proj": (4, 8.0),
         "single_transformer_blocks.0.cross_attn.to_v": (4, 8.0), "single_transformer_blocks.2.proj_mlp": (4, 8.0)}
SECOND = {"transformer_blocks.0.attn.to_q": (2, 1.0), "single_transformer_blocks.1.attn.to_k": (2, 1.0)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", shift=15.0, guidance_scale=4.0)


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    transformer = MotifVideoPipeline.from_pretrained(model_dir, device="cpu").transformer
    first, second = random_factors(transformer, FIRST, seed=1), random_factors(transformer, SECOND, seed=2)
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    return (first, in_style(first, "ours", folder / "a")), (second, in_style(second, "comfyui", folder / "b"))


def merged_pipe(model_dir, adapters, weights):
    pipe = MotifVideoPipeline.from_pretrained(model_dir, device="cpu")
    pipe.transformer = hand_merged(pipe.transformer, *[(f, w) for (f, _), w in zip(adapters, weights)])
    return pipe


def test_offload_and_encoder_reuse_with_two_adapters_equal_merged_weights(model_dir, adapters):
    kwargs = dict(prompt="a red square moving up", num_inference_steps=4, encoder_reuse=2, output_type="latent",
                  progress=False, **SIZE)
    pipe = MotifVideoPipeline.from_pretrained(model_dir, device="cpu", offload=True)
    plain = pipe(generator=torch.Generator().manual_seed(0), **kwargs)
    for name, (_, path) in zip(("a", "b"), adapters):
        pipe.load_lora_weights(path, adapter_name=name)
    pipe.set_adapters(["a", "b"], [0.5, 2.0])
    got = pipe(generator=torch.Generator().manual_seed(0), **kwargs)
    expected = merged_pipe(model_dir, adapters, [0.5, 2.0])(generator=torch.Generator().manual_seed(0), **kwargs)
    assert (got - plain).abs().max() > 1e-3
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    pipe.unload_lora_weights()
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **kwargs), plain)


def test_cli_lora_options_give_the_merged_video(model_dir, adapters, tmp_path, capsys):
    (_, first), (_, second) = adapters
    out = tmp_path / "frames"
    code = cli_main(["generate", "a green triangle moving left", "-o", str(out), "--model", str(model_dir),
                     "--height", "32", "--width", "32", "--frames", "9", "--steps", "2", "--seed", "3", "--quiet",
                     "--lora", f"{first}:0.5", "--lora", str(second)])
    assert code == 0, capsys.readouterr().err
    frames = np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("frame_*.png"))]).astype(int)
    expected = merged_pipe(model_dir, adapters, [0.5, 1.0])(
        "a green triangle moving left", num_inference_steps=2, generator=torch.Generator().manual_seed(3),
        progress=False, **SIZE)[0]
    assert frames.shape == (9, 32, 32, 3)
    assert np.abs(frames - (expected * 255).round()).max() <= 1


@pytest.mark.parametrize("spec, message", [
    ("MISSING:0.5", "no LoRA adapter at"),
    ("CORRUPT", "corrupt LoRA adapter"),
    ("FOREIGN", "matches no layer of this model"),
])
def test_cli_bad_lora_is_one_line_and_writes_nothing(model_dir, tmp_path, capsys, spec, message):
    from safetensors.torch import save_file

    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    save_file({"transformer.transformer_blocks.5.attn.to_q.lora_A.weight": torch.zeros(2, 32),
               "transformer.transformer_blocks.5.attn.to_q.lora_B.weight": torch.zeros(32, 2)},
              str(tmp_path / "foreign.safetensors"))
    spec = spec.replace("MISSING", str(tmp_path / "missing")).replace(
        "CORRUPT", str(tmp_path / "corrupt.safetensors")).replace("FOREIGN", str(tmp_path / "foreign.safetensors"))
    out = tmp_path / "out.mp4"
    assert cli_main(["generate", "a red square", "-o", str(out), "--model", str(model_dir), "--steps", "1",
                     "--quiet", "--lora", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and message in err
    assert not out.exists()
