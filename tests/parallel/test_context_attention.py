"""Context-parallel forward passes on 4 gloo processes equal one process: Ulysses, ring, both, with padding; the
grid's groups (from its device mesh) follow the documented rank layout and FSDP's mesh spans every process."""

import torch

from motif_video.model.transformer import MotifVideoTransformer
from motif_video.routing import TokenRoute
from tests.parallel.helpers import spawn

# (ulysses, ring, data) grids over 4 processes; the data dimension runs the same clip on each of its groups
GRIDS = [(4, 1, 1), (1, 4, 1), (2, 2, 1), (2, 1, 2), (1, 2, 2), (1, 1, 4)]


def tiny_model(**overrides) -> MotifVideoTransformer:
    torch.manual_seed(0)
    model = MotifVideoTransformer.from_preset(
        "motif-video-tiny", num_attention_heads=4, attention_head_dim=16, num_layers=2, num_single_layers=3,
        enable_text_cross_attention_dual=True, cross_attention_form="tied", **overrides)
    with torch.no_grad():
        for p in model.parameters():  # every parameter random: zero-initialised ones would hide nothing
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def inputs(frames=3, height=4, width=6):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 33, frames, height, width, generator=gen)
    text = torch.randn(2, 5, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    image = torch.randn(2, 3, 24, generator=gen)
    return latents, torch.tensor([700.0, 300.0]), text, mask, image


def forwards(model):
    latents, t, text, mask, image = inputs()
    num_tokens = 3 * 2 * 3  # 18: not divisible by 4, so the last chunk is padding
    route = TokenRoute(1, 4, torch.stack([torch.arange(0, 18, 2), torch.arange(1, 18, 2)]))
    with torch.no_grad():
        plain = model(latents, t, text, mask, image)
        routed, captured = model(latents, t, text, mask, image, route=route, capture_block=2)
    return {"plain": plain, "routed": routed, "captured": captured, "tokens": num_tokens}


def run_grids(rank, world):
    import torch.distributed as dist

    from motif_video.parallel import ContextGrid, GridShape, apply_context_parallel
    from motif_video.train.parallel import fsdp_mesh

    results = {}
    for u, r, d in GRIDS:
        model = tiny_model()
        grid = ContextGrid(GridShape(ulysses=u, ring=r, data=d), heads=4)
        apply_context_parallel(model, grid)
        results[(u, r, d)] = forwards(model)
        results[(u, r, d)]["place"] = (grid.data_rank, grid.ring_rank, grid.ulysses_rank, grid.sequence_rank)
        results[(u, r, d)]["groups"] = {
            name: dist.get_process_group_ranks(getattr(grid, f"{name}_group"))
            for name in ("ulysses", "ring", "sequence")}
        results[(u, r, d)]["fsdp"] = dist.get_process_group_ranks(fsdp_mesh(grid).get_group())
    return results


def expected_place(rank, u, r):
    """The grid's documented layout: rank = (d * R + r) * U + u, sequence chunk r * U + u."""
    d, rest = divmod(rank, r * u)
    ring, uly = divmod(rest, u)
    groups = {"ulysses": [(d * r + ring) * u + x for x in range(u)],
              "ring": [(d * r + x) * u + uly for x in range(r)],
              "sequence": [d * r * u + x for x in range(r * u)]}
    return (d, ring, uly, ring * u + uly), groups


def test_four_processes_equal_one(tmp_path):
    reference = forwards(tiny_model())
    ranks = spawn(run_grids, 4, tmp_path)
    for grid in GRIDS:
        for rank, results in enumerate(ranks):
            place, groups = expected_place(rank, grid[0], grid[1])
            assert results[grid]["place"] == place and results[grid]["groups"] == groups, (grid, rank)
            assert results[grid]["fsdp"] == [0, 1, 2, 3]  # FSDP shards over every process of the grid
            for key in ("plain", "routed", "captured"):
                got, want = results[grid][key], reference[key]
                rms = want.pow(2).mean().sqrt()
                assert (got - want).abs().max() <= 1e-5 * rms, (grid, rank, key)
