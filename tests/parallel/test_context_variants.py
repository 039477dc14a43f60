"""Generation variants on 2 gloo processes with Ulysses 2 equal one process (final latents within 1e-5 of their
RMS): image-to-video, a LoRA adapter loaded before and after `apply_context_parallel`, and a Q8_0 GGUF
transformer. One spawn runs every case."""

import numpy as np
import pytest
import torch

from motif_video.convert.gguf import Q, GGUFLinear, write_gguf
from motif_video.pipeline.pipeline import MotifVideoPipeline
from motif_video.testing import save_tiny_pipeline
from tests.lora.test_lora import in_style, random_factors
from tests.parallel.helpers import spawn

SIZE = dict(height=32, width=48, num_frames=5)
TARGETS = {"transformer_blocks.0.attn.to_q": (4, 8.0), "transformer_blocks.0.attn.add_v_proj": (4, 8.0),
           "single_transformer_blocks.0.cross_attn.to_v": (4, 8.0), "single_transformer_blocks.2.proj_mlp": (4, 8.0)}


def first_frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (SIZE["height"], SIZE["width"], 3), dtype=np.uint8)


def generate(pipe, image=None) -> torch.Tensor:
    return pipe("a red ball rolls on grass", image=image, num_inference_steps=2,
                generator=torch.Generator().manual_seed(3), output_type="latent", progress=False, **SIZE)


def run_cases(model_dir, adapter, gguf, parallel: bool) -> dict:
    """Every case on this process; with `parallel`, under Ulysses over all processes."""
    def shard(pipe):
        if parallel:
            from motif_video.parallel import ContextGrid, GridShape, apply_context_parallel

            heads = pipe.transformer.config.num_attention_heads
            apply_context_parallel(pipe.transformer, ContextGrid(GridShape(ulysses=2), heads=heads))
        return pipe

    results = {}
    pipe = shard(MotifVideoPipeline.from_pretrained(model_dir, device="cpu"))
    results["image"] = generate(pipe, first_frame())
    pipe.load_lora_weights(adapter)  # after the sharding
    results["lora_after"] = generate(pipe)
    pipe = MotifVideoPipeline.from_pretrained(model_dir, device="cpu")
    pipe.load_lora_weights(adapter)  # before the sharding
    results["lora_before"] = generate(shard(pipe))
    pipe = MotifVideoPipeline.from_pretrained(model_dir, device="cpu", gguf=gguf)
    assert any(isinstance(m, GGUFLinear) for m in pipe.transformer.modules())
    results["gguf"] = generate(shard(pipe))
    return results


def run_parallel(rank, world, model_dir, adapter, gguf):
    return run_cases(model_dir, adapter, gguf, parallel=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("variants")
    model_dir = save_tiny_pipeline(folder / "model")
    transformer = MotifVideoPipeline.from_pretrained(model_dir, device="cpu").transformer
    (folder / "adapter").mkdir()
    adapter = in_style(random_factors(transformer, TARGETS, seed=1), "ours", folder / "adapter")
    gguf = write_gguf(transformer.state_dict(), folder / "tiny-q8.gguf", Q.Q8_0, progress=False)
    return str(model_dir), str(adapter), str(gguf)


def test_variants_on_two_processes_equal_one(files, tmp_path):
    reference = run_cases(*files, parallel=False)
    plain = generate(MotifVideoPipeline.from_pretrained(files[0], device="cpu"))
    # each variant moves the latents by more than the tolerance below (Q8_0 by ~1e-4 of their RMS), so a parallel
    # run that dropped the image, the adapter or the quantisation would fail
    for key in ("image", "lora_after", "gguf"):
        assert (reference[key] - plain).abs().max() > 5e-5 * plain.pow(2).mean().sqrt(), key
    assert torch.equal(reference["lora_after"], reference["lora_before"])
    ranks = spawn(run_parallel, 2, tmp_path, *files)
    for key, want in reference.items():
        rms = want.pow(2).mean().sqrt()
        for rank, results in enumerate(ranks):
            assert (results[key] - want).abs().max() <= 1e-5 * rms, (key, rank)
