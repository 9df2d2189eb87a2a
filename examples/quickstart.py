"""Quantize one random layer to int8 and int4, run it, and print error and size.

python examples/quickstart.py
"""

import numpy as np

import qlinear

rng = np.random.default_rng(0)
weight = rng.standard_normal((1024, 4096)).astype(np.float32) * 0.02
bias = rng.standard_normal(1024).astype(np.float32) * 0.01
x = rng.standard_normal((8, 4096)).astype(np.float32)
reference = x @ weight.T + bias

print(f"backend: {qlinear.backend_info()['backend']}")
print(f"{'format':<32} {'rel. output error':>18} {'bytes':>10} {'vs float32':>10}")
for label, kwargs in [
    ("int8 per-channel symmetric", dict(qtype="int8", granularity="per_channel")),
    (
        "int8 per-tensor asymmetric",
        dict(qtype="int8", granularity="per_tensor", scheme="asymmetric"),
    ),
    (
        "int4 per-group(128) asymmetric",
        dict(qtype="int4", granularity="per_group", scheme="asymmetric", group_size=128),
    ),
]:
    params = qlinear.calibrate_linear(weight, **kwargs)
    layer = qlinear.QuantizedLinear.from_fp(weight, params).with_bias(bias)
    y = layer(x)
    err = np.linalg.norm(y - reference) / np.linalg.norm(reference)
    print(f"{label:<32} {err:>18.2e} {layer.nbytes:>10} {weight.nbytes / layer.nbytes:>9.1f}x")
