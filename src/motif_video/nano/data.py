"""Procedural data for the nano model: one coloured shape on a plain dark background, captioned in plain English.

Every clip is a function of (seed, kind, index) alone, so datasets are reproducible, any sample can be rebuilt
without generating the ones before it, and the attribute combinations are balanced in blocks (each block of 210
clips holds every colour x shape x motion x size once). The object keeps its size and colour, stays fully inside
the frame and moves in a straight line at constant speed, which is what the analytic evaluator
(`motif_video.eval`) checks for.

Captions come from two disjoint wordings: `train_caption` (templates and synonyms used in the training data) and
`heldout_caption` (other templates and verbs, for evaluation prompts), so the evaluation can tell memorised
phrasing from understood attributes.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import product
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import MotifVideoError
from ..files import atomic_write_text

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 220, 50),
    "cyan": (40, 210, 220),
    "magenta": (210, 50, 200),
    "white": (235, 235, 235),
}
# A palette is {colour name: RGB}; COLORS is the nano model's. Datasets of other colours (e.g. to teach a trained
# model a new one, docs/finetune.md) pass their own.
Palette = Mapping[str, tuple[int, int, int]]
SHAPES = ("circle", "square", "triangle")
# A shape the nano model never sees in training: a new concept for fine-tuning (docs/finetune.md). A diamond fills
# half its bounding box like the triangle, but touches none of the box's corners.
NEW_SHAPES = ("diamond",)
ALL_SHAPES = SHAPES + NEW_SHAPES
MOTIONS = ("left", "right", "up", "down", "static")
# Directions the nano model never sees in training: a new concept for fine-tuning (docs/finetune.md). Each motion's
# direction is a unit step in image coordinates (x right, y down); "static" has none.
DIAGONAL_MOTIONS = ("up-left", "up-right", "down-left", "down-right")
MOTION_VECTORS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0),
    **{f"{v}-{u}": ((-1.0 if u == "left" else 1.0) / 2 ** 0.5, (-1.0 if v == "up" else 1.0) / 2 ** 0.5)
       for v in ("up", "down") for u in ("left", "right")},
}
ALL_MOTIONS = MOTIONS + DIAGONAL_MOTIONS
SIZES = ("small", "large")
BACKGROUND = (18, 18, 22)

# Half the side of the object's bounding box, as a fraction of the frame side. The gap between the two ranges
# keeps "small" and "large" apart even after the per-clip jitter. "Small" is 22-26 px, about 3 latent pixels at
# 64x64: at 17-20 px the codec kept most small squares but the transformer rounded every one of them into a circle
# (docs/nano.md, "Small squares and the token grid").
HALF_EXTENT = {"small": (0.17, 0.20), "large": (0.26, 0.29)}
# Total travel over a moving clip, as a fraction of the frame side (capped by the room the object has).
TRAVEL = (0.30, 0.50)
MARGIN_PX = 2.0  # clear of the border (anti-aliasing reaches ~1 px past an acute vertex), so never cut off
COLOR_JITTER = 10  # per-channel, per-clip: colours vary a little but never toward a neighbouring colour

_KIND_ID = {"clip": 0, "image": 1, "prompt": 2, "condition": 3}


_COLOR_NAME = re.compile(r"[a-z]+")


def parse_color(spec: str) -> tuple[str, tuple[int, int, int]]:
    """`NAME=R,G,B` (a new colour, channels 0-255) or a palette name such as `red` -> (name, RGB)."""
    name, eq, value = str(spec).partition("=")
    name = name.strip().lower()
    if not _COLOR_NAME.fullmatch(name):
        raise MotifVideoError(f"colour {spec!r}: the name must be one lowercase word, as in orange=240,140,30")
    if not eq:
        if name not in COLORS:
            raise MotifVideoError(f"colour {name!r} is not in the nano palette ({', '.join(COLORS)}); give its "
                                  f"RGB as {name}=R,G,B")
        return name, COLORS[name]
    try:
        rgb = tuple(int(v) for v in value.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise MotifVideoError(f"colour {spec!r}: expected {name}=R,G,B with three integers in 0-255")
    if name in COLORS and rgb != COLORS[name]:
        raise MotifVideoError(f"colour {name!r} is already in the nano palette as {COLORS[name]}; pick another name")
    return name, rgb


def parse_palette(specs: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """A palette from `parse_color` specs (each name once)."""
    palette: dict[str, tuple[int, int, int]] = {}
    for spec in specs:
        name, rgb = parse_color(spec)
        if name in palette:
            raise MotifVideoError(f"colour {name!r} is given twice")
        palette[name] = rgb
    return palette


@dataclass(frozen=True)
class Attributes:
    color: str
    shape: str
    size: str
    motion: str | None  # None for images

    def __post_init__(self):
        # the colour is any palette's name (render checks it against the palette it draws with)
        if not _COLOR_NAME.fullmatch(str(self.color)) or self.shape not in ALL_SHAPES or self.size not in SIZES:
            raise MotifVideoError(f"unknown attributes {self}")
        if self.motion is not None and self.motion not in ALL_MOTIONS:
            raise MotifVideoError(f"unknown motion {self.motion!r}")


@dataclass
class Sample:
    attributes: Attributes
    frames: np.ndarray  # (T, S, S, 3) uint8
    caption: str
    centers: np.ndarray  # (T, 2) object centre (x, y) in pixels, pixel centres at i + 0.5
    half_extent: float  # pixels
    color_rgb: tuple[int, int, int]
    condition_caption: str = ""  # clips: the motion alone, the prompt that goes with the first frame as the image


@lru_cache(maxsize=None)
def clip_combinations(colors: tuple[str, ...] = tuple(COLORS), motions: tuple[str, ...] = MOTIONS,
                      shapes: tuple[str, ...] = SHAPES, sizes: tuple[str, ...] = SIZES) -> tuple[Attributes, ...]:
    return tuple(Attributes(c, s, z, m) for c, s, m, z in product(colors, shapes, motions, sizes))


@lru_cache(maxsize=None)
def image_combinations(colors: tuple[str, ...] = tuple(COLORS), shapes: tuple[str, ...] = SHAPES,
                       sizes: tuple[str, ...] = SIZES) -> tuple[Attributes, ...]:
    return tuple(Attributes(c, s, z, None) for c, s, z in product(colors, shapes, sizes))


def _rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KIND_ID[kind], index)))


def balanced_attributes(kind: str, index: int, seed: int, colors: Sequence[str] = tuple(COLORS),
                        motions: Sequence[str] = MOTIONS, shapes: Sequence[str] = SHAPES,
                        sizes: Sequence[str] = SIZES) -> Attributes:
    """Attributes of sample `index`: combinations are dealt in shuffled blocks, so any prefix is near balanced."""
    colors, shapes, sizes = tuple(colors), tuple(shapes), tuple(sizes)
    combos = (image_combinations(colors, shapes, sizes) if kind == "image"
              else clip_combinations(colors, tuple(motions), shapes, sizes))
    block, pos = divmod(index, len(combos))
    return combos[_block_order(seed, kind, block, len(combos))[pos]]


@lru_cache(maxsize=64)
def _block_order(seed: int, kind: str, block: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_KIND_ID[kind], 1 << 30, block)))
    return rng.permutation(n)


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    """Distance in pixels to the shape's edge (negative inside) for offsets from its centre; bounding box 2h x 2h."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - h
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - h
    if shape == "diamond":  # corners at (+-h, 0) and (0, +-h): every edge at 45 degrees
        return (np.abs(dx) + np.abs(dy) - h) * np.float32(1 / np.sqrt(2.0))
    # Upright triangle with apex (0, -h) and base corners (-h, h), (h, h): fills exactly half its bounding box.
    # Each term is the distance to one edge's line; inside, the largest of the three is the distance to the edge.
    inv = 1.0 / np.sqrt(5.0)
    base = dy - h
    left = (-2.0 * (dx + h) - (dy - h)) * inv
    right = (2.0 * (dx - h) - (dy - h)) * inv
    return np.maximum(base, np.maximum(left, right))


def render(attrs: Attributes, frames: int, size: int, rng: np.random.Generator, palette: Palette = COLORS) -> Sample:
    """Draw one clip (frames >= 1) of `size` x `size` pixels; returns the sample without a caption."""
    if attrs.color not in palette:
        raise MotifVideoError(f"colour {attrs.color!r} is not in the palette ({', '.join(palette)})")
    lo, hi = HALF_EXTENT[attrs.size]
    h = float(rng.uniform(lo, hi)) * size
    color = np.clip(np.array(palette[attrs.color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
    low, high = h + MARGIN_PX, size - h - MARGIN_PX  # allowed range of the centre on each axis
    room = high - low
    motion = attrs.motion if (attrs.motion and frames > 1) else "static"
    travel = 0.0 if motion == "static" else min(float(rng.uniform(*TRAVEL)) * size, room)
    steps = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    if motion in DIAGONAL_MOTIONS:
        # The same path length, split over both axes; each axis's share of the path must fit.
        ux, uy = MOTION_VECTORS[motion]
        x0, y0 = (float(rng.uniform(low + max(-u * travel, 0.0), high - max(u * travel, 0.0))) for u in (ux, uy))
        cx, cy = x0 + ux * travel * steps, y0 + uy * travel * steps  # (T,) each, constant speed
    else:
        # Along the motion axis the whole path must fit; across it, anywhere that fits.
        along0 = float(rng.uniform(low + (travel if motion in ("left", "up") else 0.0),
                                   high - (travel if motion in ("right", "down") else 0.0)))
        across = float(rng.uniform(low, high))
        sign = -1.0 if motion in ("left", "up") else 1.0
        along = along0 + sign * travel * steps  # (T,) constant speed
        if motion in ("up", "down"):
            cx, cy = np.full(frames, across), along
        else:
            cx, cy = along, np.full(frames, across)
    coords = np.arange(size, dtype=np.float32) + 0.5
    dx = coords[None, None, :] - cx[:, None, None].astype(np.float32)  # (T, 1, S)
    dy = coords[None, :, None] - cy[:, None, None].astype(np.float32)  # (T, S, 1)
    sd = _signed_distance(attrs.shape, dx, dy, np.float32(h))  # (T, S, S)
    # Coverage of a pixel by the shape, from the distance of its centre to the edge: a one-pixel ramp (anti-alias).
    alpha = np.clip(0.5 - sd, 0.0, 1.0)  # (T, S, S)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for c, (b, f) in enumerate(zip(BACKGROUND, color)):  # per channel: 10x faster than broadcasting over a size-3 axis
        video[..., c] = alpha * np.float32(f - b) + np.float32(b + 0.5)  # + 0.5: round half up on the cast
    return Sample(attrs, video, "", np.stack([cx, cy], axis=1), h, tuple(int(c) for c in color))


# ----------------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------------

# Train and held-out wordings share only the colour names and the canonical shape nouns; templates, motion
# phrases and size words differ, so held-out prompts test understanding rather than recall of exact strings.
# The training side is deliberately varied (several words and sentence orders per attribute), as real captioning
# is: a model that saw one phrase per direction learns the phrase, not the direction (measured: on held-out
# wording, the model trained on five phrases per direction got 65 % all-correct against 84 % on training wording).
TRAIN_WORDS = {
    "size": {"small": ["small", "little", "petite", "mini"], "large": ["large", "big", "giant", "enormous"]},
    "shape": {"circle": ["circle", "disc", "dot", "ball", "orb"], "square": ["square", "block", "box", "cube"],
              "triangle": ["triangle", "wedge", "pyramid"], "diamond": ["diamond", "rhombus", "lozenge"]},
    "motion": {
        "left": ["moving to the left", "moving left", "sliding to the left", "drifting left", "travelling left",
                 "moving from right to left", "shifting to the left", "moving west", "rolling left"],
        "right": ["moving to the right", "moving right", "sliding to the right", "drifting right",
                  "travelling right", "moving from left to right", "shifting to the right", "moving east",
                  "rolling right"],
        "up": ["moving up", "moving upward", "drifting upward", "rising", "floating up", "moving toward the top",
               "lifting off upward", "soaring", "travelling upward"],
        "down": ["moving down", "moving downward", "drifting downward", "falling", "sinking",
                 "moving toward the bottom", "plummeting", "sliding down", "travelling downward"],
        "static": ["staying still", "not moving", "resting in place", "sitting still", "frozen in place",
                   "keeping still"],
        **{f"{v}-{u}": [f"moving diagonally {v} and to the {u}",
                        f"moving to the {'upper' if v == 'up' else 'lower'} {u}",
                        f"drifting toward the {'top' if v == 'up' else 'bottom'} {u} corner",
                        f"moving {'north' if v == 'up' else 'south'}{'west' if u == 'left' else 'east'}",
                        f"sliding {v} and {u}", f"travelling diagonally {v} and {u}"]
           for v in ("up", "down") for u in ("left", "right")},
    },
    "static_adjective": ["static", "stationary", "motionless", "still"],
}
HELDOUT_WORDS = {
    "size": {"small": ["tiny", "miniature"], "large": ["huge", "oversized"]},
    "shape": {"circle": ["circle", "round disk"], "square": ["square", "square tile"],
              "triangle": ["triangle", "triangular shape"], "diamond": ["diamond", "diamond shape"]},
    "motion": {
        "left": ["gliding leftward", "heading toward the left side", "going left"],
        "right": ["gliding rightward", "heading toward the right side", "going right"],
        "up": ["climbing upward", "ascending", "going up"],
        "down": ["descending", "dropping downward", "going down"],
        "static": ["standing still", "staying put", "holding its position"],
        **{f"{v}-{u}": [f"gliding toward the {'top' if v == 'up' else 'bottom'}-{u} corner",
                        f"heading {'upward' if v == 'up' else 'downward'} and to the {u}",
                        f"going {v} and {u} at once"]
           for v in ("up", "down") for u in ("left", "right")},
    },
    "static_adjective": ["unmoving", "immobile"],
}

TRAIN_TEMPLATES = [
    "a {size} {color} {shape} {motion}",
    "a {color} {shape} {motion}",
    "a {size} {color} {shape} {motion} on a dark background",
    "video of a {size} {color} {shape} {motion}",
    "a {size} {color} {shape} that is {motion}",
    "a {size} {shape} in {color} {motion}",
    "a {color} {size} {shape} {motion}",
    "a {size} {color} {shape} is {motion}",
    "a {size} {color} {shape}, {motion}",
]
TRAIN_STATIC_TEMPLATES = ["a {adjective} {color} {shape}", "a {adjective} {size} {color} {shape}",
                          "a {adjective} {shape} in {color}"]
TRAIN_IMAGE_TEMPLATES = [
    "a {size} {color} {shape}",
    "a {color} {shape} on a dark background",
    "a picture of a {size} {color} {shape}",
    "an image of a {color} {size} {shape}",
    "a {size} {shape} in {color}",
]
HELDOUT_TEMPLATES = [
    "there is a {size} {color} {shape} {motion} in this clip",
    "the clip shows a {color} {shape} ({size}) {motion}",
    "one {size} {shape}, colored {color}, {motion}",
    "{motion}, a {size} {color} {shape}",
]
# A clip's condition caption names only what its first frame does not show: the motion (training wording).
TRAIN_CONDITION_TEMPLATES = ["{motion}", "the object is {motion}", "the shape is {motion}", "it is {motion}"]
HELDOUT_STATIC_TEMPLATES = ["an {adjective} {color} {shape} of {size} size", "a {color} {shape}, {adjective}"]
HELDOUT_IMAGE_TEMPLATES = ["a photo showing one {size} {color} {shape}", "{color} {shape}, {size}"]


def _choose(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _fix_articles(text: str) -> str:
    return re.sub(r"\b(a|an) (\w)", lambda m: ("an " if m.group(2) in "aeiou" else "a ") + m.group(2), text)


def _caption(attrs: Attributes, rng: np.random.Generator, words: dict, templates, static_templates, image_templates):
    slots = {
        "color": attrs.color,
        "size": _choose(rng, words["size"][attrs.size]),
        "shape": _choose(rng, words["shape"][attrs.shape]),
    }
    if attrs.motion is None:
        template = _choose(rng, image_templates)
    else:
        slots["motion"] = _choose(rng, words["motion"][attrs.motion])
        pool = templates + (static_templates if attrs.motion == "static" else [])
        template = _choose(rng, pool)
        slots["adjective"] = _choose(rng, words["static_adjective"])
    return _fix_articles(template.format(**slots))


def train_caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A caption in the training wording, e.g. 'a small red circle moving to the left'."""
    return _caption(attrs, rng, TRAIN_WORDS, TRAIN_TEMPLATES, TRAIN_STATIC_TEMPLATES, TRAIN_IMAGE_TEMPLATES)


def condition_caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A clip's motion alone in the training wording, e.g. 'the object is drifting left'."""
    return _choose(rng, TRAIN_CONDITION_TEMPLATES).format(motion=_choose(rng, TRAIN_WORDS["motion"][attrs.motion]))


def heldout_caption(attrs: Attributes, rng: np.random.Generator) -> str:
    """A caption in the evaluation-only wording, e.g. 'one huge triangle, colored cyan, ascending'."""
    return _caption(attrs, rng, HELDOUT_WORDS, HELDOUT_TEMPLATES, HELDOUT_STATIC_TEMPLATES, HELDOUT_IMAGE_TEMPLATES)


# ----------------------------------------------------------------------------------------------------------------
# Samples and datasets
# ----------------------------------------------------------------------------------------------------------------


def make_clip(index: int, seed: int, frames: int = 17, size: int = 64, palette: Palette = COLORS,
              motions: Sequence[str] = MOTIONS, shapes: Sequence[str] = SHAPES, sizes: Sequence[str] = SIZES
              ) -> Sample:
    attrs = balanced_attributes("clip", index, seed, tuple(palette), motions, shapes, sizes)
    rng = _rng(seed, "clip", index)
    sample = render(attrs, frames, size, rng, palette)
    sample.caption = train_caption(attrs, rng)
    sample.condition_caption = condition_caption(attrs, _rng(seed, "condition", index))  # its own stream
    return sample


def make_image(index: int, seed: int, size: int = 64, palette: Palette = COLORS,
               shapes: Sequence[str] = SHAPES, sizes: Sequence[str] = SIZES) -> Sample:
    attrs = balanced_attributes("image", index, seed, tuple(palette), shapes=shapes, sizes=sizes)
    rng = _rng(seed, "image", index)
    sample = render(attrs, 1, size, rng, palette)
    sample.caption = train_caption(attrs, rng)
    return sample


def heldout_prompts(n: int, seed: int = 0, colors: Sequence[str] = tuple(COLORS),
                    motions: Sequence[str] = MOTIONS, shapes: Sequence[str] = SHAPES,
                    sizes: Sequence[str] = SIZES) -> list[dict]:
    """`n` evaluation prompts in the held-out wording with their attributes, balanced over clip combinations."""
    out = []
    for i in range(n):
        attrs = balanced_attributes("prompt", i, seed, colors, motions, shapes, sizes)
        out.append({"prompt": heldout_caption(attrs, _rng(seed, "prompt", i)), "attributes": asdict(attrs)})
    return out


def train_prompts(n: int, seed: int = 0, colors: Sequence[str] = tuple(COLORS)) -> list[str]:
    """`n` clip prompts in the training wording, balanced over clip combinations (what a distilled student learns on:
    the teacher's own prompt distribution, never the held-out wording)."""
    return [train_caption(balanced_attributes("clip", i, seed, colors), _rng(seed, "prompt", i)) for i in range(n)]


def _record(path: str, sample: Sample, fps: float) -> dict:
    t, s = sample.frames.shape[0], sample.frames.shape[1]
    return {
        "path": path,
        "caption": sample.caption,
        **({"condition_caption": sample.condition_caption} if sample.condition_caption else {}),
        "attributes": asdict(sample.attributes),
        "num_frames": int(t),
        "height": int(s),
        "width": int(s),
        "fps": float(fps) if t > 1 else None,
        "start_xy": [round(float(v), 3) for v in sample.centers[0]],
        "end_xy": [round(float(v), 3) for v in sample.centers[-1]],
        "half_extent": round(sample.half_extent, 3),
        "rgb": list(sample.color_rgb),
    }


_OWN_FILES = re.compile(r"^(clip|image)_\d+\.(mp4|png|txt|condition\.txt)$")


# The procedural data is for small models; beyond this a frame alone is hundreds of MB and H.264 levels run out.
MAX_SIZE = 4096
# Peak bytes per pixel per frame while one clip renders: four float32 (T, S, S) planes plus the uint8 RGB video.
RENDER_BYTES_PER_PIXEL = 4 * 4 + 3


def _check_render_memory(frames: int, size: int) -> None:
    import torch

    from ..commands.estimate import available_memory

    need, have = frames * size * size * RENDER_BYTES_PER_PIXEL, available_memory(torch.device("cpu"))
    if need > have:
        raise MotifVideoError(f"a {frames}-frame clip of {size}x{size} needs about {need / 2**30:.1f} GiB to render "
                              f"but only {have / 2**30:.1f} GiB of memory is available; lower --size or --frames")


def _chosen(values: Sequence[str], known: Sequence[str], what: str, plural: str) -> tuple[str, ...]:
    """`values` without repeats, each one of `known`, at least one."""
    values = tuple(dict.fromkeys(values))
    unknown = [v for v in values if v not in known]
    if unknown:
        raise MotifVideoError(f"unknown {what} {unknown[0]!r}; choose from {', '.join(known)}")
    if not values:
        raise MotifVideoError(f"no {plural} to draw")
    return values


def write_dataset(
    out_dir,
    clips: int,
    images: int,
    frames: int = 17,
    size: int = 64,
    seed: int = 0,
    fps: float = 24,
    eval_prompts: int = 0,
    overwrite: bool = False,
    progress=None,
    palette: Palette = COLORS,
    motions: Sequence[str] = MOTIONS,
    shapes: Sequence[str] = SHAPES,
    sizes: Sequence[str] = SIZES,
) -> dict:
    """Write `clip_NNNNN.mp4` / `image_NNNNN.png` with same-name `.txt` captions, `metadata.jsonl` (path, caption,
    attributes) and, if asked, `heldout_prompts.jsonl`, drawing the colours of `palette`, the shapes of `shapes`
    in the sizes of `sizes`, and the clip motions of `motions`. Returns a summary dict."""
    from ..pipeline.video_io import write_video
    from ..train.data import CONDITION_CAPTION_SUFFIX

    if clips < 0 or images < 0 or clips + images == 0:
        raise MotifVideoError("ask for at least one clip or image (--clips / --images)")
    if frames < 2:
        raise MotifVideoError(f"clips need at least 2 frames, got {frames} (images are the 1-frame samples)")
    if size < 16 or size % 2 or size > MAX_SIZE:
        raise MotifVideoError(f"size must be an even number in [16, {MAX_SIZE}] (H.264 4:2:0 needs even sides), "
                              f"got {size}")
    if not (isinstance(fps, (int, float)) and 0 < fps < float("inf")):
        raise MotifVideoError(f"fps must be a positive number, got {fps}")
    if not palette:
        raise MotifVideoError("the palette holds no colours")
    motions = _chosen(motions, ALL_MOTIONS, "motion", "motions")
    shapes = _chosen(shapes, ALL_SHAPES, "shape", "shapes")
    sizes = _chosen(sizes, SIZES, "object size", "object sizes")
    _check_render_memory(frames, size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MotifVideoError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    existing = [p for p in out.iterdir() if not p.name.startswith(".")]
    if existing and not overwrite:
        raise MotifVideoError(f"{out} is not empty; pass --overwrite to replace a previous nano dataset there")
    for p in existing:
        if _OWN_FILES.match(p.name) and p.is_file():
            p.unlink()  # stale samples from a bigger earlier run would otherwise join the dataset

    records = []
    for i in range(clips):
        sample = make_clip(i, seed, frames, size, palette, motions, shapes, sizes)
        name = f"clip_{i:05d}"
        write_video(sample.frames, out / f"{name}.mp4", fps=fps)
        atomic_write_text(out / f"{name}.txt", sample.caption + "\n")
        atomic_write_text(out / f"{name}{CONDITION_CAPTION_SUFFIX}", sample.condition_caption + "\n")
        records.append(_record(f"{name}.mp4", sample, fps))
        if progress:
            progress(1)
    for i in range(images):
        sample = make_image(i, seed, size, palette, shapes, sizes)
        name = f"image_{i:05d}"
        write_video(sample.frames, out / f"{name}.png")
        atomic_write_text(out / f"{name}.txt", sample.caption + "\n")
        records.append(_record(f"{name}.png", sample, fps))
        if progress:
            progress(1)
    atomic_write_text(out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    if eval_prompts:
        prompts = heldout_prompts(eval_prompts, seed, tuple(palette), motions, shapes, sizes)
        atomic_write_text(out / "heldout_prompts.jsonl", "".join(json.dumps(p) + "\n" for p in prompts))
    return {"out_dir": str(out), "clips": clips, "images": images, "eval_prompts": eval_prompts,
            "colors": list(palette), "motions": list(motions), "shapes": list(shapes),
            "sizes": list(sizes)}

