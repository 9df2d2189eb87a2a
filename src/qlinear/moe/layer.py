"""MoELayer: a router and experts, with a grouped forward pass.

Forward, for ``x`` of shape ``(tokens, d_model)``:

1. router logits ``l = x @ router_weight.T + router_bias`` (float64, whatever x's dtype,
   so routing decisions do not depend on the input precision; every logit is summed in
   the same order, so identical router rows give identical logits);
2. routing (see :mod:`qlinear.moe.routing`) gives each token expert ids and weights;
3. the (token, expert) pairs are sorted by expert id (stable), each expert runs once on
   the batch of its tokens, and its outputs, scaled by the routing weights, are added back
   into the tokens' rows: ``y[t] = sum_slots w[t, s] * expert_{i[t, s]}(x[t])``.

No per-token Python loop; per call the work is one matmul chain per expert that receives
tokens. The layer holds no per-call state (statistics are returned, not stored), so one
layer can serve several threads at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .._checks import as_array, check_finite
from ..errors import InvalidInputError, InvalidParamsError, ShapeMismatchError
from ._pieces import check_x
from .experts import Expert, GatedExpert
from .routing import ROUTINGS, Routing, RoutingStats, route_logits, routing_stats

__all__ = ["MoELayer"]


def _check_int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise InvalidParamsError(f"{name} must be an integer; got {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidParamsError(f"{name} must be {rng}; got {v}")
    return int(v)


class MoELayer:
    """A mixture-of-experts layer: float router, float or quantized experts.

    Args:
        router_weight: float ``(num_experts, d_model)``; logits are
            ``x @ router_weight.T (+ router_bias)``, computed in float64.
        experts: ``num_experts`` objects following :class:`~qlinear.moe.Expert`, all with
            ``input_dim == d_model`` and the same ``output_dim``.
        top_k: experts per token for ``"topk"`` (1 <= top_k <= num_experts); for
            ``"expert_choice"`` it sets the default capacity
            ``ceil(tokens * top_k / num_experts)``; ``"switch"`` (top-1) and
            ``"softmax"`` (all experts) do not use it.
        routing: ``"topk"``, ``"softmax"``, ``"switch"`` or ``"expert_choice"``.
        normalize: for ``"topk"``: softmax over the top-k logits (True) or the top-k of
            the softmax over all logits (False).
        router_bias: optional float ``(num_experts,)`` added to the logits.
        capacity: tokens per expert for ``"expert_choice"`` (clipped to the batch size);
            None for the default above. Rejected for the other routings.

    The layer is immutable; :meth:`forward` with ``return_stats=True`` returns the
    per-call :class:`~qlinear.moe.RoutingStats` instead of storing them.
    """

    __slots__ = (
        "_bias",
        "_capacity",
        "_experts",
        "_normalize",
        "_report",
        "_router",
        "_routing",
        "_top_k",
    )

    def __init__(
        self,
        router_weight: np.ndarray,
        experts: Sequence[Expert],
        *,
        top_k: int = 2,
        routing: str = "topk",
        normalize: bool = True,
        router_bias: np.ndarray | None = None,
        capacity: int | None = None,
        quantization_report: Any = None,
    ) -> None:
        r = as_array("router_weight", router_weight)
        if r.dtype.kind != "f":
            raise InvalidInputError(f"router_weight must be floating point; got dtype {r.dtype}")
        if r.ndim != 2 or 0 in r.shape:
            raise ShapeMismatchError(
                f"router_weight must be a non-empty 2-D array (num_experts, d_model); got "
                f"shape {r.shape}"
            )
        r = np.array(r, dtype=np.float64)
        check_finite("router_weight", r)
        num_experts, d_model = r.shape
        try:
            experts = tuple(experts)
        except TypeError:
            raise InvalidParamsError(
                f"experts must be a sequence of Expert objects; got {type(experts).__name__}"
            ) from None
        if len(experts) != num_experts:
            raise ShapeMismatchError(
                f"router_weight has {num_experts} rows (experts) but {len(experts)} experts "
                "were given; expected one expert per row"
            )
        out_dim = None
        for i, e in enumerate(experts):
            if not isinstance(e, Expert):
                raise InvalidParamsError(
                    f"experts[{i}] is a {type(e).__name__}; expected an Expert (input_dim, "
                    "output_dim, forward)"
                )
            if e.input_dim != d_model:
                raise ShapeMismatchError(
                    f"experts[{i}].input_dim is {e.input_dim} but router_weight has d_model "
                    f"{d_model}; expected them equal"
                )
            if out_dim is None:
                out_dim = e.output_dim
            elif e.output_dim != out_dim:
                raise ShapeMismatchError(
                    f"experts[{i}].output_dim is {e.output_dim} but experts[0] has {out_dim}; "
                    "all experts must have the same output_dim"
                )
        if routing not in ROUTINGS:
            raise InvalidParamsError(f"unknown routing {routing!r}; expected one of {ROUTINGS}")
        top_k = _check_int("top_k", top_k, 1, num_experts)
        if not isinstance(normalize, (bool, np.bool_)):
            raise InvalidParamsError(f"normalize must be True or False; got {normalize!r}")
        if capacity is not None:
            if routing != "expert_choice":
                raise InvalidParamsError(
                    f"capacity applies to routing='expert_choice' only; got capacity="
                    f"{capacity!r} with routing={routing!r}"
                )
            capacity = _check_int("capacity", capacity, 1)
        b = None
        if router_bias is not None:
            b = as_array("router_bias", router_bias)
            if b.dtype.kind != "f":
                raise InvalidInputError(f"router_bias must be floating point; got {b.dtype}")
            if b.shape != (num_experts,):
                raise ShapeMismatchError(
                    f"router_bias must have shape ({num_experts},); got {b.shape}"
                )
            b = np.array(b, dtype=np.float64)
            check_finite("router_bias", b)
            b.setflags(write=False)
        r.setflags(write=False)
        self._router, self._bias, self._experts = r, b, experts
        self._top_k, self._routing = top_k, routing
        self._normalize, self._capacity = bool(normalize), capacity
        self._report = quantization_report  # set by quantize_moe (its MoEQuantizationReport)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_fused(
        cls,
        router_weight: np.ndarray,
        w_gate: np.ndarray,
        w_up: np.ndarray,
        w_down: np.ndarray,
        *,
        activation: Any = "silu",
        **kwargs: Any,
    ) -> MoELayer:
        """Gated experts from 3-D tensors as checkpoints store them.

        Args:
            w_gate, w_up: float ``(num_experts, d_ff, d_model)``.
            w_down: float ``(num_experts, d_out, d_ff)``.
            activation: the experts' activation (see :class:`GatedExpert`).
            **kwargs: ``top_k``, ``routing``, ``normalize``, ``router_bias``, ``capacity``.

        Expert ``e`` holds read-only *views* ``w_gate[e]``, ``w_up[e]``, ``w_down[e]``: the
        tensors are not copied (float16 tensors excepted, which are cast to float32), so
        they must not be modified while the layer is in use.
        """
        arrs = []
        for name, a in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
            a = as_array(name, a)
            if a.ndim != 3:
                raise ShapeMismatchError(
                    f"{name} must be 3-D (num_experts, out, in); got {a.ndim}-D shape {a.shape}"
                )
            arrs.append(a)
        g, u, d = arrs
        if not (g.shape[0] == u.shape[0] == d.shape[0]):
            raise ShapeMismatchError(
                f"w_gate, w_up and w_down must have the same number of experts; got "
                f"{g.shape[0]}, {u.shape[0]} and {d.shape[0]}"
            )
        experts = [GatedExpert(g[e], u[e], d[e], activation=activation) for e in range(g.shape[0])]
        return cls(router_weight, experts, **kwargs)

    def with_experts(
        self, experts: Sequence[Expert], *, quantization_report: Any = None
    ) -> MoELayer:
        """A layer with the same router and routing options and other experts (and the
        report of how they were quantized, if any)."""
        return MoELayer(
            self._router,
            experts,
            top_k=self._top_k,
            routing=self._routing,
            normalize=self._normalize,
            router_bias=self._bias,
            capacity=self._capacity,
            quantization_report=quantization_report,
        )

    # ------------------------------------------------------------ properties
    @property
    def router_weight(self) -> np.ndarray:
        """float64 ``(num_experts, d_model)``, read-only."""
        return self._router

    @property
    def router_bias(self) -> np.ndarray | None:
        return self._bias

    @property
    def experts(self) -> tuple[Expert, ...]:
        return self._experts

    @property
    def num_experts(self) -> int:
        return len(self._experts)

    @property
    def input_dim(self) -> int:
        return int(self._router.shape[1])

    @property
    def output_dim(self) -> int:
        return int(self._experts[0].output_dim)

    @property
    def top_k(self) -> int:
        return self._top_k

    @property
    def routing(self) -> str:
        return self._routing

    @property
    def normalize(self) -> bool:
        return self._normalize

    @property
    def capacity(self) -> int | None:
        return self._capacity

    @property
    def quantization_report(self) -> Any:
        """The :class:`~qlinear.moe.MoEQuantizationReport` of a layer made by
        :func:`~qlinear.moe.quantize_moe`; None otherwise."""
        return self._report

    @property
    def nbytes(self) -> int:
        """Bytes held by the router (float64) and every expert's pieces."""
        total = self._router.nbytes + (0 if self._bias is None else self._bias.nbytes)
        for e in self._experts:
            n = getattr(e, "nbytes", None)
            if not isinstance(n, (int, np.integer)):
                raise InvalidParamsError(f"expert {type(e).__name__} does not report nbytes")
            total += int(n)
        return total

    # ------------------------------------------------------------ compute
    def _prepare(self, x: Any) -> tuple[np.ndarray, tuple[int, ...]]:
        a = check_x(x, self.input_dim)
        return a.reshape(-1, self.input_dim), a.shape[:-1]

    def _logits(self, x2: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            # einsum (not BLAS) sums every logit in the same order, so experts with
            # identical router rows get bit-identical logits and tie as they should;
            # BLAS gemv can round such rows differently depending on their position.
            logits = np.einsum("nd,ed->ne", x2.astype(np.float64, copy=False), self._router)
            if self._bias is not None:
                logits += self._bias
        if not np.isfinite(logits).all():
            raise InvalidInputError(
                "router logits overflowed to Inf/NaN; the input or router weights are too "
                "large for float64"
            )
        return logits

    def _route(self, logits: np.ndarray) -> Routing:
        return route_logits(logits, self._routing, self._top_k, self._normalize, self._capacity)

    def route(self, x: np.ndarray) -> Routing:
        """Routing of ``x`` ``(..., d_model)``: ``(indices, weights)``, each
        ``(tokens, k)`` with tokens the flattened leading axes (see
        :class:`~qlinear.moe.Routing`: int64 ids, -1 for empty slots; float64 weights)."""
        x2, _ = self._prepare(x)
        return self._route(self._logits(x2))

    def routing_stats(self, x: np.ndarray) -> RoutingStats:
        """The :class:`~qlinear.moe.RoutingStats` that ``forward(x)`` would produce."""
        x2, _ = self._prepare(x)
        logits = self._logits(x2)
        return routing_stats(logits, self._route(logits))

    def forward(
        self, x: np.ndarray, *, return_stats: bool = False
    ) -> np.ndarray | tuple[np.ndarray, RoutingStats]:
        """``y[t] = sum_s w[t, s] * expert_{i[t, s]}(x[t])``.

        Args:
            x: float ``(..., d_model)`` (a 1-D vector, a 2-D batch, or more axes), finite.
                float32 and float64 compute and return in their own dtype; float16 in
                float32. An empty batch ``(0, d_model)`` gives ``(0, output_dim)``.
            return_stats: also return this call's :class:`~qlinear.moe.RoutingStats`.

        Returns:
            ``(..., output_dim)``, or ``(y, stats)`` with ``return_stats``.

        Raises:
            ShapeMismatchError: last axis is not d_model.
            InvalidInputError: non-float dtype, NaN or Inf.
        """
        x2, lead = self._prepare(x)
        logits = self._logits(x2)
        r = self._route(logits)
        with np.errstate(over="ignore", invalid="ignore"):
            y = self._combine(x2, r)
        if not np.isfinite(y).all():
            raise InvalidInputError(
                f"the MoE output overflowed to Inf/NaN in {y.dtype}; the input is too large "
                "for the experts (largest |x| is "
                f"{float(np.abs(x2).max()):.3g})"
            )
        y = y.reshape(*lead, self.output_dim)
        if return_stats:
            return y, routing_stats(logits, r)
        return y

    __call__ = forward

    def _combine(self, x2: np.ndarray, r: Routing) -> np.ndarray:
        n = x2.shape[0]
        dtype = x2.dtype
        out = np.zeros((n, self.output_dim), dtype=dtype)
        k = r.indices.shape[1]
        flat_e = r.indices.ravel()
        keep = flat_e >= 0
        flat_e = flat_e[keep]
        flat_t = np.repeat(np.arange(n, dtype=np.int64), k)[keep]
        flat_w = r.weights.ravel()[keep]
        # Stable sort by expert: each expert's tokens stay in token order.
        order = np.argsort(flat_e, kind="stable")
        tok = flat_t[order]
        wts = flat_w[order].astype(dtype)
        counts = np.bincount(flat_e, minlength=self.num_experts)
        bounds = np.concatenate(([0], np.cumsum(counts)))
        for e in np.flatnonzero(counts):
            s, t = bounds[e], bounds[e + 1]
            idx = tok[s:t]
            ye = np.asarray(self._experts[e].forward(x2[idx]))
            if ye.shape != (t - s, self.output_dim):
                raise ShapeMismatchError(
                    f"experts[{e}].forward returned shape {ye.shape}; expected "
                    f"({t - s}, {self.output_dim})"
                )
            ye = ye.astype(dtype, copy=False) * wts[s:t, None]
            # An expert holds each token at most once, so this fancy-index add has no
            # repeated indices and needs no np.add.at.
            out[idx] += ye
        return out

    def __repr__(self) -> str:
        cap = f", capacity={self._capacity}" if self._capacity is not None else ""
        return (
            f"MoELayer(num_experts={self.num_experts}, d_model={self.input_dim}, "
            f"output_dim={self.output_dim}, routing={self._routing!r}, top_k={self._top_k}"
            f"{cap}, normalize={self._normalize})"
        )
