from itertools import product

import pytest

from motif_video.errors import MotifVideoError
from motif_video.eval.prompts import PromptAttributes, load_prompt_file, parse_prompt
from motif_video.nano import data


def _every_caption(words, templates, static_templates, image_templates, motions=data.MOTIONS):
    """Every template with every attribute combination, cycling through all synonyms of each slot (every word of
    the wording appears in every template), with the attributes each caption must parse to."""
    for color, shape, motion, size in product(data.COLORS, data.SHAPES, motions, data.SIZES):
        slots = [words["shape"][shape], words["size"][size], words["motion"][motion], words["static_adjective"]]
        for tpl in templates + (static_templates if motion == "static" else []):
            for k in range(max(len(w) for w in slots)):
                shape_word, size_word, motion_word, adjective = (w[k % len(w)] for w in slots)
                text = data._fix_articles(tpl.format(color=color, shape=shape_word, size=size_word,
                                                     motion=motion_word, adjective=adjective))
                yield text, PromptAttributes(color, shape, motion, size if "{size}" in tpl else None)
    for color, shape, size in product(data.COLORS, data.SHAPES, data.SIZES):
        for tpl in image_templates:
            for shape_word, size_word in product(words["shape"][shape], words["size"][size]):
                text = data._fix_articles(tpl.format(color=color, shape=shape_word, size=size_word))
                yield text, PromptAttributes(color, shape, None, size if "{size}" in tpl else None)


WORDINGS = {
    "train": (data.TRAIN_WORDS, data.TRAIN_TEMPLATES, data.TRAIN_STATIC_TEMPLATES, data.TRAIN_IMAGE_TEMPLATES),
    "heldout": (data.HELDOUT_WORDS, data.HELDOUT_TEMPLATES, data.HELDOUT_STATIC_TEMPLATES,
                data.HELDOUT_IMAGE_TEMPLATES),
}


@pytest.mark.parametrize("wording", ["train", "heldout"])
def test_parses_every_caption_template_and_synonym(wording):
    n = 0
    for text, want in _every_caption(*WORDINGS[wording]):
        assert parse_prompt(text) == want, text
        n += 1
    assert n > 1000


@pytest.mark.parametrize("wording", ["train", "heldout"])
def test_parses_every_caption_with_diagonals(wording):
    # With diagonals known, captions of all nine motions parse, and the old ones exactly as before.
    motions = set()
    for text, want in _every_caption(*WORDINGS[wording], motions=data.ALL_MOTIONS):
        assert parse_prompt(text, diagonals=True) == want, text
        motions.add(want.motion)
    assert motions >= set(data.DIAGONAL_MOTIONS)


@pytest.mark.parametrize(
    "text, want, base",
    [
        ("a red circle moving up and to the right", "up-right", "right"),
        ("a box heading northeast", "up-right", None),
        ("a disc going south-west", "down-left", "left"),
        ("a wedge drifting toward the lower left", "down-left", "left"),
        ("a dot sliding to the bottom-right corner", "down-right", "right"),
        ("a ball moving from the bottom left to the top right", "up-right", "right"),
        ("a box moving to the upper left, then descending", "down-left", "down"),  # the last vertical counts
        ("a cube falling", "down", "down"),
        ("a square moving from left to right", "right", "right"),
        ("a static square", "static", "static"),
    ],
)
def test_diagonal_wording(text, want, base):
    assert parse_prompt(text, diagonals=True).motion == want
    assert parse_prompt(text).motion == base


@pytest.mark.parametrize(
    "text, want",
    [
        ("a small red circle moving to the left", PromptAttributes("red", "circle", "left", "small")),
        ("a large cyan triangle drifting upward", PromptAttributes("cyan", "triangle", "up", "large")),
        ("a static white square", PromptAttributes("white", "square", "static", None)),
        ("A Big GREEN ball rolls from left to right.", PromptAttributes("green", "circle", "right", "large")),
        ("a yellow box that falls toward the bottom", PromptAttributes("yellow", "square", "down", None)),
        ("purple wedge, motionless", PromptAttributes("magenta", "triangle", "static", None)),
        ("a tiny blue disk sinking", PromptAttributes("blue", "circle", "down", "small")),
        ("an upside down red triangle", PromptAttributes("red", "triangle", None, None)),
        ("a red and blue circle", PromptAttributes(None, "circle", None, None)),
        ("a sunset over the sea", PromptAttributes()),
    ],
)
def test_free_wording(text, want):
    assert parse_prompt(text) == want


def test_load_prompt_file(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n a blue square moving up \n")
    assert [p["prompt"] for p in load_prompt_file(tmp_path / "p.txt")] == ["a red circle", "a blue square moving up"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"caption": "b", "seed": 3}\n')
    assert load_prompt_file(tmp_path / "p.jsonl") == [{"prompt": "a"}, {"caption": "b", "seed": 3, "prompt": "b"}]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"nope": 1}\n')
    with pytest.raises(MotifVideoError, match=r"bad.jsonl:2"):
        load_prompt_file(tmp_path / "bad.jsonl")
    with pytest.raises(MotifVideoError, match="not found"):
        load_prompt_file(tmp_path / "missing.txt")
