"""quantize_moe: a MoELayer whose experts hold QuantizedLinear weights.

Only the experts are quantized; the router stays in float64 (it is small, and routing
decisions are sensitive to its logits).

Calibration of each linear piece (gate, up, down or a LinearExpert's weights):

* weight-only (``calib_x=None``, or an expert that received fewer than ``min_tokens``
  calibration tokens): ``calibrate_linear(w, qtype, granularity, scheme, group_size=...,
  method=...)`` then ``QuantizedLinear.from_fp``;
* activation-aware (``calib_x`` given): the calibration tokens are routed with the float
  router and each expert gets exactly the tokens it receives; its pieces are quantized by
  ``qlinear.gptq.gptq_quantize(w, x_e, ...)``. A gated expert's ``down`` sees
  ``act(gate_q(x_e)) * up_q(x_e)`` computed with the already-quantized gate and up, so it
  corrects the error they make (GPTQ's "true sequential" order).

Fused experts (views of 3-D tensors, see :meth:`MoELayer.from_fused`) are quantized slice
by slice: only one expert's matrix is ever converted at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from .._checks import as_array, as_float_matrix
from ..calibrate import calibrate_linear
from ..errors import InvalidParamsError, ShapeMismatchError
from ..linear import QuantizedLinear
from ..qtypes import as_granularity, as_qtype, as_scheme
from .experts import GatedExpert, LinearExpert
from .layer import MoELayer

__all__ = ["MoEQuantizationReport", "quantize_moe", "quantize_stacked"]

WEIGHT_ONLY_METHODS = ("minmax", "percentile", "mse")
DEFAULT_MIN_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class MoEQuantizationReport:
    """What :func:`quantize_moe` did, attached to the layer as ``quantization_report``.

    tokens_per_expert: calibration tokens each expert received (None without calib_x).
    activation_aware: ids of experts calibrated on their tokens (GPTQ).
    weight_only_fallback: ids of experts that received fewer than ``min_tokens`` tokens
        and were calibrated from their weights alone (empty without calib_x: then every
        expert is weight-only by request, not by fallback).
    """

    qtype: str
    granularity: str
    scheme: str
    group_size: int | None
    method: str
    min_tokens: int
    tokens_per_expert: tuple[int, ...] | None
    activation_aware: tuple[int, ...]
    weight_only_fallback: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Options:
    qtype: Any
    granularity: Any
    scheme: Any
    group_size: int | None
    method: str
    damp: float
    act_order: bool
    block_size: int


def _weight_only(w: np.ndarray, o: _Options) -> QuantizedLinear:
    params = calibrate_linear(
        w, o.qtype, o.granularity, o.scheme, group_size=o.group_size, method=o.method
    )
    return QuantizedLinear.from_fp(w, params)


def _aware(w: np.ndarray, x: np.ndarray, o: _Options, gptq: Callable) -> QuantizedLinear:
    q = gptq(
        w,
        x,
        o.qtype,
        o.granularity,
        o.scheme,
        group_size=o.group_size,
        damp=o.damp,
        act_order=o.act_order,
        block_size=o.block_size,
        method=o.method,
    )
    if not isinstance(q, QuantizedLinear) or q.shape != w.shape:
        raise InvalidParamsError(
            f"the GPTQ function returned {q!r}; expected a QuantizedLinear of shape {w.shape}"
        )
    return q


def _load_gptq() -> Callable:
    try:
        from ..gptq import gptq_quantize  # lazy: GPTQ is an optional, heavier module
    except ImportError as exc:
        raise InvalidParamsError(
            "activation-aware calibration (calib_x) needs qlinear.gptq.gptq_quantize, which "
            "this qlinear build does not have; pass calib_x=None for weight-only calibration"
        ) from exc
    return gptq_quantize


def quantize_stacked(
    w: np.ndarray,
    qtype: Any = "int8",
    granularity: Any = "per_channel",
    scheme: Any = "symmetric",
    *,
    group_size: int | None = None,
    method: str = "minmax",
) -> list[QuantizedLinear]:
    """Weight-only quantization of a 3-D float tensor ``(num_experts, out, in)``: one
    QuantizedLinear per expert, each from the view ``w[e]`` (the tensor is not split into
    float copies; only one expert's slice is converted at a time)."""
    a = as_array("w", w)
    if a.ndim != 3:
        raise ShapeMismatchError(f"w must be 3-D (num_experts, out, in); got shape {a.shape}")
    o = _options(qtype, granularity, scheme, group_size, method, 0.01, False, 128)
    return [_weight_only(a[e], o) for e in range(a.shape[0])]


def _options(qtype, granularity, scheme, group_size, method, damp, act_order, block_size):
    if method not in WEIGHT_ONLY_METHODS:
        raise InvalidParamsError(
            f"unknown method {method!r}; expected one of {WEIGHT_ONLY_METHODS}"
        )
    return _Options(
        as_qtype(qtype),
        as_granularity(granularity),
        as_scheme(scheme),
        group_size,
        method,
        damp,
        act_order,  # validated by GPTQ: bool("no") would silently be True
        block_size,
    )


def _float_piece(name: str, piece: Any) -> np.ndarray:
    if not isinstance(piece, np.ndarray):
        raise InvalidParamsError(
            f"{name} is already a {type(piece).__name__}; quantize_moe needs float experts"
        )
    return piece


def quantize_moe(
    layer: MoELayer,
    qtype: Any = "int8",
    granularity: Any = "per_channel",
    scheme: Any = "symmetric",
    *,
    group_size: int | None = None,
    method: str = "minmax",
    calib_x: np.ndarray | None = None,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    gptq_fn: Callable | None = None,
) -> MoELayer:
    """Quantize every expert of ``layer``; the router stays float (float64).

    Args:
        layer: a MoELayer of float :class:`LinearExpert` / :class:`GatedExpert` experts.
        qtype, granularity, scheme, group_size: as :func:`qlinear.calibrate_linear`
            (default int8, one symmetric scale per output channel of each expert piece).
        method: clipping-range method: ``"minmax"``, or ``"percentile"`` / ``"mse"``
            where this build's ``calibrate_linear`` supports them; also passed to GPTQ.
        calib_x: optional float ``(tokens, d_model)`` calibration inputs. They are routed
            by the float router; each expert is GPTQ-quantized on the tokens it receives.
        min_tokens: an expert that receives fewer calibration tokens than this falls back
            to weight-only calibration, listed in the report's ``weight_only_fallback``.
        damp, act_order, block_size: passed to GPTQ.
        gptq_fn: the GPTQ function (default ``qlinear.gptq.gptq_quantize``, imported on
            first use); any callable with its signature returning a QuantizedLinear.

    Returns:
        A new MoELayer with the same router and routing options whose experts' pieces are
        :class:`QuantizedLinear` (biases stay float); its ``quantization_report`` is a
        :class:`MoEQuantizationReport`.
    """
    if not isinstance(layer, MoELayer):
        raise InvalidParamsError(f"layer must be a MoELayer; got {type(layer).__name__}")
    o = _options(qtype, granularity, scheme, group_size, method, damp, act_order, block_size)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, (int, np.integer)):
        raise InvalidParamsError(f"min_tokens must be an integer >= 1; got {min_tokens!r}")
    if min_tokens < 1:
        raise InvalidParamsError(f"min_tokens must be >= 1; got {min_tokens}")
    for i, e in enumerate(layer.experts):
        if not isinstance(e, (LinearExpert, GatedExpert)):
            raise InvalidParamsError(
                f"experts[{i}] is a {type(e).__name__}; quantize_moe handles LinearExpert and "
                "GatedExpert"
            )
        for name, p in e.pieces.items():
            _float_piece(f"experts[{i}].{name}", p)

    token_lists: list[np.ndarray | None] = [None] * layer.num_experts
    counts = None
    gptq = None
    if calib_x is not None:
        if np.ndim(calib_x) != 2:
            raise ShapeMismatchError(
                f"calib_x must be 2-D (tokens, {layer.input_dim}); got shape {np.shape(calib_x)}"
            )
        xc = as_float_matrix("calib_x", calib_x)
        if xc.shape[1] != layer.input_dim:
            raise ShapeMismatchError(
                f"calib_x must have shape (tokens, {layer.input_dim}); got {xc.shape}"
            )
        r = layer.route(xc)
        counts = np.bincount(r.indices[r.indices >= 0], minlength=layer.num_experts)
        for e in range(layer.num_experts):
            if counts[e] >= min_tokens:
                token_lists[e] = xc[np.flatnonzero((r.indices == e).any(axis=1))]
        if any(t is not None for t in token_lists):
            gptq = gptq_fn if gptq_fn is not None else _load_gptq()

    new_experts = []
    for e, ex in enumerate(layer.experts):
        xe = token_lists[e]
        if isinstance(ex, LinearExpert):
            w = ex.weights
            q = _weight_only(w, o) if xe is None else _aware(w, xe, o, gptq)
            new_experts.append(ex.with_pieces(q))
        else:
            new_experts.append(_quantize_gated(ex, xe, o, gptq))
    out = layer.with_experts(new_experts)
    aware = tuple(e for e, t in enumerate(token_lists) if t is not None)
    fallback = () if counts is None else tuple(int(e) for e in np.flatnonzero(counts < min_tokens))
    out._report = MoEQuantizationReport(
        qtype=o.qtype.value,
        granularity=o.granularity.value,
        scheme=o.scheme.value,
        group_size=group_size,
        method=method,
        min_tokens=int(min_tokens),
        tokens_per_expert=None if counts is None else tuple(int(c) for c in counts),
        activation_aware=aware,
        weight_only_fallback=fallback,
    )
    return out


def _quantize_gated(
    ex: GatedExpert, xe: np.ndarray | None, o: _Options, gptq: Callable | None
) -> GatedExpert:
    if xe is None:
        g, u, d = (_weight_only(p, o) for p in (ex.gate, ex.up, ex.down))
        return ex.with_pieces(g, u, d)
    g = _aware(ex.gate, xe, o, gptq)
    u = _aware(ex.up, xe, o, gptq)
    half = ex.with_pieces(g, u, ex.down)
    d = _aware(ex.down, half.hidden(xe), o, gptq)
    return ex.with_pieces(g, u, d)
