"""Which files a process reads: Linux inotify over a directory tree (standard library only).

Why inotify rather than Python's audit hooks: pyarrow, torch and SQLite open files from C++/C,
which audit hooks never see. inotify sees every open by any process; a file closed without
having been written (IN_CLOSE_NOWRITE) was read.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

IN_CLOSE_NOWRITE = 0x10
IN_ISDIR = 0x40000000  # a folder was listed: not a file read
_EVENT = struct.Struct("iIII")


class ReadFiles:
    """Paths (relative to the watched root) of files closed without being written."""

    def __init__(self) -> None:
        self.paths: set[str] = set()


@contextlib.contextmanager
def files_read(root: Path, skip: Iterable[str] = ()) -> Iterator[ReadFiles]:
    """Watch every folder under ``root`` (not those named in ``skip``) while the block runs."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1 failed")
    skipped = set(skip)
    folders: dict[int, Path] = {}
    for folder, dirs, _ in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skipped]
        wd = libc.inotify_add_watch(fd, os.fsencode(folder), IN_CLOSE_NOWRITE)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch failed on {folder}")
        folders[wd] = Path(folder)
    result = ReadFiles()
    try:
        yield result
        while select.select([fd], [], [], 0.5)[0]:
            buffer = os.read(fd, 1 << 16)
            offset = 0
            while offset < len(buffer):
                wd, mask, _, size = _EVENT.unpack_from(buffer, offset)
                name = buffer[offset + _EVENT.size : offset + _EVENT.size + size].rstrip(b"\0")
                offset += _EVENT.size + size
                if mask & IN_CLOSE_NOWRITE and not mask & IN_ISDIR and name and wd in folders:
                    path = folders[wd] / os.fsdecode(name)
                    result.paths.add(path.relative_to(root).as_posix())
    finally:
        os.close(fd)
