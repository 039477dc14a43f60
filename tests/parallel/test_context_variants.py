"""Generation variants on 2 gloo processes equal one process (final latents within 1e-5 of their RMS) under each
two-process grid, Ulysses 2, ring 2 and CFG-parallel: image-to-video, a LoRA adapter (loaded after the Ulysses
sharding, and before the ring and CFG-parallel ones) and a Q8_0 GGUF transformer. One spawn runs every case, each
pipeline loaded once and moved from grid to grid."""

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
GRIDS = {"cfg": dict(cfg=2), "ring": dict(ring=2), "ulysses": dict(ulysses=2)}  # the LoRA loads under the last


def first_frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (SIZE["height"], SIZE["width"], 3), dtype=np.uint8)


def generate(pipe, image=None) -> torch.Tensor:
    return pipe("a red ball rolls on grass", image=image, num_inference_steps=2,
                generator=torch.Generator().manual_seed(3), output_type="latent", progress=False, **SIZE)


def on_grid(pipe, grid) -> MotifVideoPipeline:
    """`pipe` run on `grid` (None: this process alone), whatever grid it ran on before."""
    from motif_video.model.backends import attention_backends, set_attention_backend
    from motif_video.model.sharding import set_sequence_sharding
    from motif_video.parallel import ContextParallelAttention, apply_context_parallel
    from motif_video.parallel.guidance import ParallelGuidanceBranches

    backend = attention_backends(pipe.transformer)[0]
    if isinstance(backend, ContextParallelAttention):
        set_attention_backend(pipe.transformer, backend.inner)
    set_sequence_sharding(pipe.transformer, None)
    pipe.guidance_branches = None
    if grid is not None:
        apply_context_parallel(pipe.transformer, grid)
        if grid.shape.cfg == 2:
            pipe.guidance_branches = ParallelGuidanceBranches(grid)
    return pipe


def run_cases(model_dir, adapter, gguf, parallel: bool) -> dict:
    """{(grid, case): latents}: every case on this process alone (grid "one"), or under each of GRIDS."""
    from motif_video.parallel import ContextGrid, GridShape

    grids = {"one": None}
    if parallel:
        heads = MotifVideoPipeline.from_pretrained(model_dir, device="cpu").transformer.config.num_attention_heads
        grids = {name: ContextGrid(GridShape(**shape), heads=heads) for name, shape in GRIDS.items()}
    results = {}
    pipe = MotifVideoPipeline.from_pretrained(model_dir, device="cpu")
    for name, grid in grids.items():
        results[name, "image"] = generate(on_grid(pipe, grid), first_frame())
    pipe.load_lora_weights(adapter)  # after the last grid's sharding
    for name, grid in reversed(grids.items()):
        results[name, "lora"] = generate(on_grid(pipe, grid))
    pipe = MotifVideoPipeline.from_pretrained(model_dir, device="cpu", gguf=gguf)
    assert any(isinstance(m, GGUFLinear) for m in pipe.transformer.modules())
    for name, grid in grids.items():
        results[name, "gguf"] = generate(on_grid(pipe, grid))
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
    pipe = MotifVideoPipeline.from_pretrained(files[0], device="cpu")
    assert pipe.defaults.guidance_scale != 1.0  # two guidance branches: CFG-parallel has something to split
    plain = generate(pipe)
    # each variant moves the latents by more than the tolerance below (Q8_0 by ~1e-4 of their RMS), so a parallel
    # run that dropped the image, the adapter or the quantisation would fail
    for key in reference:
        assert (reference[key] - plain).abs().max() > 5e-5 * plain.pow(2).mean().sqrt(), key
    ranks = spawn(run_parallel, 2, tmp_path, *files)
    assert sorted(ranks[0]) == sorted((grid, case) for grid in GRIDS for _, case in reference)
    for (grid, case), got in ranks[0].items():
        want = reference["one", case]
        rms = want.pow(2).mean().sqrt()
        for rank, results in enumerate(ranks):
            assert (results[grid, case] - want).abs().max() <= 1e-5 * rms, (grid, case, rank)
