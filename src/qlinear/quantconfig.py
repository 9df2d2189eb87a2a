"""QuantConfig: how ``quantize_checkpoint`` and ``qlinear eval`` quantize each weight."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._ranges import METHODS
from .calibrate import _check_group_size, calibrate_linear
from .errors import InvalidParamsError
from .params import QuantizationParams
from .qtypes import (
    QuantizationGranularity,
    QuantizationScheme,
    QuantizationType,
    as_granularity,
    as_qtype,
    as_scheme,
)

__all__ = ["METHODS", "QuantConfig"]


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize each selected weight.

    qtype ``"int8"``/``"int4"``; granularity ``"per_tensor"``/``"per_channel"``/
    ``"per_group"`` (with ``group_size``); scheme ``"symmetric"``/``"asymmetric"``;
    method ``"minmax"``, ``"percentile"`` or ``"mse"`` (passed to
    :func:`qlinear.calibrate_linear`).
    """

    qtype: QuantizationType | str = "int8"
    granularity: QuantizationGranularity | str = "per_channel"
    scheme: QuantizationScheme | str = "symmetric"
    group_size: int | None = None
    method: str = "minmax"

    def __post_init__(self) -> None:
        qt = as_qtype(self.qtype)
        if not qt.is_integer:
            raise InvalidParamsError(f"qtype must be 'int8' or 'int4'; got {qt.value!r}")
        gran = as_granularity(self.granularity)
        object.__setattr__(self, "qtype", qt)
        object.__setattr__(self, "granularity", gran)
        object.__setattr__(self, "scheme", as_scheme(self.scheme))
        object.__setattr__(self, "group_size", _check_group_size(self.group_size, gran))
        if self.method not in METHODS:
            raise InvalidParamsError(f"method must be one of {METHODS}; got {self.method!r}")

    @classmethod
    def coerce(cls, value: QuantConfig | Mapping[str, Any]) -> QuantConfig:
        """A QuantConfig from itself or a dict of its fields."""
        if isinstance(value, QuantConfig):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise InvalidParamsError(
                    f"unknown config keys {unknown}; expected some of {sorted(known)}"
                )
            return cls(**value)
        raise InvalidParamsError(
            f"config must be a QuantConfig or a dict; got {type(value).__name__}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "qtype": self.qtype.value,  # type: ignore[union-attr]
            "granularity": self.granularity.value,  # type: ignore[union-attr]
            "scheme": self.scheme.value,  # type: ignore[union-attr]
            "group_size": self.group_size,
            "method": self.method,
        }

    def calibrate(self, weight: np.ndarray) -> QuantizationParams:
        """:func:`qlinear.calibrate_linear` of a float ``(out, in)`` weight with this config."""
        return calibrate_linear(
            weight,
            self.qtype,
            self.granularity,
            self.scheme,
            group_size=self.group_size,
            method=self.method,
        )

    def describe(self) -> str:
        d = self.to_dict()
        g = d["granularity"] + (f"({self.group_size})" if self.group_size else "")
        return f"{d['qtype']} {g} {d['scheme']}"
