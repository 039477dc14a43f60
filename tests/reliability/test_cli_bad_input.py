"""Bad input through every subcommand, run in-process through the CLI's `main`: exit 2, one `error:` line, no
traceback, and the user's files exactly as before (nothing written, nothing half-written, nothing hidden left)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import assert_user_error, edit_json, run_cli, snapshot

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="session")
def assets(tiny, tmp_path_factory) -> Path:
    """Broken models, files and datasets, built once; tests must leave them unchanged."""
    from motif_video.convert.gguf import WRITE_TYPES, write_gguf
    from motif_video.model.transformer import MotifVideoTransformer
    from motif_video.testing import save_tied_transformer

    a = tmp_path_factory.mktemp("assets")

    def model(name, edit=None) -> Path:
        folder = a / name
        shutil.copytree(tiny, folder)
        if edit:
            edit(folder)
        return folder

    cfg = "transformer/config.json"
    model("bad_heads", lambda f: edit_json(f / cfg, num_attention_heads="four"))
    model("bad_layers", lambda f: edit_json(f / cfg, num_layers=-1))
    model("bad_mlp", lambda f: edit_json(f / cfg, mlp_ratio="big"))
    model("bad_patch", lambda f: edit_json(f / cfg, patch_size=2.5))
    model("bad_image_dim", lambda f: edit_json(f / cfg, image_embed_dim="x"))
    model("bad_rope", lambda f: edit_json(f / cfg, rope_axes_dim=[4, 6, 8]))
    model("bad_theta", lambda f: edit_json(f / cfg, rope_theta=None))
    model("bad_flag", lambda f: edit_json(f / cfg, enable_text_cross_attention_single="yes"))
    model("bad_json", lambda f: (f / cfg).write_text("{not json"))
    model("config_list", lambda f: (f / cfg).write_text("[1, 2]"))
    model("config_binary", lambda f: (f / cfg).write_bytes(b"\xff\xfe\x00garbage"))
    model("trunc_weights", lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:5000]))
    model("garbage_weights", lambda f: (f / WEIGHTS).write_bytes(b"\x00" * 4096))
    model("no_weights", lambda f: (f / WEIGHTS).unlink())
    model("bad_motif_json", lambda f: (f / "motif_video.json").write_text("{oops"))
    model("bad_motif_type", lambda f: (f / "motif_video.json").write_text(json.dumps({"generation": {"height": "big"}})))
    model("bad_motif_steps", lambda f: (f / "motif_video.json").write_text(json.dumps({"num_inference_steps": 0})))
    model("bad_motif_list", lambda f: (f / "motif_video.json").write_text("[1, 2]"))
    model("no_index", lambda f: (f / "model_index.json").unlink())
    model("bad_index", lambda f: (f / "model_index.json").write_text("{"))
    model("unknown_class", lambda f: edit_json(f / "model_index.json", vae=["diffusers", "NoSuchVAE"]))
    model("missing_vae", lambda f: shutil.rmtree(f / "vae"))
    model("broken_vae", lambda f: (f / "vae" / "config.json").write_text("{"))
    model("biased_tied", lambda f: save_tied_transformer(f, query_bias=True))  # tied, non-zero query-norm bias

    def nan_weights(f):
        state = load_file(f / WEIGHTS)
        state["proj_out.weight"] = torch.full_like(state["proj_out.weight"], float("nan"))
        save_file(state, f / WEIGHTS)

    model("nan_weights", nan_weights)

    tiny_transformer = MotifVideoTransformer.from_pretrained(tiny, "transformer")
    good = write_gguf(tiny_transformer.state_dict(), a / "good.gguf", WRITE_TYPES["q8_0"],
                      config_json=tiny_transformer.config.to_diffusers_json(), progress=False)
    data = good.read_bytes()
    (a / "trunc.gguf").write_bytes(data[: len(data) // 2])
    (a / "header_only.gguf").write_bytes(data[:64])
    (a / "garbage.gguf").write_bytes(b"GGUF" + b"\x07" * 400)
    (a / "empty.gguf").write_bytes(b"")
    (a / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (a / "empty_dir").mkdir()
    (a / "a_file.txt").write_text("text")
    (a / "table.csv").write_text("path,prompt\n")
    (a / "no_path.jsonl").write_text(json.dumps({"prompt": "a red circle"}) + "\n")
    (a / "no_prompt.jsonl").write_text(json.dumps({"path": "x.mp4"}) + "\n")
    (a / "not_json.jsonl").write_text("{nope\n")
    (a / "empty.jsonl").write_text("")
    clips = a / "clips"
    clips.mkdir()
    from motif_video.pipeline.video_io import write_video

    write_video(torch.rand(5, 32, 32, 3).numpy(), clips / "c0.mp4", fps=8)
    (clips / "c0.txt").write_text("a red circle moving left\n")
    return a


# (id, command line, words the error line must contain). {t}: the tiny model, {a}: the assets, {w}: a scratch
# folder holding user files (afile, userdir/, ourdir_plus/, dir.mp4/) that must survive every case.
G = "generate 'a red circle' --model {t} -o {w}/out.mp4 --quiet --steps 1 --height 32 --width 32 --frames 5"
GM = "generate 'a red circle' -o {w}/out.mp4 --quiet --steps 1 --height 32 --width 32 --frames 5 --model"
CASES = [
    # generate: sizes, steps, numbers
    ("gen-width-0", G + " --width 0", ["--width", "0"]),
    ("gen-height-0", G + " --height 0", ["--height"]),
    ("gen-frames-0", G + " --frames 0", ["--frames"]),
    ("gen-frames-neg", G + " --frames -3", ["--frames"]),
    ("gen-frames-6", G + " --frames 6", ["4k+1"]),
    ("gen-steps-0", G + " --steps 0", ["steps", "0"]),
    ("gen-steps-neg", G + " --steps -2", ["steps"]),
    ("gen-fps-0", G + " --fps 0", ["--fps"]),
    ("gen-fps-neg", G + " --fps -24", ["--fps"]),
    ("gen-height-60", G + " --height 60", ["height", "60"]),
    ("gen-width-30", G + " --width 30", ["width", "30"]),
    ("gen-height-8", G + " --height 8", ["height"]),
    ("gen-guidance-nan", G + " --guidance-scale nan", ["guidance", "nan"]),
    ("gen-guidance-inf", G + " --guidance-scale inf", ["guidance"]),
    ("gen-guidance-neg-inf", G + " --guidance-scale=-inf", ["guidance"]),
    ("gen-shift-nan", G + " --shift nan", ["shift"]),
    ("gen-shift-inf", G + " --shift inf", ["shift"]),
    ("gen-shift-0", G + " --shift 0", ["shift"]),
    ("gen-shift-neg", G + " --shift -1", ["shift"]),
    ("gen-seed-2^64", G + " --seed 18446744073709551616", ["--seed"]),
    ("gen-seed-huge", G + " --seed 100000000000000000000000000", ["--seed"]),
    ("gen-seed-neg", G + " --seed -1", ["--seed"]),
    ("gen-encoder-reuse-0", G + " --encoder-reuse 0", ["--encoder-reuse"]),
    ("gen-encoder-refresh-no-0", G + " --encoder-refresh 1,2", []),
    ("gen-encoder-refresh-beyond", G + " --encoder-refresh 0,5", []),
    ("gen-prompt-empty", "generate '' --model {t} -o {w}/out.mp4", ["prompt is empty"]),
    ("gen-prompt-blank", "generate '   ' --model {t} -o {w}/out.mp4", ["prompt is empty"]),
    # generate: devices
    ("gen-device-cuda", G + " --device cuda", ["cuda", "no CUDA device"]),
    ("gen-device-cuda3", G + " --device cuda:3", ["cuda:3"]),
    ("gen-device-mps", G + " --device mps", ["mps"]),
    ("gen-device-gpu0", G + " --device gpu0", ["gpu0"]),
    ("gen-device-tpu", G + " --device tpu", ["tpu"]),
    ("gen-device-empty-index", G + " --device cuda:x", ["cuda:x"]),
    # generate: inputs
    ("gen-image-missing", G + " --image {w}/nope.png", ["not found"]),
    ("gen-image-folder", G + " --image {a}", ["is a folder"]),
    ("gen-image-corrupt", G + " --image {a}/corrupt.png", ["cannot read image"]),
    ("gen-gguf-missing", G + " --gguf {w}/nope.gguf", ["not found"]),
    ("gen-gguf-folder", G + " --gguf {a}", ["is a folder"]),
    ("gen-gguf-truncated", G + " --gguf {a}/trunc.gguf", ["trunc.gguf"]),
    ("gen-gguf-header-only", G + " --gguf {a}/header_only.gguf", ["header_only.gguf"]),
    ("gen-gguf-garbage", G + " --gguf {a}/garbage.gguf", ["garbage.gguf"]),
    ("gen-gguf-empty", G + " --gguf {a}/empty.gguf", ["empty.gguf"]),
    # generate: outputs
    ("gen-out-avi", "generate 'a red circle' --model {t} -o {w}/out.avi", ["out.avi"]),
    ("gen-out-missing-folder", "generate 'a red circle' --model {t} -o {w}/missing/out.mp4", ["does not exist"]),
    ("gen-out-under-a-file", "generate 'a red circle' --model {t} -o {w}/afile/out.mp4", ["not a folder"]),
    ("gen-out-user-folder", "generate 'a red circle' --model {t} -o {w}/userdir", ["did not write"]),
    ("gen-out-dir-named-mp4", "generate 'a red circle' --model {t} -o {w}/dir.mp4", ["folder with that name"]),
    ("gen-out-frames-over-file", "generate 'a red circle' --model {t} -o {w}/afile", ["a file with that name"]),
    ("gen-out-ours-plus-user", "generate 'a red circle' --model {t} -o {w}/ourdir_plus", ["--overwrite"]),
    # generate: models
    ("gen-model-missing", GM + " {w}/missing", ["not found"]),
    ("gen-model-is-file", GM + " {w}/afile", ["afile"]),
    ("gen-config-type", GM + " {a}/bad_heads", ["num_attention_heads", "config.json"]),
    ("gen-config-negative", GM + " {a}/bad_layers", ["num_layers"]),
    ("gen-config-mlp", GM + " {a}/bad_mlp", ["mlp_ratio"]),
    ("gen-config-patch", GM + " {a}/bad_patch", ["patch_size"]),
    ("gen-config-image-dim", GM + " {a}/bad_image_dim", ["image_embed_dim"]),
    ("gen-config-rope", GM + " {a}/bad_rope", ["rope_axes_dim"]),
    ("gen-config-theta", GM + " {a}/bad_theta", ["rope_theta"]),
    ("gen-config-flag", GM + " {a}/bad_flag", ["enable_text_cross_attention_single"]),
    ("gen-config-not-json", GM + " {a}/bad_json", ["config.json", "JSON"]),
    ("gen-config-list", GM + " {a}/config_list", ["config.json"]),
    ("gen-config-binary", GM + " {a}/config_binary", ["config.json"]),
    ("gen-weights-truncated", GM + " {a}/trunc_weights", ["trunc_weights"]),
    ("gen-weights-garbage", GM + " {a}/garbage_weights", ["garbage_weights"]),
    ("gen-weights-missing", GM + " {a}/no_weights", ["no_weights"]),
    ("gen-motif-json-bad", GM + " {a}/bad_motif_json", ["motif_video.json"]),
    ("gen-motif-json-type", GM + " {a}/bad_motif_type", ["motif_video.json", "height"]),
    ("gen-motif-json-steps", GM + " {a}/bad_motif_steps", ["motif_video.json", "num_inference_steps"]),
    ("gen-motif-json-list", GM + " {a}/bad_motif_list", ["motif_video.json"]),
    ("gen-no-index", GM + " {a}/no_index", ["model_index.json"]),
    ("gen-bad-index", GM + " {a}/bad_index", ["model_index.json"]),
    ("gen-unknown-class", GM + " {a}/unknown_class", ["NoSuchVAE"]),
    ("gen-missing-vae", GM + " {a}/missing_vae", ["vae"]),
    ("gen-broken-vae", GM + " {a}/broken_vae", ["vae"]),
    ("gen-nan-weights", GM + " {a}/nan_weights", ["NaN"]),
    ("gen-too-big-8192", "generate 'a red circle' --model {t} -o {w}/out.mp4 --height 8192 --width 8192",
     ["GiB", "8192x8192"]),
    ("gen-too-long", "generate 'a red circle' --model {t} -o {w}/out.mp4 --height 1024 --width 1024 --frames 40001",
     ["GiB"]),
    # convert
    ("convert-missing", "convert {w}/missing {w}/out --to original", ["not found"]),
    ("convert-empty-folder", "convert {a}/empty_dir {w}/out --to original", ["config.json"]),
    ("convert-config-type", "convert {a}/bad_heads {w}/out --to original", ["num_attention_heads"]),
    ("convert-config-not-json", "convert {a}/bad_json {w}/out --to original", ["JSON"]),
    ("convert-config-list", "convert {a}/config_list {w}/out --to original", ["config.json"]),
    ("convert-config-patch", "convert {a}/bad_patch {w}/out --to original", ["patch_size"]),
    ("convert-weights-truncated", "convert {a}/trunc_weights {w}/out --to original", ["trunc_weights"]),
    ("convert-weights-missing", "convert {a}/no_weights {w}/out --to original", ["no_weights"]),
    ("convert-weights-garbage", "convert {a}/garbage_weights {w}/out --to diffusers", ["garbage_weights"]),
    ("convert-out-is-file", "convert {t} {w}/afile --to original", ["existing file"]),
    ("convert-out-user-folder", "convert {t} {w}/userdir --to original", ["other files"]),
    ("convert-out-under-file", "convert {t} {w}/afile/sub --to original", ["afile"]),
    ("convert-query-bias-to-diffusers", "convert {a}/biased_tied {w}/out --to diffusers",
     ["non-zero bias", "--to original"]),
    # quantize
    ("quantize-suffix", "quantize {t} {w}/out.bin --type q8_0", [".gguf"]),
    ("quantize-out-folder", "quantize {t} {w}/userdir --type q8_0", ["is a folder"]),
    ("quantize-out-under-file", "quantize {t} {w}/afile/o.gguf --type q8_0", ["not a folder"]),
    ("quantize-missing", "quantize {w}/missing {w}/o.gguf --type q8_0", ["not found"]),
    ("quantize-config-type", "quantize {a}/bad_heads {w}/o.gguf --type q8_0", ["num_attention_heads"]),
    ("quantize-config-not-json", "quantize {a}/bad_json {w}/o.gguf --type q8_0", ["JSON"]),
    ("quantize-config-list", "quantize {a}/config_list {w}/o.gguf --type q8_0", ["config.json"]),
    ("quantize-config-flag", "quantize {a}/bad_flag {w}/o.gguf --type q8_0", ["enable_text"]),
    ("quantize-weights-truncated", "quantize {a}/trunc_weights {w}/o.gguf --type q8_0", ["trunc_weights"]),
    ("quantize-weights-missing", "quantize {a}/no_weights {w}/o.gguf --type q8_0", ["no_weights"]),
    ("quantize-weights-garbage", "quantize {a}/garbage_weights {w}/o.gguf --type q4_0", ["garbage_weights"]),
    ("quantize-query-bias-diffusers-layout", "quantize {a}/biased_tied {w}/o.gguf --type q8_0 --layout diffusers",
     ["--layout tied"]),
    # estimate
    ("estimate-config-type", "estimate --model {a}/bad_heads", ["num_attention_heads"]),
    ("estimate-config-not-json", "estimate --model {a}/bad_json", ["JSON"]),
    ("estimate-config-list", "estimate --model {a}/config_list", ["config.json"]),
    ("estimate-config-mlp", "estimate --model {a}/bad_mlp", ["mlp_ratio"]),
    ("estimate-config-rope", "estimate --model {a}/bad_rope", ["rope_axes_dim"]),
    ("estimate-model-missing", "estimate --model {w}/missing", ["not found"]),
    ("estimate-height-0", "estimate --height 0", ["height"]),
    ("estimate-width-50", "estimate --width 50", ["width"]),
    ("estimate-frames-6", "estimate --frames 6", ["4k+1"]),
    ("estimate-steps-0", "estimate --steps 0", ["steps"]),
    ("estimate-mfu-0", "estimate --mfu 0", ["MFU"]),
    ("estimate-throughput-0", "estimate --throughput-tflops 0", ["throughput"]),
    ("estimate-prompts-0", "estimate --prompts 0", ["prompts"]),
    ("estimate-dtype", "estimate --dtype int3", ["dtype"]),
    # calibrate-reuse
    ("calibrate-steps-0", "calibrate-reuse {t} --budget 1 --steps 0", ["steps"]),
    ("calibrate-budget-0", "calibrate-reuse {t} --budget 0", ["--budget"]),
    ("calibrate-budget-over", "calibrate-reuse {t} --budget 99 --steps 2", ["--budget"]),
    ("calibrate-height-0", "calibrate-reuse {t} --budget 1 --height 0", ["--height"]),
    ("calibrate-frames-0", "calibrate-reuse {t} --budget 1 --frames 0", ["--frames"]),
    ("calibrate-missing", "calibrate-reuse {w}/missing --budget 1", ["not found"]),
    ("calibrate-config-type", "calibrate-reuse {a}/bad_heads --budget 1", ["num_attention_heads"]),
    ("calibrate-device", "calibrate-reuse {t} --budget 1 --device cuda:7", ["cuda:7"]),
    ("calibrate-write-hub-id", "calibrate-reuse {w}/missing --budget 1 --write", ["local model folder"]),
    # nano-data
    ("nano-data-size-40000", "nano-data {w}/data --size 40000 --clips 1 --images 0", ["size"]),
    ("nano-data-size-15", "nano-data {w}/data --size 15 --clips 1", ["size"]),
    ("nano-data-size-odd", "nano-data {w}/data --size 33 --clips 1", ["size"]),
    ("nano-data-frames-1", "nano-data {w}/data --frames 1 --clips 1", ["frames"]),
    ("nano-data-frames-huge", "nano-data {w}/data --frames 10000000 --size 4096 --clips 1", ["GiB"]),
    ("nano-data-nothing", "nano-data {w}/data --clips 0 --images 0", ["at least one"]),
    ("nano-data-clips-neg", "nano-data {w}/data --clips -1", ["at least one"]),
    ("nano-data-eval-neg", "nano-data {w}/data --eval-prompts -1", ["--eval-prompts"]),
    ("nano-data-out-file", "nano-data {w}/afile --clips 1 --images 0", ["not a folder"]),
    ("nano-data-out-user", "nano-data {w}/userdir --clips 1 --images 0", ["not empty"]),
    ("nano-data-fps-0", "nano-data {w}/data --clips 1 --images 0 --fps 0 --eval-prompts 0", ["fps"]),
    # nano-train
    ("nano-train-codec-missing", "nano-train {w}/run --codec-from {w}/missing", ["--codec-from", "not found"]),
    ("nano-train-teacher-missing", "nano-train {w}/run --teacher-from {w}/missing", ["--teacher-from"]),
    ("nano-train-codec-empty", "nano-train {w}/run --codec-from {a}/empty_dir", ["config.json"]),
    ("nano-train-clips-0", "nano-train {w}/run --clips 0", [">= 1"]),
    ("nano-train-stage-0", "nano-train {w}/run --stage-steps 1 0 1", [">= 1"]),
    ("nano-train-encoder-budget", "nano-train {w}/run --encoder-budget 999", ["--encoder-budget"]),
    ("nano-train-override-key", "nano-train {w}/run -o objective.image_condition.probabilty=0",
     ["unknown config key", "probabilty"]),
    ("nano-train-override-value", "nano-train {w}/run --override optim.lr=abc", ["optim.lr", "number"]),
    # eval
    ("eval-missing", "eval {w}/missing --out {w}/report", ["does not exist"]),
    ("eval-empty-folder", "eval {a}/empty_dir --out {w}/report", ["no clips"]),
    ("eval-csv", "eval {a}/table.csv --out {w}/report", [".jsonl"]),
    ("eval-jsonl-no-path", "eval {a}/no_path.jsonl --out {w}/report", ["'path'"]),
    ("eval-jsonl-no-prompt", "eval {a}/no_prompt.jsonl --out {w}/report", ["prompt"]),
    ("eval-jsonl-not-json", "eval {a}/not_json.jsonl --out {w}/report", ["not_json.jsonl"]),
    ("eval-jsonl-empty", "eval {a}/empty.jsonl --out {w}/report", ["empty.jsonl"]),
    ("eval-limit-0", "eval {a}/clips --limit 0 --out {w}/report", ["--limit"]),
    ("eval-out-file", "eval {a}/clips --out {w}/afile", ["existing file"]),
    ("eval-out-under-file", "eval {a}/clips --out {w}/afile/report", ["afile"]),
]


def _user_files(w: Path) -> None:
    (w / "afile").write_text("the user's notes\n")
    (w / "userdir").mkdir()
    (w / "userdir" / "thesis.tex").write_text("years of work\n")
    (w / "dir.mp4").mkdir()
    (w / "dir.mp4" / "keep").write_text("x")
    ours = w / "ourdir_plus"
    ours.mkdir()
    (ours / "video.json").write_text('{"fps": 8.0, "frames": 1}\n')
    (ours / "frame_00000.png").write_bytes(b"png")
    (ours / "notes.txt").write_text("added by the user\n")


@pytest.mark.parametrize("argv, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(capsys, tmp_path, tiny, assets, argv, words):
    w = tmp_path / "work"
    w.mkdir()
    _user_files(w)
    before, assets_before = snapshot(w), snapshot(assets)
    argv = shlex.split(argv.format(t=tiny, a=assets, w=w))
    rc, _, err = run_cli(capsys, *argv)
    assert_user_error(rc, err, *words)
    assert snapshot(w) == before
    assert snapshot(assets) == assets_before
