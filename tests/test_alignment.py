"""REPA: projector, loss, grid resampling, and the DINOv2 / V-JEPA 2 teachers on tiny random transformers models."""

import json

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, VJEPA2Config, VJEPA2Model

from motif_video import MotifVideoTransformer
from motif_video.alignment import (Dinov2Teacher, RepaAligner, RepaProjector, VJEPA2Teacher, build_teacher,
                                   kept_at_block, resample_tokens)
from motif_video.errors import MotifVideoError
from motif_video.routing import RouteConfig, sample_route
from tests.conftest import randomize_

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def imagenet(pixels):
    """[-1, 1] (..., 3, H, W) with channels at dim -3 -> ImageNet-normalised: the reference for both teachers."""
    return ((pixels + 1) / 2 - MEAN[:, None, None]) / STD[:, None, None]


def manual_loss(projected, target):
    p = projected / projected.norm(dim=-1, keepdim=True)
    t = target / target.norm(dim=-1, keepdim=True)
    return -(p * t).sum(-1).mean()


def tiny_dinov2(registers=0):
    kw = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, patch_size=4,
              image_size=16)
    if registers:
        return Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)
    return Dinov2Config(**kw)


def tiny_vjepa2():
    return VJEPA2Config(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, crop_size=32, patch_size=8,
                        frames_per_clip=4, pred_hidden_size=16, pred_num_hidden_layers=1, pred_num_attention_heads=2)


def video(batch, frames, height, width, seed=0):
    return torch.rand(batch, 3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- projector and loss -------------------------------------------------------------------------------------------
def test_projector_layout():
    proj = RepaProjector(8, 12, projector_dim=16)
    linears = [m for m in proj if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 12)]
    assert [type(m) for m in proj] == [torch.nn.Linear, torch.nn.SiLU] * 2 + [torch.nn.Linear]
    assert proj(torch.randn(2, 5, 8)).shape == (2, 5, 12)


def test_loss_is_minus_one_for_identical_features_and_zero_for_random():
    torch.manual_seed(0)
    aligner = RepaAligner(8, 64, projector_dim=16)
    student = torch.randn(2, 24, 8)
    same = aligner.projector(student).detach() * 3.0  # cosine ignores scale
    assert aligner.loss(student, same, (2, 3, 4), (2, 3, 4)).item() == pytest.approx(-1.0, abs=1e-5)

    teacher = torch.randn(2, 24, 64)
    got = aligner.loss(student, teacher, (2, 3, 4), (2, 3, 4))
    torch.testing.assert_close(got, manual_loss(aligner.projector(student), teacher))
    big = RepaAligner(8, 512, projector_dim=16)
    random_loss = big.loss(torch.randn(4, 256, 8), torch.randn(4, 256, 512), (4, 8, 8), (4, 8, 8))
    assert abs(random_loss.item()) < 0.02


def test_projector_gets_gradients_teacher_none():
    torch.manual_seed(0)
    teacher = Dinov2Teacher(tiny_dinov2(), image_size=16)
    tokens, grid = teacher.encode(video(2, 1, 16, 16))
    assert not tokens.requires_grad
    aligner = RepaAligner(8, teacher.dim, projector_dim=16)
    student = torch.randn(2, 4, 8, requires_grad=True)
    aligner.loss(student, tokens, (1, 2, 2), grid).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligner.parameters())
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_loss_errors_on_mismatched_tokens():
    aligner = RepaAligner(8, 12, projector_dim=16)
    with pytest.raises(MotifVideoError, match="do not fill"):
        aligner.loss(torch.randn(1, 6, 8), torch.randn(1, 5, 12), (1, 2, 3), (1, 2, 3))
    with pytest.raises(MotifVideoError, match="do not match"):
        aligner.loss(torch.randn(1, 5, 8), torch.randn(1, 6, 12), (1, 2, 3), (1, 2, 3))


# -- resampling and kept tokens -----------------------------------------------------------------------------------
def test_resample_keeps_matching_grids_and_token_layout():
    tokens = torch.randn(2, 2 * 3 * 4, 5)
    assert torch.equal(resample_tokens(tokens, (2, 3, 4), (2, 3, 4)), tokens)

    # A field that varies only along t (value = frame index) must stay per-frame when h, w are resampled: this
    # pins the t-major (t, h, w) token order on both sides.
    frame_index = torch.arange(2.0).repeat_interleave(3 * 4)[None, :, None].expand(1, -1, 3)  # (1, 24, 3)
    up = resample_tokens(frame_index, (2, 3, 4), (2, 6, 5))
    torch.testing.assert_close(up, torch.arange(2.0).repeat_interleave(6 * 5)[None, :, None].expand(1, -1, 3))

    # An exact 2x downsample on every axis is the mean of each 2x2x2 cell.
    fine = torch.randn(1, 4 * 4 * 6, 3)
    cells = fine.reshape(1, 2, 2, 2, 2, 3, 2, 3).mean(dim=(2, 4, 6)).reshape(1, 2 * 2 * 3, 3)
    torch.testing.assert_close(resample_tokens(fine, (4, 4, 6), (2, 2, 3)), cells)


def test_kept_gathering_matches_manual_selection():
    torch.manual_seed(0)
    aligner = RepaAligner(8, 12, projector_dim=16)
    full_student = torch.randn(2, 24, 8)
    teacher = torch.randn(2, 6 * 8, 12)  # on a finer (1, 6, 8) grid than the student's (1, 4, 6)
    kept = torch.stack([torch.randperm(24)[:10].sort().values for _ in range(2)])
    student = torch.stack([full_student[b, kept[b]] for b in range(2)])  # what a routed capture_block returns
    target = resample_tokens(teacher, (1, 6, 8), (1, 4, 6))
    expected = manual_loss(aligner.projector(student), torch.stack([target[b, kept[b]] for b in range(2)]))
    torch.testing.assert_close(aligner.loss(student, teacher, (1, 4, 6), (1, 6, 8), kept=kept), expected)

    aligned = aligner.projector(full_student).detach()
    assert aligner.loss(student, aligned, (1, 4, 6), (1, 4, 6), kept=kept).item() == pytest.approx(-1, abs=1e-5)


def test_repa_through_a_routed_transformer():
    """capture_block inside a route returns kept tokens; the loss reaches the blocks up to the captured one only."""
    model = randomize_(MotifVideoTransformer.from_preset("motif-video-tiny", num_layers=2, num_single_layers=4))
    gen = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 33, 2, 4, 6, generator=gen), torch.randn(2, 5, 32, generator=gen)
    grid = (2, 2, 3)
    route = sample_route(RouteConfig(0.5, 1, 5), len(model.blocks), 2, 12, generator=gen)
    for block, tokens in [(0, 12), (1, 6), (4, 6), (5, 12)]:  # before, inside (first and last block), after
        _, captured = model(latents, torch.tensor([100.0, 900.0]), text, route=route, capture_block=block)
        kept = kept_at_block(route, block)
        assert captured.shape == (2, tokens, model.config.hidden_size)
        assert (kept is None) == (tokens == 12)
    assert kept_at_block(None, 2) is None
    _, captured = model(latents, torch.tensor([100.0, 900.0]), text, route=route, capture_block=2)
    aligner = RepaAligner(model.config.hidden_size, 24, projector_dim=16)
    aligner.loss(captured, torch.randn(2, 1 * 4 * 4, 24), grid, (1, 4, 4), kept=kept_at_block(route, 2)).backward()
    assert model.blocks[2].proj_out.weight.grad.abs().sum() > 0
    assert model.blocks[3].proj_out.weight.grad is None


# -- teachers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_teacher_is_per_frame_patch_tokens(registers):
    torch.manual_seed(0)
    teacher = Dinov2Teacher(tiny_dinov2(registers), image_size=16)
    teacher.train()
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    pixels = video(2, 3, 16, 20)  # short side already 16 and both sides multiples of 4: no resize
    tokens, grid = teacher.encode(pixels)
    assert grid == (3, 4, 5) and tokens.shape == (2, 3 * 4 * 5, 16)
    with torch.no_grad():
        for f in range(3):
            ref = teacher.model(pixel_values=imagenet(pixels[:, :, f])).last_hidden_state[:, 1 + registers:]
            torch.testing.assert_close(tokens[:, f * 20:(f + 1) * 20], ref)

    tokens, grid = teacher.encode(video(1, 1, 36, 64))  # resized: short side 16, long side 28.4 -> 28
    assert grid == (1, 4, 7) and tokens.shape == (1, 28, 16)


def test_vjepa2_teacher_square_clip_matches_the_model():
    torch.manual_seed(0)
    teacher = VJEPA2Teacher(tiny_vjepa2())
    assert teacher.dim == 24 and not teacher.training
    pixels = video(2, 4, 32, 32)
    tokens, grid = teacher.encode(pixels)
    assert grid == (2, 4, 4) and tokens.shape == (2, 32, 24) and not tokens.requires_grad
    with torch.no_grad():
        ref = teacher.model(pixel_values_videos=imagenet(pixels.transpose(1, 2)), skip_predictor=True)
    torch.testing.assert_close(tokens, ref.last_hidden_state)

    # An odd frame count repeats the last frame, so frame 4 lands in a tubelet instead of being dropped.
    odd = video(1, 3, 32, 32)
    tokens, grid = teacher.encode(odd)
    padded = torch.cat([odd, odd[:, :, -1:]], dim=2)
    with torch.no_grad():
        ref = teacher.model(pixel_values_videos=imagenet(padded.transpose(1, 2)), skip_predictor=True)
    assert grid == (2, 4, 4)
    torch.testing.assert_close(tokens, ref.last_hidden_state)


def test_vjepa2_teacher_tiles_wide_frames_with_square_crops():
    torch.manual_seed(0)
    teacher = VJEPA2Teacher(tiny_vjepa2())
    pixels = video(1, 2, 32, 56)  # short side = crop size; 7 token columns -> crops at columns 0 and 3
    tokens, grid = teacher.encode(pixels)
    assert grid == (1, 4, 7) and tokens.shape == (1, 28, 24)
    tokens = tokens.reshape(1, 4, 7, 24)
    with torch.no_grad():
        left, right = (teacher.model(pixel_values_videos=imagenet(pixels[..., c:c + 32].transpose(1, 2)),
                                     skip_predictor=True).last_hidden_state.reshape(1, 4, 4, 24)
                       for c in (0, 24))
    torch.testing.assert_close(tokens[:, :, :3], left[:, :, :3])
    torch.testing.assert_close(tokens[:, :, 4:], right[:, :, 1:])
    torch.testing.assert_close(tokens[:, :, 3], (left[:, :, 3] + right[:, :, 0]) / 2)

    tokens, grid = teacher.encode(video(1, 1, 90, 45))  # tall, resized to 64 x 32: two crops stacked
    assert grid == (1, 8, 4) and tokens.shape == (1, 32, 24)


def test_teachers_reject_wrong_inputs():
    with pytest.raises(MotifVideoError, match="vjepa2"):
        VJEPA2Teacher(tiny_dinov2())
    with pytest.raises(MotifVideoError, match="crop_size"):
        VJEPA2Teacher(tiny_vjepa2(), crop_size=64)
    with pytest.raises(MotifVideoError, match=r"\(B, 3, T, H, W\)"):
        Dinov2Teacher(tiny_dinov2()).encode(torch.zeros(1, 3, 16, 16))


def test_build_teacher_from_saved_folders(tmp_path):
    torch.manual_seed(0)
    Dinov2Model(tiny_dinov2()).save_pretrained(tmp_path / "dino")
    VJEPA2Model(tiny_vjepa2()).save_pretrained(tmp_path / "vjepa")
    dino = build_teacher(tmp_path / "dino", image_size=16)
    vjepa = build_teacher(tmp_path / "vjepa")
    assert isinstance(dino, Dinov2Teacher) and isinstance(vjepa, VJEPA2Teacher)
    assert dino.encode(video(1, 1, 16, 16))[0].shape == (1, 16, 16)
    assert vjepa.encode(video(1, 2, 32, 32))[0].shape == (1, 16, 24)

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(MotifVideoError, match="no REPA teacher"):
        build_teacher(tmp_path / "bert")
    with pytest.raises(MotifVideoError, match="not found"):
        build_teacher(tmp_path / "missing")
    with pytest.raises(MotifVideoError, match="V-JEPA 2 teacher needs"):
        VJEPA2Teacher.from_pretrained(tmp_path / "dino")
