"""Generation with the shipped nano model on 4 gloo processes equals one process: Ulysses x ring, CFG-parallel
with Ulysses and with ring, and a token count the grid does not divide (padding). Encoder reuse is on (the nano
model's default at 3 steps refreshes the encoder on step 0 only)."""

import torch

from tests.parallel.helpers import spawn

# (ulysses, ring, cfg) over 4 processes
GRIDS = {(2, 2, 1): "padded", (2, 1, 2): "even", (1, 2, 2): "padded"}  # -> the clip size each runs
SIZES = {"even": dict(height=64, width=64, num_frames=5), "padded": dict(height=48, width=80, num_frames=5)}


def nano_pipeline():
    from motif_video.commands.generate import DEFAULT_MODEL_DIR
    from motif_video.pipeline.pipeline import MotifVideoPipeline

    return MotifVideoPipeline.from_pretrained(DEFAULT_MODEL_DIR, device="cpu")


def generate(pipe, size: str) -> torch.Tensor:
    return pipe("a red ball rolls on grass", num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                output_type="latent", progress=False, **SIZES[size])


def run_grids(rank, world):
    from motif_video.model.backends import set_attention_backend
    from motif_video.model.sharding import set_sequence_sharding
    from motif_video.parallel import ContextGrid, GridShape, apply_context_parallel
    from motif_video.parallel.guidance import ParallelGuidanceBranches

    pipe = nano_pipeline()
    results = {}
    for (u, r, c), size in GRIDS.items():
        grid = ContextGrid(GridShape(ulysses=u, ring=r, cfg=c), heads=pipe.transformer.config.num_attention_heads)
        set_attention_backend(pipe.transformer, "sdpa")
        set_sequence_sharding(pipe.transformer, None)
        apply_context_parallel(pipe.transformer, grid)
        pipe.guidance_branches = ParallelGuidanceBranches(grid) if c == 2 else None
        results[(u, r, c, size)] = generate(pipe, size)
    return results


def test_nano_generation_on_four_processes_equals_one(tmp_path):
    pipe = nano_pipeline()
    grid_tokens = [pipe.codec.latent_shape(s["num_frames"], s["height"], s["width"]) for s in SIZES.values()]
    tokens = [t * (h // 2) * (w // 2) for t, h, w in grid_tokens]
    assert tokens[0] % 4 == 0 and tokens[1] % 4 != 0  # the padded size really pads
    reference = {size: generate(pipe, size) for size in SIZES}
    ranks = spawn(run_grids, 4, tmp_path)
    assert len(ranks[0]) == len(GRIDS)
    for key in ranks[0]:
        want = reference[key[-1]]
        rms = want.pow(2).mean().sqrt()
        for rank, results in enumerate(ranks):
            assert (results[key] - want).abs().max() <= 1e-5 * rms, (key, rank)
