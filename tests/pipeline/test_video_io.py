import json
import os
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from motif_video.errors import MotifVideoError
from motif_video.pipeline import video_io
from motif_video.pipeline.video_io import probe_video, read_video, to_uint8_frames, write_video


def _index_clip(t=30, h=32, w=48):
    """Flat frames whose brightness encodes the frame index (steps of 8), so any codec keeps them apart."""
    x = np.zeros((t, h, w, 3), dtype=np.uint8)
    x[:] = (np.arange(t) * 8).astype(np.uint8)[:, None, None, None]
    x[..., 1] = 255 - x[..., 0]
    return x


def _indices(frames):
    return [int(round(v / 8)) for v in frames[..., 0].reshape(len(frames), -1).mean(1)]


def _decode_with_pyav(path):
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return np.stack(frames)


def test_mp4_round_trip_exact_count_and_size(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (17, 64, 48, 3), dtype=np.uint8)
    x[:] = x[:, :1, :1] // 64 * 64  # flat colours: H.264 reproduces them closely
    out = write_video(x, tmp_path / "c.mp4", fps=24)
    ref = _decode_with_pyav(out)  # independent decode, straight from PyAV
    assert ref.shape == (17, 64, 48, 3)
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert s.average_rate == 24
    got = read_video(out)
    assert got.shape == x.shape and got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)
    assert np.abs(got.astype(int) - x).max() <= 4
    assert probe_video(out) == {"frames": 17, "height": 64, "width": 48, "fps": 24.0}


def test_the_same_frames_give_the_same_file_after_decoding(tmp_path):
    # A square sliding over a gradient: enough detail that the encoder's decisions show in the file.
    t, size = 9, 32
    yy, xx = np.mgrid[0:size, 0:size]
    x = np.zeros((t, size, size, 3), dtype=np.uint8)
    for i in range(t):
        x[i, ..., 0] = 40 + 4 * xx
        x[i, ..., 1] = 30 + 3 * yy
        x[i, 8:20, 2 + 2 * i:14 + 2 * i] = (230, 200, 40)
    files = set()
    for k in range(8):  # decoding between writes once changed what the encoder wrote for the same frames
        out = write_video(x, tmp_path / f"c{k}.mp4", fps=24)
        files.add(out.read_bytes())
        read_video(out)
    assert len(files) == 1


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    x = np.full((3, 31, 45, 3), 200, dtype=np.uint8)
    out = write_video(x, tmp_path / "odd.mp4")
    assert probe_video(out)["height"] == 32 and probe_video(out)["width"] == 46
    assert read_video(out).shape == (3, 32, 46, 3)


def test_gif_round_trip(tmp_path):
    x = _index_clip(t=10)
    out = write_video(x, tmp_path / "c.gif", fps=10)
    got = read_video(out)
    assert got.shape == x.shape
    assert np.abs(got.astype(int) - x).max() <= 2  # palette quantisation of flat frames is (near) exact
    p = probe_video(out)
    assert p["frames"] == 10 and (p["height"], p["width"]) == (32, 48) and p["fps"] == pytest.approx(10.0)


@pytest.mark.parametrize("name", ["frames", "frames/"])
def test_png_folder_round_trip(tmp_path, name):
    x = np.random.default_rng(1).integers(0, 256, (5, 20, 30, 3), dtype=np.uint8)
    write_video(x, os.path.join(tmp_path, name), fps=12)
    folder = tmp_path / "frames"
    assert sorted(p.name for p in folder.iterdir()) == [f"frame_{i:05d}.png" for i in range(5)] + ["video.json"]
    assert json.loads((folder / "video.json").read_text())["fps"] == 12
    np.testing.assert_array_equal(read_video(folder), x)  # PNG is lossless
    assert probe_video(folder) == {"frames": 5, "height": 20, "width": 30, "fps": 12.0}
    # Overwriting a folder replaces every frame, none of the old ones survive.
    write_video(x[:2], folder, fps=12)
    assert len(list(folder.glob("*.png"))) == 2


def test_float_and_torch_inputs(tmp_path):
    x = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    f = x.astype(np.float32) / 255.0
    np.testing.assert_array_equal(to_uint8_frames(f), x)
    np.testing.assert_array_equal(to_uint8_frames(torch.from_numpy(f)), x)
    np.testing.assert_array_equal(to_uint8_frames(torch.from_numpy(f).bfloat16()).astype(int) // 4, x.astype(int) // 4)
    write_video(torch.from_numpy(f), tmp_path / "t")
    np.testing.assert_array_equal(read_video(tmp_path / "t"), x)
    with pytest.raises(MotifVideoError, match=r"\(T, H, W, 3\)"):
        to_uint8_frames(np.zeros((2, 3, 8, 8)))
    with pytest.raises(MotifVideoError, match="NaN"):
        to_uint8_frames(np.full((1, 2, 2, 3), np.nan))


@pytest.mark.parametrize("ext", [".mp4", ".gif", ""])
def test_failure_leaves_no_partial_file(tmp_path, monkeypatch, ext):
    x = _index_clip(t=6)
    target = tmp_path / f"clip{ext}"
    calls = {"n": 0}
    real_from_ndarray = av.VideoFrame.from_ndarray
    real_fromarray = video_io.Image.fromarray

    def boom():
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("disk full")

    class FakeVideoFrame:
        @staticmethod
        def from_ndarray(a, format):
            boom()
            return real_from_ndarray(a, format=format)

    def fake_fromarray(a, *args, **kw):
        boom()
        return real_fromarray(a, *args, **kw)

    monkeypatch.setattr(av, "VideoFrame", FakeVideoFrame)
    monkeypatch.setattr(video_io.Image, "fromarray", fake_fromarray)
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(x, target)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_previous_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "clip.mp4"
    write_video(_index_clip(t=4), target)
    before = target.read_bytes()

    def fail(*a, **k):
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(video_io, "_write_mp4", fail)
    with pytest.raises(RuntimeError):
        write_video(_index_clip(t=8), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def _nearest_source_indices(n_src, src_fps, dst_fps, start=0):
    """Reference resampler in exact arithmetic: output k shows source round_half_up(start + k * src/dst)."""
    out, k = [], 0
    while Fraction(k, 1) / dst_fps < Fraction(n_src - start) / src_fps:
        x = start + Fraction(k) * Fraction(src_fps) / Fraction(dst_fps)
        out.append(min(int(x + Fraction(1, 2)), n_src - 1))
        k += 1
    return out


@pytest.mark.parametrize("dst_fps", [12, 15, 24, 60])
def test_fps_resampling_by_timestamp(tmp_path, dst_fps):
    x = _index_clip(t=30)
    write_video(x, tmp_path / "f", fps=30)
    assert _indices(read_video(tmp_path / "f", fps=dst_fps)) == _nearest_source_indices(30, 30, dst_fps)
    assert _indices(read_video(tmp_path / "f", fps=dst_fps, start=5, num_frames=4)) == _nearest_source_indices(
        30, 30, dst_fps, start=5
    )[:4]


def test_fps_resampling_mp4_timestamps(tmp_path):
    x = _index_clip(t=30)
    write_video(x, tmp_path / "c.mp4", fps=30)
    assert _indices(read_video(tmp_path / "c.mp4", fps=10)) == _nearest_source_indices(30, 30, 10)
    assert _indices(read_video(tmp_path / "c.mp4", num_frames=3, start=7)) == [7, 8, 9]


def test_bad_inputs_raise_one_line_errors(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 50)
    good = write_video(_index_clip(t=30), tmp_path / "c.mp4")
    (tmp_path / "cut.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for name in ["empty.mp4", "junk.mp4", "cut.mp4", "missing.mp4"]:
        for fn in (read_video, probe_video):
            with pytest.raises(MotifVideoError) as e:
                fn(tmp_path / name)
            assert "\n" not in str(e.value) and name in str(e.value)
    with pytest.raises(MotifVideoError, match="no frames"):
        read_video(good, start=100)
    with pytest.raises(MotifVideoError, match=r"\.mp4, \.gif"):
        write_video(_index_clip(t=2), tmp_path / "c.avi")
    with pytest.raises(MotifVideoError, match="does not exist"):
        write_video(_index_clip(t=2), tmp_path / "nope" / "c.mp4")


def test_single_png_image(tmp_path):
    x = np.random.default_rng(3).integers(0, 256, (1, 10, 14, 3), dtype=np.uint8)
    out = write_video(x, tmp_path / "im.png")
    np.testing.assert_array_equal(read_video(out), x)
    assert probe_video(out)["frames"] == 1 and probe_video(out)["width"] == 14
    with pytest.raises(MotifVideoError, match="one frame"):
        write_video(np.concatenate([x, x]), tmp_path / "two.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(MotifVideoError, match="junk.png"):
        read_video(tmp_path / "junk.png")
