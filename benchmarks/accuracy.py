"""Accuracy of calibration methods on a real model: all-MiniLM-L6-v2 in NumPy.

Every linear layer of the encoder (36) is quantized with one format and method; we report

* layer error: for each layer, ``||X (W - Q)^T|| / ||X W^T||`` (Frobenius, bias left out)
  on the layer's real input activations ``X`` of the held-out sentences in the float
  model, ``Q`` the dequantized weight; mean and max over the layers;
* embedding cosine: the whole model with every linear layer quantized at once, cosine
  of each held-out sentence's embedding with the float32 model's; mean and min.

GPTQ is calibrated on the float model's activations of the calibration sentences
(``qlinear.models.sentences("calib")``; with ``--sequential``, on those of the model whose
earlier blocks are already quantized) and evaluated on the held-out ones.

Run from a checkout::

    PYTHONPATH=src python benchmarks/accuracy.py [--formats int4-g128 ...] [--methods ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qlinear import QuantizedLinear, calibrate_linear, gptq_quantize
from qlinear.models import load_minilm, sentences

# name -> (qtype, granularity, group_size, schemes)
FORMATS = {
    "int8-channel": ("int8", "per_channel", None, ("symmetric",)),
    "int4-g128": ("int4", "per_group", 128, ("symmetric", "asymmetric")),
    "int4-g32": ("int4", "per_group", 32, ("symmetric", "asymmetric")),
}
METHODS = ("minmax", "mse", "gptq", "gptq+mse")
# int8 per-channel is the baseline format: min-max only unless asked otherwise.
INT8_METHODS = ("minmax",)


def capture(model, texts):
    cap: dict[str, list[np.ndarray]] = {}
    emb = model.encode(texts, capture=cap)
    return emb, {k: np.concatenate(v).astype(np.float64) for k, v in cap.items()}


def quantize(model, name, x_cal, qtype, gran, gs, scheme, method):
    w = model.linear_weight(name)
    b = model.linear_bias(name)
    if method in ("minmax", "mse", "percentile"):
        params = calibrate_linear(w, qtype, gran, scheme, group_size=gs, method=method)
        return QuantizedLinear.from_fp(w, params, bias=b)
    clip = "mse" if method == "gptq+mse" else "minmax"
    return gptq_quantize(
        w, x_cal, qtype, gran, scheme, group_size=gs, act_order=True, method=clip, bias=b
    )


def quantize_all(model, names, x_cal, calib, qtype, gran, gs, scheme, method, sequential):
    """Every linear layer quantized. ``sequential`` (GPTQ only): each transformer block is
    calibrated on the inputs it receives when the blocks before it are already quantized
    (as GPTQ's reference scripts do), at one extra encoding pass per block."""
    if not (sequential and method.startswith("gptq")):
        return {n: quantize(model, n, x_cal[n], qtype, gran, gs, scheme, method) for n in names}
    layers: dict = {}
    blocks = sorted({n.split(".")[2] for n in names}, key=int)
    for b in blocks:
        _, x_now = capture(model.with_linears(layers), calib)
        for n in names:
            if n.split(".")[2] == b:
                layers[n] = quantize(model, n, x_now[n], qtype, gran, gs, scheme, method)
    return layers


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--per-layer", action="store_true", help="also print every layer's error")
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="GPTQ: calibrate each block on inputs from the already-quantized blocks before it",
    )
    args = ap.parse_args(argv)

    model = load_minilm()
    names = model.linear_names()
    calib, held = sentences("calib"), sentences("heldout")
    _, x_cal = capture(model, calib)
    ref_emb, x_held = capture(model, held)
    y_ref = {n: x_held[n] @ model.linear_weight(n).astype(np.float64).T for n in names}
    tokens = next(iter(x_cal.values())).shape[0], next(iter(x_held.values())).shape[0]
    print(
        f"all-MiniLM-L6-v2, {len(names)} linear layers; calibration: {len(calib)} sentences "
        f"({tokens[0]} tokens), held out: {len(held)} sentences ({tokens[1]} tokens)"
    )

    rows = []
    for fmt in args.formats:
        qtype, gran, gs, schemes = FORMATS[fmt]
        methods = [m for m in args.methods if qtype != "int8" or m in INT8_METHODS] or ["minmax"]
        print(f"\n{fmt}")
        print(
            f"{'scheme':<11} {'method':<9} {'layer err mean':>14} {'max':>7} "
            f"{'cos mean':>9} {'cos min':>8} {'vs minmax':>10} {'time s':>7}"
        )
        for scheme in schemes:
            base = None
            for method in methods:
                t0 = time.perf_counter()
                layers = quantize_all(
                    model, names, x_cal, calib, qtype, gran, gs, scheme, method, args.sequential
                )
                elapsed = time.perf_counter() - t0
                errs = np.array(
                    [
                        np.linalg.norm(x_held[n] @ layers[n].dequantize().T - y_ref[n])
                        / np.linalg.norm(y_ref[n])
                        for n in names
                    ]
                )
                emb = model.with_linears(layers).encode(held)
                cos = np.sum(emb.astype(np.float64) * ref_emb, axis=1) / (
                    np.linalg.norm(emb, axis=1) * np.linalg.norm(ref_emb, axis=1)
                )
                mean_err = float(errs.mean())
                if method == "minmax":
                    base = mean_err
                rel = f"{1 - mean_err / base:+.1%}" if base and method != "minmax" else ""
                label = "gptq+mse" if method == "gptq+mse" else method
                label += " ao" if method.startswith("gptq") else ""
                print(
                    f"{scheme:<11} {label:<9} {mean_err:>14.4f} {errs.max():>7.4f} "
                    f"{cos.mean():>9.4f} {cos.min():>8.4f} {rel:>10} {elapsed:>7.1f}"
                )
                if args.per_layer:
                    for n, e in zip(names, errs, strict=True):
                        print(f"    {n:<45} {e:.4f}")
                rows.append((fmt, scheme, method, mean_err, cos.mean(), cos.min()))
    print(
        "\n'vs minmax': reduction of the mean layer error against minmax of the same scheme;"
        " 'ao': GPTQ with activation order."
    )


if __name__ == "__main__":
    main()
