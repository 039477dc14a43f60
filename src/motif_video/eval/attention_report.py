"""The per-block attention analysis behind `motif-video analyze`: sample one prompt with an `AttentionRecorder`
installed, then write frame-to-frame heatmaps per block, the numbers as JSON, and a one-page summary.

Sampling is exact (the encoder runs on every step, no reuse), so every block is recorded at every chosen step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..errors import GenerationInterrupted, MotifVideoError
from .attention import DEFAULT_CHUNK_BYTES, AttentionRecorder, FrameAttention
from .plots import PALETTE, save_figure

# The per-block scalars plotted on the summary page: (key in `shares`, label).
HEADLINE = [("other_frames", "other frames"), ("same_frame", "same frame"), ("text", "text")]


def check_steps(at_steps: list[int] | None, steps: int) -> list[int]:
    """The 0-based steps to record, sorted; default: the first, the middle and the last step."""
    if steps < 1:
        raise MotifVideoError(f"--steps must be at least 1, got {steps}")
    if at_steps is None:
        return sorted({0, steps // 2, steps - 1})
    if not at_steps:
        raise MotifVideoError("--at-steps lists no step")
    bad = [s for s in at_steps if not 0 <= s < steps]
    if bad:
        raise MotifVideoError(f"--at-steps {bad[0]} is outside the {steps} sampling steps (0..{steps - 1})")
    return sorted(set(at_steps))


def check_out_dir(out: str | Path) -> Path:
    """The output folder, created and checked to be writable before any model loads."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MotifVideoError(f"{out} exists and is not a folder")
    try:
        (out / "heatmaps").mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise MotifVideoError(f"cannot write to {out}: {e.strerror or e}") from None
    return out


def stage_of(config, block: int) -> str:
    if block < config.num_layers:
        return "dual"
    return "encoder" if block < config.num_layers + config.num_encoder_single_layers else "decoder"


def record_attention(pipe, prompt: str, at_steps: list[int], *, num_inference_steps: int, seed: int = 0,
                     recorder: AttentionRecorder, progress: bool = False, **generate) -> dict:
    """Sample `prompt` with `recorder` installed on `pipe.transformer` (the caller installs it), armed at
    `at_steps`. Stops after the last recorded step. Returns the recorded steps' timesteps and, when sampling ran
    to the end, the final latents."""
    timesteps: dict[int, float] = {}

    def on_step(info) -> bool:
        if info.step in at_steps:
            timesteps[info.step] = float(info.timestep)
        recorder.arm(info.step + 1 if info.step + 1 in at_steps else None)
        return at_steps[-1] <= info.step < info.num_steps - 1  # stop early: nothing left to record

    recorder.arm(0 if 0 in at_steps else None)
    latents = None
    try:
        latents = pipe(prompt, num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed),
                       output_type="latent", encoder_reuse=1, callback=on_step, progress=progress, **generate)
    except GenerationInterrupted:
        if len(timesteps) != len(at_steps):
            raise
    finally:
        recorder.arm(None)
    return {"timesteps": timesteps, "latents": latents}


def _mean_map(records: list[FrameAttention]) -> torch.Tensor:
    return torch.stack([r.mean_over_heads() for r in records]).mean(0)  # (T', bins)


def _rounded(x, digits: int = 5):
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, list):
        return [_rounded(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: _rounded(v, digits) for k, v in x.items()}
    return round(x, digits) if isinstance(x, float) else x


def summarize(records: list[FrameAttention], config, *, per_head: bool = False) -> dict:
    """The numbers: per block, the head-mean frame map and its scalars averaged over the recorded steps, and per
    step; stage means of the scalars."""
    blocks = []
    for block in sorted({r.site.block for r in records}):
        mine = sorted((r for r in records if r.site.block == block), key=lambda r: r.step)
        first = mine[0]
        mass = _mean_map(mine)
        entry = {
            "block": block, "stage": stage_of(config, block), "query": first.query_kind,
            "bins": [kind if frame is None else f"{kind}:{frame}" for kind, frame in first.bins],
            "queries_per_frame": first.queries_per_frame,
            "mass": mass, "shares": first.shares(mass),
            "steps": {str(r.step): {"mass": r.mean_over_heads(), "shares": r.shares()} for r in mine},
        }
        if per_head:
            heads = torch.stack([r.mass for r in mine]).mean(0)  # (heads, T', bins)
            entry["per_head"] = [{"mass": h, "shares": first.shares(h)} for h in heads]
        blocks.append(entry)
    stages = {}
    for stage in ("dual", "encoder", "decoder"):
        rows = [b["shares"] for b in blocks if b["stage"] == stage]
        if rows:
            keys = [k for k in rows[0] if all(k in r for r in rows)]
            stages[stage] = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return _rounded({"blocks": blocks, "stages": stages})


# -- figures ----------------------------------------------------------------------------------------------------
def _draw_map(ax, mass, bins: list[str], frames: int, title: str, annotate: bool, vmax: float | None = None):
    """A (T' x bins) map: rows are query frames, columns key frames per grid segment, then text/image."""
    mass = torch.as_tensor(mass, dtype=torch.float64)
    image = ax.imshow(mass.numpy(), cmap="viridis", vmin=0.0, vmax=vmax or max(float(mass.max()), 1e-6),
                      aspect="auto", interpolation="nearest")
    labels = [b.split(":")[1] if ":" in b else b for b in bins]
    ax.set_xticks(range(len(bins)), labels, fontsize=7, rotation=90 if len(bins) > 24 else 0)
    ax.set_yticks(range(frames), [str(f) for f in range(frames)], fontsize=7)
    kinds = [b.split(":")[0] for b in bins]
    start = 0
    for j in range(1, len(kinds) + 1):  # a line between segments, the segment's name under it
        if j == len(kinds) or kinds[j] != kinds[start]:
            if j < len(kinds):
                ax.axvline(j - 0.5, color="white", linewidth=1.5)
            if j - start > 1:
                ax.text((start + j - 1) / 2, frames - 0.5 + 0.9, kinds[start], ha="center", va="top", fontsize=7,
                        transform=ax.transData, clip_on=False)
            start = j
    if annotate:
        for f in range(frames):
            for j in range(len(bins)):
                value = float(mass[f, j])
                ax.text(j, f, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 * float(mass.max()) else "black")
    ax.set_ylabel("query frame", fontsize=7)
    ax.set_title(title, fontsize=8)
    return image


def block_heatmap(block: dict, path: Path, timesteps: dict) -> Path:
    """One block: its frame map at each recorded step and their mean, in percent of each query's attention."""
    panels = [(f"step {s} (t={timesteps.get(s, float('nan')):.0f})", v["mass"]) for s, v in block["steps"].items()]
    if len(panels) > 1:
        panels.append(("mean over steps", block["mass"]))
    frames, bins = len(block["queries_per_frame"]), block["bins"]
    annotate = frames <= 8 and len(bins) <= 20
    fig = Figure(figsize=(min(30.0, 0.9 + (0.3 + 0.28 * len(bins)) * len(panels)), 0.9 + 0.3 * frames + 0.8),
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    vmax = max(max(max(row) for row in mass) for _, mass in panels)
    for i, (ax, (title, mass)) in enumerate(zip(axes, panels)):  # numbers on the last panel only (text is slow)
        image = _draw_map(ax, mass, bins, frames, title, annotate and i == len(panels) - 1, vmax)
    fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.01).set_label("attention mass", fontsize=7)
    s = block["shares"]
    fig.suptitle(f"block {block['block']} ({block['stage']}): {block['query']} queries; other frames "
                 f"{100 * s['other_frames']:.1f}%, same frame {100 * s['same_frame']:.1f}%"
                 + (f", text {100 * s['text']:.1f}%" if "text" in s else ""), fontsize=9)
    return save_figure(fig, path)


def summary_page(results: dict, path: Path) -> Path:
    """One page: the scalars per block (top) and every block's step-mean frame map (below)."""
    blocks = results["blocks"]
    cols = min(6, len(blocks))
    rows = -(-len(blocks) // cols)
    fig = Figure(figsize=(2.6 * cols + 2.0, 3.2 + 2.4 * rows), layout="constrained")
    grid = fig.add_gridspec(1 + rows, cols, height_ratios=[1.5] + [1] * rows)
    ax = fig.add_subplot(grid[0, :])
    x = [b["block"] for b in blocks]
    for k, (key, label) in enumerate(HEADLINE):
        values = [b["shares"].get(key) for b in blocks]
        if any(v is not None for v in values):
            ax.plot(x, [100 * v if v is not None else float("nan") for v in values], "o-",
                    color=PALETTE[k], label=label)
    for b in blocks:
        if "encoder_other_frames" in b["shares"]:
            ax.plot([b["block"]], [100 * b["shares"]["encoder_other_frames"]], "s", color=PALETTE[3],
                    label="decoder -> encoder tokens, other frames")
    starts = {}
    for b in blocks:
        starts.setdefault(b["stage"], b["block"])
    for stage, start in starts.items():
        ax.axvline(start - 0.5, color="#bbbbbb", linestyle="--", linewidth=0.8)
        ax.text(start - 0.4, 101, stage, fontsize=8, va="bottom")
    ax.set_ylim(0, 100)
    ax.set_xticks(x)
    ax.set_xlabel("block", fontsize=8)
    ax.set_ylabel("% of a query's attention", fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5),
              frameon=False)
    fig.suptitle(f"attention across frames: \"{results['prompt']}\", steps {results['at_steps']} of "
                 f"{results['steps']}, conditional branch, mean over heads", fontsize=9)
    frames = results["grid"][0]
    for i, b in enumerate(blocks):
        sub = fig.add_subplot(grid[1 + i // cols, i % cols])
        _draw_map(sub, b["mass"], b["bins"], frames, f"block {b['block']} ({b['stage']})", annotate=False)
    return save_figure(fig, path)


def summary_markdown(results: dict, files: dict) -> str:
    s = results
    lines = ["# Attention across frames", "",
             f"Model `{s['model']}`, prompt \"{s['prompt']}\", seed {s['seed']}, {s['steps']} steps, recorded at "
             f"steps {s['at_steps']} (timesteps {', '.join(f'{t:.0f}' for t in s['timesteps'].values())}); "
             f"video grid {s['grid'][0]} frames x {s['grid'][1]} x {s['grid'][2]} tokens. Self-attention of each "
             "block, the conditional branch, mean over heads, each query weighted equally; queries are the video "
             "tokens (encoder) or the decoder stream (decoder, whose keys are [decoder; encoder tokens]).", "",
             "| block | stage | same frame | other frames | of which decoder->encoder | text | image | "
             "mean frame distance (uniform) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    for b in s["blocks"]:
        sh, q = b["shares"], b["query"]
        lines.append(f"| {b['block']} | {b['stage']} | {pct(sh['same_frame'])} | {pct(sh['other_frames'])} | "
                     f"{pct(sh.get('encoder_other_frames') if q == 'decoder' else None)} | {pct(sh.get('text'))} | "
                     f"{pct(sh.get('image'))} | {sh['frame_distance']:.2f} ({sh['uniform_frame_distance']:.2f}) |")
    lines += ["", "Stage means:", ""]
    for stage, sh in s["stages"].items():
        lines.append(f"- {stage}: other frames {pct(sh['other_frames'])}, mean frame distance "
                     f"{sh['frame_distance']:.2f}" + (f", text {pct(sh['text'])}" if "text" in sh else ""))
    lines += ["", f"Files: `{files['json']}` (all numbers), `{files['page']}` (this page as a figure), "
                  f"`heatmaps/` (one figure per block, per recorded step)."]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_analysis(results: dict, out: Path) -> dict:
    """attention.json, summary.md, summary.png and heatmaps/block_NN_<stage>.png under `out`."""
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    files = {"json": "attention.json", "markdown": "summary.md", "page": "summary.png", "heatmaps": []}
    for b in results["blocks"]:
        name = f"heatmaps/block_{b['block']:02d}_{b['stage']}.png"
        block_heatmap(b, out / name, results["timesteps"])
        files["heatmaps"].append(name)
    summary_page(results, out / files["page"])
    _write_text(out / files["markdown"], summary_markdown(results, files))
    _write_text(out / files["json"], json.dumps({**results, "files": files}, indent=1) + "\n")
    return {k: ([out / p for p in v] if isinstance(v, list) else out / v) for k, v in files.items()}


def analyze(pipe, prompt: str, out: str | Path, *, model_name: str, steps: int | None = None,
            at_steps: list[int] | None = None, seed: int = 0, per_head: bool = False,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES, inner=None, progress: bool = False, **generate) -> dict:
    """Record, summarise and write; returns the results (as written to attention.json) and the file paths."""
    from ..model.attention import AttentionModule
    from ..model.backends import attention_backends, set_attention_backend

    steps = steps or pipe.defaults.num_inference_steps
    at_steps = check_steps(at_steps, steps)
    out = check_out_dir(out)
    model = pipe.transformer
    modules = [m for m in model.modules() if isinstance(m, AttentionModule)]
    previous = [m.backend for m in modules]
    recorder = set_attention_backend(model, AttentionRecorder(inner or attention_backends(model)[0],
                                                              chunk_bytes=chunk_bytes))
    try:
        run = record_attention(pipe, prompt, at_steps, num_inference_steps=steps, seed=seed, recorder=recorder,
                               progress=progress, **generate)
    finally:
        for module, backend in zip(modules, previous):
            module.backend = backend
    results = {
        "model": model_name, "prompt": prompt, "seed": seed, "steps": steps, "at_steps": at_steps,
        "timesteps": {str(s): round(t, 3) for s, t in sorted(run["timesteps"].items())},
        "grid": list(_grid(pipe, generate)), "guidance": "conditional branch (batch row 0 of the first pass)",
        **summarize(recorder.records, model.config, per_head=per_head),
    }
    files = write_analysis(results, out)
    return {"results": results, "files": files, "latents": run["latents"]}


def _grid(pipe, generate: dict) -> tuple[int, int, int]:
    """The video token grid (T', H', W') of a generation with these options."""
    d, c = pipe.defaults, pipe.transformer.config
    frames, height, width = pipe.codec.latent_shape(generate.get("num_frames") or d.num_frames,
                                                    generate.get("height") or d.height,
                                                    generate.get("width") or d.width)
    return frames // c.patch_size_t, height // c.patch_size, width // c.patch_size
