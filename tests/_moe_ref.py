"""An independent dense reference for MoE tests: routing written per token with plain
Python sorting, every expert run on every token, then masked and weighted."""

from __future__ import annotations

import math

import numpy as np


def ref_softmax(v):
    v = np.asarray(v, dtype=np.float64)
    e = np.exp(v - v.max())
    return e / e.sum()


def ref_dense_weights(logits, routing, top_k=2, normalize=True, capacity=None):
    """Dense ``(tokens, experts)`` routing weights (0 where a token does not go)."""
    n, num_e = logits.shape
    dense = np.zeros((n, num_e))
    probs = [ref_softmax(logits[t]) for t in range(n)]
    if routing in ("topk", "switch"):
        k = 1 if routing == "switch" else top_k
        for t in range(n):
            chosen = sorted(range(num_e), key=lambda e: (-logits[t, e], e))[:k]
            if routing == "topk" and normalize:
                w = ref_softmax([logits[t, e] for e in chosen])
            else:
                w = [probs[t][e] for e in chosen]
            for e, we in zip(chosen, w, strict=True):
                dense[t, e] = we
    elif routing == "softmax":
        for t in range(n):
            dense[t] = probs[t]
    elif routing == "expert_choice":
        cap = math.ceil(n * top_k / num_e) if capacity is None else capacity
        cap = min(cap, n)
        for e in range(num_e):
            chosen = sorted(range(n), key=lambda t: (-probs[t][e], t))[:cap]
            for t in chosen:
                dense[t, e] = probs[t][e]
    else:
        raise AssertionError(routing)
    return dense


def ref_silu(z):
    return z / (1.0 + np.exp(-z))


def as_dense(piece):
    """A float64 matrix for a float piece or a QuantizedLinear."""
    if isinstance(piece, np.ndarray):
        return piece.astype(np.float64)
    return piece.dequantize(np.float64)


def ref_expert(expert, x):
    """float64 output of a LinearExpert / GatedExpert (SiLU) on float64 x."""
    x = x.astype(np.float64)
    if hasattr(expert, "gate"):
        g = x @ as_dense(expert.gate).T
        u = x @ as_dense(expert.up).T
        return (ref_silu(g) * u) @ as_dense(expert.down).T
    y = x @ as_dense(expert.weights).T
    if expert.bias is not None:
        y = y + expert.bias
    return y


def ref_moe(layer, x):
    """float64 dense reference of ``layer.forward(x)`` for 2-D x."""
    x64 = np.asarray(x, dtype=np.float64)
    logits = x64 @ np.asarray(layer.router_weight, dtype=np.float64).T
    if layer.router_bias is not None:
        logits = logits + layer.router_bias
    dense = ref_dense_weights(logits, layer.routing, layer.top_k, layer.normalize, layer.capacity)
    y = np.zeros((x64.shape[0], layer.output_dim))
    for e, ex in enumerate(layer.experts):
        y += dense[:, e : e + 1] * ref_expert(ex, x64)
    return y, dense
