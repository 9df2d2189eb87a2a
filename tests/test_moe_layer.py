"""MoELayer: grouped forward against a dense reference, routing edge cases, bad input."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _moe_ref import ref_dense_weights, ref_moe
from conftest import assert_close
from qlinear import (
    InvalidInputError,
    InvalidParamsError,
    QuantizedLinear,
    ShapeMismatchError,
    calibrate_linear,
)
from qlinear.moe import GatedExpert, LinearExpert, MoELayer, quantize_moe

ROUTINGS = ["topk", "softmax", "switch", "expert_choice"]
TOL = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def gated_layer(rng, num_e=6, d=24, d_ff=40, **kw):
    experts = [GatedExpert.xavier_init(d, d_ff, seed=100 + i) for i in range(num_e)]
    return MoELayer(rng.standard_normal((num_e, d)), experts, **kw)


def linear_layer(rng, num_e=5, d=16, d_out=12, **kw):
    experts = [
        LinearExpert.from_arrays(rng.standard_normal((d_out, d)), rng.standard_normal(d_out))
        for _ in range(num_e)
    ]
    return MoELayer(rng.standard_normal((num_e, d)), experts, **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("kind", ["gated", "linear"])
def test_forward_matches_dense_reference(rng, routing, quantized, dtype, kind):
    make = gated_layer if kind == "gated" else linear_layer
    layer = make(rng, routing=routing, top_k=2)
    if quantized:
        layer = quantize_moe(layer, "int8", "per_channel")
        piece = layer.experts[0].gate if kind == "gated" else layer.experts[0].weights
        assert isinstance(piece, QuantizedLinear)
    x = rng.standard_normal((37, layer.input_dim)).astype(dtype)
    y = layer.forward(x)
    assert y.dtype == dtype
    expected, _ = ref_moe(layer, x)
    assert_close(y, expected, **TOL[dtype], what=f"{routing} {kind} q={quantized}")


@pytest.mark.parametrize("routing", ROUTINGS)
def test_route_matches_reference_weights(rng, routing):
    layer = gated_layer(rng, routing=routing, top_k=3, router_bias=rng.standard_normal(6))
    x = rng.standard_normal((29, layer.input_dim))
    idx, w = layer.route(x)
    logits = x @ layer.router_weight.T + layer.router_bias
    dense = ref_dense_weights(logits, routing, 3, True, None)
    got = np.zeros_like(dense)
    for t in range(idx.shape[0]):
        for e, we in zip(idx[t], w[t], strict=True):
            if e >= 0:
                assert got[t, e] == 0, "an expert appears twice for one token"
                got[t, e] = we
            else:
                assert we == 0
    assert_close(got, dense, rtol=1e-12, atol=1e-15)
    # Slots are ordered by decreasing weight.
    assert np.all(np.diff(w, axis=1) <= 0)


def test_topk_without_normalize_uses_full_softmax(rng):
    layer = gated_layer(rng, top_k=2, normalize=False)
    x = rng.standard_normal((10, layer.input_dim))
    _, w = layer.route(x)
    assert np.all(w.sum(axis=1) < 1.0)
    expected, _ = ref_moe(layer, x)
    assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_top_k_equal_num_experts_is_dense_softmax(rng):
    a = gated_layer(rng, num_e=4, top_k=4)
    b = MoELayer(a.router_weight, a.experts, routing="softmax")
    x = rng.standard_normal((9, a.input_dim))
    idx, w = a.route(x)
    assert idx.shape == (9, 4)
    assert np.all(np.sort(idx, axis=1) == np.arange(4))
    assert_close(w.sum(axis=1), np.ones(9), rtol=1e-12)
    assert_close(a(x), b(x), rtol=1e-10, atol=1e-12)


def test_top_k_one_weight_is_one(rng):
    layer = gated_layer(rng, top_k=1)
    x = rng.standard_normal((8, layer.input_dim))
    idx, w = layer.route(x)
    logits = x @ layer.router_weight.T
    assert np.array_equal(idx[:, 0], logits.argmax(axis=1))
    assert np.all(w == 1.0)
    expected, _ = ref_moe(layer, x)
    assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_switch_weight_is_router_probability(rng):
    layer = gated_layer(rng, routing="switch")
    x = rng.standard_normal((8, layer.input_dim))
    _, w = layer.route(x)
    logits = x @ layer.router_weight.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    assert_close(w[:, 0], p.max(axis=1), rtol=1e-12)


def test_ties_lowest_expert_wins(rng):
    d = 8
    # Small integers: every dot product is exact, whatever order BLAS sums in, so equal
    # rows give bit-identical logits.
    router = rng.integers(-3, 4, (5, d)).astype(float)
    router[1] = 2.0
    router[3] = router[1]  # experts 1, 3 and 4 always tie
    router[4] = router[1]
    x = np.ones(d) * 5.0  # logits: 80 for experts 1, 3, 4; at most 40 for 0 and 2
    router[[0, 2]] = np.minimum(router[[0, 2]], 1.0)
    experts = [LinearExpert.xavier_init(d, 4, seed=i) for i in range(5)]
    for k, want in [(1, [1]), (2, [1, 3]), (3, [1, 3, 4])]:
        idx, w = MoELayer(router, experts, top_k=k).route(x[None])
        assert idx[0].tolist() == want
        assert_close(w[0], np.full(k, 1.0 / k), rtol=1e-12)
    idx, _ = MoELayer(router, experts, routing="switch").route(x[None])
    assert idx[0].tolist() == [1]
    # All logits equal: the first top_k experts.
    idx, _ = MoELayer(np.zeros((5, d)), experts, top_k=2).route(rng.standard_normal((3, d)))
    assert idx.tolist() == [[0, 1]] * 3


@pytest.mark.parametrize("d", [1, 3, 8, 13, 64])
def test_identical_router_rows_tie_exactly(rng, d):
    # Random (inexact) values: the logits of equal rows must still be bit-identical.
    router = rng.standard_normal((6, d))
    router[[2, 4, 5]] = router[1]
    experts = [LinearExpert.xavier_init(d, 2, seed=i) for i in range(6)]
    x = rng.standard_normal((40, d))
    for n in (1, 2, 3, 40):
        idx, _ = MoELayer(router, experts, routing="softmax").route(x[:n])
        pos = np.argsort(idx, axis=1)  # slot of each expert per token
        assert np.all(pos[:, 1] < pos[:, 2]) and np.all(pos[:, 2] < pos[:, 4])
        assert np.all(pos[:, 4] < pos[:, 5])
        # The slots of experts 1, 2, 4, 5 are adjacent: nothing ranks between equal logits.
        slots = np.sort(pos[:, [1, 2, 4, 5]], axis=1)
        assert np.all(np.diff(slots, axis=1) == 1)


def test_expert_choice_ties_lowest_token_wins(rng):
    d = 6
    experts = [LinearExpert.xavier_init(d, 3, seed=i) for i in range(3)]
    layer = MoELayer(rng.standard_normal((3, d)), experts, routing="expert_choice", capacity=2)
    x = np.tile(rng.standard_normal(d), (5, 1))  # five identical tokens
    idx, _ = layer.route(x)
    taken = [(idx[t] >= 0).sum() for t in range(5)]
    assert taken == [3, 3, 0, 0, 0]
    stats = layer.routing_stats(x)
    assert stats.dropped_tokens == 3


def test_batch_of_one_and_vector_input(rng):
    layer = gated_layer(rng)
    v = rng.standard_normal(layer.input_dim)
    y1 = layer(v)
    assert y1.shape == (layer.output_dim,)
    y2 = layer(v[None])
    assert y2.shape == (1, layer.output_dim)
    expected, _ = ref_moe(layer, v[None])
    assert_close(y2, expected, rtol=1e-10, atol=1e-12)
    assert_close(y1, expected[0], rtol=1e-10, atol=1e-12)


def test_leading_axes(rng):
    layer = gated_layer(rng)
    x = rng.standard_normal((2, 3, layer.input_dim))
    y = layer(x)
    assert y.shape == (2, 3, layer.output_dim)
    assert_close(y.reshape(6, -1), layer(x.reshape(6, -1)), rtol=0, atol=0)


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch(rng, routing, dtype):
    layer = gated_layer(rng, routing=routing)
    y, stats = layer.forward(np.zeros((0, layer.input_dim), dtype=dtype), return_stats=True)
    assert y.shape == (0, layer.output_dim) and y.dtype == dtype
    assert stats.num_tokens == 0 and stats.tokens_per_expert.sum() == 0
    assert stats.aux_loss == 0.0 and stats.cv == 0.0
    idx, w = layer.route(np.zeros((0, layer.input_dim)))
    assert idx.shape[0] == 0 and w.shape[0] == 0
    q = quantize_moe(layer)
    assert q(np.zeros((0, layer.input_dim), dtype=dtype)).shape == (0, layer.output_dim)


@pytest.mark.parametrize("quantized", [False, True])
def test_expert_receiving_no_tokens(rng, quantized):
    bias = np.zeros(6)
    bias[2] = -1e4  # expert 2 is never among the top 2
    layer = gated_layer(rng, router_bias=bias)
    if quantized:
        layer = quantize_moe(layer)
    x = rng.standard_normal((20, layer.input_dim))
    y, stats = layer.forward(x, return_stats=True)
    assert stats.tokens_per_expert[2] == 0
    assert stats.tokens_per_expert.sum() == 40
    expected, _ = ref_moe(layer, x)
    assert_close(y, expected, rtol=1e-10, atol=1e-12)


def test_stats_against_definitions(rng):
    layer = gated_layer(rng, top_k=2)
    x = rng.standard_normal((50, layer.input_dim))
    _, stats = layer.forward(x, return_stats=True)
    logits = x @ layer.router_weight.T
    dense = ref_dense_weights(logits, "topk", 2)
    counts = (dense > 0).sum(axis=0)
    assert stats.tokens_per_expert.tolist() == counts.tolist()
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    f = counts / counts.sum()
    assert stats.aux_loss == pytest.approx(6 * np.sum(f * p.mean(axis=0)), rel=1e-12)
    assert stats.cv == pytest.approx(np.std(counts) / np.mean(counts), rel=1e-12)
    assert stats.dropped_tokens == 0
    assert stats == stats and layer.routing_stats(x).tokens_per_expert.tolist() == counts.tolist()


def test_balanced_routing_has_aux_loss_one():
    d = 4
    router = np.eye(4)
    experts = [LinearExpert.xavier_init(d, 2, seed=i) for i in range(4)]
    layer = MoELayer(router, experts, routing="switch")
    x = np.eye(4) * 50.0  # token t goes (almost surely) to expert t
    stats = layer.routing_stats(x)
    assert stats.tokens_per_expert.tolist() == [1, 1, 1, 1]
    assert stats.cv == 0.0
    assert stats.aux_loss == pytest.approx(1.0, rel=1e-9)
    skewed = layer.routing_stats(np.tile(x[0], (4, 1)))
    assert skewed.tokens_per_expert.tolist() == [4, 0, 0, 0]
    assert skewed.aux_loss == pytest.approx(4.0, rel=1e-9)


def test_expert_choice_capacity(rng):
    layer = gated_layer(rng, routing="expert_choice", capacity=3)
    x = rng.standard_normal((10, layer.input_dim))
    stats = layer.routing_stats(x)
    assert stats.tokens_per_expert.tolist() == [3] * 6
    big = gated_layer(rng, routing="expert_choice", capacity=100)
    assert big.routing_stats(x).tokens_per_expert.tolist() == [10] * 6
    default = gated_layer(rng, routing="expert_choice", top_k=2)
    assert default.routing_stats(x).tokens_per_expert.tolist() == [4] * 6  # ceil(10*2/6)


def test_threads_get_the_same_results(rng):
    layer = quantize_moe(gated_layer(rng))
    xs = [rng.standard_normal((n, layer.input_dim)) for n in (1, 7, 30, 64)] * 3
    expected = [layer(x) for x in xs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: layer.forward(x, return_stats=True), xs))
    for (y, stats), e, x in zip(got, expected, xs, strict=True):
        assert np.array_equal(y, e)
        assert stats.num_tokens == x.shape[0]


def test_from_fused_views_and_matches_separate(rng):
    num_e, d, d_ff = 4, 16, 24
    g = rng.standard_normal((num_e, d_ff, d)).astype(np.float32)
    u = rng.standard_normal((num_e, d_ff, d)).astype(np.float32)
    dn = rng.standard_normal((num_e, d, d_ff)).astype(np.float32)
    router = rng.standard_normal((num_e, d))
    fused = MoELayer.from_fused(router, g, u, dn, top_k=2)
    for e, ex in enumerate(fused.experts):
        assert np.shares_memory(ex.gate, g) and np.shares_memory(ex.down, dn)
        assert np.array_equal(ex.up, u[e])
    sep = MoELayer(
        router, [GatedExpert(g[e].copy(), u[e].copy(), dn[e].copy()) for e in range(num_e)]
    )
    x = rng.standard_normal((11, d)).astype(np.float32)
    assert np.array_equal(fused(x), sep(x))
    expected, _ = ref_moe(fused, x)
    assert_close(fused(x), expected, rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------------ bad input
def test_bad_router_shapes(rng):
    experts = [LinearExpert.xavier_init(8, 4, seed=i) for i in range(3)]
    with pytest.raises(ShapeMismatchError, match="one expert per row"):
        MoELayer(rng.standard_normal((4, 8)), experts)
    with pytest.raises(ShapeMismatchError, match="d_model"):
        MoELayer(rng.standard_normal((3, 9)), experts)
    with pytest.raises(ShapeMismatchError, match="2-D"):
        MoELayer(rng.standard_normal(8), experts)
    with pytest.raises(ShapeMismatchError, match="router_bias"):
        MoELayer(rng.standard_normal((3, 8)), experts, router_bias=np.zeros(4))
    with pytest.raises(InvalidInputError, match="router_weight"):
        MoELayer(np.full((3, 8), np.nan), experts)
    with pytest.raises(InvalidInputError, match="floating"):
        MoELayer(np.ones((3, 8), dtype=np.int64), experts)


@pytest.mark.parametrize("top_k", [0, 4, -1, 2.0, True])
def test_bad_top_k(rng, top_k):
    experts = [LinearExpert.xavier_init(8, 4, seed=i) for i in range(3)]
    with pytest.raises(InvalidParamsError, match="top_k"):
        MoELayer(rng.standard_normal((3, 8)), experts, top_k=top_k)


def test_bad_options(rng):
    experts = [LinearExpert.xavier_init(8, 4, seed=i) for i in range(3)]
    r = rng.standard_normal((3, 8))
    with pytest.raises(InvalidParamsError, match="routing"):
        MoELayer(r, experts, routing="hash")
    with pytest.raises(InvalidParamsError, match="capacity"):
        MoELayer(r, experts, capacity=2)
    with pytest.raises(InvalidParamsError, match="capacity"):
        MoELayer(r, experts, routing="expert_choice", capacity=0)
    with pytest.raises(InvalidParamsError, match="Expert"):
        MoELayer(r, [*experts[:2], np.eye(8)])


def test_mismatched_experts(rng):
    r = rng.standard_normal((3, 8))
    experts = [LinearExpert.xavier_init(8, 4, seed=0), LinearExpert.xavier_init(8, 5, seed=1)]
    with pytest.raises(ShapeMismatchError, match="output_dim"):
        MoELayer(r[:2], experts)
    experts = [GatedExpert.xavier_init(8, 16, seed=0), GatedExpert.xavier_init(7, 16, seed=1)]
    with pytest.raises(ShapeMismatchError, match="input_dim"):
        MoELayer(r[:2], experts)


def test_fused_bad_shapes(rng):
    r = rng.standard_normal((2, 8))
    g = rng.standard_normal((2, 16, 8))
    with pytest.raises(ShapeMismatchError, match="3-D"):
        MoELayer.from_fused(r, g[0], g, rng.standard_normal((2, 8, 16)))
    with pytest.raises(ShapeMismatchError, match="number of experts"):
        MoELayer.from_fused(r, g, g, rng.standard_normal((3, 8, 16)))
    with pytest.raises(ShapeMismatchError, match="down"):
        MoELayer.from_fused(r, g, g, rng.standard_normal((2, 8, 15)))


def test_bad_x(rng):
    layer = gated_layer(rng)
    x = rng.standard_normal((4, layer.input_dim))
    x[2, 3] = np.nan
    with pytest.raises(InvalidInputError, match="nan"):
        layer(x)
    with pytest.raises(InvalidInputError, match="nan"):
        layer.route(x)
    with pytest.raises(InvalidInputError, match="nan"):
        quantize_moe(layer)(x)
    x[2, 3] = np.inf
    with pytest.raises(InvalidInputError):
        layer(x)
    with pytest.raises(ShapeMismatchError, match=str(layer.input_dim)):
        layer(rng.standard_normal((4, layer.input_dim + 1)))
    with pytest.raises(InvalidInputError, match="dtype"):
        layer(np.ones((2, layer.input_dim), dtype=np.int32))
    with pytest.raises(InvalidInputError, match="overflow"):
        layer(np.full((1, layer.input_dim), 1e308))


def test_float16_input_computes_in_float32(rng):
    layer = gated_layer(rng)
    x = rng.standard_normal((5, layer.input_dim)).astype(np.float16)
    y = layer(x)
    assert y.dtype == np.float32
    assert_close(y, layer(x.astype(np.float32)), rtol=0, atol=0)


def test_quantized_linear_expert_pieces_accepted(rng):
    w = rng.standard_normal((6, 10))
    q = QuantizedLinear.from_fp(w, calibrate_linear(w))
    layer = MoELayer(rng.standard_normal((2, 10)), [LinearExpert(q), LinearExpert(w)], top_k=2)
    x = rng.standard_normal((3, 10))
    expected, _ = ref_moe(layer, x)
    assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_expert_overflow_is_an_error_not_inf(rng):
    layer = gated_layer(rng)
    x = np.full((2, layer.input_dim), 1e30, dtype=np.float32)
    with pytest.raises(InvalidInputError, match="overflow"):
        layer(x)


@pytest.mark.parametrize("wdtype", [np.float32, np.float64])
@pytest.mark.parametrize("xdtype", [np.float32, np.float64])
def test_weight_and_input_dtypes_mix(rng, wdtype, xdtype):
    experts = [GatedExpert.xavier_init(12, 20, seed=i, dtype=wdtype) for i in range(3)]
    layer = MoELayer(rng.standard_normal((3, 12)), experts)
    x = rng.standard_normal((7, 12)).astype(xdtype)
    y = layer(x)
    assert y.dtype == xdtype
    expected, _ = ref_moe(layer, x)
    tol = TOL[np.float32] if np.float32 in (wdtype, xdtype) else TOL[np.float64]
    assert_close(y, expected, **tol)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 9),
    num_e=st.integers(1, 5),
    k=st.integers(1, 5),
    routing=st.sampled_from(ROUTINGS),
    seed=st.integers(0, 2**16),
)
def test_forward_vs_reference_random_shapes(n, num_e, k, routing, seed):
    rng = np.random.default_rng(seed)
    k = min(k, num_e)
    d, d_out = int(rng.integers(1, 6)), int(rng.integers(1, 6))
    experts = [
        LinearExpert(rng.standard_normal((d_out, d)), rng.standard_normal(d_out))
        for _ in range(num_e)
    ]
    layer = MoELayer(rng.standard_normal((num_e, d)), experts, top_k=k, routing=routing)
    x = rng.standard_normal((n, d))
    expected, _ = ref_moe(layer, x)
    assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_experts_not_iterable(rng):
    with pytest.raises(InvalidParamsError, match="experts"):
        MoELayer(rng.standard_normal((1, 4)), LinearExpert.xavier_init(4, 2, seed=0))


@pytest.mark.parametrize("dtype", [np.dtype(">f8"), np.dtype(np.longdouble)])
def test_wide_or_byte_swapped_float_input_keeps_float64_precision(rng, dtype):
    # such inputs were cast to float32 (relative error ~1e-7 instead of ~1e-16)
    layer = linear_layer(rng)
    x = rng.standard_normal((7, 16))
    y = layer(x.astype(dtype))
    assert y.dtype == np.float64
    assert_close(y, layer(x), rtol=1e-12, atol=1e-12)
