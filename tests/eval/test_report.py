import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from motif_video.cli import main
from motif_video.errors import MotifVideoError
from motif_video.eval.report import evaluate, load_items, shuffle_prompts
from motif_video.nano.data import Attributes, heldout_prompts, render, write_dataset
from motif_video.pipeline.video_io import write_video


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """70 clips (a third of the attribute combinations) + 10 images, 9 frames at 64 px, written as mp4 / png."""
    out = tmp_path_factory.mktemp("nano")
    write_dataset(out, clips=70, images=10, frames=9, size=64, seed=2)
    return out


def test_ground_truth_scores_near_perfect(dataset):
    results = evaluate(load_items(dataset / "metadata.jsonl"))
    s = results["summary"]
    assert s["clips"] == 80 and s["errors"] == 0
    assert s["counted"]["direction_correct"] == 70  # images have no direction
    for key in ("color_accuracy", "shape_accuracy", "direction_accuracy"):
        assert s[key] >= 0.95, (key, s[key])
    assert s["parser_agreement"] == 1.0
    assert s["subject_consistency"] > 0.95 and s["background_consistency"] > 0.98
    assert s["temporal_flickering"] > 0.99


def test_shuffled_prompts_score_near_chance(dataset):
    items = load_items(dataset)  # folder form: clip + same-name .txt
    assert len(items) == 80
    shuffled = shuffle_prompts(items, seed=0)
    assert all(a["prompt"] != b["prompt"] or a["path"] == b["path"] for a, b in zip(items, shuffled))
    s = evaluate(shuffled)["summary"]
    # Chance: colour 1/7, shape 1/3, direction 1/5.
    assert s["color_accuracy"] < 0.3 and s["shape_accuracy"] < 0.5 and s["direction_accuracy"] < 0.35
    assert s["all_correct"] < 0.1


def test_heldout_wording_end_to_end(tmp_path):
    # Ground-truth renders of the held-out prompts, judged by the held-out prompt text alone.
    rows = []
    for i, p in enumerate(heldout_prompts(30, seed=4)):
        sample = render(Attributes(**p["attributes"]), 9, 64, np.random.default_rng(i))
        path = write_video(sample.frames, tmp_path / f"h{i}.mp4")
        rows.append({"path": path.name, "prompt": p["prompt"]})
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = evaluate(load_items(tmp_path / "gen.jsonl"))["summary"]
    assert s["counted"]["all_correct"] == 30 and s["all_correct"] >= 0.95


def test_cli_writes_json_markdown_and_plots(dataset, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["eval", str(dataset), "--out", str(out), "--limit", "12"]) == 0
    printed = capsys.readouterr().out
    assert "| colour |" in printed and "wrote" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["clips"]) == 12 and results["summary"]["clips"] == 12
    clip = results["clips"][0]
    assert {"prompt", "expected", "measured", "color_correct", "shape_correct", "direction_correct"} <= set(clip)
    assert all((out / c["path"]).resolve() == (dataset / Path(c["path"]).name).resolve() for c in results["clips"])
    assert str(dataset) not in (out / "results.json").read_text()  # paths relative to the report folder
    md = (out / "report.md").read_text()
    assert "| dimension | score | clips |" in md and "| subject consistency |" in md and "clip_00000.mp4" in md
    for name in ("summary.png", "accuracy_by_value.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 200
    assert main(["eval", str(dataset), "--out", str(tmp_path / "r2"), "--limit", "12", "--shuffle-prompts", "1"]) == 0
    assert "shuffled" in (tmp_path / "r2" / "report.md").read_text()


def test_unreadable_clip_counts_as_wrong(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    (tmp_path / "bad.txt").write_text("a red circle moving left")
    s = evaluate(load_items(tmp_path))
    row = s["clips"][0]
    assert "bad.mp4" in row["error"] and row["all_correct"] is False and row["color_correct"] is False
    assert s["summary"]["errors"] == 1 and s["summary"]["all_correct"] == 0.0


def test_input_errors(tmp_path, capsys):
    with pytest.raises(MotifVideoError, match="no clips"):
        load_items(tmp_path)
    (tmp_path / "x.jsonl").write_text('{"path": "a.mp4"}\n')
    with pytest.raises(MotifVideoError, match=r"x.jsonl:1: .*prompt"):
        load_items(tmp_path / "x.jsonl")
    (tmp_path / "y.jsonl").write_text("{oops\n")
    with pytest.raises(MotifVideoError, match="not valid JSON"):
        load_items(tmp_path / "y.jsonl")
    assert main(["eval", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
