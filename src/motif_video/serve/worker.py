"""The worker: one thread that takes jobs from the store and runs them on the loaded pipeline, one call at a time.

Progress, the preview frame, cancellation and the time limit all go through the pipeline's step callback and
interrupt event. A stopped call is sorted out per job: a deleted job is dropped, a job past its time limit fails,
every other job of the call (a batch-mate of a cancelled job, or any job at shutdown) goes back to the queue.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from ..errors import GenerationInterrupted, MotifVideoError
from .files import JobFiles
from .lora import LoraState
from .metrics import ServerMetrics
from .params import ModelInfo, ServeSettings, lora_files
from .queue.store import COMPLETED, FAILED, Job, JobStore

log = logging.getLogger("motif_video.serve")


@dataclass
class _Call:
    """The pipeline call in flight."""

    job_ids: list[str]
    interrupt: threading.Event = field(default_factory=threading.Event)
    deleted: set[str] = field(default_factory=set)
    timed_out: bool = False
    previews: dict[str, bytes] = field(default_factory=dict)
    progress: dict[str, int] = field(default_factory=dict)


def png_bytes(frame: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


class Worker:
    def __init__(self, pipe, store: JobStore, files: JobFiles, model: ModelInfo, settings: ServeSettings,
                 metrics: ServerMetrics):
        self.pipe, self.store, self.files, self.model, self.settings = pipe, store, files, model, settings
        self.metrics = metrics
        self.loras = LoraState(pipe)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._abort = threading.Event()  # set when the shutdown grace is over: stop the running call
        self._lock = threading.Lock()
        self._call: _Call | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._loop, name="motif-video-worker", daemon=True)

    # -- control from the HTTP side --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        """A job was queued."""
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Stop the running call if it holds this (already deleted) job; True if it did."""
        with self._lock:
            call = self._call
            if call is None or job_id not in call.job_ids:
                return False
            call.deleted.add(job_id)
            call.interrupt.set()
            return True

    def preview(self, job_id: str) -> bytes | None:
        with self._lock:
            return self._call.previews.get(job_id) if self._call else None

    def stop(self, grace_s: float) -> None:
        """Take no more jobs; let the running call finish for up to grace_s, then interrupt it (its jobs go back
        to the queue) and wait for the thread."""
        self._stopping.set()
        self._wake.set()
        if not self._idle.wait(grace_s):
            self._abort.set()
            with self._lock:
                if self._call is not None:
                    self._call.interrupt.set()
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the thread ------------------------------------------------------------------------------------------------
    def _batch_limit(self, params: dict) -> int:
        if self.settings.max_batch <= 1:
            return 1
        return self.model.fitting_batch(params, self.settings.max_batch)

    def _loop(self) -> None:
        self.prune()
        while not self._stopping.is_set():
            jobs: list[Job] = []
            self._wake.clear()
            self._idle.clear()
            try:
                jobs = self.store.claim(self._batch_limit)
                if jobs:
                    self._run(jobs)
                    self.prune()
            except Exception:  # the worker must outlive any one job; the job itself was marked failed
                log.error("worker error:\n%s", traceback.format_exc())
            finally:
                self._idle.set()
            if not jobs:
                self._wake.wait(1.0)

    def prune(self) -> None:
        """Delete finished jobs past the retention limits, with their files."""
        for job_id in self.store.expired(self.settings.keep_outputs, self.settings.keep_age_s):
            self.store.delete(job_id)
            self.files.remove(job_id)

    def _run(self, jobs: list[Job]) -> None:
        import torch

        call = _Call([j.id for j in jobs])
        with self._lock:
            self._call = call
        p = jobs[0].params
        started = time.monotonic()

        def on_step(info) -> bool:
            progress = min(99, int(100 * (info.step + 1) / info.num_steps))
            previews = {}
            if info.preview is not None:
                previews = {job.id: png_bytes(info.preview[i]) for i, job in enumerate(jobs)}
            with self._lock:
                call.previews.update(previews)
            for job in jobs:
                self.store.set_progress(job.id, progress)
            if time.monotonic() - started > self.settings.job_timeout_s:
                call.timed_out = True
                return True
            return self._abort.is_set()  # a call that started just as the grace ran out

        try:
            self.loras.apply(p["loras"], lora_files(self.settings.lora_dir))
            image = str(self.files.input_image(jobs[0].id)) if p["has_image"] else None
            frames = self.pipe(
                [j.params["prompt"] for j in jobs], negative_prompt=p["negative_prompt"], image=image,
                height=p["height"], width=p["width"], num_frames=p["num_frames"],
                num_inference_steps=p["num_inference_steps"], guidance_scale=p["guidance_scale"],
                generator=[torch.Generator().manual_seed(j.params["seed"]) for j in jobs], output_type="np",
                progress=False, callback=on_step, preview=self.settings.preview, interrupt=call.interrupt)
        except GenerationInterrupted:
            self._after_interrupt(jobs, call)
            return
        except torch.OutOfMemoryError:
            self._fail(jobs, "out_of_memory", "the device ran out of memory; try a smaller size or fewer frames")
            return
        except MotifVideoError as e:
            self._fail(jobs, "invalid_input", str(e))
            return
        except Exception as e:
            log.error("generation failed:\n%s", traceback.format_exc())
            self._fail(jobs, "generation_error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return
        finally:
            with self._lock:
                self._call = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        seconds = time.monotonic() - started
        self.metrics.generation_seconds.observe(seconds)
        self.metrics.batch_size.observe(len(jobs))
        for job, clip in zip(jobs, frames):
            self._store_result(job, clip, seconds)

    def _store_result(self, job: Job, clip: np.ndarray, seconds: float) -> None:
        from ..pipeline.video_io import write_video

        if not np.isfinite(clip).all():
            self._fail([job], "nan", "the generation produced NaN values (numerical overflow); try another seed or "
                                     "fewer steps")
            return
        try:
            write_video(clip, self.files.video(job.id), fps=self.model.fps)
            write_video(clip[len(clip) // 2][None], self.files.thumbnail(job.id))
        except MotifVideoError as e:
            self._fail([job], "write_error", str(e))
            return
        if self.store.finish(job.id, COMPLETED, generation_seconds=seconds):
            self.metrics.finished.labels(COMPLETED).inc()
        else:  # deleted while it was being written
            self.files.remove(job.id)

    def _fail(self, jobs: list[Job], code: str, message: str) -> None:
        for job in jobs:
            if self.store.finish(job.id, FAILED, code=code, message=message):
                self.metrics.finished.labels(FAILED).inc()

    def _after_interrupt(self, jobs: list[Job], call: _Call) -> None:
        requeue = []
        for job in jobs:
            if job.id in call.deleted:
                self.files.remove(job.id)
                self.metrics.finished.labels("cancelled").inc()
            elif call.timed_out:
                self._fail([job], "timeout", f"the job ran past this server's time limit of "
                                             f"{self.settings.job_timeout_s:g} s")
            else:
                requeue.append(job.id)
        self.store.requeue(requeue)
        if requeue:
            self._wake.set()
