"""Atomic outputs: every file and folder the package writes for a user appears complete under its final name, or not
at all, and nothing the user had is lost on the way.

- A file is written to a hidden temporary name beside its destination (`.NAME.<pid>.<random>.partial`: unique per
  process and call, so two writers never share one), flushed to disk, given the mode a plain `open()` would give it
  under the current umask, and renamed over the destination. On any failure or interruption the temporary goes.
- A folder is built the same way under a temporary name and swapped in with one atomic exchange of the two names
  (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames), then the old folder is deleted. Readers see either
  the complete old folder or the complete new one. Entries of the old folder that the writer does not produce
  (a user's README beside replaced weights) can be carried into the new one.
- SIGTERM (what `timeout`, `kill` and job schedulers send) is turned into `Terminated`, a KeyboardInterrupt, by
  `terminate_as_interrupt()`, so the same cleanup as for Ctrl-C runs. A SIGKILL cannot be caught: its hidden
  temporary stays until the next write to the same destination, which removes temporaries of dead processes.
- Operating-system write errors (a full disk, a read-only folder) become one-line `MotifVideoError`s naming the
  destination.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

from .errors import MotifVideoError

__all__ = ["atomic_file", "atomic_dir", "atomic_write_bytes", "atomic_write_text", "temp_name", "file_mode",
           "dir_mode", "fsync_dir", "fsync_tree", "check_writable_dir", "remove_stale_temps", "Terminated",
           "terminate_as_interrupt", "write_error"]

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.(partial|old)$")
_umask_lock = threading.Lock()


# ----------------------------------------------------------------------------------------------------------------
# Names and modes
# ----------------------------------------------------------------------------------------------------------------


def temp_name(path: str | os.PathLike, kind: str = "partial") -> Path:
    """A hidden name beside `path`, unique to this process and call: `.NAME.<pid>.<8 hex>.<kind>`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}")


def _umask() -> int:
    # os.umask can only be read by setting it; the lock keeps two threads from seeing the temporary 0.
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, 'w')` gives a new file under the current umask (0644 under the usual 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode `mkdir` gives a new folder under the current umask (0755 under the usual 022)."""
    return 0o777 & ~_umask()


def write_error(path: str | os.PathLike, error: OSError) -> MotifVideoError:
    """A one-line error for an operating-system failure while writing `path` (full disk, read-only folder...)."""
    reason = error.strerror or (str(error).splitlines() or [type(error).__name__])[0]
    if error.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return MotifVideoError(f"cannot write {path}: {reason}")


def check_writable_dir(folder: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, before any expensive work, if files cannot be created in `folder` (missing, not a folder, read-only,
    no permission). Probes by creating and removing a temporary file, which also holds for root and read-only
    mounts, where permission bits say nothing."""
    folder = Path(folder)
    if not folder.exists():
        raise MotifVideoError(f"cannot write the {what}: folder {folder} does not exist")
    if not folder.is_dir():
        raise MotifVideoError(f"cannot write the {what}: {folder} is not a folder")
    probe = temp_name(folder / "write-test")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MotifVideoError(f"cannot write the {what} into {folder}: {e.strerror or e}") from None
    return folder


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Remove temporaries of `path` left by processes that no longer exist (a SIGKILL mid-write)."""
    path = Path(path)
    for entry in _stale_temps(path.parent).pop(path.name, []):
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


# folder -> {output name: its dead writers' temporaries}. A folder is scanned once per process: writers that die
# later are rare, and rescanning before each of thousands of files (a dataset) would cost quadratic time.
_stale_by_folder: dict[str, dict[str, list[os.DirEntry]]] = {}


def _stale_temps(folder: Path) -> dict[str, list[os.DirEntry]]:
    key = os.path.abspath(folder)
    if key not in _stale_by_folder:
        found: dict[str, list[os.DirEntry]] = {}
        try:
            entries = list(os.scandir(folder))
        except OSError:
            entries = []
        for entry in entries:
            m = _TEMP.match(entry.name)
            if m and not _alive(int(m["pid"])):
                found.setdefault(m["name"], []).append(entry)
        _stale_by_folder[key] = found
    return _stale_by_folder[key]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------------------------
# Durability
# ----------------------------------------------------------------------------------------------------------------


def try_exclusive_lock(path: str | os.PathLike):
    """An exclusive advisory lock on `path` (created), held while the returned open file is (the OS drops it when
    the process ends, killed or not), or None when another process holds it. The holder's pid goes into the file,
    which `lock_holder` reads for the message of whoever finds the lock taken. A file system that cannot lock at all
    (some network mounts) is a one-line error, not a lock reported as held."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError as e:
        handle.close()
        raise MotifVideoError(f"cannot lock {path}: {e.strerror or e} (does this file system support locks?)") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def lock_holder(path: str | os.PathLike) -> str:
    """Who holds the lock at `path`, as `try_exclusive_lock` wrote it ("pid N"), or "another process"."""
    try:
        return Path(path).read_text(errors="replace").strip()[:64] or "another process"
    except OSError:
        return "another process"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse fsync on a folder, which costs only durability.
    with contextlib.suppress(OSError):
        _fsync_path(folder)


def fsync_tree(root: Path) -> None:
    """Every file below `root` and every folder (so renames into them) flushed to disk."""
    for folder, _, names in os.walk(root):
        for name in names:
            if not os.path.islink(Path(folder) / name):  # a link's target is not ours (and may not exist)
                _fsync_path(Path(folder) / name)
        fsync_dir(Path(folder))


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def atomic_file(path: str | os.PathLike, *, mode: int | None = None) -> contextlib.AbstractContextManager[Path]:
    """Yield a unique temporary path beside `path`; write it inside the block. On a normal exit the file is fsynced,
    chmod-ed (`mode`, default: per umask) and renamed over `path`; on any exception, KeyboardInterrupt or
    `Terminated` it is removed and the old `path`, if any, stays untouched. OSErrors become one-line
    MotifVideoErrors."""
    path = Path(path)
    if path.is_dir():
        raise MotifVideoError(f"cannot write {path}: a folder with that name exists")

    def reserve(tmp: Path) -> None:
        # Created empty here so the name is reserved; writers may reopen and truncate it.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    def publish(tmp: Path) -> None:
        _fsync_path(tmp)
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, path)

    return _staged(path, reserve, publish)


@contextlib.contextmanager
def _staged(path: Path, create: Callable[[Path], None], publish: Callable[[Path], None]) -> Iterator[Path]:
    """The shared life of a temporary beside `path`: `create` it, yield it to be filled, `publish` it under `path`;
    on any failure or interruption the temporary goes and `path` is untouched."""
    remove_stale_temps(path)
    tmp = temp_name(path)
    try:
        create(tmp)
        yield tmp
        publish(tmp)
    except OSError as e:
        _remove(tmp)
        raise write_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# ----------------------------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names `a` and `b` (both must exist). False where the platform cannot."""
    global _libc
    if not hasattr(os, "sched_getaffinity"):  # not Linux
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2  # noqa: B018 (glibc >= 2.28)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # filesystem without exchange
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _swap_in(tmp: Path, path: Path) -> None:
    """Put folder `tmp` at `path`, replacing whatever folder is there; the old one is deleted afterwards."""
    for _ in range(100):  # another writer may create or replace `path` between our steps: retry
        if not path.exists():
            try:
                os.rename(tmp, path)  # also succeeds onto an empty folder
                return
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOENT):
                    raise
                continue
        if _exchange(tmp, path):
            _remove(tmp)  # now holds the old folder
            return
        # Two renames: for an instant `path` is missing, but the old folder is never lost before the new is in.
        old = temp_name(path, "old")
        try:
            os.rename(path, old)
        except FileNotFoundError:
            continue
        os.rename(tmp, path)
        _remove(old)
        return
    raise OSError(errno.EBUSY, "the destination kept changing under concurrent writers", os.fspath(path))


def atomic_dir(path: str | os.PathLike, *,
               carry: Callable[[str], bool] | None = None) -> contextlib.AbstractContextManager[Path]:
    """Yield a new empty temporary folder beside `path`; fill it inside the block. On a normal exit the folder gets
    the umask's mode, every file in it is fsynced, and it replaces `path` (a new name, or an existing folder swapped
    out in one step and then deleted). On any failure or interruption the temporary is removed and `path` is
    untouched. `carry(name)`: which entries of an existing `path` the new folder keeps (copied in, modes and all,
    unless the block wrote that name), such as a user's README beside the weights a writer replaces. Deciding
    whether an existing `path` may be replaced is the caller's job."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MotifVideoError(f"cannot write folder {path}: a file with that name exists")

    def create(tmp: Path) -> None:
        os.mkdir(tmp, 0o700)

    def publish(tmp: Path) -> None:
        _chmod_tree(tmp)
        if carry is not None and path.is_dir():
            _copy_entries(path, tmp, carry)
        fsync_tree(tmp)
        _swap_in(tmp, path)

    return _staged(path, create, publish)


def _copy_entries(source: Path, target: Path, carry: Callable[[str], bool]) -> None:
    for entry in os.scandir(source):
        if not carry(entry.name) or os.path.lexists(target / entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target / entry.name, symlinks=True)
        else:
            shutil.copy2(entry.path, target / entry.name, follow_symlinks=False)


def _chmod_tree(root: Path) -> None:
    # Writers such as mkstemp/mkdtemp use 0600/0700; outputs get what the umask gives any new file.
    fmode, dmode = file_mode(), dir_mode()
    for folder, dirs, names in os.walk(root):
        for name in names:
            if not os.path.islink(Path(folder) / name):  # chmod would change the link's target
                os.chmod(Path(folder) / name, fmode)
        for name in dirs:
            if not os.path.islink(Path(folder) / name):
                os.chmod(Path(folder) / name, dmode)
    os.chmod(root, dmode)


# ----------------------------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM received: unwinds like Ctrl-C, so every `atomic_file`/`atomic_dir` removes its temporary."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM raises `Terminated` instead of killing the process outright."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

