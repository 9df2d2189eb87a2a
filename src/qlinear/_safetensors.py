"""A small, strict safetensors reader and writer (no pickle, no torch).

File layout (the safetensors format): an 8-byte little-endian unsigned header length
``N``, ``N`` bytes of UTF-8 JSON, then the data buffer. The JSON maps each tensor name to
``{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}`` (offsets relative to
the start of the data buffer) and may hold ``"__metadata__"``, a str -> str mapping.

:class:`SafetensorsFile` reads the header with ``pread`` (its length checked against the
file's real size and a 100 MB limit before anything is allocated), parses it as strict
JSON and validates every entry before any data is touched: the dtype is a known name,
the shape a list of at most 32 integers >= 0, ``prod(shape) * itemsize == end - begin``
(computed so that no huge integer is built), offsets lie inside the file, and the
entries, sorted by offset, tile the data buffer exactly (no overlap, no gap, nothing
after the last one). Anything else raises :class:`~qlinear.errors.FormatError` naming
the tensor or field, never another exception type. Then it memory-maps the file (kept
descriptor, checked before every access: :mod:`qlinear._mapped`) or reads it into
memory (``mmap=False``).

:class:`SafetensorsWriter` plans a layout (tensors ordered by decreasing item size so each
one is aligned to its item size, header padded with spaces to 8 bytes) and writes the
tensors, possibly in row blocks, at their planned offsets into a temporary file in the
destination directory, then fsyncs and ``os.replace``-s it over the destination.
"""

from __future__ import annotations

import json
import math
import mmap as _mmap
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import _mapped
from ._atomic import atomic_write
from .errors import FormatError, InvalidInputError

__all__ = [
    "DTYPE_SIZES",
    "NUMPY_DTYPES",
    "SafetensorsFile",
    "SafetensorsWriter",
    "TensorInfo",
    "atomic_write",
    "dtype_name",
    "parse_json",
]

MAX_HEADER = 100 * 1024 * 1024  # the limit the reference implementation enforces
MAX_DIMS = 32  # NumPy 1.x's limit (2.x allows 64); no real tensor comes near it

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}

# Dtypes NumPy represents natively (little-endian on disk).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def dtype_name(dt: np.dtype) -> str:
    """The safetensors name of a NumPy dtype; InvalidInputError if it has none."""
    dt = np.dtype(dt)
    for name, ndt in NUMPY_DTYPES.items():
        if ndt.kind == dt.kind and ndt.itemsize == dt.itemsize:
            return name
    raise InvalidInputError(
        f"dtype {dt} cannot be stored in safetensors; expected bool, (u)int8..64 or float16/32/64"
    )


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: absolute byte range ``[begin, end)`` in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"header JSON has the key {k!r} twice; expected unique names")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise FormatError(f"header JSON holds {name}, which JSON does not allow")


def parse_json(text: str | bytes, where: str) -> Any:
    """Strict JSON from outside bytes: FormatError (never another exception) for invalid
    UTF-8 or JSON, duplicate keys, NaN/Infinity, integers over 4300 digits and nesting
    deeper than the interpreter's recursion limit."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
    except RecursionError:
        raise FormatError(f"{where} is not JSON we read: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise FormatError(f"{where} is not JSON (or not UTF-8): {exc}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked_nbytes(where: str, dtype: str, shape: list[int], limit: int) -> int:
    """``prod(shape) * itemsize``, computed without building integers larger than needed
    to know it exceeds ``limit`` (a hostile shape of many huge dimensions)."""
    if 0 in shape:
        return 0
    n = DTYPE_SIZES[dtype]
    for i, d in enumerate(shape):
        n *= d
        if n > limit:
            more = "at least " if i + 1 < len(shape) else ""
            raise FormatError(
                f"{where}: {dtype} shape {shape!r:.200} needs {more}{n} bytes but the data "
                f"buffer holds {limit}; the file is truncated or the header is wrong"
            )
    return n


def _parse_entry(name: str, entry: Any, data_len: int, data_start: int) -> TensorInfo:
    where = f"tensor {name!r:.200}"
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: header entry must be an object; got {entry!r:.80}")
    extra = set(entry) - {"dtype", "shape", "data_offsets"}
    if extra:
        raise FormatError(f"{where}: unexpected header fields {sorted(extra)!r:.200}")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise FormatError(
            f"{where}: unknown dtype {dtype!r:.80}; expected one of {sorted(DTYPE_SIZES)}"
        )
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape must be a list of integers >= 0; got {shape!r:.200}")
    if len(shape) > MAX_DIMS:
        raise FormatError(f"{where}: shape has {len(shape)} dimensions; at most {MAX_DIMS}")
    offs = entry.get("data_offsets")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(_is_int(o) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise FormatError(
            f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end; got {offs!r:.200}"
        )
    begin, end = offs
    if end > data_len:
        raise FormatError(
            f"{where}: data_offsets {offs} run past the end of the data buffer "
            f"({data_len} bytes); the file is truncated or the header is wrong"
        )
    expected = _checked_nbytes(where, dtype, shape, data_len)
    if end - begin != expected:
        raise FormatError(
            f"{where}: data_offsets {offs} span {end - begin} bytes but {dtype} shape "
            f"{shape} needs {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _pread_all(fd: int, n: int, offset: int, path: Path) -> bytes:
    """Exactly ``n`` bytes at ``offset`` (``n`` already checked against the file size)."""
    chunks = []
    got = 0
    while got < n:
        b = os.pread(fd, min(n - got, 1 << 30), offset + got)
        if not b:
            raise FormatError(
                f"{path}: file changed on disk while reading it (ended after {offset + got} bytes)"
            )
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


class SafetensorsFile:
    """A validated safetensors file, memory-mapped (default) or read into memory
    (``mmap=False``). Arrays it returns are read-only views of the data (no copy)
    whenever the dtype is NumPy-native and aligned.

    A mapped file keeps its descriptor open; every array or byte access first checks
    (``fstat``) that the file still has the size, inode and modification time it had
    when validated, and raises FormatError "file changed on disk" otherwise, instead of
    the SIGBUS that reading a truncated mapping would raise (see :mod:`qlinear._mapped`).
    """

    def __init__(self, path: str | os.PathLike[str], *, mmap: bool = True) -> None:
        self.path = Path(path)
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {self.path}") from None
        except ValueError as exc:  # a NUL byte in the path
            raise FormatError(f"bad file name {str(self.path)!r:.200}: {exc}") from None
        guard = None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"{self.path}: not a regular file")
            size = st.st_size
            if size < 8:
                raise FormatError(
                    f"{self.path}: file is {size} bytes; a safetensors file starts with an "
                    "8-byte header length"
                )
            n = int.from_bytes(_pread_all(fd, 8, 0, self.path), "little")
            if n > size - 8:
                raise FormatError(
                    f"{self.path}: header length {n} is larger than the file ({size} bytes)"
                )
            if n > MAX_HEADER:
                raise FormatError(f"{self.path}: header length {n} exceeds the {MAX_HEADER} limit")
            header = parse_json(_pread_all(fd, n, 8, self.path), f"{self.path}: header")
            self._parse(header, n, size)
            if mmap:
                self._mm: Any = _mmap.mmap(fd, 0, access=_mmap.ACCESS_READ)
                guard = _mapped.FileGuard(str(self.path), fd, st)
                _mapped.register(self._mm, guard)
            else:
                buf = bytearray(_pread_all(fd, size, 0, self.path))
                if os.fstat(fd).st_size != size:
                    raise FormatError(f"{self.path}: file changed on disk while reading it")
                self._mm = memoryview(buf).toreadonly()
        finally:
            if guard is None:
                os.close(fd)
        self.size = size
        self._guard = guard

    def _parse(self, header: Any, n: int, size: int) -> None:
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: header must be a JSON object; got {header!r:.80}")
        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(
                f"{self.path}: __metadata__ must map strings to strings; got {meta!r:.200}"
            )
        self.metadata: dict[str, str] = meta
        data_start = 8 + n
        data_len = size - data_start
        infos = [_parse_entry(k, v, data_len, data_start) for k, v in header.items()]
        pos = data_start
        for info in sorted(infos, key=lambda i: (i.begin, i.end)):
            if info.begin < pos:
                raise FormatError(
                    f"tensor {info.name!r:.200}: data_offsets overlap the previous tensor's bytes"
                )
            if info.begin > pos:
                raise FormatError(
                    f"tensor {info.name!r:.200}: {info.begin - pos} unused bytes before it; "
                    "expected tensors to tile the data buffer"
                )
            pos = info.end
        if pos != size:
            raise FormatError(
                f"{self.path}: {size - pos} bytes after the last tensor; expected none"
            )
        self.tensors: dict[str, TensorInfo] = {i.name: i for i in infos}

    # ------------------------------------------------------------------ access
    @property
    def mapped(self) -> bool:
        """True if the data is a memory mapping of the file (``mmap=True``)."""
        return self._guard is not None

    def check(self) -> None:
        """Raise FormatError if a mapped file changed on disk since it was validated."""
        if self._guard is not None:
            self._guard.check()

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def raw(self, name: str, begin: int = 0, end: int | None = None) -> memoryview:
        """Bytes ``[begin, end)`` of a tensor's data, without copying."""
        self.check()
        info = self.tensors[name]
        stop = info.end if end is None else info.begin + end
        return memoryview(self._mm)[info.begin + begin : stop]

    def array(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or rows ``[a, b)`` of its first axis) as a read-only NumPy array:
        a view of the data when possible. BF16 is widened to float32 (a copy)."""
        self.check()
        info = self.tensors[name]
        shape = list(info.shape)
        begin = info.begin
        if rows is not None:
            a, b = rows
            row_bytes = (info.nbytes // shape[0]) if shape and shape[0] else 0
            begin += a * row_bytes
            shape[0] = b - a
        count = math.prod(shape)
        if info.dtype == "BF16":
            u16 = np.frombuffer(self._mm, dtype="<u2", count=count, offset=begin)
            out = (u16.astype(np.uint32) << 16).view(np.float32).reshape(shape)
            out.setflags(write=False)
            return out
        dt = NUMPY_DTYPES.get(info.dtype)
        if dt is None:
            raise FormatError(
                f"tensor {name!r} has dtype {info.dtype}, which NumPy cannot represent"
            )
        if count == 0:
            out = np.empty(shape, dtype=dt)
            out.setflags(write=False)
            return out
        out = np.frombuffer(self._mm, dtype=dt, count=count, offset=begin).reshape(shape)
        if begin % dt.itemsize:
            # Foreign writers may misalign; an aligned copy keeps every kernel on its fast path.
            out = out.copy()
            out.setflags(write=False)
        return out

    def release_pages(self) -> None:
        """Drop this process's resident pages of the mapping (they stay in the page
        cache): keeps RSS flat while streaming through a large file."""
        advise = getattr(self._mm, "madvise", None)
        flag = getattr(_mmap, "MADV_DONTNEED", None)
        if advise is not None and flag is not None:
            advise(flag)

    def close(self) -> None:
        """Unmap now if no array still views the data (otherwise when the last one goes;
        the file's descriptor is closed with the mapping)."""
        if self._guard is None:
            return
        try:
            self._mm.close()
        except BufferError:
            return
        self._guard.close()


def as_bytes(data: np.ndarray | memoryview) -> memoryview:
    """The bytes safetensors stores for ``data``: an array little-endian in C order, or a
    memoryview as raw bytes."""
    if isinstance(data, np.ndarray):
        arr = np.ascontiguousarray(data)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        return memoryview(arr.reshape(-1).view(np.uint8))
    return data.cast("B") if data.format != "B" else data


class SafetensorsWriter:
    """Plan a safetensors layout for ``(name, dtype, shape)`` entries, then write each
    tensor's bytes (whole or in pieces) at its planned offset.

    Usage::

        w = SafetensorsWriter(entries, metadata)
        with atomic_write(path) as f:
            w.begin(f)
            w.write(f, "a", array)            # or several w.write(..., at=byte_offset)
            w.finish()                        # checks every byte was written
    """

    def __init__(
        self,
        entries: Sequence[tuple[str, str, Sequence[int]]],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        names = [e[0] for e in entries]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise InvalidInputError(f"tensor names must be unique; repeated: {dup}")
        # Larger items first: every tensor then starts at a multiple of its item size.
        order = sorted(range(len(entries)), key=lambda i: -DTYPE_SIZES[entries[i][1]])
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        self.layout: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        pos = 0
        for i in order:
            name, dtype, shape = entries[i]
            shape = tuple(int(d) for d in shape)
            nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [pos, pos + nbytes],
            }
            self.layout[name] = (dtype, shape, pos, nbytes)
            pos += nbytes
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-(8 + len(text)) % 8)
        self.header = len(text).to_bytes(8, "little") + text
        self.data_bytes = pos
        self._written: dict[str, int] = dict.fromkeys(self.layout, 0)

    def begin(self, f: BinaryIO) -> None:
        f.seek(0)
        f.write(self.header)
        f.truncate(len(self.header) + self.data_bytes)

    def write(self, f: BinaryIO, name: str, data: np.ndarray | memoryview, at: int = 0) -> None:
        """Write ``data`` (an array, written little-endian C-order, or raw bytes) into
        tensor ``name`` starting ``at`` bytes into it."""
        _, _, pos, nbytes = self.layout[name]
        buf = as_bytes(data)
        if at < 0 or at + len(buf) > nbytes:
            raise InvalidInputError(
                f"write of {len(buf)} bytes at {at} overflows tensor {name!r} ({nbytes} bytes)"
            )
        f.seek(len(self.header) + pos + at)
        f.write(buf)
        self._written[name] += len(buf)

    def finish(self) -> None:
        short = [n for n, (_, _, _, nb) in self.layout.items() if self._written[n] != nb]
        if short:
            raise RuntimeError(f"internal error: tensors not fully written: {short[:5]}")
