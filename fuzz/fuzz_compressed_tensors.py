"""Fuzz compressed-tensors reading: a checkpoint directory whose config.json carries a
mutated ``quantization_config``, beside a small pack-quantized model.safetensors that
qlinear wrote, through ``qlinear.load`` and then a forward of every layer in both
activation modes. Contract: a QuantizationError (FormatError naming the field or
tensor), never another exception, and finite outputs."""

from __future__ import annotations

import json

import _common

with _common.instrumented():
    import numpy as np

    import qlinear
    from qlinear._safetensors import SafetensorsFile
    from qlinear.formats import compressed_tensors_config as ctc

_DIR = None


def _checkpoint_dir():
    """A directory with a W4A16-style group-8 asymmetric layer and an int8 layer, written
    once by qlinear (the config.json is rewritten per input)."""
    global _DIR
    if _DIR is None:
        rng = np.random.default_rng(0)
        w4 = rng.standard_normal((16, 32))
        w8 = rng.standard_normal((8, 32))
        layers = {
            "model.layers.0.mlp.up_proj": qlinear.QuantizedLinear.from_fp(
                w4, qlinear.calibrate_linear(w4, "int4", "per_group", "asymmetric", group_size=8)
            ),
            "model.layers.0.mlp.down_proj": qlinear.QuantizedLinear.from_fp(
                w8, qlinear.calibrate_linear(w8, "int8", "per_channel", "symmetric")
            ),
        }
        path = _common.scratch_file("model.safetensors", b"")
        qlinear.save(path, layers)
        _DIR = path.parent
    return _DIR


def seeds() -> dict[str, bytes]:
    d = _checkpoint_dir()
    sf = SafetensorsFile(d / "model.safetensors")
    cfg = json.loads(sf.metadata[ctc.CONFIG_KEY])
    sf.close()
    base = {"model_type": "llama", "quantization_config": cfg}
    out = {"qlinear-written": json.dumps(base, indent=1).encode()}
    out["no-groups"] = json.dumps({"quantization_config": {**cfg, "config_groups": {}}}).encode()
    return out


def one(data: bytes) -> None:
    # the config parser alone first (most mutations stop there, fast); a config that
    # parses is then loaded with the checkpoint and every layer run
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict) and "quantization_config" in parsed:
            qc = json.dumps(parsed["quantization_config"])
            ctc.config_from_json_text(qc, "config.json: quantization_config")
    d = _checkpoint_dir()
    (d / "config.json").write_bytes(data)
    items = qlinear.load(d)
    x = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(2, 32)
    for item in items.values():
        if isinstance(item, qlinear.QuantizedLinear) and item.in_features == 32:
            for mode in ("float", "int8"):
                y = item.forward(x, activations=mode)
                if not np.isfinite(y).all():
                    raise RuntimeError("non-finite output without an error")


if __name__ == "__main__":
    _common.main(__file__, one, seeds)
