"""Image-to-video training: which samples are conditioned, what they are fed (the pipeline's own input at
generation), the optional condition noise, and text-to-video training unchanged when it is off."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from motif_video import MotifVideoPipeline
from motif_video.latents import model_input
from motif_video.train.cached import CachedLatentDataset, collate
from motif_video.train.config import ImageConditionSection, ObjectiveSection
from motif_video.train.loop import Trainer
from motif_video.train.objective import FlowMatchingObjective
from tests.train.engine_helpers import TEXT_DIM, WIDE_TINY, build_config, make_cache, one_thread  # noqa: F401

REFERENCE = Path(__file__).parent.parent / "fixtures" / "t2v_training_reference.json"


class Probe(torch.nn.Module):
    """Records what the objective feeds the model and answers with a zero velocity."""

    def forward(self, hidden_states, timestep, text, text_mask, image_embeds=None, *, route=None, teacher=None,
                teacher_grid=None, student_grid=None):
        self.seen = getattr(self, "seen", []) + [dict(hidden=hidden_states, timestep=timestep, images=image_embeds,
                                                      text=text, text_mask=text_mask)]
        return torch.zeros_like(hidden_states[:, :16]), None


def objective(image_condition=None, **kwargs):
    section = ObjectiveSection(text_dropout=0.0, image_condition=image_condition, **kwargs)
    return FlowMatchingObjective(section, seed=0, patch_size=(1, 2, 2), num_blocks=4, text_dim=TEXT_DIM)


@pytest.fixture
def batch(tmp_path):
    dataset = CachedLatentDataset(make_cache(tmp_path / "cache", n_images=0, n_videos=6))
    return collate([dataset[i] for i in range(6)])


def test_conditioned_samples_get_the_first_frame_and_mask(batch):
    obj = objective(ImageConditionSection(probability=0.5))
    probe = Probe()
    obj(probe, batch, step=3, sample_ids=list(range(6)), device=torch.device("cpu"))
    hidden = probe.seen[0]["hidden"]
    flags, *_ = obj.image_conditions(batch["latents"], 3, list(range(6)))
    assert 0 < sum(flags) < 6  # this seed mixes both kinds in one batch
    x0 = batch["latents"]
    for i, flag in enumerate(flags):
        condition, mask = hidden[i, 16:32], hidden[i, 32]
        if flag:
            assert torch.equal(condition[:, 0], x0[i, :, 0]) and torch.equal(mask[0], torch.ones_like(mask[0]))
        else:
            assert not condition[:, 0].any() and not mask[0].any()
        assert not condition[:, 1:].any() and not mask[1:].any()
    # The noisy half is what it would be without image conditioning: the draws have their own stream.
    plain = Probe()
    objective()(plain, batch, step=3, sample_ids=list(range(6)), device=torch.device("cpu"))
    assert torch.equal(plain.seen[0]["hidden"][:, :16], hidden[:, :16])
    assert torch.equal(plain.seen[0]["timestep"], probe.seen[0]["timestep"])


def test_the_fraction_conditioned_follows_the_probability(batch):
    obj = objective(ImageConditionSection(probability=0.3))
    flags = [f for step in range(200) for f in obj.image_conditions(batch["latents"], step, list(range(6)))[0]]
    assert abs(np.mean(flags) - 0.3) < 0.04  # 1200 draws: 3.5 standard errors
    images = batch["latents"][:, :, :1]  # a single latent frame is never conditioned on itself
    assert not any(objective(ImageConditionSection(probability=1.0)).image_conditions(images, 0, [0, 1])[0])


def test_conditioned_samples_have_their_own_text_dropout(batch):
    # text_dropout 1 on the condition: every conditioned clip is trained with the empty prompt, every other one
    # with its caption (the objective's own dropout is 0 here); None leaves the objective's draw alone.
    seen = {}
    for name, section in (("own", ImageConditionSection(probability=0.5, text_dropout=1.0)),
                          ("none", ImageConditionSection(probability=0.5))):
        obj, probe = objective(section), Probe()
        obj(probe, batch, step=3, sample_ids=list(range(6)), device=torch.device("cpu"))
        seen[name] = probe.seen[0]
        flags, _, drops, _ = obj.image_conditions(batch["latents"], 3, list(range(6)))
    assert drops == [None] * 6 and 0 < sum(flags) < 6
    empty = objective().empty_text
    for i, flag in enumerate(flags):
        length = int(seen["own"]["text_mask"][i].sum())
        own = seen["own"]["text"][i, :length]
        if flag:
            assert length == empty.shape[0] and torch.equal(own, empty.to(own))
        else:
            kept = int(batch["text_mask"][i].sum())
            assert length == kept and torch.equal(own, batch["text"][i, :kept])
        assert torch.equal(seen["none"]["text"][i, :int(batch["text_mask"][i].sum())],
                           batch["text"][i, :int(batch["text_mask"][i].sum())])
    # the noisy input and the condition do not move with the extra draw
    assert torch.equal(seen["own"]["hidden"], seen["none"]["hidden"])
    with pytest.raises(Exception, match="text_dropout must be in"):
        ImageConditionSection(text_dropout=1.5).validate("objective.image_condition")


def test_conditioned_samples_train_with_their_condition_caption(tmp_path):
    """condition_caption 1: every conditioned clip that has a condition caption reads its states, every other clip
    (and a conditioned one without) its caption; no earlier draw moves."""
    from motif_video.train.cached import write_cached_samples
    from tests.train.engine_helpers import make_samples

    samples = make_samples(n_images=0, n_videos=6)
    for i, sample in enumerate(samples[:5]):  # the sixth has none
        sample.condition_text = torch.full((i + 1, TEXT_DIM), float(i))
        sample.condition_caption = f"moving left {i}"
    cache = write_cached_samples(tmp_path / "cache", samples, empty_prompt=(torch.zeros(2, TEXT_DIM), torch.ones(2)))
    dataset = CachedLatentDataset(cache)
    assert [r.get("condition_caption") for _, r in dataset.records] == [f"moving left {i}" for i in range(5)] + [None]
    batch = collate([dataset[i] for i in range(6)])
    section = dict(probability=1.0)
    seen = {}
    for name, share in (("swap", 1.0), ("keep", 0.0)):
        obj, probe = objective(ImageConditionSection(**section, condition_caption=share)), Probe()
        obj(probe, batch, step=3, sample_ids=list(range(6)), device=torch.device("cpu"))
        seen[name] = probe.seen[0]
        flags, _, _, swaps = obj.image_conditions(batch["latents"], 3, list(range(6)))
        assert flags == [True] * 6 and swaps == [share == 1.0] * 6
    for i in range(6):
        length = int(seen["swap"]["text_mask"][i].sum())
        kept = int(batch["text_mask"][i].sum())
        expected = batch["condition_texts"][i] if i < 5 else batch["text"][i, :kept]
        assert length == expected.shape[0] and torch.equal(seen["swap"]["text"][i, :length], expected)
        assert torch.equal(seen["keep"]["text"][i, :kept], batch["text"][i, :kept])
    assert torch.equal(seen["swap"]["hidden"], seen["keep"]["hidden"])
    # half of the conditioned clips, from the draw after every other one
    obj = objective(ImageConditionSection(probability=0.5, condition_caption=0.5))
    draws = [obj.image_conditions(batch["latents"], step, list(range(6))) for step in range(200)]
    swapped = [s for flags, _, _, swaps in draws for f, s in zip(flags, swaps) if f]
    assert abs(np.mean(swapped) - 0.5) < 0.06
    assert not any(s for flags, _, _, swaps in draws for f, s in zip(flags, swaps) if not f)
    plain = objective(ImageConditionSection(probability=0.5))
    before = [plain.image_conditions(batch["latents"], step, list(range(6))) for step in range(200)]
    assert all(torch.equal(a[1], b[1]) and a[0] == b[0] and a[2] == b[2] for a, b in zip(draws, before))
    with pytest.raises(Exception, match="condition_caption must be in"):
        ImageConditionSection(condition_caption=-0.1).validate("objective.image_condition")


def test_condition_noise_is_a_setting(batch):
    x0 = batch["latents"]
    clean = objective(ImageConditionSection(probability=1.0)).image_conditions(x0, 0, list(range(6)))[1]
    assert torch.equal(clean, x0[:, :, :1])
    noisy = objective(ImageConditionSection(probability=1.0, noise_probability=1.0, noise_std=0.1)) \
        .image_conditions(x0, 0, list(range(6)))[1]
    assert abs((noisy - clean).std().item() - 0.1) < 0.01


def test_training_input_equals_the_pipelines_input_at_generation(tmp_path):
    """The pipeline's transformer input at the first step for an image, and the training input of a clip whose
    first latent frame is that image's latent, at t = 1 with the same noise: the same tensor."""
    from motif_video.testing import save_tiny_pipeline

    pipe = MotifVideoPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "pipe"), device="cpu")
    frame = np.zeros((32, 32, 3), np.uint8)
    frame[8:24, 4:20] = (200, 30, 90)
    Image.fromarray(frame).save(tmp_path / "first.png")
    noise = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        pipe("a pink box", image=tmp_path / "first.png", num_inference_steps=1, latents=noise, guidance_scale=1.0,
             progress=False, output_type="latent", height=32, width=32, num_frames=9)
    finally:
        handle.remove()
    first = pipe.codec.encode(pipe._image_tensor(tmp_path / "first.png", 32, 32))  # (1, 16, 1, 4, 4)
    clip = torch.cat([first, torch.randn(1, 16, 2, 4, 4)], dim=2)  # the rest of the clip does not enter at t = 1
    flags, condition, *_ = objective(ImageConditionSection(probability=1.0)).image_conditions(clip, 0, [0])
    hidden, _ = objective().model_inputs(clip, noise, torch.ones(1), image_to_video=flags, condition=condition)
    assert flags == [True]
    assert torch.equal(hidden, seen[0])
    assert torch.equal(hidden, model_input(noise, first))


def test_image_tokens_reach_only_the_conditioned_samples(batch):
    batch["image_tokens"] = torch.randn(6, 5, 8)
    obj = objective(ImageConditionSection(probability=0.5))
    probe = Probe()
    obj(probe, batch, step=3, sample_ids=list(range(6)), device=torch.device("cpu"))
    flags, *_ = obj.image_conditions(batch["latents"], 3, list(range(6)))
    plain, conditioned = probe.seen
    assert plain["images"] is None and conditioned["images"].shape[0] == sum(flags)
    assert torch.equal(conditioned["images"], batch["image_tokens"][torch.tensor(flags)])
    assert torch.equal(conditioned["hidden"][:, 32, 0], torch.ones_like(conditioned["hidden"][:, 32, 0]))


def t2v_run(tmp_path: Path, objective_section: dict) -> dict:
    """Three optimizer steps of a tiny text-to-video run: every loss and a checksum of the final weights, exact."""
    cache = make_cache(tmp_path / "cache", n_images=2, n_videos=4)
    config = build_config(
        tmp_path, cache, model={"preset": "motif-video-tiny", "overrides": {**WIDE_TINY, "image_embed_dim": None}},
        data={"cache_dirs": [str(cache)], "batch_size": 2, "interleave": ""}, objective=objective_section,
        optim={"lr": 1e-3, "steps": 3, "warmup_steps": 1}, ema={"enabled": False},
        checkpointing={"every": 100, "save_final": False})
    trainer = Trainer(config)
    result = trainer.train()
    weights = trainer.module.transformer.state_dict()
    checksum = sum(float((w.double() * (1 + torch.arange(w.numel(), dtype=torch.float64).view(w.shape) % 7)).sum())
                   for w in weights.values())
    return {"losses": [float(result.losses[s]).hex() for s in sorted(result.losses)], "weights": checksum.hex()}


def test_text_to_video_training_is_unchanged(tmp_path):
    """No `image_condition` reproduces the stored run of the engine before image conditioning existed (to the last
    bits another CPU's kernels move: the weights' checksum differs by 4e-8 relative on an AMD EPYC against the
    machine that stored it; a changed draw or input moves the losses by percents), and probability 0 reproduces no
    `image_condition` bit for bit."""
    absent = t2v_run(tmp_path / "absent", {"text_dropout": 0.2})
    stored = json.loads(REFERENCE.read_text())
    for key in ("losses", "weights"):
        got = [float.fromhex(v) for v in np.atleast_1d(absent[key])]
        want = [float.fromhex(v) for v in np.atleast_1d(stored[key])]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=key)
    off = t2v_run(tmp_path / "off", {"text_dropout": 0.2, "image_condition": {"probability": 0.0}})
    assert off == absent
    on = t2v_run(tmp_path / "on", {"text_dropout": 0.2, "image_condition": {"probability": 1.0}})
    assert on["losses"] != absent["losses"]


def test_validation_includes_an_image_to_video_sample(tmp_path):
    """With image conditioning on, each validation writes an image-to-video clip from the first validation clip's
    own first frame (decoded from its latent) next to the text-to-video ones, and that frame beside it."""
    from motif_video.pipeline.video_io import read_video
    from motif_video.testing import save_tiny_pipeline
    from motif_video.train.loop import train

    pipeline = save_tiny_pipeline(tmp_path / "pipe")
    cache = make_cache(tmp_path / "cache", n_images=0, n_videos=2)
    config = build_config(tmp_path, cache, optim={"lr": 1e-3, "steps": 2},
                          model={"preset": "motif-video-tiny", "overrides": {"image_embed_dim": 8}},
                          objective={"image_condition": {"probability": 0.5}},
                          validation={"every": 2, "num_samples": 2, "prompts": ["a red circle moving left"],
                                      "pipeline": str(pipeline), "num_inference_steps": 2, "width": 32,
                                      "height": 32, "num_frames": 5})
    train(config)
    folder = tmp_path / "run" / "samples" / "step-00000002"
    assert sorted(p.name for p in folder.iterdir()) == ["00.mp4", "i2v.image.png", "i2v.mp4"]
    assert read_video(folder / "i2v.mp4").shape == (5, 32, 32, 3)
    assert read_video(folder / "i2v.image.png").shape == (1, 32, 32, 3)
