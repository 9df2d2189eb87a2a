"""The reference backend: canonical layout, NumPy kernels from :mod:`qlinear.ref`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .. import ref
from .._mapped import check_mapped
from ..packing import unpack_int4
from ..params import QuantizationParams
from ..qtypes import QuantizationType
from .registry import KernelWeight, kernel_params

__all__ = ["NumpyBackend", "NumpyWeight"]


@dataclasses.dataclass(frozen=True, eq=False)
class NumpyWeight(KernelWeight):
    """Canonical stored codes; zero points in the stored-code domain (int8 signed)."""

    codes: np.ndarray = dataclasses.field(default=None, repr=False)  # type: ignore[assignment]

    def stored(self) -> np.ndarray:
        check_mapped(self.codes)  # codes of a loaded file are a view of its mapping
        return self.codes

    def rows(self):
        """Codes as integers, one element per weight: the array, or a row-slice callable
        that unpacks int4 one tile at a time."""
        if self.bits == 4:
            return lambda a, b: unpack_int4(self.codes[a:b], self.in_features)
        return self.codes

    def _run(self, fn, x, bias):
        check_mapped(self.codes)
        with np.errstate(over="ignore", invalid="ignore"):  # reported by forward()
            return fn(
                self.rows(), self.out_features, self.scales, self.zero_points,
                self.group_size, x, bias,
            )  # fmt: skip

    def _float(self, x, bias):
        return self._run(ref.linear_float, x, bias)

    def _int8(self, x, bias):
        # The reference quantizes a NaN to some code: bad x is found first (None).
        if not np.isfinite(x).all():
            return None
        return self._run(ref.linear_int8act, x, bias)


class NumpyBackend:
    name = "numpy"
    priority = 0

    def supported(self) -> bool:
        return True

    def prepare(
        self, stored: np.ndarray, params: QuantizationParams, in_features: int, *, lazy=False
    ) -> NumpyWeight:
        codes = np.ascontiguousarray(stored)  # the canonical layout: nothing to defer
        if codes.flags.writeable:
            codes.setflags(write=False)
        out = codes.shape[0]
        scales, zp, gs = kernel_params(params, out, in_features, 0)
        bits = 4 if params.qtype is QuantizationType.INT4 else 8
        return NumpyWeight(
            self.name, params.qtype, bits, out, in_features, gs, scales, zp, codes.nbytes,
            codes=codes,
        )  # fmt: skip

    def info(self) -> dict[str, Any]:
        return {"kernels": "numpy reference (row-tiled dequantize + BLAS matmul)"}
