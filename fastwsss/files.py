"""Files that survive crashes and concurrent processes: atomic writes under unique temporary names, a lock on the
folder a process writes into, and the removal of temporaries a killed process left behind."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("fastwsss")
TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".fastwsss.lock"


class WriteError(OSError):
    """A file could not be written (a full disk, a quota, a read-only or failing filesystem); the message says which
    file, why in words, and that what was there before is intact. ``reason``: the why alone."""

    def __init__(self, message: str, reason: str, path: Path):
        super().__init__(message)
        self.reason, self.path = reason, path


# what torch.save's C++ writer says when a write fails (it names neither the file nor the cause)
_TORCH_WRITE_FAILED = ("file write failed", "iostream error", "PytorchStreamWriter failed", "inline_container")
_FULL = 16 * 2**20  # free bytes under which an unexplained failed write is put down to a full filesystem


def _write_failure(path: Path, err: BaseException) -> str | None:
    """Why writing beside ``path`` failed, in words (measured while the failed temporary still takes its space);
    None if ``err`` is not a failed write (a bug in the writer, an interrupt: raised as it is)."""
    if isinstance(err, OSError):
        known = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system"}
        reason = known.get(err.errno, err.strerror or str(err))
    elif isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILED):
        reason = None
    else:
        return None
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if reason is None:
        reason = "no space left on device" if free is not None and free < _FULL else (
            f"the write failed ({str(err).strip().splitlines()[0]})")
    return reason + ("" if free is None else f" ({free / 2**20:.1f} MiB free on its filesystem)")


def atomic_write(path: str | Path, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """``write(tmp)`` into a uniquely named temporary file beside ``path`` (``.<name>.<random>.tmp``), then rename it
    over ``path``: a reader never sees half a file, a crash leaves only a temporary, and two writers never share
    one. ``fsync``: flush the file to disk before the rename (checkpoints). The file gets the permissions ``open()``
    would give it (0666 less the umask), not ``mkstemp``'s 0600. A failed write (a full disk, torch's writer's
    ``file write failed``) raises :class:`WriteError` naming the file, the cause and that ``path`` is unchanged."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(path)
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        reason = _write_failure(path, err)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if reason is None:
            raise
        kept = f"{path} as it was before is intact" if path.is_file() else f"nothing was written to {path}"
        raise WriteError(f"cannot write {path}: {reason}; {kept}", reason, path) from err
    return path


def _create_temp(path: Path) -> Path:
    """A new empty file ``.<name>.<random>.tmp`` beside ``path``, created exclusively (as ``mkstemp``) with mode 0666:
    the kernel applies the umask, as it does for ``open()`` (``mkstemp``'s 0600 would make every file private)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def remove_stale_temps(folder: str | Path, recursive: bool = False) -> int:
    """Delete the temporaries of :func:`atomic_write` that a killed process left in ``folder``. Call it only while
    holding the folder's :class:`DirLock` (a live writer's temporaries would go too). Returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(f".*{TEMP_SUFFIX}") if recursive else folder.glob(f".*{TEMP_SUFFIX}")
    count = 0
    for p in found:
        if p.is_file():
            p.unlink(missing_ok=True)
            count += 1
    if count:
        log.info("removed %d temporary file(s) left in %s by an interrupted process", count, folder)
    return count


class DirLockedError(RuntimeError):
    pass


_HELD_FDS: set[int] = set()  # the lock files this process holds open (DirLock)


def _close_held_in_child() -> None:
    """After a fork (DataLoader and process-pool workers): drop the child's copies of the lock fds. A forked child
    shares the lock, and an orphaned one would keep it after its parent died. Closing a copy never unlocks (only
    LOCK_UN or the last close does), so the parent's lock stands."""
    for fd in _HELD_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    try:  # a killed process its parent has not reaped yet is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class DirLock:
    """An exclusive lock on a folder for as long as this process writes into it (``with DirLock(dir, "run"):``).
    A second process gets a clear error at once instead of interleaving its files with the first one's. The lock is
    the kernel's (``flock``) on ``<folder>/.fastwsss.lock``, which records the owner (``<pid> on <host>``); it is
    released when the owner ends, however it ends. Children must not keep it: the fd is close-on-exec, a child
    forked through ``os.fork`` (DataLoader workers, process pools) closes its copy at once, and a lock whose
    recorded owner is dead on this host but that a child forked some other way still holds is stale: the lock file
    is replaced (one process at a time, under a lock on the folder itself)."""

    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None
        self._pid: int | None = None

    def __enter__(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        for _ in range(3):  # again after a stale lock was replaced, or our file was while we waited
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 256).decode(errors="replace").strip()
                stale = self._replace_stale(path, fd, holder)
                os.close(fd)
                if stale:
                    continue
                raise DirLockedError(f"{self.what} {self.folder} is in use by process {holder or 'another process'}: "
                                     "wait for it to finish, or choose another folder") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # a stale lock file replaced between our open and our lock: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} on {socket.gethostname()}".encode())
            self._fd, self._pid = fd, os.getpid()
            _HELD_FDS.add(fd)
            return self
        raise DirLockedError(f"{self.what} {self.folder}: cannot take its lock {path} (other processes keep "
                             "replacing it)")

    def _replace_stale(self, path: Path, fd: int, holder: str) -> bool:
        """True if the lock ``fd`` holds the recorded owner's lock although that owner is dead on this host (only
        children it forked hold it now): the lock file is then unlinked, unless another process did so first."""
        pid, _, host = holder.partition(" on ")
        if not pid.isdigit() or host != socket.gethostname() or _owner_alive(int(pid)):
            return False
        folder_fd = os.open(self.folder, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(folder_fd, fcntl.LOCK_EX)  # one replacer at a time; held for a few system calls
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)
                    log.warning("%s %s: its lock was held by process %s, which is dead, through its orphaned child "
                                "processes: taken over", self.what, self.folder, pid)
            except FileNotFoundError:
                pass
        finally:
            os.close(folder_fd)
        return True

    def __exit__(self, *exc) -> None:
        if self._fd is not None and self._pid == os.getpid():  # a forked child's copy is closed already
            _HELD_FDS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        self._fd = self._pid = None
