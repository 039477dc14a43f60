"""What happens to the user's files: -o rules, modes per umask, full disks, read-only folders, interrupted writes,
in-place conversion; and the warnings and refusals that replace silent wrong results."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from motif_video.pipeline import video_io

from .conftest import assert_user_error, hidden_entries, run_cli, snapshot

NANO = Path(__file__).resolve().parents[2] / "src" / "motif_video" / "assets" / "motif-video-nano"


def generate(capsys, tiny, out, *extra):
    return run_cli(capsys, "generate", "a red circle moving left", "--model", tiny, "-o", out, "--quiet",
                   "--steps", "1", "--height", "32", "--width", "32", "--frames", "5", *extra)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("name", ["clip.mp4", "clip.gif", "frames"])
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_take_the_umask_mode(capsys, tiny, tmp_path, umask, name, mask):
    umask(mask)
    rc, out, err = generate(capsys, tiny, tmp_path / name)
    assert rc == 0, err
    path = tmp_path / name
    if path.is_dir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~mask
        frames = sorted(path.iterdir())
        assert [p.name for p in frames][-1] == "video.json" and len(frames) == 6
        assert {stat.S_IMODE(p.stat().st_mode) for p in frames} == {0o666 & ~mask}
    else:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert hidden_entries(tmp_path) == []


def test_frame_folder_rules(capsys, tiny, tmp_path):
    target = tmp_path / "frames"
    assert generate(capsys, tiny, target)[0] == 0
    first = snapshot(target)
    assert generate(capsys, tiny, target, "--seed", "1")[0] == 0  # our own previous output: replaced
    assert snapshot(target) != first and len(list(target.iterdir())) == 6
    (target / "notes.txt").write_text("mine")
    rc, _, err = generate(capsys, tiny, target)
    assert_user_error(rc, err, "--overwrite")
    assert (target / "notes.txt").read_text() == "mine"
    assert generate(capsys, tiny, target, "--overwrite")[0] == 0
    assert not (target / "notes.txt").exists() and (target / "video.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate(capsys, tiny, empty)[0] == 0 and (empty / "video.json").is_file()
    assert hidden_entries(tmp_path) == []


def test_existing_file_is_replaced_only_when_the_new_one_is_complete(capsys, tiny, tmp_path, monkeypatch):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"previous video")

    def crash(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(video_io, "_write_mp4", crash)
    rc, _, err = generate(capsys, tiny, target)
    assert_user_error(rc, err, "no space left", "clip.mp4")
    assert target.read_bytes() == b"previous video" and hidden_entries(tmp_path) == []


@pytest.mark.parametrize("name", ["clip.gif", "frames", "still.png"])
def test_full_disk_simulated(tmp_path, monkeypatch, name):
    real_save = video_io.Image.Image.save

    def save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(video_io.Image.Image, "save", save)
    frames = np.zeros((1 if name.endswith(".png") else 3, 16, 16, 3), np.uint8)
    with pytest.raises(video_io.MotifVideoError, match="no space left"):
        video_io.write_video(frames, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["clip.gif", "frames", "clip.mp4"])
def test_full_disk_real(capsys, tiny, mount_tmpfs, name):
    fs = mount_tmpfs("12k")
    (fs / "keep.txt").write_text("k")
    frames = (np.random.default_rng(0).random((9, 64, 64, 3)) * 255).astype(np.uint8)  # noise: incompressible
    with pytest.raises(video_io.MotifVideoError, match="cannot write"):
        video_io.write_video(frames, fs / name)
    assert sorted(p.name for p in fs.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("command", ["generate", "quantize", "convert", "calibrate"])
def test_read_only_output_folder_fails_before_any_model_loads(capsys, tiny, mount_tmpfs, monkeypatch, command):
    from motif_video.model.transformer import MotifVideoTransformer
    from motif_video.pipeline.pipeline import MotifVideoPipeline

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(MotifVideoPipeline, "from_pretrained", loaded)
    monkeypatch.setattr(MotifVideoTransformer, "from_pretrained", loaded)
    monkeypatch.setattr("motif_video.convert.checkpoint.read_state_dict", loaded)
    ro = mount_tmpfs(readonly=True)
    argv = {"generate": ["generate", "a red circle", "--model", tiny, "-o", ro / "out.mp4"],
            "quantize": ["quantize", tiny, ro / "out.gguf", "--type", "q8_0"],
            "convert": ["convert", tiny, ro / "out", "--to", "original"],
            "calibrate": ["calibrate-reuse", ro, "--budget", "1", "--write"]}[command]
    rc, _, err = run_cli(capsys, *argv)
    assert_user_error(rc, err, "Read-only")


@pytest.mark.parametrize("error, rc_expected, word", [(KeyboardInterrupt, 130, "interrupted"),
                                                       ("terminated", 143, "terminated")])
def test_interrupt_during_the_final_write_leaves_nothing(capsys, tiny, tmp_path, monkeypatch, error, rc_expected,
                                                         word):
    from motif_video.files import Terminated

    target = tmp_path / "clip.gif"
    target.write_bytes(b"previous")

    def interrupted(arr, tmp, rate, crf):
        tmp.write_bytes(b"half a gif")
        raise Terminated() if error == "terminated" else error()

    monkeypatch.setattr(video_io, "_write_gif", interrupted)
    rc, _, err = generate(capsys, tiny, target)
    assert rc == rc_expected and word in err and "Traceback" not in err
    assert target.read_bytes() == b"previous" and hidden_entries(tmp_path) == []


def test_long_prompt_warns_that_it_is_cut(capsys, tiny, tmp_path):
    rc, _, err = run_cli(capsys, "generate", "red " * 2500, "--model", tiny, "-o", tmp_path / "a.mp4", "--quiet",
                         "--steps", "1", "--height", "32", "--width", "32", "--frames", "5")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "2501 tokens" in warnings[0] and "512" in warnings[0]


def test_short_prompt_does_not_warn(capsys, tiny, tmp_path):
    rc, _, err = generate(capsys, tiny, tmp_path / "a.mp4")
    assert rc == 0 and "warning" not in err


def test_slow_cpu_settings_warn(capsys, tiny, tmp_path):
    rc, _, err = generate(capsys, tiny, tmp_path / "a.mp4", "--dtype", "bf16", "--device", "cpu")
    assert rc == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning: ")] == [
        "warning: bf16 on the CPU runs many times slower than fp32 (no fast half-precision matmuls there)"]
    # --compile on the CPU: warned before anything is compiled (the size error stops it right after)
    rc, _, err = run_cli(capsys, "generate", "a red circle", "--model", tiny, "-o", tmp_path / "b.mp4", "--compile",
                         "--device", "cpu", "--height", "8192", "--width", "8192")
    assert_user_error(rc, err, "GiB")
    assert "warning: --compile on the CPU" in err


def test_eval_says_which_clips_it_skips(capsys, tmp_path):
    from motif_video.pipeline.video_io import write_video

    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("a", "b", "c"):
        write_video(np.zeros((5, 32, 32, 3), np.uint8), clips / f"{name}.mp4", fps=8)
    (clips / "a.txt").write_text("a red circle moving left")
    rc, _, err = run_cli(capsys, "eval", clips, "--out", tmp_path / "report")
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert lines == ["warning: skipping 2 clip(s) without a same-name .txt prompt: b.mp4, c.mp4"]


def _transformer_output(model, seed=0):
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 2, 8, 8, generator=gen)
    text = torch.randn(1, 6, cfg.text_embed_dim, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), text, None, None).float()


def test_quantize_a_model_with_a_query_bias_in_the_tied_form(capsys, tiny, tmp_path):
    import shutil

    from motif_video.convert.gguf import read_gguf
    from motif_video.model.transformer import MotifVideoTransformer
    from motif_video.testing import save_tied_transformer

    model = save_tied_transformer(shutil.copytree(tiny, tmp_path / "biased"), query_bias=True)
    out = tmp_path / "biased.gguf"
    rc, stdout, err = run_cli(capsys, "quantize", model, out, "--type", "q8_0", "--no-progress")
    assert rc == 0, err
    assert "tied layout" in stdout and "warning: " in err and "not with diffusers" in err
    assert any(".cross_attn.query_norm.bias" in k for k in read_gguf(out)[0])
    reference = MotifVideoTransformer.from_pretrained(model, "transformer").float().eval()
    loaded = MotifVideoTransformer.from_single_file(out).eval()
    assert loaded.config.cross_attention_form == "tied"
    want, got = _transformer_output(reference), _transformer_output(loaded)
    # Q8_0 (8-bit blocks): about 0.5% relative error; a wrong layout or a lost LayerNorm bias gives order 1
    assert ((got - want).norm() / want.norm()).item() < 2e-2
    rc, stdout, err = run_cli(capsys, "generate", "a red circle", "--gguf", out, "--model", model, "-o",
                              tmp_path / "v.mp4", "--steps", "2", "--height", "32", "--width", "32", "--frames", "5",
                              "--quiet")
    assert rc == 0, err and (tmp_path / "v.mp4").is_file()


def test_quantize_tiny_untied_model_stays_diffusers(capsys, tiny, tmp_path):
    rc, stdout, err = run_cli(capsys, "quantize", tiny, tmp_path / "t.gguf", "--type", "q8_0", "--no-progress")
    assert rc == 0 and "diffusers layout" in stdout and "warning" not in err


def test_convert_in_place_and_onto_a_model_folder(capsys, tmp_path, monkeypatch):
    import shutil

    import motif_video.convert.checkpoint as checkpoint
    from motif_video.convert.checkpoint import read_state_dict
    from motif_video.convert.layouts import tied_to_original

    model = tmp_path / "nano"
    shutil.copytree(NANO, model)
    transformer = model / "transformer"
    expected = tied_to_original(read_state_dict(transformer))
    rc, _, err = run_cli(capsys, "convert", transformer, transformer, "--to", "original")  # in place
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "convert", model, model, "--to", "original")  # the model folder, onto itself
    assert rc == 0, err
    got = read_state_dict(transformer)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert sorted(p.name for p in transformer.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert hidden_entries(model) == []

    # a disk that fills up halfway through the new weights: the old folder is untouched
    before = snapshot(model)
    real_save = checkpoint.save_file

    def fill_up(tensors, filename, metadata=None):
        real_save(dict(list(tensors.items())[:3]), filename, metadata=metadata)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", fill_up)
    rc, _, err = run_cli(capsys, "convert", model, model, "--to", "original")
    assert_user_error(rc, err, "no space left")
    assert snapshot(model) == before and hidden_entries(model) == []


@pytest.mark.parametrize("name, count, words", [("cuda:1", 1, "1 CUDA device(s)"), ("cuda:0", 0, "no CUDA device"),
                                                ("cuda", 0, "no CUDA device")])
def test_cuda_device_index_is_checked_against_the_machine(monkeypatch, name, count, words):
    from motif_video.errors import MotifVideoError
    from motif_video.model_folder import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(MotifVideoError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_device(name)


def test_memory_refusal_names_what_it_needs(capsys, tiny, tmp_path, monkeypatch):
    from motif_video.commands import estimate

    monkeypatch.setattr(estimate, "available_memory", lambda device: 2**26)  # a machine with 64 MiB free
    rc, _, err = run_cli(capsys, "generate", "a red circle", "--model", tiny, "-o", tmp_path / "a.mp4",
                         "--height", "512", "--width", "512", "--frames", "33", "--steps", "1", "--quiet")
    line = assert_user_error(rc, err, "512x512 with 33 frames", "only 0.1 GiB")
    # the decoded frames alone: 33 x 512 x 512 x 3 float32 values, held four times
    assert float(line.split("about ")[1].split(" GiB")[0]) >= 4 * 33 * 512 * 512 * 3 * 4 / 2**30 - 0.05
    assert list(tmp_path.iterdir()) == []
