"""Forward-pass speed of the NumPy reference path against NumPy matmul and the
dequantize-everything design, on one layer, in one run.

    python benchmarks/bench_forward.py [--out 4096] [--in 4096] [--batches 1,16,256]

Prints milliseconds per call (median of several repeats) and each time as a ratio of the
NumPy float32 matmul measured in the same run; absolute times drift between machines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import qlinear


def median_ms(fn, *, min_time=0.3, max_reps=200) -> float:
    fn()  # warm up
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def make_cases(x32, w32, w64, ref_layer, layers):
    """name -> zero-argument callable, for one batch of inputs."""
    x64 = x32.astype(np.float64)
    cases = {
        "numpy float32 matmul": lambda: x32 @ w32.T,
        "numpy float64 matmul": lambda: x64 @ w64.T,
        "dequantize-everything (float64)": lambda: x64 @ ref_layer.dequantize().T,
    }
    for name, layer in layers.items():
        cases[f"qlinear[{name}] float32"] = lambda layer=layer: layer(x32)
        cases[f"qlinear[{name}] float64"] = lambda layer=layer: layer(x64)
        cases[f"qlinear[{name}] int8 activations"] = lambda layer=layer: layer(
            x32, activations="int8"
        )
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=4096)
    ap.add_argument("--in", dest="in_", type=int, default=4096)
    ap.add_argument("--batches", default="1,16,256")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((args.out, args.in_), dtype=np.float32)
    w64 = w32.astype(np.float64)
    params = qlinear.calibrate_linear(w32)
    ref_layer = qlinear.QuantizedLinear.from_fp(w32, params, backend="numpy")
    active = qlinear.backend_info()["backend"]
    layers = {"numpy": ref_layer}
    if active != "numpy":
        layers[active] = qlinear.QuantizedLinear.from_fp(w32, params)

    print(f"layer {args.out}x{args.in_}, int8 per-channel symmetric; active backend: {active}")
    print(f"{'batch':>5}  {'case':<38} {'ms':>9}  {'vs numpy f32':>12}")
    for batch in (int(b) for b in args.batches.split(",")):
        x32 = rng.standard_normal((batch, args.in_), dtype=np.float32)
        cases = make_cases(x32, w32, w64, ref_layer, layers)
        base = None
        for name, fn in cases.items():
            ms = median_ms(fn)
            base = base or ms
            print(f"{batch:>5}  {name:<38} {ms:>9.3f}  {ms / base:>11.2f}x")


if __name__ == "__main__":
    main()
