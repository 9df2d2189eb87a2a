"""Time of each calibration method on one 4096x4096 layer, as a ratio to min-max.

Run from a checkout::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=src python benchmarks/calibrate_speed.py [--size 4096]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qlinear import calibrate_linear, gptq_quantize


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=2048, help="calibration rows for GPTQ")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    n = args.size
    w = rng.standard_normal((n, n)).astype(np.float32)
    x = rng.standard_normal((args.rows, n)).astype(np.float32)
    fmt = ("int4", "per_group", "asymmetric")
    runs = [
        ("calibrate_linear minmax", lambda: calibrate_linear(w, *fmt, group_size=128)),
        (
            "calibrate_linear percentile",
            lambda: calibrate_linear(w, *fmt, group_size=128, method="percentile"),
        ),
        ("calibrate_linear mse", lambda: calibrate_linear(w, *fmt, group_size=128, method="mse")),
        ("gptq_quantize", lambda: gptq_quantize(w, x, *fmt, group_size=128)),
        (
            "gptq_quantize act_order",
            lambda: gptq_quantize(w, x, *fmt, group_size=128, act_order=True),
        ),
        (
            "gptq_quantize act_order mse",
            lambda: gptq_quantize(w, x, *fmt, group_size=128, act_order=True, method="mse"),
        ),
    ]
    print(f"int4 g128 asymmetric, {n}x{n} weight, GPTQ on {args.rows} calibration rows")
    print(f"{'method':<30} {'seconds':>8} {'x minmax':>9}")
    base = None
    for name, fn in runs:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        base = base or dt
        print(f"{name:<30} {dt:>8.2f} {dt / base:>9.1f}")


if __name__ == "__main__":
    main()
