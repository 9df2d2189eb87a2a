"""Every kernel backend the machine supports against the NumPy reference.

Layers are built with ``QuantizedLinear.from_fp(w, p, backend=name)`` for each backend in
``available_backends()``; float mode is checked against ``x @ dequantize().T + bias``
computed in float64 (elementwise, relative to ``|x| @ |W|.T + |bias|``), int8 mode
bit-for-bit against the NumPy backend and, on integer-valued inputs, against an exact
int64 NumPy product.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qlinear
from qlinear import QuantizationParams, QuantizedLinear, calibrate_linear, kernels
from qlinear.errors import InvalidInputError

BACKENDS = kernels.available_backends()
NATIVE = [b for b in BACKENDS if b != "numpy"]
SIZES = (1, 3, 17, 63, 65, 127)
TOL = {np.float32: 1e-5, np.float64: 1e-12}

# (qtype, granularity, group_size) formats the kernels must handle.
FORMATS = [
    ("int8", "per_tensor", None),
    ("int8", "per_channel", None),
    ("int8", "per_group", 32),
    ("int4", "per_channel", None),
    ("int4", "per_group", 16),
]


def make_layer(rng, out_f, in_f, fmt, scheme, backend, bias=True):
    qtype, gran, gs = fmt
    w = rng.standard_normal((out_f, in_f)) * rng.uniform(0.5, 2.0, size=(out_f, 1))
    p = calibrate_linear(w, qtype, gran, scheme, group_size=gs)
    b = rng.standard_normal(out_f) if bias else None
    return QuantizedLinear.from_fp(w, p, bias=b, backend=backend)


def check_float(layer, x):
    """Float mode within the documented tolerance of the float64 dequantized product."""
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.out_features)
    w = layer.dequantize(np.float64)
    x64 = x.astype(np.float64)
    b = layer.bias if layer.bias is not None else np.zeros(layer.out_features)
    expected = x64 @ w.T + b
    scale = np.abs(x64) @ np.abs(w).T + np.abs(b)
    tol = TOL[x.dtype.type]
    err = np.abs(y.astype(np.float64) - expected)
    bad = err > tol * scale + 1e-300
    assert not bad.any(), (
        f"float mode: max error {err.max():.3e} vs bound {tol:.0e} x scale "
        f"(worst rel {(err / np.maximum(scale, 1e-300)).max():.3e})"
    )


def reference_of(layer):
    """The same layer packed by the NumPy backend (the specification)."""
    return QuantizedLinear._from_stored(
        layer.stored_weight, layer.params, layer.in_features, layer.bias, "numpy"
    )


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"{f[0]}-{f[1]}-{f[2]}")
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_every_size_in_every_dimension(backend, fmt, scheme, rng):
    shapes = [(v, 17, 65) for v in SIZES] + [(3, v, 63) for v in SIZES]
    shapes += [(17, 65, v) for v in SIZES]
    for i, (n, out_f, in_f) in enumerate(shapes):
        layer = make_layer(rng, out_f, in_f, fmt, scheme, backend, bias=i % 2 == 0)
        ref = reference_of(layer)
        np.testing.assert_array_equal(layer.qweight, ref.qweight)
        np.testing.assert_array_equal(layer.stored_weight, ref.stored_weight)
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal((n, in_f)).astype(dtype)
            check_float(layer, x)
            np.testing.assert_array_equal(layer(x, activations="int8"), ref(x, activations="int8"))


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize(
    ("n", "out_f", "in_f", "fmt"),
    [
        (3, 4095, 127, FORMATS[1]),
        (2, 65, 4095, FORMATS[1]),
        (5, 63, 4095, FORMATS[4]),
        (1, 4095, 65, FORMATS[3]),
    ],
)
def test_large_dimensions(backend, n, out_f, in_f, fmt, rng):
    layer = make_layer(rng, out_f, in_f, fmt, "asymmetric", backend)
    ref = reference_of(layer)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((n, in_f)).astype(dtype)
        check_float(layer, x)
        np.testing.assert_array_equal(layer(x, activations="int8"), ref(x, activations="int8"))


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("qtype", ["int8", "int4"])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_int8_mode_integer_accumulation_is_exact(backend, qtype, scheme, rng):
    # Integer activations whose rows all reach +-127 quantize to themselves with scale 1,
    # and unit weight scales make the output the integer product itself.
    out_f, in_f, n = 37, 67, 9
    qmin, qmax = qlinear.qtypes.code_range(qtype, scheme)
    codes = rng.integers(qmin, qmax + 1, size=(out_f, in_f))
    zp = rng.integers(qmin, qmax + 1, size=out_f) if scheme == "asymmetric" else np.zeros(out_f)
    ones = np.ones(out_f)
    p = QuantizationParams(qtype, scheme, "per_channel", ones, zp, ones, ones)
    layer = QuantizedLinear.from_codes(codes, p, backend=backend)
    xi = rng.integers(-127, 128, size=(n, in_f))
    xi[:, 0] = np.where(rng.random(n) < 0.5, -127, 127)
    expected = xi.astype(np.int64) @ (codes.astype(np.int64) - zp.astype(np.int64)[:, None]).T
    y = layer(xi.astype(np.float64), activations="int8")
    np.testing.assert_array_equal(y, expected.astype(np.float64))


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("fmt", [FORMATS[1], FORMATS[2], FORMATS[3]], ids=lambda f: f[0] + f[1])
def test_int8_mode_batch_tails_match_the_reference(backend, fmt, rng):
    # Row tiles (6 and 12 rows on AVX-512, 8 on AVX2), chunks of 128/256 rows, four-block
    # tasks followed by a partial task and a partial block (149 = 2 * 64 + 16 + 5 rows),
    # and a 3-column tail, for batch sizes around every tile boundary.
    layer = make_layer(rng, 149, 131, fmt, "asymmetric", backend)
    ref = reference_of(layer)
    for n in (1, 3, 5, 6, 7, 11, 12, 13, 15, 16, 17, 31, 128, 129, 255, 256, 257):
        x = rng.standard_normal((n, 131)).astype(np.float32)
        np.testing.assert_array_equal(layer(x, activations="int8"), ref(x, activations="int8"))


@pytest.mark.parametrize("backend", NATIVE)
def test_int8_mode_long_rows_do_not_overflow_int32(backend, rng):
    # 70001 columns of u = code + 128 = 255 times 127: sum u * xq is above 2^31, so the
    # kernels must carry the integer sums in int64 past 8192 steps.
    out_f, in_f = 3, 70001
    codes = np.full((out_f, in_f), 127)
    codes[1, ::3] = -127
    zp = np.array([0, -5, 9])
    ones = np.ones(out_f)
    p = QuantizationParams("int8", "asymmetric", "per_channel", ones, zp, ones, ones)
    layer = QuantizedLinear.from_codes(codes, p, backend=backend)
    xi = np.full((2, in_f), 127)
    xi[1, 1::2] = -127
    expected = xi.astype(np.int64) @ (codes.astype(np.int64) - zp[:, None]).T
    y = layer(xi.astype(np.float64), activations="int8")
    np.testing.assert_array_equal(y, expected.astype(np.float64))


@pytest.mark.parametrize("backend", NATIVE)
def test_int8_mode_error_bound_on_large_layer(backend, rng):
    layer = make_layer(rng, 256, 1024, FORMATS[1], "symmetric", backend, bias=False)
    x = rng.standard_normal((8, 1024)).astype(np.float32)
    w = layer.dequantize()
    exact = x.astype(np.float64) @ w.T
    y = layer(x, activations="int8").astype(np.float64)
    # Each activation moves by at most half a step (max|row| / 127 / 2).
    step = np.abs(x).max(axis=1, keepdims=True).astype(np.float64) / 127
    bound = step / 2 * np.abs(w).sum(axis=1) * (1 + 1e-5) + 1e-6 * np.abs(exact)
    assert (np.abs(y - exact) <= bound).all()
    rel = np.linalg.norm(y - exact) / np.linalg.norm(exact)
    assert rel < 0.02  # Gaussian activations: about 0.8%


@pytest.mark.parametrize("backend", NATIVE)
def test_strided_and_nd_inputs(backend, rng):
    layer = make_layer(rng, 33, 65, FORMATS[1], "asymmetric", backend)
    ref = reference_of(layer)
    big = rng.standard_normal((12, 130))
    for x in (big[::2, ::2], big[::3, :65], np.asfortranarray(big[:5, :65]), big[::-1, 1:66]):
        for dtype in (np.float32, np.float64):
            xx = x.astype(dtype, copy=False) if dtype == np.float64 else x.astype(dtype)
            check_float(layer, xx)
            np.testing.assert_array_equal(
                layer(xx, activations="int8"), ref(xx, activations="int8")
            )
    x3 = rng.standard_normal((2, 3, 65)).astype(np.float32)
    np.testing.assert_array_equal(layer(x3).reshape(6, -1), layer(x3.reshape(6, 65)))


@pytest.mark.parametrize("backend", NATIVE)
def test_extreme_inputs(backend, rng):
    in_f = 65
    for fmt in (FORMATS[1], FORMATS[2], FORMATS[3]):
        layer = make_layer(rng, 19, in_f, fmt, "asymmetric", backend)
        ref = reference_of(layer)
        x = rng.standard_normal((5, in_f))
        x[0] *= np.logspace(-30, 30, in_f)  # huge dynamic range in one row
        x[1] = 0.0  # a row of zeros
        x[2] = 0.0
        x[2, 40] = 3.5  # a single non-zero
        x[3] = 1e-300  # tiny
        x[4, :] = -1e30
        check_float(layer, x)
        check_float(layer, x[:3].astype(np.float32))
        np.testing.assert_array_equal(layer(x, activations="int8"), ref(x, activations="int8"))
        y0 = layer(x[1:2], activations="int8")
        b = layer.bias
        np.testing.assert_array_equal(y0[0], b)


@pytest.mark.parametrize("backend", NATIVE)
def test_int8_mode_activation_ties_round_like_the_reference(backend, rng):
    # x / scale exactly on a half-integer with a scale whose reciprocal is inexact (3,
    # 0.1 * 7, ...), just off a half-integer, and scales too tiny or huge for a normal
    # reciprocal: every row must quantize exactly as ref.quantize_rows_int8.
    in_f = 256
    layer = make_layer(rng, 40, in_f, FORMATS[1], "asymmetric", backend)
    ref = reference_of(layer)
    k = rng.integers(-127, 127, size=in_f) + 0.5
    rows = []
    for s in (3.0, 0.7, 1 / 3, 5e-7, 123.456):
        r = k * s
        r[0] = 127 * s  # the row maximum: scale == s (up to one rounding)
        rows += [r, np.nextafter(r, np.inf), np.nextafter(r, -np.inf)]
    rows += [k * 1e-303, k * 1e303]
    x = np.array(rows)
    np.testing.assert_array_equal(layer(x, activations="int8"), ref(x, activations="int8"))
    t32 = (k * 3.0).astype(np.float32)
    x32 = np.stack(
        [t32, np.nextafter(t32, np.float32(np.inf)), np.nextafter(t32, np.float32(-np.inf))]
    )
    x32[:, 0] = 381.0
    np.testing.assert_array_equal(layer(x32, activations="int8"), ref(x32, activations="int8"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", [FORMATS[1], ("int8", "per_group", 6)], ids=["g1", "g6"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_int8_mode_rejects_non_finite_x_naming_the_first(backend, fmt, bad, rng):
    # Native int8 mode finds NaN/Inf while quantizing (no separate pass over x); the
    # error names the first bad element as the float mode and the NumPy backend do.
    in_f = 70
    w = rng.standard_normal((33, in_f))
    p = calibrate_linear(w, fmt[0], fmt[1], "symmetric", group_size=fmt[2])
    layer = QuantizedLinear.from_fp(w, p, backend=backend)
    for dtype in (np.float32, np.float64):
        for n, (i, j) in ((1, (0, 69)), (20, (13, 5)), (40, (39, 0))):
            x = rng.standard_normal((n, in_f)).astype(dtype)
            x[i, j] = bad
            x[i, min(j + 1, in_f - 1)] = np.nan  # a later bad value is not the one named
            for mode in ("int8", "float"):
                with pytest.raises(InvalidInputError, match=rf"index \({i}, {j}\)"):
                    layer(x, activations=mode)
    x = rng.standard_normal((3, in_f))
    np.testing.assert_array_equal(
        layer(x, activations="int8"), reference_of(layer)(x, activations="int8")
    )


@pytest.mark.parametrize("backend", NATIVE)
def test_results_do_not_depend_on_thread_count(backend, rng):
    layer = make_layer(rng, 300, 500, FORMATS[2], "asymmetric", backend)
    x = rng.standard_normal((40, 500)).astype(np.float32)
    before = kernels.get_num_threads()
    try:
        out = {}
        for t in (1, 2, 3):
            qlinear.set_num_threads(t)
            out[t] = (layer(x), layer(x, activations="int8"))
    finally:
        qlinear.set_num_threads(before)
    for t in (2, 3):
        np.testing.assert_array_equal(out[t][0], out[1][0])
        np.testing.assert_array_equal(out[t][1], out[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", [FORMATS[1], FORMATS[4]], ids=["int8", "int4-g16"])
def test_prefetch_changes_no_result_and_outlives_its_arrays(backend, fmt, rng):
    # A prefetch request (the model runners send one per linear, for the next two) only
    # warms caches: results with and without it are the same bits, a request for a
    # layer freed before the pool gets to it is harmless, an empty one is a no-op.
    layer = make_layer(rng, 70, 96, fmt, "asymmetric", backend)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    before = kernels.get_num_threads()
    try:
        qlinear.set_num_threads(2)
        want = (layer(x), layer(x, activations="int8"))
        np.testing.assert_array_equal(want[1], reference_of(layer)(x, activations="int8"))
        arrays = layer._prefetch_arrays()  # the packed codes and scale panels, or none
        assert (len(arrays) == 2) == (backend != "numpy")
        assert all(a.flags.c_contiguous for a in arrays)
        for _ in range(3):
            gone = make_layer(rng, 300, 512, fmt, "symmetric", backend)
            kernels.native.prefetch(gone._prefetch_arrays())
            del gone
            kernels.native.prefetch(layer._prefetch_arrays())
            got = (layer(x), layer(x, activations="int8"))
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        native = pytest.importorskip("qlinear._native") if backend != "numpy" else None
        if native is not None:
            native.prefetch([])
            native.prefetch([np.zeros(0, np.uint8), np.zeros((3, 0), np.float32)])
            np.testing.assert_array_equal(layer(x), want[0])
    finally:
        qlinear.set_num_threads(before)


@pytest.mark.parametrize("backend", NATIVE)
def test_results_do_not_depend_on_the_pool_wait_policy(backend, rng):
    # The pool's wait policy (spin time, pause or yield, sleeping at once) decides when a
    # worker joins a job, never what a task computes.
    native = pytest.importorskip("qlinear._native")
    layer = make_layer(rng, 300, 500, FORMATS[4], "asymmetric", backend)
    x = rng.standard_normal((40, 500)).astype(np.float32)
    before_policy, before_threads = native.spin_policy(), kernels.get_num_threads()
    out = []
    try:
        qlinear.set_num_threads(2)
        for spin_us, yield_ in ((0, False), (50, False), (5000, False), (200, True)):
            native.set_spin_policy(spin_us, yield_)
            for _ in range(3):  # back to back: workers caught spinning and sleeping
                out.append((layer(x), layer(x, activations="int8")))
    finally:
        native.set_spin_policy(*before_policy)
        qlinear.set_num_threads(before_threads)
    assert native.spin_policy() == before_policy
    for y_float, y_int8 in out[1:]:
        np.testing.assert_array_equal(y_float, out[0][0])
        np.testing.assert_array_equal(y_int8, out[0][1])


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("qtype", ["int8", "int4"])
def test_packing_round_trip_and_nbytes(backend, qtype, rng):
    for out_f, in_f in ((1, 1), (17, 3), (63, 65), (128, 4096)):
        fmt = (qtype, "per_channel", None)
        layer = make_layer(rng, out_f, in_f, fmt, "asymmetric", backend, bias=True)
        ref = reference_of(layer)
        np.testing.assert_array_equal(layer.stored_weight, ref.stored_weight)
        np.testing.assert_array_equal(layer.qweight, ref.qweight)
        np.testing.assert_array_equal(layer.dequantize(), ref.dequantize())
        # Packed codes take what canonical storage takes (int4: no per-row padding).
        expected = out_f * in_f if qtype == "int8" else (out_f * in_f + 1) // 2
        assert expected <= layer._weight.nbytes <= ref.stored_weight.nbytes
        # Native int8 kernels keep their own zero points (+128, the unsigned-code domain)
        # and a float32 copy of the scales (the panels), nothing more.
        extra = layer.zero_points.nbytes + 4 * layer.scales.size
        assert layer.nbytes <= 1.05 * ref.nbytes + extra


def test_per_group_sizes_not_multiple_of_four_still_match(rng):
    for backend in NATIVE:
        layer = make_layer(rng, 9, 20, ("int8", "per_group", 6), "asymmetric", backend)
        ref = reference_of(layer)
        x = rng.standard_normal((3, 20))
        check_float(layer, x)
        np.testing.assert_array_equal(layer(x, activations="int8"), ref(x, activations="int8"))


def _run_with_backend(value: str) -> subprocess.CompletedProcess:
    src = str(Path(qlinear.__file__).resolve().parent.parent)
    env = dict(os.environ, QLINEAR_BACKEND=value)
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        "import numpy as np, qlinear\n"
        "from qlinear import QuantizedLinear, calibrate_linear\n"
        "w = np.arange(12.0).reshape(3, 4) - 5\n"
        "l = QuantizedLinear.from_fp(w, calibrate_linear(w, 'int8', 'per_channel', 'symmetric'))\n"
        "print(qlinear.backend_info()['backend'], l.backend)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_env_var_forces_each_backend():
    for name in BACKENDS:
        r = _run_with_backend(name)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [name, name]
    r = _run_with_backend("no-such-backend")
    assert r.returncode != 0 and "QLINEAR_BACKEND" in r.stderr


def test_backend_info_reports_native_status():
    info = qlinear.backend_info()
    assert info["backend"] in BACKENDS and info["threads"] >= 1
    assert "native" in info
    if NATIVE:
        assert info["native"] == "ok"


def test_missing_extension_falls_back_to_numpy_with_one_warning():
    src = str(Path(qlinear.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=src)
    env.pop("QLINEAR_BACKEND", None)
    code = (
        "import sys, warnings\n"
        "sys.modules['qlinear._native'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import qlinear\n"
        "    import numpy as np\n"
        "    w = np.eye(3)\n"
        "    p = qlinear.calibrate_linear(w, 'int8', 'per_channel', 'symmetric')\n"
        "    y = qlinear.QuantizedLinear.from_fp(w, p)(np.ones(3))\n"
        "info = qlinear.backend_info()\n"
        "print(len(caught), info['backend'], info['native'].split(':')[0], y.tolist())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:3] == ["1", "numpy", "unavailable"]


@pytest.mark.parametrize("backend", NATIVE)
def test_concurrent_python_threads_get_the_serial_results(backend, rng):
    from concurrent.futures import ThreadPoolExecutor

    layer = make_layer(rng, 200, 300, FORMATS[4], "asymmetric", backend)
    xs = [rng.standard_normal((n, 300)).astype(np.float32) for n in (1, 7, 40, 3) * 3]
    serial = [(layer(x), layer(x, activations="int8")) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        par = list(pool.map(lambda x: (layer(x), layer(x, activations="int8")), xs))
    for (a, b), (c, d) in zip(serial, par, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def with_float16_scales(layer, backend):
    """The layer with its scales rounded to float16 (GGUF's block scales: float32 panels
    then hold the scales exactly)."""
    p = layer.params
    p16 = QuantizationParams(
        p.qtype, p.scheme, p.granularity, p.scale.astype(np.float16).astype(np.float64),
        p.zero_point, p.min_val, p.max_val, group_size=p.group_size,
    )  # fmt: skip
    return QuantizedLinear._from_stored(
        layer.stored_weight, p16, layer.in_features, layer.bias, backend
    )


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("gs", [32, 128])
@pytest.mark.parametrize("qtype", ["int4", "int8"])
@pytest.mark.parametrize("scales", ["float64", "float16"])
def test_grouped_int8_mode_bit_exact_on_odd_shapes_and_threads(backend, gs, qtype, scales, rng):
    # W4A8 / W8A8 per group (the GGUF group of 32 and group 128): step pairs with an odd
    # step left over (in % 8 == 4), partial last groups, tails (in % 4 != 0), partial
    # blocks (out % 16 != 0), 1..49 rows of x, 1/2/3 threads; float64 scales and
    # float16-valued ones (float32 panels), uniform (symmetric) and per-group zero points.
    before = kernels.get_num_threads()
    try:
        shapes = [(17, 1), (64, 3), (65, 63), (63, 65), (33, 127), (80, 4095), (64, 4092)]
        shapes += [(16, 260), (128, 260), (64, 1028)]  # 4 full blocks: the fused 1-row path
        for i, (out_f, in_f) in enumerate(shapes):
            fmt = (qtype, "per_group", gs)
            scheme = "asymmetric" if i % 2 else "symmetric"
            layer = make_layer(rng, out_f, in_f, fmt, scheme, backend, bias=i % 3 == 0)
            if scales == "float16":
                layer = with_float16_scales(layer, backend)
            panels = layer._weight.panels
            assert panels.scales.dtype == np.float32
            if scheme == "symmetric":  # one zero point for the whole layer: none read
                assert panels.zp is None
            ref = reference_of(layer)
            for n in (1, 2, 7, 13, 17, 49):  # 13: a 12-row tile + 1; 49: int4 expanded
                x = rng.standard_normal((n, in_f)).astype(np.float32 if n % 2 else np.float64)
                expected = ref(x, activations="int8")
                for t in (1, 2, 3):
                    qlinear.set_num_threads(t)
                    np.testing.assert_array_equal(layer(x, activations="int8"), expected)
                check_float(layer, x)
    finally:
        qlinear.set_num_threads(before)


TILED = [b for b in NATIVE if b == "amx"]


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize(
    "fmt",
    [("int8", "per_channel", None), ("int8", "per_group", 32), ("int4", "per_group", 32),
     ("int4", "per_group", 64), ("int8", "per_tensor", None), ("int4", "per_channel", None)],
    ids=lambda f: f"{f[0]}-{f[1]}-{f[2]}",
)  # fmt: skip
def test_int8_mode_tile_shapes_bit_exact(backend, fmt, rng):
    # The shapes the AMX tiles take (four full 16-row blocks, in a multiple of 32 or 64,
    # 16 or more rows of x), next to ones they leave to the vpdpbusd kernels (a partial
    # last block quad, in % 32 != 0): 16..300 rows (300: several row chunks), both
    # schemes, bias or not, float32 and float64 x, 1/2/3 threads. On a CPU without AMX
    # the same shapes run on the other kernels, against the same reference.
    before = kernels.get_num_threads()
    try:
        for i, (out_f, in_f) in enumerate([(64, 64), (133, 96), (192, 576), (64, 1024), (70, 100)]):
            scheme = "asymmetric" if i % 2 else "symmetric"
            layer = make_layer(rng, out_f, in_f, fmt, scheme, backend, bias=i % 2 == 0)
            ref = reference_of(layer)
            for n in (16, 17, 40, 129, 300):
                x = (rng.standard_normal((n, in_f)) * 4).astype(np.float32 if n % 2 else np.float64)
                expected = ref(x, activations="int8")
                for t in (1, 2, 3):
                    qlinear.set_num_threads(t)
                    np.testing.assert_array_equal(layer(x, activations="int8"), expected)
    finally:
        qlinear.set_num_threads(before)


@pytest.mark.skipif(not TILED, reason="no AMX on this CPU (or not enabled by the OS)")
def test_amx_tiles_run_where_they_apply_and_only_there(rng):
    from qlinear import _native

    def tasks(out_f, in_f, n, fmt=("int8", "per_channel", None)):
        layer = make_layer(rng, out_f, in_f, fmt, "symmetric", "amx")
        x = rng.standard_normal((n, in_f)).astype(np.float32)
        before = _native.amx_tasks()
        y = layer(x, activations="int8")
        np.testing.assert_array_equal(y, reference_of(layer)(x, activations="int8"))
        return _native.amx_tasks() - before

    assert tasks(128, 256, 40) == 2  # two quads of blocks, one row chunk
    assert tasks(128, 256, 40, ("int4", "per_group", 32)) == 2
    assert tasks(128, 256, 15) == 0  # fewer rows than a tile: vpdpbusd
    assert tasks(128, 256, 20, ("int4", "per_group", 32)) == 0  # int4 from 32 rows
    assert tasks(128, 100, 40) == 0  # in % 32 != 0
    assert tasks(70, 256, 40) == 1  # the partial second quad goes to vpdpbusd
    layer = make_layer(rng, 128, 256, FORMATS[1], "symmetric", "avx512")
    before = _native.amx_tasks()
    layer(rng.standard_normal((40, 256)).astype(np.float32), activations="int8")
    assert _native.amx_tasks() == before  # the avx512 backend never uses the tiles
