"""Files that survive crashes and concurrent processes: atomic writes under unique temporary names, a lock on the
folder a process writes into, and the removal of temporaries a killed process left behind."""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger("fastwsss")
TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".fastwsss.lock"


def atomic_write(path: str | Path, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """``write(tmp)`` into a uniquely named temporary file beside ``path`` (``.<name>.<random>.tmp``), then rename it
    over ``path``: a reader never sees half a file, a crash leaves only a temporary, and two writers never share
    one. ``fsync``: flush the file to disk before the rename (checkpoints). The file gets the permissions ``open()``
    would give it (0666 less the umask), not ``mkstemp``'s 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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


class DirLock:
    """An exclusive lock on a folder for as long as this process writes into it (``with DirLock(dir, "run"):``).
    A second process gets a clear error at once instead of interleaving its files with the first one's. The lock is
    the kernel's (``flock``): it is released when the process ends, however it ends."""

    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None

    def __enter__(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DirLockedError(f"{self.what} {self.folder} is in use by process {holder}: wait for it to finish, "
                                 "or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
