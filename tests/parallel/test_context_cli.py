"""`torchrun -m motif_video.cli generate` on 2 gloo processes: the written frames equal one process's; a bad grid
makes every rank print one error line and exit 2."""

import os
import socket
import subprocess
import sys

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(args: list[str], processes: int, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    return subprocess.run([*launch, "-m", "motif_video.cli", "generate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def frames(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))])


def test_two_processes_write_the_frames_of_one(tmp_path):
    args = ["a red ball", "--steps", "2", "--frames", "5", "--height", "48", "--width", "80", "--quiet"]
    one = generate([*args, "-o", str(tmp_path / "one")], 1, tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = generate([*args, "-o", str(tmp_path / "two"), "--ulysses", "2"], 2, tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = frames(tmp_path / "one"), frames(tmp_path / "two")
    assert a.shape == b.shape == (5, 48, 80, 3)
    assert np.abs(a - b).max() <= 1  # latents equal to 1e-5 of their RMS: at most a rounding step in uint8


def test_bad_grid_fails_on_every_rank(tmp_path):
    result = generate(["a red ball", "-o", str(tmp_path / "out.gif"), "--ulysses", "3"], 2, tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stderr[-3000:]
    assert all("Ulysses degree 3 must divide the model's 4 attention heads" in e for e in errors)
    assert "exitcode  : 2" in result.stderr
    assert not (tmp_path / "out.gif").exists()
