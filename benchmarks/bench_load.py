"""Load time and memory of a ~1 GB quantized file: qlinear.load (memory-mapped) vs
safetensors.numpy.load_file (reads every tensor), each in a fresh process.

    PYTHONPATH=src python benchmarks/bench_load.py [--gb 1.0] [--dir /tmp/qlinear-bench]

Prints load wall time, RSS growth during the load, and the RSS after one forward pass
of every layer (which touches all the codes), plus ratios qlinear / peer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
import numpy as np

def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0

path, which = sys.argv[1], sys.argv[2]
import qlinear, safetensors.numpy  # imports are not part of the measurement
r0 = rss()
t0 = time.perf_counter()
if which == "qlinear":
    m = qlinear.load(path)
else:
    m = safetensors.numpy.load_file(path)
dt = time.perf_counter() - t0
r1 = rss()
if which == "qlinear":
    x = np.ones((1, next(iter(m.values())).in_features), np.float32)
    for layer in m.values():
        layer.forward(x)
r2 = rss()
print(json.dumps({"seconds": dt, "rss_load": r1 - r0, "rss_after_forward": r2 - r0,
                  "backend": qlinear.backend_info()["backend"],
                  "n": len(m)}))
"""


def make_file(path: Path, gb: float) -> int:
    import qlinear

    rng = np.random.default_rng(0)
    out_f, in_f = 4096, 8192  # 32 MiB of int8 codes per layer
    n = max(1, round(gb * 2**30 / (out_f * in_f)))
    layers = {}
    for i in range(n):
        codes = rng.integers(-127, 128, size=(out_f, in_f), dtype=np.int8)
        params = qlinear.QuantizationParams(
            "int8",
            "symmetric",
            "per_channel",
            rng.uniform(1e-3, 2e-3, out_f),
            np.zeros(out_f, np.int32),
            np.full(out_f, -0.2),
            np.full(out_f, 0.2),
        )
        layers[f"model.layers.{i}.mlp.up_proj"] = qlinear.QuantizedLinear.from_codes(
            codes, params, bias=rng.standard_normal(out_f).astype(np.float32)
        )
    qlinear.save(path, layers)
    return path.stat().st_size


def run(path: Path, which: str) -> dict:
    import qlinear

    # the child runs the same qlinear as this process (installed build or source tree)
    env = {**os.environ, "PYTHONPATH": str(Path(qlinear.__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), which],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/qlinear-bench")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "load_1gb.safetensors"
    t0 = time.perf_counter()
    size = make_file(path, args.gb)
    print(f"file: {path} {size / 2**30:.2f} GiB (written in {time.perf_counter() - t0:.1f} s)")
    # Drop the page cache? Not possible unprivileged; both readers see a warm cache.
    q = run(path, "qlinear")
    s = run(path, "safetensors")
    mib = 2**20
    print(f"qlinear backend in the child: {q['backend']}")
    print(f"{'reader':<28}{'load time':>12}{'RSS +load':>12}{'RSS +forward':>14}")
    print(
        f"{'qlinear.load (mmap)':<28}{q['seconds'] * 1e3:>10.1f}ms{q['rss_load'] / mib:>10.1f}MiB"
        f"{q['rss_after_forward'] / mib:>12.1f}MiB"
    )
    print(
        f"{'safetensors.numpy.load_file':<28}{s['seconds'] * 1e3:>10.1f}ms"
        f"{s['rss_load'] / mib:>10.1f}MiB{'':>14}"
    )
    print(
        f"ratio qlinear/safetensors: time {q['seconds'] / s['seconds']:.4f}, "
        f"RSS {q['rss_load'] / max(s['rss_load'], 1):.4f}; layers {q['n']}"
    )


if __name__ == "__main__":
    main()
