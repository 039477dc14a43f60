"""The persistent job queue: one table of jobs and their settings in an SQL database (SQLite under --data-dir).

The store keeps the queue's rules in one place: the size limit counts queued and running jobs; a job is claimed
oldest first, together with queued jobs of the same batch key; jobs that were running when the process died go back
to the queue on the next start (unless they have already been started `MAX_RUNS` times: a job that kills the
process every time, like an out-of-memory on CPU, must not kill it forever). The SQL is plain (no SQLite-only
statements besides the connection setup), so another DB-API database can stand behind the same class later.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

QUEUED, IN_PROGRESS, COMPLETED, FAILED = "queued", "in_progress", "completed", "failed"
STATUSES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED)
ACTIVE = (QUEUED, IN_PROGRESS)
MAX_RUNS = 3  # starts after which a job that never finished is failed instead of re-queued

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    progress INTEGER NOT NULL DEFAULT 0,
    params TEXT NOT NULL,
    batch_key TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    error_code TEXT,
    error_message TEXT,
    generation_seconds REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""
_COLUMNS = ("seq", "id", "status", "created_at", "started_at", "completed_at", "progress", "params", "batch_key",
            "runs", "error_code", "error_message", "generation_seconds")


class QueueFull(Exception):
    def __init__(self, limit: int):
        super().__init__(f"the queue is full ({limit} jobs queued or running); try again later")
        self.limit = limit


@dataclass
class Job:
    seq: int
    id: str
    status: str
    created_at: float
    started_at: float | None
    completed_at: float | None
    progress: int
    params: dict = field(default_factory=dict)
    batch_key: str | None = None
    runs: int = 0
    error_code: str | None = None
    error_message: str | None = None
    generation_seconds: float | None = None

    @classmethod
    def from_row(cls, row) -> "Job":
        values = dict(zip(_COLUMNS, row))
        values["params"] = json.loads(values["params"])
        return cls(**values)


class JobStore:
    """Thread-safe access to the jobs table (the HTTP handlers and the worker thread share one connection)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        # WAL: readers (status polls) never wait for the worker's progress writes; NORMAL sync is still durable
        # across a process kill (only a power cut can lose the last commits).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _query(self, sql: str, args=()) -> list[Job]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs {sql}", args).fetchall()
        return [Job.from_row(r) for r in rows]

    def _transaction(self):
        store = self

        class _Tx:
            def __enter__(self):
                store._lock.acquire()
                store._db.execute("BEGIN IMMEDIATE")
                return store._db

            def __exit__(self, kind, value, tb):
                try:
                    store._db.execute("COMMIT" if kind is None else "ROLLBACK")
                finally:
                    store._lock.release()

        return _Tx()

    # -- submission and reads --------------------------------------------------------------------------------------
    def submit(self, job_id: str, params: dict, batch_key: str | None, max_active: int | None) -> Job:
        """Insert a queued job; QueueFull if `max_active` jobs are already queued or running."""
        with self._transaction() as db:
            if max_active is not None:
                active = db.execute(f"SELECT COUNT(*) FROM jobs WHERE status IN {ACTIVE!r}").fetchone()[0]
                if active >= max_active:
                    raise QueueFull(max_active)
            db.execute("INSERT INTO jobs (id, status, created_at, params, batch_key) VALUES (?, ?, ?, ?, ?)",
                       (job_id, QUEUED, time.time(), json.dumps(params), batch_key))
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        jobs = self._query("WHERE id = ?", (job_id,))
        return jobs[0] if jobs else None

    def list(self, limit: int = 20, after: str | None = None) -> tuple[list[Job], bool]:
        """Newest first; `after` is the id of the last job of the previous page. Returns (jobs, has_more)."""
        if after is not None:
            anchor = self.get(after)
            if anchor is None:
                return [], False
            jobs = self._query("WHERE seq < ? ORDER BY seq DESC LIMIT ?", (anchor.seq, limit + 1))
        else:
            jobs = self._query("ORDER BY seq DESC LIMIT ?", (limit + 1,))
        return jobs[:limit], len(jobs) > limit

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {**dict.fromkeys(STATUSES, 0), **dict(rows)}

    def queue_position(self, job: Job) -> int:
        """Queued jobs ahead of this one."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ? AND seq < ?",
                                    (QUEUED, job.seq)).fetchone()[0]

    # -- the worker's side -----------------------------------------------------------------------------------------
    def claim(self, batch_limit=lambda params: 1) -> list[Job]:
        """Mark the oldest queued job running, with up to `batch_limit(its params)` - 1 more queued jobs of its
        batch key (jobs with no key never batch); returns them oldest first, or [] when the queue is empty."""
        with self._transaction() as db:
            first = db.execute("SELECT id, batch_key, params FROM jobs WHERE status = ? ORDER BY seq LIMIT 1",
                               (QUEUED,)).fetchone()
            if first is None:
                return []
            ids = [first[0]]
            max_batch = batch_limit(json.loads(first[2]))
            if first[1] is not None and max_batch > 1:
                rows = db.execute("SELECT id FROM jobs WHERE status = ? AND batch_key = ? AND id != ? ORDER BY seq "
                                  "LIMIT ?", (QUEUED, first[1], first[0], max_batch - 1)).fetchall()
                ids += [r[0] for r in rows]
            now = time.time()
            db.executemany("UPDATE jobs SET status = ?, started_at = ?, progress = 0, runs = runs + 1 WHERE id = ?",
                           [(IN_PROGRESS, now, i) for i in ids])
        jobs = {j.id: j for j in self._query(f"WHERE id IN ({', '.join('?' * len(ids))})", ids)}
        return [jobs[i] for i in ids if i in jobs]

    def set_progress(self, job_id: str, progress: int) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = ?",
                             (progress, job_id, IN_PROGRESS))

    def finish(self, job_id: str, status: str, *, code: str | None = None, message: str | None = None,
               generation_seconds: float | None = None) -> bool:
        """Mark a running job completed or failed; False if it is gone (deleted meanwhile)."""
        with self._lock:
            cursor = self._db.execute(
                "UPDATE jobs SET status = ?, completed_at = ?, progress = ?, error_code = ?, error_message = ?, "
                "generation_seconds = ? WHERE id = ?",
                (status, time.time(), 100 if status == COMPLETED else 0, code, message, generation_seconds, job_id))
            return cursor.rowcount == 1

    def requeue(self, job_ids: list[str]) -> None:
        """Put running jobs back in the queue at their original place (the queue is ordered by submission)."""
        with self._lock:
            self._db.executemany("UPDATE jobs SET status = ?, progress = 0, started_at = NULL WHERE id = ? AND "
                                 "status = ?", [(QUEUED, i, IN_PROGRESS) for i in job_ids])

    def recover(self) -> tuple[int, int]:
        """At start-up: jobs left running by a dead process are queued again, or failed after MAX_RUNS starts.
        Returns (requeued, failed)."""
        with self._transaction() as db:
            failed = db.execute(
                "UPDATE jobs SET status = ?, completed_at = ?, error_code = ?, error_message = ? WHERE status = ? AND "
                "runs >= ?", (FAILED, time.time(), "server_crash",
                              f"the server stopped during this job {MAX_RUNS} times; not retried", IN_PROGRESS,
                              MAX_RUNS)).rowcount
            requeued = db.execute("UPDATE jobs SET status = ?, progress = 0, started_at = NULL WHERE status = ?",
                                  (QUEUED, IN_PROGRESS)).rowcount
        return requeued, failed

    def delete(self, job_id: str) -> Job | None:
        """Remove a job (any status); returns it as it was, or None if unknown."""
        with self._transaction() as db:
            job = self.get(job_id)
            if job is not None:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return job

    def expired(self, keep: int | None, max_age_s: float | None) -> list[str]:
        """Finished jobs past the retention limits (beyond the newest `keep`, or finished over `max_age_s` ago)."""
        done = (COMPLETED, FAILED)
        ids: set[str] = set()
        with self._lock:
            if keep is not None:
                rows = self._db.execute(f"SELECT id FROM jobs WHERE status IN {done!r} ORDER BY seq DESC").fetchall()
                ids.update(r[0] for r in rows[keep:])
            if max_age_s is not None:
                rows = self._db.execute(f"SELECT id FROM jobs WHERE status IN {done!r} AND completed_at < ?",
                                        (time.time() - max_age_s,)).fetchall()
                ids.update(r[0] for r in rows)
        return sorted(ids)
