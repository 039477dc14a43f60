"""One process SIGKILLed in the middle of a context-parallel run ends the whole torchrun job, in generation and in
training: torchrun exits non-zero and every process of the job (workers, DataLoader workers) is gone within
GONE_WITHIN seconds of the kill; no survivor waits in a collective for the dead one, and no output is written."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import yaml

from tests.train.engine_helpers import base_config, make_cache
from tests.train.test_distributed import free_port, job_processes, kill_job

# seconds: torchrun's own monitoring, not the 10-minute collective timeout, must end the job (it gives the survivors
# 30 s after its SIGTERM before it SIGKILLs them; the rest is slack for a busy machine)
GONE_WITHIN = 90.0


class Job:
    """A torchrun launch whose stderr is collected as it comes (tqdm's progress lines end in \\r, not \\n)."""

    def __init__(self, args: list[str], processes: int, cwd):
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={free_port()}", "-m", "motif_video.cli", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.launcher = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
        self.stderr = b""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.launcher.poll() is None:  # a test that failed half-way leaves no process behind
            kill_job(self.launcher.pid)
        self.launcher.wait()

    def _read(self):
        while chunk := self.launcher.stderr.read1(4096):
            self.stderr += chunk

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.launcher.poll() is None, f"the job ended before {what}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def text(self) -> str:
        return self.stderr.decode(errors="replace")

    def worker(self, rank: int) -> psutil.Process:
        workers = [p for p in psutil.Process(self.launcher.pid).children() if p.environ().get("RANK") == str(rank)]
        assert len(workers) == 1, workers
        return workers[0]

    def kill_worker_and_wait(self, rank: int) -> float:
        """SIGKILL rank `rank`'s worker; the seconds until the job's last process was gone (all must be)."""
        everyone = job_processes(self.launcher.pid)
        assert len(everyone) >= 3  # the agent and its two workers at least
        self.worker(rank).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while any(map(running, everyone)) and time.monotonic() - killed < GONE_WITHIN:
            time.sleep(0.05)
        elapsed = time.monotonic() - killed
        alive = [p for p in everyone if running(p)]
        for process in alive:  # a hang: clean up, then fail below
            process.kill()
        code = self.launcher.wait()
        assert not alive, f"still running {elapsed:.0f} s after the kill: {alive}\n{self.text()[-3000:]}"
        assert code != 0
        return elapsed


def running(process: psutil.Process) -> bool:
    """Alive, not a zombie left for its parent to reap."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_generation_ends_on_every_rank(tmp_path):
    steps = 400  # far more than run before the kill
    with Job(["generate", "a red ball", "-o", str(tmp_path / "out.gif"), "--steps", str(steps), "--frames", "5",
              "--height", "48", "--width", "80", "--ulysses", "2"], 2, tmp_path) as job:
        # tqdm's counter on rank 0: two denoising steps done, so both ranks are inside the sampling loop
        job.wait_for(lambda: re.search(rf"\b([2-9]|[1-9]\d+)/{steps}\b", job.text()), 600, "the second step")
        elapsed = job.kill_worker_and_wait(rank=1)
    assert not (tmp_path / "out.gif").exists()
    print(f"generation: every process gone {elapsed:.1f} s after the kill")


def test_training_ends_on_every_rank(tmp_path):
    cache = make_cache(tmp_path / "cache", n_images=4, n_videos=4)
    config = base_config(tmp_path, cache, data={"cache_dirs": [str(cache)], "batch_size": 2, "num_workers": 1},
                         optim={"lr": 1e-3, "steps": 10_000, "warmup_steps": 1},
                         checkpointing={"every": 2, "keep_last": 2})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    with Job(["train", str(path), "--override", f"output_dir={out}", "parallel.ulysses=2"], 2, tmp_path) as job:
        # after the first checkpoint: both ranks are past setup, with DataLoader workers running
        job.wait_for(lambda: (out / "checkpoints" / "step-00000002").is_dir(), 600, "the first checkpoint")
        elapsed = job.kill_worker_and_wait(rank=0)
    print(f"training: every process gone {elapsed:.1f} s after the kill")
