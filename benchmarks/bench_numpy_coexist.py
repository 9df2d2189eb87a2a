"""A qlinear call right after a NumPy matmul: the pool's wait policy against OpenBLAS's.

Usage::

    python benchmarks/bench_numpy_coexist.py            # 3 rounds, every policy
    python benchmarks/bench_numpy_coexist.py --rounds 1 --reps 40

The loop of issue 12: ``A @ B`` (float32 256x1024 @ 1024x1024, OpenBLAS threads) then an
int8-mode call of a 4096x4096 int8 layer at batch 16 (2 threads). For each wait policy of
qlinear's pool (how long a worker polls for the next job after one, and whether it yields
its core meanwhile), and for OpenBLAS limited to one thread (set through its own C entry
point, as threadpoolctl does), it prints the median of ``A @ B`` alone, the qlinear call
alone and the two in a loop, and the loop / (sum of the two alone) ratio (target: <= 1.1).
Policies are measured interleaved, round after round, with pauses between, so each ratio
compares numbers taken under the same load.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import statistics
import sys
import time

import numpy as np

import qlinear
from qlinear import QuantizedLinear, calibrate_linear

# (label, spin microseconds, yield while spinning)
POLICIES = [
    ("sleep at once (futex)", 0, False),
    ("pause 50 us", 50, False),
    ("pause 200 us", 200, False),
    ("pause 1000 us", 1000, False),
    ("yield 200 us", 200, True),
    ("yield 2000 us", 2000, True),
]


def openblas():
    """numpy's bundled OpenBLAS (set/get thread count), or None."""
    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*")
    for path in glob.glob(libs):
        lib = ctypes.CDLL(path)
        for prefix in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", ""):
                try:
                    set_fn = getattr(lib, f"{prefix}set_num_threads{suffix}")
                    get_fn = getattr(lib, f"{prefix}get_num_threads{suffix}")
                except AttributeError:
                    continue
                set_fn.argtypes = [ctypes.c_int]
                return set_fn, get_fn
    return None


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(a, b, layer, x, reps: int) -> tuple[float, float, float]:
    alone_np = median_ms(lambda: a @ b, reps)
    time.sleep(0.2)
    alone_q = median_ms(lambda: layer(x, activations="int8"), reps)
    time.sleep(0.2)

    def loop():
        a @ b
        layer(x, activations="int8")

    both = median_ms(loop, reps)
    time.sleep(0.2)
    return alone_np, alone_q, both


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args(argv)
    try:
        from qlinear import _native as native
    except ImportError:
        native = None
    if not hasattr(native, "set_spin_policy"):
        print("the native extension is not built: nothing to measure", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 1024)).astype(np.float32)
    w = rng.standard_normal((4096, 4096)).astype(np.float32)
    layer = QuantizedLinear.from_fp(w, calibrate_linear(w, "int8", "per_channel", "symmetric"))
    x = rng.standard_normal((16, 4096)).astype(np.float32)
    blas = openblas()
    blas_threads = blas[1]() if blas else None
    default = native.spin_policy()
    print(
        f"backend {layer.backend}, qlinear threads {qlinear.get_num_threads()}, OpenBLAS threads "
        f"{blas_threads}, load average {os.getloadavg()[0]:.2f}, default policy {default}"
    )
    configs = [(label, us, y, None) for label, us, y in POLICIES]
    if blas:
        configs.append(("default + OpenBLAS 1 thread", default[0], default[1], 1))
    results: dict[str, list[tuple[float, float, float]]] = {c[0]: [] for c in configs}
    for _ in range(args.rounds):
        for label, us, y, nb in configs:
            native.set_spin_policy(us, y)
            if nb is not None:
                blas[0](nb)
            try:
                results[label].append(measure(a, b, layer, x, args.reps))
            finally:
                if nb is not None:
                    blas[0](blas_threads)
    native.set_spin_policy(*default)
    print(f"medians of {args.reps} calls, ms; ratio = loop / (A@B + qlinear); per round")
    print(f"{'policy':34s} {'A@B':>8s} {'qlinear':>8s} {'loop':>8s} {'ratio':>6s}  rounds")
    for label, rs in results.items():
        np_ms = statistics.median(r[0] for r in rs)
        q_ms = statistics.median(r[1] for r in rs)
        loop_ms = statistics.median(r[2] for r in rs)
        per = " ".join(f"{r[2] / (r[0] + r[1]):.2f}" for r in rs)
        print(
            f"{label:34s} {np_ms:8.3f} {q_ms:8.3f} {loop_ms:8.3f} "
            f"{loop_ms / (np_ms + q_ms):6.2f}  {per}"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
