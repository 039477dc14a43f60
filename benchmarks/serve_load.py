"""Load test of `motif-video serve` (localhost only, bounded, stops by itself).

For each --max-batch setting it starts the real server command on a free 127.0.0.1 port with a fresh data dir, then
1. burst: `--burst` clients submit at the same moment against `--max-queue`; it counts accepted and 429 answers;
2. sustained: `--clients` clients each submit, poll and download `--jobs-per-client` jobs in turn; it records the
   throughput (jobs/minute from the first submission to the last download) and each job's latency (submission
   to downloaded mp4).
Every accepted job must complete, and its mp4 must decode to the frames that generating its own prompt and seed
alone gives (`generate_to_file`, what `motif-video generate` runs): none lost, none mixed up. Each job has a
distinct prompt and seed, so a mix-up cannot pass.

    python benchmarks/serve_load.py --out benchmarks/results/serve_load
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")


def job_spec(index: int) -> dict:
    colour = COLOURS[index % len(COLOURS)]
    shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
    direction = DIRECTIONS[(index // (len(COLOURS) * len(SHAPES))) % len(DIRECTIONS)]
    return {"prompt": f"a {colour} {shape} moving {direction}", "seed": 1000 + index}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str | None, data_dir: Path, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "motif_video.cli", "serve", "--port", str(self.port), "--data-dir",
                   str(data_dir), "--log-level", "warning", *args]
        if model:
            command += ["--model", model]
        self.log = open(log, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("server did not start within 300 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def run_job(url: str, spec: dict, settings: dict, deadline: float, outputs: Path) -> dict:
    """Submit one job, poll it, download it. Returns a record (status, latency, file)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        start = time.monotonic()
        response = client.post("/v1/videos", json={**settings, **spec})
        if response.status_code == 429:
            return {**spec, "status": "rejected", "http": 429}
        response.raise_for_status()
        job_id = response.json()["id"]
        while time.monotonic() < deadline:
            video = client.get(f"/v1/videos/{job_id}").json()
            if video["status"] in ("completed", "failed"):
                break
            time.sleep(0.2)
        else:
            return {**spec, "id": job_id, "status": "timeout"}
        if video["status"] != "completed":
            return {**spec, "id": job_id, "status": "failed", "error": video["error"]}
        content = client.get(f"/v1/videos/{job_id}/content")
        content.raise_for_status()
        path = outputs / f"{job_id}.mp4"
        path.write_bytes(content.content)
        return {**spec, "id": job_id, "status": "completed", "latency_s": time.monotonic() - start,
                "generation_s": video["generation_seconds"], "file": str(path), "finished": time.monotonic()}


def in_threads(count: int, target) -> list:
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def work(i):
        barrier.wait()
        results[i] = target(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def load_run(args, max_batch: int, workdir: Path) -> dict:
    data_dir = workdir / f"data-batch{max_batch}"
    outputs = workdir / f"outputs-batch{max_batch}"
    outputs.mkdir(parents=True)
    server_args = ["--max-queue", str(args.max_queue), "--max-batch", str(max_batch)]
    if not args.preview:
        server_args.append("--no-preview")
    server = Server(args.model, data_dir, server_args, workdir / f"server-batch{max_batch}.log")
    settings = {"num_inference_steps": args.steps} if args.steps else {}
    deadline = time.monotonic() + args.time_limit
    try:
        burst = in_threads(args.burst, lambda i: run_job(server.url, job_spec(i), settings, deadline, outputs))
        start = time.monotonic()
        per_client = args.jobs_per_client

        def client(c):
            return [run_job(server.url, job_spec(args.burst + c * per_client + j), settings, deadline, outputs)
                    for j in range(per_client)]

        sustained = [r for rs in in_threads(args.clients, client) for r in rs]
        wall = max(r["finished"] for r in sustained if r["status"] == "completed") - start
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    finally:
        server.stop()
    latencies = sorted(r["latency_s"] for r in sustained if r["status"] == "completed")
    batch_sizes = [line for line in metrics.splitlines() if line.startswith("motif_video_batch_size_sum")
                   or line.startswith("motif_video_batch_size_count")]
    calls = {line.split()[0]: float(line.split()[1]) for line in batch_sizes}
    return {
        "max_batch": max_batch, "max_queue": args.max_queue,
        "burst": {"clients": args.burst, "accepted": sum(r["status"] != "rejected" for r in burst),
                  "rejected_429": sum(r["status"] == "rejected" for r in burst),
                  "completed": sum(r["status"] == "completed" for r in burst)},
        "sustained": {"clients": args.clients, "jobs": len(sustained),
                      "completed": sum(r["status"] == "completed" for r in sustained),
                      "wall_s": wall, "jobs_per_minute": len(latencies) / wall * 60,
                      "latency_p50_s": float(np.percentile(latencies, 50)),
                      "latency_p95_s": float(np.percentile(latencies, 95))},
        "load_average_after": os.getloadavg(),
        "mean_batch_size": calls["motif_video_batch_size_sum"] / max(1.0, calls["motif_video_batch_size_count"]),
        "jobs": burst + sustained,
    }


def verify(runs: list[dict], model: str | None, steps: int | None, workdir: Path, limit: int | None = None) -> None:
    """Each completed job's frames against its prompt and seed generated alone; adds per-run verdicts."""
    import torch

    from motif_video.commands.generate import DEFAULT_MODEL_DIR
    from motif_video.pipeline.pipeline import MotifVideoPipeline, generate_to_file
    from motif_video.pipeline.video_io import read_video

    pipe = MotifVideoPipeline.from_pretrained(model or DEFAULT_MODEL_DIR)
    references: dict[tuple, np.ndarray] = {}
    for run in runs:
        equal, max_diff, lost, checked = 0, 0, 0, 0
        for job in run["jobs"]:
            if job["status"] == "rejected":
                continue
            if job["status"] != "completed":
                lost += 1
                continue
            key = (job["prompt"], job["seed"])
            if key not in references and limit is not None and len(references) >= limit:
                continue  # completed, but not regenerated (bounded verification)
            if key not in references:
                path = workdir / f"reference-{len(references)}.mp4"
                generate_to_file(pipe, path, prompt=job["prompt"], num_inference_steps=steps,
                                 generator=torch.Generator().manual_seed(job["seed"]), progress=False)
                references[key] = read_video(path).astype(np.int16)
            diff = int(np.abs(read_video(job["file"]).astype(np.int16) - references[key]).max())
            equal += diff == 0
            checked += 1
            max_diff = max(max_diff, diff)
        accepted = sum(j["status"] != "rejected" for j in run["jobs"])
        run["verified"] = {"accepted": accepted, "not_completed": lost, "checked": checked,
                           "frames_equal_to_alone": equal,
                           "max_abs_pixel_difference": max_diff}
        for job in run["jobs"]:
            job.pop("file", None)
            job.pop("finished", None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped nano model)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="--max-batch settings to compare")
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--burst", type=int, default=20, help="simultaneous submissions in the burst phase")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the sustained phase")
    parser.add_argument("--jobs-per-client", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per job (default: the model's)")
    parser.add_argument("--preview", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--time-limit", type=float, default=1200, help="seconds per run before it gives up")
    parser.add_argument("--verify-limit", type=int, default=None,
                        help="regenerate at most this many distinct jobs alone for the frame check (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json")
    args = parser.parse_args()
    if args.burst <= args.max_queue:
        parser.error("--burst must exceed --max-queue to show the queue-full behaviour")

    runs = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        for max_batch in args.batches:
            runs.append(load_run(args, max_batch, Path(tmp)))
            s = runs[-1]["sustained"]
            print(f"max-batch {max_batch}: {s['jobs_per_minute']:.1f} jobs/min, p50 {s['latency_p50_s']:.1f} s, "
                  f"p95 {s['latency_p95_s']:.1f} s, burst {runs[-1]['burst']}", flush=True)
        verify(runs, args.model, args.steps, Path(tmp), args.verify_limit)

    print("| max batch | jobs/min | p50 latency | p95 latency | mean batch | burst: accepted / 429 | lost | "
          "frames equal to alone |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        s, b, v = run["sustained"], run["burst"], run["verified"]
        print(f"| {run['max_batch']} | {s['jobs_per_minute']:.1f} | {s['latency_p50_s']:.1f} s | "
              f"{s['latency_p95_s']:.1f} s | {run['mean_batch_size']:.2f} | {b['accepted']} / {b['rejected_429']} | "
              f"{v['not_completed']} | {v['frames_equal_to_alone']} of {v['checked']} checked (max diff "
              f"{v['max_abs_pixel_difference']}) |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        (args.out / "results.json").write_text(json.dumps({"settings": settings, "cpu_threads": os.cpu_count(),
                                                           "runs": runs}, indent=1, default=str))
    ok = all(r["verified"]["not_completed"] == 0 for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
