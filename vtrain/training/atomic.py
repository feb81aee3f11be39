"""Writing a file so that its readers only ever see the previous whole file or the new whole file.

The bytes go to a temporary file in the target's own directory (``os.replace`` is atomic only within one
filesystem; a temporary file in ``$TMPDIR`` would make the final move a copy, which a SIGKILL can cut short),
are flushed and fsynced, and then replace the target. A failed write (an exception, a full disk) removes the
temporary file and leaves the target as it was; a full disk (or quota) is a :class:`~vtrain.ConfigError`, which
the command line ends with its one line. A SIGKILL mid-write can leave the temporary file behind: its
name, ``.<target name>.<pid>.<random>.tmp``, never matches ``*.ckpt`` or ``metrics.*``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from vtrain.config import ConfigError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a new file and make it ``path`` only once every byte is on disk."""
    with replacing(path) as tmp:
        # os.open rather than tempfile.mkstemp: the file gets the umask's permissions, as a plain open() would
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write (by any means: a download, a copy); when the block
    ends, the file there is fsynced and renamed to ``path``. When the block raises, it is removed and ``path`` stays
    as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        _fsync_file(tmp)  # unlike the directory's, a failure here is the write's failure
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in DISK_FULL:  # the one line of a full disk, not a traceback
            raise ConfigError(f"{path}: not written ({e.strerror}); the file there is still the previous whole one "
                              "(or none): free some space and run again (ckpt_path=auto resumes a run)") from e
        raise
    _fsync_directory(path.parent)  # the rename itself survives a power loss


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened or fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
