"""`estimate --gpus N --ulysses U --ring R`: per-GPU memory, traffic and time, against hand counts."""

import pytest

from motif_video.cli import main
from motif_video.commands.estimate import activation_bytes, estimate
from motif_video.flops import context_traffic
from motif_video.model.config import preset


def test_traffic_by_hand():
    c = preset("motif-video-tiny")  # D 32, 1 dual + 2 encoder + 1 decoder blocks
    d, h, n = 32, 2, 25  # 100 video tokens over 2 x 2
    t = context_traffic(c, 100, 8, ulysses=2, ring=2, value_bytes=2)
    per_encoder_attention = 4 * n * d / 2 + 8 * d / 2 + 2 * n * d + 8 * (d + h) / 2
    per_decoder_attention = 4 * 2 * n * d / 2 + 2 * 2 * n * d
    assert t.encoder == 2 * 3 * per_encoder_attention
    assert t.decoder == 2 * (per_decoder_attention + 3 * n * d)
    ulysses_only = context_traffic(c, 100, 8, ulysses=2, ring=1, value_bytes=2)
    assert ulysses_only.encoder == 2 * 3 * (4 * 50 * d / 2 + 8 * d / 2)


def test_estimate_per_gpu_memory_and_time():
    c = preset("motif-video-2b")
    one = estimate(c, 736, 1280, 121)
    eight = estimate(c, 736, 1280, 121, gpus=8, link_gbps=100.0)["context_parallel"]
    assert (eight["ulysses"], eight["ring"], eight["cfg"]) == (4, 2, 1)  # 12 heads on 8 GPUs
    assert eight["local_video_tokens"] == 114080 // 8
    assert eight["activation_bytes_per_gpu"] == activation_bytes(c, 14260, 512, 0, 2, 2)["bytes"]
    assert eight["activation_bytes_per_gpu"] < one["memory"]["bf16"]["activations"]["bytes"] / 6
    compute = one["time"]["seconds_per_step"] / 8
    assert eight["compute_seconds_per_step"] == pytest.approx(compute)
    assert eight["seconds_per_step"] == pytest.approx(compute + eight["comm_bytes_per_step"] / 100e9)
    cfg = estimate(c, 736, 1280, 121, gpus=8, ulysses=4, ring=1)["context_parallel"]
    assert cfg["cfg"] == 2 and cfg["local_video_tokens"] == 114080 // 4


def test_bad_grid_is_one_error_line(capsys):
    assert main(["estimate", "--gpus", "8", "--ulysses", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Ulysses degree 5 must divide")
