"""Prometheus metrics of one server (its own registry, so several apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from .queue.store import ACTIVE, STATUSES, JobStore


class _QueueCollector:
    """Queue length and jobs by status, read from the store at scrape time (so they survive restarts)."""

    def __init__(self, store: JobStore):
        self.store = store

    def collect(self):
        counts = self.store.counts()
        length = GaugeMetricFamily("motif_video_queue_length", "Jobs queued or running")
        length.add_metric([], sum(counts[s] for s in ACTIVE))
        by_status = GaugeMetricFamily("motif_video_jobs", "Jobs in the store by status", labels=["status"])
        for status in STATUSES:
            by_status.add_metric([status], counts[status])
        yield length
        yield by_status


class ServerMetrics:
    def __init__(self, store: JobStore):
        self.registry = CollectorRegistry()
        self.registry.register(_QueueCollector(store))
        self.submitted = Counter("motif_video_jobs_submitted", "Jobs accepted", registry=self.registry)
        self.rejected = Counter("motif_video_jobs_rejected", "Submissions refused", ["reason"],
                                registry=self.registry)
        self.finished = Counter("motif_video_jobs_finished", "Jobs that ended", ["status"], registry=self.registry)
        self.generation_seconds = Histogram(
            "motif_video_generation_seconds", "Wall time of one pipeline call (a batch counts once)",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600), registry=self.registry)
        self.batch_size = Histogram("motif_video_batch_size", "Jobs per pipeline call",
                                    buckets=(1, 2, 3, 4, 6, 8, 16), registry=self.registry)
