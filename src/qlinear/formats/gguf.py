"""GGUF files (llama.cpp), read and written through the ``gguf`` package (gguf-py).

Q8_0, Q4_0 and Q4_1 weight tensors (blocks of 32 columns, float16 scale ``d``) become
layers whose ``dequantize()`` equals ``gguf.quants.dequantize`` exactly (as float32):

* Q8_0 ``w = d * q``, q int8: an int8 asymmetric per-group(32) QuantizedLinear, zero
  point 0 (a block with ``d < 0``: codes ``-q - 1``, zero point -1, scale ``-d``).
* Q4_0 ``w = d * (n - 8)``, n the nibble: int4 asymmetric per-group(32), codes ``n``,
  zero point 8 (``d < 0``: codes ``15 - n``, zero point 7, scale ``-d``).
* Q4_1 ``w = d * n + m``, m a float16 minimum: :class:`qlinear.offset_linear.OffsetLinear`
  (int4 codes ``n``, zero point 0, scale ``d``, plus the float offsets ``m``).
* A block with ``d == 0`` gets the smallest float16 scale and codes equal to its zero
  point: exactly 0, as in the file.

Other tensor types are dequantized through ``gguf.quants.dequantize`` to float32 arrays
(``LoadInfo.notes`` says which). Writing: layers on these exact grids (group 32, scales
representable in float16; e.g. from GPTQ on the stored grid,
:func:`qlinear.formats.gguf_grid.gptq_quantize_gguf`) are encoded as they are; float
weights are rounded by qlinear to the nearest grid point against the stored float16
scale (:func:`qlinear.formats.gguf_grid.quantize_weight`; the grids are described
there). Hugging Face llama-family checkpoints are
converted with the ``gguf`` tensor name map and llama.cpp's q/k row permutation.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, InvalidParamsError, QuantizationError
from ..linear import QuantizedLinear
from ..offset_linear import OffsetLinear
from ..packing import pack_int4, unpack_int4
from . import LoadInfo
from .gguf_grid import BLOCK, GGUF_TYPES, GRID_METHODS, TINY, _params, quantize_weight

__all__ = [
    "GGUF_TYPES",
    "encode_layer",
    "quantize_to_gguf",
    "quantize_weight",
    "read",
    "read_causal_lm",
]

FILE_TYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3}  # llama.cpp's LlamaFileType.MOSTLY_*


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "GGUF support needs the 'gguf' package: pip install 'qlinear[gguf]'"
        ) from exc
    return gguf


def _qtype(gguf: Any, name: str) -> Any:
    return {
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1,
    }[name]


# --------------------------------------------------------------------------- blocks
def _nibbles_gguf_to_cols(qs: np.ndarray) -> np.ndarray:
    """(out, nb, 16) bytes, element j in the low nibble and j + 16 in the high one ->
    (out, nb * 32) nibble values in column order."""
    out = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return out.reshape(qs.shape[0], -1)


def _nibbles_cols_to_gguf(n: np.ndarray) -> np.ndarray:
    b = n.reshape(n.shape[0], -1, BLOCK).astype(np.uint8)
    return b[..., :16] | (b[..., 16:] << 4)


def decode_layer(
    raw: np.ndarray, kind: str, in_f: int, name: str, backend: str | None = None
) -> QuantizedLinear | OffsetLinear:
    """A layer from a GGUF tensor's bytes ``raw`` uint8 ``(out, row_bytes)``."""
    out_f = raw.shape[0]
    nb = in_f // BLOCK
    size = {"q8_0": 34, "q4_0": 18, "q4_1": 20}[kind]
    if in_f % BLOCK or raw.shape[1] != nb * size:
        raise FormatError(
            f"tensor {name!r}: {raw.shape[1]} bytes per row; expected {nb * size} for "
            f"{kind.upper()} with {in_f} columns (a multiple of {BLOCK})"
        )
    blocks = np.ascontiguousarray(raw).reshape(out_f, nb, size)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float64)
    if not np.all(np.isfinite(d)):
        raise FormatError(f"tensor {name!r}: a block scale is NaN or Inf")
    neg, zero = d < 0, d == 0
    scale = np.where(zero, TINY, np.abs(d))
    if kind == "q8_0":
        q = blocks[..., 2:].copy().view(np.int8).astype(np.int16).reshape(out_f, nb, BLOCK)
        zp = np.where(neg, -1, 0).astype(np.int32)
        q = np.where(neg[..., None], -q - 1, q)
        q = np.where(zero[..., None], 0, q)
        return QuantizedLinear._from_stored(
            q.reshape(out_f, in_f).astype(np.int8),
            _params(scale, zp, "int8"),
            in_f,
            backend=backend,
            lazy=True,
        )
    first = 4 if kind == "q4_1" else 2
    n = _nibbles_gguf_to_cols(blocks[..., first:]).astype(np.int16).reshape(out_f, nb, BLOCK)
    if kind == "q4_0":
        zp = np.where(neg, 7, 8).astype(np.int32)
        n = np.where(neg[..., None], 15 - n, n)
        n = np.where(zero[..., None], 8, n)
        return QuantizedLinear._from_stored(
            pack_int4(n.reshape(out_f, in_f).astype(np.uint8)),
            _params(scale, zp, "int4"),
            in_f,
            backend=backend,
            lazy=True,
        )
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    if not np.all(np.isfinite(m)):
        raise FormatError(f"tensor {name!r}: a block minimum is NaN or Inf")
    offsets = np.where(neg, m + 15 * d, m)
    n = np.where(neg[..., None], 15 - n, n)
    n = np.where(zero[..., None], 0, n)
    inner = QuantizedLinear._from_stored(
        pack_int4(n.reshape(out_f, in_f).astype(np.uint8)),
        _params(scale, np.zeros(scale.shape, np.int32), "int4"),
        in_f,
        backend=backend,
        lazy=True,
    )
    return OffsetLinear(inner, offsets)


def _f16_exact(a: np.ndarray) -> bool:
    return bool(np.array_equal(np.asarray(a, np.float64).astype(np.float16).astype(np.float64), a))


def encode_layer(layer: QuantizedLinear | OffsetLinear, kind: str, name: str) -> np.ndarray:
    """GGUF bytes uint8 ``(out, row_bytes)`` of a layer that lies exactly on the grid of
    ``kind`` (group size 32, float16-representable scales, the zero points the grid
    allows); FormatError naming the layer otherwise."""
    inner = layer.inner if isinstance(layer, OffsetLinear) else layer
    out_f, in_f = inner.shape
    if inner.group_size != BLOCK or in_f % BLOCK:
        raise FormatError(
            f"layer {name!r}: {kind.upper()} needs per-group layers with group size {BLOCK} "
            f"and in_features a multiple of {BLOCK}; got group size {inner.group_size}, "
            f"in_features {in_f}"
        )
    s = inner.scales
    if not _f16_exact(s):
        raise FormatError(f"layer {name!r}: scales are not representable in float16")
    zp = inner.zero_points.astype(np.int64)
    nb = in_f // BLOCK
    if kind == "q8_0":
        if inner.qtype.value != "int8":
            raise FormatError(f"layer {name!r}: Q8_0 needs int8 codes; got {inner.qtype.value}")
        if not np.all((zp == 0) | (zp == -1)):
            raise FormatError(f"layer {name!r}: Q8_0 zero points must be 0 (or -1); got others")
        c = inner.qweight.astype(np.int16).reshape(out_f, nb, BLOCK)
        neg = zp == -1
        q = np.where(neg[..., None], -c - 1, c)
        d = np.where(neg, -s, s).astype(np.float16)
        return np.concatenate(
            [d[..., None].view(np.uint8), q.astype(np.int8).view(np.uint8)], axis=-1
        ).reshape(out_f, -1)
    if inner.qtype.value != "int4":
        raise FormatError(f"layer {name!r}: {kind.upper()} needs int4 codes")
    nib = unpack_int4(inner.stored_weight, in_f).astype(np.int16).reshape(out_f, nb, BLOCK)
    sym = inner.scheme.value == "symmetric"
    if kind == "q4_0":
        if isinstance(layer, OffsetLinear):
            raise FormatError(f"layer {name!r}: an OffsetLinear is Q4_1, not Q4_0")
        if sym:
            n, d = nib, s
        else:
            if not np.all((zp == 8) | (zp == 7)):
                raise FormatError(f"layer {name!r}: Q4_0 zero points must be 8 (or 7)")
            n = np.where((zp == 7)[..., None], 15 - nib, nib)
            d = np.where(zp == 7, -s, s)
        qs = _nibbles_cols_to_gguf(n.reshape(out_f, in_f))
        d16 = d.astype(np.float16)[..., None].view(np.uint8)
        return np.concatenate([d16, qs], axis=-1).reshape(out_f, -1)
    # q4_1: w = d * n + m
    if isinstance(layer, OffsetLinear):
        if sym or not np.all(zp == 0):
            raise FormatError(f"layer {name!r}: Q4_1 needs the inner zero points to be 0")
        n, m = nib, layer.offsets
    else:
        off = 8 if sym else 0  # stored nibble = code + offset: w = s * (n - zp - off)
        n = nib
        m = -(zp + off) * s
    m = np.asarray(m, dtype=np.float64)
    # a block read with a negative scale comes back as d = -s, n = 15 - c, m = M + 15 s
    exact = m.astype(np.float16).astype(np.float64) == m
    m_neg = m + 15 * s
    flip = ~exact & (m_neg.astype(np.float16).astype(np.float64) == m_neg)
    if not np.all(exact | flip):
        raise FormatError(f"layer {name!r}: Q4_1 minimums are not representable in float16")
    n = np.where(flip[..., None], 15 - n, n)
    m = np.where(flip, m_neg, m)
    s = np.where(flip, -s, s)
    qs = _nibbles_cols_to_gguf(n.reshape(out_f, in_f))
    d16 = s.astype(np.float16)[..., None].view(np.uint8)
    m16 = np.asarray(m).astype(np.float16)[..., None].view(np.uint8)
    return np.concatenate([d16, m16, qs], axis=-1).reshape(out_f, -1)


# --------------------------------------------------------------------------- reading
def _kind(gguf: Any, t: Any) -> str | None:
    Q = gguf.GGMLQuantizationType
    return {Q.Q8_0: "q8_0", Q.Q4_0: "q4_0", Q.Q4_1: "q4_1"}.get(t.tensor_type)


def _logical_shape(gguf: Any, t: Any) -> tuple[int, ...]:
    """(rows..., columns) of a tensor; quantized data arrive as bytes per row."""
    if t.data.dtype != np.uint8 or t.tensor_type in (gguf.GGMLQuantizationType.I8,):
        return tuple(int(v) for v in t.data.shape)
    shape = gguf.quants.quant_shape_from_byte_shape(t.data.shape, t.tensor_type)
    return tuple(int(v) for v in shape)


def _gguf_errors(fn):
    """Turn what gguf-py raises on a malformed file (it decodes lazily: UnicodeDecodeError,
    struct errors, IndexError, ...) into FormatError naming the file; qlinear's own
    errors pass unchanged. Applied to every public reader of this module."""
    import functools
    import struct

    @functools.wraps(fn)
    def wrapper(path, *args, **kwargs):
        try:
            return fn(path, *args, **kwargs)
        except QuantizationError:
            raise
        except (ValueError, KeyError, IndexError, TypeError, OverflowError, struct.error) as e:
            raise FormatError(f"{path}: malformed GGUF file ({type(e).__name__}: {e})") from None

    return wrapper


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _check_header(path: Path) -> None:
    """Walk a GGUF header (counts, key/value entries, tensor infos) and check every count
    and length against the file's real size before gguf-py reads it: gguf-py allocates
    from those sizes (a fuzzed count of 2^60 would take all memory). FormatError naming
    the field otherwise."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(min(size, 64 * 1024 * 1024))
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(head):
            raise FormatError(f"{path}: GGUF {what} runs past the end of the file")
        b = head[pos : pos + n]
        pos += n
        return b

    def u(n: int, what: str) -> int:
        return int.from_bytes(take(n, what), "little")

    def string(what: str) -> None:
        take(u(8, what + " length"), what)

    def value(vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _GGUF_SCALAR_SIZES:
            take(_GGUF_SCALAR_SIZES[vtype], what)
        elif vtype == _GGUF_STRING:
            string(what)
        elif vtype == _GGUF_ARRAY and depth < 4:
            etype, count = u(4, what + " element type"), u(8, what + " length")
            if etype in _GGUF_SCALAR_SIZES:
                take(count * _GGUF_SCALAR_SIZES[etype], what)
                return
            if count > len(head) - pos:  # every element takes at least one byte
                raise FormatError(f"{path}: GGUF {what} claims {count} elements")
            for _ in range(count):
                value(etype, what, depth + 1)
        else:
            raise FormatError(f"{path}: GGUF {what} has unknown value type {vtype}")

    if take(4, "magic") != b"GGUF":
        raise FormatError(f"{path}: not a GGUF file (bad magic)")
    u(4, "version")
    n_tensors, n_kv = u(8, "tensor count"), u(8, "metadata count")
    if n_tensors > size // 24 or n_kv > size // 12:
        raise FormatError(
            f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} metadata entries; "
            f"a file of {size} bytes cannot hold them"
        )
    for i in range(n_kv):
        string(f"metadata key #{i}")
        value(u(4, f"metadata #{i} type"), f"metadata #{i}")
    for i in range(n_tensors):
        string(f"tensor #{i} name")
        n_dims = u(4, f"tensor #{i} dimension count")
        if n_dims > 8:
            raise FormatError(f"{path}: GGUF tensor #{i} has {n_dims} dimensions; at most 8")
        dims = struct.unpack(f"<{n_dims}Q", take(8 * n_dims, f"tensor #{i} shape"))
        n = 1
        for d in dims:
            n *= d
            if n > 8 * size:  # a tensor's elements take at least 1/8 byte (ternary types)
                raise FormatError(f"{path}: GGUF tensor #{i} shape {list(dims)} exceeds the file")
        take(12, f"tensor #{i} type and offset")


def _reader(path: Path) -> Any:
    gguf = _gguf()
    _check_header(path)
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, KeyError, IndexError) as exc:
        raise FormatError(f"{path}: not a readable GGUF file ({exc})") from None


@_gguf_errors
def read(path: str | Path, *, backend: str | None = None) -> tuple[dict[str, Any], LoadInfo]:
    """Every tensor of a GGUF file under its GGUF name: Q8_0/Q4_0/Q4_1 2-D tensors as
    layers, F32/F16 as arrays, any other type dequantized by gguf-py to float32 (named in
    ``LoadInfo.notes``)."""
    gguf = _gguf()
    r = _reader(Path(path))
    F = gguf.GGMLQuantizationType
    out: dict[str, Any] = {}
    acts: dict[str, str] = {}
    layers: dict[str, dict[str, Any]] = {}
    dequantized = []
    for t in r.tensors:
        kind = _kind(gguf, t)
        shape = _logical_shape(gguf, t)
        if kind is not None and len(shape) == 2:
            layer = decode_layer(np.asarray(t.data), kind, shape[1], t.name, backend)
            out[t.name] = layer
            acts[t.name] = "float"
            layers[t.name] = {"type": kind.upper(), "shape": list(shape)}
        elif t.tensor_type in (F.F32, F.F16):
            out[t.name] = np.asarray(t.data)
        else:
            try:
                arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            except (NotImplementedError, ValueError, KeyError) as exc:
                raise FormatError(
                    f"tensor {t.name!r}: GGUF type {t.tensor_type.name} cannot be held or "
                    f"dequantized ({exc}); expected Q8_0, Q4_0, Q4_1 or a type gguf-py "
                    "dequantizes"
                ) from None
            out[t.name] = np.asarray(arr, dtype=np.float32)
            dequantized.append(f"{t.name} ({t.tensor_type.name})")
    notes = (f"dequantized to float32 by gguf-py: {', '.join(dequantized)}",) if dequantized else ()
    version = int(r.fields["GGUF.version"].contents()) if "GGUF.version" in r.fields else None
    return out, LoadInfo("gguf", acts, layers, notes, version)


@_gguf_errors
def inspect(path: str | Path) -> Any:
    """A :class:`qlinear.io.FileInfo` of a GGUF file (tensor types, metadata keys)."""
    from ..io import FileInfo

    gguf = _gguf()
    r = _reader(Path(path))
    tensors, layers = {}, {}
    for t in r.tensors:
        shape = _logical_shape(gguf, t)
        tensors[t.name] = (t.tensor_type.name, shape, int(t.n_bytes))
        if _kind(gguf, t) is not None and len(shape) == 2:
            layers[t.name] = {"type": t.tensor_type.name, "shape": list(shape)}
    meta = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        v = f.contents()
        meta[f.name] = f"[{len(v)} items]" if isinstance(v, list) and len(v) > 8 else str(v)[:200]
    version = int(r.fields["GGUF.version"].contents())
    return FileInfo(str(path), version, layers, tensors, meta, [str(path)], "gguf")


# --------------------------------------------------------------------------- writing
def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    if include is not None and not any(fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatchcase(name, p) for p in exclude or ())


def _atomic_gguf(dst: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def quantize_to_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    kind: str,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    layers: dict[str, QuantizedLinear | OffsetLinear] | None = None,
    method: str = "minmax",
    t0: float | None = None,
) -> Any:
    """Write ``dst`` (.gguf) from a GGUF file (requantized: every metadata key and the
    tokenizer kept, same tensor names) or a Hugging Face llama-family checkpoint.

    Every 2-D ``*.weight`` that is not a norm (from a GGUF source: that was quantized, or
    any linear) is written as ``kind``; ``layers`` maps GGUF tensor names to layers
    already on the grid (e.g. GPTQ-calibrated), encoded as they are; the others are
    rounded by :func:`qlinear.formats.gguf_grid.quantize_weight` with ``method``
    (``"minmax"``: llama.cpp's block scales; ``"mse"``: the shrink search). ``include`` /
    ``exclude`` globs match GGUF tensor names.
    """
    from ..report import CheckpointReport, TensorReport

    t0 = time.perf_counter() if t0 is None else t0
    if kind not in GGUF_TYPES:
        raise InvalidParamsError(f"gguf type must be one of {GGUF_TYPES}; got {kind!r}")
    if method not in GRID_METHODS:
        raise InvalidParamsError(
            f"GGUF block scales are chosen by one of {GRID_METHODS}; got method {method!r}"
        )
    gguf = _gguf()
    src_p, dst_p = Path(src), Path(dst)
    if dst_p.suffix != ".gguf":
        raise InvalidParamsError(f"a GGUF output is a .gguf file; got {dst}")
    qt = _qtype(gguf, kind)
    reports: list[TensorReport] = []
    layers = dict(layers or {})

    def emit(
        writer: Any,
        name: str,
        w: np.ndarray | None,
        raw: Any,
        raw_type: Any,
        quantize: bool,
        dtype: str,
    ) -> None:
        if quantize:
            layer = layers.pop(name, None)
            if layer is None:
                layer = quantize_weight(w, kind, method=method)
            data = encode_layer(layer, kind, name)
            writer.add_tensor(name, data, raw_dtype=qt)
            rel = None
            if w is not None:
                err = np.linalg.norm(layer.dequantize() - w)
                sig = np.linalg.norm(w)
                rel = float(err / sig) if sig > 0 else float(err)
            nb = w.nbytes if w is not None else data.nbytes
            snr = -20 * np.log10(rel) if rel else None
            reports.append(
                TensorReport(
                    name, tuple(layer.shape), dtype, kind.upper(), rel, snr, nb, data.nbytes
                )
            )
        else:
            writer.add_tensor(name, raw, raw_dtype=raw_type)
            reports.append(
                TensorReport(
                    name,
                    tuple(np.shape(raw)),
                    dtype,
                    f"kept {dtype}",
                    None,
                    None,
                    raw.nbytes,
                    raw.nbytes,
                )
            )

    if src_p.is_file() and _head(src_p) == b"GGUF":
        r = _reader(src_p)
        arch = str(r.fields["general.architecture"].contents())

        def write(tmp: str) -> None:
            writer = gguf.GGUFWriter(tmp, arch)
            for f in r.fields.values():
                if f.name == "general.architecture" or f.name.startswith("GGUF."):
                    continue
                value = f.contents()
                if f.name == "general.file_type":
                    value = FILE_TYPES[kind]
                sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(f.name, value, f.types[0], sub_type=sub)
            for t in r.tensors:
                shape = _logical_shape(gguf, t)
                src_kind = _kind(gguf, t)
                quant = (
                    len(shape) == 2
                    and t.name.endswith(".weight")
                    and "norm" not in t.name
                    and shape[1] % BLOCK == 0
                    and (
                        src_kind is not None
                        or t.tensor_type
                        not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
                        or t.name in layers
                    )
                    and _selected(t.name, include, exclude)
                )
                if quant:
                    w = None
                    if t.name not in layers:
                        w = np.asarray(
                            gguf.quants.dequantize(np.asarray(t.data), t.tensor_type),
                            dtype=np.float64,
                        )
                    emit(writer, t.name, w, None, None, True, t.tensor_type.name)
                else:
                    emit(
                        writer,
                        t.name,
                        None,
                        np.asarray(t.data),
                        t.tensor_type,
                        False,
                        t.tensor_type.name,
                    )
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()

        _atomic_gguf(dst_p, write)
    else:
        from .gguf_llama import write_from_hf

        write_from_hf(gguf, src_p, dst_p, kind, emit, include, exclude)
    if layers:
        raise FormatError(f"layers given for tensors the file does not have: {sorted(layers)[:5]}")
    return CheckpointReport(
        str(src_p),
        str(dst_p),
        {"gguf_type": kind},
        tuple(reports),
        (str(dst_p),),
        time.perf_counter() - t0,
        "gguf",
    )


def _head(p: Path) -> bytes:
    with open(p, "rb") as f:
        return f.read(4)


def read_causal_lm(path: str | os.PathLike[str], *, backend: str | None = None):
    """See :func:`qlinear.formats.gguf_llama.read_causal_lm`."""
    from .gguf_llama import read_causal_lm as impl

    return impl(path, backend=backend)
