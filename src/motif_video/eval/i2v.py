"""Image-to-video evaluation: does a clip continue the image it was given, in the direction its prompt names?

Four checks per (clip, first image, prompt), all analytic (`metrics.measure_clip`):

- keeps colour / keeps shape: the clip's object has the colour and shape class the image's object has (the image
  decides these, not the prompt: "moving left" with a picture of a green triangle asks for a green triangle);
- direction: the object moves the way the prompt says (as in text-to-video scoring; a prompt naming no direction
  is not scored on it);
- frame 0 close: the clip starts from the image. Pixels of frame 0 whose colour differs from the image's by more
  than `FRAME0_CHANGE` are counted, as a fraction of the image's object area: 0 for the image itself, about 2 for
  the same object moved clear of where it was, about 1 for another colour in the same place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import MotifVideoError
from ..nano.data import COLORS, Palette
from ..pipeline.video_io import read_video
from ..records import JSONL_SUFFIXES, read_jsonl
from .metrics import MIN_AREA_PX, measure_clip, score_clip
from .prompts import PromptAttributes, parse_prompt
from .report import load_items, store_report

# RGB distance (0..441) above which a frame-0 pixel counts as changed: well above H.264's ~10-unit colour noise,
# below half the 120-190 distance between neighbouring palette colours and the object-background contrast.
FRAME0_CHANGE = 60.0
# Changed pixels, as a fraction of the image's object area, that a clip starting from the image stays below. The
# anti-aliased rim of a re-encoded object changes a thin ring (~0.1-0.2 of a small object's area); a displaced or
# recoloured object changes about its whole area or more.
FRAME0_TOLERANCE = 0.5
IMAGE_SUFFIX = ".image.png"  # in a clip folder: `clip.mp4`, `clip.txt` and the first image `clip.image.png`
CHECKS = ("keeps_color", "keeps_shape", "direction_correct", "first_frame_close")


def load_i2v_items(source) -> list[dict]:
    """(clip, prompt, image) triples: a folder where each clip has `<name>.txt` and `<name>.image.png`, or a JSONL
    file whose rows also give `image` (relative to the file)."""
    items = load_items(source)
    source = Path(source)
    if source.is_dir():
        for item in items:
            item["image"] = Path(item["path"]).with_suffix(IMAGE_SUFFIX)
    elif source.suffix.lower() in JSONL_SUFFIXES:
        rows = [row for _, row in read_jsonl(source)]
        for i, (item, row) in enumerate(zip(items, rows), start=1):
            if not row.get("image"):
                raise MotifVideoError(f"{source}:{i}: row has no 'image' (the first frame the clip was made from)")
            image = Path(row["image"])
            item["image"] = image if image.is_absolute() else source.parent / image
    for item in items:
        if not Path(item["image"]).is_file():
            raise MotifVideoError(f"first image {item['image']} of clip {item['path']} not found")
    return items


def _image_like(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The image (H, W, 3) uint8 at the clip's size, resized as the pipeline resizes a first frame."""
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.LANCZOS))


def first_frame_change(frame0: np.ndarray, image: np.ndarray) -> float:
    """Pixels of `frame0` that differ from `image` by more than FRAME0_CHANGE, per pixel of the image's object."""
    image = _image_like(image, *frame0.shape[:2])
    changed = np.linalg.norm(frame0.astype(np.float32) - image.astype(np.float32), axis=-1) > FRAME0_CHANGE
    seen = measure_clip(image[None])
    background = np.asarray(seen.background_rgb, dtype=np.float32)
    contrast = np.linalg.norm(image.astype(np.float32) - background, axis=-1)
    area = max(int((contrast > 0.5 * contrast.max()).sum()) if contrast.max() > 0 else 0, MIN_AREA_PX)
    return float(changed.sum()) / area


def evaluate_i2v_clip(frames: np.ndarray, image: np.ndarray, prompt: str, palette: Palette = COLORS,
                      diagonals: bool = False, shapes: Sequence[str] = ()) -> dict:
    expected = parse_prompt(prompt, palette, diagonals, shapes)
    clip = measure_clip(frames, palette, diagonals, shapes)
    first = measure_clip(image[None], palette, shapes=shapes)
    direction = score_clip(clip, PromptAttributes(motion=expected.motion))["direction_correct"]
    change = first_frame_change(frames[0], image)
    checks = {
        "keeps_color": first.color is not None and clip.color == first.color,
        "keeps_shape": first.shape is not None and clip.shape == first.shape,
        "direction_correct": direction,
        "first_frame_close": change <= FRAME0_TOLERANCE,
    }
    checks["all_correct"] = all(v for v in checks.values() if v is not None)
    return {"prompt": prompt, "expected": {**expected.to_dict(), "color": first.color, "shape": first.shape},
            "measured": clip.to_dict(), "first_frame_change": round(change, 4), **checks}


def evaluate_i2v(items: list[dict], progress: Callable[[int], None] | None = None,
                 palette: Palette = COLORS, diagonals: bool = False, shapes: Sequence[str] = ()) -> dict:
    """Per-clip results and their rates; a clip or image that cannot be read fails every check."""
    clips = []
    for item in items:
        try:
            row = evaluate_i2v_clip(read_video(item["path"]), read_video(item["image"])[0], item["prompt"], palette,
                                    diagonals, shapes)
        except MotifVideoError as e:
            row = {"prompt": item["prompt"], "measured": None, "error": str(e),
                   **{k: False for k in (*CHECKS, "all_correct")}}
        row["path"], row["image"] = os.fspath(item["path"]), os.fspath(item["image"])
        clips.append(row)
        if progress:
            progress(1)
    return {"summary": aggregate_i2v(clips), "clips": clips}


def _rate(values) -> float | None:
    values = [bool(v) for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def aggregate_i2v(clips: list[dict]) -> dict:
    return {"clips": len(clips), "errors": sum(1 for c in clips if c.get("error")),
            **{k: _rate(c[k] for c in clips) for k in (*CHECKS, "all_correct")},
            "counted": {k: sum(1 for c in clips if c[k] is not None) for k in (*CHECKS, "all_correct")}}


LABELS = {"keeps_color": "keeps the image's colour", "keeps_shape": "keeps the image's shape",
          "direction_correct": "follows the prompt's direction", "first_frame_close": "frame 0 close to the image",
          "all_correct": "all right"}


def markdown_i2v(results: dict, title: str) -> str:
    s = results["summary"]
    lines = [f"# {title}", "", f"{s['clips']} clips" + (f", {s['errors']} unreadable" if s["errors"] else "") + ".",
             "", "| check | score | clips |", "|---|---:|---:|"]
    for key, label in LABELS.items():
        score = "n/a" if s[key] is None else f"{100 * s[key]:.2f}%"
        lines.append(f"| {label} | {score} | {s['counted'][key]} |")
    return "\n".join(lines) + "\n"


def write_i2v_report(results: dict, out_dir, title: str = "motif-video eval (image-to-video)") -> dict:
    return store_report(results, out_dir, markdown_i2v(results, title), path_keys=("path", "image"))
