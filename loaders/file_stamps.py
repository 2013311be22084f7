"""What identifies one version of a file on disk: the key of every cache of parsed files and of the
nodes' IS_CHANGED.

Size and modification time alone miss a file replaced by another of the same size with its time kept
(`cp -p`, `rsync -t`, `shutil.copy2`). The stamp adds what a replacement always changes: the inode and
device (a new file), the status-change time `ctime` (set by the kernel on every write, rename or
`utime`; no user call can set it back), and a hash of the first and last 64 KiB with the size (catches
a rewrite within one ctime tick, a few milliseconds on Linux, and file systems with coarse ctimes).
Reading 128 KiB costs well under a millisecond from the page cache.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

SAMPLE_BYTES = 64 * 1024


def file_stamp(path: str | os.PathLike) -> tuple:
    """(path, device, inode, size, mtime_ns, ctime_ns, content sample hash) of the file at `path`
    (links followed). Raises OSError when the file cannot be read."""
    path = Path(path)
    # O_NONBLOCK: opening a FIFO named like a model file must not wait for a writer (it is refused
    # below); regular files ignore the flag.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as f:
        st = os.fstat(f.fileno())  # the stat of the file opened, not of a name replaced meanwhile
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path.name} is not a regular file")
        sample = hashlib.blake2b(str(st.st_size).encode(), digest_size=16)
        sample.update(f.read(SAMPLE_BYTES))
        if st.st_size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, st.st_size - SAMPLE_BYTES))
            sample.update(f.read(SAMPLE_BYTES))
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, sample.hexdigest())


def source_stamp(path: str | os.PathLike) -> tuple:
    """The stamp of a file, or of every file in a folder (a diffusers model folder), sorted by name."""
    path = Path(path)
    if not path.is_dir():
        return (file_stamp(path),)
    return tuple(file_stamp(p) for p in sorted(path.rglob("*")) if p.is_file())
