"""Fuzz GGUF reading: mutated bytes of small GGUF files written by gguf-py (Q8_0, Q4_0,
Q4_1 and F32 tensors, metadata of several types) through ``qlinear.load`` and
``qlinear.inspect``, then a forward of every layer in both activation modes. Contract:
a QuantizationError (FormatError), never another exception, and finite outputs."""

from __future__ import annotations

import _common

with _common.instrumented():
    import numpy as np

    import qlinear
    import qlinear.io


def seeds() -> dict[str, bytes]:
    import gguf

    rng = np.random.default_rng(0)
    out = {}
    for kind in ("Q8_0", "Q4_0", "Q4_1"):
        path = _common.scratch_file(f"seed-{kind}.gguf", b"")
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_block_count(1)
        w.add_string("general.name", "fuzz seed")
        w.add_uint32("llama.context_length", 64)
        qt = getattr(gguf.GGMLQuantizationType, kind)
        a = rng.standard_normal((4, 64)).astype(np.float32)
        w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(a, qt), raw_dtype=qt)
        w.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        out[kind.lower()] = path.read_bytes()
    return out


def one(data: bytes) -> None:
    path = _common.scratch_file("input.gguf", data)
    qlinear.io.inspect(path)
    items = qlinear.load(path)
    for item in items.values():
        if hasattr(item, "in_features") and hasattr(item, "forward"):
            x = np.linspace(-1.0, 1.0, 2 * item.in_features, dtype=np.float32)
            x = x.reshape(2, item.in_features)
            modes = ("float", "int8") if isinstance(item, qlinear.QuantizedLinear) else (None,)
            for mode in modes:
                y = item.forward(x) if mode is None else item.forward(x, activations=mode)
                if not np.isfinite(y).all():
                    raise RuntimeError("non-finite output without an error")


if __name__ == "__main__":
    _common.main(__file__, one, seeds)
