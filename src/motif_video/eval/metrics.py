"""Analytic measurements of a clip showing one object on a plain background; no learned weights.

The nano world (`motif_video.nano.data`) is simple enough that what a prompt asks for can be measured directly:
the object is whatever differs from the background colour; its colour is the hue of its interior; its shape follows
from how it fills its bounding box; its motion from the straight-line fit of its centroid. The consistency and
flicker measures mirror VBench's dimensions of the same names with pixel statistics in place of DINO/CLIP features.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..errors import MotifVideoError
from ..nano.data import COLORS, DIAGONAL_MOTIONS, MOTION_VECTORS, Palette
from .prompts import PromptAttributes

# A clip whose strongest pixel differs from the background by less than this (RGB distance, 0..441) has no object.
MIN_CONTRAST = 30.0
MIN_AREA_PX = 4
# Displacement over the whole clip below this fraction of the frame side reads as "static". The nano data moves
# moving objects by at least 0.3 of the side and static ones not at all.
STATIC_FRACTION = 0.1
# Colours with HSV saturation below this are achromatic: "white" in the nano palette, which has no other; a grey
# taught to the evaluator is told from white by brightness.
WHITE_SATURATION = 0.3
# A colour taught to the evaluator must be this far from every other of its kind: in hue (degrees) for chromatic
# colours, in HSV value for achromatic ones. The palette's hue neighbours are 41-79 degrees apart; generated objects
# scatter a few degrees around their colour, and a boundary (half the gap) closer than 10 degrees would read that
# scatter as the other colour. White is V = 0.92 and the background 0.09.
MIN_HUE_GAP_DEGREES = 20.0
MIN_VALUE_GAP = 0.2
# Colour difference (RGB distance) beyond a codec-noise allowance at which two views of the object count as
# different objects. H.264 4:2:0 moves the interior colour of a small object by up to ~10 units between frames;
# neighbouring palette colours are 120-190 apart.
COLOR_NOISE_ALLOWANCE = 12.0
COLOR_SIMILARITY_SCALE = 128.0
# Mean absolute background change (fraction of the intensity range) that scores 0 background consistency.
BACKGROUND_TOLERANCE = 0.25

# Shape prototypes in (bounding-box fill ratio, mean corner fill, |bottom - top corner fill|). An upright triangle
# fills half its box, touches the box only along its base (bottom corner patches ~3/4 full, top ones empty);
# a circle fills pi/4 and no corner; a square fills everything.
SHAPE_PROTOTYPES = {
    "circle": (math.pi / 4, 0.0, 0.0),
    "square": (1.0, 1.0, 0.0),
    "triangle": (0.5, 0.375, 0.75),
}
# Taught on request (`measure_clip(..., shapes=["diamond"])`): a diamond fills half its box and no corner.
NEW_SHAPE_PROTOTYPES = {"diamond": (0.5, 0.0, 0.0)}
# The fill ratio is the main cue (it separates the three shapes on its own for clean renders); corner patches are
# only a few pixels on small objects, and 4:2:0 chroma blurs them, so they get less weight.
SHAPE_WEIGHTS = (4.0, 1.0, 1.0)
CORNER_FRACTION = 0.15  # corner patch side, as a fraction of the bounding-box side


@dataclass
class ClipMeasurement:
    num_frames: int
    height: int
    width: int
    background_rgb: list[float]
    detected: float  # fraction of frames in which an object was found
    color: str | None = None
    object_rgb: list[float] | None = None
    shape: str | None = None
    fill_ratio: float | None = None
    corner_fill: float | None = None
    corner_asymmetry: float | None = None
    motion: str | None = None  # None for single frames and when the object is found in fewer than two frames
    displacement: list[float] | None = None  # (dx, dy) in pixels over the clip, y pointing down
    subject_consistency: float | None = None  # 0..1, higher is better
    background_consistency: float | None = None  # 0..1, higher is better
    temporal_flicker: float | None = None  # mean |background change| between frames, 0..1, LOWER is better

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Small image operations in numpy (no scipy dependency)
# ----------------------------------------------------------------------------------------------------------------


def _shift0(a: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Move content by k along axis (positive: toward higher indices), filling with zeros."""
    out = np.zeros_like(a)
    n = a.shape[axis]
    if abs(k) >= n:
        return out
    src = [slice(None)] * a.ndim
    dst = [slice(None)] * a.ndim
    src[axis] = slice(0, n - k) if k >= 0 else slice(-k, n)
    dst[axis] = slice(k, n) if k >= 0 else slice(0, n + k)
    out[tuple(dst)] = a[tuple(src)]
    return out


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """4-neighbour dilation of (..., H, W) by r steps."""
    out = mask.copy()
    for _ in range(r):
        grown = out.copy()
        for axis in (-2, -1):
            grown |= _shift0(out, 1, axis) | _shift0(out, -1, axis)
        out = grown
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask, 1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Per frame, the largest 4-connected component of a (T, H, W) boolean mask."""
    t, h, w = mask.shape
    n = t * h * w
    idx = np.arange(n, dtype=np.int64).reshape(t, h, w)
    labels = np.where(mask, idx, n)
    # Min-label propagation with pointer jumping: each pass lets labels flow one pixel and then skips along
    # already-merged chains, so it settles in a few dozen passes even for long thin shapes.
    while True:
        nb = labels.copy()
        for axis in (1, 2):
            for k in (1, -1):
                shifted = np.full_like(labels, n)
                src = [slice(None)] * 3
                dst = [slice(None)] * 3
                size = labels.shape[axis]
                src[axis] = slice(0, size - k) if k > 0 else slice(-k, size)
                dst[axis] = slice(k, size) if k > 0 else slice(0, size + k)
                shifted[tuple(dst)] = labels[tuple(src)]
                np.minimum(nb, shifted, out=nb)
        nb = np.where(mask, nb, n)
        flat = nb.reshape(-1)
        inside = flat < n
        flat[inside] = flat[flat[inside]]
        if np.array_equal(nb, labels):
            break
        labels = nb
    out = np.zeros_like(mask)
    for i in range(t):
        lab = labels[i][mask[i]]
        if lab.size:
            values, counts = np.unique(lab, return_counts=True)
            out[i] = labels[i] == values[np.argmax(counts)]
    return out


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur of (H, W): compares shapes at the object's scale, not at the scale of
    single edge pixels, where sub-pixel motion and 4:2:0 chroma smearing would dominate."""
    out = img
    for axis in (0, 1):
        out = 0.25 * _shift0(out, 1, axis) + 0.5 * out + 0.25 * _shift0(out, -1, axis)
    return out


def _shift_bilinear(img: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """img moved by a sub-pixel (dy, dx): out[y, x] = img[y - dy, x - dx], zero outside."""
    iy, ix = math.floor(dy), math.floor(dx)
    fy, fx = dy - iy, dx - ix
    a = _shift0(img, iy, 0)
    a = (1 - fy) * a + fy * _shift0(a, 1, 0)
    a = _shift0(a, ix, 1)
    return (1 - fx) * a + fx * _shift0(a, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------------------

def _hsv(rgb) -> tuple[float, float, float]:
    return colorsys.rgb_to_hsv(*(float(c) / 255.0 for c in rgb))


def _hue_distance(a: float, b: float) -> float:
    """On the hue circle, hues in [0, 1)."""
    return min(abs(a - b), 1 - abs(a - b))


def _is_achromatic(rgb) -> bool:
    return _hsv(rgb)[1] < WHITE_SATURATION


def chromatic_hues(palette: Palette) -> dict[str, float]:
    return {name: _hsv(rgb)[0] for name, rgb in palette.items() if not _is_achromatic(rgb)}


def achromatic_values(palette: Palette) -> dict[str, float]:
    return {name: _hsv(rgb)[2] for name, rgb in palette.items() if _is_achromatic(rgb)}


def evaluation_palette(new_colors: Palette) -> dict[str, tuple[int, int, int]]:
    """The nano palette plus colours the evaluator is taught (`motif-video eval --color orange=240,140,30`), each
    checked to stand clear of every other of its kind (in hue, or for a grey in brightness), so the nearest-colour
    rule can tell them apart."""
    palette = dict(COLORS)
    for name, rgb in new_colors.items():
        if name in COLORS:
            if tuple(rgb) != COLORS[name]:
                raise MotifVideoError(f"colour {name!r} is already in the nano palette as {COLORS[name]}")
            continue
        hue, _, value = _hsv(rgb)
        if _is_achromatic(rgb):
            for other, other_value in achromatic_values(palette).items():
                if abs(value - other_value) < MIN_VALUE_GAP:
                    raise MotifVideoError(f"colour {name} {tuple(rgb)} is achromatic and {abs(value - other_value):.2f} "
                                          f"in brightness (HSV value) from {other}; the evaluator tells such colours "
                                          f"apart by brightness and needs {MIN_VALUE_GAP}")
        for other, other_hue in ({} if _is_achromatic(rgb) else chromatic_hues(palette)).items():
            gap = 360 * _hue_distance(hue, other_hue)
            if gap < MIN_HUE_GAP_DEGREES:
                raise MotifVideoError(f"colour {name} {tuple(rgb)} is {gap:.0f} degrees of hue from {other}; the "
                                      f"evaluator tells colours apart by hue and needs {MIN_HUE_GAP_DEGREES:.0f}")
        palette[name] = tuple(int(c) for c in rgb)
    return palette


def classify_color(rgb, palette: Palette = COLORS) -> str:
    """Nearest palette colour in HSV: an achromatic colour -> the achromatic palette colour nearest in brightness
    (white, in the nano palette), otherwise the nearest hue (on the hue circle)."""
    hue, sat, value = _hsv(rgb)
    if sat < WHITE_SATURATION:
        values = achromatic_values(palette)
        return min(values, key=lambda n: abs(value - values[n]))
    hues = chromatic_hues(palette)
    return min(hues, key=lambda n: _hue_distance(hue, hues[n]))


def shape_features(mask: np.ndarray) -> tuple[float, float, float] | None:
    """(fill ratio, mean corner fill, |bottom - top corner fill|) of one frame's object mask (H, W)."""
    ys, xs = np.nonzero(mask)
    if ys.size < MIN_AREA_PX:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    bh, bw = box.shape
    if min(bh, bw) < 3:
        return None
    k = max(1, int(round(CORNER_FRACTION * min(bh, bw))))
    tl, tr = box[:k, :k].mean(), box[:k, -k:].mean()
    bl, br = box[-k:, :k].mean(), box[-k:, -k:].mean()
    return float(box.mean()), float((tl + tr + bl + br) / 4), float(abs((bl + br) - (tl + tr)) / 2)


def classify_shape(features, shapes: Sequence[str] = ()) -> str:
    """The nearest prototype among the nano shapes and the taught `shapes`."""
    prototypes = {**SHAPE_PROTOTYPES, **{name: NEW_SHAPE_PROTOTYPES[name] for name in shapes}}
    return min(
        prototypes,
        key=lambda n: sum(wt * (a - b) ** 2 for wt, a, b in zip(SHAPE_WEIGHTS, features, prototypes[n])),
    )


AXIS_MOTIONS = ("left", "right", "up", "down")


def classify_motion(displacement, side: float, diagonals: bool = False) -> str:
    """The direction nearest the displacement's angle (image rows grow downward): among the four axes, or the
    eight axes and diagonals with `diagonals`; "static" below STATIC_FRACTION of the frame side."""
    dx, dy = displacement
    if math.hypot(dx, dy) < STATIC_FRACTION * side:
        return "static"
    names = AXIS_MOTIONS + (DIAGONAL_MOTIONS if diagonals else ())
    # max keeps the first of a tie, so an exact 45 degrees between two axes goes to the horizontal one
    return max(names, key=lambda n: MOTION_VECTORS[n][0] * dx + MOTION_VECTORS[n][1] * dy)


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / union) if union > 0 else 0.0


def measure_clip(frames: np.ndarray, palette: Palette = COLORS, diagonals: bool = False,
                 shapes: Sequence[str] = ()) -> ClipMeasurement:
    """Measure a uint8 clip (T, H, W, 3) (a single image is T = 1); the colour is named from `palette`, the shape
    among the nano three and the taught `shapes`, the motion among the four axis directions, or eight with
    `diagonals`."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise MotifVideoError(f"expected frames shaped (T, H, W, 3), got {frames.shape}")
    t, h, w, _ = frames.shape
    x = frames.astype(np.float32)

    # 1. Background: the median colour of a 2-pixel border ring over all frames (the object stays inside).
    ring = np.ones((h, w), dtype=bool)
    ring[2:-2, 2:-2] = False
    bg = np.median(x[:, ring].reshape(-1, 3), axis=0)

    # 2. Object: pixels far from the background, thresholded at half the object's contrast (the 50 % coverage
    #    line of an anti-aliased edge), largest connected component per frame. The contrast is read inside a
    #    first, loose component rather than from the brightest pixels, so isolated specks cannot set it.
    dist = np.linalg.norm(x - bg, axis=-1)  # (T, H, W)
    m = ClipMeasurement(t, h, w, [round(float(v), 2) for v in bg], detected=0.0)
    comp = np.zeros(dist.shape, dtype=bool)
    contrast = 0.0
    peak = float(np.median(np.percentile(dist.reshape(t, -1), 99.5, axis=1)))
    if peak >= MIN_CONTRAST:
        loose = largest_component(dist > max(0.3 * peak, MIN_CONTRAST))  # (T, H, W)
        if loose.any():
            contrast = float(np.percentile(dist[loose], 90))  # interior pixels outnumber edge pixels
    if contrast >= MIN_CONTRAST:
        comp = largest_component(dist > 0.5 * contrast)  # (T, H, W)
    found = comp.sum(axis=(1, 2)) >= MIN_AREA_PX
    m.detected = float(found.mean())
    _background_metrics(m, x, comp, found)
    if not found.any():
        return m

    # 3. Colour of the interior (erosion drops the edge pixels blended with the background; the per-frame median
    #    ignores the few pixels the codec's half-resolution chroma smears across the edge).
    core = comp & _erode(comp)
    core = np.where(core.sum(axis=(1, 2), keepdims=True) >= 1, core, comp)
    frame_rgb = np.stack([np.median(x[i][core[i]], axis=0) if found[i] else np.zeros(3) for i in range(t)])  # (T, 3)
    rgb = x[core & found[:, None, None]].mean(axis=0)
    m.object_rgb = [round(float(v), 2) for v in rgb]
    m.color = classify_color(rgb, palette)

    # 4. Shape from the median features over frames (robust to a frame where the object is half-formed).
    feats = [f for i in range(t) if found[i] and (f := shape_features(comp[i])) is not None]
    if feats:
        med = np.median(np.array(feats), axis=0)
        m.fill_ratio, m.corner_fill, m.corner_asymmetry = (round(float(v), 4) for v in med)
        m.shape = classify_shape(med, shapes)

    # 5. Motion: least-squares line through the centroids, its slope times the clip length.
    # Soft mask linear in pixel coverage (a blend of object and background colours lies on the line between
    # them), so a sub-pixel shift of it is close to a re-render at the shifted position.
    soft = np.clip(dist / contrast, 0.0, 1.0) * _dilate(comp, 1)  # (T, H, W)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    weight = soft.sum(axis=(1, 2))
    cx = np.where(found, (soft * xx).sum(axis=(1, 2)) / np.maximum(weight, 1e-6), np.nan)
    cy = np.where(found, (soft * yy).sum(axis=(1, 2)) / np.maximum(weight, 1e-6), np.nan)
    if t >= 2 and found.sum() >= 2:
        ti = np.nonzero(found)[0].astype(np.float64)
        vx = np.polyfit(ti, cx[found], 1)[0]
        vy = np.polyfit(ti, cy[found], 1)[0]
        m.displacement = [round(float(vx * (t - 1)), 3), round(float(vy * (t - 1)), 3)]
        m.motion = classify_motion(m.displacement, min(h, w), diagonals)

    # 6. Subject consistency, VBench's formula (mean over frames of the similarity to the first frame and to the
    #    previous one) with similarity = centroid-aligned soft-mask IoU x colour similarity; a lost object scores 0.
    if t >= 2:
        ref = int(np.argmax(found))

        def similarity(i: int, j: int) -> float:
            if not (found[i] and found[j]):
                return 0.0
            hy, hx = (cy[i] - cy[j]) / 2, (cx[i] - cx[j]) / 2
            a = _blur(_shift_bilinear(soft[i], -hy, -hx))
            b = _blur(_shift_bilinear(soft[j], hy, hx))
            shift = max(0.0, float(np.linalg.norm(frame_rgb[i] - frame_rgb[j])) - COLOR_NOISE_ALLOWANCE)
            color = max(0.0, 1.0 - shift / COLOR_SIMILARITY_SCALE)
            return _soft_iou(a, b) * color

        sims = [0.5 * (similarity(i, ref) + similarity(i, i - 1)) for i in range(1, t)]
        m.subject_consistency = round(float(np.mean(sims)), 4)
    return m


def _nan_median0(a: np.ndarray) -> np.ndarray:
    """Median over axis 0 ignoring NaN (np.nanmedian is ~50x slower here: it goes through masked arrays)."""
    s = np.sort(a, axis=0)  # NaN sorts last
    n = np.isfinite(a).sum(axis=0)
    lo = np.take_along_axis(s, np.maximum((n - 1) // 2, 0)[None], axis=0)[0]
    hi = np.take_along_axis(s, np.minimum(n // 2, np.maximum(n - 1, 0))[None], axis=0)[0]
    return np.where(n > 0, (lo + hi) / 2, np.nan)


def _background_metrics(m: ClipMeasurement, x: np.ndarray, comp: np.ndarray, found: np.ndarray) -> None:
    t = x.shape[0]
    if t < 2:
        return
    # Background = everything but the object and a 2-pixel rim (its anti-aliased edge and codec ringing).
    bgmask = ~_dilate(comp, 2)  # (T, H, W)
    stack = np.where(bgmask[..., None], x, np.nan)  # (T, H, W, 3)
    ref = _nan_median0(stack)  # (H, W, 3); NaN where the object covers a pixel in every frame
    d = np.abs(stack - ref)  # (T, H, W, 3), NaN off the background
    valid = np.isfinite(d)
    count = valid.sum(axis=(1, 2, 3))
    dev = np.where(valid, d, 0.0).sum(axis=(1, 2, 3))[count > 0] / count[count > 0] / 255.0  # (T',)
    if dev.size:
        m.background_consistency = round(float(np.clip(1.0 - dev / BACKGROUND_TOLERANCE, 0.0, 1.0).mean()), 4)
    both = bgmask[1:] & bgmask[:-1]  # (T-1, H, W): background in both frames of a pair
    pairs = both.sum(axis=(1, 2)) * 3
    step = (np.abs(x[1:] - x[:-1]) * both[..., None]).sum(axis=(1, 2, 3))
    if (pairs > 0).any():
        m.temporal_flicker = round(float((step[pairs > 0] / pairs[pairs > 0]).mean() / 255.0), 5)


# ----------------------------------------------------------------------------------------------------------------
# Scoring against a prompt
# ----------------------------------------------------------------------------------------------------------------


def score_clip(m: ClipMeasurement, expected: PromptAttributes) -> dict:
    """Correctness of each attribute the prompt names (None where it names none, or for direction on an image)."""
    checks = {
        "color_correct": None if expected.color is None else m.color == expected.color,
        "shape_correct": None if expected.shape is None else m.shape == expected.shape,
        "direction_correct": None if (expected.motion is None or m.num_frames < 2) else m.motion == expected.motion,
    }
    named = [v for v in checks.values() if v is not None]
    checks["all_correct"] = all(named) if named else None
    return checks
