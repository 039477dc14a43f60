import math
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageDraw

from motif_video.eval.metrics import (
    classify_color,
    classify_motion,
    largest_component,
    measure_clip,
    score_clip,
)
from motif_video.eval.prompts import PromptAttributes
from motif_video.nano.data import COLORS


def _draw(shape, color, centers, size=64, half=10, bg=(10, 12, 30), scale=4):
    """Clips drawn with Pillow (an independent renderer: polygon fill, 4x supersampled then box-filtered)."""
    frames = []
    for cx, cy in centers:
        im = Image.new("RGB", (size * scale, size * scale), bg)
        d = ImageDraw.Draw(im)
        x0, y0, x1, y1 = [(v * scale) for v in (cx - half, cy - half, cx + half, cy + half)]
        if shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=color)
        elif shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=color)
        else:
            d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=color)
        frames.append(np.asarray(im.resize((size, size), Image.BOX)))
    return np.stack(frames)


def _line(start, end, n=9):
    return [(start[0] + (end[0] - start[0]) * i / (n - 1), start[1] + (end[1] - start[1]) * i / (n - 1))
            for i in range(n)]


@pytest.mark.parametrize("name", list(COLORS))
def test_classify_palette_colors_with_jitter(name):
    rgb = np.array(COLORS[name], dtype=float)
    assert classify_color(rgb) == name
    for delta in [(-25, 0, 0), (0, 25, -25), (-40, -40, -40), (20, 20, 20)]:
        assert classify_color(np.clip(rgb + delta, 0, 255)) == name


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
@pytest.mark.parametrize("half", [6, 9, 14])
def test_shape_of_independently_drawn_objects(shape, half):
    clip = _draw(shape, (240, 200, 40), _line((20, 30), (44, 30)), half=half)
    m = measure_clip(clip)
    assert m.shape == shape, (m.fill_ratio, m.corner_fill, m.corner_asymmetry)
    assert m.color == "yellow" and m.detected == 1.0


@pytest.mark.parametrize(
    "start, end, want",
    [((44, 32), (18, 32), "left"), ((18, 32), (44, 32), "right"), ((32, 46), (32, 20), "up"),
     ((32, 18), (32, 46), "down"), ((30, 30), (30.4, 30.2), "static"), ((18, 20), (44, 30), "right")],
)
def test_motion_direction(start, end, want):
    m = measure_clip(_draw("circle", (40, 200, 220), _line(start, end)))
    assert m.motion == want
    assert m.displacement == pytest.approx([end[0] - start[0], end[1] - start[1]], abs=0.3)


@pytest.mark.parametrize(
    "start, end, want, axis",
    [((18, 46), (44, 20), "up-right", "right"), ((44, 44), (20, 18), "up-left", "up"),
     ((20, 18), (46, 40), "down-right", "right"), ((44, 20), (18, 44), "down-left", "left"),
     ((18, 30), (46, 36), "right", "right"), ((30, 46), (34, 18), "up", "up")],
)
def test_diagonal_motion_direction(start, end, want, axis):
    clip = _draw("square", (220, 40, 40), _line(start, end))
    assert measure_clip(clip, diagonals=True).motion == want
    assert measure_clip(clip).motion == axis


def test_classify_motion_sectors():
    # Eight 45-degree sectors with diagonals: the boundary lies at 22.5 degrees from each axis.
    for degrees, want in [(0, "right"), (22, "right"), (23, "down-right"), (67, "down-right"), (68, "down"),
                          (-45, "up-right"), (135, "down-left"), (-120, "up-left"), (180, "left")]:
        a = math.radians(degrees)
        assert classify_motion((20 * math.cos(a), 20 * math.sin(a)), 64, diagonals=True) == want, degrees
    assert classify_motion((20, 20), 64) == "right" and classify_motion((3, 3), 64, diagonals=True) == "static"


def test_classify_motion_threshold():
    assert classify_motion((6.3, 0), 64) == "static" and classify_motion((6.5, 0), 64) == "right"
    assert classify_motion((1, -10), 64) == "up"


def _components_bfs(mask):
    """Reference labelling: breadth-first flood fill, largest component per frame."""
    out = np.zeros_like(mask)
    for t in range(mask.shape[0]):
        seen = np.zeros(mask.shape[1:], dtype=bool)
        best = []
        for y, x in zip(*np.nonzero(mask[t])):
            if seen[y, x]:
                continue
            comp, queue = [], deque([(y, x)])
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                comp.append((cy, cx))
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < mask.shape[1] and 0 <= nx < mask.shape[2] and mask[t, ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            if len(comp) > len(best):
                best = comp
        for y, x in best:
            out[t, y, x] = True
    return out


def test_largest_component_matches_flood_fill():
    rng = np.random.default_rng(0)
    mask = rng.random((6, 23, 31)) < 0.55  # near the percolation threshold: many tangled components
    mask[3] = False
    ours, ref = largest_component(mask), _components_bfs(mask)
    # Ties between equal-size components may pick either; compare sizes and that ours is one connected piece.
    np.testing.assert_array_equal(ours.sum((1, 2)), ref.sum((1, 2)))
    np.testing.assert_array_equal(largest_component(ours), ours)
    spiral = np.zeros((1, 15, 15), dtype=bool)
    spiral[0, 1, 1:14] = spiral[0, 1:14, 13] = spiral[0, 13, 1:14] = spiral[0, 3:14, 1] = True
    spiral[0, 3, 1:12] = spiral[0, 3:12, 11] = True
    np.testing.assert_array_equal(largest_component(spiral), _components_bfs(spiral))


def test_consistency_separates_steady_from_changing_subjects():
    centers = _line((20, 32), (44, 32), 9)
    steady = measure_clip(_draw("circle", (220, 40, 40), centers))
    assert steady.subject_consistency > 0.95
    morph = np.concatenate([_draw("circle", (220, 40, 40), centers[:4]), _draw("triangle", (220, 40, 40), centers[4:])])
    recolor = np.concatenate([_draw("circle", (220, 40, 40), centers[:4]), _draw("circle", (40, 60, 230), centers[4:])])
    vanish = _draw("circle", (220, 40, 40), centers)
    vanish[5:] = vanish[0, 0, 0]
    grow = np.stack([_draw("square", (230, 230, 230), [c], half=6 + i)[0] for i, c in enumerate(centers)])
    for bad in (morph, recolor, vanish, grow):
        assert measure_clip(bad).subject_consistency < steady.subject_consistency - 0.1


def test_background_consistency_and_flicker():
    clip = _draw("square", (40, 200, 60), _line((20, 32), (44, 32)), bg=(50, 50, 60))
    clean = measure_clip(clip)
    assert clean.background_consistency > 0.99 and clean.temporal_flicker < 0.002
    jumps = np.random.default_rng(0).integers(-25, 26, len(clip))  # whole-frame brightness jumps
    bad = measure_clip((clip.astype(int) + jumps[:, None, None, None]).astype(np.uint8))
    assert bad.temporal_flicker == pytest.approx(np.abs(np.diff(jumps)).mean() / 255, rel=1e-3)
    assert bad.background_consistency < 0.9
    # A static object keeps the background set fixed, so the per-pixel median background is frame 4's.
    drift = np.stack([_draw("square", (40, 200, 60), [(30, 30)], bg=(20 + 8 * i, 20, 24))[0] for i in range(9)])
    m = measure_clip(drift)
    # Red drifts by 8 a frame: deviation from the median frame |8 (i - 4)| in one channel of three.
    deviation = np.mean([abs(8 * (i - 4)) / 3 / 255 for i in range(9)])
    assert m.background_consistency == pytest.approx(1 - deviation / 0.25, abs=2e-3)
    assert m.temporal_flicker == pytest.approx(8 / 3 / 255, rel=0.02)
    assert m.color == "green" and m.motion == "static"


def test_empty_clip_and_single_image():
    blank = np.full((5, 32, 32, 3), 17, dtype=np.uint8)
    m = measure_clip(blank)
    assert m.detected == 0.0 and m.color is None and m.shape is None and m.motion is None
    assert m.background_consistency == 1.0 and m.temporal_flicker == 0.0
    s = score_clip(m, PromptAttributes("red", "circle", "left"))
    assert s == {"color_correct": False, "shape_correct": False, "direction_correct": False, "all_correct": False}
    image = _draw("triangle", (210, 50, 200), [(30, 30)])
    m = measure_clip(image)
    assert (m.color, m.shape, m.motion, m.subject_consistency) == ("magenta", "triangle", None, None)
    s = score_clip(m, PromptAttributes("magenta", "triangle", "up"))
    assert s == {"color_correct": True, "shape_correct": True, "direction_correct": None, "all_correct": True}


def test_isolated_specks_do_not_fool_the_detector():
    clip = _draw("square", (40, 200, 60), _line((44, 30), (20, 30)), half=7)
    specks = np.random.default_rng(0).random(clip.shape[:3]) < 0.01  # 1 % salt noise, brighter than the object
    clip[specks] = 255
    m = measure_clip(clip)
    assert (m.color, m.shape, m.motion) == ("green", "square", "left")
