"""Experts: the feed-forward blocks a mixture-of-experts layer routes tokens to.

Weights use the layout of :class:`qlinear.QuantizedLinear`: ``(out_features, in_features)``.
Each linear piece of an expert is either a float matrix or a layer with ``forward`` (a
``QuantizedLinear``), so float and quantized experts share one code path. Experts are
immutable and hold no per-call state: they are safe to call from several threads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._checks import as_array, check_finite
from ..errors import InvalidInputError, InvalidParamsError, ShapeMismatchError
from ._pieces import Piece, apply_piece, as_activation, as_piece, check_x, piece_dims

__all__ = ["Expert", "GatedExpert", "LinearExpert"]


@runtime_checkable
class Expert(Protocol):
    """What :class:`~qlinear.moe.MoELayer` needs from an expert.

    ``forward(x)``: float ``(tokens, input_dim)`` -> ``(tokens, output_dim)`` in x's dtype
    (float32 or float64); a 1-D ``(input_dim,)`` vector gives ``(output_dim,)``.
    """

    @property
    def input_dim(self) -> int: ...

    @property
    def output_dim(self) -> int: ...

    def forward(self, x: np.ndarray) -> np.ndarray: ...


def _check_dim(name: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise ShapeMismatchError(f"{name} must be a positive integer; got {n!r}")
    return int(n)


def _rng(seed: Any) -> np.random.Generator:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise InvalidParamsError(f"seed must be an integer or None; got {seed!r}")
    try:
        return np.random.default_rng(seed)
    except ValueError as exc:  # a negative seed
        raise InvalidParamsError(f"seed must be a non-negative integer; got {seed!r}") from exc


def _glorot(rng: np.random.Generator, d_in: int, d_out: int, dtype: Any) -> np.ndarray:
    # Glorot & Bengio (2010), normal variant: std = sqrt(2 / (fan_in + fan_out)).
    std = np.sqrt(2.0 / (d_in + d_out))
    return (rng.standard_normal((d_out, d_in)) * std).astype(dtype)


def _finite(y: np.ndarray, x2: np.ndarray, what: str) -> np.ndarray:
    """``y``, or InvalidInputError if finite inputs overflowed it to Inf/NaN."""
    if not np.isfinite(y).all():
        raise InvalidInputError(
            f"the {what} output overflowed {y.dtype} to Inf/NaN (largest |x| is "
            f"{float(np.abs(x2).max()):.3g}); expected inputs and weights whose products "
            "fit the dtype (pass float64 x for a wider range)"
        )
    return y


def _as_2d(x: Any, dim: int) -> tuple[np.ndarray, tuple[int, ...]]:
    a = check_x(x, dim)
    return a.reshape(-1, dim), a.shape[:-1]


class LinearExpert:
    """``y = x @ W.T + b``: W ``(d_out, d_in)`` float matrix or ``QuantizedLinear``,
    b float ``(d_out,)`` or None.

    ``forward``: ``(..., d_in)`` float32/float64 -> ``(..., d_out)`` in the same dtype
    (float16 computes in float32). A float W held in another dtype is cast per call.
    """

    __slots__ = ("_b", "_w")

    def __init__(self, weights: Piece, bias: np.ndarray | None = None) -> None:
        w = as_piece("weights", weights)
        d_out, _ = piece_dims(w)
        b = None
        if bias is not None:
            b = as_array("bias", bias)
            if b.dtype.kind != "f":
                raise InvalidInputError(f"bias must be floating point; got dtype {b.dtype}")
            if b.shape != (d_out,):
                raise ShapeMismatchError(
                    f"bias must have shape ({d_out},) to match the weights' out_features; "
                    f"got {b.shape}"
                )
            b = np.array(b, dtype=np.float64)
            check_finite("bias", b)
            b.setflags(write=False)
        self._w = w
        self._b = b

    @classmethod
    def from_arrays(cls, weights: Piece, bias: np.ndarray | None = None) -> LinearExpert:
        """From a float ``(d_out, d_in)`` matrix (shared, not copied) or a QuantizedLinear,
        and an optional float ``(d_out,)`` bias."""
        return cls(weights, bias)

    @classmethod
    def zeros(cls, d_in: int, d_out: int, *, dtype: Any = np.float64) -> LinearExpert:
        """All-zero weights ``(d_out, d_in)`` and bias ``(d_out,)``."""
        d_in, d_out = _check_dim("d_in", d_in), _check_dim("d_out", d_out)
        return cls(np.zeros((d_out, d_in), dtype=dtype), np.zeros(d_out))

    @classmethod
    def xavier_init(
        cls, d_in: int, d_out: int, seed: int | None = None, *, dtype: Any = np.float64
    ) -> LinearExpert:
        """Glorot-normal weights ``N(0, 2 / (d_in + d_out))`` of shape ``(d_out, d_in)`` from
        ``np.random.default_rng(seed)`` (same seed, same weights) and a zero bias."""
        d_in, d_out = _check_dim("d_in", d_in), _check_dim("d_out", d_out)
        return cls(_glorot(_rng(seed), d_in, d_out, dtype), np.zeros(d_out))

    @property
    def weights(self) -> Piece:
        """The weight piece: a read-only float ``(d_out, d_in)`` array or a QuantizedLinear."""
        return self._w

    @property
    def bias(self) -> np.ndarray | None:
        """float64 ``(d_out,)`` or None."""
        return self._b

    @property
    def input_dim(self) -> int:
        return piece_dims(self._w)[1]

    @property
    def output_dim(self) -> int:
        return piece_dims(self._w)[0]

    @property
    def pieces(self) -> dict[str, Piece]:
        """The linear pieces by name (``{"weights": W}``)."""
        return {"weights": self._w}

    @property
    def nbytes(self) -> int:
        """Bytes held: weights (or the quantized layer's ``nbytes``) plus bias."""
        return _piece_nbytes(self._w) + (0 if self._b is None else self._b.nbytes)

    def with_pieces(self, weights: Piece) -> LinearExpert:
        """The same expert with another weight piece (e.g. its quantized version)."""
        return LinearExpert(weights, self._b)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``(..., d_in)`` -> ``(..., d_out)``: ``x @ W.T + b``."""
        x2, lead = _as_2d(x, self.input_dim)
        with np.errstate(over="ignore", invalid="ignore"):
            y = apply_piece(self._w, x2)
            if self._b is not None:
                y += self._b.astype(y.dtype, copy=False)
        return _finite(y, x2, "LinearExpert").reshape(*lead, self.output_dim)

    __call__ = forward

    def __repr__(self) -> str:
        kind = "float" if isinstance(self._w, np.ndarray) else type(self._w).__name__
        return f"LinearExpert(d_in={self.input_dim}, d_out={self.output_dim}, {kind})"


class GatedExpert:
    """The gated feed-forward expert of Mixtral, Qwen-MoE, DeepSeek-MoE and OLMoE.

    ``y = down(act(gate(x)) * up(x))`` with gate, up ``(d_ff, d_model)`` and down
    ``(d_out, d_ff)`` (``d_out`` is usually ``d_model``), each a float matrix or a
    QuantizedLinear; ``act`` is ``"silu"`` (default), ``"gelu"`` (exact, erf),
    ``"gelu_tanh"`` or a callable on float arrays.

    ``forward``: ``(..., d_model)`` float32/float64 -> ``(..., d_out)``, same dtype.
    """

    __slots__ = ("_act", "_act_name", "_down", "_gate", "_up")

    def __init__(
        self,
        gate: Piece,
        up: Piece,
        down: Piece,
        *,
        activation: str | Callable[[np.ndarray], np.ndarray] = "silu",
    ) -> None:
        g, u, d = as_piece("gate", gate), as_piece("up", up), as_piece("down", down)
        gd, ud, dd = piece_dims(g), piece_dims(u), piece_dims(d)
        if gd != ud:
            raise ShapeMismatchError(
                f"gate and up must have the same shape (d_ff, d_model); got gate {gd} and up {ud}"
            )
        if dd[1] != gd[0]:
            raise ShapeMismatchError(
                f"down must have shape (d_out, d_ff) with d_ff = {gd[0]} (gate's rows); got {dd}"
            )
        self._gate, self._up, self._down = g, u, d
        self._act_name, self._act = as_activation(activation)

    @classmethod
    def from_arrays(
        cls,
        w_gate: Piece,
        w_up: Piece,
        w_down: Piece,
        *,
        activation: str | Callable[[np.ndarray], np.ndarray] = "silu",
    ) -> GatedExpert:
        """From gate, up ``(d_ff, d_model)`` and down ``(d_out, d_ff)`` (shared, not copied)."""
        return cls(w_gate, w_up, w_down, activation=activation)

    @classmethod
    def xavier_init(
        cls,
        d_model: int,
        d_ff: int,
        seed: int | None = None,
        *,
        activation: str | Callable[[np.ndarray], np.ndarray] = "silu",
        dtype: Any = np.float64,
    ) -> GatedExpert:
        """Glorot-normal gate, up ``(d_ff, d_model)`` and down ``(d_model, d_ff)``, drawn in
        that order from ``np.random.default_rng(seed)``."""
        d_model, d_ff = _check_dim("d_model", d_model), _check_dim("d_ff", d_ff)
        rng = _rng(seed)
        g = _glorot(rng, d_model, d_ff, dtype)
        u = _glorot(rng, d_model, d_ff, dtype)
        d = _glorot(rng, d_ff, d_model, dtype)
        return cls(g, u, d, activation=activation)

    @property
    def gate(self) -> Piece:
        return self._gate

    @property
    def up(self) -> Piece:
        return self._up

    @property
    def down(self) -> Piece:
        return self._down

    @property
    def activation(self) -> str:
        return self._act_name

    @property
    def input_dim(self) -> int:
        return piece_dims(self._gate)[1]

    @property
    def hidden_dim(self) -> int:
        return piece_dims(self._gate)[0]

    @property
    def output_dim(self) -> int:
        return piece_dims(self._down)[0]

    @property
    def pieces(self) -> dict[str, Piece]:
        """The linear pieces by name, in calibration order (gate, up, then down)."""
        return {"gate": self._gate, "up": self._up, "down": self._down}

    @property
    def nbytes(self) -> int:
        return sum(_piece_nbytes(p) for p in self.pieces.values())

    def with_pieces(self, gate: Piece, up: Piece, down: Piece) -> GatedExpert:
        """The same expert (same activation) with other pieces."""
        return GatedExpert(gate, up, down, activation=self._act)

    def hidden(self, x2: np.ndarray) -> np.ndarray:
        """``act(gate(x)) * up(x)`` for a validated 2-D ``x``: ``(tokens, d_ff)``."""
        h = self._act(apply_piece(self._gate, x2))
        h *= apply_piece(self._up, x2)
        return h

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``(..., d_model)`` -> ``(..., d_out)``: ``down(act(gate(x)) * up(x))``."""
        x2, lead = _as_2d(x, self.input_dim)
        with np.errstate(over="ignore", invalid="ignore"):
            y = apply_piece(self._down, self.hidden(x2))
        return _finite(y, x2, "GatedExpert").reshape(*lead, self.output_dim)

    __call__ = forward

    def __repr__(self) -> str:
        kind = "float" if isinstance(self._gate, np.ndarray) else type(self._gate).__name__
        return (
            f"GatedExpert(d_model={self.input_dim}, d_ff={self.hidden_dim}, "
            f"d_out={self.output_dim}, activation={self._act_name!r}, {kind})"
        )


def _piece_nbytes(p: Piece) -> int:
    n = getattr(p, "nbytes", None)
    if isinstance(n, (int, np.integer)):
        return int(n)
    raise InvalidParamsError(f"cannot count the bytes of a {type(p).__name__} piece")
