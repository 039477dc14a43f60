"""What a prompt asks for: colour, shape, motion direction and size, read from free English.

The lexicon is written independently of the nano captions (`motif_video.nano.data`): it covers the words of both
the training and the held-out wordings plus common synonyms, and the tests check it against every caption
template rather than sharing a table with the generator.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from ..errors import MotifVideoError
from ..records import JSONL_SUFFIXES, read_jsonl


@dataclass(frozen=True)
class PromptAttributes:
    color: str | None = None
    shape: str | None = None
    motion: str | None = None  # left / right / up / down / static, or up-left ... down-right with diagonals
    size: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


_COLOR = {
    "red": r"red|crimson|scarlet",
    "green": r"green|emerald",
    "blue": r"blue|navy|azure",
    "yellow": r"yellow|golden|gold",
    "cyan": r"cyan|turquoise|aqua|teal",
    "magenta": r"magenta|fuchsia|pink|purple|violet",
    "white": r"white|silver",
}
_SHAPE = {
    "circle": r"circles?|circular|discs?|disks?|dots?|balls?|orbs?|round|rings?",
    "square": r"squares?|boxe?s?|blocks?|cubes?|tiles?|quadrilateral",
    "triangle": r"triangles?|triangular|wedges?|pyramids?",
}
# Shapes beyond the nano three, read only when the evaluator is taught them (`parse_prompt(..., shapes=...)`).
_NEW_SHAPE = {"diamond": r"diamonds?|rhombus(?:es)?|rhombi|lozenges?"}
_SIZE = {
    "small": r"small|smaller|little|tiny|miniature|mini|petite",
    "large": r"large|larger|big|bigger|huge|giant|oversized|enormous",
}
# Direction words; a phrase naming where the object comes FROM is removed first, so "from left to right" is right.
_DIRECTION = {
    "left": r"left(?:ward|wards)?|west(?:ward|wards)?",
    "right": r"right(?:ward|wards)?|east(?:ward|wards)?",
    "up": r"up(?:ward|wards)?|rising|rises?|risen|ascend\w*|climb\w*|lift\w*|soar\w*|north(?:ward|wards)?"
          r"|(?:to|toward|towards) the top",
    "down": r"down(?:ward|wards)?|fall\w*|fell|descend\w*|sink\w*|sank|drop\w*|plummet\w*|south(?:ward|wards)?"
            r"|(?:to|toward|towards) the bottom",
}
# Words that name a vertical side only beside a horizontal one ("the upper left", "the bottom-right corner") and
# the compass diagonals: read only when diagonal motion is asked for.
_DIAGONAL_SIDE = {"up": r"upper|top", "down": r"lower|bottom"}
_COMPASS = re.compile(r"\b(north|south) ?(east|west)(?:ward|wards|erly)?\b")
_STATIC = (
    r"static|stationary|motionless|unmoving|immobile|still|frozen|fixed in place|in place|stays? put|staying put"
    r"|not moving|doesn't move|does not move|no motion|holds? its position|holding its position"
)
_FROM = re.compile(r"\bfrom the (?:left|right|top|bottom)(?: (?:edge|side))?\b|\bfrom (?:left|right|top|bottom)\b")
_UPSIDE = re.compile(r"\bupside down\b|\bleft behind\b|\ball right\b|\bright now\b")


def _find(table: dict[str, str], text: str) -> list[tuple[int, str]]:
    hits = []
    for name, pattern in table.items():
        for m in re.finditer(rf"\b(?:{pattern})\b", text):
            hits.append((m.start(), name))
    return sorted(hits)


def _color_table(new_colors: Iterable[str]) -> dict[str, str]:
    """The colour lexicon plus new colour names; a new name that is a synonym of an old colour (e.g. pink, otherwise
    magenta) now means the new colour only."""
    new = [name for name in dict.fromkeys(new_colors) if name not in _COLOR]
    if not new:
        return _COLOR
    table = {name: "|".join(w for w in pattern.split("|") if w not in new) for name, pattern in _COLOR.items()}
    table.update({name: re.escape(name) for name in new})
    return table


def _direction(motion_text: str, diagonals: bool) -> str | None:
    if diagonals:
        compass = list(_COMPASS.finditer(motion_text))
        if compass:
            vertical, horizontal = compass[-1].groups()
            return f"{'up' if vertical == 'north' else 'down'}-{'right' if horizontal == 'east' else 'left'}"
    directions = _find(_DIRECTION, motion_text)
    if not directions:
        return None
    if diagonals:
        # A vertical and a horizontal direction together ("up and to the right", "toward the top left corner")
        # name the diagonal between them; the last of each kind counts.
        vertical = [n for _, n in sorted(directions + _find(_DIAGONAL_SIDE, motion_text)) if n in ("up", "down")]
        horizontal = [n for _, n in directions if n in ("left", "right")]
        if vertical and horizontal:
            return f"{vertical[-1]}-{horizontal[-1]}"
    # The last direction named is where the object ends up going.
    return directions[-1][1]


def parse_prompt(text: str, colors: Iterable[str] = (), diagonals: bool = False,
                 shapes: Iterable[str] = ()) -> PromptAttributes:
    """Expected attributes of a prompt; a field is None when the prompt does not say (or names two values).
    `colors`: names of colours beyond the nano palette that the prompt may ask for (e.g. ["orange"]);
    `diagonals`: read diagonal directions (up-left, up-right, down-left, down-right) as well as the four axes;
    `shapes`: shapes beyond the nano three that the prompt may ask for (e.g. ["diamond"])."""
    unknown = [name for name in shapes if name not in _NEW_SHAPE]
    if unknown:
        raise MotifVideoError(f"unknown shape {unknown[0]!r}; the evaluator can be taught: {', '.join(_NEW_SHAPE)}")
    shape_table = {**_SHAPE, **{name: _NEW_SHAPE[name] for name in shapes}}
    color_table = _color_table(colors)
    t = " ".join(re.sub(r"[^a-z' ]+", " ", text.lower().replace("-", " ")).split())
    t = _UPSIDE.sub(" ", t)

    def single(table):
        names = {name for _, name in _find(table, t)}
        return names.pop() if len(names) == 1 else None

    motion = _direction(_FROM.sub(" ", t), diagonals)
    if motion is None and re.search(rf"\b(?:{_STATIC})\b", t):
        motion = "static"
    return PromptAttributes(color=single(color_table), shape=single(shape_table), motion=motion, size=single(_SIZE))


def load_prompt_file(path) -> list[dict]:
    """Prompts from a `.txt` (one per line) or `.jsonl` (objects with `prompt` or `caption`) file."""
    path = Path(path)
    if not path.is_file():
        raise MotifVideoError(f"prompt file not found: {path}")
    out = []
    if path.suffix.lower() in JSONL_SUFFIXES:
        for i, row in read_jsonl(path):
            prompt = row.get("prompt") or row.get("caption")
            if not prompt:
                raise MotifVideoError(f"{path}:{i}: row has no 'prompt' or 'caption'")
            out.append({**row, "prompt": str(prompt)})
    else:
        out = [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise MotifVideoError(f"{path} holds no prompts")
    return out
