"""Shared helpers of the bad-input and fault suite: a tiny model saved once, the CLI run in-process, and snapshots
of the user's files to prove nothing was lost or left half-written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from motif_video.cli import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_user_error(rc: int, err: str, *words: str) -> str:
    """Exit 2, exactly one `error:` line, no traceback; returns the line."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2, f"exit {rc}, stderr: {err[-2000:]}"
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every entry under `root` (hidden ones too): content hash and mode bits."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs:
            p = Path(folder) / name
            out[str(p.relative_to(root)) + "/"] = ("dir", p.stat().st_mode & 0o777)
        for name in names:
            p = Path(folder) / name
            out[str(p.relative_to(root))] = (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mode & 0o777)
    return out


def hidden_entries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny random model in the released layout (read-only for tests: copy it before changing anything)."""
    from motif_video.testing import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny")
    return folder


@pytest.fixture
def tiny_copy(tiny, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny, folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount(size, readonly=False) -> a fresh tmpfs folder (root only; skips where mounting is not allowed)."""
    mounted = []

    def mount(size: str = "64k", readonly: bool = False) -> Path:
        target = tmp_path / f"fs{len(mounted)}"
        target.mkdir()
        options = f"size={size}" + (",ro" if readonly else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], capture_output=True)
