"""No job is lost: the real `motif-video serve` process is killed with SIGKILL while jobs are queued and running,
started again on the same data dir, and every job finishes; SIGTERM re-queues the running job and exits cleanly."""

from __future__ import annotations

import httpx
import torch

from motif_video.pipeline.pipeline import generate_to_file
from motif_video.serve.queue.store import JobStore

from .conftest import ServerProcess, assert_same_video, poll_until_done, wait_for

JOB = {"size": "32x32", "num_frames": 9, "guidance_scale": 4.0}


def test_kill_9_with_queued_jobs_then_restart_finishes_them(tiny_model, tiny_pipe, tmp_path):
    data = tmp_path / "data"
    first = ServerProcess(tiny_model, data, "--max-steps", "1000", "--shutdown-grace", "0")
    try:
        with httpx.Client(base_url=first.url, timeout=30) as c:
            done = c.post("/v1/videos", json={**JOB, "prompt": "a red circle", "seed": 1,
                                              "num_inference_steps": 2}).json()
            assert poll_until_done(c, done["id"])["status"] == "completed"
            finished_bytes = c.get(f"/v1/videos/{done['id']}/content").content
            pending = [c.post("/v1/videos", json={**JOB, "prompt": f"a blue square {i}", "seed": 10 + i,
                                                  "num_inference_steps": 30}).json()["id"] for i in range(3)]
            wait_for(lambda: c.get(f"/v1/videos/{pending[0]}").json()["progress"] > 0, 120, what="the first job")
            statuses = [c.get(f"/v1/videos/{i}").json()["status"] for i in pending]
        first.process.kill()  # SIGKILL: no shutdown code runs
        first.process.wait(30)
    finally:
        first.kill()
    assert statuses == ["in_progress", "queued", "queued"]

    second = ServerProcess(tiny_model, data, "--max-steps", "1000", "--shutdown-grace", "0")
    try:
        with httpx.Client(base_url=second.url, timeout=30) as c:
            for job_id in pending:
                assert poll_until_done(c, job_id, 300)["status"] == "completed"
            listed = [v["id"] for v in c.get("/v1/videos").json()["data"]]
            assert listed == [*pending[::-1], done["id"]]
            assert c.get(f"/v1/videos/{done['id']}/content").content == finished_bytes
            rerun = c.get(f"/v1/videos/{pending[0]}/content").content

            # SIGTERM with a running job: the process exits cleanly and the job is queued again
            running = c.post("/v1/videos", json={**JOB, "prompt": "a long one", "num_inference_steps": 1000}).json()
            wait_for(lambda: c.get(f"/v1/videos/{running['id']}").json()["progress"] > 0, 60, what="progress")
        assert second.terminate(60) == 0
    finally:
        second.kill()
    store = JobStore(data / "jobs.sqlite")
    try:
        job = store.get(running["id"])
        assert job.status == "queued" and job.progress == 0
    finally:
        store.close()

    # The job that was running at the kill came out as if it had run undisturbed.
    served = tmp_path / "rerun.mp4"
    served.write_bytes(rerun)
    reference = tmp_path / "reference.mp4"
    generate_to_file(tiny_pipe, reference, prompt="a blue square 0", height=32, width=32, num_frames=9,
                     num_inference_steps=30, guidance_scale=4.0, generator=torch.Generator().manual_seed(10),
                     progress=False)
    assert_same_video(served, reference)
