"""Guards for memory-mapped files: a file changed on disk raises, instead of SIGBUS.

Reading a page of a mapping past the end of a file that another process truncated kills
the reader with SIGBUS; a file rewritten in place (``cp``, ``rsync --inplace``, a resumed
download) silently changes the mapped data. :class:`FileGuard` keeps the file descriptor
of a mapped file open with the size, inode, device and modification time seen when it
was validated; :func:`check_mapped` is called before every access that reads a mapping
(the lazy pack at the first forward, every NumPy-backend forward, dequantize, qweight,
array reads of :class:`~qlinear._safetensors.SafetensorsFile`) and raises
:class:`~qlinear.errors.FormatError` ("file changed on disk") when an ``fstat`` on the
kept descriptor disagrees. Cost: one ``fstat`` (well under a microsecond) per guarded
access, and nothing at all when no file is mapped.

A file replaced by a rename (``mv new old``, ``os.replace``, what qlinear itself does)
is not a change for the mapping: the old inode stays alive and mapped, and its data is
what was validated, so nothing is raised. The check narrows the window for a truncation
to the time between the ``fstat`` and the read (a truncation inside it can still fault);
``qlinear.load(..., mmap=False)`` reads files into memory for callers who want no
mapping at all.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import numpy as np

from .errors import FormatError

__all__ = ["FileGuard", "check_mapped", "guard_of"]

# id(mapping) -> guard; an entry is removed when its mapping object dies.
_GUARDS: dict[int, FileGuard] = {}
_LOCK = threading.Lock()


class FileGuard:
    """The identity of one mapped file: its open descriptor and ``fstat`` at validation."""

    __slots__ = ("__weakref__", "dev", "fd", "ino", "mtime_ns", "path", "size")

    def __init__(self, path: str, fd: int, st: os.stat_result) -> None:
        self.path = path
        self.fd = fd
        self.size = st.st_size
        self.ino = st.st_ino
        self.dev = st.st_dev
        self.mtime_ns = st.st_mtime_ns

    def check(self) -> None:
        """Raise FormatError if the file is no longer the one that was validated."""
        fd = self.fd
        if fd < 0:
            return  # closed: the mapping is gone, nothing reads it any more
        try:
            st = os.fstat(fd)
        except OSError as exc:  # pragma: no cover - a descriptor we own stays valid
            raise FormatError(f"{self.path}: file changed on disk ({exc})") from None
        if (
            st.st_size != self.size
            or st.st_mtime_ns != self.mtime_ns
            or st.st_ino != self.ino
            or st.st_dev != self.dev
        ):
            raise FormatError(
                f"{self.path}: file changed on disk since it was loaded (size {self.size} -> "
                f"{st.st_size} bytes, modified at {st.st_mtime_ns} ns, loaded at "
                f"{self.mtime_ns} ns); reload it, or load with mmap=False to copy files into "
                "memory"
            )

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def register(mapping: Any, guard: FileGuard) -> None:
    """Tie ``guard`` to ``mapping`` (an ``mmap.mmap``): checked through any array viewing
    it; its descriptor is closed when the mapping is garbage collected."""
    key = id(mapping)
    with _LOCK:
        _GUARDS[key] = guard
    weakref.finalize(mapping, _forget, key, guard)


def _forget(key: int, guard: FileGuard) -> None:
    with _LOCK:
        if _GUARDS.get(key) is guard:
            del _GUARDS[key]
    guard.close()


def guard_of(a: Any) -> FileGuard | None:
    """The guard of the mapping that array (or memoryview) ``a`` views, if any."""
    b = a
    while isinstance(b, np.ndarray):
        b = b.base
    if isinstance(b, memoryview):
        b = b.obj
    return _GUARDS.get(id(b))


def check_mapped(a: Any) -> None:
    """Before reading ``a``: raise FormatError if it views a mapped file that changed on
    disk. No cost beyond a dict check when no file is mapped or ``a`` is in memory."""
    if _GUARDS:
        g = guard_of(a)
        if g is not None:
            g.check()
