"""Evaluate a set of (clip, prompt) pairs and write results.json, a VBench-style markdown table and PNG charts."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import MotifVideoError, warn
from ..files import atomic_write_text
from ..nano.data import COLORS, Palette
from ..records import JSONL_SUFFIXES, read_jsonl
from ..pipeline.video_io import FOLDER_META, MEDIA_EXTENSIONS, read_video
from .metrics import measure_clip, score_clip
from .plots import bar_chart
from .prompts import parse_prompt

# Dimensions of the summary table: (key in the aggregate, label, True when higher is better).
DIMENSIONS = [
    ("color_accuracy", "colour", True),
    ("shape_accuracy", "shape", True),
    ("direction_accuracy", "motion direction", True),
    ("all_correct", "all attributes right", True),
    ("subject_consistency", "subject consistency", True),
    ("background_consistency", "background consistency", True),
    ("temporal_flickering", "temporal flickering", True),
]


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def load_items(source) -> list[dict]:
    """(clip, prompt) pairs from a folder (each clip next to a same-name .txt) or a JSONL file (`path` plus
    `prompt` or `caption`, paths relative to the file; `attributes` if present are kept for a parser check)."""
    source = Path(source)
    if not source.exists():
        raise MotifVideoError(f"{source} does not exist")
    if source.is_dir():
        items, uncaptioned = [], []
        for p in sorted(source.iterdir()):
            is_media = p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS
            is_frames = p.is_dir() and (p / FOLDER_META).is_file()
            caption = p.with_suffix(".txt") if p.is_file() else p.parent / f"{p.name}.txt"
            if (is_media or is_frames) and caption.is_file():
                items.append({"path": p, "prompt": caption.read_text().strip()})
            elif is_media or is_frames:
                uncaptioned.append(p.name)
        if not items:
            raise MotifVideoError(f"{source} holds no clips with a same-name .txt prompt")
        if uncaptioned:
            warn(f"skipping {len(uncaptioned)} clip(s) without a same-name .txt prompt: "
                 f"{', '.join(uncaptioned[:3])}{', ...' if len(uncaptioned) > 3 else ''}")
        return items
    if source.suffix.lower() not in JSONL_SUFFIXES:
        raise MotifVideoError(f"{source} must be a folder of clips + .txt prompts or a .jsonl file")
    items = []
    for i, row in read_jsonl(source):
        if not row.get("path"):
            raise MotifVideoError(f"{source}:{i}: row has no 'path'")
        prompt = row.get("prompt") or row.get("caption")
        if not prompt:
            raise MotifVideoError(f"{source}:{i}: row has no 'prompt' or 'caption'")
        path = Path(row["path"])
        item = {"path": path if path.is_absolute() else source.parent / path, "prompt": str(prompt)}
        if isinstance(row.get("attributes"), dict):
            item["attributes"] = row["attributes"]
        items.append(item)
    if not items:
        raise MotifVideoError(f"{source} lists no clips")
    return items


def shuffle_prompts(items: list[dict], seed: int) -> list[dict]:
    """Pair every clip with another clip's prompt (a derangement): the chance-level baseline."""
    n = len(items)
    if n < 2:
        raise MotifVideoError("shuffling prompts needs at least two clips")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    while np.any(perm == np.arange(n)):  # a random permutation is a derangement ~37 % of the time
        perm = rng.permutation(n)
    return [{"path": it["path"], "prompt": items[j]["prompt"]} for it, j in zip(items, perm)]


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def evaluate_clip(frames: np.ndarray, prompt: str, palette: Palette = COLORS, diagonals: bool = False,
                  shapes: Sequence[str] = ()) -> dict:
    expected = parse_prompt(prompt, palette, diagonals, shapes)
    m = measure_clip(frames, palette, diagonals, shapes)
    return {"prompt": prompt, "expected": expected.to_dict(), "measured": m.to_dict(), **score_clip(m, expected)}


def evaluate(items: list[dict], progress: Callable[[int], None] | None = None, palette: Palette = COLORS,
             diagonals: bool = False, shapes: Sequence[str] = ()) -> dict:
    """Per-clip results and their aggregate. A clip that cannot be read counts as wrong on every attribute.
    `palette`: the colours prompts may ask for and clips are classified into (`metrics.evaluation_palette`);
    `diagonals`: prompts may ask for diagonal motion and clips' motions are classified among eight directions;
    `shapes`: shapes beyond the nano three (`metrics.NEW_SHAPE_PROTOTYPES`) that prompts may ask for and clips
    are classified into."""
    clips = []
    for item in items:
        try:
            frames = read_video(item["path"])
            row = evaluate_clip(frames, item["prompt"], palette, diagonals, shapes)
        except MotifVideoError as e:
            expected = parse_prompt(item["prompt"], palette, diagonals, shapes)
            named = {"color_correct": expected.color, "shape_correct": expected.shape,
                     "direction_correct": expected.motion}
            row = {"prompt": item["prompt"], "expected": expected.to_dict(), "measured": None, "error": str(e),
                   **{k: (None if v is None else False) for k, v in named.items()}}
            row["all_correct"] = False if any(v is not None for v in named.values()) else None
        row["path"] = os.fspath(item["path"])
        if "attributes" in item:
            row["parser_agrees"] = _parser_agrees(row["expected"], item["attributes"])
        clips.append(row)
        if progress:
            progress(1)
    results = {"summary": aggregate(clips), "clips": clips}
    if palette is not COLORS:
        results["palette"] = {name: list(rgb) for name, rgb in palette.items()}
    if diagonals:
        results["diagonals"] = True
    if shapes:
        results["shapes"] = list(shapes)
    return results


def _parser_agrees(expected: dict, truth: dict) -> bool:
    """The prompt parser recovered the ground truth (a field the prompt leaves out, e.g. size, is not held against
    it)."""
    return all(expected.get(k) in (None, v) if k == "size" else expected.get(k) == v
               for k, v in truth.items() if v is not None)


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def aggregate(clips: list[dict]) -> dict:
    measured = [c["measured"] for c in clips if c.get("measured")]
    flicker = _mean(m["temporal_flicker"] for m in measured)
    summary = {
        "clips": len(clips),
        "errors": sum(1 for c in clips if c.get("error")),
        "color_accuracy": _mean(c["color_correct"] for c in clips),
        "shape_accuracy": _mean(c["shape_correct"] for c in clips),
        "direction_accuracy": _mean(c["direction_correct"] for c in clips),
        "all_correct": _mean(c["all_correct"] for c in clips),
        "subject_consistency": _mean(m["subject_consistency"] for m in measured),
        "background_consistency": _mean(m["background_consistency"] for m in measured),
        "temporal_flicker": flicker,  # raw mean background change, lower is better
        "temporal_flickering": None if flicker is None else round(1.0 - flicker, 4),  # VBench sense, higher better
        "detection_rate": _mean(m["detected"] for m in measured),
        "counted": {k: sum(1 for c in clips if c[k] is not None)
                    for k in ("color_correct", "shape_correct", "direction_correct", "all_correct")},
    }
    if any("parser_agrees" in c for c in clips):
        summary["parser_agreement"] = _mean(c.get("parser_agrees") for c in clips)
    by_value: dict[str, dict] = {}
    confusion: dict[str, dict] = {}
    for attr, key, check in (("color", "color", "color_correct"), ("shape", "shape", "shape_correct"),
                             ("motion", "motion", "direction_correct")):
        hits = defaultdict(list)
        conf: dict[str, Counter] = defaultdict(Counter)
        for c in clips:
            want = c["expected"][attr]
            if want is None or c[check] is None:
                continue
            hits[want].append(c[check])
            got = (c["measured"] or {}).get(key)
            conf[want][str(got)] += 1
        by_value[attr] = {v: _mean(h) for v, h in sorted(hits.items())}
        confusion[attr] = {v: dict(sorted(cnt.items())) for v, cnt in sorted(conf.items())}
    summary["accuracy_by_value"] = by_value
    summary["confusion"] = confusion
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def markdown_table(results: dict, title: str = "motif-video eval", max_rows: int = 200) -> str:
    """Summary table, accuracy by requested value, then up to `max_rows` per-clip rows (0: none)."""
    s = results["summary"]
    lines = [f"# {title}", "", f"{s['clips']} clips" + (f", {s['errors']} unreadable" if s["errors"] else "") + ".",
             "", "| dimension | score | clips |", "|---|---:|---:|"]
    counted = {"color_accuracy": "color_correct", "shape_accuracy": "shape_correct",
               "direction_accuracy": "direction_correct", "all_correct": "all_correct"}
    for key, label, _ in DIMENSIONS:
        n = s["counted"][counted[key]] if key in counted else s["clips"] - s["errors"]
        lines.append(f"| {label} | {_pct(s[key])} | {n} |")
    if "parser_agreement" in s:
        lines.append(f"| (prompt parser vs. ground truth) | {_pct(s['parser_agreement'])} | {s['clips']} |")
    lines += ["", "Accuracy by the value the prompt asks for:", ""]
    for attr, values in s["accuracy_by_value"].items():
        if values:
            lines.append(f"- {attr}: " + ", ".join(f"{v} {_pct(a)}" for v, a in values.items()))
    if max_rows <= 0:
        return "\n".join(lines) + "\n"
    lines += ["", "| clip | prompt | colour | shape | motion | subject | background | flicker |",
              "|---|---|---|---|---|---:|---:|---:|"]

    def cell(c, attr, check):
        got = (c["measured"] or {}).get(attr)
        ok = c[check]
        return "-" if ok is None else f"{got} {'ok' if ok else 'x'}"

    def num(c, key):
        v = (c["measured"] or {}).get(key)
        return "-" if v is None else f"{v:.3f}"

    for c in results["clips"][:max_rows]:
        prompt = c["prompt"].replace("|", "/")
        lines.append(f"| {Path(c['path']).name} | {prompt} | {cell(c, 'color', 'color_correct')} | "
                     f"{cell(c, 'shape', 'shape_correct')} | {cell(c, 'motion', 'direction_correct')} | "
                     f"{num(c, 'subject_consistency')} | {num(c, 'background_consistency')} | "
                     f"{num(c, 'temporal_flicker')} |")
    if len(results["clips"]) > max_rows:
        lines.append(f"| ... {len(results['clips']) - max_rows} more in results.json | | | | | | | |")
    return "\n".join(lines) + "\n"


def store_report(results: dict, out_dir, markdown: str, path_keys=("path",)) -> dict:
    """Write results.json and report.md into the folder `out_dir` (created), each atomically; the clips' files
    (`path_keys` of each clip row) are stored relative to the folder, so the report names nothing of the machine
    that wrote it. Returns their paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MotifVideoError(f"{out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MotifVideoError(f"cannot create the report folder {out}: {e.strerror or e}") from None
    stored = {**results, "clips": [{**c, **{k: os.path.relpath(c[k], out) for k in path_keys}}
                                   for c in results["clips"]]}
    written = {"results": out / "results.json", "markdown": out / "report.md"}
    atomic_write_text(written["results"], json.dumps(stored, indent=2) + "\n")
    atomic_write_text(written["markdown"], markdown)
    return written


def write_report(results: dict, out_dir, title: str = "motif-video eval") -> dict:
    written = store_report(results, out_dir, markdown_table(results, title))
    out = Path(out_dir)
    s = results["summary"]
    bar_chart([(label, s[key]) for key, label, _ in DIMENSIONS], f"{title}: {s['clips']} clips", out / "summary.png")
    bars, groups = [], []
    for attr, values in s["accuracy_by_value"].items():
        if values:
            bars += list(values.items())
            groups.append((attr, len(values)))
    if bars:
        bar_chart(bars, "accuracy by requested value (colour | shape | motion)", out / "accuracy_by_value.png", groups)
    return {**written, "plots": sorted(out.glob("*.png"))}
