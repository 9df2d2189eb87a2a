"""MoE forward speed and memory: quantized vs float vs a per-token Python loop.

Run from the repository root:

    PYTHONPATH=src python benchmarks/bench_moe.py

Layer: 8 GatedExperts (SiLU), d_model 1024, d_ff 2816, top-2 routing, float32 weights
(Xavier); the quantized layer is ``quantize_moe(layer, "int8", "per_channel")``.

Columns, per token count (median of several runs, all measured in this one run):

* ``float``: grouped MoELayer forward with float32 experts (NumPy matmuls).
* ``quant``: grouped MoELayer forward with int8 experts (active qlinear backend).
* ``loop``: the same int8 experts called one token at a time from a Python loop (each
  token routed, then each of its experts run on that single token). For more than
  ``--loop-tokens`` tokens the loop is timed on the first ``--loop-tokens`` tokens and
  scaled linearly (marked ``*``).
* ratios: ``quant / float`` and ``loop / quant`` (> 1 means grouped is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import qlinear
from qlinear.moe import GatedExpert, MoELayer, quantize_moe


def _time(fn, min_runs: int = 3, budget: float = 2.0) -> float:
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def per_token_loop(layer: MoELayer, x: np.ndarray) -> np.ndarray:
    """The naive MoE: route each token, run each of its experts on it alone."""
    y = np.zeros((x.shape[0], layer.output_dim), dtype=x.dtype)
    for t in range(x.shape[0]):
        idx, w = layer.route(x[t : t + 1])
        for e, we in zip(idx[0], w[0], strict=True):
            if e >= 0:
                y[t] += we * layer.experts[e].forward(x[t])
    return y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=2816)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024])
    ap.add_argument("--loop-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    experts = [
        GatedExpert.xavier_init(args.d_model, args.d_ff, seed=args.seed + i, dtype=np.float32)
        for i in range(args.experts)
    ]
    router = rng.standard_normal((args.experts, args.d_model)) / np.sqrt(args.d_model)
    layer = MoELayer(router, experts, top_k=args.top_k)
    t0 = time.perf_counter()
    qlayer = quantize_moe(layer, "int8", "per_channel")
    t_quant = time.perf_counter() - t0

    info = qlinear.backend_info()
    print(
        f"MoE: {args.experts} GatedExperts, d_model {args.d_model}, d_ff {args.d_ff}, "
        f"top-{args.top_k}, float32 activations; backend {info['backend']!r}, "
        f"quantize_moe took {t_quant:.2f} s"
    )
    fb, qb = layer.nbytes, qlayer.nbytes
    print(
        f"bytes held: float32 layer {fb / 2**20:.1f} MiB, int8 layer {qb / 2**20:.1f} MiB, "
        f"ratio {fb / qb:.2f}x"
    )
    print()
    header = (
        f"{'tokens':>7} {'float ms':>10} {'quant ms':>10} {'loop ms':>11} "
        f"{'quant/float':>12} {'loop/quant':>11} {'rel err':>9}"
    )
    print(header)
    print("-" * len(header))
    for n in args.tokens:
        x = rng.standard_normal((n, args.d_model)).astype(np.float32)
        t_float = _time(lambda x=x: layer.forward(x))
        t_q = _time(lambda x=x: qlayer.forward(x))
        m = min(n, args.loop_tokens)
        t_loop = _time(lambda x=x, m=m: per_token_loop(qlayer, x[:m]), min_runs=1, budget=0.0)
        t_loop *= n / m
        mark = "*" if m < n else " "
        yq = qlayer.forward(x)
        np.testing.assert_allclose(per_token_loop(qlayer, x[:m]), yq[:m], rtol=1e-3, atol=1e-4)
        yf = layer.forward(x)
        err = float(np.linalg.norm(yq - yf) / np.linalg.norm(yf))
        print(
            f"{n:>7} {t_float * 1e3:>10.2f} {t_q * 1e3:>10.2f} {t_loop * 1e3:>10.1f}{mark} "
            f"{t_q / t_float:>12.2f} {t_loop / t_q:>11.1f} {err:>9.2e}"
        )
    print()
    print(f"* loop timed on the first {args.loop_tokens} tokens and scaled linearly")


if __name__ == "__main__":
    main()
