import json
import math
from collections import Counter

import numpy as np
import pytest

from motif_video.cli import main
from motif_video.errors import MotifVideoError
from motif_video.eval.prompts import parse_prompt
from motif_video.nano import data
from motif_video.nano.data import (
    BACKGROUND,
    TRAIN_WORDS,
    Attributes,
    clip_combinations,
    heldout_caption,
    heldout_prompts,
    make_clip,
    make_image,
    render,
    train_caption,
    write_dataset,
)
from motif_video.pipeline.video_io import probe_video, read_video


def _object_pixels(frames):
    return np.any(frames != np.array(BACKGROUND, dtype=np.uint8), axis=-1)  # (T, H, W)


def test_deterministic_by_seed():
    a, b = make_clip(7, seed=3), make_clip(7, seed=3)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.caption == b.caption and a.attributes == b.attributes
    c = make_clip(7, seed=4)
    assert not np.array_equal(a.frames, c.frames) or a.caption != c.caption
    # A sample does not depend on the ones generated before it.
    for i in range(5):
        make_clip(i, seed=3)
    np.testing.assert_array_equal(make_clip(7, seed=3).frames, a.frames)


def test_every_block_holds_each_combination_once():
    combos = clip_combinations()
    assert len(combos) == 7 * 3 * 5 * 2
    for block in range(2):
        seen = Counter(data.balanced_attributes("clip", block * len(combos) + i, seed=11) for i in range(len(combos)))
        assert set(seen) == set(combos) and max(seen.values()) == 1


@pytest.mark.parametrize("index", range(0, 210, 7))
def test_object_visible_constant_speed_and_true_to_attributes(index):
    s = make_clip(index, seed=0, frames=17, size=64)
    attrs = s.attributes
    t, h, w, _ = s.frames.shape
    assert (t, h, w) == (17, 64, 64)
    obj = _object_pixels(s.frames)
    # Fully visible: the outermost ring of pixels is pure background in every frame.
    assert not obj[:, 0, :].any() and not obj[:, -1, :].any() and not obj[:, :, 0].any() and not obj[:, :, -1].any()
    # Same size in every frame (anti-aliasing moves a few edge pixels at most).
    alpha = np.abs(s.frames.astype(float) - BACKGROUND).max(-1) / np.abs(np.array(s.color_rgb) - BACKGROUND).max()
    area = alpha.sum(axis=(1, 2))
    assert area.max() / area.min() < 1.03
    # Coverage area against the analytic area of the shape with bounding box 2h x 2h.
    expected = {"circle": math.pi, "square": 4.0, "triangle": 2.0}[attrs.shape] * s.half_extent**2
    assert area.mean() == pytest.approx(expected, rel=0.03)
    # Centroid from the pixels: a straight line at constant speed in the captioned direction.
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    cx = (alpha * xx).sum((1, 2)) / area
    cy = (alpha * yy).sum((1, 2)) / area
    step = np.stack([np.diff(cx), np.diff(cy)], 1)
    if attrs.motion == "static":
        assert np.abs(step).max() < 1e-6
    else:
        axis = 0 if attrs.motion in ("left", "right") else 1
        sign = -1 if attrs.motion in ("left", "up") else 1
        assert np.all(np.sign(step[:, axis]) == sign)
        assert np.abs(step[:, 1 - axis]).max() < 0.1  # anti-aliasing of sloped edges: sub-pixel wobble only
        assert step[:, axis].std() < 0.05 * np.abs(step[:, axis]).mean()  # steady speed (pixel quantisation only)
        room = 64 - 2 * s.half_extent - 2 * data.MARGIN_PX
        assert abs(step[:, axis].sum()) >= min(data.TRAVEL[0] * 64, room) - 0.05
    # The interior shows the clip's colour exactly.
    centre = s.frames[0, int(cy[0]), int(cx[0])]
    assert tuple(int(v) for v in centre) == s.color_rgb
    assert np.abs(np.array(s.color_rgb) - data.COLORS[attrs.color]).max() <= data.COLOR_JITTER
    lo, hi = data.HALF_EXTENT[attrs.size]
    assert lo * 64 <= s.half_extent <= hi * 64


def test_captions_match_attributes():
    # The caption is checked with the evaluator's parser, an independent reading of the English.
    for i in range(400):
        s = make_clip(i, seed=5)
        e = parse_prompt(s.caption)
        assert (e.color, e.shape, e.motion) == (s.attributes.color, s.attributes.shape, s.attributes.motion), s.caption
        assert e.size in (None, s.attributes.size), s.caption
    for i in range(60):
        s = make_image(i, seed=5)
        e = parse_prompt(s.caption)
        assert s.frames.shape[0] == 1 and s.attributes.motion is None
        assert (e.color, e.shape, e.motion) == (s.attributes.color, s.attributes.shape, None), s.caption


def test_examples_of_wording():
    rng = np.random.default_rng(0)
    train = {train_caption(Attributes("red", "circle", "small", "left"), rng) for _ in range(20000)}
    assert "a small red circle moving to the left" in train
    statics = {train_caption(Attributes("white", "square", "large", "static"), rng) for _ in range(20000)}
    assert "a static white square" in statics
    assert len(train) >= 20  # varied wording
    assert all(not c.startswith("a a") and " a o" not in c for c in train | statics)  # articles fixed ("an oversized")


def test_heldout_wording_is_disjoint_from_training():
    rng = np.random.default_rng(1)
    train, held = set(), set()
    for attrs in clip_combinations():
        for _ in range(20):
            train.add(train_caption(attrs, rng))
            held.add(heldout_caption(attrs, rng))
    assert not train & held
    train_phrases = {p for ps in data.TRAIN_WORDS["motion"].values() for p in ps}
    assert not any(p in c for c in held for p in train_phrases if len(p.split()) > 1)
    # Word by word: no held-out size word, motion phrase, static adjective or template is ever trained on; shape
    # words share only the canonical nouns.
    for kind in ("size", "shape", "motion"):
        for value, held_words in data.HELDOUT_WORDS[kind].items():
            shared = set(held_words) & {w for ws in data.TRAIN_WORDS[kind].values() for w in ws}
            assert shared <= ({value} if kind == "shape" else set()), (kind, shared)
    assert not set(data.HELDOUT_WORDS["static_adjective"]) & set(data.TRAIN_WORDS["static_adjective"])
    held_templates = data.HELDOUT_TEMPLATES + data.HELDOUT_STATIC_TEMPLATES + data.HELDOUT_IMAGE_TEMPLATES
    train_templates = data.TRAIN_TEMPLATES + data.TRAIN_STATIC_TEMPLATES + data.TRAIN_IMAGE_TEMPLATES
    assert not set(held_templates) & set(train_templates)
    prompts = heldout_prompts(210, seed=0)
    assert Counter(tuple(p["attributes"].values()) for p in prompts) == Counter(
        (a.color, a.shape, a.size, a.motion) for a in clip_combinations())


@pytest.mark.parametrize("motion", data.DIAGONAL_MOTIONS)
def test_diagonal_clips(motion):
    # Diagonal motions (never in the nano training set): equal steps on both axes in the named direction, the same
    # path length as an axis motion, the object always inside the frame.
    ux, uy = {"up-left": (-1, -1), "up-right": (1, -1), "down-left": (-1, 1), "down-right": (1, 1)}[motion]
    for seed in range(4):
        s = render(Attributes("green", "square", "large", motion), 17, 64, np.random.default_rng(seed))
        obj = _object_pixels(s.frames)
        assert not obj[:, 0, :].any() and not obj[:, -1, :].any() and not obj[:, :, 0].any() and not obj[:, :, -1].any()
        step = np.diff(s.centers, axis=0)  # (T - 1, 2)
        np.testing.assert_allclose(step[:, 0] * ux, step[:, 1] * uy, atol=1e-9)
        assert np.all(step[:, 0] * ux > 0)
        travel = math.hypot(*(s.centers[-1] - s.centers[0]))
        room = 64 - 2 * s.half_extent - 2 * data.MARGIN_PX
        assert min(data.TRAVEL[0] * 64, room) - 1e-6 <= travel <= data.TRAVEL[1] * 64 + 1e-6
    rows = heldout_prompts(8, seed=1, motions=data.DIAGONAL_MOTIONS)
    assert {r["attributes"]["motion"] for r in rows} <= set(data.DIAGONAL_MOTIONS)
    assert all(parse_prompt(r["prompt"], diagonals=True).motion == r["attributes"]["motion"] for r in rows)


def test_nano_data_diagonal_cli(tmp_path, capsys):
    out = tmp_path / "diagonal"
    assert main(["nano-data", str(out), "--clips", "24", "--images", "0", "--frames", "9", "--eval-prompts", "4",
                 "--motion", "up-right", "--motion", "down-left", "--color", "red"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert {r["attributes"]["motion"] for r in rows} == {"up-right", "down-left"}
    report = tmp_path / "report"
    assert main(["eval", str(out / "metadata.jsonl"), "--out", str(report), "--diagonal"]) == 0
    summary = json.loads((report / "results.json").read_text())["summary"]
    assert summary["direction_accuracy"] == 1.0 and summary["parser_agreement"] == 1.0
    capsys.readouterr()
    assert main(["nano-data", str(tmp_path / "x"), "--clips", "1", "--motion", "sideways"]) == 2
    assert "unknown motion 'sideways'" in capsys.readouterr().err


def test_diamond_clips():
    # The diamond (never in the nano training set): half its bounding box, clear of the box's corners, and what
    # the evaluator, once taught it, reads back; untaught, the evaluator has no diamond to answer.
    from motif_video.eval.metrics import measure_clip

    for seed in range(3):
        s = render(Attributes("yellow", "diamond", "large", "right"), 17, 64, np.random.default_rng(seed))
        alpha = np.abs(s.frames.astype(float) - BACKGROUND).max(-1) / np.abs(np.array(s.color_rgb) - BACKGROUND).max()
        assert alpha.sum(axis=(1, 2)).mean() == pytest.approx(2.0 * s.half_extent**2, rel=0.03)
        x0, y0 = s.centers[0]
        corner = s.half_extent * 0.6  # a point of the bounding box a square would fill but a diamond cannot
        assert alpha[0, int(y0 - corner), int(x0 - corner)] == 0 and alpha[0, int(y0), int(x0)] == 1
        assert measure_clip(s.frames, shapes=["diamond"]).shape == "diamond"
        assert measure_clip(s.frames).shape != "diamond"
    rows = heldout_prompts(35, seed=1, shapes=data.NEW_SHAPES, sizes=("large",))
    assert {(r["attributes"]["shape"], r["attributes"]["size"]) for r in rows} == {("diamond", "large")}
    assert len({(r["attributes"]["color"], r["attributes"]["motion"]) for r in rows}) == 35  # one block: all once
    assert all(parse_prompt(r["prompt"], shapes=["diamond"]).shape == "diamond" for r in rows)
    assert all(parse_prompt(r["prompt"]).shape is None for r in rows)


def test_nano_data_new_shape_cli(tmp_path, capsys):
    out = tmp_path / "diamond"
    assert main(["nano-data", str(out), "--clips", "10", "--images", "2", "--frames", "9", "--eval-prompts", "4",
                 "--shape", "diamond", "--object-size", "large", "--color", "red", "--color", "blue"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert {(r["attributes"]["shape"], r["attributes"]["size"]) for r in rows} == {("diamond", "large")}
    report = tmp_path / "report"
    assert main(["eval", str(out / "metadata.jsonl"), "--out", str(report), "--shape", "diamond"]) == 0
    results = json.loads((report / "results.json").read_text())
    assert results["summary"]["shape_accuracy"] == 1.0 and results["shapes"] == ["diamond"]
    capsys.readouterr()
    assert main(["nano-data", str(tmp_path / "x"), "--clips", "1", "--shape", "star"]) == 2
    assert "unknown shape 'star'" in capsys.readouterr().err
    assert main(["eval", str(out), "--out", str(tmp_path / "r"), "--shape", "star"]) == 2
    assert "can be taught diamond" in capsys.readouterr().err


def test_render_single_frame_is_static():
    s = render(Attributes("blue", "triangle", "large", "right"), 1, 32, np.random.default_rng(0))
    assert s.frames.shape == (1, 32, 32, 3) and _object_pixels(s.frames).any()


def test_write_dataset_layout_and_determinism(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        write_dataset(out, clips=4, images=2, frames=9, size=32, seed=1, eval_prompts=5)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted([f"clip_{i:05d}.{e}" for i in range(4) for e in ("mp4", "txt", "condition.txt")]
                           + [f"image_{i:05d}.{e}" for i in range(2) for e in ("png", "txt")]
                           + ["metadata.jsonl", "heldout_prompts.jsonl"])
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert (a / row["path"]).with_suffix(".txt").read_text().strip() == row["caption"]
        np.testing.assert_array_equal(read_video(a / row["path"]), read_video(b / row["path"]))
        info = probe_video(a / row["path"])
        assert (info["frames"], info["height"], info["width"]) == (row["num_frames"], 32, 32)
        assert set(row["attributes"]) == {"color", "shape", "size", "motion"}
        if row["num_frames"] > 1:  # the motion alone, in the training wording, as its .condition.txt
            condition = row["condition_caption"]
            assert (a / row["path"]).with_suffix(".condition.txt").read_text().strip() == condition
            assert any(word in condition for word in TRAIN_WORDS["motion"][row["attributes"]["motion"]])
            assert row["attributes"]["color"] not in condition and "condition_caption" not in rows[-1]
    assert rows[0]["num_frames"] == 9 and rows[-1]["num_frames"] == 1 and rows[-1]["attributes"]["motion"] is None
    # The stored pixels are the rendered ones (PNG exactly; H.264 closely).
    np.testing.assert_array_equal(read_video(a / "image_00001.png"), make_image(1, 1, 32).frames)
    assert np.abs(read_video(a / "clip_00002.mp4").astype(int) - make_clip(2, 1, 9, 32).frames).mean() < 2.0
    assert len((a / "heldout_prompts.jsonl").read_text().splitlines()) == 5


def test_write_dataset_refuses_and_overwrites(tmp_path):
    out = tmp_path / "d"
    write_dataset(out, clips=3, images=0, frames=5, size=16)
    with pytest.raises(MotifVideoError, match="--overwrite"):
        write_dataset(out, clips=1, images=0, frames=5, size=16)
    write_dataset(out, clips=1, images=0, frames=5, size=16, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["clip_00000.condition.txt", "clip_00000.mp4", "clip_00000.txt",
                                                     "metadata.jsonl"]
    for kwargs, msg in [({"frames": 1}, "at least 2 frames"), ({"size": 15}, "even"), ({"clips": 0}, "at least one")]:
        with pytest.raises(MotifVideoError, match=msg):
            write_dataset(tmp_path / "e", **{"clips": 1, "images": 0, **kwargs})


def test_cli(tmp_path, capsys):
    assert main(["nano-data", str(tmp_path / "n"), "--clips", "2", "--images", "1", "--frames", "5", "--size", "16",
                 "--eval-prompts", "3"]) == 0
    assert "wrote 2 clips and 1 images" in capsys.readouterr().out
    assert main(["nano-data", str(tmp_path / "n"), "--clips", "2"]) == 2
    assert "error:" in capsys.readouterr().err
