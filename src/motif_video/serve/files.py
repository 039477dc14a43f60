"""Where a job's files live under --data-dir. Names come from server-made ids only; an id that is not exactly what
`new_job_id` makes never becomes a path, so no request can read or write outside the data dir."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

_ID = re.compile(r"^video_[0-9a-f]{32}$")


def new_job_id() -> str:
    return f"video_{uuid.uuid4().hex}"


def is_job_id(text: str) -> bool:
    return isinstance(text, str) and bool(_ID.match(text))


class JobFiles:
    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir).resolve()
        self.videos = self.root / "videos"
        self.inputs = self.root / "inputs"
        for folder in (self.videos, self.inputs):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def database(self) -> Path:
        return self.root / "jobs.sqlite"

    def _checked(self, job_id: str) -> str:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return job_id

    def video(self, job_id: str) -> Path:
        return self.videos / f"{self._checked(job_id)}.mp4"

    def thumbnail(self, job_id: str) -> Path:
        return self.videos / f"{self._checked(job_id)}.png"

    def input_image(self, job_id: str) -> Path:
        return self.inputs / f"{self._checked(job_id)}.png"

    def remove(self, job_id: str) -> None:
        for path in (self.video(job_id), self.thumbnail(job_id), self.input_image(job_id)):
            path.unlink(missing_ok=True)
