"""Routing functions on logits directly (hypothesis over shapes and options)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _moe_ref import ref_dense_weights
from conftest import assert_close
from qlinear.moe import LinearExpert, MoELayer
from qlinear.moe.routing import ROUTINGS, route_logits, routing_stats


def to_dense(r, num_e):
    n = r.indices.shape[0]
    dense = np.zeros((n, num_e))
    rows = np.repeat(np.arange(n), r.indices.shape[1])
    keep = r.indices.ravel() >= 0
    np.add.at(dense, (rows[keep], r.indices.ravel()[keep]), r.weights.ravel()[keep])
    return dense


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 12),
    num_e=st.integers(1, 6),
    k=st.integers(1, 6),
    routing=st.sampled_from(ROUTINGS),
    normalize=st.booleans(),
    ints=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_route_logits_vs_reference(n, num_e, k, routing, normalize, ints, seed):
    k = min(k, num_e)
    rng = np.random.default_rng(seed)
    # Small integer logits make ties frequent.
    logits = rng.integers(-2, 3, (n, num_e)).astype(float) if ints else rng.normal(size=(n, num_e))
    r = route_logits(logits, routing, k, normalize)
    expected = ref_dense_weights(logits, routing, k, normalize)
    got = to_dense(r, num_e)
    assert_close(got, expected, rtol=1e-12, atol=1e-15)
    # With ties, the dense *weights* could agree while the chosen set differs only when the
    # weights are equal, so also compare the chosen sets.
    assert np.array_equal(got > 0, expected > 0)
    stats = routing_stats(logits, r)
    assert stats.tokens_per_expert.tolist() == (expected > 0).sum(axis=0).tolist()


@pytest.mark.parametrize("routing", ROUTINGS)
def test_shapes_and_dtypes(routing):
    logits = np.random.default_rng(0).normal(size=(5, 4))
    r = route_logits(logits, routing, 2, True)
    assert r.indices.dtype == np.int64 and r.weights.dtype == np.float64
    width = {"topk": 2, "softmax": 4, "switch": 1, "expert_choice": 4}[routing]
    assert r.indices.shape == r.weights.shape == (5, width)


@pytest.mark.parametrize("routing", ["topk", "softmax", "switch", "expert_choice"])
def test_logits_spanning_float64_route_without_overflow_warnings(routing):
    # logits - max(logits) overflowed to -Inf with a RuntimeWarning (an error under -W
    # error); the limit, probability 0, is what the router must give
    r = np.array([[1e308], [-1e308]])
    kw = {"normalize": False} if routing == "topk" else {}
    layer = MoELayer(
        r,
        [LinearExpert.from_arrays(np.full((2, 1), e + 1.0)) for e in range(2)],
        top_k=1,
        routing=routing,
        **kw,
    )
    y = layer(np.array([[1.0], [-1.0]]))
    # token 0 goes (all but) entirely to expert 0, token 1 to expert 1
    np.testing.assert_allclose(y, [[1.0, 1.0], [-2.0, -2.0]])
