"""Live servers for the serve tests: real uvicorn on a free 127.0.0.1 port, in a thread (sharing one loaded tiny
pipeline) or in a subprocess running the real `motif-video serve` command; always stopped at the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from motif_video.testing import save_tiny_pipeline

# Small generation defaults for the tiny model (the release's would be 1280x736, 121 frames, 50 steps).
TINY_DEFAULTS = {"height": 32, "width": 32, "num_frames": 9, "num_inference_steps": 3, "guidance_scale": 4.0,
                 "guider": "cfg", "shift": 3.0, "fps": 8, "negative_prompt": "", "max_sequence_length": 16}


def wait_for(condition, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll until condition() is truthy (returning its value); fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def video_distance(a, b) -> float:
    """Mean absolute difference of two clips (paths or decoded frames), in 8-bit levels."""
    from motif_video.pipeline.video_io import read_video

    a, b = (read_video(x) if isinstance(x, (str, Path)) else x for x in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


SAME_VIDEO_LEVELS = 0.75


def assert_same_video(got, want) -> None:
    """The same clip up to float rounding: a last-bit difference (batching, an adapter's fused update, another CPU's
    kernels) can flip a pixel by one level before H.264, and on 32x32 frames of near-uniform grey the encoder spreads
    that over its blocks (measured on an AMD EPYC: up to 0.49 levels on average; 0 on the machine before it). Another
    seed of the tiny model is 1.6-1.9 levels away, so this still tells jobs apart (checked where it matters)."""
    assert video_distance(got, want) < SAME_VIDEO_LEVELS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    folder = save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-model", shift=3.0, guidance_scale=4.0)
    (folder / "motif_video.json").write_text(json.dumps({"generation": TINY_DEFAULTS}))
    return folder


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    from motif_video.pipeline.pipeline import MotifVideoPipeline

    return MotifVideoPipeline.from_pretrained(tiny_model, device="cpu")


@contextmanager
def thread_server(pipe, data_dir: Path, name: str = "tiny-model", **settings):
    """A live server in this process; yields (base_url, app)."""
    import uvicorn

    from motif_video.serve.app import create_app
    from motif_video.serve.params import ServeSettings

    app = create_app(pipe, ServeSettings(data_dir=data_dir, **{"shutdown_grace_s": 0.0, **settings}), name)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, what="the server to start")
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the server did not stop"


class ServerProcess:
    """`python -m motif_video.cli serve ...` in a subprocess."""

    def __init__(self, model: Path, data_dir: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data_dir.parent / f"server-{self.port}.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                              os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "motif_video.cli", "serve", "--model", str(model), "--port", str(self.port),
             "--data-dir", str(data_dir), "--log-level", "warning", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(self._healthy, 300, 0.2, "the server process to answer /health")
        except BaseException:
            self.kill()
            raise

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"server exited with {self.process.returncode}: "
                                 f"{Path(self.log.name).read_text()[-2000:]}")
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.log.close()


def poll_until_done(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    def done():
        video = client.get(f"/v1/videos/{job_id}").json()
        return video if video["status"] in ("completed", "failed") else None

    return wait_for(done, timeout, 0.1, f"job {job_id} to finish")
