"""Sequence-parallel training launched as a user would (`torchrun -m motif_video.cli train`), TREAD and REPA on,
against one process with the same global batch:

- Ulysses 2 x data 2 on 4 processes (FSDP2 over the grid's data x sequence mesh) gives one process's losses, and
  so does ring 2 on 2 processes (its point-to-point ring, backward included);
- a Ulysses-2 run whose whole torchrun job is SIGKILLed after a checkpoint and relaunched ends as the
  uninterrupted Ulysses-2 run does;
- a checkpoint written under Ulysses 2 continues on one process, and one written by one process continues under
  Ulysses 2, as the uninterrupted one-process run does.

The runs are shared by the tests of this module and made when first asked for."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from motif_video.train.checkpoint import list_checkpoints, read_weights
from tests.train.engine_helpers import base_config, make_cache, read_log
from tests.train.test_distributed import NativeCrash, free_port, kill_job, run

STEPS, EVERY = 20, 5
ULYSSES = ["parallel.ulysses=2"]
RING = ["parallel.ring=2"]


class Runs:
    """Training runs by name, each made once: (processes, extra overrides) -> its run folder."""

    PLANS = {"one": (1, []), "ulysses": (2, ULYSSES), "ulysses-x-data": (4, ULYSSES), "ring": (2, RING)}

    def __init__(self, folder):
        self.folder = folder
        cache = make_cache(folder / "cache", n_images=4, n_videos=4, teacher="dinov2", teacher_dim=8)
        config = base_config(folder, cache,
                             data={"cache_dirs": [str(cache)], "batch_size": 4},
                             optim={"lr": 2e-3, "steps": STEPS, "warmup_steps": 2},
                             routing={"selection_ratio": 0.5, "start_layer": 1, "end_layer": 3},
                             alignment={"teacher": "dinov2", "block": 1, "weight": 0.5, "projector_dim": 16},
                             checkpointing={"every": EVERY, "keep_last": STEPS // EVERY})
        self.config = folder / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.made = {}

    def __getitem__(self, name: str):
        if name not in self.made:
            processes, overrides = self.PLANS[name]
            out = self.folder / name
            train([str(self.config), "--override", f"output_dir={out}", *overrides], processes, self.folder)
            self.made[name] = out
        return self.made[name]

    def continued(self, source: str, step: int, name: str, processes: int, overrides: list[str]):
        """A new run folder holding `source`'s checkpoint at `step` (its config inside), continued to the end."""
        out = self.folder / name
        checkpoint = self[source] / "checkpoints" / f"step-{step:08d}"
        shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
        train([str(out), "--override", *overrides], processes, self.folder)
        return out


def train(args: list[str], processes: int, cwd):
    """`motif-video train`; once more, resuming, after a native crash inside torch's CPU collectives (see
    tests/train/test_distributed.py): a resumed run continues from the last checkpoint as if never stopped."""
    try:
        return run(args, processes, cwd, timeout=900)
    except NativeCrash:
        return run([*args, "--resume"], processes, cwd, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("context-training"))


def final_weights(folder):
    checkpoint = list_checkpoints(folder / "checkpoints")[-1]
    assert checkpoint.name == f"step-{STEPS:08d}"
    return read_weights(checkpoint, "model", lora=False)


def assert_same_run(got, want, steps, loss_tol: float, weight_tol: float):
    a, b = read_log(got), read_log(want)
    assert sorted(a) == list(steps), sorted(a)
    for step in steps:
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], abs=loss_tol, rel=0), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=max(10 * loss_tol, 1e-5)), step
    wa, wb = final_weights(got), final_weights(want)
    assert set(wa) == set(wb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < weight_tol


def test_ulysses_by_data_parallel_matches_one_process(runs):
    one = read_log(runs["one"])
    assert any(one[s].get("repa_loss", 0) > 0 for s in one)
    assert yaml.safe_load((runs["ulysses-x-data"] / "config.yaml").read_text())["parallel"]["ulysses"] == 2
    # 4 processes: data groups {0, 1} and {2, 3} each train 2 of the 4 samples; every weight sharded over all 4
    assert_same_run(runs["ulysses-x-data"], runs["one"], range(1, STEPS + 1), 1e-4, 1e-4)
    assert_same_run(runs["ulysses"], runs["one"], range(1, STEPS + 1), 1e-4, 1e-4)


def test_ring_matches_one_process(runs):
    assert_same_run(runs["ring"], runs["one"], range(1, STEPS + 1), 1e-4, 1e-4)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def test_killed_job_resumes_like_an_uninterrupted_run(runs, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               "-m", "motif_video.cli", "train", str(runs.config), "--override", f"output_dir={out}", *ULYSSES]
    launcher = subprocess.Popen(command, cwd=tmp_path, env=run_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list_checkpoints(out / "checkpoints") or launcher.poll() is not None, 600,
                 "the first checkpoint")
        kill_job(launcher.pid)  # the whole job at once, agent and workers, as a lost node would go
        launcher.wait(timeout=30)
    finally:
        if launcher.poll() is None:
            kill_job(launcher.pid)
            launcher.wait()
    written = list_checkpoints(out / "checkpoints")
    assert written and written[-1].name != f"step-{STEPS:08d}", "the run ended before it was killed"
    train([str(out)], 2, tmp_path)  # a run folder: resumed from its latest checkpoint, with its own config
    # the log holds each step once: the killed run's lines past its last checkpoint (and a line cut by the kill)
    # were dropped when the run resumed
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    assert_same_run(out, runs["ulysses"], range(1, STEPS + 1), 1e-5, 1e-5)


def test_checkpoint_continues_on_another_grid(runs):
    half = STEPS // 2
    to_one = runs.continued("ulysses", half, "ulysses-then-one", 1, ["parallel.ulysses=1"])
    assert_same_run(to_one, runs["one"], range(half + 1, STEPS + 1), 1e-4, 1e-4)
    to_ulysses = runs.continued("one", half, "one-then-ulysses", 2, ULYSSES)
    assert_same_run(to_ulysses, runs["one"], range(half + 1, STEPS + 1), 1e-4, 1e-4)


def run_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
