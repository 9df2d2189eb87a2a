"""Quantized types, schemes and granularities, and the code ranges they imply.

These are data: each :class:`QuantizationType` knows its bit width and, with a
:class:`QuantizationScheme`, its integer code range. Every function that takes one of
these enums also takes its lowercase string value (``"int8"``, ``"per_channel"``,
``"symmetric"``); :func:`as_qtype`, :func:`as_scheme` and :func:`as_granularity` do the
coercion and raise :class:`~qlinear.errors.InvalidParamsError` for anything else.

Code ranges (``fp = (q - zero_point) * scale``):

========  ==========  ============  ===============================
qtype     scheme      codes         zero point
========  ==========  ============  ===============================
int8      symmetric   -127 .. 127   0
int8      asymmetric  -128 .. 127   integer in -128 .. 127
int4      symmetric   -7 .. 7       0
int4      asymmetric  0 .. 15       integer in 0 .. 15
========  ==========  ============  ===============================

Symmetric ranges are kept symmetric (-127, not -128) so that ``scale = amax / 127``
maps both signs alike.
"""

from __future__ import annotations

import enum
from typing import TypeVar

from .errors import InvalidParamsError

__all__ = [
    "QuantizationGranularity",
    "QuantizationScheme",
    "QuantizationType",
    "as_granularity",
    "as_qtype",
    "as_scheme",
    "code_range",
    "storage_offset",
]


class QuantizationType(str, enum.Enum):
    """The element type of a tensor: integer codes, or a float type kept as is."""

    INT8 = "int8"
    INT4 = "int4"
    FP16 = "fp16"
    BF16 = "bf16"
    NONE = "none"

    @property
    def bits(self) -> int:
        """Bits per element (32 for NONE, meaning float32 is kept)."""
        return {"int8": 8, "int4": 4, "fp16": 16, "bf16": 16, "none": 32}[self.value]

    @property
    def is_integer(self) -> bool:
        """True for the types that hold integer codes with a scale (INT8, INT4)."""
        return self in (QuantizationType.INT8, QuantizationType.INT4)


class QuantizationScheme(str, enum.Enum):
    """Symmetric (zero point 0, codes centred on 0) or asymmetric (integer zero point)."""

    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


class QuantizationGranularity(str, enum.Enum):
    """Which elements share one (scale, zero_point).

    PER_TENSOR: the whole matrix. PER_CHANNEL: each output row. PER_GROUP: each run of
    ``group_size`` consecutive input columns within an output row (the last group of a
    row may be shorter).
    """

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"


_E = TypeVar("_E", bound=enum.Enum)

# Short spellings accepted besides the enum values, as a CLI user types them.
_ALIASES = {
    "tensor": "per_tensor",
    "channel": "per_channel",
    "group": "per_group",
    "sym": "symmetric",
    "asym": "asymmetric",
}


def _coerce(value: object, cls: type[_E], what: str) -> _E:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        key = _ALIASES.get(key, key)
        for member in cls:
            if member.value == key:
                return member
    allowed = ", ".join(repr(m.value) for m in cls)
    raise InvalidParamsError(f"unknown {what} {value!r}; expected one of {allowed}")


def as_qtype(value: QuantizationType | str) -> QuantizationType:
    """Coerce an enum member or its string value to :class:`QuantizationType`."""
    return _coerce(value, QuantizationType, "quantization type")


def as_scheme(value: QuantizationScheme | str) -> QuantizationScheme:
    """Coerce an enum member or its string value to :class:`QuantizationScheme`."""
    return _coerce(value, QuantizationScheme, "quantization scheme")


def as_granularity(value: QuantizationGranularity | str) -> QuantizationGranularity:
    """Coerce an enum member or its string value to :class:`QuantizationGranularity`."""
    return _coerce(value, QuantizationGranularity, "granularity")


_RANGES = {
    (QuantizationType.INT8, QuantizationScheme.SYMMETRIC): (-127, 127),
    (QuantizationType.INT8, QuantizationScheme.ASYMMETRIC): (-128, 127),
    (QuantizationType.INT4, QuantizationScheme.SYMMETRIC): (-7, 7),
    (QuantizationType.INT4, QuantizationScheme.ASYMMETRIC): (0, 15),
}


def code_range(qtype: QuantizationType | str, scheme: QuantizationScheme | str) -> tuple[int, int]:
    """``(qmin, qmax)``: the inclusive range of integer codes for a type and scheme."""
    key = (as_qtype(qtype), as_scheme(scheme))
    try:
        return _RANGES[key]
    except KeyError:
        raise InvalidParamsError(
            f"{key[0].value} has no integer code range; expected 'int8' or 'int4'"
        ) from None


def storage_offset(qtype: QuantizationType | str, scheme: QuantizationScheme | str) -> int:
    """What is added to a code before it is stored.

    int4 codes are stored as unsigned nibbles 0..15, so symmetric int4 codes (-7..7)
    are stored as ``q + 8`` (as compressed-tensors does); everything else is stored as
    is. Kernels then compute ``(stored - (zero_point + offset)) * scale``.
    """
    qt, sc = as_qtype(qtype), as_scheme(scheme)
    return 8 if (qt is QuantizationType.INT4 and sc is QuantizationScheme.SYMMETRIC) else 0
