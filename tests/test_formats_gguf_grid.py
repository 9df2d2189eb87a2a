"""qlinear.formats.gguf_grid: GPTQ onto the Q8_0 / Q4_0 / Q4_1 grids as stored, against a
slow reference written out with plain loops and against llama.cpp's reference rounding
(gguf-py's ``quants.quantize``); the file gguf-py reads is the weight GPTQ optimised."""

from __future__ import annotations

import numpy as np
import pytest

from qlinear import InvalidParamsError, ShapeMismatchError
from qlinear.formats.gguf_grid import gptq_quantize_gguf, quantize_weight
from qlinear.gptq import hessian

gguf = pytest.importorskip("gguf")
from qlinear.formats import gguf as qg  # noqa: E402

KINDS = ("q8_0", "q4_0", "q4_1")


def f16(v: float) -> float:
    # llama.cpp computes a block's step in float32, then stores it as float16
    return float(np.float16(np.float32(v)))


def block_rule(values: list[float], kind: str) -> tuple[float, float]:
    """(d, m) of one block by llama.cpp's rule, written out independently."""
    if kind == "q8_0":
        return f16(max(abs(v) for v in values) / 127), 0.0
    if kind == "q4_0":
        big = max(values, key=abs)  # the first value of largest magnitude, with its sign
        return f16(big / -8), 0.0
    lo, hi = min(values), max(values)
    return f16((hi - lo) / 15), f16(lo)


RANGES = {"q8_0": (-128, 127), "q4_0": (-8, 7), "q4_1": (0, 15)}


def slow_gguf_gptq(w, x, kind, act_order, damp=0.01):
    """Column-by-column optimal brain quantization with plain loops onto the stored grid:
    the inverse Hessian of the columns still to quantize is taken directly; each block's
    (d, m) comes from llama.cpp's rule on its current weights when its first column is
    reached; the error fed back is against ``d * q + m`` with d and m float16."""
    lo_q, hi_q = RANGES[kind]
    w = np.array(w, dtype=np.float64)
    out_f, in_f = w.shape
    h = 2.0 / x.shape[0] * (x.T.astype(np.float64) @ x.astype(np.float64))
    for i in range(in_f):
        if h[i, i] == 0:
            h[i, i] = 1.0
            w[:, i] = 0.0
    diag = [h[i, i] for i in range(in_f)]
    order = sorted(range(in_f), key=lambda i: -diag[i]) if act_order else list(range(in_f))
    mean_diag = sum(diag) / in_f
    for i in range(in_f):
        h[i, i] += damp * mean_diag
    params: dict[tuple[int, int], tuple[float, float]] = {}
    out = np.zeros((out_f, in_f))
    for step, j in enumerate(order):
        rest = order[step:]
        hinv = np.linalg.inv(h[np.ix_(rest, rest)])
        g = j // 32
        for r in range(out_f):
            if (r, g) not in params:
                params[(r, g)] = block_rule([w[r, c] for c in range(32 * g, 32 * g + 32)], kind)
            d, m = params[(r, g)]
            q = 0.0 if d == 0 else min(max(np.rint((w[r, j] - m) / d), lo_q), hi_q)
            out[r, j] = d * q + m
            e = (w[r, j] - out[r, j]) / hinv[0, 0]
            for t, k in enumerate(rest):
                w[r, k] -= e * hinv[0, t]
    return out


def correlated_inputs(rng, n, k):
    mix = np.eye(k) + 0.4 * rng.standard_normal((k, k))
    return (rng.standard_normal((n, k)) @ mix) * rng.uniform(0.2, 3.0, k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_slow_reference_on_the_stored_grid(rng, kind, act_order):
    w = rng.standard_normal((5, 96))
    w[1, 32:64] = 0.0  # an all-zero block: d == 0
    x = correlated_inputs(rng, 200, 96)
    x[:, 40] = 0.0  # a dead input
    ref = slow_gguf_gptq(w, x, kind, act_order)
    # block_size 24: blocks of GPTQ's lazy update straddle the 32-column GGUF blocks
    layer = gptq_quantize_gguf(w, hessian(x), kind, act_order=act_order, block_size=24)
    np.testing.assert_allclose(layer.dequantize(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_gguf_py_reads_the_weight_gptq_optimised_and_it_beats_llama_cpp_rounding(rng, kind, method):
    w = rng.standard_normal((48, 128)).astype(np.float32)
    x = correlated_inputs(rng, 400, 128)
    layer = gptq_quantize_gguf(w, hessian(x), kind, method=method, act_order=True)
    qt = qg._qtype(gguf, kind)
    raw = qg.encode_layer(layer, kind, "t")
    np.testing.assert_array_equal(gguf.quants.dequantize(raw, qt), layer.dequantize(np.float32))
    rounded = gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt).astype(np.float64)
    err_gptq = np.linalg.norm(x @ (layer.dequantize() - w).T)
    err_rtn = np.linalg.norm(x @ (rounded - w).T)
    assert err_gptq < 0.9 * err_rtn


def test_q4_0_uses_the_whole_code_range(rng):
    # llama.cpp's rule: the value of largest magnitude gets code -8, exactly reproduced
    w = rng.standard_normal((16, 64))
    layer = quantize_weight(w, "q4_0")
    b = w.reshape(16, 2, 32)
    i = np.abs(b).argmax(-1)[..., None]
    big = np.take_along_axis(b, i, -1)[..., 0]
    got = np.take_along_axis(layer.dequantize().reshape(16, 2, 32), i, -1)[..., 0]
    np.testing.assert_array_equal(got, -8 * np.float16(big / -8).astype(np.float64))
    raw = qg.encode_layer(layer, "q4_0", "t").reshape(16, 2, 18)
    nibbles = np.concatenate([raw[..., 2:] & 15, raw[..., 2:] >> 4], -1)
    assert nibbles.min() == 0 and nibbles.max() == 15  # stored codes q + 8: -8..7


@pytest.mark.parametrize("kind", KINDS)
def test_mse_blocks_are_no_worse_than_minmax(rng, kind):
    w = rng.standard_t(3, (20, 96))  # heavy tails: clipping pays
    err = {}
    for method in ("minmax", "mse"):
        d = quantize_weight(w, kind, method=method).dequantize() - w
        err[method] = (d.reshape(20, 3, 32) ** 2).sum(-1)
    assert np.all(err["mse"] <= err["minmax"])
    assert np.any(err["mse"] < err["minmax"])


def test_errors(rng):
    w = rng.standard_normal((4, 64))
    h = np.eye(64)
    with pytest.raises(InvalidParamsError, match="gguf type"):
        gptq_quantize_gguf(w, h, "q5_0")
    with pytest.raises(InvalidParamsError, match="percentile"):
        gptq_quantize_gguf(w, h, "q4_0", method="percentile")
    with pytest.raises(InvalidParamsError, match="divisible by 32; got 40"):
        gptq_quantize_gguf(rng.standard_normal((4, 40)), np.eye(40), "q8_0")
    with pytest.raises(ShapeMismatchError, match="hessian"):
        gptq_quantize_gguf(w, np.eye(32), "q8_0")
    with pytest.raises(InvalidParamsError, match="method"):
        quantize_weight(w, "q8_0", method="percentile")
