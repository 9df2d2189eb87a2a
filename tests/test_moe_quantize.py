"""quantize_moe: accuracy, fused tensors, calibration routing and fallback."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from _moe_ref import ref_dense_weights, ref_silu
from conftest import rel_error
from qlinear import (
    InvalidParamsError,
    QuantizedLinear,
    ShapeMismatchError,
    calibrate_linear,
)
from qlinear.moe import GatedExpert, LinearExpert, MoELayer, quantize_moe, quantize_stacked


def xavier_moe(num_e=8, d=128, d_ff=256, seed=0, **kw):
    rng = np.random.default_rng(seed)
    experts = [GatedExpert.xavier_init(d, d_ff, seed=seed * 100 + i) for i in range(num_e)]
    return MoELayer(rng.standard_normal((num_e, d)), experts, **kw)


def xavier_linear_moe(num_e=8, d=256, d_out=256, seed=0, **kw):
    rng = np.random.default_rng(seed)
    experts = [LinearExpert.xavier_init(d, d_out, seed=seed * 100 + i) for i in range(num_e)]
    return MoELayer(rng.standard_normal((num_e, d)), experts, **kw)


ROUTINGS = ["topk", "softmax", "switch", "expert_choice"]


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_int8_per_channel_error_below_one_percent(rng, routing, dtype):
    # One quantized matrix per expert: int8 per-channel min-max on Gaussian rows has a
    # relative error of about 0.7%.
    layer = xavier_linear_moe(routing=routing)
    q = quantize_moe(layer, "int8", "per_channel")
    x = rng.standard_normal((64, layer.input_dim)).astype(dtype)
    err = rel_error(q(x), layer(x))
    assert 0 < err < 0.01, f"relative error {err:.4f}"


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_int8_per_channel_gated_error(rng, routing, dtype):
    # A gated expert chains three quantized matrices (gate, up, down); their ~0.7% errors
    # add up in quadrature to about 1.2% with min-max scales.
    layer = xavier_moe(routing=routing)
    q = quantize_moe(layer, "int8", "per_channel")
    x = rng.standard_normal((64, layer.input_dim)).astype(dtype)
    err = rel_error(q(x), layer(x))
    assert 0 < err < 0.015, f"relative error {err:.4f}"


def test_quantized_layer_structure_and_bytes():
    layer = xavier_moe(num_e=4, d=64, d_ff=128)
    q = quantize_moe(layer)
    assert np.array_equal(q.router_weight, layer.router_weight)  # router stays float
    assert q.router_weight.dtype == np.float64
    for ex, fx in zip(q.experts, layer.experts, strict=True):
        for name, piece in ex.pieces.items():
            assert isinstance(piece, QuantizedLinear)
            assert piece.qtype.value == "int8" and piece.granularity.value == "per_channel"
            w = fx.pieces[name]
            expected = QuantizedLinear.from_fp(w, calibrate_linear(w, "int8", "per_channel"))
            assert np.array_equal(piece.qweight, expected.qweight)
    float_expert_bytes = sum(e.nbytes for e in layer.experts)
    quant_expert_bytes = sum(e.nbytes for e in q.experts)
    assert quant_expert_bytes < 0.3 * float_expert_bytes  # float64 -> int8 + scales
    assert q.routing == layer.routing and q.top_k == layer.top_k
    rep = q.quantization_report
    assert rep.tokens_per_expert is None and rep.weight_only_fallback == ()
    assert layer.quantization_report is None


def test_int4_per_group_runs(rng):
    layer = xavier_moe(num_e=2, d=64, d_ff=96)
    try:
        q = quantize_moe(layer, "int4", "per_group", group_size=32)
    except InvalidParamsError as exc:  # a core without int4 support says so clearly
        pytest.skip(f"int4 per-group not available in this build: {exc}")
    x = rng.standard_normal((8, 64))
    assert rel_error(q(x), layer(x)) < 0.2


def test_fused_quantized_from_views(rng):
    num_e, d, d_ff = 3, 32, 48
    g = rng.standard_normal((num_e, d_ff, d)).astype(np.float32)
    u = rng.standard_normal((num_e, d_ff, d)).astype(np.float32)
    dn = rng.standard_normal((num_e, d, d_ff)).astype(np.float32)
    layer = MoELayer.from_fused(rng.standard_normal((num_e, d)), g, u, dn)
    q = quantize_moe(layer)
    stacked = quantize_stacked(g)
    for e in range(num_e):
        expected = QuantizedLinear.from_fp(g[e].copy(), calibrate_linear(g[e].copy()))
        assert np.array_equal(q.experts[e].gate.qweight, expected.qweight)
        assert np.array_equal(stacked[e].qweight, expected.qweight)
    with pytest.raises(ShapeMismatchError, match="3-D"):
        quantize_stacked(g[0])


def test_quantize_rejects_bad_input(rng):
    layer = xavier_moe(num_e=2, d=16, d_ff=16)
    with pytest.raises(InvalidParamsError, match="MoELayer"):
        quantize_moe(layer.experts[0])
    with pytest.raises(InvalidParamsError, match="method"):
        quantize_moe(layer, method="awq")
    with pytest.raises(InvalidParamsError, match="min_tokens"):
        quantize_moe(layer, min_tokens=0)
    with pytest.raises(InvalidParamsError, match="already"):
        quantize_moe(quantize_moe(layer))
    with pytest.raises(InvalidParamsError):
        quantize_moe(layer, "int3")
    with pytest.raises(ShapeMismatchError, match="calib_x"):
        quantize_moe(layer, calib_x=rng.standard_normal((10, 17)), gptq_fn=lambda *a, **k: None)


class RecordingGPTQ:
    """A stand-in with gptq_quantize's signature: records what it is given, returns
    a min-max QuantizedLinear."""

    def __init__(self):
        self.calls = []

    def __call__(
        self,
        weight,
        x_calib,
        qtype,
        granularity,
        scheme,
        *,
        group_size,
        damp,
        act_order,
        block_size,
        method,
    ):
        self.calls.append((np.array(weight), np.array(x_calib), method, damp, act_order))
        params = calibrate_linear(weight, qtype, granularity, scheme, group_size=group_size)
        return QuantizedLinear.from_fp(weight, params)


def test_calibration_tokens_follow_the_router(rng):
    bias = np.zeros(4)
    bias[3] = -1e3  # expert 3 never chosen -> falls back
    d, d_ff = 16, 24
    experts = [GatedExpert.xavier_init(d, d_ff, seed=i) for i in range(4)]
    layer = MoELayer(rng.standard_normal((4, d)), experts, top_k=2, router_bias=bias)
    xc = rng.standard_normal((120, d))
    stub = RecordingGPTQ()
    q = quantize_moe(layer, calib_x=xc, min_tokens=10, gptq_fn=stub, damp=0.05, act_order=True)

    dense = ref_dense_weights(xc @ layer.router_weight.T + bias, "topk", 2)
    counts = (dense > 0).sum(axis=0)
    rep = q.quantization_report
    assert rep.tokens_per_expert == tuple(int(c) for c in counts)
    assert counts[3] == 0
    low = tuple(int(e) for e in np.flatnonzero(counts < 10))
    assert rep.weight_only_fallback == low and 3 in low
    assert rep.activation_aware == tuple(e for e in range(4) if e not in low)
    # Three GPTQ calls (gate, up, down) per activation-aware expert, in order.
    assert len(stub.calls) == 3 * len(rep.activation_aware)
    for j, e in enumerate(rep.activation_aware):
        (wg, xg, m, damp, ao), (wu, xu, *_), (wd, xd, *_) = stub.calls[3 * j : 3 * j + 3]
        mine = xc[dense[:, e] > 0]
        assert np.array_equal(wg, experts[e].gate) and np.array_equal(xg, mine)
        assert np.array_equal(wu, experts[e].up) and np.array_equal(xu, mine)
        assert np.array_equal(wd, experts[e].down)
        gq, uq = q.experts[e].gate.dequantize(), q.experts[e].up.dequantize()
        hidden = ref_silu(mine @ gq.T) * (mine @ uq.T)  # from the quantized gate and up
        np.testing.assert_allclose(xd, hidden, rtol=1e-10, atol=1e-12)
        assert (m, damp, ao) == ("minmax", 0.05, True)
    for e in low:
        w = experts[e].gate
        expected = QuantizedLinear.from_fp(w, calibrate_linear(w))
        assert np.array_equal(q.experts[e].gate.qweight, expected.qweight)


def test_expert_choice_calibration_routing(rng):
    d = 12
    experts = [LinearExpert.xavier_init(d, 8, seed=i) for i in range(3)]
    layer = MoELayer(rng.standard_normal((3, d)), experts, routing="expert_choice", capacity=7)
    xc = rng.standard_normal((30, d))
    stub = RecordingGPTQ()
    q = quantize_moe(layer, calib_x=xc, min_tokens=5, gptq_fn=stub)
    assert q.quantization_report.tokens_per_expert == (7, 7, 7)
    dense = ref_dense_weights(xc @ layer.router_weight.T, "expert_choice", 2, True, 7)
    for e, (_, x, *_) in enumerate(stub.calls):
        assert np.array_equal(x, xc[dense[:, e] > 0])


def test_all_experts_fall_back_without_gptq(rng, monkeypatch):
    layer = xavier_moe(num_e=4, d=16, d_ff=16)
    xc = rng.standard_normal((6, 16))
    # Fewer tokens than min_tokens everywhere: GPTQ is never needed, not even imported.
    monkeypatch.setitem(sys.modules, "qlinear.gptq", None)
    q = quantize_moe(layer, calib_x=xc, min_tokens=100)
    assert q.quantization_report.weight_only_fallback == (0, 1, 2, 3)
    assert q.quantization_report.activation_aware == ()
    with pytest.raises(InvalidParamsError, match="gptq"):
        quantize_moe(layer, calib_x=np.repeat(xc, 20, axis=0), min_tokens=1)


def test_with_real_gptq(rng):
    pytest.importorskip("qlinear.gptq")
    layer = xavier_moe(num_e=4, d=64, d_ff=96)
    # Correlated, anisotropic inputs (as real activations are): GPTQ's error feedback
    # pays off only when the input covariance is far from the identity.
    mix = rng.standard_normal((64, 64)) * np.logspace(0, -2, 64)[:, None]
    xc = rng.standard_normal((2000, 64)) @ mix
    x = rng.standard_normal((300, 64)) @ mix  # held out, same distribution
    q = quantize_moe(layer, "int4", "per_group", group_size=32, calib_x=xc, min_tokens=16)
    rep = q.quantization_report
    assert rep.activation_aware == (0, 1, 2, 3) and rep.weight_only_fallback == ()
    rtn = quantize_moe(layer, "int4", "per_group", group_size=32)
    assert rel_error(q(x), layer(x)) < 0.9 * rel_error(rtn(x), layer(x))
    # int8 per-channel gated experts: GPTQ brings the ~1.2% of min-max below 1%.
    q8 = quantize_moe(layer, "int8", "per_channel", calib_x=xc)
    assert rel_error(q8(x), layer(x)) < 0.01


def test_method_mse_or_clear_error(rng):
    layer = xavier_moe(num_e=2, d=64, d_ff=96)
    try:
        q = quantize_moe(layer, method="mse")
    except InvalidParamsError as exc:  # a core whose calibrate_linear has no method=
        assert "minmax" in str(exc)
        return
    x = rng.standard_normal((40, 64))
    minmax = quantize_moe(layer)
    assert rel_error(q(x), layer(x)) <= 1.05 * rel_error(minmax(x), layer(x))


def test_act_order_that_is_not_a_bool_is_rejected_not_coerced(rng):
    # bool("no") is True: act_order="no" used to run GPTQ with activation order
    layer = xavier_moe(num_e=2, d=16, d_ff=16)
    with pytest.raises(InvalidParamsError, match="act_order must be True or False; got 'no'"):
        quantize_moe(layer, calib_x=rng.standard_normal((64, 16)), min_tokens=1, act_order="no")


@pytest.mark.parametrize("shape", [(16,), (2, 32, 16)])
def test_calib_x_of_wrong_rank_names_tokens_not_weights(rng, shape):
    layer = xavier_moe(num_e=2, d=16, d_ff=16)
    with pytest.raises(ShapeMismatchError, match=r"calib_x must be 2-D \(tokens, 16\)"):
        quantize_moe(layer, calib_x=rng.standard_normal(shape))


def test_quantize_moe_takes_the_checkpoint_recipe(rng):
    from qlinear.quantconfig import QuantConfig

    layer = MoELayer(
        rng.standard_normal((4, 16)),
        [
            GatedExpert(*(rng.standard_normal(s) for s in ((24, 16), (24, 16), (16, 24))))
            for _ in range(4)
        ],
    )
    cfg = QuantConfig("int4", "per_group", "asymmetric", 8, "mse")
    a = quantize_moe(layer, cfg)
    b = quantize_moe(layer, "int4", "per_group", "asymmetric", group_size=8, method="mse")
    c = quantize_moe(layer, cfg.to_dict())
    for q in (a, b, c):
        rep = q.quantization_report  # given to the constructor, not patched in afterwards
        assert (rep.qtype, rep.granularity, rep.group_size, rep.method) == (
            "int4",
            "per_group",
            8,
            "mse",
        )
    x = rng.standard_normal((5, 16))
    assert np.array_equal(a(x), b(x)) and np.array_equal(a(x), c(x))
    with pytest.raises(InvalidParamsError, match="either as a QuantConfig"):
        quantize_moe(layer, cfg, "per_channel")
    assert layer.quantization_report is None
