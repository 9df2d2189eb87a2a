"""compressed-tensors checkpoints (the format vLLM, transformers and llm-compressor read).

The tensors of one quantized linear layer ``name`` (weight ``(out, in)``, ``b`` bits):

==========================  =====  =======================================  ==================
tensor                      dtype  shape                                    format
==========================  =====  =======================================  ==================
``name.weight_packed``      I32    ``(out, ceil(in * b / 32))``             pack-quantized
``name.weight_shape``       I64    ``(2,)`` = ``[out, in]``                 pack-quantized
``name.weight``             I8     ``(out, in)``                            int-/naive-quantized
``name.weight_scale``       model  ``(1,)`` / ``(out, 1)`` / ``(out, G)``   tensor/channel/group
``name.weight_zero_point``  I32    ``(ceil(out * b / 32), G)``              pack, asymmetric
``name.weight_zero_point``  I8     same as the scale                        int/naive, asym.
==========================  =====  =======================================  ==================

Values ``v`` are signed, in ``[-2^(b-1), 2^(b-1) - 1]``; packing stores ``v + 2^(b-1)``
in ``b`` bits, ``32 / b`` values per int32, lowest bits first, along the input dimension
(zero points: along the output dimension). ``W = (v - zp) * scale``. config.json holds
``quantization_config`` (``quant_method: "compressed-tensors"``, ``config_groups`` of
``targets`` + QuantizationArgs, ``ignore``, ``format``, ``quantization_status``).

How qlinear's layers map onto this:

* int4: qlinear's packed U8 nibbles *are* the int32 words' bytes (nibble = ``v + 8``):
  symmetric qlinear codes -7..7 are ``v``; asymmetric codes 0..15 are ``v + 8`` and zero
  points 0..15 are ``zp + 8``. int8: codes and zero points are ``v`` and ``zp``.
* A file written by another tool may hold ``v = -8`` (int4) or ``-128`` (int8) in a
  symmetric layer (its scale is ``amax / 7.5``, ``amax / 127.5``), which qlinear's
  symmetric ranges exclude; such a layer loads as an *asymmetric* qlinear layer with the
  same dequantized weight (zero point 8 for int4, 0 for int8). Files qlinear writes carry
  ``__metadata__["qlinear_code_range"] = "narrow"`` and load back as they were saved.
* Weight-only layers are written pack-quantized (4 and 8 bits: what ``W4A16`` and
  ``W8A16`` presets produce, and what transformers and vLLM read as weight-only);
  layers whose default activation mode is ``"int8"`` are written int-quantized with dynamic
  per-token int8 input activations (``W8A8``).
* compressed-tensors has no partial last group: :func:`writable_spec` picks the largest
  group size that divides ``in`` and is a multiple of 8 (576 with 128: 64), per layer.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .._safetensors import FLOAT_DTYPES
from ..errors import FormatError
from ..linear import QuantizedLinear
from ..packing import pack_int4, packed_cols
from ..qtypes import QuantizationGranularity, QuantizationScheme, QuantizationType
from ._files import TensorSet, need
from ._spec import LayerSpec
from .compressed_tensors_config import (
    BITS,
    CODE_RANGE_KEY,
    CONFIG_KEY,
    CT_VERSION,
    FORMATS,
    INT,
    NAIVE,
    PACK,
    QUANT_METHOD,
    CompressedTensorsConfig,
    Scheme,
    WeightArgs,
    _format_of,
    config_dict,
    config_from_json_text,
    parse_config,
)
from .qlinear_format import make_params, read_bias, verify_codes

__all__ = [
    "CODE_RANGE_KEY",
    "CONFIG_KEY",
    "CT_VERSION",
    "FORMATS",
    "NAIVE",
    "QUANT_METHOD",
    "SCALE_DTYPES",
    "CompressedTensorsConfig",
    "Scheme",
    "WeightArgs",
    "build_layer",
    "config_dict",
    "config_from_json_text",
    "entries",
    "fitting_group_size",
    "pack_rows",
    "param_tensors",
    "parse_config",
    "round_scale",
    "stored_codes",
    "unpack_rows",
    "writable_spec",
]

SCALE_DTYPES = ("F32", "BF16", "F16")


# --------------------------------------------------------------------------- packing
def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 ``(rows, cols)`` of unsigned ``bits``-bit values -> int32
    ``(rows, ceil(cols * bits / 32))``: ``32 / bits`` values per word, lowest bits first
    (the last word of a row padded with zeros)."""
    per = 32 // bits
    rows, cols = values.shape
    words = -(-cols // per)
    padded = np.zeros((rows, words * per), dtype=np.uint32)
    padded[:, :cols] = values
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    packed = np.bitwise_or.reduce(padded.reshape(rows, words, per) << shifts, axis=2)
    return packed.astype("<u4").view("<i4")


def unpack_rows(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: int32 ``(rows, words)`` -> uint8 ``(rows, cols)``."""
    per = 32 // bits
    u = np.ascontiguousarray(packed).view("<u4")
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    vals = (u[:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    return vals.reshape(u.shape[0], -1)[:, :cols].astype(np.uint8)


# --------------------------------------------------------------------------- scales
def round_scale(scale: np.ndarray, dtype: str) -> np.ndarray:
    """float64 scales rounded to the storage ``dtype`` (``"F32"``, ``"BF16"``, ``"F16"``,
    or ``"F64"``: unchanged), as float64; a positive scale below the dtype's smallest
    positive value becomes that value. Codes computed against these scales dequantize
    to exactly what a reader of the stored scales computes.

    Raises:
        FormatError: a scale beyond the dtype's range.
    """
    s = np.asarray(scale, dtype=np.float64)
    if dtype == "F64":
        return s
    with np.errstate(over="ignore"):
        if dtype == "F16":
            r = s.astype(np.float16).astype(np.float64)
            tiny = float(np.float16(2.0**-24))
        elif dtype == "F32":
            r = s.astype(np.float32).astype(np.float64)
            tiny = float(np.finfo(np.float32).smallest_subnormal)
        elif dtype == "BF16":
            r = _bf16_bits(s.astype(np.float32)).astype(np.uint32) << 16
            r = r.view(np.float32).astype(np.float64)
            tiny = 2.0**-133
        else:
            raise FormatError(f"scale dtype {dtype!r} is not one of {(*SCALE_DTYPES, 'F64')}")
    if not np.all(np.isfinite(r)):
        raise FormatError(
            f"a scale of {float(s.max()):.3g} does not fit in {dtype}; expected scales "
            "within the model dtype's range"
        )
    return np.where((r == 0) & (s > 0), tiny, r)


def _bf16_bits(x32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round half to even."""
    u = np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def scale_storage(scale: np.ndarray, dtype: str) -> np.ndarray:
    """Scales (already representable in ``dtype``) as the array to write."""
    s = np.asarray(scale, dtype=np.float64)
    if dtype == "F32":
        return s.astype(np.float32)
    if dtype == "F16":
        return s.astype(np.float16)
    if dtype == "BF16":
        return _bf16_bits(s.astype(np.float32))
    return s


# --------------------------------------------------------------------------- writing
def fitting_group_size(in_features: int, group_size: int) -> int | None:
    """The largest power of two <= ``group_size`` and >= 8 that divides ``in_features``
    (compressed-tensors needs whole groups; vLLM's group kernels take 32, 64 and 128), or
    None. 576 with 128 gives 64 (96 would divide 576 too, but no kernel takes it)."""
    g = 1 << (max(group_size, 1).bit_length() - 1)
    while g >= 8:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def writable_spec(
    spec: LayerSpec,
    name: str,
    *,
    strict: bool = False,
    hint: str = "drop --strict-group-size to use a group size that divides it, or write "
    "--format qlinear",
) -> LayerSpec:
    """``spec`` as this format can store it: a per-group layer whose ``in`` is not a
    multiple of its group size gets :func:`fitting_group_size` (per-channel if there is
    none). Raises FormatError for that case when ``strict``, and for int8 activations
    with int4 weights."""
    if spec.activations == "int8" and spec.qtype is not QuantizationType.INT8:
        raise FormatError(
            f"layer {name!r}: int8 activations (W8A8) need int8 weights; got {spec.qtype.value}"
        )
    if spec.granularity is not QuantizationGranularity.PER_GROUP:
        return spec
    in_f = spec.shape[1]
    gs = spec.group_size or in_f
    if in_f % gs == 0:
        return spec
    if strict:
        raise FormatError(
            f"layer {name!r}: in_features {in_f} is not a multiple of group size {gs}; "
            f"compressed-tensors has no partial groups ({hint})"
        )
    g = fitting_group_size(in_f, gs)
    if g is None:
        return replace(spec, granularity=QuantizationGranularity.PER_CHANNEL, group_size=None)
    return replace(spec, group_size=g)


def _ct_scale_shape(spec: LayerSpec) -> tuple[int, ...]:
    if spec.granularity is QuantizationGranularity.PER_CHANNEL:
        return (spec.shape[0], 1)
    return spec.param_shape


def _check_spec(spec: LayerSpec, name: str) -> None:
    if spec.granularity is QuantizationGranularity.PER_GROUP and spec.shape[1] % spec.group_size:
        raise FormatError(
            f"layer {name!r}: in_features {spec.shape[1]} is not a multiple of group size "
            f"{spec.group_size}; compressed-tensors has no partial groups (quantize with a "
            "group size that divides it, or save with format='qlinear')"
        )


def codes_name(name: str, spec: LayerSpec) -> str:
    return f"{name}.weight_packed" if _format_of(spec) == PACK else f"{name}.weight"


def entries(name: str, spec: LayerSpec, scale_dtype: str, bias_dtype: str | None = None):
    """``(tensor name, dtype, shape)`` of the layer's tensors (bias only with
    ``bias_dtype``)."""
    _check_spec(spec, name)
    out_f, in_f = spec.shape
    bits = BITS[spec.qtype]
    fmt = _format_of(spec)
    if fmt == PACK:
        ents = [
            (f"{name}.weight_packed", "I32", (out_f, -(-in_f * bits // 32))),
            (f"{name}.weight_shape", "I64", (2,)),
        ]
    else:
        ents = [(f"{name}.weight", "I8", (out_f, in_f))]
    sshape = _ct_scale_shape(spec)
    ents.append((f"{name}.weight_scale", scale_dtype, sshape))
    if spec.asymmetric:
        if fmt == PACK and spec.granularity is not QuantizationGranularity.PER_TENSOR:
            ents.append((f"{name}.weight_zero_point", "I32", (-(-out_f * bits // 32), sshape[1])))
        else:
            ents.append((f"{name}.weight_zero_point", "I8", sshape))
    if bias_dtype is not None and spec.bias:
        ents.append((f"{name}.bias", bias_dtype, (out_f,)))
    return ents


def stored_codes(layer: QuantizedLinear, spec: LayerSpec) -> np.ndarray:
    """The codes tensor of a layer (or a row block of one) in this format: row-local."""
    if _format_of(spec) == INT:
        return layer.qweight.astype(np.int8)
    if spec.int4:
        nib = layer.stored_weight  # U8 (rows, ceil(in/2)): the int32 words' bytes
        rows, nb = nib.shape
        words = -(-spec.shape[1] // 8)
        buf = np.zeros((rows, 4 * words), dtype=np.uint8)
        buf[:, :nb] = nib
        return buf.view("<i4")
    u = (layer.qweight.astype(np.int16) + 128).astype(np.uint8)
    return pack_rows(u, 8)


def _ct_zero_point(spec: LayerSpec, zp: np.ndarray) -> np.ndarray:
    """qlinear zero points -> compressed-tensors' signed values ``zp``."""
    z = np.asarray(zp, dtype=np.int64)
    return z - 8 if spec.int4 else z


def param_tensors(
    name: str, spec: LayerSpec, scale: np.ndarray, zero_point: np.ndarray, scale_dtype: str
) -> dict[str, np.ndarray]:
    """Scale (in ``scale_dtype``; the values must be representable there, see
    :func:`round_scale`), zero point, and ``weight_shape``."""
    _check_spec(spec, name)
    sshape = _ct_scale_shape(spec)
    rounded = round_scale(scale, scale_dtype)
    if not np.array_equal(rounded, scale):
        raise FormatError(
            f"layer {name!r}: its scales are not representable in {scale_dtype}; calibrate "
            f"against round_scale(scale, {scale_dtype!r}) or store them as F64"
        )
    out = {f"{name}.weight_scale": scale_storage(scale, scale_dtype).reshape(sshape)}
    if spec.asymmetric:
        ct = _ct_zero_point(spec, zero_point).reshape(sshape)
        bits = BITS[spec.qtype]
        if _format_of(spec) == PACK and spec.granularity is not QuantizationGranularity.PER_TENSOR:
            u = (ct + (1 << (bits - 1))).astype(np.uint8)
            out[f"{name}.weight_zero_point"] = np.ascontiguousarray(pack_rows(u.T, bits).T)
        else:
            out[f"{name}.weight_zero_point"] = ct.astype(np.int8)
    if _format_of(spec) == PACK:
        out[f"{name}.weight_shape"] = np.array(spec.shape, dtype=np.int64)
    return out


def layer_tensors(
    name: str, layer: QuantizedLinear, scale_dtype: str, activations: str = "float"
) -> dict[str, np.ndarray]:
    """Every tensor that stores ``layer`` under ``name``."""
    from .qlinear_format import bias_array

    spec = LayerSpec.of(layer, activations)
    writable_spec(
        spec,
        name,
        strict=True,
        hint="quantize with a group size that divides it, or save with format='qlinear'",
    )
    out = {codes_name(name, spec): stored_codes(layer, spec)}
    out.update(param_tensors(name, spec, layer.scales, layer.zero_points, scale_dtype))
    if layer.bias is not None:
        out[f"{name}.bias"] = bias_array(layer.bias)
    return out


# --------------------------------------------------------------------------- reading
def layer_names(t: TensorSet) -> list[str]:
    """Layers stored compressed in ``t``: a ``weight_packed``, or an integer ``weight``
    with a ``weight_scale`` beside it."""
    names = []
    for n, _f in t.where.items():
        if n.endswith(".weight_packed"):
            names.append(n[: -len(".weight_packed")])
        elif n.endswith(".weight_scale"):
            base = n[: -len(".weight_scale")]
            info = t.info(base + ".weight")
            if info is not None and info.dtype in ("I8", "I16", "I32", "U8"):
                names.append(base)
    return names


def build_layer(
    name: str,
    scheme: Scheme,
    t: TensorSet,
    backend: str | None,
    verify: bool,
    narrow_codes: bool,
) -> tuple[QuantizedLinear, list[str]]:
    """One layer from its tensors and config group; returns it and the tensor names used.
    ``narrow_codes``: the file promises qlinear's symmetric code ranges (-7..7, -127..127)."""
    where = f"layer {name!r} ({scheme.format}, config group {scheme.name!r})"
    a = scheme.weights
    bits = a.num_bits
    used: list[str] = []
    if scheme.format == PACK:
        if t.info(f"{name}.weight") is not None:
            raise FormatError(f"tensor {name + '.weight'!r} present beside {name}.weight_packed")
        sname = f"{name}.weight_shape"
        need(t, sname, ("I64", "I32"), (2,), f"weight shape of {where}")
        shape = [int(v) for v in t.array(sname)]
        if len(shape) != 2 or min(shape) <= 0:
            raise FormatError(f"tensor {sname!r} says {shape}; expected [out, in] > 0")
        out_f, in_f = shape
        wname = f"{name}.weight_packed"
        words = -(-in_f * bits // 32)
        need(t, wname, ("I32",), (out_f, words), f"packed codes of {where}")
        used += [wname, sname]
        packed = t.array(wname)
        raw = packed.view(np.uint8).reshape(out_f, 4 * words)  # a view (little-endian file)
        if bits == 4:
            nib = raw[:, : packed_cols(in_f)]
            stored = nib if nib.flags.c_contiguous else np.ascontiguousarray(nib)
        else:
            stored = (raw[:, :in_f] ^ np.uint8(0x80)).view(np.int8)
    else:
        wname = f"{name}.weight"
        info = need(t, wname, ("I8",), None, f"int codes of {where}")
        if len(info.shape) != 2 or 0 in info.shape:
            raise FormatError(f"tensor {wname!r} has shape {list(info.shape)}; expected [out, in]")
        out_f, in_f = info.shape
        used.append(wname)
        codes = t.array(wname)
        if bits == 4:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < -8 or hi > 7:
                raise FormatError(
                    f"tensor {wname!r}: values range from {lo} to {hi}; expected [-8, 7] for "
                    "4-bit weights"
                )
            stored = pack_int4((codes.astype(np.int16) + 8).astype(np.uint8))
        else:
            stored = codes
    gran = a.granularity
    if gran is QuantizationGranularity.PER_GROUP and in_f % a.group_size:
        raise FormatError(
            f"{where}: in_features {in_f} is not a multiple of group_size {a.group_size}"
        )
    ngroups = in_f // a.group_size if gran is QuantizationGranularity.PER_GROUP else 1
    sshape = (1,) if gran is QuantizationGranularity.PER_TENSOR else (out_f, ngroups)
    scname = f"{name}.weight_scale"
    sinfo = need(t, scname, FLOAT_DTYPES, None, f"scale of {where}")
    if sinfo.shape != sshape and not (
        gran is QuantizationGranularity.PER_TENSOR and sinfo.shape in ((), (1, 1))
    ):
        raise FormatError(
            f"tensor {scname!r} has shape {list(sinfo.shape)}; expected {list(sshape)} for "
            f"strategy {a.strategy!r} and weight shape [{out_f}, {in_f}]"
        )
    used.append(scname)
    qshape = {
        QuantizationGranularity.PER_TENSOR: (1,),
        QuantizationGranularity.PER_CHANNEL: (out_f,),
        QuantizationGranularity.PER_GROUP: (out_f, ngroups),
    }[gran]
    scale = t.array(scname).astype(np.float64).reshape(qshape)
    zname = f"{name}.weight_zero_point"
    half = 1 << (bits - 1)
    if a.symmetric:
        if t.info(zname) is not None:
            raise FormatError(f"tensor {zname!r} present but {where} is symmetric")
        ct_zp = np.zeros(qshape, dtype=np.int64)
    elif scheme.format == PACK and gran is not QuantizationGranularity.PER_TENSOR:
        zrows = -(-out_f * bits // 32)
        need(t, zname, ("I32",), (zrows, ngroups), f"packed zero point of {where}")
        u = unpack_rows(np.ascontiguousarray(t.array(zname).T), bits, out_f).T
        ct_zp = (u.astype(np.int64) - half).reshape(qshape)
        used.append(zname)
    else:
        need(t, zname, ("I8", "I32"), sinfo.shape, f"zero point of {where}")
        ct_zp = t.array(zname).astype(np.int64).reshape(qshape)
        if ct_zp.min() < -half or ct_zp.max() >= half:
            raise FormatError(
                f"tensor {zname!r}: zero points range from {ct_zp.min()} to {ct_zp.max()}; "
                f"expected [{-half}, {half - 1}] for {bits}-bit weights"
            )
        used.append(zname)
    qtype = QuantizationType.INT4 if bits == 4 else QuantizationType.INT8
    if a.symmetric and narrow_codes:
        qscheme, zp = QuantizationScheme.SYMMETRIC, ct_zp
    else:
        qscheme = QuantizationScheme.ASYMMETRIC
        zp = ct_zp + 8 if bits == 4 else ct_zp
    spec = LayerSpec(qtype, qscheme, gran, a.group_size, (out_f, in_f), False)
    params = make_params(spec, scale, zp, f"{where} ({scname!r} / {zname!r})")
    gname = f"{name}.weight_g_idx"
    if t.info(gname) is not None:
        _check_g_idx(
            t, gname, in_f, a.group_size if gran is QuantizationGranularity.PER_GROUP else in_f
        )
        used.append(gname)
    bias = read_bias(t, f"{name}.bias", out_f)
    if bias is not None:
        used.append(f"{name}.bias")
    if verify:
        verify_codes(wname, stored, qtype, qscheme, in_f)
    layer = QuantizedLinear._from_stored(stored, params, in_f, bias, backend, lazy=True)
    return layer, used


def _check_g_idx(t: TensorSet, gname: str, in_f: int, group_size: int) -> None:
    need(t, gname, ("I32", "I64"), (in_f,), "group index")
    g = t.array(gname)
    if not np.array_equal(g, np.arange(in_f) // group_size):
        raise FormatError(
            f"tensor {gname!r} assigns columns to groups out of order (GPTQ group "
            "act-order); qlinear holds contiguous groups only: re-export with static "
            "groups (actorder 'weight' / 'static'), which needs no g_idx"
        )
