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
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .._checks import as_array, as_float_matrix
from ..errors import InvalidParamsError, ShapeMismatchError
from ..linear import QuantizedLinear
from ..quantconfig import QuantConfig
from .experts import GatedExpert, LinearExpert
from .layer import MoELayer

__all__ = ["MoEQuantizationReport", "quantize_moe", "quantize_stacked"]

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


def _weight_only(w: np.ndarray, cfg: QuantConfig) -> QuantizedLinear:
    return QuantizedLinear.from_fp(w, cfg.calibrate(w))


def _aware(
    w: np.ndarray, x: np.ndarray, cfg: QuantConfig, gptq: Callable, gptq_options: dict
) -> QuantizedLinear:
    q = gptq(
        w,
        x,
        cfg.qtype,
        cfg.granularity,
        cfg.scheme,
        group_size=cfg.group_size,
        method=cfg.method,
        **gptq_options,
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
    granularity: Any = None,
    scheme: Any = None,
    *,
    group_size: int | None = None,
    method: str | None = None,
) -> list[QuantizedLinear]:
    """Weight-only quantization of a 3-D float tensor ``(num_experts, out, in)``: one
    QuantizedLinear per expert, each from the view ``w[e]`` (the tensor is not split into
    float copies; only one expert's slice is converted at a time)."""
    a = as_array("w", w)
    if a.ndim != 3:
        raise ShapeMismatchError(f"w must be 3-D (num_experts, out, in); got shape {a.shape}")
    cfg = _recipe(qtype, granularity, scheme, group_size, method)
    return [_weight_only(a[e], cfg) for e in range(a.shape[0])]


def _recipe(config, granularity, scheme, group_size, method) -> QuantConfig:
    """The QuantConfig of ``config`` (a QuantConfig or a dict of its fields, the other
    arguments then None), or of a qtype string and the other arguments."""
    if isinstance(config, (QuantConfig, Mapping)):
        extra = {
            k: v
            for k, v in (
                ("granularity", granularity),
                ("scheme", scheme),
                ("group_size", group_size),
                ("method", method),
            )
            if v is not None
        }
        if extra:
            raise InvalidParamsError(
                f"pass the format either as a QuantConfig or as separate arguments; got a "
                f"config and {sorted(extra)}"
            )
        return QuantConfig.coerce(config)
    return QuantConfig(
        config,
        "per_channel" if granularity is None else granularity,
        "symmetric" if scheme is None else scheme,
        group_size,
        "minmax" if method is None else method,
    )


def _float_piece(name: str, piece: Any) -> np.ndarray:
    if not isinstance(piece, np.ndarray):
        raise InvalidParamsError(
            f"{name} is already a {type(piece).__name__}; quantize_moe needs float experts"
        )
    return piece


def quantize_moe(
    layer: MoELayer,
    config: QuantConfig | Mapping[str, Any] | str = "int8",
    granularity: Any = None,
    scheme: Any = None,
    *,
    group_size: int | None = None,
    method: str | None = None,
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
        config: the recipe, as for checkpoints: a :class:`qlinear.QuantConfig` (or a dict
            of its fields); or a qtype string with ``granularity``, ``scheme``,
            ``group_size``, ``method`` as :func:`qlinear.calibrate_linear` takes them
            (default int8, one symmetric min-max scale per output channel of each expert
            piece). ``method`` (``"minmax"``, ``"percentile"``, ``"mse"``) is also passed
            to GPTQ.
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
    cfg = _recipe(config, granularity, scheme, group_size, method)
    # act_order is validated by GPTQ: bool("no") would silently be True
    gopts = {"damp": damp, "act_order": act_order, "block_size": block_size}
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
            q = _weight_only(w, cfg) if xe is None else _aware(w, xe, cfg, gptq, gopts)
            new_experts.append(ex.with_pieces(q))
        else:
            new_experts.append(_quantize_gated(ex, xe, cfg, gptq, gopts))
    aware = tuple(e for e, t in enumerate(token_lists) if t is not None)
    fallback = () if counts is None else tuple(int(e) for e in np.flatnonzero(counts < min_tokens))
    d = cfg.to_dict()
    report = MoEQuantizationReport(
        qtype=d["qtype"],
        granularity=d["granularity"],
        scheme=d["scheme"],
        group_size=cfg.group_size,
        method=cfg.method,
        min_tokens=int(min_tokens),
        tokens_per_expert=None if counts is None else tuple(int(c) for c in counts),
        activation_aware=aware,
        weight_only_fallback=fallback,
    )
    return layer.with_experts(new_experts, quantization_report=report)


def _quantize_gated(
    ex: GatedExpert, xe: np.ndarray | None, cfg: QuantConfig, gptq: Callable | None, gopts: dict
) -> GatedExpert:
    if xe is None:
        g, u, d = (_weight_only(p, cfg) for p in (ex.gate, ex.up, ex.down))
        return ex.with_pieces(g, u, d)
    g = _aware(ex.gate, xe, cfg, gptq, gopts)
    u = _aware(ex.up, xe, cfg, gptq, gopts)
    half = ex.with_pieces(g, u, ex.down)
    d = _aware(ex.down, half.hidden(xe), cfg, gptq, gopts)
    return ex.with_pieces(g, u, d)
