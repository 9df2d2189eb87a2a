"""All-or-nothing outputs: a file or a whole directory appears complete or not at all.

Both build their output under a hidden temporary name next to the destination,
``.NAME.tmp-<pid>-<random>``, fsync the data and the directory, then rename it into place.

- :func:`atomic_write` (one file): ``os.replace`` over the destination.
- :func:`atomic_dir` (a directory, e.g. a sharded checkpoint): an existing destination is
  swapped with the new one in a single ``renameat2(RENAME_EXCHANGE)`` where the kernel
  and file system offer it (Linux >= 3.15: ext4, xfs, btrfs, tmpfs), so there is no
  moment without a complete destination; elsewhere the old one is renamed aside to
  ``.NAME.old-<pid>-<random>``, the new one renamed in, the old one removed. Two runs onto
  one destination each build their own temporary and swap it in whole: the last to
  finish wins, and no mix of the two is ever visible.

A process killed at any moment leaves the destination absent or as it was, plus at most
its temporary; the next run onto the same destination removes temporaries whose process
id is no longer alive (only names with this module's prefix and a dead pid are touched).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_dir", "atomic_write", "cleanup_stale", "fsync_dir", "temp_name"]

_PATTERN = r"^\.{name}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}$"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def temp_name(target: Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling ``.NAME.<kind>-<pid>-<8 hex>`` of ``target``."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # alive under another user / not a pid here
        return True
    return True


def cleanup_stale(target: Path) -> list[Path]:
    """Remove leftovers of killed runs writing ``target``: its hidden temporaries
    (``.NAME.tmp-<pid>-*``, ``.NAME.old-<pid>-*``) whose process is dead. Returns the
    paths removed; errors while removing are ignored (another run may be at it)."""
    rx = re.compile(_PATTERN.format(name=re.escape(target.name)))
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for e in entries:
        m = rx.match(e.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        p = Path(e.path)
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def fsync_dir(path: Path) -> None:
    """fsync a directory so the renames inside it persist (ignored where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a file in ``path``'s directory; on success fsync it and ``os.replace`` it
    over ``path``; on any exception (KeyboardInterrupt included) delete it and re-raise,
    leaving the old file (or none) untouched."""
    target = Path(path)
    if target.is_dir():  # else os.replace fails later, naming the temporary file
        raise IsADirectoryError(errno.EISDIR, "is a directory, expected a file path", str(target))
    cleanup_stale(target)
    tmp = temp_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _publish(tmp: Path, target: Path) -> None:
    """Move the finished directory ``tmp`` to ``target``, replacing what is there."""
    try:
        os.rename(tmp, target)  # no destination (or an empty directory): plain rename
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous destination
        return
    old = temp_name(target, "old")
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success fsync everything in
    it and move it to ``path`` (replacing an existing directory whole, see the module
    docstring); on any exception remove it and re-raise, leaving ``path`` untouched.

    The caller decides whether replacing an existing ``path`` is allowed."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(errno.EEXIST, "exists and is not a directory", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    cleanup_stale(target)
    tmp = temp_name(target)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
