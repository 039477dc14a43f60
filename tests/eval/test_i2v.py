"""Image-to-video scoring on procedural nano clips: the ground truth passes every check, a clip that does not
start from its image fails the frame-0 check, and the CLI writes the report."""

import json

import numpy as np
import pytest

from motif_video.cli import main as cli_main
from motif_video.eval.i2v import evaluate_i2v, evaluate_i2v_clip, first_frame_change, load_i2v_items
from motif_video.nano.data import make_clip
from motif_video.pipeline.video_io import write_video

CLIPS = 24


def write_set(folder, image_of, prompt_of=lambda sample: sample.caption):
    """Clips of the nano generator as mp4 (codec noise included), each with a prompt and a first image."""
    folder.mkdir()
    for i in range(CLIPS):
        sample = make_clip(i, seed=5, frames=17, size=64)
        write_video(sample.frames, folder / f"c{i:02d}.mp4", fps=8)
        (folder / f"c{i:02d}.txt").write_text(prompt_of(sample))
        write_video(image_of(i, sample)[None], folder / f"c{i:02d}.image.png")
    return folder


def test_ground_truth_clips_pass_every_check(tmp_path):
    results = evaluate_i2v(load_i2v_items(write_set(tmp_path / "set", lambda i, s: s.frames[0])))
    s = results["summary"]
    assert s["clips"] == CLIPS and s["errors"] == 0
    assert s["keeps_color"] == s["keeps_shape"] == s["first_frame_close"] == s["direction_correct"] == 1.0
    assert s["all_correct"] == 1.0
    assert max(c["first_frame_change"] for c in results["clips"]) < 0.25


def test_direction_only_prompts_are_scored_on_direction(tmp_path):
    def direction(sample):
        motion = sample.attributes.motion
        return "it stays still" if motion == "static" else f"moving {motion}"

    s = evaluate_i2v(load_i2v_items(write_set(tmp_path / "set", lambda i, s: s.frames[0], direction)))["summary"]
    assert s["all_correct"] == 1.0 and s["counted"]["direction_correct"] == CLIPS


def test_a_clip_that_does_not_start_from_its_image_fails_frame_zero(tmp_path):
    """The image of another clip (another object, elsewhere) and the clip's own last frame (same object, moved)."""
    other = evaluate_i2v(load_i2v_items(write_set(tmp_path / "other", lambda i, s: make_clip(
        (i + 7) % CLIPS, seed=5).frames[0])))
    assert not any(c["first_frame_close"] for c in other["clips"])
    moved = [make_clip(i, seed=5) for i in range(CLIPS)]
    moved = [s for s in moved if s.attributes.motion != "static"]
    for sample in moved:
        row = evaluate_i2v_clip(sample.frames, sample.frames[-1], sample.caption)
        assert not row["first_frame_close"] and row["keeps_color"] and row["keeps_shape"], row


def test_first_frame_change_counts_object_areas():
    sample = make_clip(3, seed=5)
    image = sample.frames[0]
    assert first_frame_change(image, image) == 0.0
    recoloured = image.copy()
    obj = np.linalg.norm(image.astype(float) - image[0, 0], axis=-1) > 100
    recoloured[obj] = 255 - recoloured[obj]
    assert 0.7 < first_frame_change(recoloured, image) <= 1.05


def test_cli_writes_the_report_and_rejects_missing_images(tmp_path, capsys):
    folder = write_set(tmp_path / "set", lambda i, s: s.frames[0])
    assert cli_main(["eval", str(folder), "--out", str(tmp_path / "report"), "--image-to-video"]) == 0
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["summary"]["all_correct"] == 1.0
    assert str(tmp_path) not in (tmp_path / "report" / "results.json").read_text()
    (folder / "c00.image.png").unlink()
    capsys.readouterr()
    assert cli_main(["eval", str(folder), "--out", str(tmp_path / "r2"), "--image-to-video"]) == 2
    assert "c00.image.png" in capsys.readouterr().err


@pytest.mark.parametrize("row, message", [({"path": "a.mp4", "prompt": "moving left"}, "no 'image'")])
def test_jsonl_rows_need_an_image(tmp_path, row, message, capsys):
    (tmp_path / "set.jsonl").write_text(json.dumps(row) + "\n")
    assert cli_main(["eval", str(tmp_path / "set.jsonl"), "--image-to-video"]) == 2
    assert message in capsys.readouterr().err
