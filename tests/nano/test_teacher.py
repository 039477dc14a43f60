import numpy as np
import pytest
import torch
from transformers import VJEPA2Model

from motif_video.alignment import IMAGENET_MEAN, IMAGENET_STD, VJEPA2Teacher, build_teacher
from motif_video.errors import MotifVideoError
from motif_video.nano.codec import load_items, to_pixels
from motif_video.nano.data import make_clip, make_image
from motif_video.nano.teacher import (
    ATTRIBUTES,
    TEACHER_CONFIG,
    AttributeHeads,
    _labels,
    attribute_accuracy,
    build_teacher_model,
    teacher_inputs,
    train_teacher,
)


def _samples(clips=6, images=2, seed=0):
    return [make_clip(i, seed) for i in range(clips)] + [make_image(i, seed) for i in range(images)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    samples = _samples()
    summary = train_teacher(samples, out, steps=10, batch_size=4, image_batch_size=2, seed=0, lr=3e-3,
                            progress=False)
    return out, samples, summary


def test_loss_decreases(trained):
    _, _, summary = trained
    losses = summary["losses"]
    assert summary["steps"] == 10
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_saved_folder_is_a_vjepa2_model(trained):
    out, _, _ = trained
    model = VJEPA2Model.from_pretrained(out)
    for key, value in TEACHER_CONFIG.items():
        assert getattr(model.config, key) == value
    assert not any("heads" in name for name in model.state_dict())  # the classifier heads are not shipped


def test_build_teacher_encodes_nano_clips(trained):
    out, _, _ = trained
    teacher = build_teacher(out)
    assert isinstance(teacher, VJEPA2Teacher) and teacher.dim == TEACHER_CONFIG["hidden_size"]
    pixels = torch.rand(2, 3, 17, 64, 64) * 2 - 1
    tokens, grid = teacher.encode(pixels)
    # 17 frames padded to 18 -> 9 tubelets; 64 / patch 8 -> 8 x 8.
    assert grid == (9, 8, 8)
    assert tokens.shape == (2, 9 * 8 * 8, TEACHER_CONFIG["hidden_size"])
    assert torch.isfinite(tokens).all()
    tokens_1, grid_1 = teacher.encode(pixels[:, :, :1])
    assert grid_1 == (1, 8, 8) and tokens_1.shape[1] == 64


def test_training_preprocessing_matches_the_repa_teacher(trained):
    """What the teacher learned on is what REPA will feed it: same normalisation, padding and layout."""
    out, samples, _ = trained
    teacher = VJEPA2Teacher.from_pretrained(out)
    pixels = to_pixels([samples[0].frames, samples[1].frames])
    expected, _ = teacher.encode(pixels)
    model = VJEPA2Model.from_pretrained(out).eval()
    with torch.no_grad():
        got = model(pixel_values_videos=teacher_inputs(pixels, 2), skip_predictor=True).last_hidden_state
    torch.testing.assert_close(got, expected)
    # Independent check of the normalisation on one pixel of frame 0.
    x = teacher_inputs(pixels, 2)
    rgb = (pixels[0, :, 0, 10, 20] + 1) / 2
    ref = (rgb - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, 0, :, 10, 20], ref)
    assert x.shape == (2, 18, 3, 64, 64)
    torch.testing.assert_close(x[:, 17], x[:, 16])  # odd frame count padded with the last frame


def test_deterministic_given_the_seed(tmp_path):
    samples = _samples(clips=3, images=1)
    kwargs = dict(steps=2, batch_size=2, image_batch_size=1, lr=1e-3, progress=False)
    a = train_teacher(samples, tmp_path / "a", seed=1, **kwargs)
    b = train_teacher(samples, tmp_path / "b", seed=1, **kwargs)
    c = train_teacher(samples, tmp_path / "c", seed=2, **kwargs)
    assert a["losses"] == b["losses"] != c["losses"]
    wa, wb = (VJEPA2Model.from_pretrained(tmp_path / n).state_dict() for n in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_labels_and_accuracy_reference():
    items = load_items(_samples(clips=3, images=2))
    labels = _labels(items)
    for name, classes in ATTRIBUTES.items():
        for it, label in zip(items, labels[name].tolist()):
            value = getattr(it.attributes, name)
            assert label == (-100 if value is None else classes.index(value))
    # Heads that always answer class 0: accuracy is the share of items whose label is 0.
    model = build_teacher_model(0)
    heads = AttributeHeads(model.config.hidden_size)
    with torch.no_grad():
        for head in heads.heads.values():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[0] = 1.0
    acc = attribute_accuracy(model, heads, items)
    for name in ATTRIBUTES:
        valid = labels[name][labels[name] != -100]
        assert acc[name] == pytest.approx(float((valid == 0).float().mean()))


def test_bad_input(tmp_path):
    with pytest.raises(MotifVideoError, match="64x64"):
        train_teacher([make_clip(0, 0, size=32)], tmp_path / "x", steps=1, progress=False)
    with pytest.raises(MotifVideoError, match="steps"):
        train_teacher(_samples(1, 0), tmp_path / "x", steps=0, progress=False)
