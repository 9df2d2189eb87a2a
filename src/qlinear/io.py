"""Save and load quantized layers: ``save`` / ``load`` / ``inspect`` over the formats in
:mod:`qlinear.formats`.

``save`` writes compressed-tensors by default (``format="compressed-tensors"``: the
layout vLLM and transformers load; ``docs/format.md``) or qlinear's own layout
(``format="qlinear"``: float64 scales, partial groups; bit-identical round trips).
``load`` reads either, compressed-tensors checkpoints written by other tools, and GGUF.

:func:`load` memory-maps safetensors files: codes are views of the mapping (no copy with
the NumPy backend, int4 and qlinear int8), so loading costs time proportional to the
number of tensors, not their size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from ._safetensors import SafetensorsWriter, atomic_write, dtype_name
from .errors import InvalidInputError
from .formats import LoadInfo, _is_gguf, describe, read
from .formats import compressed_tensors as ct
from .formats import qlinear_format as qf
from .formats._files import read_index
from .formats._spec import LayerSpec
from .linear import QuantizedLinear

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "FileInfo",
    "LoadInfo",
    "atomic_write_text",
    "inspect",
    "load",
    "load_with_info",
    "read_index",
    "save",
]

FORMAT_VERSION = qf.FORMAT_VERSION
METADATA_KEY = qf.METADATA_KEY
LAYER_SUFFIXES = qf.LAYER_SUFFIXES
SAVE_FORMATS = ("compressed-tensors", "qlinear")
layer_tensors = qf.layer_tensors  # qlinear-format tensors of a layer (sizes, tests)

Item = Union[QuantizedLinear, np.ndarray]  # noqa: UP007 (runtime alias on Python 3.10)


# --------------------------------------------------------------------------- save
def _scale_dtype_for(layer: QuantizedLinear, scale_dtype: str | None) -> str:
    if scale_dtype is not None:
        return scale_dtype
    s = layer.scales
    return "F32" if np.array_equal(s.astype(np.float32).astype(np.float64), s) else "F64"


def save(
    path: str | os.PathLike[str],
    layers: Mapping[str, Item],
    metadata: Mapping[str, str] | None = None,
    *,
    format: str = "compressed-tensors",
    scale_dtype: str | None = None,
    activations: Mapping[str, str] | str | None = None,
) -> None:
    """Write layers and arrays to one safetensors file, atomically.

    Args:
        path: destination file (conventionally ``*.safetensors``); replaced atomically:
            written to a temporary file in the same directory, fsynced, then renamed, so
            an interrupted save leaves the old file (or none) and no partial file.
        layers: name -> :class:`QuantizedLinear`, or name -> array (bool, int or
            float16/32/64, any shape), stored as it is.
        metadata: extra str -> str pairs for the file's ``__metadata__`` (the keys
            ``"qlinear"``, ``"quantization_config"`` and ``"qlinear_code_range"`` are
            reserved).
        format: ``"compressed-tensors"`` (default): ``name.weight_packed`` (I32) +
            ``name.weight_shape`` + ``name.weight_scale`` (+ ``name.weight_zero_point``),
            or int-quantized ``name.weight`` (I8) for W8A8 layers; the
            ``quantization_config`` goes into ``__metadata__["quantization_config"]``
            (put it into a model's config.json for transformers / vLLM;
            ``quantize_checkpoint`` does). Layers with a partial last group cannot be
            stored in it. ``"qlinear"``: qlinear's own layout (``docs/format.md``).
        scale_dtype: compressed-tensors only: ``"F32"``, ``"BF16"``, ``"F16"`` or
            ``"F64"``; the layer's scales must be representable in it (calibrate
            against :func:`qlinear.formats.compressed_tensors.round_scale`). Default:
            per layer, F32 when that is lossless, else F64.
        activations: compressed-tensors only: the default activation mode recorded for
            every layer (a str) or per layer name: ``"float"`` (weight-only) or ``"int8"``
            (W8A8: int-quantized with dynamic per-token int8 activations).

    Raises:
        InvalidInputError: a name that is not a non-empty string, a value of another
            type, an unstorable dtype, two items that produce the same tensor name, an
            array named inside a layer's tensor names (``name.bias`` beside a layer
            ``name``, ...), bad metadata, an unknown format.
        FormatError: a layer the chosen format cannot hold (partial last group, scales
            not representable in ``scale_dtype``).
    """
    if format not in SAVE_FORMATS:
        raise InvalidInputError(f"format must be one of {SAVE_FORMATS}; got {format!r}")
    if not isinstance(layers, Mapping):
        raise InvalidInputError(f"layers must be a mapping name -> layer; got {type(layers)}")
    meta: dict[str, str] = {}
    reserved = (METADATA_KEY, ct.CONFIG_KEY, ct.CODE_RANGE_KEY)
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidInputError(f"metadata must map str to str; got {k!r}: {v!r:.40}")
        if k in reserved:
            raise InvalidInputError(f"metadata key {k!r} is reserved by qlinear")
        meta[k] = v
    if scale_dtype is not None and scale_dtype not in (*ct.SCALE_DTYPES, "F64"):
        raise InvalidInputError(
            f"scale_dtype must be one of {[*ct.SCALE_DTYPES, 'F64']}; got {scale_dtype!r}"
        )
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    config: dict[str, dict[str, Any]] = {}
    specs: dict[str, LayerSpec] = {}

    def put(tname: str, arr: np.ndarray, owner: str, dtype: str | None = None) -> None:
        if tname in tensors:
            raise InvalidInputError(
                f"tensor name {tname!r} (from {owner!r}) is produced twice; rename one item"
            )
        tensors[tname] = arr
        dtypes[tname] = dtype or dtype_name(arr.dtype)

    for name, item in layers.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise InvalidInputError(f"layer names must be non-empty strings; got {name!r}")
        if isinstance(item, QuantizedLinear):
            if format == "qlinear":
                config[name] = qf.layer_config(LayerSpec.of(item))
                for tname, arr in qf.layer_tensors(name, item).items():
                    put(tname, arr, name)
                continue
            act = (
                activations.get(name, "float")
                if isinstance(activations, Mapping)
                else (activations or "float")
            )
            if act not in ("float", "int8"):
                raise InvalidInputError(f"activations of {name!r} must be 'float' or 'int8'")
            sd = _scale_dtype_for(item, scale_dtype)
            specs[name] = LayerSpec.of(item, act)
            for tname, arr in ct.layer_tensors(name, item, sd, act).items():
                put(tname, arr, name, sd if tname.endswith(".weight_scale") else None)
        elif isinstance(item, np.ndarray):
            dtype_name(item.dtype)  # raises for unstorable dtypes
            put(name, item, name)
        else:
            raise InvalidInputError(
                f"item {name!r} must be a QuantizedLinear or a numpy array; got "
                f"{type(item).__name__}"
            )
    owners = config if format == "qlinear" else specs
    for name, item in layers.items():
        # An array inside a layer's namespace (say "fc.bias" beside a layer "fc" without
        # a bias) would be read back as part of that layer, and load would reject the file.
        owner = next((name[: -len(s)] for s in LAYER_SUFFIXES if name.endswith(s)), None)
        if isinstance(item, np.ndarray) and owner in owners:
            raise InvalidInputError(
                f"array {name!r} is inside the tensor names of layer {owner!r} "
                f"({', '.join(owner + s for s in LAYER_SUFFIXES)}); expected another name"
            )
    if format == "qlinear":
        meta[METADATA_KEY] = qf.format_config(config)
    elif specs:
        ignore = [
            n[: -len(".weight")]
            for n, a in layers.items()
            if isinstance(a, np.ndarray) and n.endswith(".weight") and a.ndim == 2
        ]
        meta[ct.CONFIG_KEY] = json.dumps(ct.config_dict(specs, ignore), separators=(",", ":"))
        meta[ct.CODE_RANGE_KEY] = "narrow"
    entries = [(n, dtypes[n], a.shape) for n, a in tensors.items()]
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
def load(
    path: str | os.PathLike[str],
    *,
    backend: str | None = None,
    verify: bool = False,
    mmap: bool = True,
) -> dict[str, Any]:
    """Load layers and arrays from a file or checkpoint directory in any format qlinear
    reads: qlinear's own, compressed-tensors (pack-quantized int4/int8, int-quantized,
    naive-quantized; written by qlinear, compressed-tensors or llm-compressor) and GGUF.

    Args:
        path: a ``.safetensors`` file, a directory with ``model.safetensors`` or
            ``model.safetensors.index.json`` and its shards (loaded as one mapping; a
            compressed-tensors config is read from ``config.json`` there), or a ``.gguf``
            file.
        backend: kernel backend for the layers (default: the active one).
        verify: also read every code and check it lies in its code range (touches all
            the data; off by default so that loading stays O(number of tensors)).
        mmap: memory-map safetensors files (default): loading costs time proportional to
            the number of tensors, and a file truncated or rewritten while mapped raises
            FormatError "file changed on disk" at the next access that would read it
            (the first forward, dequantize, qweight) instead of killing the process
            with SIGBUS; plain arrays returned are views of the mapping, which only
            ``mmap=False`` protects. ``mmap=False`` reads every file into memory.

    Returns:
        name -> :class:`QuantizedLinear` for every quantized layer (GGUF Q4_1:
        :class:`qlinear.offset_linear.OffsetLinear`), and name -> read-only array for
        every other tensor (a view of the mapping; BF16 is widened to float32). W8A8
        layers default to int8 activations: :func:`load_with_info` returns each layer's
        mode.

    Raises:
        FormatError: a malformed file (truncated, bad header, unknown dtype, offsets that
            overlap or leave the file, a quantized weight without its scale, shapes or
            dtypes that disagree with the config, a future format version, an unknown
            compressed-tensors format, strategy or config key), naming the tensor or field;
            never another exception type for a file's contents (docs/reliability.md).
        FileNotFoundError: no such file or shard.
    """
    return read(path, backend=backend, verify=verify, mmap=mmap)[0]


def load_with_info(
    path: str | os.PathLike[str], *, backend: str | None = None, verify: bool = False
) -> tuple[dict[str, Any], LoadInfo]:
    """:func:`load`, plus a :class:`~qlinear.formats.LoadInfo`: the format, each layer's
    default activation mode (``"int8"`` for W8A8 checkpoints), layer configs and notes."""
    return read(path, backend=backend, verify=verify)


# --------------------------------------------------------------------------- inspect
@dataclass(frozen=True)
class FileInfo:
    """What :func:`inspect` reports: the header, without reading tensor data."""

    path: str
    format_version: int | str | None
    layers: dict[str, dict[str, Any]]
    tensors: dict[str, tuple[str, tuple[int, ...], int]]  # name -> (dtype, shape, nbytes)
    metadata: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    format: str = "qlinear"

    @property
    def nbytes(self) -> int:
        return sum(nb for _, _, nb in self.tensors.values())

    def layer_tensor_names(self, name: str) -> list[str]:
        """The tensors that store layer ``name``."""
        suffixes = (*LAYER_SUFFIXES, ".weight_g_idx")
        return [name + s for s in suffixes if name + s in self.tensors]

    def layer_nbytes(self, name: str) -> int:
        """Bytes of every tensor that stores layer ``name``."""
        return sum(self.tensors[n][2] for n in self.layer_tensor_names(name))


def inspect(path: str | os.PathLike[str]) -> FileInfo:
    """Header information of a file or sharded directory: format, version, layer configs,
    tensor dtypes/shapes/sizes and user metadata. Validates the headers like :func:`load`
    but does not build layers or touch tensor data (GGUF: see ``qlinear.formats.gguf``)."""
    p = Path(path)
    if p.is_file() and _is_gguf(p):
        from .formats import gguf

        return gguf.inspect(p)
    fmt, layers, version, t = describe(p)
    reserved = (METADATA_KEY, ct.CONFIG_KEY, ct.CODE_RANGE_KEY)
    meta: dict[str, str] = {}
    for f in t.files:
        meta.update({k: v for k, v in f.metadata.items() if k not in reserved})
    tensors = {n: (i.dtype, i.shape, i.nbytes) for n, f in t.where.items() for i in [f.tensors[n]]}
    if fmt not in ("qlinear", "compressed-tensors"):
        fmt, version = "safetensors", None
    return FileInfo(str(path), version, layers, tensors, meta, [str(f.path) for f in t.files], fmt)
