"""int4 per-group layers against ONNX Runtime's MatMulNBits (an outside oracle).

MatMulNBits computes ``A @ dequant(B).T`` with ``dequant = (nibble - zero_point) * scale``
per block of ``block_size`` input columns: the same format as a qlinear int4 per-group
layer with ``group_size == block_size``. Feeding it qlinear's codes, scales and zero points
checks qlinear's int4 semantics (nibble order, offsets, partial last groups, zero points)
against an independent implementation, not only against itself.
"""

import numpy as np
import pytest

from qlinear import QuantizedLinear, calibrate_linear

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def nbits_session(layer: QuantizedLinear, block: int):
    from onnx import TensorProto, helper, numpy_helper

    out_f, in_f = layer.shape
    nb = -(-in_f // block)
    asym = layer.scheme.value == "asymmetric"
    # ORT's stored nibble: code + 8 for symmetric (its default zero point is 8), the
    # code itself for asymmetric with explicit zero points
    nib = layer.qweight.astype(np.int16) + (0 if asym else 8)
    padded = np.zeros((out_f, nb * block), np.uint8)
    padded[:, :in_f] = nib
    blob = (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(out_f, nb, block // 2)
    inits = [
        numpy_helper.from_array(blob.astype(np.uint8), "B"),
        numpy_helper.from_array(layer.scales.astype(np.float32).reshape(-1), "scales"),
    ]
    inputs = ["A", "B", "scales"]
    if asym:
        zp = np.zeros((out_f, 2 * (-(-nb // 2))), np.uint8)
        zp[:, :nb] = layer.zero_points
        packed_zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1)
        inits.append(numpy_helper.from_array(packed_zp.astype(np.uint8), "zero_points"))
        inputs.append("zero_points")
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        ["Y"],
        domain="com.microsoft",
        K=in_f,
        N=out_f,
        bits=4,
        block_size=block,
    )
    graph = helper.make_graph(
        [node],
        "nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["n", in_f])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["n", out_f])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize(("out_f", "in_f", "block"), [(17, 64, 32), (33, 200, 32), (8, 384, 128)])
def test_int4_per_group_forward_matches_onnxruntime_matmulnbits(rng, scheme, out_f, in_f, block):
    w = rng.standard_normal((out_f, in_f))
    p = calibrate_linear(w, "int4", "per_group", scheme, group_size=block)
    # float32-representable scales, so both sides dequantize to the very same weights
    p = type(p)(
        p.qtype,
        p.scheme,
        p.granularity,
        p.scale.astype(np.float32),
        p.zero_point,
        p.min_val,
        p.max_val,
        p.group_size,
    )
    layer = QuantizedLinear.from_fp(w, p)
    x = rng.standard_normal((5, in_f)).astype(np.float32)
    expected = nbits_session(layer, block).run(None, {"A": x})[0]
    y = layer(x)
    wd = layer.dequantize()
    bound = 1e-5 * (np.abs(x) @ np.abs(wd).T) + 1e-6
    assert np.all(np.abs(y - expected) <= bound), np.abs(y - expected).max()
