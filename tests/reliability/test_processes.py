"""Concurrency and signals with real processes: two writers of one output, SIGTERM and SIGKILL mid-write.

Each child runs the real CLI (`motif_video.cli.main`); only the GGUF encoder is slowed (a sleep per tensor) so the
signal or the second writer lands while the file is being written, not before or after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from motif_video.convert.gguf import read_gguf

from .conftest import hidden_entries

SRC = Path(__file__).resolve().parents[2] / "src"
SLOW_WRITER = """
import sys, time
import motif_video.convert.gguf as gguf
real_encode, delay = gguf._encode, float(sys.argv[1])
def slow_encode(tensor, qtype):
    print("writing", flush=True)
    time.sleep(delay)
    return real_encode(tensor, qtype)
gguf._encode = slow_encode
from motif_video.cli import main
sys.exit(main(sys.argv[2:]))
"""


def start(delay: float, *argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(delay), *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_writing(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "writing", proc.stderr.read()


def test_two_quantize_writers_of_one_file(tiny, tmp_path):
    out = tmp_path / "t.gguf"
    writers = [start(0.02, "quantize", tiny, out, "--type", qtype, "--no-progress") for qtype in ("q8_0", "q4_0")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in writers]
    assert [rc for rc, _ in results] == [0, 0], results
    tensors, _ = read_gguf(out)  # one complete file from one writer, never a mix of both
    kinds = {t.qtype.name for t in tensors.values()} - {"F32"}
    assert kinds in ({"Q8_0"}, {"Q4_0"})
    assert hidden_entries(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]


def test_sigterm_mid_write_cleans_up_and_keeps_the_old_file(tiny, tmp_path):
    out = tmp_path / "t.gguf"
    out.write_bytes(b"the previous file")
    proc = start(0.5, "quantize", tiny, out, "--type", "q8_0", "--no-progress")
    wait_for_writing(proc)
    assert len(hidden_entries(tmp_path)) == 1  # the temporary being written
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert rc == 128 + signal.SIGTERM and "terminated" in err and "Traceback" not in err
    assert out.read_bytes() == b"the previous file" and hidden_entries(tmp_path) == []


def test_sigkill_mid_write_keeps_the_old_file_and_the_next_write_cleans_up(tiny, tmp_path, capsys):
    from .conftest import run_cli

    out = tmp_path / "t.gguf"
    out.write_bytes(b"the previous file")
    proc = start(0.5, "quantize", tiny, out, "--type", "q8_0", "--no-progress")
    wait_for_writing(proc)
    proc.kill()
    proc.wait(timeout=60)
    assert out.read_bytes() == b"the previous file"
    assert len(hidden_entries(tmp_path)) == 1  # a SIGKILL cannot be caught: the temporary stays for now
    rc, _, err = run_cli(capsys, "quantize", tiny, out, "--type", "q8_0", "--no-progress")
    assert rc == 0, err
    assert hidden_entries(tmp_path) == [] and read_gguf(out)[0]


@pytest.mark.parametrize("name", ["clip.gif", "frames"])
def test_sigterm_during_a_video_write(tmp_path, name):
    """The PNG/GIF writers through write_video in a process that installed the CLI's SIGTERM handling."""
    script = f"""
import sys, time
import numpy as np
from PIL import Image
from motif_video.files import terminate_as_interrupt, Terminated
from motif_video.pipeline.video_io import write_video
real_save = Image.Image.save
def slow_save(self, *args, **kwargs):
    print("writing", flush=True)
    time.sleep(0.3)
    return real_save(self, *args, **kwargs)
Image.Image.save = slow_save
try:
    with terminate_as_interrupt():
        write_video(np.zeros((9, 16, 16, 3), np.uint8), {str(tmp_path / name)!r})
except Terminated:
    sys.exit(143)
"""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_writing(proc)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, proc.stderr.read()
    assert list(tmp_path.iterdir()) == []
