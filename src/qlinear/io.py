"""Save and load quantized layers as safetensors, with compressed-tensors-style names.

For a layer called ``name`` (see ``docs/format.md`` for the full specification):

==========================  =====  =================================  ======================
tensor                      dtype  shape                              when
==========================  =====  =================================  ======================
``name.weight``             I8     ``(out, in)``                      int8 codes
``name.weight_packed``      U8     ``(out, ceil(in / 2))``            int4 (packing.py order)
``name.weight_shape``       I64    ``(2,)`` = ``[out, in]``           int4
``name.weight_scale``       F64    ``(1,)``, ``(out,)``, ``(out, g)``  always
``name.weight_zero_point``  I8     same as the scale                  asymmetric only
``name.bias``               F32/64 ``(out,)``                         layers with a bias
==========================  =====  =================================  ======================

Float (or other plain) arrays are stored under their own name, as they are. The file's
``__metadata__["qlinear"]`` holds a JSON quantization config: ``{"format": "qlinear",
"format_version": 1, "layers": {name: {"qtype", "scheme", "granularity", "group_size",
"shape"}}}``. No pickle anywhere.

:func:`load` memory-maps the file: codes are views of the mapping (no copy with the NumPy
backend), so loading costs time proportional to the number of tensors, not their size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ._safetensors import (
    FLOAT_DTYPES,
    SafetensorsFile,
    SafetensorsWriter,
    TensorInfo,
    atomic_write,
    dtype_name,
    parse_json,
)
from .errors import FormatError, InvalidInputError, QuantizationError
from .linear import QuantizedLinear
from .packing import packed_cols, unpack_int4
from .params import QuantizationParams, param_shape
from .qtypes import (
    QuantizationGranularity,
    QuantizationScheme,
    QuantizationType,
    code_range,
    storage_offset,
)

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "FileInfo",
    "atomic_write_text",
    "inspect",
    "load",
    "save",
]

MAX_INDEX = 100 * 1024 * 1024  # bytes of model.safetensors.index.json
FORMAT_NAME = "qlinear"
FORMAT_VERSION = 1
METADATA_KEY = "qlinear"
INT_DTYPES = ("I8", "I16", "I32", "I64", "U8")

# Tensor names a saved layer ``name`` owns: ``name + suffix``.
LAYER_SUFFIXES = (
    ".weight",
    ".weight_packed",
    ".weight_shape",
    ".weight_scale",
    ".weight_zero_point",
    ".bias",
)

Item = Union[QuantizedLinear, np.ndarray]  # noqa: UP007 (runtime alias on Python 3.10)


# --------------------------------------------------------------------------- naming
def layer_tensors(name: str, layer: QuantizedLinear) -> dict[str, np.ndarray]:
    """The tensors that store ``layer`` under ``name`` (stored codes are not copied)."""
    out: dict[str, np.ndarray] = {}
    stored = layer.stored_weight
    if layer.qtype is QuantizationType.INT4:
        out[f"{name}.weight_packed"] = stored
        out[f"{name}.weight_shape"] = np.array(layer.shape, dtype=np.int64)
    else:
        out[f"{name}.weight"] = stored
    out[f"{name}.weight_scale"] = np.asarray(layer.scales, dtype=np.float64)
    if layer.scheme is QuantizationScheme.ASYMMETRIC:
        out[f"{name}.weight_zero_point"] = layer.zero_points.astype(np.int8)
    if layer.bias is not None:
        b = layer.bias
        b32 = b.astype(np.float32)
        # float32 when that is lossless (a float32 bias widened to float64 on the way in).
        out[f"{name}.bias"] = b32 if np.array_equal(b32.astype(np.float64), b) else b
    return out


def layer_config(layer: QuantizedLinear) -> dict[str, Any]:
    """The per-layer entry of the JSON quantization config."""
    return {
        "qtype": layer.qtype.value,
        "scheme": layer.scheme.value,
        "granularity": layer.granularity.value,
        "group_size": layer.group_size,
        "shape": list(layer.shape),
        "bias": layer.bias is not None,
    }


def format_config(layers: Mapping[str, Mapping[str, Any]]) -> str:
    """The JSON string stored under ``__metadata__["qlinear"]``."""
    return json.dumps(
        {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layers": dict(layers)},
        separators=(",", ":"),
    )


# --------------------------------------------------------------------------- save
def save(
    path: str | os.PathLike[str],
    layers: Mapping[str, Item],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write layers and arrays to one safetensors file, atomically.

    Args:
        path: destination file (conventionally ``*.safetensors``); replaced atomically:
            written to a temporary file in the same directory, fsynced, then renamed, so
            an interrupted save leaves the old file (or none) and no partial file.
        layers: name -> :class:`QuantizedLinear` (stored as ``name.weight`` /
            ``name.weight_packed`` + ``name.weight_shape``, ``name.weight_scale``,
            ``name.weight_zero_point``, ``name.bias``), or name -> array (bool, int or
            float16/32/64, any shape), stored as it is.
        metadata: extra str -> str pairs for the file's ``__metadata__`` (the key
            ``"qlinear"`` is reserved for the quantization config).

    Raises:
        InvalidInputError: a name that is not a non-empty string, a value of another
            type, an unstorable dtype, two items that produce the same tensor name, an
            array named inside a layer's tensor names (``name.bias`` beside a layer
            ``name``, ...), or bad metadata.
    """
    if not isinstance(layers, Mapping):
        raise InvalidInputError(f"layers must be a mapping name -> layer; got {type(layers)}")
    meta: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidInputError(f"metadata must map str to str; got {k!r}: {v!r:.40}")
        if k == METADATA_KEY:
            raise InvalidInputError(f"metadata key {METADATA_KEY!r} is reserved by qlinear")
        meta[k] = v
    tensors: dict[str, np.ndarray] = {}
    config: dict[str, dict[str, Any]] = {}

    def put(tname: str, arr: np.ndarray, owner: str) -> None:
        if tname in tensors:
            raise InvalidInputError(
                f"tensor name {tname!r} (from {owner!r}) is produced twice; rename one item"
            )
        tensors[tname] = arr

    for name, item in layers.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise InvalidInputError(f"layer names must be non-empty strings; got {name!r}")
        if isinstance(item, QuantizedLinear):
            config[name] = layer_config(item)
            for tname, arr in layer_tensors(name, item).items():
                put(tname, arr, name)
        elif isinstance(item, np.ndarray):
            dtype_name(item.dtype)  # raises for unstorable dtypes
            put(name, item, name)
        else:
            raise InvalidInputError(
                f"item {name!r} must be a QuantizedLinear or a numpy array; got "
                f"{type(item).__name__}"
            )
    for name, item in layers.items():
        # An array inside a layer's namespace (say "fc.bias" beside a layer "fc" without
        # a bias) would be read back as part of that layer, and load would reject the file.
        owner = next((name[: -len(s)] for s in LAYER_SUFFIXES if name.endswith(s)), None)
        if isinstance(item, np.ndarray) and owner in config:
            raise InvalidInputError(
                f"array {name!r} is inside the tensor names of layer {owner!r} "
                f"({', '.join(owner + s for s in LAYER_SUFFIXES)}); expected another name"
            )
    meta[METADATA_KEY] = format_config(config)
    entries = [(n, dtype_name(a.dtype), a.shape) for n, a in tensors.items()]
    writer = SafetensorsWriter(entries, meta)
    with atomic_write(path) as f:
        writer.begin(f)
        for n, a in tensors.items():
            _write_tensor(writer, f, n, a)
        writer.finish()


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (temp file, fsync, rename)."""
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def _write_tensor(writer: SafetensorsWriter, f: Any, name: str, arr: np.ndarray) -> None:
    writer.write(f, name, arr)


# --------------------------------------------------------------------------- load
class _Tensors:
    """Name -> (file, TensorInfo) over one or several (sharded) files."""

    def __init__(self, files: list[SafetensorsFile]) -> None:
        self.files = files
        self.where: dict[str, SafetensorsFile] = {}
        for f in files:
            for name in f.tensors:
                if name in self.where:
                    raise FormatError(
                        f"tensor {name!r} appears in both {self.where[name].path.name} and "
                        f"{f.path.name}"
                    )
                self.where[name] = f

    def info(self, name: str) -> TensorInfo | None:
        f = self.where.get(name)
        return None if f is None else f.tensors[name]

    def array(self, name: str) -> np.ndarray:
        return self.where[name].array(name)


def _shard_paths(path: Path) -> list[Path]:
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            return [path / s for s in _index_shards(index)]
        single = path / "model.safetensors"
        if single.is_file():
            return [single]
        raise FileNotFoundError(
            f"{path} holds neither model.safetensors nor model.safetensors.index.json"
        )
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    return [path]


def read_index(index: Path) -> dict[str, Any]:
    """A validated ``model.safetensors.index.json`` (its ``weight_map`` maps tensor
    names to shard file names in the same directory)."""
    size = index.stat().st_size
    if size > MAX_INDEX:
        raise FormatError(f"{index}: {size} bytes; an index is at most {MAX_INDEX} bytes")
    data = parse_json(index.read_bytes(), str(index))
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise FormatError(f"{index}: expected an object with a 'weight_map' of str -> str")
    for shard in set(wm.values()):
        if shard in ("", ".", "..") or Path(shard).name != shard or "\x00" in shard:
            raise FormatError(f"{index}: shard {shard!r:.200} must be a file name, not a path")
    return data


def _index_shards(index: Path) -> list[str]:
    return sorted(set(read_index(index)["weight_map"].values()))


def _read_config(f: SafetensorsFile) -> dict[str, dict[str, Any]]:
    text = f.metadata.get(METADATA_KEY)
    if text is None:
        return {}
    cfg = parse_json(text, f"{f.path.name}: metadata {METADATA_KEY!r}")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_NAME:
        raise FormatError(
            f"{f.path.name}: metadata {METADATA_KEY!r} must be an object with "
            f"format={FORMAT_NAME!r}"
        )
    version = cfg.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise FormatError(f"{f.path.name}: format_version must be an integer >= 1; got {version!r}")
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{f.path.name}: format_version {version} is newer than this qlinear reads "
            f"({FORMAT_VERSION}); upgrade qlinear"
        )
    layers = cfg.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise FormatError(f"{f.path.name}: config 'layers' must map names to objects")
    return layers


def _need(
    t: _Tensors, tname: str, dtypes: tuple[str, ...], shape: tuple[int, ...] | None, what: str
) -> TensorInfo:
    info = t.info(tname)
    if info is None:
        raise FormatError(f"tensor {tname!r} is missing; the layer's {what} needs it")
    if info.dtype not in dtypes:
        raise FormatError(
            f"tensor {tname!r} has dtype {info.dtype}; expected one of {list(dtypes)}"
        )
    if shape is not None and info.shape != shape:
        raise FormatError(
            f"tensor {tname!r} has shape {list(info.shape)}; expected {list(shape)} for the "
            "layer's config"
        )
    return info


def _build_layer(
    name: str, cfg: dict[str, Any], t: _Tensors, backend: str | None, verify: bool
) -> tuple[QuantizedLinear, list[str]]:
    """One layer from its config entry and tensors; returns it and the tensor names used."""
    where = f"layer {name!r}"
    try:
        qtype = QuantizationType(cfg.get("qtype"))
        scheme = QuantizationScheme(cfg.get("scheme"))
        gran = QuantizationGranularity(cfg.get("granularity"))
    except ValueError as exc:
        raise FormatError(f"{where}: bad config value ({exc})") from None
    if not qtype.is_integer:
        raise FormatError(f"{where}: qtype {qtype.value!r} is not a quantized type")
    shape = cfg.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise FormatError(f"{where}: config 'shape' must be [out, in] > 0; got {shape!r}")
    out_f, in_f = shape
    gs = cfg.get("group_size")
    if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0):
        raise FormatError(
            f"{where}: config 'group_size' must be a positive int or null; got {gs!r}"
        )
    try:
        pshape = param_shape(gran, out_f, in_f, gs)
    except QuantizationError as exc:
        raise FormatError(f"{where}: {exc}") from None
    used: list[str] = []
    if qtype is QuantizationType.INT4:
        if t.info(f"{name}.weight") is not None:
            raise FormatError(f"tensor {name + '.weight'!r} present but {where} is int4 (packed)")
        wname = f"{name}.weight_packed"
        _need(t, wname, ("U8",), (out_f, packed_cols(in_f)), "packed int4 codes")
        sname = f"{name}.weight_shape"
        _need(t, sname, ("I64", "I32"), (2,), "weight shape")
        stored_shape = [int(v) for v in t.array(sname)]
        if stored_shape != shape:
            raise FormatError(
                f"tensor {sname!r} says {stored_shape} but the config of {where} says {shape}"
            )
        used += [wname, sname]
    else:
        if t.info(f"{name}.weight_packed") is not None:
            raise FormatError(f"tensor {name + '.weight_packed'!r} present but {where} is int8")
        wname = f"{name}.weight"
        _need(t, wname, ("I8",), (out_f, in_f), "int8 codes")
        used.append(wname)
    scname = f"{name}.weight_scale"
    _need(t, scname, FLOAT_DTYPES, pshape, "scale")
    scale = t.array(scname).astype(np.float64)
    used.append(scname)
    zname = f"{name}.weight_zero_point"
    if scheme is QuantizationScheme.ASYMMETRIC:
        _need(t, zname, INT_DTYPES, pshape, "zero point (asymmetric)")
        zp = t.array(zname).astype(np.int64)
        used.append(zname)
    else:
        if t.info(zname) is not None:
            raise FormatError(f"tensor {zname!r} present but {where} is symmetric")
        zp = np.zeros(pshape, dtype=np.int64)
    qmin, qmax = code_range(qtype, scheme)
    # The range the codes cover (informational), clipped to float64: scales near its max
    # (which save writes) must not overflow it to Inf.
    big = np.finfo(np.float64).max
    with np.errstate(over="ignore", invalid="ignore"):
        lo = np.clip((qmin - zp) * scale, -big, big)
        hi = np.clip((qmax - zp) * scale, -big, big)
    try:
        params = QuantizationParams(qtype, scheme, gran, scale, zp, lo, hi, gs)
    except QuantizationError as exc:
        raise FormatError(f"{where} ({scname!r} / {zname!r}): {exc}") from None
    bias = None
    bname = f"{name}.bias"
    has_bias = cfg.get("bias")
    if has_bias is not None and not isinstance(has_bias, bool):
        raise FormatError(f"{where}: config 'bias' must be true, false or absent; got {has_bias!r}")
    if has_bias and t.info(bname) is None:
        raise FormatError(
            f"tensor {bname!r} is missing but the config of {where} says it has a bias "
            "(in a sharded checkpoint, load the directory)"
        )
    if has_bias is False and t.info(bname) is not None:
        raise FormatError(f"tensor {bname!r} present but the config of {where} says no bias")
    if t.info(bname) is not None:
        _need(t, bname, FLOAT_DTYPES, (out_f,), "bias")
        bias = t.array(bname)
        if not np.all(np.isfinite(bias)):
            raise FormatError(f"tensor {bname!r} holds NaN or Inf")
        used.append(bname)
    stored = t.array(wname)
    if verify:
        _verify_codes(wname, stored, qtype, scheme, in_f)
    layer = QuantizedLinear._from_stored(stored, params, in_f, bias, backend, lazy=True)
    return layer, used


def _verify_codes(
    wname: str,
    stored: np.ndarray,
    qtype: QuantizationType,
    scheme: QuantizationScheme,
    in_f: int,
) -> None:
    qmin, qmax = code_range(qtype, scheme)
    off = storage_offset(qtype, scheme)
    if qtype is QuantizationType.INT4:
        if in_f % 2 and np.any(stored[:, -1] >> 4):
            raise FormatError(f"tensor {wname!r}: padding nibbles of odd rows must be 0")
        codes = unpack_int4(stored, in_f).astype(np.int16) - off
    else:
        codes = stored
    lo, hi = int(codes.min()), int(codes.max())
    if lo < qmin or hi > qmax:
        raise FormatError(
            f"tensor {wname!r}: codes range from {lo} to {hi}; expected [{qmin}, {qmax}] "
            f"for {qtype.value} {scheme.value}"
        )


def _open_all(path: str | os.PathLike[str], mmap: bool = True) -> _Tensors:
    return _Tensors([SafetensorsFile(p, mmap=mmap) for p in _shard_paths(Path(path))])


def load(
    path: str | os.PathLike[str],
    *,
    backend: str | None = None,
    verify: bool = False,
    mmap: bool = True,
) -> dict[str, Item]:
    """Load layers and arrays written by :func:`save` (or by ``quantize_checkpoint``).

    Args:
        path: a ``.safetensors`` file, or a directory with ``model.safetensors`` or
            ``model.safetensors.index.json`` and its shards (loaded as one mapping).
        backend: kernel backend for the layers (default: the active one).
        verify: also read every code and check it lies in its code range (touches all
            the data; off by default so that loading stays O(number of tensors)).
        mmap: memory-map the files (default): loading costs time proportional to the
            number of tensors, and a file truncated or rewritten while mapped raises
            FormatError "file changed on disk" at the next access that would read it
            (the first forward, dequantize, qweight) instead of killing the process
            with SIGBUS; plain arrays returned are views of the mapping, which only
            ``mmap=False`` protects. ``mmap=False`` reads every file into memory.

    Returns:
        name -> :class:`QuantizedLinear` for every layer in the file's config, and
        name -> read-only array for every other tensor (a view of the mapping; BF16 is
        widened to float32). Codes are memory-mapped, not copied (NumPy backend).

    Raises:
        FormatError: a malformed file (truncated, bad header, unknown dtype, offsets that
            overlap or leave the file, a quantized weight without its scale, shapes or
            dtypes that disagree with the config, a future format version), naming the
            tensor or field; never another exception type for a file's contents (see
            docs/reliability.md).
        FileNotFoundError: no such file or shard.
    """
    t = _open_all(path, mmap)
    configs: dict[str, dict[str, Any]] = {}
    for f in t.files:
        for lname, cfg in _read_config(f).items():
            if lname in configs and configs[lname] != cfg:
                raise FormatError(f"layer {lname!r} is configured differently in two shards")
            configs[lname] = cfg
    result: dict[str, Item] = {}
    claimed: set[str] = set()
    for lname, cfg in configs.items():
        layer, used = _build_layer(lname, cfg, t, backend, verify)
        result[lname] = layer
        claimed.update(used)
    for tname, f in t.where.items():
        if tname in claimed:
            continue
        if tname in result:
            raise FormatError(f"tensor {tname!r} has the same name as a quantized layer")
        result[tname] = f.array(tname)
    return result


# --------------------------------------------------------------------------- inspect
@dataclass(frozen=True)
class FileInfo:
    """What :func:`inspect` reports: the header, without reading tensor data."""

    path: str
    format_version: int | None
    layers: dict[str, dict[str, Any]]
    tensors: dict[str, tuple[str, tuple[int, ...], int]]  # name -> (dtype, shape, nbytes)
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(nb for _, _, nb in self.tensors.values())

    def layer_nbytes(self, name: str) -> int:
        """Bytes of every tensor that stores layer ``name``."""
        return sum(self.tensors[name + s][2] for s in LAYER_SUFFIXES if name + s in self.tensors)


def inspect(path: str | os.PathLike[str]) -> FileInfo:
    """Header information of a file or sharded directory: format version, layer configs,
    tensor dtypes/shapes/sizes and user metadata. Validates the headers like :func:`load`
    but does not build layers or touch tensor data."""
    t = _open_all(path)
    layers: dict[str, dict[str, Any]] = {}
    version = None
    meta: dict[str, str] = {}
    for f in t.files:
        cfg = _read_config(f)
        if METADATA_KEY in f.metadata:
            version = parse_json(f.metadata[METADATA_KEY], METADATA_KEY)["format_version"]
        layers.update(cfg)
        meta.update({k: v for k, v in f.metadata.items() if k != METADATA_KEY})
    tensors = {n: (i.dtype, i.shape, i.nbytes) for n, f in t.where.items() for i in [f.tensors[n]]}
    return FileInfo(str(path), version, layers, tensors, meta, [str(f.path) for f in t.files])
