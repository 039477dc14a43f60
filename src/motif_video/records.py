"""JSONL record files (dataset metadata, prompt lists, evaluation inputs), read one way everywhere."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import MotifVideoError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-empty line; a line that is not a JSON object is a one-line error."""
    path = Path(path)
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MotifVideoError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise MotifVideoError(f"{path}:{i}: each line must be a JSON object")
        rows.append((i, row))
    return rows
