"""Mixture-of-experts: experts, routers and (quantized) MoE layers.

``MoELayer`` routes tokens to float or quantized experts and runs them grouped by expert;
``quantize_moe`` turns a float MoELayer into one whose experts hold ``QuantizedLinear``
weights (the router stays float). See docs/moe.md.
"""

from .experts import Expert, GatedExpert, LinearExpert
from .layer import MoELayer
from .quantize import MoEQuantizationReport, quantize_moe, quantize_stacked
from .routing import ROUTINGS, Routing, RoutingStats

__all__ = [
    "ROUTINGS",
    "Expert",
    "GatedExpert",
    "LinearExpert",
    "MoELayer",
    "MoEQuantizationReport",
    "Routing",
    "RoutingStats",
    "quantize_moe",
    "quantize_stacked",
]
