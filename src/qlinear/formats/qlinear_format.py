"""qlinear's own safetensors layout (format version 1): the schema of one layer.

For a layer called ``name`` (``docs/format.md`` has the full specification):

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

The file's ``__metadata__["qlinear"]`` holds ``{"format": "qlinear", "format_version": 1,
"layers": {name: {"qtype", "scheme", "granularity", "group_size", "shape", "bias"}}}``.
This layout keeps float64 scales and partial last groups, so ``load(save(x))`` is
bit-identical for every layer qlinear can build.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._safetensors import FLOAT_DTYPES, SafetensorsFile, parse_json
from ..errors import FormatError, QuantizationError
from ..linear import QuantizedLinear
from ..packing import packed_cols, unpack_int4
from ..params import QuantizationParams, param_shape
from ..qtypes import (
    QuantizationGranularity,
    QuantizationScheme,
    QuantizationType,
    code_range,
    storage_offset,
)
from ._files import TensorSet, need
from ._spec import LayerSpec

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYER_SUFFIXES",
    "METADATA_KEY",
    "build_layer",
    "entries",
    "format_config",
    "layer_config",
    "layer_tensors",
    "param_tensors",
    "read_config",
]

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


# --------------------------------------------------------------------------- writing
def codes_name(name: str, spec: LayerSpec) -> str:
    return f"{name}.weight_packed" if spec.int4 else f"{name}.weight"


def entries(name: str, spec: LayerSpec, bias_dtype: str | None = None) -> list[tuple]:
    """``(tensor name, dtype, shape)`` of every tensor of the layer except its bias
    (``bias_dtype`` given: the bias too)."""
    out_f, in_f = spec.shape
    if spec.int4:
        ents = [
            (f"{name}.weight_packed", "U8", (out_f, packed_cols(in_f))),
            (f"{name}.weight_shape", "I64", (2,)),
        ]
    else:
        ents = [(f"{name}.weight", "I8", (out_f, in_f))]
    ents.append((f"{name}.weight_scale", "F64", spec.param_shape))
    if spec.asymmetric:
        ents.append((f"{name}.weight_zero_point", "I8", spec.param_shape))
    if bias_dtype is not None and spec.bias:
        ents.append((f"{name}.bias", bias_dtype, (out_f,)))
    return ents


def stored_codes(layer: QuantizedLinear) -> np.ndarray:
    """The codes tensor of a layer (or a row block of one) as stored: row-local."""
    return layer.stored_weight


def param_tensors(
    name: str, spec: LayerSpec, scale: np.ndarray, zero_point: np.ndarray
) -> dict[str, np.ndarray]:
    """Scale (float64) and, for asymmetric layers, zero point (int8); plus the int4
    ``weight_shape``."""
    out = {f"{name}.weight_scale": np.asarray(scale, dtype=np.float64)}
    if spec.asymmetric:
        out[f"{name}.weight_zero_point"] = np.asarray(zero_point).astype(np.int8)
    if spec.int4:
        out[f"{name}.weight_shape"] = np.array(spec.shape, dtype=np.int64)
    return out


def bias_array(b: np.ndarray) -> np.ndarray:
    """float32 when that is lossless (a float32 bias widened to float64 on the way in)."""
    b32 = b.astype(np.float32)
    return b32 if np.array_equal(b32.astype(np.float64), b) else b


def layer_tensors(name: str, layer: QuantizedLinear) -> dict[str, np.ndarray]:
    """The tensors that store ``layer`` under ``name`` (stored codes are not copied)."""
    spec = LayerSpec.of(layer)
    out = {codes_name(name, spec): stored_codes(layer)}
    out.update(param_tensors(name, spec, layer.scales, layer.zero_points))
    if layer.bias is not None:
        out[f"{name}.bias"] = bias_array(layer.bias)
    return out


def layer_config(spec: LayerSpec) -> dict[str, Any]:
    """The per-layer entry of the JSON quantization config."""
    return {
        "qtype": spec.qtype.value,
        "scheme": spec.scheme.value,
        "granularity": spec.granularity.value,
        "group_size": spec.group_size,
        "shape": list(spec.shape),
        "bias": spec.bias,
    }


def format_config(layers: Mapping[str, Mapping[str, Any]]) -> str:
    """The JSON string stored under ``__metadata__["qlinear"]``."""
    return json.dumps(
        {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "layers": dict(layers)},
        separators=(",", ":"),
    )


# --------------------------------------------------------------------------- reading
def is_config(text: str | None) -> bool:
    """True when a ``__metadata__["qlinear"]`` value is this format's config."""
    if text is None:
        return False
    try:
        cfg = parse_json(text, METADATA_KEY)
    except FormatError:
        return True  # read_config reports it
    return not isinstance(cfg, dict) or cfg.get("format") in (FORMAT_NAME, None)


def read_config(f: SafetensorsFile) -> tuple[int | None, dict[str, dict[str, Any]]]:
    """``(format_version, layers)`` of one file (``(None, {})`` without a config)."""
    text = f.metadata.get(METADATA_KEY)
    if text is None:
        return None, {}
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
    return version, layers


def _spec_from_config(name: str, cfg: dict[str, Any]) -> LayerSpec:
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
    gs = cfg.get("group_size")
    if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0):
        raise FormatError(
            f"{where}: config 'group_size' must be a positive int or null; got {gs!r}"
        )
    has_bias = cfg.get("bias")
    if has_bias is not None and not isinstance(has_bias, bool):
        raise FormatError(f"{where}: config 'bias' must be true, false or absent; got {has_bias!r}")
    try:
        param_shape(gran, shape[0], shape[1], gs)
    except QuantizationError as exc:
        raise FormatError(f"{where}: {exc}") from None
    return LayerSpec(qtype, scheme, gran, gs, (shape[0], shape[1]), bool(has_bias))


def build_layer(
    name: str, cfg: dict[str, Any], t: TensorSet, backend: str | None, verify: bool
) -> tuple[QuantizedLinear, list[str]]:
    """One layer from its config entry and tensors; returns it and the tensor names used."""
    where = f"layer {name!r}"
    spec = _spec_from_config(name, cfg)
    out_f, in_f = spec.shape
    pshape = spec.param_shape
    used: list[str] = []
    if spec.int4:
        if t.info(f"{name}.weight") is not None:
            raise FormatError(f"tensor {name + '.weight'!r} present but {where} is int4 (packed)")
        wname = f"{name}.weight_packed"
        need(t, wname, ("U8",), (out_f, packed_cols(in_f)), "packed int4 codes")
        sname = f"{name}.weight_shape"
        need(t, sname, ("I64", "I32"), (2,), "weight shape")
        stored_shape = [int(v) for v in t.array(sname)]
        if stored_shape != list(spec.shape):
            raise FormatError(
                f"tensor {sname!r} says {stored_shape} but the config of {where} says "
                f"{list(spec.shape)}"
            )
        used += [wname, sname]
    else:
        if t.info(f"{name}.weight_packed") is not None:
            raise FormatError(f"tensor {name + '.weight_packed'!r} present but {where} is int8")
        wname = f"{name}.weight"
        need(t, wname, ("I8",), (out_f, in_f), "int8 codes")
        used.append(wname)
    scname = f"{name}.weight_scale"
    need(t, scname, FLOAT_DTYPES, pshape, "scale")
    scale = t.array(scname).astype(np.float64)
    used.append(scname)
    zname = f"{name}.weight_zero_point"
    if spec.asymmetric:
        need(t, zname, INT_DTYPES, pshape, "zero point (asymmetric)")
        zp = t.array(zname).astype(np.int64)
        used.append(zname)
    else:
        if t.info(zname) is not None:
            raise FormatError(f"tensor {zname!r} present but {where} is symmetric")
        zp = np.zeros(pshape, dtype=np.int64)
    params = make_params(spec, scale, zp, f"{where} ({scname!r} / {zname!r})")
    bname = f"{name}.bias"
    has_bias = cfg.get("bias")
    if has_bias and t.info(bname) is None:
        raise FormatError(
            f"tensor {bname!r} is missing but the config of {where} says it has a bias "
            "(in a sharded checkpoint, load the directory)"
        )
    if has_bias is False and t.info(bname) is not None:
        raise FormatError(f"tensor {bname!r} present but the config of {where} says no bias")
    bias = read_bias(t, bname, out_f)
    if bias is not None:
        used.append(bname)
    stored = t.array(wname)
    if verify:
        verify_codes(wname, stored, spec.qtype, spec.scheme, in_f)
    layer = QuantizedLinear._from_stored(stored, params, in_f, bias, backend, lazy=True)
    return layer, used


def make_params(
    spec: LayerSpec, scale: np.ndarray, zp: np.ndarray, where: str
) -> QuantizationParams:
    """QuantizationParams of a stored layer; FormatError naming ``where`` when the
    scale or zero point is invalid (<= 0, not finite, zero point out of range)."""
    qmin, qmax = code_range(spec.qtype, spec.scheme)
    # The range the codes cover (informational), clipped to float64: scales near its max
    # (which save writes) must not overflow it to Inf.
    big = np.finfo(np.float64).max
    with np.errstate(over="ignore", invalid="ignore"):
        lo = np.clip((qmin - zp) * scale, -big, big)
        hi = np.clip((qmax - zp) * scale, -big, big)
    try:
        return QuantizationParams(
            spec.qtype, spec.scheme, spec.granularity, scale, zp, lo, hi, spec.group_size
        )
    except QuantizationError as exc:
        raise FormatError(f"{where}: {exc}") from None


def read_bias(t: TensorSet, bname: str, out_f: int) -> np.ndarray | None:
    """The bias tensor ``bname`` if present (float, ``(out,)``, finite), else None."""
    if t.info(bname) is None:
        return None
    need(t, bname, FLOAT_DTYPES, (out_f,), "bias")
    bias = t.array(bname)
    if not np.all(np.isfinite(bias)):
        raise FormatError(f"tensor {bname!r} holds NaN or Inf")
    return bias


def verify_codes(
    wname: str,
    stored: np.ndarray,
    qtype: QuantizationType,
    scheme: QuantizationScheme,
    in_f: int,
) -> None:
    """FormatError unless every stored code lies in the code range (and int4 padding
    nibbles are 0)."""
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
