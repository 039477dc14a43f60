"""Rectified flow matching, timestep sampling, CFG dropout, TREAD routing and the REPA term of the objective."""

import math

import pytest
import torch
import torch.nn as nn

from motif_video import MotifVideoTransformer
from motif_video.alignment import RepaAligner
from motif_video.routing import RouteConfig
from motif_video.train.cached import CachedLatentDataset, collate
from motif_video.train.config import AlignmentSection, ObjectiveSection
from motif_video.train.objective import FlowMatchingObjective, TrainModule, shift_timesteps
from tests.conftest import randomize_
from tests.train.engine_helpers import TEXT_DIM, make_cache, one_thread  # noqa: F401


class Probe(nn.Module):
    """Records what the objective feeds the model and answers with a zero velocity."""

    def forward(self, hidden_states, timestep, text, text_mask, *, route=None, teacher=None, teacher_grid=None,
                student_grid=None):
        self.seen = dict(hidden=hidden_states, timestep=timestep, text=text, mask=text_mask, route=route)
        return torch.zeros_like(hidden_states[:, :16]), None


def objective(**kwargs):
    section = ObjectiveSection(**{k: kwargs.pop(k) for k in list(kwargs) if k in ObjectiveSection.__annotations__})
    kwargs.setdefault("empty_prompt", None)
    return FlowMatchingObjective(section, seed=kwargs.pop("seed", 0), patch_size=(1, 2, 2), num_blocks=4,
                                 text_dim=TEXT_DIM, **kwargs)


@pytest.fixture
def batch(tmp_path):
    dataset = CachedLatentDataset(make_cache(tmp_path / "cache", n_images=0, n_videos=3))
    return collate([dataset[i] for i in range(3)])


def test_shift_formula():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_timesteps(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(shift_timesteps(t, 1.0), t)


@pytest.mark.parametrize("mean, std, shift", [(0.0, 1.0, 1.0), (-0.5, 0.8, 2.5)])
def test_timesteps_follow_a_shifted_logit_normal(mean, std, shift):
    obj = objective(logit_mean=mean, logit_std=std, shift=shift)
    samples = torch.stack([obj.sample_t(torch.Generator().manual_seed(i)) for i in range(3000)]).sort().values

    def cdf(x):  # P(T <= x): undo the shift, then the logistic, then the normal CDF
        u = x / (shift - (shift - 1) * x)
        return 0.5 * (1 + math.erf((math.log(u / (1 - u)) - mean) / (std * math.sqrt(2))))

    empirical = (torch.arange(1, 3001) / 3000.0)
    ks = max(abs(empirical[i].item() - cdf(samples[i].item())) for i in range(0, 3000, 7))
    assert ks < 0.03  # Kolmogorov-Smirnov distance; 1.36/sqrt(3000) = 0.025 is the 95% band


def test_inputs_and_target_are_rectified_flow(batch):
    obj = objective(text_dropout=0.0)
    probe = Probe()
    out = obj(probe, batch, step=5, sample_ids=[0, 1, 2], device=torch.device("cpu"))
    seen = probe.seen
    x0 = batch["latents"]
    t = (seen["timestep"] / 1000).view(-1, 1, 1, 1, 1)
    assert ((t > 0) & (t < 1)).all()
    x_t = seen["hidden"][:, :16]
    assert torch.equal(seen["hidden"][:, 16:], torch.zeros_like(seen["hidden"][:, 16:]))  # T2V: no condition
    eps = (x_t - (1 - t) * x0) / t  # x_t = (1 - t) x0 + t eps
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1) < 0.1
    # zero velocity: the loss is the mean square of the target eps - x0
    assert out.loss.item() == pytest.approx(((eps - x0) ** 2).mean().item(), rel=1e-4)
    assert out.tokens == 3 * 2 * 2 * 2
    assert torch.equal(seen["text"][:, :3], batch["text"][:, :3])


def test_image_to_video_inputs_condition_on_the_clean_first_frame(batch):
    """What image-to-video training feeds the model: the clip's clean first latent frame in the condition channels
    and mask 1 on frame 0, as generation builds it from the given image (latents.model_input)."""
    obj = objective()
    x0 = batch["latents"]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.5, 0.9])
    hidden, timestep = obj.model_inputs(x0, eps, t, image_to_video=True)
    tb = t.view(-1, 1, 1, 1, 1)
    expected = torch.zeros(x0.shape[0], 33, *x0.shape[2:])
    expected[:, :16] = (1 - tb) * x0 + tb * eps
    expected[:, 16:32, 0] = x0[:, :, 0]
    expected[:, 32, 0] = 1.0
    assert torch.allclose(hidden, expected, atol=1e-6)
    assert torch.equal(timestep, 1000 * t)
    plain, _ = obj.model_inputs(x0, eps, t)
    assert torch.equal(plain[:, :16], hidden[:, :16]) and not plain[:, 16:].any()


def test_a_sample_draws_the_same_noise_wherever_it_sits(batch):
    """Per-sample generators keyed by (step, global position): what makes 2 ranks equal 1 and resumes exact."""
    obj = objective(text_dropout=0.5)
    probe = Probe()
    obj(probe, batch, step=7, sample_ids=[0, 1, 2], device=torch.device("cpu"))
    together = probe.seen
    part = {k: (v[2:] if torch.is_tensor(v) else v) for k, v in batch.items()}
    obj(probe, part, step=7, sample_ids=[2], device=torch.device("cpu"))
    assert torch.equal(probe.seen["hidden"], together["hidden"][2:])
    assert torch.equal(probe.seen["timestep"], together["timestep"][2:])
    obj(probe, batch, step=8, sample_ids=[0, 1, 2], device=torch.device("cpu"))
    assert not torch.equal(probe.seen["hidden"], together["hidden"])


def test_cfg_dropout_trains_with_the_empty_prompt(batch):
    empty = (torch.randn(2, TEXT_DIM), torch.tensor([True, True]))
    probe = Probe()
    objective(text_dropout=1.0, empty_prompt=empty)(probe, batch, 1, [0, 1, 2], torch.device("cpu"))
    assert torch.equal(probe.seen["text"], empty[0].expand(3, -1, -1))
    # without a cached empty prompt: one zero token, kept (a fully masked prompt would give NaN attention)
    objective(text_dropout=1.0)(probe, batch, 1, [0, 1, 2], torch.device("cpu"))
    assert torch.equal(probe.seen["text"], torch.zeros(3, 1, TEXT_DIM))
    assert probe.seen["mask"].all()
    # the dropped fraction matches p
    obj, dropped = objective(text_dropout=0.3, empty_prompt=empty), 0
    for step in range(200):
        obj(probe, batch, step, [0, 1, 2], torch.device("cpu"))
        dropped += sum(torch.equal(probe.seen["text"][i, :2], empty[0]) for i in range(3))
    assert dropped / 600 == pytest.approx(0.3, abs=0.06)


def tiny_module(**overrides):
    model = randomize_(MotifVideoTransformer.from_preset("motif-video-tiny", image_embed_dim=None, **overrides),
                       std=0.1)
    return TrainModule(model)


def test_selection_ratio_zero_equals_the_unrouted_loss_exactly(batch):
    module = tiny_module()
    plain = objective()(module, batch, 3, [0, 1, 2], torch.device("cpu"))
    zero = objective(route=RouteConfig(0.0, 1, 3))(module, batch, 3, [0, 1, 2], torch.device("cpu"))
    assert zero.loss.item() == plain.loss.item()
    routed = objective(route=RouteConfig(0.5, 1, 3))(module, batch, 3, [0, 1, 2], torch.device("cpu"))
    assert math.isfinite(routed.loss.item()) and routed.loss.item() != plain.loss.item()


def test_routes_are_per_sample_and_leave_the_noise_alone(batch):
    probe = Probe()
    objective()(probe, batch, 4, [0, 1, 2], torch.device("cpu"))
    unrouted = probe.seen
    objective(route=RouteConfig(0.5, 1, 3))(probe, batch, 4, [0, 1, 2], torch.device("cpu"))
    route = probe.seen["route"]
    assert torch.equal(probe.seen["hidden"], unrouted["hidden"])  # routing draws from its own stream
    assert (route.start_layer, route.end_layer) == (1, 3)
    assert route.kept.shape == (3, 4)  # 8 tokens, half kept
    assert (route.kept.diff(dim=1) > 0).all()  # sorted, distinct
    assert len({tuple(k.tolist()) for k in route.kept}) > 1  # a fresh subset per sample


class RecordingAligner(RepaAligner):
    def loss(self, student_tokens, teacher_tokens, student_grid, teacher_grid, kept=None):
        self.kept = kept
        return super().loss(student_tokens, teacher_tokens, student_grid, teacher_grid, kept)


def test_repa_adds_weighted_alignment_until_stop_step(tmp_path):
    dataset = CachedLatentDataset(make_cache(tmp_path / "c", n_images=0, n_videos=2, teacher_dim=6, teacher="dino"),
                                  teacher="dino")
    batch = collate([dataset[0], dataset[1]])
    model = randomize_(MotifVideoTransformer.from_preset("motif-video-tiny", image_embed_dim=None), std=0.1)
    aligner = randomize_(RecordingAligner(model.config.hidden_size, 6, projector_dim=16), seed=2)
    module = TrainModule(model, aligner, align_block=1)
    obj = objective(alignment=AlignmentSection(teacher="dino", block=1, weight=0.5, stop_step=3))
    out = obj(module, batch, 2, [0, 1], torch.device("cpu"))
    assert out.repa is not None and out.loss.item() == pytest.approx(out.flow.item() + 0.5 * out.repa.item(),
                                                                     rel=1e-6)
    # the same term computed directly from the captured block
    probe = Probe()
    obj(probe, batch, 2, [0, 1], torch.device("cpu"))
    _, tokens = model(probe.seen["hidden"], probe.seen["timestep"], probe.seen["text"], probe.seen["mask"],
                      capture_block=1)
    direct = aligner.loss(tokens, batch["teacher"], (2, 2, 2), batch["teacher_grid"])
    assert out.repa.item() == pytest.approx(direct.item(), rel=1e-5)
    assert aligner.kept is None
    late = obj(module, batch, 3, [0, 1], torch.device("cpu"))  # stop_step reached: flow only
    assert late.repa is None and late.loss.item() == late.flow.item()
    # the aligned block inside a route: only the kept tokens are aligned
    routed = objective(alignment=AlignmentSection(teacher="dino", block=1, weight=0.5),
                       route=RouteConfig(0.5, 1, 3))(module, batch, 2, [0, 1], torch.device("cpu"))
    assert aligner.kept is not None and aligner.kept.shape == (2, 4) and math.isfinite(routed.loss.item())
