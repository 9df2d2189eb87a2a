"""What a writer needs to know about a quantized layer before its codes exist."""

from __future__ import annotations

from dataclasses import dataclass

from ..linear import QuantizedLinear
from ..params import param_shape
from ..qtypes import QuantizationGranularity, QuantizationScheme, QuantizationType

__all__ = ["LayerSpec"]


@dataclass(frozen=True)
class LayerSpec:
    """A quantized layer's storage facts: qtype, scheme, granularity, group size,
    ``shape = (out, in)``, whether it has a bias, and its default activation mode
    (``"float"``, or ``"int8"`` for dynamic W8A8)."""

    qtype: QuantizationType
    scheme: QuantizationScheme
    granularity: QuantizationGranularity
    group_size: int | None
    shape: tuple[int, int]
    bias: bool
    activations: str = "float"

    @classmethod
    def of(cls, layer: QuantizedLinear, activations: str = "float") -> LayerSpec:
        return cls(
            layer.qtype,
            layer.scheme,
            layer.granularity,
            layer.group_size,
            layer.shape,
            layer.bias is not None,
            activations,
        )

    @property
    def param_shape(self) -> tuple[int, ...]:
        """qlinear's scale / zero-point shape: ``(1,)``, ``(out,)`` or ``(out, n_groups)``."""
        return param_shape(self.granularity, *self.shape, self.group_size)

    @property
    def int4(self) -> bool:
        return self.qtype is QuantizationType.INT4

    @property
    def asymmetric(self) -> bool:
        return self.scheme is QuantizationScheme.ASYMMETRIC

    def describe(self) -> str:
        g = self.granularity.value + (f"({self.group_size})" if self.group_size else "")
        act = " W8A8" if self.activations == "int8" else ""
        return f"{self.qtype.value} {g} {self.scheme.value}{act}"
