"""Cost of the "file changed on disk" check (qlinear._mapped) in the forward pass.

Loads one memory-mapped layer and times forward with the check active (the file's
guard registered) and disabled (guard table emptied, so check_mapped is a dict test),
interleaved, with pauses; prints the ratio per backend and batch size, and the cost of
one check_mapped call. Native backends check only at the first forward (the lazy pack);
the NumPy backend reads the mapping, and checks, at every forward.

    python benchmarks/bench_mapped_check.py [--rounds 11] [--backend avx2 ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import qlinear
from qlinear import _mapped


def _per_call(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--backend", action="append", help="default: the active one and numpy")
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.size
    w = rng.standard_normal((n, n))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        qlinear.save(path, {"fc": qlinear.QuantizedLinear.from_fp(w, qlinear.calibrate_linear(w))})
        backends = args.backend or sorted({qlinear.backend_info()["backend"], "numpy"})
        for backend in backends:
            layer = qlinear.load(path, backend=backend)["fc"]
            canon = layer.stored_weight
            for batch in (1, 16):
                x = rng.standard_normal((batch, n)).astype(np.float32)
                layer.forward(x)  # pack, warm up
                reps = 500 if backend != "numpy" else 40
                on, off = [], []
                saved = dict(_mapped._GUARDS)
                for _ in range(args.rounds):
                    on.append(_per_call(lambda f=layer.forward, x=x: f(x), reps))
                    time.sleep(0.05)
                    _mapped._GUARDS.clear()
                    try:
                        off.append(_per_call(lambda f=layer.forward, x=x: f(x), reps))
                    finally:
                        _mapped._GUARDS.update(saved)
                    time.sleep(0.05)
                ratios = sorted(a / b for a, b in zip(on, off, strict=True))
                q1, r, q3 = statistics.quantiles(ratios, n=4)
                print(
                    f"{backend:9s} batch {batch:3d}: forward with check / without = {r:.3f} "
                    f"(median of {args.rounds} interleaved rounds, quartiles {q1:.3f}..{q3:.3f}; "
                    f"{statistics.median(off) * 1e6:.1f} us/call)"
                )
        t = _per_call(lambda: _mapped.check_mapped(canon), 200_000)
        print(f"one check_mapped on a mapped array (fstat): {t * 1e9:.0f} ns")
        mem = np.zeros(8)
        t = _per_call(lambda: _mapped.check_mapped(mem), 200_000)
        print(f"one check_mapped on an in-memory array: {t * 1e9:.0f} ns")


if __name__ == "__main__":
    main()
