"""A colour beyond the nano palette: drawn by `nano-data --color`, taught to `eval --color`, told apart from the
palette by hue (docs/finetune.md)."""

import json

import numpy as np
import pytest

from motif_video.cli import main
from motif_video.errors import MotifVideoError
from motif_video.eval.metrics import classify_color, evaluation_palette, measure_clip
from motif_video.eval.prompts import PromptAttributes, parse_prompt
from motif_video.eval.report import evaluate, load_items
from motif_video.nano.data import COLORS, clip_combinations, heldout_prompts, parse_color, parse_palette
from tests.eval.test_metrics import _draw, _line

ORANGE = (240, 140, 30)  # hue 31 degrees: between red (0) and yellow (57)
GREY = (128, 128, 128)  # achromatic, HSV value 0.50 (white: 0.92)


def test_parse_color_specs():
    assert parse_color("orange=240,140,30") == ("orange", ORANGE)
    assert parse_color("red") == ("red", COLORS["red"])
    assert parse_palette(["orange=240,140,30", "red"]) == {"orange": ORANGE, "red": COLORS["red"]}
    for spec, message in [("orange", "not in the nano palette"), ("orange=240,140", "three integers"),
                          ("orange=300,0,0", "three integers"), ("red=1,2,3", "already in the nano palette"),
                          ("dark orange=1,2,3", "one lowercase word")]:
        with pytest.raises(MotifVideoError, match=message):
            parse_color(spec)
    with pytest.raises(MotifVideoError, match="twice"):
        parse_palette(["orange=240,140,30", "orange=240,140,30"])


def test_evaluation_palette_needs_a_distinct_chromatic_colour():
    assert evaluation_palette({"orange": ORANGE}) == {**COLORS, "orange": ORANGE}
    with pytest.raises(MotifVideoError, match="degrees of hue from red"):
        evaluation_palette({"scarlet": (230, 60, 40)})  # 6 degrees from red
    assert evaluation_palette({"grey": GREY})["grey"] == GREY  # achromatic: told from white by brightness
    with pytest.raises(MotifVideoError, match="brightness"):
        evaluation_palette({"silver": (200, 200, 200)})  # HSV value 0.78, white's 0.92


def test_classification_with_the_new_colour():
    palette = evaluation_palette({"orange": ORANGE})
    # Pillow-drawn clips (an independent renderer) of the new colour, with jitter
    for delta in [(0, 0, 0), (-25, 10, 0), (10, -20, 15)]:
        rgb = tuple(int(v) for v in np.clip(np.array(ORANGE) + delta, 0, 255))
        clip = _draw("circle", rgb, _line((20, 30), (44, 30)), half=10)
        assert measure_clip(clip, palette).color == "orange"
        assert measure_clip(clip).color in ("red", "yellow")  # the palette alone has no closer name
    # the palette's own colours keep their names next to the new one
    for name, rgb in COLORS.items():
        assert classify_color(rgb, palette) == name
    # hue halfway between red (0) and orange (31): the boundary sits there
    assert classify_color((240, 40, 30), palette) == "red" and classify_color((240, 110, 30), palette) == "orange"


def test_grey_is_told_from_white_by_brightness():
    palette = evaluation_palette({"grey": GREY})
    for delta in [(0, 0, 0), (-10, 5, 10), (30, 30, 30), (-40, -40, -35)]:
        rgb = tuple(int(v) for v in np.clip(np.array(GREY) + delta, 0, 255))
        clip = _draw("square", rgb, _line((20, 30), (44, 30)), half=10)
        assert measure_clip(clip, palette).color == "grey"
        assert measure_clip(clip).color == "white"
    white = _draw("circle", (225, 230, 235), _line((20, 30), (44, 30)), half=10)
    assert measure_clip(white, palette).color == "white"
    assert classify_color((180, 180, 180), palette) == "grey" and classify_color((190, 190, 190), palette) == "white"


def test_prompts_naming_the_new_colour():
    text = "one huge orange triangle, going left"
    assert parse_prompt(text).color is None
    assert parse_prompt(text, ["orange"]) == PromptAttributes("orange", "triangle", "left", "large")
    # a new colour named like an old one's synonym takes the word over
    assert parse_prompt("a pink circle").color == "magenta"
    assert parse_prompt("a pink circle", ["pink"]).color == "pink"
    assert parse_prompt("a purple circle", ["pink"]).color == "magenta"


def test_nano_data_draws_a_new_colour(tmp_path, capsys):
    out = tmp_path / "orange"
    assert main(["nano-data", str(out), "--clips", "30", "--images", "2", "--frames", "5", "--size", "64",
                 "--eval-prompts", "6", "--color", "orange=240,140,30"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and {r["attributes"]["color"] for r in rows} == {"orange"}
    assert all(np.abs(np.array(r["rgb"]) - ORANGE).max() <= 10 for r in rows)
    # one block of 30 clips holds every shape x motion x size once
    assert len({(r["attributes"]["shape"], r["attributes"]["motion"], r["attributes"]["size"])
                for r in rows[:30]}) == len(clip_combinations(("orange",))) == 30
    prompts = [json.loads(line) for line in (out / "heldout_prompts.jsonl").read_text().splitlines()]
    assert all("orange" in p["prompt"] for p in prompts)
    assert heldout_prompts(3, colors=("orange", "red")) != heldout_prompts(3)

    capsys.readouterr()
    report = tmp_path / "report"
    assert main(["eval", str(out / "metadata.jsonl"), "--out", str(report), "--color", "orange=240,140,30"]) == 0
    results = json.loads((report / "results.json").read_text())
    assert results["summary"]["color_accuracy"] == 1.0 and results["summary"]["parser_agreement"] == 1.0
    assert results["palette"]["orange"] == list(ORANGE)
    # without being taught the colour the evaluator cannot score it: no colour counted
    assert evaluate(load_items(out / "metadata.jsonl"))["summary"]["counted"]["color_correct"] == 0


def test_cli_errors(tmp_path, capsys):
    assert main(["nano-data", str(tmp_path / "x"), "--clips", "1", "--color", "orange"]) == 2
    assert "RGB" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--out", str(tmp_path / "r"), "--color", "silver=200,200,200"]) == 2
    assert "brightness" in capsys.readouterr().err
