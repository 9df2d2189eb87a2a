"""LinearExpert and GatedExpert."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import assert_close
from qlinear import (
    InvalidInputError,
    InvalidParamsError,
    QuantizedLinear,
    ShapeMismatchError,
    calibrate_linear,
)
from qlinear.moe import Expert, GatedExpert, LinearExpert


def test_linear_expert_forward(rng):
    w, b = rng.standard_normal((5, 7)), rng.standard_normal(5)
    ex = LinearExpert.from_arrays(w, b)
    assert isinstance(ex, Expert)
    assert (ex.input_dim, ex.output_dim) == (7, 5)
    x = rng.standard_normal((3, 7))
    expected = np.array(
        [[sum(w[o, i] * x[t, i] for i in range(7)) + b[o] for o in range(5)] for t in range(3)]
    )
    assert_close(ex.forward(x), expected, rtol=1e-12, atol=1e-12)
    assert_close(ex(x[1]), expected[1], rtol=1e-12, atol=1e-12)
    assert ex.forward(x.astype(np.float32)).dtype == np.float32
    assert ex.forward(np.zeros((0, 7))).shape == (0, 5)


def test_linear_expert_shares_weights_read_only(rng):
    w = rng.standard_normal((4, 3))
    ex = LinearExpert.from_arrays(w)
    assert np.shares_memory(ex.weights, w)
    assert not ex.weights.flags.writeable
    assert ex.bias is None


def test_linear_expert_zeros():
    ex = LinearExpert.zeros(6, 4)
    assert ex.weights.shape == (4, 6) and np.all(ex.weights == 0) and np.all(ex.bias == 0)
    assert np.all(ex(np.ones((2, 6))) == 0)


def test_xavier_init_reproducible_and_scaled():
    a = LinearExpert.xavier_init(300, 200, seed=7)
    b = LinearExpert.xavier_init(300, 200, seed=7)
    c = LinearExpert.xavier_init(300, 200, seed=8)
    assert a.weights.shape == (200, 300)
    assert np.array_equal(a.weights, b.weights)
    assert not np.array_equal(a.weights, c.weights)
    std = math.sqrt(2.0 / (300 + 200))
    assert abs(a.weights.std() / std - 1) < 0.02  # 60000 samples: ~0.3% standard error
    assert abs(a.weights.mean()) < 4 * std / math.sqrt(60000)
    assert np.all(a.bias == 0)
    assert LinearExpert.xavier_init(3, 2, seed=1, dtype=np.float32).weights.dtype == np.float32


@pytest.mark.parametrize(
    ("args", "err"),
    [((0, 3), ShapeMismatchError), ((3, 0), ShapeMismatchError), ((-1, 3), ShapeMismatchError)],
)
def test_zero_dims_rejected(args, err):
    with pytest.raises(err):
        LinearExpert.zeros(*args)
    with pytest.raises(err):
        LinearExpert.xavier_init(*args, seed=0)
    with pytest.raises(err):
        GatedExpert.xavier_init(*args, seed=0)


def test_linear_expert_bad_arrays(rng):
    with pytest.raises(ShapeMismatchError, match="bias"):
        LinearExpert.from_arrays(rng.standard_normal((4, 3)), np.zeros(3))
    with pytest.raises(ShapeMismatchError, match="2-D"):
        LinearExpert.from_arrays(rng.standard_normal(4))
    with pytest.raises(ShapeMismatchError, match="zero"):
        LinearExpert.from_arrays(np.zeros((0, 3)))
    with pytest.raises(InvalidInputError, match="dtype"):
        LinearExpert.from_arrays(np.ones((2, 2), dtype=np.int8))
    w = rng.standard_normal((2, 2))
    w[0, 1] = np.nan
    with pytest.raises(InvalidInputError, match="nan"):
        LinearExpert.from_arrays(w)
    ex = LinearExpert.xavier_init(3, 2, seed=0)
    with pytest.raises(ShapeMismatchError, match=r"\(\.\.\., 3\)"):
        ex(np.ones((2, 4)))
    with pytest.raises(InvalidInputError, match="nan"):
        ex(np.array([1.0, np.nan, 0.0]))


def test_quantized_piece(rng):
    w = rng.standard_normal((6, 9))
    q = QuantizedLinear.from_fp(w, calibrate_linear(w))
    ex = LinearExpert(q, np.ones(6))
    assert ex.weights is q and (ex.input_dim, ex.output_dim) == (9, 6)
    x = rng.standard_normal((4, 9))
    assert_close(ex(x), x @ q.dequantize().T + 1.0, rtol=1e-12, atol=1e-12)
    assert ex(x.astype(np.float32)).dtype == np.float32
    with pytest.raises(InvalidParamsError, match="in_features"):
        LinearExpert(type("Bad", (), {"forward": lambda self, x: x})())


def _silu(z):
    return z / (1.0 + np.exp(-z))


def test_gated_expert_forward(rng):
    ex = GatedExpert.xavier_init(8, 20, seed=3)
    assert (ex.input_dim, ex.hidden_dim, ex.output_dim) == (8, 20, 8)
    assert ex.activation == "silu"
    x = rng.standard_normal((5, 8))
    expected = (_silu(x @ ex.gate.T) * (x @ ex.up.T)) @ ex.down.T
    assert_close(ex(x), expected, rtol=1e-12, atol=1e-14)
    assert ex(x.astype(np.float32)).dtype == np.float32
    assert ex(x[0]).shape == (8,)


def test_gated_expert_from_arrays_and_other_output(rng):
    g, u, d = (
        rng.standard_normal((12, 5)),
        rng.standard_normal((12, 5)),
        rng.standard_normal((3, 12)),
    )
    ex = GatedExpert.from_arrays(g, u, d)
    assert ex.output_dim == 3
    assert np.shares_memory(ex.gate, g)
    with pytest.raises(ShapeMismatchError, match="same shape"):
        GatedExpert(g, u[:11], d)
    with pytest.raises(ShapeMismatchError, match="down"):
        GatedExpert(g, u, d[:, :11])
    with pytest.raises(InvalidParamsError, match="activation"):
        GatedExpert(g, u, d, activation="relu6")


def test_gelu_values():
    ex_g = GatedExpert(np.eye(4), np.eye(4), np.eye(4), activation="gelu")
    ex_t = GatedExpert(np.eye(4), np.eye(4), np.eye(4), activation="gelu_tanh")
    x = np.array([[-3.0, -0.5, 0.7, 2.5]])
    gelu = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x[0]])
    assert_close(ex_g(x), gelu * x, rtol=1e-14, atol=1e-16)
    assert_close(ex_t(x), gelu * x, rtol=0, atol=2e-3)  # tanh form: an approximation


def test_activations_against_torch(rng):
    torch = pytest.importorskip("torch")
    z = rng.standard_normal(200) * 4
    zt = torch.from_numpy(z)
    eye = np.eye(200)
    for act, ref in [
        ("silu", torch.nn.functional.silu(zt)),
        ("gelu", torch.nn.functional.gelu(zt)),
        ("gelu_tanh", torch.nn.functional.gelu(zt, approximate="tanh")),
    ]:
        ex = GatedExpert(eye, eye, eye, activation=act)
        # up(x) == x, so the output is act(z) * z.
        assert_close(ex(z), ref.numpy() * z, rtol=1e-12, atol=1e-14, what=act)


def test_custom_activation(rng):
    ex = GatedExpert(np.eye(3), np.eye(3), np.eye(3), activation=np.tanh)
    x = rng.standard_normal(3)
    assert_close(ex(x), np.tanh(x) * x, rtol=1e-14)


@pytest.mark.parametrize("seed", ["a", 1.5, -1, True])
@pytest.mark.parametrize("cls", [LinearExpert, GatedExpert])
def test_xavier_init_bad_seed_is_a_clear_error(cls, seed):
    with pytest.raises(InvalidParamsError, match="seed"):
        cls.xavier_init(3, 4, seed=seed)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LinearExpert.from_arrays(np.ones((8, 4))),
        lambda: GatedExpert.from_arrays(np.ones((8, 4)), np.ones((8, 4)), np.ones((4, 8))),
    ],
)
@pytest.mark.parametrize("x", [np.full((1, 4), 3e38, np.float32), np.full((2, 4), 1e308)])
def test_standalone_expert_overflow_is_an_error_not_inf(make, x):
    # returned Inf/NaN with RuntimeWarnings (an error under -W error, silent otherwise)
    with pytest.raises(InvalidInputError, match="overflowed"):
        make()(x)
