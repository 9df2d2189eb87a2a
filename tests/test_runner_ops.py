"""The decoder runner's native float steps on every native backend: the attention
softmax (against the float64 softmax of the definition and ``softmax_rows_numpy``, its
float32 specification), SwiGLU (against float64) and RoPE (bit for bit against
``apply_rope``), on awkward widths, ranges and magnitudes."""

from __future__ import annotations

import numpy as np
import pytest

from qlinear import kernels
from qlinear.kernels import native
from qlinear.models.decoder_ops import softmax_rows, softmax_rows_numpy

NATIVE = [b for b in kernels.available_backends() if b != "numpy"]


def softmax64(scores: np.ndarray, scale: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    s = scores.astype(np.float64) * np.float32(scale)
    cols = np.arange(s.shape[-1])
    vis = (cols >= lo[:, None]) & (cols <= hi[:, None])
    s = np.where(vis, s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ranges(rng, per: int, cols: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    if kind == "all":
        return np.zeros(per, np.int64), np.full(per, cols - 1, np.int64)
    if kind == "causal":
        hi = np.clip(np.arange(per) + (cols - per), 0, cols - 1).astype(np.int64)
        return np.zeros(per, np.int64), hi
    hi = rng.integers(0, cols, size=per)
    lo = np.array([rng.integers(0, h + 1) for h in hi])
    return lo.astype(np.int64), hi.astype(np.int64)


@pytest.mark.parametrize("backend", NATIVE)
def test_native_softmax_matches_the_definition_and_the_numpy_specification(backend, rng):
    tiny = np.finfo(np.float32).tiny
    for cols in (1, 2, 15, 16, 17, 33, 100, 513):
        for per in (1, 3, 16):
            for kind in ("all", "causal", "random"):
                for mag in (1e-3, 1.0, 30.0, 300.0):
                    groups = int(rng.integers(1, 4))
                    x = (rng.standard_normal((groups, per, cols)) * mag).astype(np.float32)
                    lo, hi = ranges(rng, per, cols, kind)
                    scale = float(rng.choice([0.125, 1.0]))
                    got = x.copy()
                    native.softmax_rows(backend, got.reshape(-1, cols), scale, lo, hi)
                    want = softmax64(x, scale, lo, hi)
                    spec = softmax_rows_numpy(x.copy(), scale, lo, hi)
                    cols_i = np.arange(cols)
                    hidden = (cols_i < lo[:, None]) | (cols_i > hi[:, None])
                    assert (got[:, hidden] == 0).all()  # masked keys: exactly 0
                    # within 8 float32 ulps of the exact softmax of the float32 scores,
                    # plus what rounding s - max(s) to float32 moves (|s - max| ulps of
                    # exp's argument), as for the specification
                    s = x * np.float32(scale)
                    spread = np.abs(s - np.where(hidden, -np.inf, s).max(axis=-1, keepdims=True))
                    bound = (8 + spread) * np.finfo(np.float32).eps * want + 4 * tiny
                    assert (np.abs(got - want) <= bound).all(), (cols, per, kind, mag)
                    assert (np.abs(spec - want) <= bound).all(), (cols, per, kind, mag)
                    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-5)


def test_softmax_rows_dispatches_and_keeps_the_specification_elsewhere(rng):
    x = rng.standard_normal((2, 4, 40)).astype(np.float32)
    lo, hi = np.array([0, 0, 5, 9]), np.array([3, 39, 20, 9])
    got = softmax_rows(x.copy(), 0.5, lo, hi)
    np.testing.assert_allclose(got, softmax_rows_numpy(x.copy(), 0.5, lo, hi), rtol=1e-6,
                               atol=1e-7)  # fmt: skip
    # not C-contiguous: the NumPy path, bit for bit (both work in place: fresh copies)
    lo2, hi2 = np.array([0, 0, 5, 9]), np.array([3, 19, 12, 9])
    np.testing.assert_array_equal(
        softmax_rows(x.copy()[:, :, ::2], 0.5, lo2, hi2),
        softmax_rows_numpy(x.copy()[:, :, ::2], 0.5, lo2, hi2),
    )


@pytest.mark.skipif(native.STATUS != "ok", reason="native extension not built")
def test_native_softmax_rejects_ranges_outside_the_row():
    x = np.zeros((2, 8), np.float32)
    for lo, hi in (([0], [8]), ([3], [2]), ([-1], [4])):
        with pytest.raises(ValueError):
            native.softmax_rows(NATIVE[0], x, 1.0, np.array(lo), np.array(hi))
    with pytest.raises(ValueError):  # rows not a multiple of the query rows
        native.softmax_rows(NATIVE[0], np.zeros((3, 8), np.float32), 1.0, np.zeros(2, np.int64),
                            np.ones(2, np.int64))  # fmt: skip


@pytest.mark.parametrize("backend", NATIVE)
def test_native_swiglu_matches_the_definition(backend, rng):
    # silu(g) * up against float64 on awkward widths, gates from -120 to 120 (exp(-g)
    # overflows below about -88: silu's limit 0) and magnitudes of up.
    from qlinear.models.decoder_ops import swiglu

    for rows in (1, 3, 17):
        for d in (1, 15, 16, 17, 100, 1536):
            for mag in (0.01, 1.0, 40.0, 120.0):
                gu = (rng.standard_normal((rows, 2 * d)) * mag).astype(np.float32)
                got = native.swiglu_rows(backend, gu)
                g, u = gu[:, :d].astype(np.float64), gu[:, d:].astype(np.float64)
                with np.errstate(over="ignore"):
                    want = g / (1 + np.exp(-g)) * u
                with np.errstate(over="ignore"):
                    spec = swiglu(gu, d)  # the dispatcher (native here), as the runner calls
                # silu(g) for g < -88.3 is flushed to 0 (exactly, it is below 4e-37)
                bound = 6 * np.finfo(np.float32).eps * np.abs(want) + 4e-37 * (np.abs(u) + 1)
                assert got.shape == (rows, d) and got.dtype == np.float32
                assert (np.abs(got - want) <= bound).all(), (rows, d, mag)
                assert (np.abs(spec - want) <= bound).all(), (rows, d, mag)


@pytest.mark.parametrize("backend", NATIVE)
def test_native_rope_is_bit_identical_to_apply_rope(backend, rng):
    # A column slice of a fused projection (row stride wider than the slice), several
    # sequences over one table (rows % t == 0), head sizes 2..128.
    from qlinear.models.rope import apply_rope

    for t in (1, 5, 64):
        for heads in (1, 3, 12):
            for d in (2, 6, 64, 128):
                b = int(rng.integers(1, 3))
                fused = rng.standard_normal((b * t, heads * d + 7)).astype(np.float32) * 10
                x = fused[:, : heads * d]
                ang = rng.uniform(-50, 50, size=(t, d // 2))
                ang = np.concatenate([ang, ang], axis=1)
                cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
                got = native.rope_rows(backend, x, heads, cos, sin)
                want = apply_rope(x.reshape(b, t, heads, d), cos[:, None], sin[:, None])
                np.testing.assert_array_equal(got, want.reshape(b * t, heads, d))
