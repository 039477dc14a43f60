"""motif_video.files: the one atomic-write utility every output goes through."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from motif_video import files
from motif_video.errors import MotifVideoError

from .conftest import hidden_entries


@pytest.fixture
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002, 0o027])
def test_file_mode_follows_umask(tmp_path, umask, mask):
    umask(mask)
    path = files.atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_dir_mode_follows_umask(tmp_path, umask, mask):
    umask(mask)
    with files.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("1")
        (tmp / "sub").mkdir()
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "d" / "sub").stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((tmp_path / "d" / "f").stat().st_mode) == 0o666 & ~mask


def test_temp_names_are_unique_hidden_and_beside(tmp_path):
    names = {files.temp_name(tmp_path / "out.gguf") for _ in range(200)}
    assert len(names) == 200
    for name in names:
        assert name.parent == tmp_path and name.name.startswith(".out.gguf.") and str(os.getpid()) in name.name


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt(), files.Terminated(),
                                     MotifVideoError("bad")])
def test_failed_file_write_keeps_the_old_file_and_leaves_nothing(tmp_path, failure):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(type(failure)):
        with files.atomic_file(path) as tmp:
            tmp.write_bytes(b"new, half written")
            raise failure
    assert path.read_bytes() == b"old"
    assert hidden_entries(tmp_path) == []


@pytest.mark.parametrize("failure", [RuntimeError("boom"), KeyboardInterrupt(), files.Terminated()])
def test_failed_folder_write_keeps_the_old_folder(tmp_path, failure):
    path = tmp_path / "frames"
    path.mkdir()
    (path / "a").write_text("old")
    with pytest.raises(type(failure)):
        with files.atomic_dir(path) as tmp:
            (tmp / "a").write_text("new")
            raise failure
    assert (path / "a").read_text() == "old" and sorted(p.name for p in path.iterdir()) == ["a"]
    assert hidden_entries(tmp_path) == []


def test_folder_swap_replaces_the_whole_folder(tmp_path):
    path = tmp_path / "frames"
    path.mkdir()
    (path / "stale").write_text("old")
    with files.atomic_dir(path) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in path.iterdir()) == ["new"]
    assert hidden_entries(tmp_path) == []


def test_folder_swap_carries_the_entries_asked_for(tmp_path):
    """`carry` keeps chosen entries of the replaced folder (files with their modes, folders, links as links); what
    the block writes wins over a carried entry of the same name."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "weights").write_text("old weights")
    (path / "config").write_text("old config")
    (path / "README.md").write_text("mine")
    os.chmod(path / "README.md", 0o600)
    (path / "notes").mkdir()
    (path / "notes" / "a.txt").write_text("a")
    (path / "elsewhere").symlink_to(tmp_path / "missing")  # dangling: carried as it is, not followed
    with files.atomic_dir(path, carry=lambda name: name != "weights") as tmp:
        (tmp / "config").write_text("new config")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config", "elsewhere", "notes"]
    assert (path / "config").read_text() == "new config" and (path / "README.md").read_text() == "mine"
    assert stat.S_IMODE((path / "README.md").stat().st_mode) == 0o600
    assert (path / "notes" / "a.txt").read_text() == "a"
    assert os.readlink(path / "elsewhere") == str(tmp_path / "missing")
    assert hidden_entries(tmp_path) == []


def test_folder_swap_without_exchange_falls_back_to_two_renames(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    path = tmp_path / "frames"
    path.mkdir()
    (path / "stale").write_text("old")
    with files.atomic_dir(path) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in path.iterdir()) == ["new"] and hidden_entries(tmp_path) == []


def test_file_over_a_folder_and_folder_over_a_file_are_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("keep")
    with pytest.raises(MotifVideoError, match="folder"):
        files.atomic_write_text(tmp_path / "d", "x")
    with pytest.raises(MotifVideoError, match="file"):
        with files.atomic_dir(tmp_path / "f"):
            pass
    assert (tmp_path / "f").read_text() == "keep" and (tmp_path / "d").is_dir()


def test_os_errors_become_one_line_errors_naming_the_file(tmp_path):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(MotifVideoError, match="no space left") as info:
        with files.atomic_file(tmp_path / "x.gif") as tmp:
            tmp.write_bytes(b"part")
            full()
    assert "x.gif" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_real_full_disk(mount_tmpfs):
    fs = mount_tmpfs("64k")
    (fs / "keep.bin").write_bytes(b"k" * 1000)
    with pytest.raises(MotifVideoError, match="no space left"):
        files.atomic_write_bytes(fs / "big.bin", b"x" * 200_000)
    assert sorted(p.name for p in fs.iterdir()) == ["keep.bin"]


def test_writable_dir_probe(tmp_path, mount_tmpfs):
    assert files.check_writable_dir(tmp_path) == tmp_path
    (tmp_path / "file").write_text("x")
    with pytest.raises(MotifVideoError, match="not a folder"):
        files.check_writable_dir(tmp_path / "file")
    with pytest.raises(MotifVideoError, match="does not exist"):
        files.check_writable_dir(tmp_path / "missing")
    with pytest.raises(MotifVideoError, match="Read-only"):
        files.check_writable_dir(mount_tmpfs(readonly=True))


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.bin.{dead.pid}.0123abcd.partial"
    stale.write_bytes(b"left by SIGKILL")
    stale_dir = tmp_path / f".out.bin.{dead.pid}.89abcdef.partial"
    stale_dir.mkdir()
    live = tmp_path / f".out.bin.{os.getpid()}.0123abcd.partial"  # a writer still running: kept
    live.write_bytes(b"in progress")
    other = tmp_path / f".other.bin.{dead.pid}.0123abcd.partial"  # another output's: not ours to judge now
    other.write_bytes(b"x")
    files.atomic_write_bytes(tmp_path / "out.bin", b"new")
    assert not stale.exists() and not stale_dir.exists() and live.exists() and other.exists()


def test_sigterm_becomes_terminated_inside_the_guard():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(files.Terminated):
        with files.terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert signal.getsignal(signal.SIGTERM) is before


def test_existing_destination_in_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(MotifVideoError, match="cannot write"):
        files.atomic_write_text(tmp_path / "missing" / "a.txt", "x")


def test_written_content_is_complete(tmp_path):
    data = os.urandom(1 << 20)
    assert files.atomic_write_bytes(tmp_path / "a.bin", data).read_bytes() == data
    assert Path(tmp_path / "a.bin").stat().st_size == len(data)


def test_exclusive_lock_is_held_until_closed_or_the_process_dies(tmp_path):
    import subprocess
    import sys

    from motif_video.files import lock_holder, try_exclusive_lock

    path = tmp_path / "run" / ".lock"
    first = try_exclusive_lock(path)
    assert first is not None and try_exclusive_lock(path) is None
    assert lock_holder(path) == f"pid {os.getpid()}"
    first.close()
    again = try_exclusive_lock(path)
    assert again is not None
    again.close()
    # a holder killed with SIGKILL leaves no lock behind
    code = (f"import sys, time; from motif_video.files import try_exclusive_lock; "
            f"h = try_exclusive_lock({str(path)!r}); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        assert try_exclusive_lock(path) is None and lock_holder(path) == f"pid {child.pid}"
    finally:
        child.kill()
        child.wait()
    taken = try_exclusive_lock(path)
    assert taken is not None
    taken.close()


def test_a_file_system_that_cannot_lock_is_an_error_not_a_held_lock(tmp_path, monkeypatch):
    import errno
    import fcntl

    from motif_video.errors import MotifVideoError
    from motif_video.files import try_exclusive_lock

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(MotifVideoError, match="cannot lock .*No locks available"):
        try_exclusive_lock(tmp_path / ".lock")
