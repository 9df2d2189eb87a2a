"""Fuzz the safetensors reader, qlinear.load / qlinear.inspect, and a forward of every
layer that loads (both activation modes): a hostile file must raise a QuantizationError
(FormatError), never another exception, a crash, a hang, a huge allocation or a
non-finite output."""

from __future__ import annotations

import json

import _common
import numpy as np

with _common.instrumented():
    import qlinear
    from qlinear._safetensors import SafetensorsFile


def seeds() -> dict[str, bytes]:
    import safetensors.numpy as stnp

    rng = np.random.default_rng(0)
    out: dict[str, bytes] = {}
    d = _common.scratch_file("seed.safetensors", b"").parent
    cases = [
        ("int8", "symmetric", "per_channel", None),
        ("int8", "asymmetric", "per_tensor", None),
        ("int4", "symmetric", "per_group", 4),
        ("int4", "asymmetric", "per_group", 3),
        ("int4", "symmetric", "per_channel", None),
    ]
    for i, (qt, sch, gran, gs) in enumerate(cases):
        w = rng.standard_normal((5, 7))
        p = qlinear.calibrate_linear(w, qtype=qt, scheme=sch, granularity=gran, group_size=gs)
        layer = qlinear.QuantizedLinear.from_fp(
            w, p, bias=rng.standard_normal(5) if i % 2 else None
        )
        qlinear.save(d / "s.safetensors", {"fc": layer, "emb": np.arange(6, dtype=np.float32)})
        out[f"qlinear-{qt}-{sch}-{gran}"] = (d / "s.safetensors").read_bytes()
    arrays = {
        "f32": np.ones((2, 3), np.float32),
        "f16": np.ones(4, np.float16),
        "i64": np.arange(3, dtype=np.int64),
        "u8": np.zeros((2, 2), np.uint8),
        "b": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float32),
    }
    out["safetensors-numpy"] = stnp.save(arrays, metadata={"format": "pt"})
    out["safetensors-empty"] = stnp.save({})
    # BF16 and F8 written by hand (NumPy has no such dtypes)
    hdr = json.dumps(
        {
            "a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
            "b": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [4, 8]},
        }
    ).encode()
    hdr += b" " * (-len(hdr) % 8)
    out["hand-bf16-f8"] = len(hdr).to_bytes(8, "little") + hdr + bytes(range(8))
    return out


def _forward_all(layers: dict) -> None:
    rng = np.random.default_rng(1)
    for item in layers.values():
        if isinstance(item, qlinear.QuantizedLinear):
            x = rng.standard_normal((2, item.in_features)).astype(np.float32)
            for mode in ("float", "int8"):
                y = item.forward(x, activations=mode)
                if y.shape != (2, item.out_features) or not np.isfinite(y).all():
                    raise RuntimeError(f"forward ({mode}) returned {y.shape} non-finite")
            item.qweight  # noqa: B018
            item.dequantize()
        else:
            np.asarray(item).tobytes()


def _fix_length(data: bytes) -> bytes:
    """The input with its 8-byte header length set to end at the last ``}`` of the JSON:
    mutations that change the header's length still reach the entry checks and load."""
    end = data.rfind(b"}", 8, 8 + 65536) + 1
    if end <= 8:
        return data
    return (end - 8).to_bytes(8, "little") + data[8:]


def one(data: bytes) -> None:
    if data[:1] and data[-1] & 2:
        data = _fix_length(data)
    path = _common.scratch_file("x.safetensors", data)
    mode = data[-1] & 1 if data else 0
    info = qlinear.io.inspect(path)
    assert isinstance(info.nbytes, int)
    sf = SafetensorsFile(path, mmap=bool(mode))
    for name in sf.tensors:
        sf.array(name)
    _forward_all(qlinear.load(path, mmap=bool(mode), verify=bool(len(data) & 4)))


if __name__ == "__main__":
    _common.main(__file__, one, seeds)
