"""Numbers at the edges of float32/float64 in both activation modes: denormal inputs,
inputs near the largest float32, all-zero rows. Results are finite (and within the
documented int8-mode bound) or a clear InvalidInputError; never Inf/NaN."""

from __future__ import annotations

import numpy as np
import pytest

import qlinear
from qlinear import InvalidInputError, QuantizedLinear

BACKENDS = qlinear.kernels.available_backends()
F32 = np.finfo(np.float32)


def _layer(rng, qtype, backend, out=20, inp=37):
    w = rng.standard_normal((out, inp))
    return QuantizedLinear.from_fp(w, qlinear.calibrate_linear(w, qtype=qtype), backend=backend)


CASES = {
    "f32 subnormal": lambda r: np.full((3, 37), 1e-40, np.float32),
    "f32 smallest subnormal": lambda r: np.full((3, 37), 1e-45, np.float32),
    "f32 smallest normal": lambda r: np.full((3, 37), F32.tiny, np.float32),
    "f32 mixed signs subnormal": lambda r: (r.standard_normal((3, 37)) * 1e-39).astype(np.float32),
    "f32 one tiny row one normal row": lambda r: np.stack(
        [np.full(37, 1e-42), r.standard_normal(37)]
    ).astype(np.float32),
    "f32 near max / 1e3": lambda r: (r.standard_normal((3, 37)) * 1e35).astype(np.float32),
    "f64 subnormal": lambda r: r.standard_normal((3, 37)) * 1e-310,
    "f64 near max / 1e4": lambda r: r.standard_normal((3, 37)) * 1e304,
    "zeros": lambda r: np.zeros((3, 37), np.float32),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qtype", ["int8", "int4"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["float", "int8"])
def test_edge_inputs_give_finite_bounded_results(rng, backend, qtype, case, mode):
    layer = _layer(rng, qtype, backend)
    x = CASES[case](rng)
    y = layer.forward(x, activations=mode)
    assert y.dtype == x.dtype and np.isfinite(y).all()
    w = layer.dequantize()
    ref = x.astype(np.float64) @ w.T
    amax = np.abs(x.astype(np.float64)).max(axis=1, keepdims=True)
    l1 = np.abs(w).sum(axis=1)[None, :]
    if mode == "float":
        # rounding of the dtype only (float32: about 2**-24 per term, subnormals absolute)
        eps = np.finfo(x.dtype).eps
        tiny = np.finfo(x.dtype).smallest_subnormal
        bound = 4 * 37 * eps * amax * l1 + 37 * tiny * l1
    else:
        # docs: |y - y_float| <= max|row| / 254 * sum|W| per row. A row whose max|x| / 127
        # is below the smallest normal float64 counts as zero in the reference (scale
        # floor), so its error is at most max|row| * sum|W| (then below 1e-305).
        step = np.where(amax / 127 < np.finfo(np.float64).tiny, amax, amax / 254)
        eps = np.finfo(x.dtype).eps
        # plus the final rounding of y to x's dtype (subnormal outputs: one spacing)
        tiny = np.finfo(x.dtype).smallest_subnormal
        bound = step * l1 * (1 + 1e-6) + 4 * 37 * eps * amax * l1 + tiny
    assert (np.abs(y - ref) <= bound).all(), np.abs(y - ref).max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["float", "int8"])
@pytest.mark.parametrize("scale", [3e38, F32.max])
def test_float32_overflow_is_a_clear_error(rng, backend, mode, scale):
    layer = _layer(rng, "int8", backend)
    x = np.full((2, 37), scale, np.float32)
    with pytest.raises(InvalidInputError, match="overflowed float32"):
        layer.forward(x, activations=mode)
    # the same values in float64 fit
    assert np.isfinite(layer.forward(x.astype(np.float64), activations=mode)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["float", "int8"])
@pytest.mark.parametrize("fmt", [("int8", None), ("int4", 32)])
def test_overflow_in_one_output_block_of_many_is_found(rng, backend, mode, fmt):
    # Each native task checks the outputs it wrote: one overflowing row of x in a large
    # call (several tasks and row chunks, the AMX tiles where the CPU has them) is found,
    # whichever task holds it; the same call without that row gives finite outputs.
    qtype, gs = fmt
    w = rng.standard_normal((200, 256)).astype(np.float32)
    gran = "per_group" if gs else "per_channel"
    layer = QuantizedLinear.from_fp(
        w, qlinear.calibrate_linear(w, qtype, gran, group_size=gs), backend=backend
    )
    x = rng.standard_normal((300, 256)).astype(np.float32)
    assert np.isfinite(layer.forward(x, activations=mode)).all()
    x[277] = 3e38
    with pytest.raises(InvalidInputError, match="overflowed float32"):
        layer.forward(x, activations=mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_weights_in_float64(rng, backend):
    w = rng.standard_normal((8, 16)) * 1e300
    layer = QuantizedLinear.from_fp(w, qlinear.calibrate_linear(w), backend=backend)
    x = rng.standard_normal((2, 16))
    for mode in ("float", "int8"):
        try:
            y = layer.forward(x, activations=mode)
        except InvalidInputError as exc:
            assert "overflowed" in str(exc)
        else:
            assert np.isfinite(y).all()
    with pytest.raises(qlinear.InvalidParamsError, match="does not fit in float32"):
        layer.dequantize(np.float32)
